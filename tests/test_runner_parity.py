"""Numerical parity of `TargetRunner` with Hugging Face transformers, and consistency of the paged KV
cache under incremental decoding, rollback, ragged batches and cache growth.

Every model here is a tiny random transformers model built in the test, saved with `save_pretrained`
(safetensors) and loaded back with `TargetRunner.from_pretrained`. Weights (norms and biases included)
are re-randomised so that a mistake in any of them shows up in the logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from dspark.errors import CacheCapacityError, RequestError, UnsupportedModelError
from dspark.models.config import parse_decoder_config
from dspark.models.kv_cache import PagedKVCache
from dspark.models.rope import rope_inverse_frequencies
from dspark.models.target_runner import TargetRunner

VOCAB = 100
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)
FAMILIES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
HF_TOL = 1e-4  # ours vs transformers
SELF_TOL = 1e-5  # ours vs ours (same kernels, different batching / chunking)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours - ref).abs().max() / ref.abs().max())


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter: norms ≠ 1 and biases ≠ 0 so that each one matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            if "norm" in name:
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.2 * noise)
            else:
                param.copy_(0.15 * noise)


def make_model(folder, family: str, seed: int = 0, **overrides):
    """Build, randomise and save a tiny HF model; return the (eval-mode) HF model."""
    torch.manual_seed(seed)
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(**{**BASE, **overrides})
    model = model_cls(config).eval()
    randomize(model, seed)
    model.save_pretrained(str(folder))
    return model


@torch.no_grad()
def hf_forward(model, tokens: list[int]):
    out = model(torch.tensor([tokens]), output_hidden_states=True)
    return out.logits[0].float(), [h[0] for h in out.hidden_states]


def tokens_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_alone(runner: TargetRunner, tokens: list[int]) -> torch.Tensor:
    """Logits of every position of `tokens` fed to a fresh sequence in one forward."""
    sid = runner.new_sequence()
    logits = runner.forward([sid], [tokens]).logits.clone()
    runner.free_sequence(sid)
    return logits


# -- shared model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A 3-layer untied Qwen3 model: (hf_model, folder)."""
    folder = tmp_path_factory.mktemp("qwen3")
    model = make_model(folder, "qwen3", seed=1, tie_word_embeddings=False)
    return model, folder


@pytest.fixture(scope="module")
def qwen3_reference(qwen3):
    """HF logits of a 60-token sequence."""
    model, _ = qwen3
    tokens = tokens_of(60, seed=11)
    logits, _ = hf_forward(model, tokens)
    return tokens, logits


# -- full-forward parity --------------------------------------------------------------------------
CASES = {
    "qwen3-untied": ("qwen3", dict(tie_word_embeddings=False)),
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True)),
    "qwen3-attention-bias": ("qwen3", dict(tie_word_embeddings=False, attention_bias=True)),
    "llama": ("llama", dict()),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-mha-tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_full_forward_logits_and_features_match_transformers(tmp_path, case):
    family, overrides = CASES[case]
    model = make_model(tmp_path, family, seed=3, **overrides)
    tokens = tokens_of(37, seed=5)
    ref_logits, ref_hidden = hf_forward(model, tokens)

    last_outputs = []
    hook = model.model.layers[-1].register_forward_hook(lambda mod, inp, out: last_outputs.append(out))
    with torch.no_grad():
        model(torch.tensor([tokens]))
    hook.remove()
    last_raw = (last_outputs[0][0] if isinstance(last_outputs[0], tuple) else last_outputs[0])[0]

    runner = TargetRunner.from_pretrained(tmp_path, dtype="float32")
    assert runner.config.family == family
    sid = runner.new_sequence()
    out = runner.forward([sid], [tokens], feature_layer_ids=(-1, 0, 1, 2))
    assert out.logits.dtype == torch.float32
    assert out.logits.shape == (len(tokens), VOCAB)
    assert rel_err(out.logits, ref_logits) < HF_TOL
    assert runner.length(sid) == len(tokens)

    hidden = BASE["hidden_size"]
    assert out.features.shape == (len(tokens), 4 * hidden)
    feats = out.features.split(hidden, dim=-1)
    # hidden_states[i + 1] is the output of layer i (layer -1 = embeddings); the last entry is post-norm.
    for layer_id, feat in zip((-1, 0, 1), feats[:3]):
        assert rel_err(feat, ref_hidden[layer_id + 1]) < HF_TOL, layer_id
    assert rel_err(feats[3], last_raw) < HF_TOL
    # The features really are distinct layers (guards against returning the same tensor for all).
    assert rel_err(feats[1], feats[2]) > 1e-2


