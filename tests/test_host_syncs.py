"""Host synchronisation in the engine's step (dspark/engine/host_syncs.py, issue 17 item 1).

Between the target forward and the commit a step reads the device once (`to_host`); the planning phase,
which must know ℓ before the forward, reads once more when a drafter ran. `HostSyncCounter` counts every
other read — `.item()`/`int()`/`bool()` (`aten._local_scalar_dense`), `.tolist()`, device-to-host copies,
data-dependent ops — the same way on the CPU as on CUDA, so these tests hold the GPU's discipline on CPU.
Also: greedy verification by argmax equals the rejection rule with one-hot distributions.
"""

from __future__ import annotations

import pytest
import torch

from dspark.decoding.sampling import SamplingParams, logits_to_probs, sample_tokens
from dspark.decoding.verification import verify, verify_greedy
from dspark.engine.engine import Engine
from dspark.devices import to_device
from dspark.engine.host_syncs import HostSyncCounter, count_engine_steps, to_host
from dspark.models.drafters.dspark import load_dspark_drafter
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner

from drafters_for_tests import save_dspark_folder

MODEL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("syncs")
    target = build_random_model(root / "target", "tiny-qwen3", seed=1, init_std=0.3, with_tokenizer=False, **MODEL)
    return target, save_dspark_folder(target, root / "dspark", block_size=4)


@pytest.mark.parametrize("graphs", [False, True])  # the ragged forward; the static step (dspark.models.static_step)
@pytest.mark.parametrize("count", [1, 4])  # one request: its verification rows are one attention group alone
@pytest.mark.parametrize("kind", ["plain", "dspark"])
def test_a_steady_round_reads_the_device_once_between_forward_and_commit(folders, kind, count, graphs):
    target, dspark = folders
    runner = TargetRunner.from_pretrained(target, dtype="float32", cache_page_size=4, graphs=graphs)
    drafter = load_dspark_drafter(dspark, device="cpu", dtype="float32") if kind == "dspark" else None
    if drafter is not None:
        drafter.use_graphs(graphs)
    engine = Engine(runner, drafter)
    engine.controller.gate = None  # draft every step (the CPU profile's gate may close it)
    for i in range(count):  # greedy and sampled, top-k and top-p, side by side
        sampling = SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=1.0, top_k=20 * i, top_p=0.9)
        engine.add_request(i, list(range(1 + i, 9 + i)), sampling=sampling, max_new_tokens=40, seed=i, ignore_eos=True)
    for _ in range(2):  # prefill: every request decoding from here on
        engine.step()
    whole, windows = count_engine_steps(engine, 5)
    assert engine.last_step["decoding"] == count
    if kind == "dspark":
        assert engine.last_step["drafter_ran"] and engine.spec_live.drafted_tokens > 0
    for step, window in zip(whole, windows):
        assert window.syncs == [] and window.transfers == 1
        assert step.syncs == []
        assert step.transfers == (2 if kind == "dspark" else 1)  # + the plan's read when the drafter ran
    if graphs:
        assert runner.static.replays >= 5 and runner.static.captures
        assert drafter is None or drafter.static.replays >= 5


def test_the_counter_sees_every_kind_of_host_read():
    """Negative control: each way the step used to read the device is counted (so a zero above means none)."""
    values = torch.arange(6.0)
    reads = {
        "_local_scalar_dense": lambda: bool((values > 2).any()),
        "Tensor.tolist": lambda: values.tolist(),
        "nonzero": lambda: (values > 2).nonzero(),
        "index": lambda: values[values > 2],
        "multinomial": lambda: torch.multinomial(values + 1, 1),
        "repeat_interleave": lambda: torch.repeat_interleave(torch.tensor([1, 2])),
    }
    for name, read in reads.items():
        with HostSyncCounter() as counter:
            read()
        assert len(counter.syncs) == 1 and counter.syncs[0].startswith(name), (name, counter.syncs)
    with HostSyncCounter() as counter:
        one_hot = torch.nn.functional.one_hot(torch.tensor([1, 3]), 5)  # checks its classes on the host
    assert counter.syncs and one_hot.shape == (2, 5)
    assert torch.Tensor.tolist is not None and values.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # restored


