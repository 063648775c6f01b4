"""The HTTP side of the server: a FastAPI application (served by uvicorn, ``llama.server.__main__``).
A route checks the body against its declared model (``llama.server.schemas``), maps it to a ``Job``
(``llama.server.protocol``), submits it to the engine (``llama.server.admission``) and awaits what
the engine's steps produce for it, whole or as server-sent events; the engine runs on its own
thread, which nothing here blocks.

``Gate`` wraps the application: every answer is counted for ``GET /metrics`` and carries the CORS
headers for an allowed origin; it answers CORS preflights, checks the API key, the Content-Type and
the body's size (with a Content-Length or chunked) before a route sees the request. A refused
request's connection is closed. A client that hangs up cancels its request, which frees its slots at
the engine's next step.
"""

import asyncio
import hmac
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import AsyncIterator, Callable, Dict, List, Optional, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llama.engine import RowDelta
from llama.engine.adapters import UnknownAdapter
from llama.layers.quantize import parse_quantize
from llama.server.admission import Scheduler, generation_failed, shutting_down
from llama.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from llama.server.protocol import (
    Job,
    RequestError,
    delta_chunk,
    echoed_prompt,
    logprobs_object,
    may_be_a_call,
    parse_chat,
    parse_completion,
    piece,
    token_triples,
    tool_calls,
    tool_calls_chunk,
    usage_chunk,
    whole_answer,
)
from llama.server.schemas import (
    ChatRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    error_message,
    error_param,
)

logger = logging.getLogger(__name__)

GET_ROUTES = ("/health", "/metrics", "/v1/models")
POST_ROUTES = ("/v1/completions", "/v1/chat/completions")
ADAPTER_ROUTES = {"/v1/load_lora_adapter": LoadAdapterRequest, "/v1/unload_lora_adapter": UnloadAdapterRequest}
BODIES = {"/v1/chat/completions": ChatRequest, **ADAPTER_ROUTES}  # by route; CompletionRequest elsewhere
OPEN_ROUTES = ("/health", "/metrics", "/docs", "/openapi.json")  # no API key needed
FIELDS_BODY_BYTES = 1 << 20  # a body's room for its fields and text prompts, besides prompts of token ids
POLL_SECONDS = 0.1  # how often a waiting whole answer checks whether its client is still there


def make_app(
    llama,
    scheduler: Scheduler,
    model_name: str,
    api_key: Optional[str] = None,
    allowed_origins: Sequence[str] = (),
    quantize: Optional[str] = None,
    adapter_updates: bool = False,
) -> FastAPI:
    """The application serving ``llama`` (tokenizer and limits) through ``scheduler`` as
    ``model_name``; ``api_key``: None for no authentication; ``allowed_origins``: the web origins
    whose pages may call it (CORS; "*" any, empty: none); ``quantize``: how the weights were
    quantized (``Llama.build``'s argument), which ``/v1/models`` says; ``adapter_updates``: LoRA adapters may be
    loaded and unloaded while serving (``add_adapter_routes``)."""
    app = FastAPI(
        title="llama",
        summary="OpenAI's completions and chat completions API for one Llama model",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.metrics = metrics = Metrics(scheduler)
    app.add_middleware(
        Gate,
        metrics=metrics,
        api_key=api_key,
        allowed_origins=frozenset(allowed_origins),
        max_body_bytes=body_limit(llama.model.params),
    )
    app.add_exception_handler(RequestError, lambda request, error: error_response(error))
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, route_error)
    token_bytes = llama.tokenizer.token_bytes

    @app.get("/health")
    async def health() -> dict:
        """200 once the model is loaded and the server listens."""
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        """The server's counters in Prometheus' text format."""
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    served = model_object(model_name, llama, quantize)

    @app.get("/v1/models")
    async def models() -> dict:
        """The model served, what was loaded, and the adapters served per request beside it (vLLM's cards:
        ``parent`` the base model's id, ``root`` the adapter's folder)."""
        return {"object": "list", "data": [served] + adapter_objects(model_name, llama)}

    async def answer(parse: Callable, body, http: Request) -> Response:
        adapter = requested_adapter(body.model, model_name, adapter_names(llama))
        job = await run_in_threadpool(parse, body, llama, model_name)  # tokenizing a long prompt does not hold the loop
        if adapter is not None:  # the rows compute with the adapter the request's model names, and answer as it
            job.model, job.options = adapter, replace(job.options, adapter=adapter)
        request = scheduler.submit(job, asyncio.get_running_loop())
        if job.stream:
            events = stream_events(job, request, token_bytes, metrics, scheduler)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "Connection": "close"}
            )
        return await whole(job, request, http, token_bytes, metrics, scheduler)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, http: Request) -> Response:
        """OpenAI's text completions: the model continues each prompt."""
        return await answer(parse_completion, body, http)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, http: Request) -> Response:
        """OpenAI's chat completions: the assistant's next message, in the model's chat format."""
        return await answer(parse_chat, body, http)

    if adapter_updates:
        add_adapter_routes(app, llama)
    return app


