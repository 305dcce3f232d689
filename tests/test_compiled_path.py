"""The compiled decoding path (`TargetRunner(..., compile=True)`, `dspark generate --compile`; issue 17 item 2):
the dense layer parts of the target and of a DSpark drafter run through torch.compile (Inductor's C++
backend on this CPU, with the system compiler). Greedy output on the compiled path must equal eager plain
decoding token for token, with and without a DSpark drafter, eager or compiled. float64 keeps fused and unfused arithmetic from flipping a near-tie.
"""

from __future__ import annotations

import torch

from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.models.decoder import compiled_dense_parts
from dspark.models.drafters import compile_drafter
from dspark.models.drafters.dspark import load_dspark_drafter
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner

from drafters_for_tests import save_dspark_folder

MODEL = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
PROMPTS = [[1, 5, 9, 2, 7], [3, 3, 8], [4, 11, 2, 6, 6, 1, 9]]


def greedy(runner, drafter=None) -> list[list[int]]:
    out = generate(runner, PROMPTS, sampling=SamplingParams(temperature=0.0), max_new_tokens=24, drafter=drafter)
    return [s.token_ids for s in out.sequences]


def test_greedy_decoding_on_the_compiled_path_equals_eager_plain_decoding(tmp_path):
    target = build_random_model(tmp_path / "target", "tiny-qwen3", seed=4, init_std=0.3, with_tokenizer=False, **MODEL)
    drafter_dir = save_dspark_folder(target, tmp_path / "dspark", block_size=4, target_layer_ids=(0, 2))
    eager = TargetRunner.from_pretrained(target, dtype="float64")
    compiled = TargetRunner.from_pretrained(target, dtype="float64", compile=True)
    assert eager.model.dense_parts is None and compiled.model.dense_parts == compiled_dense_parts()
    torch._dynamo.utils.counters.clear()
    expected = greedy(eager)
    assert greedy(compiled) == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # both parts compiled, not skipped
    drafter = load_dspark_drafter(drafter_dir, device="cpu", dtype="float64")
    assert greedy(compiled, drafter) == expected
    with_drafts = generate(compiled, PROMPTS, sampling=SamplingParams(temperature=0.0), max_new_tokens=24, drafter=drafter)
    assert with_drafts.stats.accepted_tokens > 0  # verification rows (several tokens per request) ran compiled

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled_drafter = load_dspark_drafter(drafter_dir, device="cpu", dtype="float64")
    assert compile_drafter(compiled_drafter) and compiled_drafter.model.dense_parts is not None
    assert greedy(compiled, compiled_drafter) == expected
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # the drafter's block pass compiled
    again = generate(compiled, PROMPTS, sampling=SamplingParams(temperature=0.0), max_new_tokens=24,
                     drafter=compiled_drafter)
    assert again.stats.accepted_tokens == with_drafts.stats.accepted_tokens  # the same drafts as the eager drafter

    # Sampling is not compiled (verification and the draws stay eager), so a seeded sampled batch draws the same
    # tokens on both paths: the compiled forward feeds the exact rejection rule the same distributions.
    sampled = SamplingParams(temperature=1.0, top_k=8)
    on = generate(compiled, PROMPTS, sampling=sampled, max_new_tokens=24, drafter=compiled_drafter, seed=3)
    off = generate(eager, PROMPTS, sampling=sampled, max_new_tokens=24, drafter=drafter, seed=3)
    assert [s.token_ids for s in on.sequences] == [s.token_ids for s in off.sequences]
    assert [s.token_ids for s in on.sequences] != expected  # sampled, not greedy


def test_the_static_step_on_the_compiled_path_equals_eager_plain_decoding(tmp_path):
    """Issue 17 item 2: the static step (capture buckets, replayed graphs; `HostGraph` on the CPU) runs with the
    compiled dense parts inside, for the target's step and the drafter's round."""
    target = build_random_model(tmp_path / "target", "tiny-qwen3", seed=4, init_std=0.3, with_tokenizer=False, **MODEL)
    drafter_dir = save_dspark_folder(target, tmp_path / "dspark", block_size=4, target_layer_ids=(0, 2))
    expected = greedy(TargetRunner.from_pretrained(target, dtype="float64"))
    static = TargetRunner.from_pretrained(target, dtype="float64", compile=True, graphs=True)
    drafter = load_dspark_drafter(drafter_dir, device="cpu", dtype="float64")
    compile_drafter(drafter)
    drafter.use_graphs(True)
    assert greedy(static) == expected
    assert greedy(static, drafter) == expected
    assert static.static.captures and drafter.static.captures
    assert static.model.dense_parts == compiled_dense_parts() and drafter.model.dense_parts is not None
