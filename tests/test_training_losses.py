"""Anchor sampling, block construction and the chunked DSpark / DFlash losses (docs/design.md §2.5–2.6)."""

from __future__ import annotations

import math

import pytest
import torch

from dspark.models.drafters.dspark import dspark_config_for_target, init_from_target
from dspark.models.random_init import build_random_model
from dspark.models.target_runner import TargetRunner
from dspark.training.anchors import build_blocks, sample_anchor_positions
from dspark.training.losses import LossWeights, drafter_block_loss, position_weights



def test_anchors_are_distinct_sorted_valid_candidates():
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    positions, valid = sample_anchor_positions(mask, 4, gen)
    assert positions.shape == valid.shape == (2, 4)
    for row in range(2):
        chosen = positions[row][valid[row]].tolist()
        assert chosen == sorted(set(chosen))
        for i in chosen:
            assert mask[row, i] and mask[row, i + 1]
    assert valid[0].sum() == 4  # 5 candidates (2, 3, 6, 7, 8): 4 drawn
    assert valid[1].tolist() == [True, False, False, False] and positions[1, 0] == 1  # one candidate only
    assert (positions[1, 1:] == 0).all()


def test_anchor_sampling_is_uniform_over_candidates():
    mask = torch.ones(1, 12, dtype=torch.bool)  # 11 candidates, draw 3
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(12)
    draws = 3000
    for _ in range(draws):
        positions, valid = sample_anchor_positions(mask, 3, gen)
        counts[positions[valid]] += 1
    assert counts[11] == 0
    expected = draws * 3 / 11
    chi2 = (((counts[:11] - expected) ** 2) / expected).sum().item()
    assert chi2 < 29.6  # χ²(10) at α = 0.001


def test_blocks_labels_supervision_and_teacher_forcing():
    ids = torch.arange(10, 20).view(1, 10)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    blocks = build_blocks(ids, mask, torch.tensor([[2, 7, 0]]), torch.tensor([[True, True, False]]), block_size=4)
    assert blocks.labels[0, 0].tolist() == [13, 14, 15, 16]
    assert blocks.supervised[0, 0].tolist() == [True, True, False, False]  # position 5 is not a response token
    assert blocks.labels[0, 1].tolist() == [18, 19, 0, 0]
    assert blocks.supervised[0, 1].tolist() == [True, True, False, False]  # runs past the sequence end
    assert not blocks.supervised[0, 2].any()  # dummy block
    assert blocks.prev_tokens[0, 0].tolist() == [12, 13, 14, 15]
    assert blocks.target_rows[0, 0].tolist() == [2, 3, 4, 5]


def naive_loss(draft_logits, conf_logits, greedy_logits, target_logits, labels, supervised, weights):
    """Straight from the docs/design.md §2.4–2.5 formulas, slot by slot."""
    num = {"ce": 0.0, "tv": 0.0, "conf": 0.0, "greedy_conf": 0.0}
    den = 0.0
    for m in range(labels.shape[0]):
        for k in range(labels.shape[1]):
            if not supervised[m, k]:
                continue
            w = math.exp(-k / weights.decay)
            p_d = torch.softmax(draft_logits[m, k].double(), -1)
            p_t = torch.softmax(target_logits[m, k].double(), -1)
            l1 = (p_d - p_t).abs().sum()
            c_star = (1 - 0.5 * l1).clamp(0, 1)
            c = torch.sigmoid(conf_logits[m, k].double())
            num["ce"] += w * -torch.log(p_d[labels[m, k]])
            num["tv"] += w * l1
            num["conf"] += w * -(c_star * torch.log(c) + (1 - c_star) * torch.log(1 - c))
            match = float(int(p_d.argmax()) == int(p_t.argmax()))  # greedy verification's survival rule
            g = torch.sigmoid(greedy_logits[m, k].double())
            num["greedy_conf"] += w * -(match * torch.log(g) + (1 - match) * torch.log(1 - g))
            den += w
    terms = {k: v / den for k, v in num.items()}
    total = (weights.ce * terms["ce"] + weights.tv * terms["tv"] + weights.conf * terms["conf"]
             + weights.greedy_conf * terms["greedy_conf"])
    return total, terms


