"""`dspark data`: the training-data pipeline (docs/design.md §2.6).

    dspark data regenerate --target DIR --input PROMPTS.jsonl --output OUT.jsonl [--max-new-tokens N]
        [--temperature F] [--top-k N] [--top-p F] [--batch-size N] [--seed N] [--limit N]
        [--drafter ngram|DIR] [--template-kwargs JSON] [--device D] [--dtype T] [--no-progress] [--json]
    dspark data cache --target DIR --data CONVERSATIONS.jsonl --layers 1,9,17 --output DIR
        [--dtype bfloat16|float16|float32] [--max-length N] [--max-shard-bytes N[K|M|G|T]]
        [--min-loss-tokens N] [--batch-tokens N] [--template-kwargs JSON] [--overwrite] [--dry-run]
        [--device D] [--model-dtype T] [--no-progress] [--json]

`regenerate` answers each sample's first user turn with the target (resumable: rerun the same command);
`cache` precomputes target features after printing the exact size it needs (see
`dspark.training.feature_cache`). Progress bars go to stderr; `--json` prints a summary on stdout.
"""

from __future__ import annotations

import json
import re
import sys

from dspark.cli import add_device_arg, add_runtime_args, add_seed_arg, print_json
from dspark.errors import ConfigError
from dspark.files import check_output_file, check_output_folder, exclusive_lock

_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def register(sub) -> None:
    data = sub.add_parser("data", help="training data: regenerate responses, cache target features")
    data_sub = data.add_subparsers(dest="data_command", required=True)

    from dspark.training.regenerate import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SAMPLING

    regen = data_sub.add_parser("regenerate", help="answer prompts with the target itself (resumable)")
    regen.add_argument("--target", default=None, help="target model folder (default: the built-in target)")
    regen.add_argument("--input", required=True, help="prompt JSONL ({\"turns\": [...]} or {\"conversations\": [...]})")
    regen.add_argument("--output", required=True, help="output JSONL; rerunning the command resumes it")
    regen.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    regen.add_argument("--temperature", type=float, default=DEFAULT_SAMPLING.temperature)
    regen.add_argument("--top-k", type=int, default=DEFAULT_SAMPLING.top_k, help="0 = off")
    regen.add_argument("--top-p", type=float, default=DEFAULT_SAMPLING.top_p, help="1.0 = off")
    regen.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts per generation batch")
    add_seed_arg(regen)
    regen.add_argument("--limit", type=int, default=None, help="only the first N samples")
    regen.add_argument("--drafter", default=None, help="'ngram' or a drafter folder: speculative (lossless) generation")
    regen.add_argument("--num-draft-tokens", type=int, default=None)
    _add_common(regen)
    add_runtime_args(regen)
    regen.set_defaults(handler=run_regenerate)

    cache = data_sub.add_parser("cache", help="precompute target features to disk (size printed before writing)")
    cache.add_argument("--target", default=None, help="target model folder (default: the built-in target)")
    cache.add_argument("--data", required=True, help="conversation JSONL (e.g. the output of `dspark data regenerate`)")
    cache.add_argument("--layers", required=True, help="comma-separated target layer ids, e.g. 1,9,17,25,33")
    cache.add_argument("--output", required=True, help="cache folder to create")
    cache.add_argument("--dtype", default="bfloat16", help="stored feature dtype: bfloat16 | float16 | float32")
    cache.add_argument("--max-length", type=int, default=None, help="right-truncate samples (default: target context)")
    cache.add_argument("--max-shard-bytes", default="64G", help="shard size limit, bytes or with K/M/G/T suffix (binary)")
    cache.add_argument("--min-loss-tokens", type=int, default=1, help="drop samples with fewer supervised tokens")
    cache.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per target forward")
    cache.add_argument("--overwrite", action="store_true", help="replace an existing cache folder")
    cache.add_argument("--dry-run", action="store_true", help="print the size estimate and stop")
    add_device_arg(cache)
    cache.add_argument("--model-dtype", default=None, help="target compute dtype (default: float32 on CPU, bfloat16 on GPU)")
    _add_common(cache)
    cache.set_defaults(handler=run_cache)

    corpus = data_sub.add_parser("corpus", help="build the built-in model's corpus (stdlib source + Python docs)")
    corpus.add_argument("--out", required=True, help="corpus folder to write (replaced atomically)")
    corpus.add_argument("--stdlib", default=None, help="standard library folder (default: this interpreter's)")
    corpus.add_argument("--docs", default=None, help="python3.11-doc html/_sources folder (default: apt-get download, pinned)")
    corpus.add_argument("--cache-dir", default=None, help="where the downloaded .deb is unpacked (default: a temp folder)")
    corpus.add_argument("--heldout-percent", type=float, default=3.0, help="share of whole files held out for evaluation")
    add_seed_arg(corpus)
    corpus.add_argument("--json", action="store_true")
    corpus.set_defaults(handler=run_corpus)

    tok = data_sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer on a corpus")
    tok.add_argument("--corpus", required=True, help="folder written by `dspark data corpus`")
    tok.add_argument("--out", required=True, help="tokenizer folder to write")
    tok.add_argument("--vocab-size", type=int, default=4096)
    tok.set_defaults(handler=run_tokenizer)


