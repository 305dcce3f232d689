"""The static-shape step (dspark/models/static_step.py, issue 17 item 2): decoding and verification forwards
padded to a capture bucket and replayed from a captured graph. On the CPU the graph is `HostGraph` (the
captured function re-run on the capture's own buffers), so everything but the CUDA capture call is exercised
here: the padding layout, the mask, the scratch slot, the input and output buffers, re-capture on a new pool.
float64 keeps a padded GEMM's different summation order from flipping a near-tie.
"""

from __future__ import annotations

import pytest
import torch

from dspark.decoding.sampling import RowSampling, SamplingParams, logits_to_probs, logits_to_probs_by_row
from dspark.engine.generation import generate
from dspark.errors import CacheCapacityError
from dspark.models.drafters.dspark import load_dspark_drafter
from dspark.models.static_step import StaticStep, batch_bucket, configure_graphs, power_of_two_bucket
from dspark.models.target_runner import TargetRunner

from drafters_for_tests import STATIC_PROMPTS, next_round_input, static_path_folders, with_static_rounds

PROMPTS = STATIC_PROMPTS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return static_path_folders(tmp_path_factory.mktemp("static"))


def runner(target, graphs: bool | None, **kwargs) -> TargetRunner:
    return TargetRunner.from_pretrained(target, dtype="float64", cache_page_size=4, graphs=graphs, **kwargs)


def test_bucket_sizes():
    assert [batch_bucket(n) for n in range(1, 18)] == [1, 2, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 24]
    assert [power_of_two_bucket(n) for n in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 32]


def test_graphs_are_on_by_default_only_on_cuda(folders):
    assert runner(folders[0], None).static is None  # this machine's CPU
    assert runner(folders[0], True).static.graphs
    assert runner(folders[0], False).static is None


