"""EAGLE-3 and MTP-1 drafters (random weights): checkpoint layout and reload, training forward = inference
(the TTT unroll equals teacher-forced autoregressive drafting; `propose` returns, in float32, exactly
logits_to_probs of its logits under each request's sampling parameters), and the training losses
(alignment against a naive loop, decrease under AdamW). Losslessness through the generation loop, with
drafters that are actually accepted, is test_lossless_drafters.py's."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from dspark.decoding.sampling import SamplingParams, logits_to_probs
from dspark.engine.generation import generate
from dspark.errors import CheckpointError, RequestError
from dspark.models.drafters import load_drafter
from dspark.models.drafters.base import DraftInput
from dspark.models.drafters.eagle3 import (
    Eagle3Drafter,
    Eagle3Model,
    eagle3_config_for_target,
    eagle3_ttt_loss,
    init_eagle3_from_target,
    parse_eagle3_config,
)
from dspark.models.drafters.mtp import (
    MTPDrafter,
    MTPModel,
    init_mtp_from_target,
    mtp_config_for_target,
    mtp_loss,
    parse_mtp_config,
)
from dspark.models.kv_cache import PagedKVCache
from dspark.models.flex_paged import FlexPagedAttention
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner

from drafters_for_tests import next_round_input, with_static_rounds

KINDS = ("eagle3", "mtp")



@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder = build_random_model(
        tmp_path_factory.mktemp("eagle3") / "target", "tiny-qwen3", seed=4, init_std=0.3, with_tokenizer=False,
        vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
    )
    return TargetRunner.from_pretrained(folder, dtype="float64")


def make_model(target, kind: str, *, std: float = 0.3, seed: int = 0, block_size: int = 5, layers=(0, 2)):
    if kind == "eagle3":
        config = eagle3_config_for_target(target.hf_config, target_layer_ids=layers, block_size=block_size)
        return init_eagle3_from_target(config, target.model, seed=seed, std=std)
    return init_mtp_from_target(mtp_config_for_target(target.hf_config), target.model, seed=seed, std=std)


def make_drafter(target, kind: str, **kwargs):
    model = make_model(target, kind, **kwargs)
    return Eagle3Drafter(model) if kind == "eagle3" else MTPDrafter(model)


def target_outputs(target, tokens: list[int], layers) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [S, L·H], final post-norm hidden [S, H]) of one full forward."""
    seq = target.new_sequence()
    try:
        out = target.forward([seq], [tokens], feature_layer_ids=layers, return_final_hidden=True)
    finally:
        target.free_sequence(seq)
    return out.features, out.final_hidden


def train_logits(model, feats: torch.Tensor, ids: torch.Tensor, steps: int | None = None) -> torch.Tensor:
    """[K, N, S, V] for both kinds (MTP: K = 1)."""
    if isinstance(model, Eagle3Model):
        return model.forward_train(feats, ids, num_steps=steps)
    return model.forward_train(feats, ids)[None]


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------