def _add_common(parser) -> None:
    parser.add_argument(
        "--template-kwargs", default=None,
        help="JSON object passed to the chat template, e.g. '{\"enable_thinking\": false}' (use the same for regenerate and cache)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def _template_kwargs(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--template-kwargs: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--template-kwargs: expected a JSON object, got {type(value).__name__}")
    return value


def parse_layers(text: str, num_layers: int) -> list[int]:
    """'1,9,17' → [1, 9, 17], each in [-1, num_layers) (-1 = embedding output), no duplicates."""
    from dspark.training.feature_cache import check_layer_ids

    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--layers {text!r}: expected comma-separated integers, e.g. 1,9,17") from None
    return check_layer_ids(layers, num_layers)


def parse_size(text: str) -> int:
    """'64G' → 64·2³⁰; plain integers are bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match or int(match.group(1)) < 1:
        raise ConfigError(f"--max-shard-bytes {text!r}: expected a positive size such as 1000000 or 64G")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be ≥ 1, got {value}")


def run_corpus(args) -> int:
    from dspark.pipeline.corpus import build_corpus

    if not 0 < args.heldout_percent < 100:
        raise ConfigError(f"--heldout-percent must be in (0, 100), got {args.heldout_percent}")
    check_output_folder(args.out, "--out")
    manifest = build_corpus(args.out, stdlib_dir=args.stdlib, docs_dir=args.docs, cache_dir=args.cache_dir,
                            heldout_percent=args.heldout_percent, seed=args.seed)
    if args.json:
        print_json(manifest)
    else:
        print(f"{args.out}: {manifest['documents']['train']} training and {manifest['documents']['heldout']} held-out files, "
              f"{manifest['characters']['train'] / 1e6:.1f} M training characters")
    return 0


def run_tokenizer(args) -> int:
    from dspark.pipeline.tokenizer_training import train_tokenizer

    check_output_folder(args.out, "--out")
    print(train_tokenizer(args.corpus, args.out, args.vocab_size))
    return 0


def run_regenerate(args) -> int:
    from pathlib import Path

    from dspark.models.zoo import resolve_target

    args.target = resolve_target(args.target)

    from dspark.decoding.sampling import SamplingParams
    from dspark.models.drafters import load_drafter
    from dspark.models.target_runner import TargetRunner
    from dspark.models.tokenizer import load_tokenizer, stop_token_ids
    from dspark.models.fingerprint import model_fingerprint
    from dspark.data.samples import read_samples
    from dspark.training.regenerate import regenerate

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    _check_positive("--max-new-tokens", args.max_new_tokens)
    _check_positive("--batch-size", args.batch_size)
    if args.limit is not None and args.limit < 0:
        raise ConfigError(f"--limit must be ≥ 0, got {args.limit}")
    if Path(args.input).resolve() == Path(args.output).resolve():
        raise ConfigError("--output must differ from --input")
    check_output_file(args.output, "--output")
    template_kwargs = _template_kwargs(args.template_kwargs)
    samples = read_samples(args.input)
    with exclusive_lock(args.output, "--output"):
        pass  # refuse now, before the target loads, if another run writes this output; regenerate() holds it after
    identity = model_fingerprint(args.target)
    tokenizer = load_tokenizer(args.target)
    runner = TargetRunner.from_pretrained(args.target, device=args.device, dtype=args.dtype)
    drafter = None
    if args.drafter is not None:
        drafter = load_drafter(args.drafter, num_draft_tokens=args.num_draft_tokens, device=args.device, dtype=args.dtype,
                               target=runner.model)
    summary = regenerate(
        runner, tokenizer, samples, args.output, stop_token_ids=stop_token_ids(args.target, tokenizer, runner.config.eos_token_ids),
        target_identity=identity, sampling=sampling, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        seed=args.seed, limit=args.limit, drafter=drafter, drafter_name=args.drafter,
        num_draft_tokens=args.num_draft_tokens, template_kwargs=template_kwargs, progress=not args.no_progress,
    )
    if args.json:
        print_json(summary.to_dict())
    else:
        print(
            f"{summary.output}: {summary.num_written} rows written, {summary.num_already_done} already there, "
            f"{summary.num_skipped_too_long} prompts too long for the context; {summary.tokens_generated} tokens "
            f"in {summary.elapsed_s:.1f} s"
        )
    return 0


def run_cache(args) -> int:
    from pathlib import Path

    from dspark.models.zoo import resolve_target

    args.target = resolve_target(args.target)

    from dspark.models.fingerprint import model_fingerprint
    from dspark.models.config import parse_decoder_config, read_config_json
    from dspark.models.target_runner import TargetRunner
    from dspark.models.tokenizer import load_tokenizer
    from dspark.training import feature_cache as fc
    from dspark.data.chat import chat_template_info
    from dspark.data.samples import read_samples

    if args.dtype not in fc.CACHE_DTYPES:
        raise ConfigError(f"--dtype {args.dtype!r}: choose one of {', '.join(fc.CACHE_DTYPES)}")
    _check_positive("--max-length", args.max_length)
    _check_positive("--batch-tokens", args.batch_tokens)
    if args.min_loss_tokens < 0:
        raise ConfigError(f"--min-loss-tokens must be ≥ 0, got {args.min_loss_tokens}")
    max_shard_bytes = parse_size(args.max_shard_bytes)
    template_kwargs = _template_kwargs(args.template_kwargs)
    fc.check_output_folder(args.output, overwrite=args.overwrite)
    hf_config = read_config_json(Path(args.target))
    config = parse_decoder_config(hf_config, where=f"{args.target}/config.json")
    layers = parse_layers(args.layers, config.num_layers)
    max_length = fc.resolve_max_length(args.max_length, config.max_position_embeddings)
    identity = model_fingerprint(args.target)
    tokenizer = load_tokenizer(args.target)
    samples = read_samples(args.data)
    data = fc.prepare_cache_samples(tokenizer, samples, max_length=max_length, min_loss_tokens=args.min_loss_tokens,
                                    template_kwargs=template_kwargs, progress=not args.no_progress)
    estimate = fc.estimate_cache_size(data.token_counts, [s.id for s, _ in data.samples], num_layers=len(layers),
                                      hidden_size=config.hidden_size, dtype=args.dtype, max_shard_bytes=max_shard_bytes)
    print(f"dspark data cache: {estimate.describe()}", file=sys.stderr)
    for stale in fc.stale_temp_folders(Path(args.output)):
        print(f"dspark data cache: warning: {stale} is left over from an interrupted run; delete it to free its space", file=sys.stderr)
    free = fc.check_disk_space(args.output, estimate)
    summary = {
        "output": args.output, "num_samples": estimate.num_samples, "num_tokens": estimate.num_tokens,
        "bytes_per_token": estimate.bytes_per_token, "data_bytes": estimate.data_bytes,
        "estimated_total_bytes": estimate.total_bytes, "num_shards": estimate.num_shards, "free_bytes": free,
        "dropped_no_response": data.dropped_no_response, "dropped_few_loss_tokens": data.dropped_few_loss_tokens,
        "dry_run": args.dry_run,
    }
    if not args.dry_run:
        runner = TargetRunner.from_pretrained(args.target, device=args.device, dtype=args.model_dtype)
        manifest = fc.write_feature_cache(
            runner, data, args.output, layer_ids=layers, target_identity=identity,
            chat_template=chat_template_info(tokenizer), dtype=args.dtype, max_shard_bytes=max_shard_bytes,
            batch_tokens=args.batch_tokens, template_kwargs=template_kwargs, source=str(args.data),
            progress=not args.no_progress,
        )
        summary["num_shards"] = len(manifest["shards"])
    if args.json:
        print_json(summary)
    elif not args.dry_run:
        print(f"{args.output}: {summary['num_samples']} samples, {summary['num_tokens']} tokens, {summary['num_shards']} shard(s)")
    return 0
