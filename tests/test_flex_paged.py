"""Paged attention read in place through FlexAttention (dspark/models/flex_paged.py, issue 17 item 3): a static
forward's attention must equal the gathering SDPA path's for every layout the engine makes — ragged query rows,
contexts crossing pages in scattered pages, causal and non-causal forwards, K/V-only rows, padding rows and
padding sequences — and whole decoding runs must be unchanged, with the reference implementation (float64, exact
to rounding) and with the compiled kernel (Inductor's C++ kernel on this CPU, float32).
"""

from __future__ import annotations

import pytest
import torch

from dspark.cli import main
from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.errors import ConfigError
from dspark.models.drafters.dspark import load_dspark_drafter
from dspark.models.flex_paged import FlexPagedAttention, FlexPagedGroup, attention_kernel
from dspark.models.kv_cache import PagedKVCache, StaticLayout
from dspark.models.layers import paged_attention
from dspark.models.random_init import build_random_model
from dspark.models.static_step import configure_graphs
from dspark.models.target_runner import TargetRunner

from drafters_for_tests import STATIC_PROMPTS, static_path_folders

REFERENCE = FlexPagedAttention(compiled=False)
PROMPTS = STATIC_PROMPTS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return static_path_folders(tmp_path_factory.mktemp("flex"))


def filled_cache(lengths: list[int], page_size: int, dtype: torch.dtype, generator: torch.Generator
                 ) -> tuple[PagedKVCache, list[int]]:
    """A cache (4 KV heads of 8) whose sequences hold `lengths` random keys in shuffled pages."""
    cache = PagedKVCache(1, 4, 8, page_size=page_size, dtype=dtype, device="cpu")
    cache.allocate(40, page_size)
    cache._free_pages = torch.randperm(40, generator=generator).tolist()  # scattered pages, not 0, 1, 2, ...
    seqs = [cache.new_sequence() for _ in lengths]
    cache.prepare(seqs, lengths)
    for pool in cache.k_pools + cache.v_pools:
        pool[: 40 * page_size].copy_(torch.randn(40 * page_size, 4, 8, generator=generator, dtype=dtype))
    return cache, seqs


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("compiled", [False, True])
def test_flex_attention_equals_gathered_sdpa_on_every_static_layout(compiled, causal):
    """Sequences with 1–4 new rows (and 0–3 K/V-only rows) over 1–37 cached keys in scattered pages of 4, in a
    bucket with padding rows and two padding sequences, Hq = 2 · Hkv: every real row's output is the same, with
    the reference implementation (float64, which sees only the mask function) and the compiled kernel (float32,
    which also reads the block mask: which pages, which of them full)."""
    kernel, dtype, tolerance = (FlexPagedAttention(), torch.float32, 1e-5) if compiled else (REFERENCE, torch.float64, 1e-12)
    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        lengths = torch.randint(1, 38, (3,), generator=gen).tolist()
        cache, seqs = filled_cache(lengths, 4, dtype, gen)
        query_lens = torch.randint(1, 5, (3,), generator=gen).tolist()
        kv_only = torch.randint(0, 4, (3,), generator=gen).tolist() if trial % 2 else None
        layout = cache.prepare_static(seqs, query_lens, 5, 4, 16, kv_only_lens=kv_only, kv_only_len=3 if kv_only else 0,
                                      causal=causal)
        args = (layout.packed(), 5, 4, 16, 4, cache.scratch_slot, 3 if kv_only else 0)
        sdpa = StaticLayout.metadata(*args)
        flex = StaticLayout.metadata(*args, kernel=kernel)
        assert isinstance(flex.groups[0], FlexPagedGroup)
        k, v = cache.k_pools[0], cache.v_pools[0]
        for kv_only_rows in (flex.kv_only_slot_mapping, flex.slot_mapping):  # what the layers write first
            k.index_copy_(0, kv_only_rows, torch.randn(kv_only_rows.numel(), 4, 8, generator=gen, dtype=dtype))
            v.index_copy_(0, kv_only_rows, torch.randn(kv_only_rows.numel(), 4, 8, generator=gen, dtype=dtype))
        q = torch.randn(5 * 4, 8, 8, generator=gen, dtype=dtype)
        expected = paged_attention(q, k, v, sdpa, 8 ** -0.5)
        got = paged_attention(q, k, v, flex, 8 ** -0.5)
        real = layout.real_rows
        torch.testing.assert_close(got[real], expected[real], rtol=tolerance, atol=tolerance)
        padding_sequences = torch.arange(3 * 4, 5 * 4)
        assert torch.isfinite(got).all() and not got[padding_sequences].any()  # they see no key: zeros


def test_the_attention_backend_choice():
    assert attention_kernel("auto", torch.device("cpu")) is None and attention_kernel("sdpa", torch.device("cuda")) is None
    assert attention_kernel("auto", torch.device("cuda")) is None  # until a GPU run shows flex faster
    assert attention_kernel("flex", torch.device("cpu")).compiled and attention_kernel("flex", torch.device("cuda")).compiled
    assert attention_kernel(REFERENCE, torch.device("cpu")) is REFERENCE
    with pytest.raises(ConfigError, match="one of auto, sdpa, flex"):
        attention_kernel("flashinfer", torch.device("cpu"))


