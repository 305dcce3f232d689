"""`dspark serve`: an OpenAI-compatible HTTP server over the serving engine (docs/serving.md).

    dspark serve [--model DIR] [--drafter NAME|DIR|none] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                 [--served-model-name NAME] [--max-num-seqs N] [--max-num-batched-tokens N] [--kv-cache-tokens N]
                 [--scheduler POLICY] [--profile FILE] [--max-queue N] [--max-prompt-tokens N]
                 [--request-timeout S] [--max-body-bytes N] [--drain-timeout S]
"""

from __future__ import annotations

import os
import socket
import sys

from pathlib import Path

from dspark.cli import add_execution_args, add_runtime_args, add_seed_arg, check_execution_args
from dspark.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat and completions, streaming, metrics)")
    add_server_args(p, port_help="port to listen on")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(handler=run_serve)


def add_server_args(p, port_help: str) -> None:
    """The flags `dspark serve` and its Ray Serve replicas (`dspark.serving.ray_app`) share."""
    p.add_argument("--model", default=None, help="target folder (default: the built-in target)")
    p.add_argument("--drafter", default=None,
                   help="built-in drafter name (dspark, dspark-rnn, dflash, eagle3, mtp), a folder, 'ngram', or 'none'; "
                        "default: the built-in DSpark drafter with the built-in target, else none")
    p.add_argument("--num-draft-tokens", type=int, default=None, help="drafts per step (default: the drafter's block size)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help=port_help)
    p.add_argument("--api-key", default=None,
                   help="required as 'Authorization: Bearer KEY' on every endpoint but /health (default: $DSPARK_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the model folder's name)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="target tokens per engine step")
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV budget in tokens (default: from free memory)")
    p.add_argument("--scheduler", default="auto",
                   help="verification policy: auto (Algorithm 1 with the lookahead behind the draft gate), verify-all, "
                        "fixed-N, threshold-T, causal-greedy, causal-greedy-gated, algorithm-1, async-topk")
    p.add_argument("--profile", default=None, help="SPS profile JSON (default: this machine's, measured once and cached)")
    p.add_argument("--calibration", default="auto", help="the drafter's calibration file ('auto', 'none', or a path)")
    p.add_argument("--max-queue", type=int, default=1024, help="requests queued beyond those running; more get 429")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longer prompts get 400 (default: the context)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get 413")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds before a request is aborted (0 = none)")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for running requests")
    p.add_argument("--disable-async-output-proc", action="store_true",
                   help="on CUDA, detokenize each step's tokens after the step instead of while the next step's "
                        "forward runs (outputs then leave one step earlier, and host time adds to GPU time)")
    add_seed_arg(p, help="the engine generator's seed (requests without their own seed)")
    add_runtime_args(p)
    add_execution_args(p)


def _absolute(path: str | None, *, model_folder: bool = False) -> str | None:
    """A path that exists here, made absolute (Ray's workers need not share our working directory);
    model_folder: only a folder with a config.json counts (a built-in drafter's name stays a name)."""
    if path is None or not (Path(path) / "config.json" if model_folder else Path(path)).exists():
        return path
    return str(Path(path).resolve())


def configs_from_args(args, *, local_files: bool = True):
    """(ModelOptions, EngineConfig, ServeConfig) from the flags of `add_server_args`, paths made absolute;
    ConfigError for a bad value. local_files: the model and profile must exist on this machine (False when
    deploying to a cluster whose nodes hold them)."""
    from dspark.engine.engine import EngineConfig
    from dspark.serving.app import ServeConfig
    from dspark.serving.server import ModelOptions

    check_execution_args(args)
    for name in ("max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < 1:
        raise ConfigError(f"--kv-cache-tokens must be ≥ 1, got {args.kv_cache_tokens}")
    for name in ("request_timeout", "drain_timeout"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {args.port}")
    if args.scheduler != "auto":
        from dspark.scheduling.named import parse_policies

        parse_policies(args.scheduler, None, "--scheduler")
    if local_files and args.model is not None and not Path(args.model).is_dir():
        raise ConfigError(f"--model {args.model}: no such folder")
    if local_files and args.profile is not None and not Path(args.profile).is_file():
        raise ConfigError(f"--profile {args.profile}: no such file")
    api_key = args.api_key if args.api_key is not None else os.environ.get("DSPARK_API_KEY") or None
    served_name = args.served_model_name or (Path(args.model).name if args.model else "dspark-builtin")
    calibration = args.calibration if args.calibration in ("auto", "none") else _absolute(args.calibration)
    model = ModelOptions(_absolute(args.model), _absolute(args.drafter, model_folder=True), args.num_draft_tokens,
                         args.device, args.dtype, args.compile,
                         args.enforce_eager, args.cuda_graph_max_bs, args.attention_backend)
    engine = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          kv_cache_tokens=args.kv_cache_tokens, seed=args.seed, policy=args.scheduler,
                          profile=_absolute(args.profile), calibration=calibration,
                          async_output=False if args.disable_async_output_proc else None)
    serve_config = ServeConfig(served_model_name=served_name, api_key=api_key, max_body_bytes=args.max_body_bytes,
                               max_prompt_tokens=args.max_prompt_tokens, max_queue=args.max_queue,
                               request_timeout_s=args.request_timeout or None, model_path=model.model)
    return model, engine, serve_config


def check_port_free(host: str, port: int) -> None:
    """ConfigError when (host, port) cannot be bound — before any model loads."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r}: not an address this machine can bind ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror})") from None


def run_serve(args) -> int:
    from dspark.serving.app import build_app
    from dspark.serving.server import load_engine, run_server

    model, engine_config, serve_config = configs_from_args(args)
    check_port_free(args.host, args.port)
    engine, tokenizer, target = load_engine(model, engine_config)
    serve_config.model_path = target
    app = build_app(engine, tokenizer, serve_config, engine_thread=False)
    print(f"dspark serve: {serve_config.served_model_name} ({target}, drafter "
          f"{engine.drafter.name if engine.drafter else 'none'}) on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    run_server(app, args.host, args.port, drain_timeout_s=args.drain_timeout, log_level=args.log_level)
    return 0
