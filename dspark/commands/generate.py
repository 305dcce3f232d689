"""`dspark generate`: tokenise, run plain or speculative decoding, print text or JSON."""

from __future__ import annotations

from dspark.cli import add_runtime_args, add_sampling_args, print_json
from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.errors import RequestError
from dspark.models.drafters import load_drafter
from dspark.models.target_runner import TargetRunner
from dspark.models.tokenizer import load_tokenizer, render_prompt, stop_token_ids


def register(sub) -> None:
    gen = sub.add_parser("generate", help="generate text with plain or speculative decoding")
    gen.add_argument("--model", default=None, help="HF-format model folder (default: the built-in target)")
    gen.add_argument("--prompt", required=True, action="append", help="prompt text; repeat for a batch")
    gen.add_argument("--drafter", default=None,
                     help="'ngram', a built-in drafter name (dspark, dspark-rnn, dflash, eagle3, mtp), a folder, or 'none' "
                          "(plain decoding); default: the built-in DSpark drafter with the built-in target, else none")
    gen.add_argument("--num-draft-tokens", type=int, default=None, help="drafts per round (default: drafter block size)")
    gen.add_argument("--calibration", default="auto",
                     help="confidence-head calibration file; 'auto' = the built-in one when it fits the drafter; 'none' = raw")
    gen.add_argument("--chat", action="store_true", help="render the prompt as one user turn with the chat template")
    add_sampling_args(gen)
    add_runtime_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(handler=run_generate)


def run_generate(args) -> int:
    from dspark.models.zoo import resolve_drafter, resolve_target

    builtin_model = args.model is None
    args.model = resolve_target(args.model)
    if args.drafter == "none" or (args.drafter is None and not builtin_model):
        args.drafter = None
    else:
        args.drafter = resolve_drafter(args.drafter)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.max_new_tokens < 1:
        raise RequestError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    runner = TargetRunner.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    tokenizer = load_tokenizer(args.model)
    drafter = None
    if args.drafter is not None:
        drafter = load_drafter(args.drafter, num_draft_tokens=args.num_draft_tokens, device=args.device, dtype=args.dtype,
                               calibration=args.calibration)
    prompts = [render_prompt(tokenizer, text, args.chat) for text in args.prompt]
    stops = stop_token_ids(args.model, tokenizer, runner.config.eos_token_ids)
    out = generate(
        runner, prompts, sampling=sampling, max_new_tokens=args.max_new_tokens, drafter=drafter,
        num_draft_tokens=args.num_draft_tokens, stop_token_ids=stops, seed=args.seed,
    )
    outputs = []
    for seq in out.sequences:
        shown = seq.token_ids[:-1] if seq.finish_reason == "stop" else seq.token_ids
        outputs.append({
            "text": tokenizer.decode(shown, skip_special_tokens=True),
            "token_ids": seq.token_ids,
            "finish_reason": seq.finish_reason,
            "mean_accepted_length": seq.stats.mean_accepted_length if drafter else None,
        })
    if args.json:
        summary = dict(outputs[0]) if len(outputs) == 1 else {}
        summary.update({
            "mean_accepted_length": out.stats.mean_accepted_length if drafter else None,
            "acceptance_rate": out.stats.acceptance_rate if drafter else None,
            "tokens_per_second": out.tokens_per_second,
            "num_generated_tokens": out.num_generated,
            "elapsed_s": out.elapsed_s,
            "drafter": args.drafter,
            "outputs": outputs,
            "spec_decode": out.stats.to_dict() if drafter else None,
        })
        print_json(summary)
    else:
        for item in outputs:
            print(item["text"])
        tau = f", τ = {out.stats.mean_accepted_length:.2f}" if drafter else ""
        print(f"[{out.num_generated} tokens in {out.elapsed_s:.2f} s, {out.tokens_per_second:.1f} tok/s{tau}]")
    return 0