def body_limit(params) -> int:
    """The most bytes a request body may have (beyond it: 413): 1 MiB, and a batch of whole-context
    prompts written as token ids beside it, ``max_batch_size`` x ``max_seq_len`` ids, each as many digits as
    the largest id and ", " (as JSON writers separate them): what lm-eval's server backends send."""
    id_bytes = len(str(params.vocab_size - 1)) + 2
    return FIELDS_BODY_BYTES + params.max_batch_size * params.max_seq_len * id_bytes


def add_adapter_routes(app: FastAPI, llama) -> None:
    """vLLM's routes that load and unload LoRA adapters while serving, each answering 200 with vLLM's line of
    text, or an error naming what is wrong: 400 for an adapter that cannot be served (its folder, its shapes,
    its targets, its rank, its name taken), 404 for unloading one not loaded."""

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_adapter(body: LoadAdapterRequest) -> str:
        """Serve the adapter in ``lora_path`` (peft's files) as the model ``lora_name`` from the next step on."""
        try:  # off the event loop: reading an adapter's files takes a while
            await run_in_threadpool(llama.engine.load_adapter, body.lora_name, body.lora_path)
        except (ValueError, OSError) as error:
            raise RequestError(str(error), "lora_path" if isinstance(error, OSError) else None) from None
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_adapter(body: UnloadAdapterRequest) -> str:
        """Serve ``lora_name`` no more: requests naming it get 404 at once; the answer comes once the requests
        computing with it have ended and it has left the device."""
        try:
            gone = llama.engine.unload_adapter(body.lora_name)
        except UnknownAdapter as error:
            raise RequestError(str(error), "lora_name", 404, "invalid_request_error", "model_not_found") from None
        while not gone.is_set():
            await asyncio.sleep(POLL_SECONDS)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."


def adapter_names(llama) -> List[str]:
    """The adapters served per request."""
    return [] if llama.engine.adapters is None else llama.engine.adapters.names


def model_object(model_name: str, llama, quantize: Optional[str]) -> dict:
    """OpenAI's model object for ``llama`` served as ``model_name``, with keys of its own that OpenAI's
    clients keep as extra fields: ``max_model_len`` (the context, under vLLM's name for it), ``dtype``,
    ``quantization`` (``int8``, ``int4-g64``, ...), ``kv_cache_dtype``, and ``adapter``: the merged LoRA
    adapter's folder name and the sha256 of its files; null where there is none."""
    adapter = None if llama.adapter_dir is None else {"name": Path(llama.adapter_dir).name, "sha256": llama.adapter_id}
    return {
        "id": model_name,
        "object": "model",
        "created": 0,
        "owned_by": "llama",
        "max_model_len": llama.model.params.max_seq_len,
        "dtype": dtype_name(llama.dtype),
        "quantization": str(parse_quantize(quantize)) if quantize is not None else None,
        "kv_cache_dtype": dtype_name(llama.kv_cache_dtype),
        "adapter": adapter,
    }