def test_feature_order_follows_request(qwen3, qwen3_reference):
    model, folder = qwen3
    tokens, _ = qwen3_reference
    _, ref_hidden = hf_forward(model, tokens)
    runner = TargetRunner.from_pretrained(folder, dtype="float32")
    sid = runner.new_sequence()
    out = runner.forward([sid], [tokens], feature_layer_ids=(1, -1))
    h = BASE["hidden_size"]
    assert out.features.shape == (len(tokens), 2 * h)
    assert rel_err(out.features[:, :h], ref_hidden[2]) < HF_TOL
    assert rel_err(out.features[:, h:], ref_hidden[0]) < HF_TOL
    # No features requested → none returned.
    sid2 = runner.new_sequence()
    assert runner.forward([sid2], [tokens[:3]]).features is None


def test_float64_matches_transformers_float64(tmp_path):
    model = make_model(tmp_path, "llama", seed=4, attention_bias=True).double()
    tokens = tokens_of(20, seed=6)
    ref_logits, _ = hf_forward(model, tokens)
    runner = TargetRunner.from_pretrained(tmp_path, dtype="float64")
    assert runner.dtype == torch.float64
    out = runner.forward([runner.new_sequence()], [tokens])
    assert out.logits.dtype == torch.float32
    assert rel_err(out.logits, ref_logits) < 1e-6


# -- RoPE variants --------------------------------------------------------------------------------
ROPE_CASES = {
    "llama3": (
        "llama",
        dict(rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=64)),
    ),
    "yarn": (
        "qwen3",
        dict(max_position_embeddings=128,
             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32)),
    ),
    "linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "theta": ("qwen2", dict(rope_parameters=dict(rope_type="default", rope_theta=500.0))),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_scaling_logits_match_transformers(tmp_path, case):
    family, overrides = ROPE_CASES[case]
    model = make_model(tmp_path, family, seed=7, **overrides)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == overrides["rope_parameters"]["rope_type"]
    tokens = tokens_of(100, seed=8)  # beyond original_max_position_embeddings (64 / 32)
    ref_logits, _ = hf_forward(model, tokens)
    runner = TargetRunner.from_pretrained(tmp_path, dtype="float32")
    assert runner.config.rope.rope_type == overrides["rope_parameters"]["rope_type"]
    sid = runner.new_sequence()
    # Prefill then decode past the original context: positions > 64 go through the cache path too.
    first = runner.forward([sid], [tokens[:70]]).logits
    rest = [runner.forward([sid], [[t]]).logits for t in tokens[70:]]
    logits = torch.cat([first, *rest])
    assert rel_err(logits, ref_logits) < HF_TOL


def test_rope_scaling_changes_logits(tmp_path):
    """Sanity check that the RoPE parity tests can fail: linear scaling must change late positions."""
    make_model(tmp_path / "plain", "llama", seed=7)
    make_model(tmp_path / "linear", "llama", seed=7, **ROPE_CASES["linear"][1])
    tokens = tokens_of(40, seed=8)
    plain = run_alone(TargetRunner.from_pretrained(tmp_path / "plain"), tokens)
    linear = run_alone(TargetRunner.from_pretrained(tmp_path / "linear"), tokens)
    assert rel_err(linear[0], plain[0]) < 1e-6  # position 0 has no rotation
    assert rel_err(linear, plain) > 1e-3


