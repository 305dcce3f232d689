"""The known-bug mutants of the mutation check (`make mutants`, tests/mutants/run.py).

Each mutant is one small edit of the package that reintroduces a bug class speculative decoders are known
to have (or that this project had), and the tests that must catch it. `original` must occur exactly once
in `path`; the harness refuses to run a catalogue that no longer matches the code. The equivalent mutant
is a control of the harness itself: a change that keeps decoding lossless, which the same kind of tests
must let through (a test that failed it would be checking an implementation detail, not the guarantee).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    bug: str  # what the edit breaks, in words
    path: str  # file, relative to the repository root
    original: str
    replacement: str
    tests: tuple[str, ...]  # pytest node ids or files, run in this order (the first failure kills)
    equivalent: bool = False  # True: lossless on purpose, must survive

    def apply(self, text: str) -> str:
        count = text.count(self.original)
        if count != 1:
            raise ValueError(f"mutant {self.name}: {self.path} holds the original snippet {count} times, expected once "
                             f"(the catalogue no longer matches the code): {self.original.strip()!r}")
        return text.replace(self.original, self.replacement)


LOSSLESS = "tests/test_lossless_drafters.py"
DSPARK_SAMPLE_BLOCK = "dspark/models/drafters/dspark.py"
STATIC = "tests/test_static_step.py"
FLEX = "dspark/models/flex_paged.py"
FLEX_TESTS = "tests/test_flex_paged.py"

MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "no-residual",
        "after a rejection the correction token is drawn from p instead of norm(max(0, p − q))",
        "dspark/decoding/verification.py",
        "    final_p = torch.where(rejected.unsqueeze(-1), residual, final_p)",
        "    final_p = torch.where(rejected.unsqueeze(-1), final_p, final_p)",
        (f"{LOSSLESS}::test_sampled_output_has_the_target_distribution[dflash-T1-top_p0.8]",
         "tests/test_sampling_distribution.py::test_verify_first_token_distribution_is_p"),
    ),
    Mutant(
        "target-p-without-top-k",
        "the target's distribution in the decoding rounds ignores the request's top-k",
        "dspark/engine/step.py",
        "        row_params = [requests[b].sampling for b in sampled for _ in range(width + 1)]",
        "        row_params = [type(requests[b].sampling)(requests[b].sampling.temperature, 0, requests[b].sampling.top_p)\n"
        "                      for b in sampled for _ in range(width + 1)]",
        (f"{LOSSLESS}::test_sampled_output_has_the_target_distribution[mtp-T1-top_k3]",),
    ),
    Mutant(
        "draft-q-without-top-k",
        "the DSpark drafter samples with top-k but reports q without it (transformers#47932)",
        DSPARK_SAMPLE_BLOCK,
        "            probs.append(q)",
        "            probs.append(logits_to_probs(logits, [type(s)(s.temperature, 0, s.top_p) for s in samplings]))",
        (f"{LOSSLESS}::test_drafts_follow_the_q_the_drafter_reports[dspark-top_k3]",
         f"{LOSSLESS}::test_sampled_output_has_the_target_distribution[dspark-T1-top_k3]"),
    ),
    Mutant(
        "draft-q-without-top-p",
        "the DSpark drafter samples with top-p but reports q without it",
        DSPARK_SAMPLE_BLOCK,
        "            probs.append(q)",
        "            probs.append(logits_to_probs(logits, [type(s)(s.temperature, s.top_k, 1.0) for s in samplings]))",
        (f"{LOSSLESS}::test_drafts_follow_the_q_the_drafter_reports[dspark-top_p0.8]",
         f"{LOSSLESS}::test_sampled_output_has_the_target_distribution[dspark-T1-top_p0.8]"),
    ),
    Mutant(
        "eagle3-q-without-top-k",
        "the EAGLE-3 / MTP drafters sample with top-k but report q without it",
        "dspark/models/drafters/eagle3.py",
        "                probs[index, k] = q",
        "                probs[index, k] = logits_to_probs(self.model.logits(hidden[index]),\n"
        "                                                  [type(s)(s.temperature, 0, s.top_p) for s in\n"
        "                                                   (batch[b].sampling for b in rows)])",
        (f"{LOSSLESS}::test_drafts_follow_the_q_the_drafter_reports[eagle3-top_k3]",),
    ),
    Mutant(
        "draft-q-in-bf16",
        "the DSpark drafter reports q rounded to bfloat16 (the drafts were sampled from the float32 q)",
        DSPARK_SAMPLE_BLOCK,
        "            probs.append(q)",
        "            probs.append(q.to(torch.bfloat16).float())",
        ("tests/test_dspark_drafter.py::test_teacher_forced_heads_equal_the_sampling_loop",),
    ),
    Mutant(
        "markov-dropped-at-inference",
        "the DSpark drafter drafts without the Markov head's bias (trained with it)",
        DSPARK_SAMPLE_BLOCK,
        "                logits = logits + bias.float()",
        "                logits = logits + 0 * bias.float()",
        ("tests/test_dspark_drafter.py::test_teacher_forced_heads_equal_the_sampling_loop",),
    ),
    Mutant(
        "retrospective-algorithm-1",
        "Algorithm 1 admits up to the global argmax of Θ instead of stopping at the first non-improving candidate",
        "dspark/scheduling/policies.py",
        "        admitted = _first_stop(theta, 0)",
        "        admitted = int(theta.argmax())",
        ("tests/test_scheduling.py::test_staircases_separate_the_first_stop_from_the_global_maximum",
         "tests/test_scheduler_lossless.py::test_sampling_distribution_is_exact_on_small_servers[algorithm1]"),
    ),
    Mutant(
        "threshold-peeks-at-next-confidence",
        "the threshold policy admits slot k only if c_k and c_{k+1} pass (c_{k+1} depends on the token x_k)",
        "dspark/scheduling/policies.py",
        "        return np.minimum(np.cumprod(c >= self.threshold, axis=1).sum(1), full)",
        "        return np.minimum(np.cumprod(np.minimum(c, np.roll(c, -1, axis=1)) >= self.threshold, axis=1).sum(1), full)",
        ("tests/test_scheduler_lossless.py::test_schedulers_never_anticipate[confidence-threshold]",
         "tests/test_scheduler_lossless.py::test_sampling_distribution_is_exact_under_policy[confidence_threshold]"),
    ),
    Mutant(
        "kv-rollback-off-by-one",
        "after verification the target's KV cache keeps one position too few",
        "dspark/engine/step.py",
        "        runner.truncate(r.seq_id, starts[b] + 1 + n)  # keep x0 and the accepted drafts",
        "        runner.truncate(r.seq_id, starts[b] + n)  # keep x0 and the accepted drafts",
        (f"{LOSSLESS}::test_greedy_speculative_equals_plain[dspark]",),
    ),
    Mutant(
        "static-mask-not-causal",
        "in a capture bucket's padded forward, a verification row attends to the keys of the rows after it",
        "dspark/models/kv_cache.py",
        "        mask = (keys < context_lens.view(batch, 1, 1)) & (keys <= last_key)  # [B, Q, C]",
        "        mask = (keys < context_lens.view(batch, 1, 1)) | (keys <= last_key)  # [B, Q, C]",
        (f"{STATIC}::test_a_padded_forward_equals_the_ragged_forward[True]",
         f"{STATIC}::test_greedy_decoding_on_the_static_step_equals_eager_plain_decoding"),
    ),
    Mutant(
        "static-padding-writes-a-sequence",
        "a capture bucket's padding rows write their K/V into slot 0 (a live sequence's) instead of the scratch page",
        "dspark/models/kv_cache.py",
        "        scratch = self.scratch_slot\n",
        "        scratch = 0\n",
        (f"{STATIC}::test_a_padded_forward_equals_the_ragged_forward[True]",
         f"{STATIC}::test_greedy_decoding_on_the_static_step_equals_eager_plain_decoding"),
    ),
    Mutant(
        "static-block-pass-causal",
        "the drafter's block pass in a capture bucket is causal: a block slot no longer sees the slots after it",
        "dspark/models/drafters/static_block.py",
        "kv_only_len=bucket.context_rows, causal=False)",
        "kv_only_len=bucket.context_rows, causal=True)",
        (f"{STATIC}::test_the_drafters_padded_round_equals_the_eager_one[True]",
         f"{LOSSLESS}::test_sampled_output_on_the_static_path_has_the_target_distribution[dspark-sdpa]"),
    ),
    Mutant(
        "static-draft-argmax-for-sampled-rows",
        "the drafter's captured round takes the argmax for every row, sampled ones too, and reports the q it did not sample from",
        DSPARK_SAMPLE_BLOCK,
        "                    prev = torch.where(samplings.greedy, prev, sample(q, uniforms=uniforms[:, k]))",
        "                    prev = torch.where(samplings.greedy, prev, prev)",
        (f"{STATIC}::test_the_drafters_padded_round_equals_the_eager_one[True]",
         f"{LOSSLESS}::test_sampled_output_on_the_static_path_has_the_target_distribution[dspark-sdpa]"),
    ),
    Mutant(
        "static-causal-round-argmax-for-sampled-rows",
        "an EAGLE-3 / MTP captured round takes the argmax for every row, sampled ones too, and reports the q it did not sample from",
        "dspark/models/drafters/static_causal.py",
        "                token = torch.where(rows.greedy, token, sample(q, uniforms=uniforms[:, k]))",
        "                token = torch.where(rows.greedy, token, token)",
        ("tests/test_eagle3_mtp.py::test_the_padded_round_equals_the_eager_one[True-eagle3]",
         f"{LOSSLESS}::test_sampled_output_on_the_static_path_has_the_target_distribution[eagle3-sdpa]"),
    ),
    Mutant(
        "flex-mask-not-causal",
        "the paged FlexAttention kernel lets a verification row see the rows after it (the mask drops causality)",
        FLEX,
        "            return (owner[page] == b) & (position < context_lens[b]) & (position <= query_starts[b] + q_idx)",
        "            return (owner[page] == b) & (position < context_lens[b])",
        (f"{FLEX_TESTS}::test_flex_attention_equals_gathered_sdpa_on_every_static_layout[False-True]",
         f"{FLEX_TESTS}::test_greedy_decoding_with_the_flex_kernel_equals_eager_plain_decoding[True]"),
    ),
    Mutant(
        "flex-full-pages-past-the-query",
        "the paged FlexAttention kernel counts a page as full (no mask) when it lies below the context, even where "
        "it holds the keys after a verification row",
        FLEX,
        "        full = torch.div(torch.minimum(self.context_lens, self.query_starts + 1), size, rounding_mode=\"floor\")",
        "        full = torch.div(self.context_lens, size, rounding_mode=\"floor\")",
        (f"{FLEX_TESTS}::test_flex_attention_equals_gathered_sdpa_on_every_static_layout[True-True]",),
    ),
    Mutant(
        "flex-last-page-dropped",
        "the paged FlexAttention kernel visits only a sequence's full pages: the keys on its last, partial page are lost",
        FLEX,
        "        used = torch.div(self.context_lens + size - 1, size, rounding_mode=\"floor\")",
        "        used = torch.div(self.context_lens, size, rounding_mode=\"floor\")",
        (f"{FLEX_TESTS}::test_flex_attention_equals_gathered_sdpa_on_every_static_layout[False-True]",
         f"{FLEX_TESTS}::test_flex_attention_equals_gathered_sdpa_on_every_static_layout[True-True]"),
    ),
    Mutant(
        "async-output-streams-past-a-late-stop",
        "with async output processing, a request whose stop string is found one step late also streams the tokens "
        "of the step it ran past the stop",
        "dspark/engine/engine.py",
        "            self._pending = [(r, tokens) for r, tokens in stepped if id(r) not in retired]",
        "            self._pending = list(stepped)",
        ("tests/test_async_output.py::test_async_outputs_equal_the_synchronous_engines",),
    ),
    Mutant(
        "async-output-frees-late",
        "with async output processing, a request ended by a stop token or its length keeps its KV pages and its "
        "place in the batch until its output is made a step later",
        "dspark/engine/engine.py",
        "                if request.finished:  # a stop token or max_new_tokens: its pages go back now, its output next step\n"
        "                    self._finish(request)",
        "                pass",
        ("tests/test_async_output.py::test_async_outputs_equal_the_synchronous_engines",),
    ),
    Mutant(
        "equivalent: draft without top-k, reported consistently",
        "the DSpark drafter ignores top-k when drafting and reports the q it really sampled from: still lossless",
        DSPARK_SAMPLE_BLOCK,
        "            q = logits_to_probs(logits, samplings)",
        "            q = logits_to_probs(logits, [type(s)(s.temperature, 0, s.top_p) for s in samplings])",
        (f"{LOSSLESS}::test_drafts_follow_the_q_the_drafter_reports[dspark-top_k3]",
         f"{LOSSLESS}::test_sampled_output_has_the_target_distribution[dspark-T1-top_k3]",
         f"{LOSSLESS}::test_greedy_speculative_equals_plain[dspark]"),
        equivalent=True,
    ),
)