def requested_adapter(model: Optional[str], model_name: str, adapters: List[str]) -> Optional[str]:
    """The adapter a request's ``model`` names (None: the base model, by its name or left out).

    Raises:
        RequestError: 404 ``model_not_found``, as OpenAI answers, for a model served neither as the base nor as
            an adapter.
    """
    if model is None or model == model_name:
        return None
    if model not in adapters:
        served = ", ".join(repr(name) for name in [model_name, *adapters])
        message = f"The model {model!r} does not exist: this server serves {served}"
        raise RequestError(message, "model", 404, "invalid_request_error", "model_not_found")
    return model


def adapter_objects(model_name: str, llama) -> List[dict]:
    """A model object for each adapter served per request, in vLLM's shape: ``parent`` the base model's id,
    ``root`` the adapter's folder; and the adapter's rank and the sha256 of its files."""
    adapters = llama.engine.adapters
    registered = adapters.registered.items() if adapters is not None else ()
    return [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": "llama",
            "root": adapter.path,
            "parent": model_name,
            "max_model_len": llama.model.params.max_seq_len,
            "adapter": {"rank": adapter.config.rank, "sha256": adapter.identity},
        }
        for name, adapter in registered
    ]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # as --dtype takes it


def error_response(error: RequestError) -> JSONResponse:
    """OpenAI's error body; the connection closes (a refused request's body may be unread)."""
    logger.info("-> %d: %s", error.status, error.message)
    return JSONResponse(error.body(), status_code=error.status, headers={"Connection": "close"})


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """The first failed check of the body, in one line naming its field."""
    first = error.errors()[0]
    loc = first["loc"][1:]  # after "body"
    body = error.body if isinstance(error.body, dict) else {}
    if first["type"] == "json_invalid":
        return error_response(
            RequestError(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
        )
    if not loc:
        return error_response(RequestError(f"the request body must be a JSON object, got {type(error.body).__name__}"))
    model = BODIES.get(request.url.path, CompletionRequest)
    return error_response(RequestError(error_message({**first, "loc": loc}, body, model), error_param(loc)))


async def route_error(request: Request, error: HTTPException) -> JSONResponse:
    """An unknown route (404) or method (405), in OpenAI's error body naming what is served."""
    if error.status_code in (404, 405):
        routes = POST_ROUTES if request.method == "POST" else GET_ROUTES
        message = f"no route {request.method} {request.url.path}; {request.method} serves {list(routes)}"
        return error_response(RequestError(message, status=404, kind="not_found_error"))
    return error_response(RequestError(str(error.detail), status=error.status_code))


class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


async def deltas(job: Job, request, metrics: Metrics, http: Optional[Request] = None) -> AsyncIterator[RowDelta]:
    """The request's row deltas as the engine's steps make them, until every row has ended. With
    ``http`` (a whole answer), raises ``ClientGone`` if the client leaves meanwhile (checked every
    POLL_SECONDS); a stream learns it from its response, which is cancelled. The time to the first
    token and the token counts go to the metrics."""
    while True:
        steps = await request.deltas.get_all(POLL_SECONDS if http is not None else None)
        for step in steps:
            for delta in step or ():
                yield delta
        if steps and steps[-1] is None:
            break
        if http is not None and await http.is_disconnected():
            raise ClientGone()
    if request.first_token_at is not None:
        metrics.observe_time_to_first_token(request.first_token_at - job.accepted)
    metrics.count_tokens(sum(map(len, job.prompt_tokens)), sum(map(len, request.tokens)))


def hung_up(job: Job, request) -> None:
    request.cancel()  # its slots are free at the engine's next step
    logger.info("request %s: the client hung up; rows cancelled after %d tokens", job.id, sum(map(len, request.tokens)))


async def whole(job: Job, request, http: Request, token_bytes, metrics: Metrics, scheduler: Scheduler) -> Response:
    texts: Dict[int, str] = {i: "" for i in range(job.rows)}
    tokens: Dict[int, List] = {i: [] for i in range(job.rows)}
    reasons: Dict[int, str] = {}
    try:
        async for delta in deltas(job, request, metrics, http):
            texts[delta.row] += delta.text
            tokens[delta.row] += token_triples(job, delta)
            if delta.finish_reason is not None:
                reasons[delta.row] = delta.finish_reason
    except (ClientGone, asyncio.CancelledError):
        hung_up(job, request)
        raise
    if "cancelled" in reasons.values() and scheduler.stopping.is_set():
        return error_response(shutting_down())
    if "error" in reasons.values():
        return error_response(generation_failed())
    counts = job.usage(sum(map(len, request.tokens)), request.cached_tokens)
    return JSONResponse(whole_answer(job, texts, reasons, tokens, token_bytes, counts))


async def stream_events(job: Job, request, token_bytes, metrics: Metrics, scheduler: Scheduler) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per choice per step with new text, one with each choice's
    finish reason, the usage if asked, then ``data: [DONE]``. Cancelled when the client hangs up."""
    chunks = StreamChunks(job, token_bytes, scheduler.stopping)
    try:
        async for delta in deltas(job, request, metrics):
            yield b"".join(event(chunk) for chunk in chunks.of(delta))
        if job.include_usage:
            yield event(usage_chunk(job, job.usage(sum(map(len, request.tokens)), request.cached_tokens)))
        yield b"data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        hung_up(job, request)
        raise


def event(chunk: dict) -> bytes:
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class StreamChunks:
    """Turns a request's row deltas into its streamed chunks: the prompt first when echoing, chat's
    role in each choice's first chunk, each token's text offset for completions' logprobs, and the
    server's shutdown (the engine ends every row "cancelled") and a failed step (rows end "error") as
    error chunks. With tools, a choice's text is held back while it may be calls: at its end, calls
    are one chunk of ``delta.tool_calls`` and finish reason "tool_calls"; else the text goes out."""

    def __init__(self, job: Job, token_bytes: Callable[[int], bytes], stopping):
        self.job, self.token_bytes, self.stopping = job, token_bytes, stopping
        self.started = set()
        self.offsets = {i: 0 for i in range(job.rows)}  # each choice's next token's text_offset
        self.held: Dict[int, RowDelta] = {}  # per choice, what is held back while it may be calls
        self.answering = set()  # choices known to be text

    def of(self, delta: RowDelta) -> List[dict]:
        if not self.job.tool_names or delta.row in self.answering:
            return self.text_chunks(delta)
        delta = self.hold(delta)
        if delta.finish_reason is None and may_be_a_call(self.job, delta.text):
            return self.text_chunks(RowDelta(delta.row, "", [], [], [], None)) if delta.row not in self.started else []
        calls = tool_calls(self.job, delta.text, delta.finish_reason)
        if calls is None:
            self.answering.add(delta.row)
            return self.text_chunks(delta)
        chunks = self.text_chunks(RowDelta(delta.row, "", [], [], [], None)) if delta.row not in self.started else []
        return chunks + [
            tool_calls_chunk(self.job, delta.row, calls),
            delta_chunk(self.job, delta.row, "", None, finish_reason="tool_calls"),
        ]

    def hold(self, delta: RowDelta) -> RowDelta:
        """The choice's held delta with ``delta`` added."""
        held = self.held.get(delta.row)
        if held is not None:
            delta = RowDelta(
                delta.row,
                held.text + delta.text,
                held.tokens + delta.tokens,
                held.logprobs + delta.logprobs,
                held.top_logprobs + delta.top_logprobs,
                delta.finish_reason,
            )
        self.held[delta.row] = delta
        return delta

    def text_chunks(self, delta: RowDelta) -> List[dict]:
        job, index, chunks = self.job, delta.row, []
        if delta.text or delta.tokens or index not in self.started:
            first = index not in self.started
            self.started.add(index)
            text = (echoed_prompt(job, index) if first else "") + delta.text
            tokens = token_triples(job, delta)
            logprobs = logprobs_object(job, tokens, self.token_bytes, self.offsets[index])
            self.offsets[index] += sum(len(piece(self.token_bytes, token)) for token, _, _ in tokens)
            chunks.append(delta_chunk(job, index, text, logprobs, first=first))
        if delta.finish_reason == "cancelled" and self.stopping.is_set():
            chunks.append(shutting_down().body())
        elif delta.finish_reason == "error":
            chunks.append(generation_failed().body())
        elif delta.finish_reason is not None:
            chunks.append(delta_chunk(job, index, "", None, finish_reason=delta.finish_reason))
        return chunks


class Gate:
    """ASGI middleware before every route: counts each answer (``metrics``), adds the CORS headers
    for an allowed origin and answers preflights, checks the API key of /v1 routes, and reads a
    POST's body (Content-Type application/json, at most ``max_body_bytes``: ``body_limit``, Content-Length or
    chunked) before the route parses it."""

    def __init__(self, app, metrics: Metrics, api_key: Optional[str], allowed_origins: frozenset, max_body_bytes: int):
        self.app, self.metrics, self.api_key, self.allowed_origins = app, metrics, api_key, allowed_origins
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        method, path = scope["method"], scope["path"]
        origin = self.cors_origin(headers.get("origin"))

        async def counted_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_request(
                    method if method in ("GET", "POST", "OPTIONS") else "other",
                    path if path in GET_ROUTES + POST_ROUTES else "other",
                    message["status"],
                )
                if origin is not None:
                    extra = [(b"access-control-allow-origin", origin.encode())] + (
                        [(b"vary", b"Origin")] if origin != "*" else []
                    )
                    message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        if method == "OPTIONS":
            return await self.preflight(headers, origin, counted_send)
        try:
            self.check_key(path, headers)
            if method == "POST":
                receive = await self.read_body(headers, receive)
        except RequestError as error:
            return await error_response(error)(scope, receive, counted_send)
        await self.app(scope, receive, counted_send)

    def cors_origin(self, origin: Optional[str]) -> Optional[str]:
        """The Access-Control-Allow-Origin value for a request from ``origin``: "*", it, or None."""
        if origin is None or not self.allowed_origins:
            return None
        if "*" in self.allowed_origins:
            return "*"
        return origin if origin in self.allowed_origins else None

    async def preflight(self, headers: dict, origin: Optional[str], send) -> None:
        """A browser's CORS preflight: which methods and headers the page's request may use (no key
        needed: a preflight carries none). Answered for any path; the CORS headers only for an
        allowed origin, so the browser blocks the others."""
        answer = [(b"allow", b"GET, POST, OPTIONS"), (b"content-length", b"0")]
        if origin is not None:
            requested = headers.get("access-control-request-headers") or "Authorization, Content-Type"
            answer += [
                (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                (b"access-control-allow-headers", requested.encode("latin-1")),
                (b"access-control-max-age", b"600"),
            ]
        await send({"type": "http.response.start", "status": 204, "headers": answer})
        await send({"type": "http.response.body", "body": b""})

    def check_key(self, path: str, headers: dict) -> None:
        if self.api_key is None or path in OPEN_ROUTES:
            return
        if not hmac.compare_digest(headers.get("authorization", "").encode(), f"Bearer {self.api_key}".encode()):
            raise RequestError(
                "missing or wrong API key: send 'Authorization: Bearer <key>'", status=401, kind="authentication_error"
            )

    async def read_body(self, headers: dict, receive):
        """The whole body, checked, and a ``receive`` that gives it to the route, then the client's
        later messages (its hang-up)."""
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            got = f"Content-Type {headers['content-type']!r}" if "content-type" in headers else "no Content-Type"
            raise RequestError(
                f"the request body must be JSON sent with 'Content-Type: application/json'; got {got}", status=415
            )
        length, limit = headers.get("content-length"), self.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(f"the request body has {length} bytes; the limit is {limit}", status=413)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestError("the client left before sending its whole body", status=400)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                raise RequestError(f"the request body has more than {limit} bytes, the limit", status=413)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