def test_legacy_rope_scaling_format(tmp_path):
    """Older config.json files carry `rope_theta` + `rope_scaling` {"type": ...} instead of `rope_parameters`."""
    model = make_model(tmp_path, "llama", seed=9, rope_parameters=dict(rope_type="linear", rope_theta=5000.0, factor=3.0))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_parameters"]
    config["rope_theta"] = 5000.0
    config["rope_scaling"] = {"type": "linear", "factor": 3.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokens = tokens_of(50, seed=10)
    ref_logits, _ = hf_forward(model, tokens)
    runner = TargetRunner.from_pretrained(tmp_path, dtype="float32")
    assert runner.config.rope.theta == 5000.0 and runner.config.rope.factor == 3.0
    assert rel_err(run_alone(runner, tokens), ref_logits) < HF_TOL


INV_FREQ_CASES = [
    ("llama", dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
    ("llama", dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)),
    ("llama", dict(rope_type="llama3", rope_theta=10000.0, factor=32.0, low_freq_factor=2.0, high_freq_factor=8.0,
                   original_max_position_embeddings=128)),
    ("qwen3", dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32)),
    ("qwen3", dict(rope_type="yarn", rope_theta=1000000.0, factor=4.0, original_max_position_embeddings=64,
                   beta_fast=16.0, beta_slow=2.0)),
    ("qwen3", dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
                   attention_factor=1.5)),
    ("qwen3", dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=32,
                   mscale=1.0, mscale_all_dim=0.5)),
    ("qwen3", dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                   truncate=False)),
    ("qwen3", dict(rope_type="yarn", rope_theta=10000.0, factor=4.0)),  # original defaults to max_position
]


@pytest.mark.parametrize("family,rope", INV_FREQ_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(
    f"{k}={v}" for k, v in v.items() if k != "rope_theta"))
