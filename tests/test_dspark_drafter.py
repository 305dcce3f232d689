"""DSpark / DFlash drafters (random weights): released checkpoint layout, train/inference parity of the
parallel backbone, and teacher-forced heads = the sequential sampling loop under every sampling setting.
Losslessness through the generation loop, with drafters that are actually accepted, is
test_lossless_drafters.py's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark.decoding.sampling import SamplingParams, logits_to_probs
from dspark.engine.generation import generate
from dspark.errors import CheckpointError, RequestError
from dspark.models.drafters import load_drafter
from dspark.models.drafters.dspark import DSparkDrafter, DSparkModel, dspark_config_for_target, init_from_target
from dspark.models.drafters.dspark_config import parse_dspark_config
from dspark.models.kv_cache import PagedKVCache
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner

VARIANTS = {
    "dspark-vanilla": dict(markov_rank=8, markov_head_type="vanilla"),
    "dspark-gated": dict(markov_rank=8, markov_head_type="gated"),
    "dspark-rnn": dict(markov_rank=8, markov_head_type="rnn"),
    "dspark-no-markov-in-confidence": dict(markov_rank=8, confidence_head_with_markov=False),
    "dspark-greedy-confidence": dict(markov_rank=8, markov_head_type="rnn", greedy_confidence_head=True),
    "dflash": dict(markov_rank=0, enable_confidence_head=False),
}



@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = build_random_model(
        tmp_path_factory.mktemp("dspark") / "target", "tiny-qwen3", seed=4, init_std=0.3, with_tokenizer=False,
        vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
    )
    return TargetRunner.from_pretrained(folder, dtype="float64")


def make_drafter(target, variant: str, *, std: float = 0.3, seed: int = 0, block_size: int = 5, layers=(0, 2)) -> DSparkModel:
    config = dspark_config_for_target(
        target.hf_config, target_layer_ids=layers, mask_token_id=target.config.vocab_size - 1,
        num_draft_layers=2, block_size=block_size, **VARIANTS[variant],
    )
    return init_from_target(config, target.model, seed=seed, std=std)


def target_features(target, tokens, layers):
    seq = target.new_sequence()
    try:
        return target.forward([seq], [tokens], feature_layer_ids=layers).features
    finally:
        target.free_sequence(seq)


# ------------------------------------------------------------------------------------------------
# Released checkpoint layout (docs/design.md §7)
# ------------------------------------------------------------------------------------------------

def spec_tensor_shapes(hf: dict) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes docs/design.md §7 lists for a released checkpoint, written out independently."""
    h, v, r = hf["hidden_size"], hf["vocab_size"], hf["markov_rank"]
    heads, kv, d, inter = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], hf["intermediate_size"]
    shapes = {
        "embed_tokens.weight": (v, h), "fc.weight": (h, len(hf["target_layer_ids"]) * h),
        "hidden_norm.weight": (h,), "norm.weight": (h,), "lm_head.weight": (v, h),
    }
    for i in range(hf["num_hidden_layers"]):
        p = f"layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (heads * d, h), p + "self_attn.k_proj.weight": (kv * d, h),
            p + "self_attn.v_proj.weight": (kv * d, h), p + "self_attn.o_proj.weight": (h, heads * d),
            p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    if r:
        shapes["markov_head.markov_w1.weight"] = (v, r)
        shapes["markov_head.markov_w2.weight"] = (v, r)
        if hf["markov_head_type"] == "rnn":
            shapes["markov_head.joint_proj.weight"] = (3 * r, 2 * r + h)
            shapes["markov_head.joint_proj.bias"] = (3 * r,)
        if hf["markov_head_type"] == "gated":
            shapes["markov_head.gate_proj.weight"] = (r, h + r)
            shapes["markov_head.gate_proj.bias"] = (r,)
    if hf["enable_confidence_head"]:
        width = h + (r if hf["confidence_head_with_markov"] else 0)
        shapes["confidence_head.proj.weight"] = (1, width)
        shapes["confidence_head.proj.bias"] = (1,)
        if hf.get("enable_greedy_confidence_head"):  # dspark's own optional output (docs/design.md §2.4)
            shapes["greedy_confidence_head.proj.weight"] = (1, width)
            shapes["greedy_confidence_head.proj.bias"] = (1,)
    return shapes


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_writes_exactly_the_released_layout_and_reloads_bit_exact(target, variant, tmp_path):
    model = make_drafter(target, variant)
    folder = model.save_pretrained(tmp_path / variant)
    hf = json.loads((folder / "config.json").read_text())
    assert hf["architectures"] == ["Qwen3DSparkModel"] and hf["tie_word_embeddings"] is False
    for key in ("num_target_layers", "block_size", "target_layer_ids", "mask_token_id", "num_anchors",
                "markov_rank", "markov_head_type", "enable_confidence_head", "confidence_head_with_markov"):
        assert key in hf
    assert hf["num_hidden_layers"] == 2 and hf["num_target_layers"] == 4
    # released checkpoints lack the greedy output's field; a model without that output must not write it
    assert hf.get("enable_greedy_confidence_head", False) is VARIANTS[variant].get("greedy_confidence_head", False)
    assert ("enable_greedy_confidence_head" in hf) == VARIANTS[variant].get("greedy_confidence_head", False)
    tensors = load_file(str(folder / "model.safetensors"))
    assert {k: tuple(t.shape) for k, t in tensors.items()} == spec_tensor_shapes(hf)
    reloaded = DSparkModel.from_pretrained(folder, dtype="float64")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name


