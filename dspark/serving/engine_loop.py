"""The engine on its own thread, fed by asyncio (docs/serving.md "Threads").

The event loop never runs a model forward: HTTP handlers send commands (add, abort, snapshot, stop) to the
engine's thread through a queue, and the thread — the only one that touches the `Engine` — runs them between
two steps, then steps while any request is unfinished, and sleeps on the queue when none is. Each step's
outputs go back to the event loop in one `call_soon_threadsafe` call, which puts every output on its
request's asyncio queue as an `Event`.

Which thread: `dspark serve` runs the engine on the main thread — the one that loaded the models — and the
event loop on another (`run_forever`). PyTorch's CPU kernels parallelise with OpenMP, and libgomp keeps one
team of worker threads per thread that starts parallel regions; a second such thread makes more OpenMP
threads than cores, and libgomp then stops its workers spinning between regions: on the 2-core CPU a model
step ran 1.7× slower on a fresh thread than on the thread that had loaded the model (docs/benchmarks.md
"HTTP serving"). `start` (a new thread) is for embedding the app elsewhere (tests, Ray Serve).

If a step fails (a bug, or non-finite logits), the engine is dead: every open request gets an error event,
new requests are refused, and /health answers 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from dspark.engine.engine import Engine, RequestOutput
from dspark.engine.request import Request
from dspark.errors import DSparkError, RequestError
from dspark.serving.errors import APIError
from dspark.serving.metrics import ServerMetrics


@dataclass
class Event:
    """What a request's queue receives: an engine output (`output`, with the finished `request` on the last
    one), or an error (`error`, the request is over)."""

    tag: Any
    output: RequestOutput | None = None
    request: Request | None = None
    error: APIError | None = None


class EngineLoop:
    """`Engine` stepping in a daemon thread. max_open: requests accepted at once (running + queued); one more
    is refused with 429."""

    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None, *, max_open: int = 1024):
        self.engine = engine
        self.metrics = metrics
        self.max_open = max_open
        self.dead: str | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sinks: dict[Any, tuple[asyncio.Queue, Any, Request]] = {}  # engine thread: request id → (queue, tag, request)
        self._last_output: dict[Any, float] = {}
        self._open: set = set()  # event-loop thread: ids submitted and not yet finished or aborted
        self._stopping = False
        self._ended = False
        self._attached = threading.Event()

    # -- event-loop side -------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Step the engine on a new daemon thread, delivering to `loop`."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="dspark-engine", daemon=True)
        self._thread.start()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Deliver to `loop`; the engine is (or will be) stepped by `run_forever` on another thread."""
        self._loop = loop
        self._attached.set()

    def run_forever(self) -> None:
        """Step the engine on the calling thread until `stop` (after `attach` from the event loop's thread)."""
        self._thread = threading.current_thread()
        self._attached.wait()
        self._run()

    @property
    def alive(self) -> bool:
        return self.dead is None and self._thread is not None and self._thread.is_alive() and not self._ended

    @property
    def num_open(self) -> int:
        return len(self._open)

    def check_capacity(self, count: int) -> None:
        """APIError 503 when the engine is dead or stopping, 429 (Retry-After) when `count` more requests would
        exceed max_open."""
        if not self.alive or self._stopping:
            raise APIError(503, "the engine is not running" + (f" ({self.dead})" if self.dead else ""),
                           code="engine_unavailable")
        if len(self._open) + count > self.max_open:
            raise APIError(429, f"the server's queue is full ({len(self._open)} requests open, at most {self.max_open}); "
                           "retry later", code="queue_full", headers={"Retry-After": "1"})

    async def add(self, request_id, prompt_ids: list[int], sink: asyncio.Queue, tag: Any, **kwargs) -> Request:
        """Queue a request on the engine; its events go to `sink` tagged `tag`. APIError 400 for a request the
        engine refuses (RequestError), 429/503 as `check_capacity`."""
        self.check_capacity(1)
        self._open.add(request_id)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("add", (request_id, prompt_ids, sink, tag, kwargs), future))
        if self._ended:  # the loop ended after the capacity check: nobody will run the command
            self._refuse_pending()
        try:
            return await asyncio.wrap_future(future)
        except RequestError as exc:
            self._open.discard(request_id)
            raise APIError(400, str(exc), code="invalid_request") from None
        except BaseException:
            self.abort(request_id)
            raise

    def abort(self, request_id) -> None:
        """Abort a request (client gone, timeout); its KV pages are freed before the next step. Idempotent."""
        if request_id in self._open:
            self._open.discard(request_id)
            self._commands.put(("abort", request_id, None))

    def finished(self, request_id) -> None:
        """The handler saw the request's last event."""
        self._open.discard(request_id)

    async def snapshot(self) -> dict:
        """Engine statistics taken between two steps (`Engine.stats`); the last one when the engine is dead."""
        if not self.alive:
            return self.engine.stats().to_dict()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("snapshot", None, future))
        if self._ended:
            self._refuse_pending()
        try:
            return await asyncio.wrap_future(future)
        except APIError:
            return self.engine.stats().to_dict()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort every open request and end the thread (idempotent)."""
        self._stopping = True
        if self._thread is not None and self._thread.is_alive() and not self._ended:
            self._commands.put(("stop", None, None))
            # Join an engine thread of our own; never the main thread (`run_forever`: it returns after the HTTP
            # thread that calls this has ended, so waiting for it here would wait for ourselves).
            if self._thread is not threading.current_thread() and self._thread is not threading.main_thread():
                self._thread.join(timeout)

    def draining(self) -> None:
        """Refuse new requests from now on (SIGTERM); the open ones run to their end."""
        self._stopping = True

    # -- engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not self._run_commands(block=not engine.has_unfinished()):
                    break
                if engine.has_unfinished():
                    outputs = engine.step()
                    self._publish(outputs)
        except Exception as exc:  # a failed step leaves the engine's state unknown: stop serving
            detail = str(exc) if isinstance(exc, DSparkError) else f"{type(exc).__name__}: {exc}"
            self.dead = f"engine step failed: {detail}"
            traceback.print_exc()
            error = APIError(500, self.dead, code="engine_dead")
            events = [(sink, Event(tag, error=error)) for sink, tag, _ in self._sinks.values()]
            self._sinks.clear()
            self._send(events)
        finally:
            for request_id in list(self._sinks):
                engine.abort(request_id)
            self._sinks.clear()
            self._ended = True
            self._refuse_pending()

    def _refuse_pending(self) -> None:
        """After the loop ended: answer every command still queued, so no handler waits for ever."""
        error = APIError(503, "the engine is not running" + (f" ({self.dead})" if self.dead else ""),
                         code="engine_unavailable")
        while True:
            try:
                kind, _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future is not None and not future.done():
                future.set_exception(error)

    def _run_commands(self, block: bool) -> bool:
        """Run the queued commands; wait for one first when `block`. False on "stop"."""
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, payload, future = command
            if kind == "stop":
                return False
            if kind == "add":
                request_id, prompt_ids, sink, tag, kwargs = payload
                try:
                    request = self.engine.add_request(request_id, prompt_ids, **kwargs)
                except Exception as exc:
                    future.set_exception(exc)
                else:
                    self._sinks[request_id] = (sink, tag, request)
                    future.set_result(request)
            elif kind == "abort":
                if self._sinks.pop(payload, None) is not None:
                    self.engine.abort(payload)
                    self._last_output.pop(payload, None)
                    if self.metrics is not None:
                        self.metrics.success.labels(self.metrics.model_name, "abort").inc()
            elif kind == "snapshot":
                try:
                    future.set_result(self.engine.stats().to_dict())
                except Exception as exc:
                    future.set_exception(exc)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _publish(self, outputs: list[RequestOutput]) -> None:
        now = time.perf_counter()
        metrics = self.metrics
        events = []
        for out in outputs:
            entry = self._sinks.get(out.request_id)
            if entry is None:
                continue
            sink, tag, request = entry
            if metrics is not None and out.new_token_ids:
                metrics.generation_tokens.inc(len(out.new_token_ids))
                last = self._last_output.get(out.request_id)
                if last is None:
                    metrics.ttft.observe(now - request.arrival_time)
                else:
                    metrics.itl.observe(now - last)
                self._last_output[out.request_id] = now
            if out.finished:
                self._sinks.pop(out.request_id, None)
                self._last_output.pop(out.request_id, None)
                if metrics is not None:
                    metrics.observe_request(request, now)
            events.append((sink, Event(tag, output=out, request=request if out.finished else None)))
        if metrics is not None and self.engine.last_step:
            metrics.verify_per_step.observe(self.engine.last_step["verified_drafts"])
        self._send(events)

    def _send(self, events: list) -> None:
        if events and self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # the event loop closed meanwhile (shutdown)
                pass


def _deliver(events: list) -> None:
    for sink, event in events:
        sink.put_nowait(event)