@pytest.mark.parametrize("graphs", [False, True])
def test_a_padded_forward_equals_the_ragged_forward(folders, graphs):
    """Ragged batches of 1–6 new tokens per sequence over contexts crossing page boundaries, with rollbacks
    in between: the same logits, the same features, and the same K/V in every sequence's slots."""
    eager, static = runner(folders[0], False), runner(folders[0], False)
    static.static = StaticStep(static.model, static.cache, graphs=graphs, max_query_len=8)
    gen = torch.Generator().manual_seed(0)
    pairs = [(eager.new_sequence(), static.new_sequence()) for _ in range(5)]
    prompts = [torch.randint(0, 48, (n,), generator=gen).tolist() for n in (3, 9, 1, 14, 6)]
    eager.forward([a for a, _ in pairs], prompts)
    static.forward([b for _, b in pairs], prompts)  # 14 > max_query_len: the ragged path
    assert static.static.replays == 0
    for step in range(10):
        active = pairs[: 5 - step % 3]  # 5, 4 or 3 sequences: batch buckets 8 and 4
        counts = torch.randint(1, 7, (len(active),), generator=gen).tolist()
        tokens = [torch.randint(0, 48, (q,), generator=gen).tolist() for q in counts]
        layers = ((0, 2), (), (1,))[step % 3]
        last_only = step % 4 == 3
        a = eager.forward([s for s, _ in active], tokens, feature_layer_ids=layers, all_logits=not last_only)
        b = static.forward([s for _, s in active], tokens, feature_layer_ids=layers, all_logits=not last_only)
        assert static.static.replays == step + 1
        torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-12)
        assert b.logits.shape == (len(active) if last_only else sum(counts), 48)
        if layers:
            torch.testing.assert_close(b.features, a.features, rtol=1e-12, atol=1e-12)
        else:
            assert b.features is None
        for sa, sb in active:  # roll back a few tokens, as verification does
            n = eager.length(sa)
            keep = int(torch.randint(max(n - 4, 1), n + 1, (1,), generator=gen))
            eager.truncate(sa, keep)
            static.truncate(sb, keep)
    for sa, sb in pairs:
        length = eager.length(sa)
        assert static.length(sb) == length
        slots_a, slots_b = eager.cache._slots(sa, 0, length), static.cache._slots(sb, 0, length)
        for layer in range(3):
            torch.testing.assert_close(static.cache.k_pools[layer][slots_b], eager.cache.k_pools[layer][slots_a],
                                       rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(static.cache.v_pools[layer][slots_b], eager.cache.v_pools[layer][slots_a],
                                       rtol=1e-12, atol=1e-12)
    if graphs:  # captured once per bucket, then replayed
        assert 0 < len(static.static.captures) < static.static.replays
    else:
        assert not static.static.captures


def test_a_replay_does_not_overwrite_the_previous_forwards_outputs(folders):
    static = runner(folders[0], True)
    first, second = static.new_sequence(), static.new_sequence()
    static.forward([first, second], [[1, 2, 3], [4, 5, 6]])
    out = static.forward([first], [[7]], feature_layer_ids=(0,))
    kept_logits, kept_features = out.logits.clone(), out.features.clone()
    again = static.forward([second], [[9]], feature_layer_ids=(0,))  # the same bucket, other values
    assert len(static.static.captures) == 2
    assert torch.equal(out.logits, kept_logits) and torch.equal(out.features, kept_features)
    assert not torch.equal(again.logits, kept_logits)


def test_enforce_eager_and_the_graph_batch_limit(folders):
    """`configure_graphs` (--enforce-eager, --cuda-graph-max-bs): off for the target and the drafter, or on
    for steps of up to max_batch sequences; bigger steps run ragged."""
    target = runner(folders[0], True)
    drafter = load_dspark_drafter(folders[1], device="cpu", dtype="float64")
    drafter.use_graphs(True)
    configure_graphs(target, drafter, enforce_eager=True, max_batch=8)
    assert target.static is None and drafter.static is None
    configure_graphs(target, drafter, enforce_eager=False, max_batch=8)
    assert target.static is None and drafter.static is None  # the default: graphs on CUDA only
    target.use_graphs(True, max_batch=2)
    drafter.use_graphs(True, max_batch=2)
    assert drafter.static.max_batch == 2
    seqs = [target.new_sequence() for _ in range(3)]
    target.forward(seqs, [[1], [2], [3]])
    assert target.static.replays == 0
    target.forward(seqs[:2], [[4], [5]])
    assert target.static.replays == 1


def test_forwards_outside_every_bucket_and_training_forwards_run_ragged(folders):
    static = runner(folders[0], True)
    seq = static.new_sequence()
    static.forward([seq], [list(range(40))])  # a 40-token prompt: above max_query_len
    static.forward([seq], [[1]], return_final_hidden=True)
    assert static.static.replays == 0
    static.forward([seq], [[2]])
    assert static.static.replays == 1


def test_reallocated_pools_drop_the_captures_and_results_stay_exact(folders):
    """A cache that grows re-allocates its pools: the captures (which hold the old pools' addresses) are
    made again."""
    eager, static = runner(folders[0], False), runner(folders[0], True)
    for cache in (eager.cache, static.cache):
        cache.allocate(2, 4)
        cache.max_pages = None  # free to grow again
    a, b = eager.new_sequence(), static.new_sequence()
    generations = []
    for token in range(12):  # 12 tokens in pages of 4: the pools double once past 8
        expected = eager.forward([a], [[token]]).logits
        torch.testing.assert_close(static.forward([b], [[token]]).logits, expected, rtol=0, atol=1e-12)
        generations.append(static.cache.generation)
    assert generations[0] < generations[-1]
    assert static.static.graphs._generation == static.cache.generation and static.static.captures


def test_a_failed_static_forward_changes_nothing(folders):
    static = runner(folders[0], True, max_cache_pages=2)
    seq, other = static.new_sequence(), static.new_sequence()
    static.forward([seq], [[1, 2, 3, 4, 5]])  # 2 pages of 4: the cache is full
    with pytest.raises(CacheCapacityError):
        static.forward([seq, other], [[6, 7, 8, 9], [1]])
    assert static.length(seq) == 5 and static.length(other) == 0 and static.cache.num_free_pages == 0
    assert static.static.replays == 1  # the prompt's forward only


def greedy(target_runner, drafter=None) -> list[list[int]]:
    out = generate(target_runner, PROMPTS, sampling=SamplingParams(temperature=0.0), max_new_tokens=30,
                   drafter=drafter)
    return [s.token_ids for s in out.sequences]


def test_greedy_decoding_on_the_static_step_equals_eager_plain_decoding(folders):
    target, drafter_dir = folders
    eager, static = runner(target, False), runner(target, True)
    expected = greedy(eager)
    assert greedy(static) == expected
    plain_replays = static.static.replays
    assert plain_replays >= 30  # every decoding step replayed a capture
    drafter = load_dspark_drafter(drafter_dir, device="cpu", dtype="float64")
    assert greedy(static, drafter) == expected
    assert static.static.replays > plain_replays and any(b.query_len > 1 for b in static.static.captures)
    assert any(b.feature_layer_ids == (0, 2) for b in static.static.captures)  # the drafter's features, static


def test_a_seeded_sampled_batch_draws_the_same_tokens_on_both_paths(folders):
    """Only the forward's shapes change: the exact rejection rule sees the same distributions and the same
    uniforms, so a seeded batch draws the same tokens (the distribution tests cover the rule itself)."""
    target, drafter_dir = folders
    eager, static = runner(target, False), runner(target, True)
    drafter = load_dspark_drafter(drafter_dir, device="cpu", dtype="float64")
    sampling = SamplingParams(temperature=1.0, top_p=0.9)
    on = generate(static, PROMPTS, sampling=sampling, max_new_tokens=30, drafter=drafter, seed=5)
    off = generate(eager, PROMPTS, sampling=sampling, max_new_tokens=30, drafter=drafter, seed=5)
    assert [s.token_ids for s in on.sequences] == [s.token_ids for s in off.sequences]
    assert on.stats.accepted_tokens == off.stats.accepted_tokens and static.static.replays > 0


@pytest.mark.parametrize("graphs", [False, True])
@torch.inference_mode()  # as `DSparkDrafter.propose`
def test_the_drafters_padded_round_equals_the_eager_one(folders, graphs):
    """Rounds of 0–5 new context rows per sequence (the first round's 9–17 run eagerly, above the bucket), a mix
    of greedy, top-k and top-p requests drawing from their uniforms: the same drafts, the same q, the same
    confidences, and the same context K/V in the drafter's own cache. A round without uniforms runs the
    static round only when every request is greedy."""
    eager = load_dspark_drafter(folders[1], device="cpu", dtype="float64")
    static = with_static_rounds(load_dspark_drafter(folders[1], device="cpu", dtype="float64"), graphs)
    gen = torch.Generator().manual_seed(1)
    width, block = eager.model.fc.weight.shape[1], eager.block_size
    samplings = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=5),
                 SamplingParams(temperature=0.8, top_p=0.9)]
    temperature_only = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(temperature=0.6)]
    histories = {i: [] for i in range(3)}
    replays = 0
    for round_ in range(9):
        active = [0, 1, 2][: 3 - round_ % 2]
        batch = []
        greedy_only, with_uniforms = round_ == 6, round_ != 6 and round_ != 7
        for i in active:
            rows = int(torch.randint(9, 18, (1,), generator=gen)) if round_ == 0 else int(torch.randint(0, 6, (1,), generator=gen))
            sampling = samplings[0] if greedy_only else temperature_only[i] if round_ in (3, 4) else samplings[i]
            batch.append(next_round_input(eager, histories, i, rows, width=width, vocab=48, sampling=sampling,
                                          max_tokens=block, uniforms=with_uniforms, generator=gen))
        a = eager.propose(batch, torch.Generator().manual_seed(round_))
        b = static.propose(batch, torch.Generator().manual_seed(round_))
        assert torch.equal(b.tokens, a.tokens) and torch.equal(b.lengths, a.lengths)
        torch.testing.assert_close(b.probs, a.probs, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.confidence_logits, a.confidence_logits, rtol=1e-9, atol=1e-12)
        replays += round_ > 0 and round_ != 7  # the first round: above the bucket; round 7: sampled, no uniforms
        assert static.static.replays == replays
    for i in range(3):
        ha, hb = eager._handles[i], static._handles[i]
        length = eager.cache.length(ha)
        assert static.cache.length(hb) == length  # the blocks' K/V dropped, the context kept
        slots_a, slots_b = eager.cache._slots(ha, 0, length), static.cache._slots(hb, 0, length)
        for layer in range(len(eager.cache.k_pools)):
            torch.testing.assert_close(static.cache.k_pools[layer][slots_b], eager.cache.k_pools[layer][slots_a],
                                       rtol=1e-12, atol=1e-12)
    if graphs:  # (reuse of the captures: the engine test below)
        assert 0 < len(static.static.captures) <= static.static.replays
        assert {b.sampling for b in static.static.captures} == {"greedy", "temperature", "filtered"}


