"""The HTTP side of the server, on the standard library's ``ThreadingHTTPServer``: one thread per
connection reads the request, checks the key and the body, hands a ``Job`` to the scheduler, and
writes what the engine's steps produce for it, whole or as server-sent events. Every answer carries
the CORS headers for an allowed origin, and is counted for ``GET /metrics``.

A client that hangs up is noticed while its answer is awaited (its socket reads end-of-file) or
when writing to it fails; its request is cancelled, which frees its slots at the engine's next step.
"""

import hmac
import json
import logging
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from llama.engine import Request, RowDelta
from llama.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from llama.server.metrics import Metrics
from llama.server.protocol import (
    Job, RequestError, delta_chunk, echoed_prompt, logprobs_object, parse_chat, parse_completion, token_triples, usage_chunk,
    whole_answer,
)
from llama.server.scheduler import Scheduler, generation_failed, shutting_down

logger = logging.getLogger(__name__)

GET_ROUTES = ("/health", "/metrics", "/v1/models")
POST_ROUTES = ("/v1/completions", "/v1/chat/completions")
MAX_BODY_BYTES = 1 << 20  # a request body above 1 MiB is refused (413) before it is read
POLL_SECONDS = 0.1  # how often a waiting handler checks whether its client is still there
READ_TIMEOUT_SECONDS = 30  # a client that stops sending its request mid-way is dropped


class LlamaHTTPServer(ThreadingHTTPServer):
    """Serves one model: ``llama`` (tokenizer and limits), ``scheduler`` (decoding), ``model_name``
    (the id clients send), ``api_key`` (None: no authentication), and ``allowed_origins``: the web
    origins whose pages may call it (CORS; "*" any, empty: none)."""

    daemon_threads = True

    def __init__(self, address, llama, scheduler: Scheduler, model_name: str, api_key: Optional[str] = None,
                 allowed_origins: Sequence[str] = ()):
        super().__init__(address, Handler)
        self.llama, self.scheduler, self.model_name, self.api_key = llama, scheduler, model_name, api_key
        self.allowed_origins = frozenset(allowed_origins)
        self.metrics = Metrics()

    def token_bytes(self, token: int) -> bytes:
        """A token's own UTF-8 bytes, its leading space kept (``Tokenizer.token_bytes``)."""
        return self.llama.tokenizer.token_bytes(token)