def random_heads(vocab=11, hidden=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    bias_table = torch.randn(vocab, vocab, generator=gen, dtype=torch.float64, requires_grad=True)
    conf_w = torch.randn(hidden, generator=gen, dtype=torch.float64, requires_grad=True)
    greedy_w = torch.randn(hidden, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(h, prev):
        return h @ proj.T + bias_table[prev], h @ conf_w, h @ greedy_w

    return fn, [proj, bias_table, conf_w, greedy_w]


@pytest.mark.parametrize("weights", [LossWeights(), LossWeights.dflash(), LossWeights(greedy_conf=0.0)])
def test_loss_matches_the_formulas_and_chunking_changes_nothing(weights):
    gen = torch.Generator().manual_seed(2)
    m, block_size, hidden_size, vocab = 9, 5, 6, 11
    fn, params = random_heads(vocab, hidden_size)
    hidden = torch.randn(m, block_size, hidden_size, generator=gen, dtype=torch.float64, requires_grad=True)
    prev = torch.randint(0, vocab, (m, block_size), generator=gen)
    labels = torch.randint(0, vocab, (m, block_size), generator=gen)
    supervised = (torch.rand(m, block_size, generator=gen) < 0.8).long().cumprod(-1).bool()
    supervised[0] = False
    target_hidden = torch.randn(m, block_size, hidden_size, generator=gen, dtype=torch.float64)
    head = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64)
    grads = []
    for chunk in (1, 4, 100):
        out = drafter_block_loss(fn, hidden, prev, labels, supervised, target_hidden, head, weights=weights, chunk_blocks=chunk)
        grads.append(torch.autograd.grad(out.total, [hidden] + params, allow_unused=True))
        draft_logits, conf_logits, greedy_logits = fn(hidden.detach(), prev)
        ref_total, ref_terms = naive_loss(draft_logits, conf_logits, greedy_logits, target_hidden @ head.T, labels,
                                          supervised, weights)
        torch.testing.assert_close(out.total.double(), ref_total, rtol=1e-5, atol=1e-6)
        if weights.tv or weights.conf or weights.greedy_conf:  # the greedy term is computed whenever the target is
            torch.testing.assert_close(out.greedy_conf.double(), ref_terms["greedy_conf"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.ce.double(), ref_terms["ce"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.tv.double(), ref_terms["tv"] if weights.tv else torch.tensor(0.0, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert (grads[0][-1] is None) == (not (weights.tv or weights.conf or weights.greedy_conf))  # DFlash: no target pass
    for g in grads[1:]:
        for a, b in zip(grads[0], g):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_global_denominator_makes_shards_add_up_to_the_whole():
    """Data parallelism: with Σw all-reduced, the per-rank losses sum to the loss of the whole batch."""
    gen = torch.Generator().manual_seed(3)
    fn, _ = random_heads()
    hidden = torch.randn(8, 4, 6, generator=gen, dtype=torch.float64)
    prev = torch.randint(0, 11, (8, 4), generator=gen)
    labels = torch.randint(0, 11, (8, 4), generator=gen)
    supervised = (torch.rand(8, 4, generator=gen) < 0.7).long().cumprod(-1).bool()
    supervised[:, 0] = True
    target = torch.randn(8, 4, 6, generator=gen, dtype=torch.float64)
    head = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    whole = drafter_block_loss(fn, hidden, prev, labels, supervised, target, head)
    denom = position_weights(supervised, 4.0).sum()
    halves = [
        drafter_block_loss(fn, hidden[sl], prev[sl], labels[sl], supervised[sl], target[sl], head, denominator=denom)
        for sl in (slice(0, 3), slice(3, 8))
    ]
    torch.testing.assert_close(sum(h.total for h in halves), whole.total)


@pytest.mark.parametrize("variant", ["dspark", "dflash"])
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(tmp_path, variant):
    folder = build_random_model(
        tmp_path / "t", "tiny-qwen3", seed=5, init_std=0.3, with_tokenizer=False, vocab_size=32, hidden_size=32,
        intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )
    target = TargetRunner.from_pretrained(folder)
    dflash = variant == "dflash"
    config = dspark_config_for_target(
        target.hf_config, target_layer_ids=(0, 2), mask_token_id=31, num_draft_layers=1, block_size=4,
        markov_rank=0 if dflash else 8, enable_confidence_head=not dflash,
    )
    model = init_from_target(config, target.model, seed=0)
    model.embed_tokens.weight.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 31, (2, 24), generator=gen)
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[:, 6:] = True
    seqs = [target.new_sequence() for _ in range(2)]
    out = target.forward(seqs, list(ids), feature_layer_ids=(0, 2), return_final_hidden=True)
    for s in seqs:
        target.free_sequence(s)
    feats = out.features.view(2, 24, -1).clone()
    final = out.final_hidden.view(2, 24, -1).clone()
    positions, valid = sample_anchor_positions(mask, 8, gen)
    blocks = build_blocks(ids, mask, positions, valid, 4)
    weights = LossWeights.dflash() if dflash else LossWeights()
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for _ in range(15):
        hidden = model.forward_train(feats, positions, blocks.anchor_tokens, valid)
        target_hidden = final.gather(1, blocks.target_rows.view(2, -1, 1).expand(-1, -1, 32)).view(2, 8, 4, 32)
        loss = drafter_block_loss(
            model.heads, hidden.flatten(0, 1), blocks.prev_tokens.flatten(0, 1), blocks.labels.flatten(0, 1),
            blocks.supervised.flatten(0, 1), target_hidden.flatten(0, 1), model.lm_head.weight, weights=weights,
            chunk_blocks=5,
        )
        optim.zero_grad()
        loss.total.backward()
        optim.step()
        losses.append(loss.total.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert 1.0 <= float(loss.expected_tau) <= 5.0 and loss.acceptance_per_position.shape == (4,)


def test_chunked_loss_gradients_when_only_the_heads_train():
    """Chunks are checkpointed whenever gradients are on, also when the block states are detached (heads
    trained on cached states): the gradients must still equal the unchunked ones."""
    gen = torch.Generator().manual_seed(4)
    fn, params = random_heads()
    hidden = torch.randn(7, 4, 6, generator=gen, dtype=torch.float64)  # no grad
    prev = torch.randint(0, 11, (7, 4), generator=gen)
    labels = torch.randint(0, 11, (7, 4), generator=gen)
    supervised = torch.ones(7, 4, dtype=torch.bool)
    target = torch.randn(7, 4, 6, generator=gen, dtype=torch.float64)
    head = torch.randn(11, 6, generator=gen, dtype=torch.float64)
    grads = [
        torch.autograd.grad(drafter_block_loss(fn, hidden, prev, labels, supervised, target, head, chunk_blocks=c).total, params)
        for c in (2, 100)
    ]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
