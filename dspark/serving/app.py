"""The OpenAI-compatible FastAPI application (docs/serving.md).

    app = build_app(engine, tokenizer, ServeConfig(served_model_name="dspark-builtin"))

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not), GET
/v1/models, /health (no key needed; 503 once the engine is dead) and /metrics (Prometheus text).

A request with n choices (or several prompts) becomes one engine request per choice; a streamed response
sends one chunk per engine step and choice (a speculative step emits several tokens: τ on average), or one
per token with stream_options.token_by_token. A client that disconnects — streaming or not — has its engine
requests aborted at once, which frees their KV pages before the next step. Every client error is a 4xx with
OpenAI's error body (`dspark.serving.errors`); an error after a stream started is one `data:` event with
that body, then the stream ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dspark.data.chat import DEFAULT_TEMPLATE_KWARGS, check_text, encode, render_text
from dspark.decoding.sampling import SamplingParams
from dspark.engine.engine import Engine
from dspark.engine.stats import SpecStats
from dspark.errors import ConfigError, DSparkError
from dspark.serving import protocol
from dspark.serving.engine_loop import EngineLoop, Event
from dspark.serving.errors import APIError
from dspark.serving.metrics import ServerMetrics


@dataclass
class ServeConfig:
    """The HTTP side's limits. api_key: required on every endpoint but /health (None: open); max_body_bytes:
    larger request bodies get 413; max_prompt_tokens: longer prompts get 400 (None: the model's context);
    max_queue: requests accepted beyond those running (then 429); request_timeout_s: a request still running
    after this long is aborted (408 or a stream error event; None: no limit)."""

    served_model_name: str = "dspark"
    api_key: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None
    max_queue: int = 1024
    request_timeout_s: float | None = 600.0
    model_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.served_model_name, str) or not self.served_model_name.strip():
            raise ConfigError("served model name must be a non-empty string")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError("the API key must be a non-empty string")
        for name in ("max_body_bytes", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "max_body_bytes" else 0):
                raise ConfigError(f"{name} must be an integer ≥ {1 if name == 'max_body_bytes' else 0}, got {value!r}")
        if self.max_prompt_tokens is not None and (not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 1):
            raise ConfigError(f"max_prompt_tokens must be an integer ≥ 1, got {self.max_prompt_tokens!r}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ConfigError(f"request timeout must be > 0 seconds, got {self.request_timeout_s!r}")


@dataclass
class Choice:
    """One engine request of an HTTP request: its index among the choices, its prompt and what came back."""

    index: int
    key: tuple
    prompt_ids: list[int]
    first_of_prompt: bool  # choice 0 of its prompt: the one whose prompt tokens `usage` counts
    text: str = ""
    token_ids: list[int] | None = None
    logprobs: list | None = None
    finish_reason: str | None = None
    stats: SpecStats | None = None
    done: bool = False
    started: bool = False  # chat streaming: the role chunk was sent


class Server:
    """What the endpoints share: the engine loop, the tokenizer, limits and metrics."""

    def __init__(self, engine: Engine, tokenizer, config: ServeConfig):
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = ServerMetrics(config.served_model_name)
        self.loop = EngineLoop(engine, self.metrics, max_open=engine.config.max_num_seqs + config.max_queue)
        self.max_context = engine.runner.max_context
        self.vocab_size = engine.runner.config.vocab_size
        self.created = int(time.time())
        self._serial = itertools.count()

    # -- checks ---------------------------------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"the request body has {declared} bytes, more than the limit of {limit}", code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.served_model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                           f"{self.config.served_model_name!r}", param="model", code="model_not_found")

    def check_prompt(self, ids: list[int], max_tokens: int | None, param: str, limit_param: str = "max_tokens") -> int:
        """Prompt length limits → the request's max_new_tokens (default: the rest of the context)."""
        if not ids:
            raise APIError(400, f"{param}: the prompt is empty", param=param)
        if self.config.max_prompt_tokens is not None and len(ids) > self.config.max_prompt_tokens:
            raise APIError(400, f"{param}: the prompt has {len(ids)} tokens, more than the server's limit of "
                           f"{self.config.max_prompt_tokens}", param=param, code="prompt_too_long")
        room = self.max_context - len(ids)
        if max_tokens is None:
            if room < 1:
                raise APIError(400, f"this model's maximum context length is {self.max_context} tokens and the prompt has "
                               f"{len(ids)}: no room to generate", param=param, code="context_length_exceeded")
            return room
        if max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.max_context} tokens; the prompt has "
                           f"{len(ids)} and {limit_param} asks for {max_tokens} more", param=limit_param,
                           code="context_length_exceeded")
        return max_tokens

    # -- prompts --------------------------------------------------------------------------------------
    def chat_prompt(self, req: protocol.ChatCompletionRequest) -> list[int]:
        messages = []
        for i, message in enumerate(req.messages):
            text = check_text(message.text(), f"messages.{i}.content")
            messages.append({"role": "system" if message.role == "developer" else message.role, "content": text})
        rendered = render_text(self.tokenizer, messages, add_generation_prompt=True,
                               template_kwargs=dict(DEFAULT_TEMPLATE_KWARGS), where="messages")
        return encode(self.tokenizer, rendered)

    def completion_prompts(self, req: protocol.CompletionRequest) -> list[list[int]]:
        out = []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, str):
                check_text(prompt, "prompt")
                out.append(list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"]))
            else:
                bad = [t for t in prompt if not 0 <= t < self.vocab_size]
                if bad:
                    raise APIError(400, f"prompt: token ids out of range [0, {self.vocab_size}): {bad[:5]}", param="prompt")
                out.append(list(prompt))
        return out

    # -- generation -----------------------------------------------------------------------------------
    async def start(self, req, prompts: list[list[int]], sink: asyncio.Queue) -> list[Choice]:
        """Queue one engine request per (prompt, choice); abort the ones queued if a later one is refused."""
        try:
            sampling = SamplingParams(temperature=float(req.temperature), top_k=max(req.top_k, 0), top_p=float(req.top_p))
        except DSparkError as exc:
            raise APIError(400, str(exc)) from None
        chat = isinstance(req, protocol.ChatCompletionRequest)
        limit_param = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
        budgets = [self.check_prompt(ids, req.max_new_tokens, "messages" if chat else "prompt", limit_param)
                   for ids in prompts]
        self.loop.check_capacity(len(prompts) * req.n)
        serial = next(self._serial)
        choices = []
        try:
            for p, (ids, budget) in enumerate(zip(prompts, budgets)):
                for j in range(req.n):
                    index = p * req.n + j
                    choice = Choice(index, (serial, index), ids, j == 0)
                    await self.loop.add(choice.key, ids, sink, index, sampling=sampling, max_new_tokens=budget,
                                        stop=req.stop, stop_token_ids=req.stop_token_ids or (), ignore_eos=req.ignore_eos,
                                        seed=None if req.seed is None else (req.seed + index) % (protocol.MAX_SEED + 1),
                                        speculate=req.speculative, logprobs=req.num_logprobs,
                                        text_per_token=req.token_by_token)
                    choices.append(choice)
        except BaseException:
            self.abort(choices)
            raise
        return choices

    def abort(self, choices: list[Choice]) -> None:
        for choice in choices:
            if not choice.done:
                self.loop.abort(choice.key)

    def absorb(self, choices: list[Choice], event: Event) -> Choice:
        """Fold an event into its choice; raise the event's error."""
        if event.error is not None:
            raise event.error
        choice, out = choices[event.tag], event.output
        choice.text += out.new_text or ""
        choice.token_ids = (choice.token_ids or []) + out.new_token_ids
        if out.logprobs is not None:
            choice.logprobs = (choice.logprobs or []) + out.logprobs
        if out.finished:
            choice.done, choice.finish_reason = True, out.finish_reason
            choice.stats = event.request.stats
            self.loop.finished(choice.key)
        return choice

    def usage(self, choices: list[Choice]) -> dict:
        prompt = sum(len(c.prompt_ids) for c in choices if c.first_of_prompt)  # once per prompt, as OpenAI's n
        return protocol.usage(prompt, sum(len(c.token_ids or []) for c in choices))

    @staticmethod
    def spec_report(choices: list[Choice]) -> dict:
        total = SpecStats()
        for choice in choices:
            if choice.stats is not None:
                total.merge(choice.stats)
        return protocol.spec_decode_report(total)

    def deadline(self) -> float | None:
        timeout = self.config.request_timeout_s
        return None if timeout is None else asyncio.get_running_loop().time() + timeout

    def timeout_error(self) -> APIError:
        return APIError(408, f"the request ran longer than the server's timeout of {self.config.request_timeout_s:g} s "
                        "and was aborted", code="request_timeout")


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def build_app(engine: Engine, tokenizer, config: ServeConfig | None = None, *, engine_thread: bool = True) -> FastAPI:
    """The FastAPI app around `engine`, stopped at shutdown; at start-up the app starts stepping it on a new
    thread (`engine_thread`), or — False — only attaches its event loop, and the caller steps it with
    `app.state.server.loop.run_forever()` on a thread of its own (`dspark.serving.engine_loop`: which thread).
    `app.state.server` is the `Server`."""
    server = Server(engine, tokenizer, config or ServeConfig())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if engine_thread:
            server.loop.start(asyncio.get_running_loop())
        else:
            server.loop.attach(asyncio.get_running_loop())
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="dspark", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        return _error_response(APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        return _error_response(APIError(400, str(exc)))

    @app.exception_handler(DSparkError)
    async def _user_error(_request, exc: DSparkError):
        return _error_response(APIError(400, str(exc)))

    @app.exception_handler(Exception)
    async def _server_error(_request, exc: Exception):
        return _error_response(APIError(500, f"internal server error ({type(exc).__name__})", code="internal_error"))

    @app.get("/health")
    async def health():
        if not server.loop.alive:
            raise APIError(503, "the engine is not running" + (f": {server.loop.dead}" if server.loop.dead else ""),
                           code="engine_unavailable")
        return {}

    @app.get("/v1/models")
    async def models(request: Request):
        server.check_key(request)
        return {"object": "list", "data": [{
            "id": server.config.served_model_name, "object": "model", "created": server.created, "owned_by": "dspark",
            "root": server.config.model_path, "max_model_len": server.max_context}]}

    @app.get("/metrics")
    async def metrics(request: Request):
        server.check_key(request)
        server.metrics.snapshot = await server.loop.snapshot()
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(request: Request):
        server.check_key(request)
        req = protocol.parse_body(await server.read_body(request), protocol.CompletionRequest)
        server.check_model(req.model)
        return await _generate(server, request, req, server.completion_prompts(req), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        server.check_key(request)
        req = protocol.parse_body(await server.read_body(request), protocol.ChatCompletionRequest)
        server.check_model(req.model)
        return await _generate(server, request, req, [server.chat_prompt(req)], chat=True)

    return app


async def _generate(server: Server, request: Request, req, prompts: list[list[int]], *, chat: bool):
    sink: asyncio.Queue = asyncio.Queue()
    response_id = req.request_id or f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    choices = await server.start(req, prompts, sink)
    if req.stream:
        return StreamingResponse(_stream(server, req, choices, sink, response_id, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    disconnect = asyncio.ensure_future(_wait_disconnect(request))
    try:
        deadline = server.deadline()
        while not all(c.done for c in choices):
            getter = asyncio.ensure_future(sink.get())
            timeout = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
            done, _ = await asyncio.wait({getter, disconnect}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                if disconnect in done:
                    return Response(status_code=499)  # nobody reads it; the requests are aborted below
                raise server.timeout_error()
            server.absorb(choices, getter.result())
    finally:
        disconnect.cancel()
        server.abort(choices)
    created = int(time.time())
    body = {"id": response_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": server.config.served_model_name,
            "choices": [_final_choice(server, c, chat, req.return_token_ids) for c in choices],
            "usage": server.usage(choices)}
    if req.spec_decode_stats:
        body["speculative_decoding"] = server.spec_report(choices)
    return JSONResponse(body)


def _final_choice(server: Server, choice: Choice, chat: bool, token_ids: bool) -> dict:
    logprobs = None
    ids = choice.token_ids or []
    if choice.logprobs is not None:
        logprobs = (protocol.chat_logprobs(server.tokenizer, ids, choice.logprobs) if chat
                    else protocol.completion_logprobs(server.tokenizer, ids, choice.logprobs, 0))
    if chat:
        out = {"index": choice.index, "message": {"role": "assistant", "content": choice.text},
               "logprobs": logprobs, "finish_reason": choice.finish_reason}
    else:
        out = {"index": choice.index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}
    if token_ids:
        out.update(prompt_token_ids=choice.prompt_ids, token_ids=ids)
    return out


async def _stream(server: Server, req, choices: list[Choice], sink: asyncio.Queue, response_id: str,
                  chat: bool) -> AsyncIterator[bytes]:
    """Server-sent events: chunks, the usage chunk (stream_options.include_usage), then [DONE]."""
    created = int(time.time())
    head = {"id": response_id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": server.config.served_model_name}
    offsets = [0] * len(choices)  # completions logprobs: text offset of the next token
    loop = asyncio.get_running_loop()
    try:
        deadline = server.deadline()
        while not all(c.done for c in choices):
            try:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                event = await asyncio.wait_for(sink.get(), timeout)
            except asyncio.TimeoutError:
                raise server.timeout_error() from None
            choice = server.absorb(choices, event)
            out = event.output
            pieces = out.text_pieces if out.text_pieces is not None else [out.new_text or ""]
            groups = ([[t] for t in out.new_token_ids] if out.text_pieces is not None else [out.new_token_ids])
            entries = out.logprobs
            for g, (text, ids) in enumerate(zip(pieces, groups)):
                last = g == len(groups) - 1
                finish = choice.finish_reason if last and out.finished else None
                if not text and finish is None and entries is None and not req.return_token_ids:
                    continue  # nothing to show yet (an incomplete character, a held-back stop string)
                part = None
                if entries is not None:
                    lp = entries[g: g + 1] if out.text_pieces is not None else entries
                    part = (protocol.chat_logprobs(server.tokenizer, ids, lp) if chat
                            else protocol.completion_logprobs(server.tokenizer, ids, lp, offsets[choice.index]))
                offsets[choice.index] += len(text)
                if chat:
                    delta = {"content": text}
                    if not choice.started:
                        choice.started = True
                        yield _sse(dict(head, choices=[{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                                        "logprobs": None, "finish_reason": None}]))
                    item = {"index": choice.index, "delta": delta, "logprobs": part, "finish_reason": finish}
                else:
                    item = {"index": choice.index, "text": text, "logprobs": part, "finish_reason": finish}
                if req.return_token_ids:
                    item["token_ids"] = ids
                yield _sse(dict(head, choices=[item]))
        if req.include_usage:
            final = dict(head, choices=[], usage=server.usage(choices))
            if req.spec_decode_stats:
                final["speculative_decoding"] = server.spec_report(choices)
            yield _sse(final)
        elif req.spec_decode_stats:
            yield _sse(dict(head, choices=[], speculative_decoding=server.spec_report(choices)))
        yield b"data: [DONE]\n\n"
    except APIError as error:
        yield _sse(error.body())
    finally:
        server.abort(choices)
