"""Regenerate the responses of a prompt set with the target itself (docs/design.md §2.6), resumably by sample id.

Training a drafter on the target's own answers raises acceptance by about 10 % over the dataset's
original answers (docs/design.md §2.6; docs/design.md §2.6). Each sample's first user turn (after any leading
system messages) is rendered with the target's chat template and the generation prompt, and answered by
`dspark.engine.generation.generate` (plain decoding, or speculative with `drafter` — lossless, so only
faster). Output: one JSONL row per sample, in input order,

    {"id": ..., "conversations": [<system>..., {"role": "user", ...}, {"role": "assistant", "content": TEXT}],
     "finish_reason": "stop" | "length", "num_tokens": N}

TEXT is the decoded response without its stop token and without special tokens; N counts the generated
tokens (stop token included). A prompt that leaves no room in the target's context is skipped (no row;
counted in the summary); otherwise max_new_tokens is clipped to the room left.

Resume semantics (unlike DeepSpec, whose line-count resume duplicates/skips samples, docs/design.md §2.6):
  * batches are fixed index ranges of the input: batch b = samples [b·B, (b+1)·B);
  * batch b is generated with the seed `batch_seed(seed, b)`, so its result does not depend on which
    batches ran before; the same settings give the same file (reproducible per seed);
  * one run can be split over processes on batch boundaries: the process given samples [k·B, …) passes
    `first_batch=k`, and the outputs concatenated in order equal the single-process file;
  * a batch's rows are appended with one write, then flushed and fsynced;
  * on restart the output is scanned: a torn last line (a kill during a write: no final newline) is cut
    off, ids already present are skipped, a batch whose ids are all present is skipped, and a partially
    present batch is generated again in full (same seed, same members → same results) and only its
    missing rows are appended. Result: no duplicate and no gap, byte-identical to an uninterrupted run.
  * the settings that change results (target, sampling, max_new_tokens, batch size, seed, drafter, chat
    template) are stored next to the output in `<output>.settings.json`; resuming with other settings
    is refused. `--limit` may change between runs, but at temperature > 0 a batch cut short by the
    limit of an earlier run holds other samples than the same batch of a longer run.
  * one writer at a time: a run holds an exclusive lock on the output (`dspark.files.exclusive_lock`) from
    the scan to its last append; a second run on the same output refuses at once (ConfigError).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.errors import ConfigError
from dspark.files import exclusive_lock
from dspark.models.drafters.base import Drafter
from dspark.models.target_runner import TargetRunner
from dspark.data.chat import chat_template_info, render_sample_prompt
from dspark.data.samples import Sample, prompt_messages

SETTINGS_FORMAT = "dspark-regenerate-settings/1"

# DeepSpec's regeneration recipe for Qwen3 (non-thinking sampling settings; docs/design.md §2.6).
DEFAULT_SAMPLING = SamplingParams(temperature=0.7, top_k=20, top_p=0.8)
DEFAULT_MAX_NEW_TOKENS = 1024
DEFAULT_BATCH_SIZE = 16


@dataclass
class RegenerateSummary:
    output: str
    num_samples: int  # samples considered (after --limit)
    num_written: int  # rows appended by this run
    num_already_done: int  # ids found in the output at start
    num_skipped_too_long: int  # prompts with no room left in the target's context (no row written)
    batches_run: int
    batches_skipped: int
    tokens_generated: int
    elapsed_s: float
    torn_bytes_dropped: int  # bytes of a torn last line removed at start

    def to_dict(self) -> dict:
        return asdict(self)


def batch_seed(seed: int, batch_index: int) -> int:
    """The generator seed of batch `batch_index`: a 63-bit hash of (seed, batch index)."""
    digest = hashlib.sha256(f"dspark-regenerate:{seed}:{batch_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def settings_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".settings.json")


def scan_output(output: str | Path) -> tuple[list[str | int], int]:
    """Ids of the complete rows of an existing output file, in order, and the bytes of a torn last line.

    A last line without its newline is the trace of a write cut short by a kill; it is truncated away
    (the file is shortened in place) and its sample regenerated. A complete line that is not a JSON object
    with an "id" means the file is damaged or not ours: `ConfigError` naming FILE:LINE.
    """
    output = Path(output)
    if not output.exists():
        return [], 0
    ids: list[str | int] = []
    good_end = 0
    torn = 0
    with output.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                torn = len(raw)
                break
            good_end += len(raw)
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise ConfigError(f"{output}:{lineno}: not a JSON row; the output file is damaged or not a regeneration output") from None
            if not isinstance(row, dict) or "id" not in row:
                raise ConfigError(f"{output}:{lineno}: row has no \"id\"; the output file is not a regeneration output")
            ids.append(row["id"])
    if torn:
        with output.open("r+b") as f:
            f.truncate(good_end)
            f.flush()
            os.fsync(f.fileno())
    return ids, torn


def _check_settings(output: Path, settings: dict, has_rows: bool) -> None:
    path = settings_path(output)
    if path.exists():
        try:
            stored = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if stored != settings:
            keys = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
            detail = "; ".join(f"{k}: stored {stored.get(k)!r}, now {settings.get(k)!r}" for k in keys)
            raise ConfigError(
                f"{output} was generated with other settings ({detail}); resume with the same settings "
                "or write to a new --output"
            )
        return
    if has_rows:
        raise ConfigError(f"{output} already has rows but no {path.name}; refusing to append to an output of unknown provenance")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def regenerate(
    runner: TargetRunner,
    tokenizer,
    samples: Sequence[Sample],
    output: str | Path,
    *,
    stop_token_ids: Sequence[int],
    target_identity: dict,
    sampling: SamplingParams = DEFAULT_SAMPLING,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    limit: int | None = None,
    drafter: Drafter | None = None,
    drafter_name: str | None = None,
    num_draft_tokens: int | None = None,
    template_kwargs: dict | None = None,
    progress: bool = True,
    after_batch: Callable[[int], None] | None = None,
    first_batch: int = 0,
) -> RegenerateSummary:
    """Answer every sample's first user turn with the target and append the rows to `output` (JSONL).

    target_identity: `feature_cache.target_identity(folder)` of the target (stored in the settings file).
    after_batch(b): called once batch b's rows are durably written (tests use it to simulate a kill).
    first_batch: the global index of this run's first batch when `samples` is a batch-aligned slice of a
    larger input split over processes (seeds follow the global index).
    """
    if isinstance(first_batch, bool) or not isinstance(first_batch, int) or first_batch < 0:
        raise ConfigError(f"first_batch must be an integer ≥ 0, got {first_batch!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch size must be an integer ≥ 1, got {batch_size!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be an integer ≥ 0, got {limit!r}")
    start_time = time.perf_counter()
    output = Path(output)
    all_ids = {s.id for s in samples}
    chosen = list(samples[:limit] if limit is not None else samples)
    messages = {s.id: prompt_messages(s) for s in chosen}  # fails fast on a sample without a user turn
    settings = {
        "format": SETTINGS_FORMAT,
        "target": target_identity,
        "chat_template": chat_template_info(tokenizer),
        "template_kwargs": template_kwargs or {},
        "sampling": asdict(sampling),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "drafter": drafter_name if drafter is not None else None,
        "num_draft_tokens": num_draft_tokens if drafter is not None else None,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(output, "--output"):
        return _regenerate_locked(
            runner, tokenizer, chosen, output, all_ids=all_ids, messages=messages, settings=settings,
            stop_token_ids=stop_token_ids, sampling=sampling, max_new_tokens=max_new_tokens, batch_size=batch_size,
            seed=seed, first_batch=first_batch, drafter=drafter, num_draft_tokens=num_draft_tokens,
            template_kwargs=template_kwargs, progress=progress, after_batch=after_batch, start_time=start_time,
        )


def _regenerate_locked(runner, tokenizer, chosen, output: Path, *, all_ids, messages, settings, stop_token_ids,
                       sampling, max_new_tokens, batch_size, seed, first_batch, drafter, num_draft_tokens,
                       template_kwargs, progress, after_batch, start_time) -> RegenerateSummary:
    """`regenerate` once it holds the output's lock: scan, check the settings, generate the missing batches."""
    done_ids, torn = scan_output(output)
    if torn:
        print(f"{output}: dropped a torn last line ({torn} bytes) left by an interrupted run", file=sys.stderr)
    done = set(done_ids)
    if len(done) != len(done_ids):
        raise ConfigError(f"{output}: the same id appears on several rows; the file was not written by one resumable run")
    unknown = [i for i in done_ids if i not in all_ids]
    if unknown:
        raise ConfigError(f"{output}: has ids not in the input (e.g. {unknown[0]!r}); wrong --input or --output?")
    _check_settings(output, settings, has_rows=bool(done_ids))

    from tqdm import tqdm

    already = sum(1 for s in chosen if s.id in done)
    summary = RegenerateSummary(str(output), len(chosen), 0, already, 0, 0, 0, 0, 0.0, torn)
    num_batches = (len(chosen) + batch_size - 1) // batch_size
    bar = tqdm(total=len(chosen), initial=already, unit="sample", desc="regenerate", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        with output.open("ab") as sink:
            for b in range(num_batches):
                members = chosen[b * batch_size : (b + 1) * batch_size]
                missing = [s for s in members if s.id not in done]
                if not missing:
                    summary.batches_skipped += 1
                    continue
                rows, generated, skipped = _run_batch(
                    runner, tokenizer, members, missing, messages, stop_token_ids=stop_token_ids,
                    sampling=sampling, max_new_tokens=max_new_tokens, seed=batch_seed(seed, first_batch + b), drafter=drafter,
                    num_draft_tokens=num_draft_tokens, template_kwargs=template_kwargs,
                )
                summary.num_skipped_too_long += skipped
                if rows:
                    sink.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
                    sink.flush()
                    os.fsync(sink.fileno())
                    summary.batches_run += 1
                else:
                    summary.batches_skipped += 1
                summary.num_written += len(rows)
                summary.tokens_generated += generated
                bar.update(len(missing))
                elapsed = time.perf_counter() - start_time
                bar.set_postfix(tok_s=f"{summary.tokens_generated / max(elapsed, 1e-9):.1f}")
                if after_batch is not None:
                    after_batch(b)
    finally:
        bar.close()
    summary.elapsed_s = time.perf_counter() - start_time
    return summary


def _run_batch(
    runner, tokenizer, members, missing, messages, *, stop_token_ids, sampling, max_new_tokens, seed, drafter,
    num_draft_tokens, template_kwargs,
) -> tuple[list[dict], int, int]:
    """Generate one batch (all its members that fit the context, so the result is independent of what is
    missing) and return the rows of the missing ones, the tokens generated and the count skipped."""
    missing_ids = {s.id for s in missing}
    prompts, budgets, runnable = [], [], []
    skipped = 0
    for s in members:
        prompt = render_sample_prompt(tokenizer, s, template_kwargs=template_kwargs)
        room = runner.max_context - len(prompt)
        if room < 1:
            skipped += s.id in missing_ids
            continue
        prompts.append(prompt)
        budgets.append(min(max_new_tokens, room))
        runnable.append(s)
    if not any(s.id in missing_ids for s in runnable):
        return [], 0, skipped
    out = generate(
        runner, prompts, sampling=sampling, max_new_tokens=budgets, drafter=drafter,
        num_draft_tokens=num_draft_tokens, stop_token_ids=stop_token_ids, seed=seed,
    )
    rows = []
    generated = 0
    for s, seq in zip(runnable, out.sequences):
        if s.id not in missing_ids:
            continue
        shown = seq.token_ids[:-1] if seq.finish_reason == "stop" else seq.token_ids
        text = tokenizer.decode(shown, skip_special_tokens=True)
        rows.append({
            "id": s.id,
            "conversations": messages[s.id] + [{"role": "assistant", "content": text}],
            "finish_reason": seq.finish_reason,
            "num_tokens": len(seq.token_ids),
        })
        generated += len(seq.token_ids)
    return rows, generated, skipped