def test_logits_to_probs_by_row_gives_logits_to_probs_value_for_value():
    gen = torch.Generator().manual_seed(0)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0), SamplingParams(0.7, top_k=5),
              SamplingParams(1.3, top_p=0.8), SamplingParams(0.9, top_k=3, top_p=0.5), SamplingParams(1.0, top_k=100),
              SamplingParams(2.0, top_k=64, top_p=0.95), SamplingParams(0.5, top_k=1)]
    logits = torch.randn(len(params), 64, generator=gen) * 3
    for chosen in (params, params[:2], params[:1]):  # modes "filtered", "temperature", "greedy"
        rows = RowSampling(*RowSampling.host_tensors(chosen, len(chosen) + 2), RowSampling.mode_of(chosen))
        got = logits_to_probs_by_row(torch.cat([logits[: len(chosen)], torch.randn(2, 64, generator=gen)]), rows)
        assert torch.equal(got[: len(chosen)], logits_to_probs(logits[: len(chosen)], chosen)), rows.mode
        padding = got[len(chosen):]  # greedy: one-hot
        assert torch.equal(padding.sum(-1), torch.ones(2)) and set(padding.flatten().tolist()) == {0.0, 1.0}
    assert [RowSampling.mode_of(c) for c in (params, params[:2], params[:1])] == ["filtered", "temperature", "greedy"]