class Handler(BaseHTTPRequestHandler):
    server: LlamaHTTPServer
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT_SECONDS
    disable_nagle_algorithm = True  # headers and body go out as two writes: without this, the second waits ~40 ms for an ACK

    def log_message(self, format, *args):
        logger.debug("%s %s", self.address_string(), format % args)

    def do_GET(self):
        if self.path == "/health":
            return self.send_json(200, {"status": "ok"})
        if self.path == "/metrics":
            return self.send_metrics()
        if not self.authorized():
            return
        if self.path == "/v1/models":
            model = {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "llama"}
            return self.send_json(200, {"object": "list", "data": [model]})
        self.send_error_body(RequestError(f"no route GET {self.path}; GET serves {list(GET_ROUTES)}", status=404, kind="not_found_error"))

    def do_OPTIONS(self):
        """A browser's CORS preflight: which methods and headers the page's request may use (no key
        needed: a preflight carries none). Answered for any path; the CORS headers only for an
        allowed origin, so the browser blocks the others."""
        self.send_response(204)
        self.send_header("Allow", "GET, POST, OPTIONS")
        if self.cors_origin():
            self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", self.headers.get("Access-Control-Request-Headers") or "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def cors_origin(self) -> Optional[str]:
        """The Access-Control-Allow-Origin value for this request: "*", its Origin, or None."""
        origin, allowed = self.headers.get("Origin"), self.server.allowed_origins
        if origin is None or not allowed:
            return None
        if "*" in allowed:
            return "*"
        return origin if origin in allowed else None

    def send_response(self, code, message=None):
        """Every answer (errors included) is counted for /metrics here."""
        method, path = getattr(self, "command", None), getattr(self, "path", None)  # unset for a malformed request line
        self.server.metrics.count_request(
            method if method in ("GET", "POST", "OPTIONS") else "other", path if path in GET_ROUTES + POST_ROUTES else "other", code
        )
        super().send_response(code, message)

    def end_headers(self):
        """Every answer (errors included) carries the CORS headers for an allowed origin."""
        origin = self.cors_origin()
        if origin is not None:
            self.send_header("Access-Control-Allow-Origin", origin)
            if origin != "*":
                self.send_header("Vary", "Origin")
        super().end_headers()

    def send_metrics(self) -> None:
        scheduler = self.server.scheduler
        data = self.server.metrics.render(
            scheduler.queue_length(), scheduler.running_slots(), scheduler.slots, scheduler.compiled_graphs(), scheduler.engine.pool_use()
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", METRICS_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        parsers = dict(zip(POST_ROUTES, (parse_completion, parse_chat)))
        if not self.authorized():
            return
        if self.path not in parsers:
            return self.send_error_body(RequestError(f"no route POST {self.path}; POST serves {list(POST_ROUTES)}", status=404, kind="not_found_error"))
        try:
            body = self.read_json()
            model = body.get("model", self.server.model_name)
            if model != self.server.model_name:
                raise RequestError(f"model {model!r} is not served here; this server serves {self.server.model_name!r}", "model", 404, "not_found_error")
            job = parsers[self.path](body, self.server.llama, self.server.model_name)
            request = self.server.scheduler.submit(job)
        except RequestError as error:
            return self.send_error_body(error)
        try:
            if job.stream:
                self.stream_answer(job, request)
            else:
                self.whole_answer(job, request)
        except ClientGone:
            request.cancel()  # its slots are free at the engine's next step
            logger.info("request %s: the client hung up; rows cancelled after %d tokens", job.id, sum(map(len, request.tokens)))

    def authorized(self) -> bool:
        key = self.server.api_key
        if key is None or hmac.compare_digest(self.headers.get("Authorization", "").encode(), f"Bearer {key}".encode()):
            return True
        self.send_error_body(RequestError("missing or wrong API key: send 'Authorization: Bearer <key>'", status=401, kind="authentication_error"))
        return False

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("a request body with a Content-Length header is required", status=411)
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(f"the request body has {length} bytes; the limit is {MAX_BODY_BYTES}", status=413)
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(f"the request body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def deltas(self, job: Job, request: Request) -> Iterator[RowDelta]:
        """The request's row deltas as the engine's steps make them, until every row has ended.
        Raises ``ClientGone`` if the client leaves meanwhile (checked after each step, and every
        POLL_SECONDS while none comes). The time to the first step's news and the token counts go
        to the metrics."""
        first = True
        while True:
            try:
                for step in request.updates(timeout=POLL_SECONDS):
                    if first:
                        self.server.metrics.observe_time_to_first_token(time.monotonic() - job.accepted)
                        first = False
                    yield from step
                    if client_gone(self.connection):
                        raise ClientGone()
                break
            except TimeoutError:
                if client_gone(self.connection):
                    raise ClientGone() from None
        self.server.metrics.count_tokens(sum(map(len, job.prompt_tokens)), sum(map(len, request.tokens)))

    def whole_answer(self, job: Job, request: Request) -> None:
        texts: Dict[int, str] = {i: "" for i in range(job.rows)}
        tokens: Dict[int, List] = {i: [] for i in range(job.rows)}
        reasons: Dict[int, str] = {}
        for delta in self.deltas(job, request):
            texts[delta.row] += delta.text
            tokens[delta.row] += token_triples(delta)
            if delta.finish_reason is not None:
                reasons[delta.row] = delta.finish_reason
        if "cancelled" in reasons.values() and self.server.scheduler.stopping.is_set():
            return self.send_error_body(shutting_down())
        if "error" in reasons.values():
            return self.send_error_body(generation_failed())
        counts = job.usage(sum(map(len, request.tokens)), request.cached_tokens)
        self.send_json(200, whole_answer(job, texts, reasons, tokens, self.server.token_bytes, counts))

    def stream_answer(self, job: Job, request: Request) -> None:
        """Server-sent events: a chunk per choice per step with new text, one with each choice's
        finish reason, the usage if asked, then ``data: [DONE]``."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's
        self.end_headers()
        self.close_connection = True
        chunks = StreamChunks(job, self.server.token_bytes, self.server.scheduler.stopping)
        try:
            for delta in self.deltas(job, request):
                self.send_events(chunks.of(delta))
            self.send_events([usage_chunk(job, job.usage(sum(map(len, request.tokens)), request.cached_tokens))] if job.include_usage else [])
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            raise ClientGone() from None

    def send_events(self, chunks: List[dict]) -> None:
        for chunk in chunks:
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.flush()

    def send_json(self, status: int, body: dict, close: bool = False) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def send_error_body(self, error: RequestError) -> None:
        """The error, and the connection closed: a refused request's body may be left unread, and
        would otherwise be read as the next request."""
        logger.info("%s %s -> %d: %s", self.command, self.path, error.status, error.message)
        self.send_json(error.status, error.body(), close=True)


class ClientGone(Exception):
    """The client closed its connection before its answer was complete."""


class StreamChunks:
    """Turns a request's row deltas into its streamed chunks: the prompt first when echoing, chat's
    role in each choice's first chunk, each token's text offset for completions' logprobs, and the
    server's shutdown (the engine ends every row "cancelled") and a failed step (rows end "error") as
    error chunks."""

    def __init__(self, job: Job, token_bytes: Callable[[int], bytes], stopping: threading.Event):
        self.job, self.token_bytes, self.stopping = job, token_bytes, stopping
        self.started = set()
        self.offsets = {i: 0 for i in range(job.rows)}  # characters of each choice's text sent so far

    def of(self, delta: RowDelta) -> List[dict]:
        job, index, chunks = self.job, delta.row, []
        if delta.text or delta.tokens or index not in self.started:
            first = index not in self.started
            self.started.add(index)
            text = (echoed_prompt(job, index) if first else "") + delta.text
            logprobs = logprobs_object(job, token_triples(delta), self.token_bytes, self.offsets[index])
            self.offsets[index] += len(text)
            chunks.append(delta_chunk(job, index, text, logprobs, first=first))
        if delta.finish_reason == "cancelled" and self.stopping.is_set():
            chunks.append(shutting_down().body())
        elif delta.finish_reason == "error":
            chunks.append(generation_failed().body())
        elif delta.finish_reason is not None:
            chunks.append(delta_chunk(job, index, "", None, finish_reason=delta.finish_reason))
        return chunks


def client_gone(connection: socket.socket) -> bool:
    """Whether the client closed its end: the socket is readable and reading would return nothing."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True