def test_rope_inverse_frequencies_match_transformers(family, rope):
    config_cls, _ = FAMILIES[family]
    hf_config = config_cls(**{**BASE, "head_dim": 32, "max_position_embeddings": 512}, rope_parameters=dict(rope))
    ref_inv_freq, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, torch.device("cpu"))
    ours = parse_decoder_config(hf_config.to_dict())
    inv_freq, scale = rope_inverse_frequencies(ours.rope, ours.head_dim, ours.max_position_embeddings)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (16,)
    assert torch.allclose(inv_freq, ref_inv_freq.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(float(ref_scale), rel=1e-9)


def test_default_rope_inverse_frequencies():
    hf = {**BASE, "architectures": ["LlamaForCausalLM"], "rope_theta": 500.0}
    ours = parse_decoder_config(hf)
    inv_freq, scale = rope_inverse_frequencies(ours.rope, 16, 256)
    expected = 1.0 / (500.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    assert torch.allclose(inv_freq.double(), expected, rtol=1e-6)
    assert scale == 1.0


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_rope_is_rejected(tmp_path, rope_type):
    config = {
        **BASE, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "rope_parameters": {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 2.0},
    }
    if rope_type == "dynamic":
        # Written by transformers itself, as a real checkpoint would be.
        LlamaConfig(**config).save_pretrained(str(tmp_path))
        assert json.loads((tmp_path / "config.json").read_text())["rope_parameters"]["rope_type"] == "dynamic"
    else:
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=rope_type):
        TargetRunner.from_pretrained(tmp_path)


# -- incremental decoding ---------------------------------------------------------------------------
def test_incremental_decoding_equals_full_forward(qwen3, qwen3_reference):
    _, folder = qwen3
    tokens, ref_logits = qwen3_reference
    runner = TargetRunner.from_pretrained(folder, dtype="float32", cache_page_size=4)
    full = run_alone(runner, tokens)
    assert rel_err(full, ref_logits) < HF_TOL

    sid = runner.new_sequence()
    chunks = [10, 1, 1, 5, 1, 7, 3, 1, 1, 16, 14]
    assert sum(chunks) == len(tokens)
    pieces, pos = [], 0
    for n in chunks:
        out = runner.forward([sid], [tokens[pos:pos + n]])
        assert out.logits.shape == (n, VOCAB) and out.query_lens == [n]
        pieces.append(out.logits)
        pos += n
        assert runner.length(sid) == pos
    incremental = torch.cat(pieces)
    assert rel_err(incremental, full) < SELF_TOL
    assert rel_err(incremental, ref_logits) < HF_TOL


def test_last_logits_only(qwen3, qwen3_reference):
    _, folder = qwen3
    tokens, ref_logits = qwen3_reference
    runner = TargetRunner.from_pretrained(folder, dtype="float32")
    sid = runner.new_sequence()
    out = runner.forward([sid], [tokens[:30]], all_logits=False)
    assert out.logits.shape == (1, VOCAB)
    assert rel_err(out.logits[0], ref_logits[29]) < HF_TOL
    # Batched: one row per sequence, the last new position of each.
    a, b = runner.new_sequence(), runner.new_sequence()
    out = runner.forward([a, sid, b], [tokens[:4], tokens[30:37], tokens[:1]], all_logits=False)
    assert out.logits.shape == (3, VOCAB)
    assert rel_err(out.logits[0], ref_logits[3]) < HF_TOL
    assert rel_err(out.logits[1], ref_logits[36]) < HF_TOL
    assert rel_err(out.logits[2], ref_logits[0]) < HF_TOL


# -- rollback ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [4, 16])
def test_rollback_then_redecode_equals_never_decoded(qwen3, block_size):
    _, folder = qwen3
    runner = TargetRunner.from_pretrained(folder, dtype="float32", cache_page_size=block_size)
    prompt = tokens_of(10, seed=20)
    junk = tokens_of(13, seed=21)
    good = tokens_of(9, seed=22)

    sid = runner.new_sequence()
    runner.forward([sid], [prompt])
    runner.forward([sid], [junk[:4]])
    for t in junk[4:]:
        runner.forward([sid], [[t]])
    assert runner.length(sid) == 23
    free_before = runner.cache.num_free_pages

    # Roll back into the middle of a block, keeping the prompt and the first junk token.
    runner.truncate(sid, 11)
    assert runner.length(sid) == 11
    if block_size == 4:
        assert runner.cache.num_free_pages == free_before + (6 - 3)  # 23 tokens → 6 blocks, 11 → 3
    # Another sequence grabs the freed blocks and writes into them before we re-decode.
    other = runner.new_sequence()
    other_tokens = tokens_of(21, seed=23)
    other_logits = runner.forward([other], [other_tokens]).logits.clone()

    out1 = runner.forward([sid], [good[:5]]).logits
    out2 = runner.forward([sid], [good[5:]]).logits
    final = prompt + junk[:1] + good
    expected = run_alone(runner, final)
    assert rel_err(torch.cat([out1, out2]), expected[11:]) < SELF_TOL
    assert rel_err(other_logits, run_alone(runner, other_tokens)) < SELF_TOL
    assert runner.length(sid) == len(final)

    # Roll back exactly onto a block boundary, then to zero, and re-decode each time.
    runner.truncate(sid, 8)
    out = runner.forward([sid], [good[:3]]).logits
    assert rel_err(out, run_alone(runner, prompt[:8] + good[:3])[8:]) < SELF_TOL
    runner.truncate(sid, 0)
    assert runner.length(sid) == 0
    out = runner.forward([sid], [good]).logits
    assert rel_err(out, run_alone(runner, good)) < SELF_TOL
    # Truncating to the current length is a no-op; beyond it is refused.
    runner.truncate(sid, len(good))
    assert runner.length(sid) == len(good)
    with pytest.raises(ValueError):
        runner.truncate(sid, len(good) + 1)


def test_rejected_draft_tokens_leave_no_trace(qwen3):
    """The speculative-decoding pattern: verify k drafts, keep a prefix, roll back the rest."""
    _, folder = qwen3
    runner = TargetRunner.from_pretrained(folder, dtype="float32", cache_page_size=4)
    seq = tokens_of(7, seed=30)
    sid = runner.new_sequence()
    runner.forward([sid], [seq])
    accepted = list(seq)
    gen = torch.Generator().manual_seed(31)
    for step in range(6):
        drafts = torch.randint(0, VOCAB, (int(step % 4) + 2,), generator=gen).tolist()
        before = runner.length(sid)
        logits = runner.forward([sid], [drafts]).logits
        keep = step % len(drafts)
        runner.truncate(sid, before + keep)
        accepted += drafts[:keep]
        # The logits of the kept prefix were computed with the same history as a clean run.
        reference = run_alone(runner, accepted + drafts[keep:])
        assert rel_err(logits, reference[before:]) < SELF_TOL
    # A final check that the cache content equals a clean run of the accepted tokens.
    probe = tokens_of(3, seed=32)
    assert rel_err(runner.forward([sid], [probe]).logits, run_alone(runner, accepted + probe)[len(accepted):]) < SELF_TOL


# -- ragged batches -------------------------------------------------------------------------------
def test_ragged_batch_equals_sequences_alone(qwen3):
    model, folder = qwen3
    runner = TargetRunner.from_pretrained(folder, dtype="float32", cache_page_size=4)
    prefixes = [[], tokens_of(5, 40), tokens_of(17, 41), tokens_of(30, 42)]
    new = [tokens_of(1, 43), tokens_of(23, 44), tokens_of(3, 45), tokens_of(1, 46)]
    sids = [runner.new_sequence() for _ in prefixes]
    for sid, prefix in zip(sids, prefixes):
        if prefix:
            runner.forward([sid], [prefix])
    out = runner.forward(sids, new, feature_layer_ids=(0, 2))
    assert out.query_lens == [1, 23, 3, 1]
    assert out.logits.shape == (28, VOCAB) and out.features.shape == (28, 2 * BASE["hidden_size"])
    logits_parts, feature_parts = out.split(out.logits), out.split(out.features)
    for sid, prefix, toks, logits, feats in zip(sids, prefixes, new, logits_parts, feature_parts):
        assert runner.length(sid) == len(prefix) + len(toks)
        alone_sid = runner.new_sequence()
        alone = runner.forward([alone_sid], [prefix + toks], feature_layer_ids=(0, 2))
        assert rel_err(logits, alone.logits[len(prefix):]) < SELF_TOL
        assert rel_err(feats, alone.features[len(prefix):]) < SELF_TOL
        ref_logits, _ = hf_forward(model, prefix + toks)
        assert rel_err(logits, ref_logits[len(prefix):]) < HF_TOL


def test_attention_groups_keep_prompt_chunks_and_decoding_rows_apart():
    """Sequences of similar query length share one padded attention call; a prompt chunk is not padded
    together with one-token rows (the ragged batch above runs as two groups: [23] and [3, 1, 1])."""
    from dspark.models.kv_cache import group_by_query_length

    assert group_by_query_length([1, 23, 3, 1]) == [[1], [2, 0, 3]]
    assert group_by_query_length([5, 5, 5]) == [[0, 1, 2]]  # equal lengths: one call, in order
    assert group_by_query_length([8, 1, 8, 1]) == [[0, 1, 2, 3]]  # verification rows: one call
    lens = [134, 1, 120, 2, 40, 1, 130, 70]
    groups = group_by_query_length(lens)
    assert groups == [[0, 6, 2, 7], [4], [3, 1, 5]]
    for members in groups:
        assert all(max(lens[m] for m in members) <= max(2 * lens[b], 16) for b in members)


@pytest.mark.parametrize(
    "prefix_lens,new_lens",
    [
        ([9, 9, 9], [1, 1, 1]),  # uniform decode step (no mask)
        ([3, 12, 0], [1, 1, 1]),  # one token each, different contexts
        ([4, 11], [3, 3]),  # equal query lengths (no padding), different contexts
        ([0, 0], [6, 2]),  # two prefills
        ([0, 20, 7, 0, 31], [40, 1, 8, 33, 1]),  # prompt chunks and decoding rows: several attention groups
    ],
)
def test_batch_shapes(qwen3, prefix_lens, new_lens):
    _, folder = qwen3
    runner = TargetRunner.from_pretrained(folder, dtype="float32", cache_page_size=4)
    seqs = [tokens_of(p + q, seed=50 + i) for i, (p, q) in enumerate(zip(prefix_lens, new_lens))]
    sids = [runner.new_sequence() for _ in seqs]
    for sid, seq, p in zip(sids, seqs, prefix_lens):
        if p:
            runner.forward([sid], [seq[:p]])
    out = runner.forward(sids, [seq[p:] for seq, p in zip(seqs, prefix_lens)])
    for logits, seq, p in zip(out.split(out.logits), seqs, prefix_lens):
        assert rel_err(logits, run_alone(runner, seq)[p:]) < SELF_TOL


def test_interleaved_sequences_over_many_forwards(qwen3):
    _, folder = qwen3
    runner = TargetRunner.from_pretrained(folder, dtype="float32", cache_page_size=4)
    gen = torch.Generator().manual_seed(60)
    totals = [45, 3, 28, 60, 12]
    seqs = [tokens_of(n, seed=61 + i) for i, n in enumerate(totals)]
    sids = [runner.new_sequence() for _ in seqs]
    collected: list[list[torch.Tensor]] = [[] for _ in seqs]
    pos = [0] * len(seqs)
    steps = 0
    while any(p < len(s) for p, s in zip(pos, seqs)):
        active = [i for i in range(len(seqs)) if pos[i] < len(seqs[i]) and torch.rand(1, generator=gen) < 0.7]
        if not active:
            continue
        order = torch.randperm(len(active), generator=gen).tolist()
        active = [active[j] for j in order]
        chunk = []
        for i in active:
            n = min(len(seqs[i]) - pos[i], int(torch.randint(1, 9, (1,), generator=gen)))
            chunk.append(seqs[i][pos[i]:pos[i] + n])
        out = runner.forward([sids[i] for i in active], chunk)
        for i, logits in zip(active, out.split(out.logits)):
            collected[i].append(logits.clone())
            pos[i] += logits.shape[0]
        steps += 1
        # Finished sequences are freed, so their blocks get reused by the others.
        for i in active:
            if pos[i] == len(seqs[i]):
                runner.free_sequence(sids[i])
    assert steps > 10
    for seq, parts in zip(seqs, collected):
        assert rel_err(torch.cat(parts), run_alone(runner, seq)) < SELF_TOL


def test_forward_argument_errors(qwen3):
    _, folder = qwen3
    runner = TargetRunner.from_pretrained(folder, dtype="float32")
    sid = runner.new_sequence()
    with pytest.raises(ValueError):
        runner.forward([sid, sid], [[1], [2]])  # same sequence twice
    with pytest.raises(ValueError):
        runner.forward([sid], [[]])  # no new token
    assert runner.length(sid) == 0


# -- KV cache capacity ----------------------------------------------------------------------------
def test_cache_growth_gives_identical_results(qwen3, qwen3_reference):
    """A cache starting with one 2-token block grows many times (pools re-allocated and copied) while
    two sequences are live; the results equal HF / a clean run."""
    _, folder = qwen3
    tokens, ref_logits = qwen3_reference
    runner = TargetRunner.from_pretrained(folder, dtype="float32", cache_page_size=2)
    c = runner.config
    runner.cache = PagedKVCache(c.num_layers, c.num_kv_heads, c.head_dim, page_size=2, initial_pages=1)
    assert runner.cache.num_pages == 1
    a, b = runner.new_sequence(), runner.new_sequence()
    other = tokens_of(40, seed=70)
    parts_a, parts_b, fed_b = [], [], []
    sizes = [1, 3, 1, 9, 2, 20, 1, 23]  # sums to 60
    pos = 0
    grew = 0
    for i, n in enumerate(sizes):
        blocks_before = runner.cache.num_pages
        if i % 2 == 0:
            chunk_b = other[len(fed_b):len(fed_b) + 2 * n + 1]
            out = runner.forward([a, b], [tokens[pos:pos + n], chunk_b])
            la, lb = out.split(out.logits)
            parts_b.append(lb)
            fed_b += chunk_b
        else:
            la = runner.forward([a], [tokens[pos:pos + n]]).logits
        parts_a.append(la)
        pos += n
        assert runner.cache.num_pages >= blocks_before
        grew += runner.cache.num_pages > blocks_before
    assert grew >= 3
    assert runner.cache.num_pages >= 30
    assert rel_err(torch.cat(parts_a), ref_logits) < HF_TOL
    assert runner.length(b) == len(fed_b) == 3 + 3 + 5 + 3
    assert rel_err(torch.cat(parts_b), run_alone(runner, fed_b)) < SELF_TOL


def test_cache_growth_via_from_pretrained_block_size(qwen3, qwen3_reference):
    """Default initial capacity is 64 blocks; with 1-token blocks a 60-token prompt plus a second
    sequence overflows it and the pools are re-allocated mid-run."""
    _, folder = qwen3
    tokens, ref_logits = qwen3_reference
    runner = TargetRunner.from_pretrained(folder, dtype="float32", cache_page_size=1)
    initial = runner.cache.num_pages
    a = runner.new_sequence()
    first = runner.forward([a], [tokens[:50]]).logits
    b = runner.new_sequence()
    runner.forward([b], [tokens_of(30, seed=71)])
    assert runner.cache.num_pages > initial
    rest = runner.forward([a], [tokens[50:]]).logits
    assert rel_err(torch.cat([first, rest]), ref_logits) < HF_TOL


def test_cache_capacity_error_changes_nothing(qwen3, qwen3_reference):
    _, folder = qwen3
    tokens, ref_logits = qwen3_reference
    runner = TargetRunner.from_pretrained(folder, dtype="float32", cache_page_size=4, max_cache_pages=3)
    assert runner.cache.num_pages == 3
    sid = runner.new_sequence()
    runner.forward([sid], [tokens[:6]])
    free = runner.cache.num_free_pages
    assert free == 1
    with pytest.raises(CacheCapacityError):
        runner.forward([sid], [tokens[6:13]])  # 13 tokens > 12 slots
    assert runner.length(sid) == 6
    assert runner.cache.num_free_pages == free

    # The cache content is intact: continuing within capacity gives the reference logits.
    out = runner.forward([sid], [tokens[6:12]]).logits
    assert rel_err(out, ref_logits[6:12]) < HF_TOL
    assert runner.cache.num_pages == 3 and runner.cache.num_free_pages == 0
    # Freeing makes room again.
    runner.free_sequence(sid)
    assert runner.cache.num_free_pages == 3
    other = runner.new_sequence()
    out = runner.forward([other], [tokens[:12]]).logits
    assert rel_err(out, ref_logits[:12]) < HF_TOL


def test_cache_capacity_error_in_batch_rolls_back_every_sequence(qwen3, qwen3_reference):
    """The first sequence of a batch reserves a block, the second cannot: the first one's reservation
    must be undone (its block back on the free list and *off* its block table)."""
    _, folder = qwen3
    tokens, ref_logits = qwen3_reference
    runner = TargetRunner.from_pretrained(folder, dtype="float32", cache_page_size=4, max_cache_pages=4)
    sid, other = runner.new_sequence(), runner.new_sequence()
    runner.forward([sid], [tokens[:6]])  # 2 blocks
    assert runner.cache.num_free_pages == 2
    other_tokens = tokens_of(8, seed=90)
    with pytest.raises(CacheCapacityError):
        runner.forward([sid, other], [tokens[6:9], other_tokens + [1]])  # needs 1 + 3 blocks, 2 free
    assert runner.length(sid) == 6 and runner.length(other) == 0
    assert runner.cache.num_free_pages == 2

    # `other` takes both free blocks; `sid` then has no room to reach a third block...
    other_logits = runner.forward([other], [other_tokens]).logits
    assert runner.cache.num_free_pages == 0
    with pytest.raises(CacheCapacityError):
        runner.forward([sid], [tokens[6:9]])
    # ...but still fits within its own two blocks, and nobody's cache was overwritten.
    out = runner.forward([sid], [tokens[6:8]]).logits
    assert rel_err(out, ref_logits[6:8]) < HF_TOL
    runner.free_sequence(sid)
    more = runner.forward([other], [[5]]).logits
    clean = run_alone(TargetRunner.from_pretrained(folder, dtype="float32"), other_tokens + [5])
    assert rel_err(torch.cat([other_logits, more]), clean) < SELF_TOL


def test_failure_inside_the_model_rolls_the_sequences_back(qwen3, qwen3_reference, monkeypatch):
    _, folder = qwen3
    tokens, ref_logits = qwen3_reference
    runner = TargetRunner.from_pretrained(folder, dtype="float32", cache_page_size=4)
    a, b = runner.new_sequence(), runner.new_sequence()
    runner.forward([a], [tokens[:10]])
    free = runner.cache.num_free_pages
    layer = runner.model.model.layers[1]

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(layer, "forward", boom)
    with pytest.raises(RuntimeError, match="injected"):
        runner.forward([a, b], [tokens[10:20], tokens[:7]])
    assert runner.length(a) == 10 and runner.length(b) == 0
    assert runner.cache.num_free_pages == free
    monkeypatch.undo()
    out = runner.forward([a, b], [tokens[10:20], tokens[:7]])
    la, lb = out.split(out.logits)
    assert rel_err(la, ref_logits[10:20]) < HF_TOL
    assert rel_err(lb, ref_logits[:7]) < HF_TOL


@pytest.mark.parametrize("layer_ids", [(3,), (0, 7), (-2,)])
def test_out_of_range_feature_layer_is_rejected(qwen3, layer_ids):
    _, folder = qwen3
    runner = TargetRunner.from_pretrained(folder, dtype="float32")
    sid = runner.new_sequence()
    with pytest.raises(ValueError, match=str(layer_ids[-1])):
        runner.forward([sid], [[1, 2, 3]], feature_layer_ids=layer_ids)
    assert runner.length(sid) == 0


# -- request validation ---------------------------------------------------------------------------
def test_prompt_beyond_context_is_rejected(tmp_path):
    make_model(tmp_path, "llama", seed=80, max_position_embeddings=32, num_hidden_layers=1)
    runner = TargetRunner.from_pretrained(tmp_path, dtype="float32")
    assert runner.max_context == 32
    sid = runner.new_sequence()
    with pytest.raises(RequestError, match="32"):
        runner.forward([sid], [tokens_of(33, 81)])
    assert runner.length(sid) == 0
    runner.forward([sid], [tokens_of(30, 82)])
    with pytest.raises(RequestError):
        runner.forward([sid], [tokens_of(3, 83)])
    assert runner.length(sid) == 30
    # Exactly filling the context is allowed.
    runner.forward([sid], [tokens_of(2, 84)])
    assert runner.length(sid) == 32
    with pytest.raises(RequestError):
        runner.forward([sid], [[1]])
    assert runner.length(sid) == 32


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 7, -1])
def test_out_of_vocab_token_is_rejected(qwen3, bad):
    _, folder = qwen3
    runner = TargetRunner.from_pretrained(folder, dtype="float32")
    a, b = runner.new_sequence(), runner.new_sequence()
    runner.forward([a], [[1, 2, 3]])
    with pytest.raises(RequestError, match=str(VOCAB)):
        runner.forward([a, b], [[4, 5], [6, bad, 7]])
    assert runner.length(a) == 3 and runner.length(b) == 0
    runner.forward([a, b], [[4, 5], [VOCAB - 1]])  # the largest valid id is fine
    assert runner.length(a) == 5 and runner.length(b) == 1