def test_hand_written_released_style_checkpoint_loads(target, tmp_path):
    """A folder built here from docs/design.md §7 alone (bf16 tensors, target config + draft fields) loads through
    `--drafter DIR` and drafts; every tensor lands where its name says."""
    hf = dict(target.hf_config)
    hf.update(architectures=["Qwen3DSparkModel"], num_hidden_layers=3, num_target_layers=4, block_size=7,
              target_layer_ids=[0, 1, 2], mask_token_id=23, num_anchors=512, markov_rank=8,
              markov_head_type="vanilla", enable_confidence_head=True, confidence_head_with_markov=True,
              tie_word_embeddings=False, torch_dtype="bfloat16")
    gen = torch.Generator().manual_seed(0)
    tensors = {n: (torch.randn(s, generator=gen) * 0.1).to(torch.bfloat16) for n, s in spec_tensor_shapes(hf).items()}
    folder = tmp_path / "released"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf))
    save_file(tensors, str(folder / "model.safetensors"))
    drafter = load_drafter(str(folder), num_draft_tokens=7, dtype="float64")
    assert isinstance(drafter, DSparkDrafter) and drafter.block_size == 7
    assert drafter.feature_layer_ids == (0, 1, 2) and drafter.provides_confidence
    state = drafter.model.state_dict()
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor.to(torch.float64)), name
    out = generate(target, [[1, 2, 3]], max_new_tokens=12, drafter=drafter, seed=0)
    plain = generate(target, [[1, 2, 3]], max_new_tokens=12, seed=0)
    assert out.sequences[0].token_ids == plain.sequences[0].token_ids
    with pytest.raises(RequestError, match="block size"):
        load_drafter(str(folder), num_draft_tokens=8)


@pytest.mark.parametrize(
    "edit, needle",
    [
        ({"block_size": 0}, "block_size"),
        ({"markov_head_type": "lstm"}, "markov_head_type"),
        ({"target_layer_ids": [2, 1]}, "target_layer_ids"),
        ({"target_layer_ids": [0, 9]}, "target_layer_ids"),
        ({"mask_token_id": 999}, "mask_token_id"),
        ({"markov_rank": 0, "confidence_head_with_markov": True}, "Markov"),
        ({"block_size": None}, "block_size"),
    ],
)
def test_bad_drafter_config_is_named(target, edit, needle):
    hf = make_drafter(target, "dspark-vanilla").config.to_hf_dict()
    hf.update(edit)
    with pytest.raises(CheckpointError, match=needle):
        parse_dspark_config(hf)


def test_drafter_for_another_target_is_refused(target, tmp_path):
    other = TargetRunner.from_pretrained(
        build_random_model(tmp_path / "other", "tiny-qwen3", with_tokenizer=False, vocab_size=24, hidden_size=64,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        dtype="float64",
    )
    drafter = DSparkDrafter(make_drafter(target, "dspark-vanilla"))
    with pytest.raises(CheckpointError, match="hidden_size"):
        generate(other, [[1, 2]], max_new_tokens=4, drafter=drafter)


def test_more_drafts_than_block_size_is_refused(target):
    drafter = DSparkDrafter(make_drafter(target, "dspark-vanilla", block_size=5))
    with pytest.raises(RequestError, match="block size"):
        generate(target, [[1, 2]], max_new_tokens=4, drafter=drafter, num_draft_tokens=6)


# ------------------------------------------------------------------------------------------------
# Train / inference parity
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dspark-vanilla", "dflash"])
@torch.no_grad()
def test_batched_training_blocks_equal_inference_one_anchor_at_a_time(target, variant):
    """forward_train (all anchors of a sequence in one masked pass) equals forward_block (paged drafter cache,
    one anchor per call, context ingested incrementally across calls, block dropped after each)."""
    model = make_drafter(target, variant)
    layers = model.config.target_layer_ids
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 23, (30,), generator=gen)
    feats = target_features(target, tokens.tolist(), layers)
    anchors = torch.tensor([2, 3, 9, 17, 25])
    valid = torch.ones(1, len(anchors), dtype=torch.bool)
    trained = model.forward_train(feats[None], anchors[None], tokens[anchors][None], valid)[0]
    cache = PagedKVCache(2, 2, 8, page_size=4, dtype=torch.float64)
    handle, seen = cache.new_sequence(), 0
    for i, anchor in enumerate(anchors.tolist()):
        hidden = model.forward_block(cache, [handle], [feats[seen:anchor]], tokens[anchor : anchor + 1])[0]
        seen = anchor
        assert cache.length(handle) == anchor  # context kept, block dropped
        torch.testing.assert_close(hidden, trained[i], rtol=1e-9, atol=1e-9)


