"""Start-up and shutdown of `dspark serve`: load the models into an `Engine`, run uvicorn, drain on SIGTERM.

SIGTERM (or Ctrl-C): the server stops admitting (new connections are refused, new requests on open
connections get 503), lets the running requests finish for up to `drain_timeout_s`, aborts what is left,
stops the engine's thread and exits with status 0 (docs/serving.md "Shutdown").
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from dspark.engine.engine import Engine, EngineConfig


@dataclass
class ModelOptions:
    """What to serve. model: target folder (None: the built-in target); drafter: a built-in drafter name, a
    folder, "ngram", or "none" (None: the built-in DSpark drafter with the built-in target, else none)."""

    model: str | None = None
    drafter: str | None = None
    num_draft_tokens: int | None = None
    device: str = "auto"
    dtype: str | None = None
    compile: bool = False  # torch.compile the target's dense layer parts
    enforce_eager: bool = False  # no CUDA graphs (`dspark.models.static_step.configure_graphs`)
    cuda_graph_max_bs: int = 256  # the most requests a captured step serves
    attention_backend: str = "auto"  # `dspark.models.flex_paged.ATTENTION_BACKENDS`


def load_engine(options: ModelOptions, engine_config: EngineConfig):
    """(Engine, tokenizer, target folder): the models loaded, the engine built (its SPS profile measured or
    read from the cache when the policy needs one)."""
    from dspark.devices import resolve_device
    from dspark.models.drafters import compile_drafter, load_drafter
    from dspark.models.static_step import configure_graphs
    from dspark.models.target_runner import TargetRunner
    from dspark.models.tokenizer import load_tokenizer, stop_token_ids
    from dspark.models.zoo import resolve_drafter, resolve_target

    builtin = options.model is None
    target = resolve_target(options.model)
    drafter_spec = options.drafter
    if drafter_spec == "none" or (drafter_spec is None and not builtin):
        drafter_spec = None
    else:
        drafter_spec = resolve_drafter(drafter_spec)
    device = str(resolve_device(options.device, "--device"))
    runner = TargetRunner.from_pretrained(target, device=device, dtype=options.dtype, compile=options.compile)
    tokenizer = load_tokenizer(target)
    drafter = None
    if drafter_spec is not None:
        drafter = load_drafter(drafter_spec, num_draft_tokens=options.num_draft_tokens, device=device, dtype=options.dtype,
                               target=runner.model)
        if options.compile:
            compile_drafter(drafter)
    configure_graphs(runner, drafter, enforce_eager=options.enforce_eager, max_batch=options.cuda_graph_max_bs,
                     attention=options.attention_backend)
    engine = Engine(runner, drafter, config=engine_config, tokenizer=tokenizer,
                    eos_token_ids=stop_token_ids(target, tokenizer, runner.config.eos_token_ids))
    return engine, tokenizer, target


def run_server(app, host: str, port: int, *, drain_timeout_s: float = 30.0, log_level: str = "info") -> None:
    """Serve `app` (from `build_app(..., engine_thread=False)`) until SIGTERM/SIGINT, then drain (module
    docstring). The engine steps on the calling (main) thread, uvicorn's event loop on another
    (`dspark.serving.engine_loop`: why)."""
    import threading

    import uvicorn

    engine_loop = app.state.server.loop

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine_loop.draining()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout_s,
                            access_log=False, lifespan="on")
    server = DrainingServer(config)
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            server.run()
        except BaseException as exc:  # uvicorn exits through SystemExit when it cannot start
            failed.append(exc)
        finally:
            engine_loop.stop()  # unblocks run_forever if uvicorn never attached (a failed start-up)
            engine_loop.attach(None)

    # uvicorn listens to signals only on the main thread, which steps the engine here: install them ourselves.
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
    http_thread = threading.Thread(target=serve, name="dspark-http", daemon=True)
    http_thread.start()
    try:
        engine_loop.run_forever()
        http_thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed and not (isinstance(failed[0], SystemExit) and not failed[0].code):
        from dspark.errors import ConfigError

        raise ConfigError(f"the HTTP server stopped: {failed[0]!r}")
