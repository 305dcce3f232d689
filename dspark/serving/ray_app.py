"""`dspark serve` as a Ray Serve application: several replicas of the same OpenAI-compatible FastAPI app, each
around its own engine, behind Ray Serve's HTTP proxy, scaled by Serve's autoscaler.

    python -m dspark.serving.ray_app [--model DIR] [--drafter NAME|DIR|none] [--min-replicas 1]
        [--max-replicas 1] [--target-ongoing-requests N] [--max-ongoing-requests N]
        [--num-cpus-per-replica 1] [--num-gpus-per-replica 0] [--host 127.0.0.1] [--port 8000]
        [--address RAY_ADDRESS] [--num-cpus N] [--app-name dspark] [the engine and HTTP options of `dspark serve`]

(`pip install 'dspark[ray]'` first.) Without --address it starts a local Ray instance whose own services
listen on loopback only; with --address (e.g. "auto", or "ray://head:10001") it deploys on that cluster,
where every node must have dspark installed and see the model folders at the same paths. Serve's HTTP proxy
listens on --host:--port (default loopback only) and routes every path ("/") to the replicas. The command
prints the URL, then blocks until SIGTERM or SIGINT: a local instance is then shut down (Serve, then Ray);
on a cluster, only this application is deleted.

Each replica is a Ray actor holding `num_cpus_per_replica` CPUs (and `num_gpus_per_replica` GPUs) that loads
its own engine (`dspark.serving.server.load_engine`), builds the app with `dspark.serving.app.build_app`,
and serves it unchanged but for one response header, `x-dspark-replica: <Serve replica id>`, which tells a
client which replica answered. The engine is loaded and stepped by one thread of the replica's own, started
with the replica and stopped by the app's lifespan when Serve stops the replica (downscaling, redeploying or
shutdown); Serve's health check fails once the replica's engine is dead, and Serve replaces that replica.
/health and /metrics answer per replica (the one the proxy picked; the header names it).

Autoscaling (Serve's `autoscaling_config`): Serve keeps between min_replicas and max_replicas replicas,
aiming at `target_ongoing_requests` HTTP requests in flight per replica on average (requests, not tokens;
default: half of max_ongoing_requests); a replica is sent at most `max_ongoing_requests` requests at once
(default: the engine's max_num_seqs), the rest wait in Serve's queue, where the autoscaler counts them too.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import signal
import sys
import threading

from dspark.errors import ConfigError, DSparkError

REPLICA_HEADER = "x-dspark-replica"
DEFAULT_APP_NAME = "dspark"
INSTALL_HINT = "ray is not installed: pip install 'dspark[ray]'"


def import_serve():
    """The `ray.serve` module, or a ConfigError saying how to install it."""
    try:
        from ray import serve
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return serve


class ReplicaHeader:
    """ASGI middleware: adds `x-dspark-replica: <replica>` to every HTTP response of the wrapped app."""

    def __init__(self, app, replica: str):
        self.app = app
        self.replica = replica

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(REPLICA_HEADER.encode(), self.replica.encode())]
            await send(message)

        await self.app(scope, receive, send_with_header)


class DSparkReplica:
    """The deployment's class: `build_deployment` wraps it with `serve.ingress`, which builds the replica's
    app at replica start-up and serves it. Serve calls `check_health` every `health_check_period_s`
    seconds; it raises once the engine is dead, and Serve then replaces the replica."""

    def check_health(self) -> None:
        server = self.app.state.server
        if not server.loop.alive:
            raise RuntimeError("the dspark engine is not running" + (f": {server.loop.dead}" if server.loop.dead else ""))


def _positive_number(value, name: str, *, zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if zero else value > 0)
    if not ok:
        raise ConfigError(f"{name} must be a number {'≥' if zero else '>'} 0, got {value!r}")
    return float(value)


def _count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return value


def build_deployment(model_options, engine_config, serve_config, *, min_replicas: int = 1, max_replicas: int = 1,
                     target_ongoing_requests: float | None = None, max_ongoing_requests: int | None = None,
                     num_cpus_per_replica: float = 1.0, num_gpus_per_replica: float = 0.0,
                     threads: int | None = None, drain_timeout_s: float = 30.0, name: str = "dspark"):
    """A bound Ray Serve application (pass it to `serve.run`): the deployment `name` whose replicas each load
    `model_options` into an engine configured by `engine_config` and serve `build_app(engine, tokenizer,
    serve_config)` (`serve_config.model_path` defaults to the target folder the replica loaded).

    min_replicas, max_replicas: the autoscaler's range (min_replicas = max_replicas: a fixed count; 0 replicas
    is allowed as a minimum, the first request then waits for a replica to start). target_ongoing_requests:
    HTTP requests in flight per replica the autoscaler aims at (default max_ongoing_requests / 2).
    max_ongoing_requests: requests a replica is sent at once (default engine_config.max_num_seqs).
    num_cpus_per_replica, num_gpus_per_replica: the Ray resources each replica's actor reserves (fractions
    allowed; Ray sets the actor's OMP_NUM_THREADS, hence PyTorch's intra-op threads, to the whole CPUs
    reserved unless the environment sets it). threads: PyTorch intra-op threads in each replica (None: as
    Ray sets them). drain_timeout_s: seconds a replica being stopped waits for its running requests
    (Serve's graceful_shutdown_timeout_s).

    ConfigError for a value out of range, or when Ray Serve is not installed."""
    serve = import_serve()
    min_replicas = _count(min_replicas, "min_replicas", 0)
    max_replicas = _count(max_replicas, "max_replicas", 1)
    if max_replicas < min_replicas:
        raise ConfigError(f"max_replicas ({max_replicas}) must be ≥ min_replicas ({min_replicas})")
    max_ongoing = _count(engine_config.max_num_seqs if max_ongoing_requests is None else max_ongoing_requests,
                         "max_ongoing_requests", 1)
    target = _positive_number(max_ongoing / 2 if target_ongoing_requests is None else target_ongoing_requests,
                              "target_ongoing_requests")
    num_cpus = _positive_number(num_cpus_per_replica, "num_cpus_per_replica", zero=True)
    num_gpus = _positive_number(num_gpus_per_replica, "num_gpus_per_replica", zero=True)
    if threads is not None:
        _count(threads, "threads", 1)
    drain = _positive_number(drain_timeout_s, "drain_timeout_s", zero=True)

    def build_replica_app():
        """Runs in each replica at start-up: its engine, its app. The engine is loaded by the thread that will
        step it, so that thread is the process's first to run PyTorch's OpenMP regions
        (`dspark.serving.engine_loop`: a second OpenMP team slows a step 1.7× on a 2-core CPU)."""
        from dspark.serving.app import build_app
        from dspark.serving.server import load_engine

        loaded: queue.Queue = queue.Queue()
        app_built = threading.Event()
        holder: dict = {}

        def engine_thread() -> None:
            if threads is not None:
                import torch

                torch.set_num_threads(threads)
            try:
                loaded.put(load_engine(model_options, engine_config))
            except BaseException as exc:  # handed to the builder, which raises it in Serve's replica start-up
                loaded.put(exc)
                return
            app_built.wait()
            holder["app"].state.server.loop.run_forever()

        threading.Thread(target=engine_thread, name="dspark-engine", daemon=True).start()
        result = loaded.get()
        if isinstance(result, BaseException):
            raise result
        engine, tokenizer, target_folder = result
        config = dataclasses.replace(serve_config, model_path=serve_config.model_path or target_folder)
        holder["app"] = app = build_app(engine, tokenizer, config, engine_thread=False)
        app_built.set()
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app

    deployment = serve.deployment(
        serve.ingress(build_replica_app)(DSparkReplica), name=name,
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "target_ongoing_requests": target},
        max_ongoing_requests=max_ongoing,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        graceful_shutdown_timeout_s=drain,
    )
    return deployment.bind()


def build_parser() -> argparse.ArgumentParser:
    from dspark.commands.serve import add_server_args

    p = argparse.ArgumentParser(prog="python -m dspark.serving.ray_app",
                                description="dspark's OpenAI-compatible server as Ray Serve replicas (module docstring).")
    p.add_argument("--min-replicas", type=int, default=1, help="fewest replicas the autoscaler keeps")
    p.add_argument("--max-replicas", type=int, default=1, help="most replicas the autoscaler starts")
    p.add_argument("--target-ongoing-requests", type=float, default=None,
                   help="HTTP requests in flight per replica the autoscaler aims at (default: --max-ongoing-requests / 2)")
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests sent to one replica at once, the rest wait in Serve's queue (default: --max-num-seqs)")
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves")
    p.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="GPUs each replica reserves")
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy on ('auto', 'ray://host:10001', ...; default: start a local instance)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--app-name", default=DEFAULT_APP_NAME, help="the Serve application's name")
    add_server_args(p, port_help="port of Serve's HTTP proxy")
    return p


def _wait_for_signal() -> int:
    """Block until SIGTERM or SIGINT; the signal's number."""
    received: list[int] = []
    done = threading.Event()

    def handler(signum, _frame):
        received.append(signum)
        done.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not done.wait(1.0):
            pass
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return received[0]


def _deploy_error(serve, app_name: str) -> str | None:
    """The last line of the error Serve recorded for a deployment of the application that failed to deploy
    (a replica's constructor raised: e.g. "dspark.errors.CheckpointError: ..."), or None."""
    app = serve.status().applications.get(app_name)
    for deployment in (app.deployments.values() if app is not None else ()):
        lines = [line for line in (deployment.message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return None


def run(args) -> int:
    """Start (or join) Ray, deploy, print the URL, serve until SIGTERM/SIGINT, then tear down."""
    from dspark.commands.serve import configs_from_args

    local = args.address is None
    model, engine_config, serve_config = configs_from_args(args, local_files=local)
    if local:
        from dspark.commands.serve import check_port_free

        check_port_free(args.host, args.port)
        # Read by Ray at import: a single-machine instance keeps its GCS, raylet and workers on 127.0.0.1.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    serve = import_serve()
    import ray

    app = build_deployment(model, engine_config, serve_config, min_replicas=args.min_replicas,
                           max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
                           max_ongoing_requests=args.max_ongoing_requests,
                           num_cpus_per_replica=args.num_cpus_per_replica,
                           num_gpus_per_replica=args.num_gpus_per_replica, threads=args.threads,
                           drain_timeout_s=args.drain_timeout)
    try:
        if local:
            ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)  # never $RAY_ADDRESS
        else:
            ray.init(address=args.address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = "ray cannot start here" if local else f"cannot connect to the Ray cluster at {args.address}"
        hint = ""
        if "InvalidAuthToken" in str(exc.__cause__):
            hint = ("; the cluster uses token authentication: set RAY_AUTH_MODE=token and give its token "
                    "(~/.ray/auth_token, $RAY_AUTH_TOKEN_PATH or $RAY_AUTH_TOKEN)")
        raise ConfigError(f"{where}: {exc}{hint}") from None
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(app, name=args.app_name, route_prefix="/")
        except RuntimeError as exc:
            raise ConfigError(f"the replicas failed to start: {_deploy_error(serve, args.app_name) or exc}") from None
        print(f"dspark ray serve: {serve_config.served_model_name} ({args.min_replicas}–{args.max_replicas} "
              f"replicas) on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        signum = _wait_for_signal()
        print(f"dspark ray serve: {signal.Signals(signum).name}, shutting down", file=sys.stderr, flush=True)
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(args.app_name)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dspark.serving.ray_app`: exit status 0 after a signal, 2 for a user error."""
    from dspark.cli import one_line

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DSparkError as exc:
        print(f"dspark ray serve: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