def test_speculative_greedy_with_both_passes_static_equals_plain_and_drafts_the_same(folders):
    target, drafter_dir = folders
    eager, static = runner(target, False), runner(target, True)
    eager_drafter = load_dspark_drafter(drafter_dir, device="cpu", dtype="float64")
    static_drafter = load_dspark_drafter(drafter_dir, device="cpu", dtype="float64")
    static_drafter.use_graphs(True)
    expected = greedy(eager)
    both = generate(static, PROMPTS, sampling=SamplingParams(temperature=0.0), max_new_tokens=30, drafter=static_drafter)
    reference = generate(eager, PROMPTS, sampling=SamplingParams(temperature=0.0), max_new_tokens=30,
                         drafter=eager_drafter)
    assert [s.token_ids for s in both.sequences] == expected
    assert both.stats.accepted_tokens == reference.stats.accepted_tokens > 0  # the same drafts were proposed
    assert 0 < len(static_drafter.static.captures) < static_drafter.static.replays  # captured once, replayed
    assert static.static.replays > 0
    static_drafter.use_graphs(False)
    assert static_drafter.static is None


def test_a_failed_capture_is_reported_and_decoding_goes_on_eagerly(folders, monkeypatch):
    """An operation CUDA cannot record would make the capture raise: a RuntimeWarning names it once, that step
    returns its warm-up's outputs, and every later step runs eagerly — with the same greedy output."""
    from dspark.models.static_step import CapturedGraphs

    def refuse(self, run):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(CapturedGraphs, "_make_graph", refuse)
    target = runner(folders[0], True)
    with pytest.warns(RuntimeWarning, match="operation not permitted"):
        tokens = greedy(target)
    assert tokens == greedy(runner(folders[0], False))
    assert "operation not permitted" in target.static.graphs.error and not target.static.captures
    assert target.static.replays >= 30  # the padded forward still ran, eagerly