def greedy(target, drafter=None) -> list[list[int]]:
    out = generate(target, PROMPTS, sampling=SamplingParams(temperature=0.0), max_new_tokens=30, drafter=drafter)
    return [s.token_ids for s in out.sequences]


@pytest.mark.parametrize("graphs", [False, True])
def test_greedy_decoding_with_the_flex_kernel_equals_eager_plain_decoding(folders, graphs):
    """The target's steps and the DSpark drafter's rounds read the cache through the kernel (reference
    implementation, float64), replayed from captures or padded eagerly (`--enforce-eager`): the same tokens as
    plain ragged decoding, and the same drafts accepted as the gathering path."""
    target_dir, drafter_dir = folders
    eager = TargetRunner.from_pretrained(target_dir, dtype="float64", cache_page_size=4)
    expected = greedy(eager)
    target = TargetRunner.from_pretrained(target_dir, dtype="float64", cache_page_size=4)
    drafter = load_dspark_drafter(drafter_dir, device="cpu", dtype="float64")
    configure_graphs(target, drafter, enforce_eager=not graphs, max_batch=8, attention=REFERENCE)
    if graphs:  # on by default on CUDA only
        target.use_graphs(True, max_batch=8, attention=REFERENCE)
        drafter.use_graphs(True, max_batch=8, attention=REFERENCE)
    assert (target.static.graphs is not None) == graphs and target.static.kernel is REFERENCE
    assert greedy(target) == expected and target.static.replays >= 30
    accepted = generate(eager, PROMPTS, sampling=SamplingParams(temperature=0.0), max_new_tokens=30,
                        drafter=load_dspark_drafter(drafter_dir, device="cpu", dtype="float64")).stats.accepted_tokens
    with_drafts = generate(target, PROMPTS, sampling=SamplingParams(temperature=0.0), max_new_tokens=30, drafter=drafter)
    assert [s.token_ids for s in with_drafts.sequences] == expected
    assert with_drafts.stats.accepted_tokens == accepted > 0
    assert drafter.static.replays > 0 and drafter.static.kernel is REFERENCE and drafter.static.kernel_error is None


def test_greedy_decoding_with_the_compiled_flex_kernel(folders):
    """The compiled kernel (Inductor's C++ FlexAttention on this CPU; float32, which it supports): greedy plain
    and speculative output equal plain ragged decoding's."""
    target_dir, drafter_dir = folders
    prompts = PROMPTS[:1]
    sampling = SamplingParams(temperature=0.0)
    eager = TargetRunner.from_pretrained(target_dir, dtype="float32", cache_page_size=4)
    expected = [s.token_ids for s in generate(eager, prompts, sampling=sampling, max_new_tokens=16).sequences]
    target = TargetRunner.from_pretrained(target_dir, dtype="float32", cache_page_size=4)
    drafter = load_dspark_drafter(drafter_dir, device="cpu", dtype="float32")
    configure_graphs(target, drafter, enforce_eager=False, max_batch=8, attention="flex")
    assert target.static.kernel.compiled and target.static.graphs is None  # no graphs on the CPU by default
    for with_drafter in (None, drafter):
        out = generate(target, prompts, sampling=sampling, max_new_tokens=16, drafter=with_drafter)
        assert [s.token_ids for s in out.sequences] == expected
    assert target.static.kernel_error is None and drafter.static.kernel_error is None
    assert target.static.replays > 0 and drafter.static.replays > 0


def test_a_kernel_that_fails_is_reported_and_decoding_goes_on_with_sdpa(folders):
    """Inductor's CPU FlexAttention takes no float64: the first static forward's compilation fails, a
    RuntimeWarning names the reason once, and that step and every later one run with SDPA — same output."""
    target = TargetRunner.from_pretrained(folders[0], dtype="float64", cache_page_size=4)
    target.use_graphs(False, attention="flex")
    with pytest.warns(RuntimeWarning, match="flex attention kernel failed.*float64"):
        tokens = greedy(target)
    assert tokens == greedy(TargetRunner.from_pretrained(folders[0], dtype="float64", cache_page_size=4))
    assert "float64" in target.static.kernel_error and target.static.kernel is None
    assert target.static.replays >= 30


def test_the_attention_backend_flag(tmp_path, capsys):
    model = str(build_random_model(tmp_path / "tiny", "tiny-qwen3", seed=3, init_std=0.08))
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", model, "--prompt", "hi", "--attention-backend", "flashinfer"])
    assert exit_.value.code == 2 and "--attention-backend: invalid choice: 'flashinfer'" in capsys.readouterr().err
    with pytest.warns(RuntimeWarning, match="flex attention kernel failed"):  # taken; no float64 on the CPU's kernel
        assert main(["generate", "--model", model, "--prompt", "hi", "--max-new-tokens", "3", "--dtype", "float64",
                     "--attention-backend", "flex"]) == 0
