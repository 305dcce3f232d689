"""`dspark generate`: tokenise, run plain or speculative decoding, print text or JSON."""

from __future__ import annotations

from dspark.cli import add_execution_args, add_runtime_args, add_sampling_args, check_execution_args, print_json
from dspark.decoding.sampling import SamplingParams
from dspark.engine.generation import generate
from dspark.errors import RequestError
from dspark.models.drafters import compile_drafter, load_drafter
from dspark.models.static_step import configure_graphs
from dspark.models.target_runner import TargetRunner
from dspark.scheduling.controller import SpeculationController
from dspark.data.chat import render_prompt
from dspark.models.tokenizer import load_tokenizer, stop_token_ids


def register(sub) -> None:
    gen = sub.add_parser("generate", help="generate text with plain or speculative decoding")
    gen.add_argument("--model", default=None, help="HF-format model folder (default: the built-in target)")
    gen.add_argument("--prompt", required=True, action="append", help="prompt text; repeat for a batch")
    gen.add_argument("--drafter", default=None,
                     help="'ngram', a built-in drafter name (dspark, dspark-rnn, dflash, eagle3, mtp), a folder, or 'none' "
                          "(plain decoding); default: the built-in DSpark drafter with the built-in target, else none")
    gen.add_argument("--num-draft-tokens", type=int, default=None, help="drafts per round (default: drafter block size)")
    gen.add_argument("--calibration", default="auto",
                     help="confidence-head calibration file; 'auto' = the drafter folder's own calibration.json when fitted for its weights; 'none' = raw")
    gen.add_argument("--scheduler", default=None,
                     help="verification policy (docs/design.md §5): verify-all (default), fixed-N, threshold-T, causal-greedy "
                          "(Algorithm 1 with the staircase lookahead), algorithm-1 (as published), async-topk")
    gen.add_argument("--profile", default=None,
                     help="SPS profile JSON for causal-greedy / algorithm-1 / async-topk (default: this machine's, measured once and cached)")
    gen.add_argument("--draft-gate", action="store_true",
                     help="skip the drafter in rounds where, by earlier rounds and the SPS profile, drafting does not pay")
    gen.add_argument("--online-calibration", type=int, default=None, metavar="N",
                     help="refit the confidence temperatures every N verification rounds from the outcomes (docs/design.md §4.3)")
    gen.add_argument("--chat", action="store_true", help="render the prompt as one user turn with the chat template")
    add_sampling_args(gen)
    add_runtime_args(gen)
    add_execution_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(handler=run_generate)


def _profile(args):
    from dspark.scheduling.sps import SPSProfile

    if args.profile:
        return SPSProfile.load(args.profile)
    from dspark.scheduling.profiler import profile_with_cache

    data, path, _ = profile_with_cache(args.model, args.drafter, device=args.device, dtype=args.dtype)
    return SPSProfile.from_dict(data, source=str(path))


def make_controller(args, drafter, sampling) -> SpeculationController:
    """The controller of --calibration / --scheduler / --profile / --online-calibration / --draft-gate; the
    online calibrator refits the calibration regime of the request's `sampling` temperature."""
    from dspark.calibration.calibration_file import regimes_for

    if drafter is None:
        if args.scheduler or args.online_calibration or args.draft_gate:
            raise RequestError("--scheduler, --online-calibration and --draft-gate need a drafter")
        return SpeculationController()
    controller = SpeculationController(regimes=regimes_for(drafter, args.calibration))
    if args.scheduler:
        from dspark.scheduling.named import make_policy, parse_policies

        spec = parse_policies(args.scheduler, drafter.block_size, "--scheduler")
        if len(spec) != 1 or spec[0].kind in ("plain", "mtp-1"):
            raise RequestError(f"--scheduler {args.scheduler!r}: give one of verify-all, fixed-N, threshold-T, causal-greedy, "
                               "algorithm-1, async-topk")
        if spec[0].kind == "causal-greedy-gated":
            raise RequestError("--scheduler causal-greedy-gated: use --scheduler causal-greedy --draft-gate")
        profile = _profile(args) if spec[0].kind in ("causal-greedy", "algorithm-1", "async-topk") else None
        controller.policy = make_policy(spec[0], profile)
    if args.online_calibration is not None:
        if args.online_calibration < 1 or not drafter.provides_confidence:
            raise RequestError("--online-calibration needs N ≥ 1 and a drafter with a confidence head")
        from dspark.calibration.online import OnlineCalibrator

        controller.online = OnlineCalibrator(drafter.block_size, refit_every=args.online_calibration,
                                             window=max(4 * args.online_calibration, 256), min_count=10,
                                             initial=controller.map_for(sampling),
                                             sampling_temperature=sampling.temperature)
    if args.draft_gate:
        if not drafter.provides_confidence:
            raise RequestError("--draft-gate needs a drafter with a confidence head")
        from dspark.scheduling.gate import DraftGate

        controller.gate = DraftGate(_profile(args))
    return controller


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
    check_execution_args(args)
    if args.scheduler:
        from dspark.scheduling.named import parse_policies

        parse_policies(args.scheduler, None, "--scheduler")  # names checked before any model loads
    if args.online_calibration is not None and args.online_calibration < 1:
        raise RequestError(f"--online-calibration must be ≥ 1, got {args.online_calibration}")
    runner = TargetRunner.from_pretrained(args.model, device=args.device, dtype=args.dtype, compile=args.compile)
    tokenizer = load_tokenizer(args.model)
    drafter = None
    if args.drafter is not None:
        drafter = load_drafter(args.drafter, num_draft_tokens=args.num_draft_tokens, device=args.device, dtype=args.dtype,
                              target=runner.model)
        if args.compile:
            compile_drafter(drafter)
    configure_graphs(runner, drafter, enforce_eager=args.enforce_eager, max_batch=args.cuda_graph_max_bs,
                     attention=args.attention_backend)
    controller = make_controller(args, drafter, sampling)
    prompts = [render_prompt(tokenizer, text, args.chat, f"--prompt {i + 1}") for i, text in enumerate(args.prompt)]
    stops = stop_token_ids(args.model, tokenizer, runner.config.eos_token_ids)
    out = generate(
        runner, prompts, sampling=sampling, max_new_tokens=args.max_new_tokens, drafter=drafter,
        num_draft_tokens=args.num_draft_tokens, stop_token_ids=stops, seed=args.seed, controller=controller,
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
            "scheduler": repr(controller.policy) if controller.policy is not None else None,
            "online_calibration": controller.online.drift_report() if controller.online is not None else None,
            "draft_gate": None if controller.gate is None else controller.gate.report(),
        })
        print_json(summary)
    else:
        for item in outputs:
            print(item["text"])
        tau = f", τ = {out.stats.mean_accepted_length:.2f}" if drafter else ""
        print(f"[{out.num_generated} tokens in {out.elapsed_s:.2f} s, {out.tokens_per_second:.1f} tok/s{tau}]")
    return 0