@torch.no_grad()
def test_dummy_blocks_do_not_change_real_blocks(target):
    model = make_drafter(target, "dspark-vanilla")
    tokens = torch.arange(20) % 23
    feats = target_features(target, tokens.tolist(), model.config.target_layer_ids)
    real = model.forward_train(feats[None], torch.tensor([[4, 11]]), tokens[[4, 11]][None], torch.ones(1, 2, dtype=torch.bool))
    padded = model.forward_train(
        feats[None], torch.tensor([[4, 0, 11]]), tokens[[4, 0, 11]][None], torch.tensor([[True, False, True]])
    )
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[:, [0, 2]], real, rtol=1e-9, atol=1e-9)


SAMPLINGS = {
    "T1": SamplingParams(temperature=1.0), "T0.7": SamplingParams(temperature=0.7),
    "top_k3": SamplingParams(temperature=1.0, top_k=3), "top_p0.8": SamplingParams(temperature=1.0, top_p=0.8),
    "T0.7-top_k5-top_p0.9": SamplingParams(temperature=0.7, top_k=5, top_p=0.9), "greedy": SamplingParams(),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@torch.no_grad()
def test_teacher_forced_heads_equal_the_sampling_loop(target, variant):
    """The sequential loop samples slot k from q_k = logits_to_probs(U_k + B_k(x_{k−1})) with the request's
    sampling parameters; the teacher-forced training API fed the same previous tokens gives exactly those
    logits (float64 here), so q_k must equal logits_to_probs of them to 1e-6 (a q computed or reported in
    bf16, or without the request's temperature / top-k / top-p, fails), each draft has q_k(x_k) > 0, and the
    confidences are the head's (for greedy rows the greedy confidence output's, when the model has one)."""
    model = make_drafter(target, variant)
    drafter = DSparkDrafter(model)
    gen = torch.Generator().manual_seed(0)
    rows = 6 * len(SAMPLINGS)
    hidden = torch.randn(rows, model.config.block_size, 32, generator=gen, dtype=torch.float64)
    anchors = torch.randint(0, 23, (rows,), generator=gen)
    samplings = [s for s in SAMPLINGS.values() for _ in range(6)]  # one setting per group of 6 rows
    tokens, probs, confidences = drafter.sample_block(hidden, anchors, samplings, gen)  # confidence logits
    assert probs.dtype == torch.float32
    prev = torch.cat([anchors[:, None], tokens[:, :-1]], dim=1)
    logits, conf_logits, greedy_logits = model.heads(hidden, prev)
    expected = torch.stack([logits_to_probs(logits[row].double(), s).double() for row, s in enumerate(samplings)])
    torch.testing.assert_close(probs.double(), expected, rtol=1e-6, atol=1e-7)
    assert (probs.to(torch.bfloat16).double() - expected).abs().max() > 1e-4  # the tolerance would catch bf16
    assert bool((probs.gather(-1, tokens.unsqueeze(-1)) > 0).all())
    if model.confidence_head is None:
        assert confidences is None and conf_logits is None and greedy_logits is None
    elif model.greedy_confidence_head is None:
        assert greedy_logits is None
        torch.testing.assert_close(conf_logits.float(), confidences)  # the raw head's logits (Eq. 7)
    else:
        greedy_rows = torch.tensor([s.greedy for s in samplings])[:, None]
        torch.testing.assert_close(torch.where(greedy_rows, greedy_logits, conf_logits).float(), confidences)
        assert (greedy_logits - conf_logits).abs().min() > 0  # the two outputs differ: the test can tell them apart
    if model.markov_head is not None:  # the sequential bias really depends on the previous token
        other_prev = (prev + 1) % 23
        assert not torch.allclose(model.heads(hidden, other_prev)[0], logits)
