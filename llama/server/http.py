"""The HTTP side of the server, on the standard library's ``ThreadingHTTPServer``: one thread per
connection reads the request, checks the key and the body, hands a ``Job`` to the scheduler, and
writes what the decoding thread puts on the job's queue, whole or as server-sent events.

A client that hangs up is noticed while its answer is awaited (its socket reads end-of-file) or
when writing to it fails; its job is marked ``hung_up`` and its rows are cancelled.
"""

import hmac
import json
import logging
import queue
import select
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List

from llama.server.batching import Scheduler
from llama.server.protocol import (
    Job, RequestError, chat_logprobs, completion_logprobs, delta_chunk, parse_chat, parse_completion, usage_chunk,
    whole_answer,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # a request body above 1 MiB is refused (413) before it is read
POLL_SECONDS = 0.1  # how often a waiting handler checks whether its client is still there
READ_TIMEOUT_SECONDS = 30  # a client that stops sending its request mid-way is dropped


class LlamaHTTPServer(ThreadingHTTPServer):
    """Serves one model: ``llama`` (tokenizer and limits), ``scheduler`` (decoding), ``model_name``,
    and ``api_key`` (None: no authentication)."""

    daemon_threads = True

    def __init__(self, address, llama, scheduler: Scheduler, model_name: str, api_key=None):
        super().__init__(address, Handler)
        self.llama, self.scheduler, self.model_name, self.api_key = llama, scheduler, model_name, api_key

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
        if not self.authorized():
            return
        if self.path == "/v1/models":
            model = {"id": self.server.model_name, "object": "model", "created": 0, "owned_by": "llama"}
            return self.send_json(200, {"object": "list", "data": [model]})
        self.send_error_body(RequestError(f"no route GET {self.path}; GET serves /health and /v1/models", status=404, kind="not_found_error"))

    def do_POST(self):
        parsers = {"/v1/completions": parse_completion, "/v1/chat/completions": parse_chat}
        if not self.authorized():
            return
        if self.path not in parsers:
            return self.send_error_body(RequestError(f"no route POST {self.path}; POST serves {sorted(parsers)}", status=404, kind="not_found_error"))
        try:
            body = self.read_json()
            model = body.get("model", self.server.model_name)
            if model != self.server.model_name:
                raise RequestError(f"model {model!r} is not served here; this server serves {self.server.model_name!r}", "model", 404, "not_found_error")
            job = parsers[self.path](body, self.server.llama, self.server.model_name)
            self.server.scheduler.submit(job)
        except RequestError as error:
            return self.send_error_body(error)
        if job.stream:
            self.stream_answer(job)
        else:
            self.whole_answer(job)

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

    def events(self, job: Job):
        """The job's events until it is done; stops (marking the job hung up) if the client leaves."""
        while True:
            try:
                event = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                if client_gone(self.connection):
                    job.hung_up.set()
                    return
                continue
            yield event
            if event[0] in ("done", "error"):
                return

    def whole_answer(self, job: Job) -> None:
        texts: Dict[int, str] = {i: "" for i in range(job.rows)}
        tokens: Dict[int, List] = {i: [] for i in range(job.rows)}
        reasons: Dict[int, str] = {}
        for event in self.events(job):
            if event[0] == "delta":
                _, choice, text, details = event
                texts[choice] += text
                tokens[choice] += details
            elif event[0] == "finish":
                reasons[event[1]] = event[2]
            elif event[0] == "error":
                return self.send_error_body(event[1])
            else:
                self.send_json(200, whole_answer(job, texts, reasons, tokens, self.server.token_bytes, event[1]))

    def stream_answer(self, job: Job) -> None:
        """Server-sent events: a chunk per choice per step with new text, one with each choice's
        finish reason, the usage if asked, then ``data: [DONE]``."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's
        self.end_headers()
        self.close_connection = True
        chunks = StreamChunks(job, self.server.token_bytes)
        try:
            for event in self.events(job):
                for chunk in chunks.of(event):
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            job.hung_up.set()

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


class StreamChunks:
    """Turns a job's events into its streamed chunks: the prompt first when echoing, chat's role in
    each choice's first chunk, and each token's text offset for completions' logprobs."""

    def __init__(self, job: Job, token_bytes: Callable[[int], bytes]):
        self.job, self.token_bytes = job, token_bytes
        self.started = set()
        self.offsets = {i: 0 for i in range(job.rows)}  # characters of each choice's text sent so far

    def of(self, event) -> list:
        job = self.job
        if event[0] == "error":
            return [event[1].body()]
        if event[0] == "done":
            return [usage_chunk(job, event[1])] if job.include_usage else []
        if event[0] == "finish":
            return [delta_chunk(job, event[1], "", None, finish_reason=event[2], first=self.first(event[1]))]
        _, choice, text, details = event
        first = self.first(choice)
        if first and job.echo:
            text = job.prompts[choice // job.sampling.n] + text
        logprobs = None
        if job.sampling.logprobs:
            if job.kind == "chat":
                logprobs = chat_logprobs(details, self.token_bytes)
            else:
                logprobs = completion_logprobs(details, self.token_bytes, self.offsets[choice])
        self.offsets[choice] += len(text)
        return [delta_chunk(job, choice, text, logprobs, first=first)]

    def first(self, choice: int) -> bool:
        is_first = choice not in self.started
        self.started.add(choice)
        return is_first


def client_gone(connection: socket.socket) -> bool:
    """Whether the client closed its end: the socket is readable and reading would return nothing."""
    try:
        readable, _, _ = select.select([connection], [], [], 0)
        return bool(readable) and connection.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True