def test_the_counter_sees_blocking_copies_between_host_and_device():
    """The meta device stands in for a GPU: a host-to-device `.to()` without non_blocking makes the host wait
    (pageable memory), one with non_blocking does not; a device-to-host copy always does."""
    host = torch.arange(4)
    with HostSyncCounter() as blocking:
        on_device = host.to("meta")
    with HostSyncCounter() as asynchronous:
        host.to("meta", non_blocking=True)
        on_device.to("meta")  # no copy at all
    with HostSyncCounter() as back, pytest.raises(NotImplementedError):  # counted before the copy fails (no data)
        torch.empty(4, device="meta").to("cpu")
    assert len(blocking.syncs) == 1 and blocking.syncs[0].startswith("_to_copy")
    assert asynchronous.syncs == []
    assert len(back.syncs) == 1
    assert to_device([host], torch.device("cpu"))[0] is host  # on the CPU nothing moves


def test_to_host_packs_any_mix_of_tensors_into_one_read():
    ints = torch.tensor([[1, 2, 3], [4, 5, 6]])
    token = torch.tensor(151_935)
    flags = torch.tensor([True, False])
    floats = torch.tensor([0.25, 0.5])
    with HostSyncCounter() as counter:
        got = to_host([ints, token, flags, floats])
    assert counter.transfers == 1 and counter.syncs == []
    assert got == [[[1, 2, 3], [4, 5, 6]], 151_935, [1, 0], [0.25, 0.5]]
    assert all(type(v) is int for v in got[0][0]) and type(got[1]) is int
    assert to_host([ints, flags]) == [[[1, 2, 3], [4, 5, 6]], [1, 0]]


def test_greedy_verification_by_argmax_equals_the_rejection_rule_with_one_hot_p():
    gen = torch.Generator().manual_seed(0)
    batch, slots, vocab = 64, 6, 5  # a small vocabulary: drafts often match, every prefix length occurs
    logits = torch.randn(batch, slots + 1, vocab, generator=gen)
    probs = logits_to_probs(logits, SamplingParams(temperature=0.0))
    drafts = torch.where(torch.rand(batch, slots, generator=gen) < 0.7, logits[:, :slots].argmax(-1),
                         torch.randint(0, vocab, (batch, slots), generator=gen))
    lens = torch.randint(0, slots + 1, (batch,), generator=gen)
    q = torch.softmax(torch.randn(batch, slots, vocab, generator=gen), -1)
    uniforms = torch.rand(batch, slots + 1, generator=gen, dtype=torch.float64)
    accepted, tokens = verify_greedy(logits.argmax(-1), drafts, lens)
    for draft_probs in (None, q):
        reference = verify(probs, drafts, lens, draft_probs, uniforms=uniforms)
        assert torch.equal(accepted, reference.num_accepted) and torch.equal(tokens, reference.next_tokens)
    assert len(set(accepted.tolist())) >= 4  # the comparison covered short and long accepted prefixes
    wrong = verify_greedy(logits.argmax(-1), (drafts + 1) % vocab, lens)[0]
    assert not torch.equal(wrong, accepted)


def test_sample_tokens_is_argmax_for_greedy_rows_and_the_inverse_cdf_for_the_others():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=gen)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=5)] * 3
    uniforms = torch.rand(6, generator=gen, dtype=torch.float64)
    with HostSyncCounter() as counter:
        tokens = sample_tokens(logits, params, uniforms)
    assert counter.syncs == []
    for n, p in enumerate(params):
        probs = logits_to_probs(logits[n: n + 1], p)[0]
        expected = int(torch.searchsorted(probs.cumsum(0), uniforms[n].float() * probs.sum(), right=True))
        assert int(tokens[n]) == (int(logits[n].argmax()) if p.greedy else expected)