def expected_tensor_shapes(hf: dict, kind: str) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes the module docstrings document, written out independently."""
    h, v = hf["hidden_size"], hf["vocab_size"]
    heads, kv, d, inter = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], hf["intermediate_size"]
    width = 2 * h if kind == "eagle3" else h
    p = "midlayer." if kind == "eagle3" else "layers.0."
    shapes = {
        "embed_tokens.weight": (v, h), "norm.weight": (h,), "lm_head.weight": (v, h),
        p + "self_attn.q_proj.weight": (heads * d, width), p + "self_attn.k_proj.weight": (kv * d, width),
        p + "self_attn.v_proj.weight": (kv * d, width), p + "self_attn.o_proj.weight": (h, heads * d),
        p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,),
        p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
        p + "mlp.down_proj.weight": (h, inter),
        p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
    }
    if kind == "eagle3":
        shapes.update({"fc.weight": (h, len(hf["target_layer_ids"]) * h), "midlayer.hidden_norm.weight": (h,)})
    else:
        shapes.update({"enorm.weight": (h,), "hnorm.weight": (h,), "eh_proj.weight": (h, 2 * h)})
    return shapes


@pytest.mark.parametrize("kind", KINDS)
def test_save_writes_the_documented_layout_reloads_bit_exact_and_loads_by_folder(target, kind, tmp_path):
    model = make_model(target, kind)
    folder = model.save_pretrained(tmp_path / kind)
    hf = json.loads((folder / "config.json").read_text())
    arch = {"eagle3": "Eagle3DraftModel", "mtp": "MTPDraftModel"}[kind]
    assert hf["architectures"] == [arch] and hf["tie_word_embeddings"] is False
    assert hf["num_hidden_layers"] == 1 and hf["num_target_layers"] == 4
    assert hf["block_size"] == (5 if kind == "eagle3" else 1)
    assert hf["target_layer_ids"] == ([0, 2] if kind == "eagle3" else [3])  # MTP default: the last layer
    tensors = load_file(str(folder / "model.safetensors"))
    assert {k: tuple(t.shape) for k, t in tensors.items()} == expected_tensor_shapes(hf, kind)
    reloaded = (Eagle3Model if kind == "eagle3" else MTPModel).from_pretrained(folder, dtype="float64")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    drafter = load_drafter(str(folder), dtype="float64")
    assert isinstance(drafter, Eagle3Drafter if kind == "eagle3" else MTPDrafter)
    assert drafter.block_size == hf["block_size"] and drafter.feature_layer_ids == tuple(hf["target_layer_ids"])
    with pytest.raises(RequestError, match="block size"):
        load_drafter(str(folder), num_draft_tokens=hf["block_size"] + 1)


@pytest.mark.parametrize(
    "kind, edit, needle",
    [
        ("eagle3", {"block_size": 0}, "block_size"),
        ("eagle3", {"num_hidden_layers": 2}, "one decoder layer"),
        ("eagle3", {"target_layer_ids": [2, 1]}, "target_layer_ids"),
        ("eagle3", {"target_layer_ids": [0, 9]}, "target_layer_ids"),
        ("eagle3", {"num_target_layers": None}, "num_target_layers"),
        ("mtp", {"target_layer_ids": [1, 3]}, "exactly one target layer"),
        ("mtp", {"block_size": 2}, "block_size"),
        ("mtp", {"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),
    ],
)
def test_bad_drafter_config_is_named(target, kind, edit, needle):
    hf = make_model(target, kind).config.to_hf_dict()
    hf.update(edit)
    with pytest.raises(CheckpointError, match=needle):
        (parse_eagle3_config if kind == "eagle3" else parse_mtp_config)(hf)


@pytest.mark.parametrize("kind", KINDS)
def test_drafter_for_another_target_is_refused(target, kind, tmp_path):
    drafter = make_drafter(target, kind)
    for change, needle in ((dict(vocab_size=25), "vocab_size"), (dict(num_layers=5), "num_target_layers")):
        with pytest.raises(CheckpointError, match=needle):
            drafter.check_target(dataclasses.replace(target.config, **change))
    other = TargetRunner.from_pretrained(
        build_random_model(tmp_path / "other", "tiny-qwen3", with_tokenizer=False, vocab_size=24, hidden_size=64,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
        dtype="float64",
    )
    with pytest.raises(CheckpointError, match="hidden_size"):
        generate(other, [[1, 2]], max_new_tokens=4, drafter=drafter)
    with pytest.raises(RequestError, match="block size"):
        generate(target, [[1, 2]], max_new_tokens=4, drafter=drafter, num_draft_tokens=drafter.block_size + 1)


# ------------------------------------------------------------------------------------------------
# Training forward = inference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_training_forward_equals_ragged_incremental_ingestion(target, kind):
    """Context rows ingested in ragged chunks (two sequences per paged forward) give the same per-row logits
    as the training forward over the right-padded batch (EAGLE-3: TTT step 0)."""
    model = make_model(target, kind)
    layers = model.config.target_layer_ids
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 24, (n,), generator=gen).tolist() for n in (26, 17)]
    feats = [target_outputs(target, s, layers)[0] for s in seqs]
    ids = torch.zeros(2, 26, dtype=torch.long)
    padded = torch.zeros(2, 26, feats[0].shape[-1], dtype=torch.float64)
    for b, (s, f) in enumerate(zip(seqs, feats)):
        ids[b, : len(s)], padded[b, : len(s)] = torch.tensor(s), f
    trained = train_logits(model, padded, ids)[0]
    cache = PagedKVCache(1, 2, 8, page_size=4, dtype=torch.float64)
    handles = [cache.new_sequence(), cache.new_sequence()]
    cuts = [[0, 1, 9, 10, 25], [0, 5, 6, 12, 16]]  # rows t need x_{t+1}: rows 0..len−2
    for step in range(len(cuts[0]) - 1):
        spans = [(c[step], c[step + 1]) for c in cuts]
        outs = model.ingest(
            cache, handles, [f[lo:hi] for f, (lo, hi) in zip(feats, spans)],
            [torch.tensor(s[lo + 1 : hi + 1]) for s, (lo, hi) in zip(seqs, spans)],
        )
        for b, ((lo, hi), rows) in enumerate(zip(spans, outs)):
            torch.testing.assert_close(model.logits(rows), trained[b, lo:hi], rtol=1e-9, atol=1e-9)
    assert [cache.length(h) for h in handles] == [25, 16]


@torch.no_grad()
def test_ttt_unroll_equals_teacher_forced_autoregressive_drafting(target):
    """logits[k, t] of the TTT unroll = the k-th draft of the inference chain from anchor t+1, drafted with the
    data tokens x_{t+2}, x_{t+3}, ... forced in place of sampled ones (one cache, rolled back between chains)."""
    model = make_model(target, "eagle3", block_size=6)
    layers = model.config.target_layer_ids
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 24, (24,), generator=gen)
    feats = target_outputs(target, tokens.tolist(), layers)[0]
    ttt = model.forward_train(feats[None], tokens[None])[:, 0]  # [K, S, V]
    assert not torch.allclose(ttt[0], ttt[1])  # the steps really differ
    cache = PagedKVCache(1, 2, 8, page_size=4, dtype=torch.float64)
    handle, seen = cache.new_sequence(), 0
    for t in (0, 3, 4, 11, 16):  # chain origin t = anchor − 1; its K = 6 steps stay inside the sequence
        hidden = model.ingest(cache, [handle], [feats[seen : t + 1]], [tokens[seen + 1 : t + 2]])[0][-1:]
        seen = t + 1
        for k in range(6):
            if k:
                hidden = model.draft_step(cache, [handle], hidden, tokens[t + 1 + k : t + 2 + k])
            torch.testing.assert_close(model.logits(hidden)[0], ttt[k, t], rtol=1e-9, atol=1e-9)
        cache.truncate(handle, seen)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_propose_returns_the_distributions_it_sampled_from(target, kind):
    """Three sequences, ragged budgets (one proposes nothing but still ingests), mixed sampling settings, three
    rounds with incremental features: each returned q_k equals logits_to_probs of the training forward run on
    history + the drafts actually proposed (so the drafts fed back are the sampled ones), and the drafter's
    cache ends each round at the verified length."""
    drafter = make_drafter(target, kind)
    model = drafter.model
    layers = model.config.target_layer_ids
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 24, (30,), generator=gen).tolist() for _ in range(3)]
    feats = [target_outputs(target, s, layers)[0] for s in seqs]
    samplings = [SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0.7, top_k=3), SamplingParams()]
    rounds = [([4, 9, 1], [5, 2, 0]), ([12, 10, 8], [0, 4, 5]), ([20, 13, 9], [3, 1, 2])]
    seen = [0, 0, 0]
    for anchors, budgets in rounds:
        batch = [DraftInput(b, seqs[b][: a + 1], feats[b][seen[b] : a], n, samplings[b])
                 for b, (a, n) in enumerate(zip(anchors, budgets))]
        proposal = drafter.propose(batch, gen)
        expected_lengths = [min(n, drafter.block_size) for n in budgets]
        assert proposal.lengths.tolist() == expected_lengths
        for b, (a, n) in enumerate(zip(anchors, expected_lengths)):
            assert drafter.cache.length(drafter._handles[b]) == a
            seen[b] = a
            if n == 0:
                continue
            drafts = proposal.tokens[b, :n]
            ids = torch.tensor(seqs[b][: a + 1] + drafts.tolist())[None]
            context = torch.zeros(1, ids.shape[1], feats[b].shape[-1], dtype=torch.float64)
            context[0, :a] = feats[b][:a]  # features exist only for verified positions
            expected = logits_to_probs(train_logits(model, context, ids, n)[:, 0, a - 1], samplings[b]).double()
            assert proposal.probs.dtype == torch.float32  # and equal to the float64 reference to float32 precision
            torch.testing.assert_close(proposal.probs[b, :n].double(), expected, rtol=1e-6, atol=1e-7)
            assert bool((proposal.probs[b, torch.arange(n), drafts] > 0).all())
    for b in range(3):
        drafter.release(b)
    assert not drafter._handles and drafter.cache.num_free_pages == drafter.cache.num_pages


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_batch(target):
    """Three right-padded sequences with response masks, their features for both drafters and final hidden."""
    gen = torch.Generator().manual_seed(5)
    lengths, longest = (22, 15, 9), 22
    ids = torch.zeros(3, longest, dtype=torch.long)
    mask = torch.zeros(3, longest, dtype=torch.bool)
    out = {kind: torch.zeros(3, longest, width, dtype=torch.float64) for kind, width in (("eagle3", 64), ("mtp", 32))}
    final = torch.zeros(3, longest, 32, dtype=torch.float64)
    for b, n in enumerate(lengths):
        tokens = torch.randint(0, 24, (n,), generator=gen)
        ids[b, :n], mask[b, n // 3 : n] = tokens, True
        feats, final[b, :n] = target_outputs(target, tokens.tolist(), (0, 2, 3))
        out["eagle3"][b, :n], out["mtp"][b, :n] = feats[:, :64], feats[:, 64:]
    return dict(ids=ids, mask=mask, features=out, final=final)


def naive_loss(kind, logits, ids, mask, final, head, soft_weight=0.0):
    """Row by row: (step k, row t) predicts x_{t+2+k} with target distribution softmax(head · final[t+1+k])."""
    length = ids.shape[1]
    total = 0.0
    for k in range(logits.shape[0]):
        terms = []
        for b in range(ids.shape[0]):
            for t in range(length):
                p = t + 2 + k
                if p >= length or not mask[b, p]:
                    continue
                log_q = torch.log_softmax(logits[k, b, t], -1)
                soft = -(torch.softmax(head @ final[b, p - 1], -1) * log_q).sum()
                hard = -log_q[ids[b, p]]
                terms.append(soft if kind == "eagle3" else (1 - soft_weight) * hard + soft_weight * soft)
        total = total + 0.8**k * torch.stack(terms).mean()
    return total


@pytest.mark.parametrize("kind", KINDS)
def test_losses_match_a_naive_loop_and_decrease_under_adamw(target, train_batch, kind):
    model = make_model(target, kind, block_size=4)
    ids, mask, final = train_batch["ids"], train_batch["mask"], train_batch["final"]
    feats = train_batch["features"][kind]
    head = model.lm_head.weight

    def loss_fn():
        if kind == "eagle3":
            return eagle3_ttt_loss(model.forward_train(feats, ids), final, head, mask).total
        return mtp_loss(model.forward_train(feats, ids), ids, mask, target_final_hidden=final,
                        lm_head_weight=head, soft_weight=0.25).total

    with torch.no_grad():
        reference = naive_loss(kind, train_logits(model, feats, ids), ids, mask, final, head, soft_weight=0.25)
        torch.testing.assert_close(loss_fn().double(), reference.double(), rtol=1e-6, atol=1e-8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("embed_tokens", "lm_head"))}
    model.train()
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = loss_fn()
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, before in frozen.items():
        assert torch.equal(before, dict(model.named_parameters())[name]), name


# -- the static round (dspark/models/drafters/static_causal.py) ----------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("graphs", [False, True])
@torch.inference_mode()  # as `propose`
def test_the_padded_round_equals_the_eager_one(target, kind, graphs):
    """Rounds of 1–6 new context rows (the first one's 20–30 above the bucket: eager), some requests allowed
    fewer drafts than γ, greedy / top-k / top-p / temperature-only mixes drawing from their uniforms, one
    round without uniforms: the same drafts, q, lengths, last-row outputs and context K/V as the eager round."""
    eager, static = make_drafter(target, kind), with_static_rounds(make_drafter(target, kind), graphs)
    gen = torch.Generator().manual_seed(2)
    width, block = eager.model.feature_width, eager.block_size
    mixes = {
        "filtered": [SamplingParams(0.0), SamplingParams(1.0, top_k=5), SamplingParams(0.8, top_p=0.9)],
        "temperature": [SamplingParams(0.0), SamplingParams(1.0), SamplingParams(0.6)],
        "greedy": [SamplingParams(0.0)] * 3,
    }
    histories = {i: [] for i in range(3)}
    replays = 0
    for round_ in range(9):
        active = [0, 1, 2][: 3 - round_ % 2]
        mix = mixes["greedy" if round_ == 6 else "temperature" if round_ in (3, 4) else "filtered"]
        with_uniforms = round_ != 7  # round 7: sampled rows without uniforms → eager
        batch = []
        for i in active:
            rows = int(torch.randint(20, 30, (1,), generator=gen)) if round_ == 0 else int(torch.randint(1, 7, (1,), generator=gen))
            batch.append(next_round_input(eager, histories, i, rows, width=width, vocab=24, sampling=mix[i],
                                          max_tokens=block - (i == 1) * 2, uniforms=with_uniforms, generator=gen))
        a = eager.propose(batch, torch.Generator().manual_seed(round_))
        b = static.propose(batch, torch.Generator().manual_seed(round_))
        assert torch.equal(b.tokens, a.tokens) and torch.equal(b.lengths, a.lengths), round_
        torch.testing.assert_close(b.probs, a.probs, rtol=1e-9, atol=1e-12)
        replays += round_ > 0 and round_ != 7
        assert static.static.replays == replays
    for i in range(3):
        torch.testing.assert_close(static._last_hidden[i], eager._last_hidden[i], rtol=1e-9, atol=1e-12)
        ha, hb = eager._handles[i], static._handles[i]
        length = eager.cache.length(ha)
        assert static.cache.length(hb) == length  # the context rows kept, the draft rows dropped
        torch.testing.assert_close(static.cache.k_pools[0][static.cache._slots(hb, 0, length)],
                                   eager.cache.k_pools[0][eager.cache._slots(ha, 0, length)], rtol=1e-9, atol=1e-12)
    if graphs:
        assert {b.sampling for b in static.static.captures} == {"greedy", "temperature", "filtered"}


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_speculation_with_the_static_round_equals_plain_decoding(target, kind, attention):
    """Captured rounds whose attention gathers the keys (SDPA) or reads the pages in place (FlexAttention's
    reference implementation, dspark/models/flex_paged.py): the same tokens as plain decoding, the same drafts
    as the eager round."""
    prompts = [[1, 5, 9, 2, 7], [3, 3, 8], [4, 11, 2, 6, 6, 1, 9]]
    greedy = SamplingParams(temperature=0.0)
    plain = generate(target, prompts, sampling=greedy, max_new_tokens=24)
    eager_drafter, static_drafter = make_drafter(target, kind), make_drafter(target, kind)
    static_drafter.use_graphs(True, attention=FlexPagedAttention(compiled=False) if attention == "flex" else "sdpa")
    assert (static_drafter.static.kernel is not None) == (attention == "flex")
    reference = generate(target, prompts, sampling=greedy, max_new_tokens=24, drafter=eager_drafter)
    out = generate(target, prompts, sampling=greedy, max_new_tokens=24, drafter=static_drafter)
    assert [s.token_ids for s in out.sequences] == [s.token_ids for s in plain.sequences]
    assert out.stats.accepted_tokens == reference.stats.accepted_tokens  # the same drafts
    assert 0 < len(static_drafter.static.captures) < static_drafter.static.replays
