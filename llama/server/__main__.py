"""Serve a checkpoint with OpenAI's API: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models`` and ``GET /health``.

    python -m llama.server                                   # the bundled model, http://127.0.0.1:8000
    LLAMA_API_KEY=KEY python -m llama.server --ckpt_dir llama-2-7b-chat/ --served_model_name llama-2-7b-chat
    python -m llama.server --allowed_origins http://localhost:3000   # a web page there may call it
    torchrun --nproc_per_node 8 -m llama.server --ckpt_dir llama-2-70b-chat/ --tokenizer_path tokenizer.model

Also ``GET /metrics`` (Prometheus) and CORS preflights (``OPTIONS``). Requests decode in the slots of
one engine (``llama.engine``): a request starts at the next step if a slot is free, whatever the
others' settings, and waits in a bounded queue otherwise.

The HTTP side is a FastAPI application (``llama.server.app``; its OpenAPI page at ``/docs``) on
uvicorn, on a thread of its own; the engine runs on the main thread. The port is bound before the
model loads, so a port in use is reported at once. Under torchrun rank 0 serves HTTP and decides
each step; every other rank follows the engine's broadcasts. SIGTERM or Ctrl-C stops accepting,
lets running requests finish for up to ``--shutdown_timeout`` seconds, cancels what remains (a 503
or an error chunk), and every rank exits.
"""

import errno
import logging
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Optional, Tuple

# OpenMP's waiting threads sleep instead of spinning (docs/performance.md): set before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch.distributed as dist
import uvicorn

from llama.cli import check_speculation_flags, load_line, run
from llama.distributed import init_distributed, is_main_process, launched_as_rank0, resolve_device, set_threads
from llama.engine import ADMISSIONS, Engine
from llama.generation import Llama
from llama.server.app import make_app
from llama.server.context import default_context
from llama.server.admission import Scheduler
from llama.server.schemas import MAX_TOP_LOGPROBS
from llama.tokenizer import resolve_tokenizer_path

logger = logging.getLogger("llama.server")

BUNDLED = Path(__file__).resolve().parent.parent.parent / "checkpoints" / "tiny-stdlib"
API_KEY_ENV = "LLAMA_API_KEY"
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s]+")  # scheme://host[:port], as a browser's Origin header writes it


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    max_seq_len: Optional[int] = None,
    max_batch_size: int = 8,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    served_model_name: Optional[str] = None,
    allowed_origins: Optional[str] = None,
    max_queue: int = 64,
    admission: str = "continuous",
    prefill_chunk: int = 256,
    heartbeat_seconds: float = 10.0,
    threads: Optional[int] = None,
    speculate: Optional[str] = None,
    speculate_k: int = 4,
    draft_ckpt_dir: Optional[str] = None,
    draft_quantize: Optional[str] = None,
    adapter_dir: Optional[str] = None,
    shutdown_timeout: float = 10.0,
    kv_cache_tokens: Optional[int] = None,
    no_prefix_cache: bool = False,
):
    """Serve a checkpoint with OpenAI's HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /health), on one process or under torchrun.

    Args:
        ckpt_dir: the checkpoint folder (Meta's layout or a Hugging Face folder); default: the bundled checkpoints/tiny-stdlib
        max_seq_len: the context length in tokens, prompt and answer together; default: the checkpoint's
            (config.json's max_position_embeddings or params.json's max_seq_len, else what Meta released such a
            checkpoint with) and at least 512, capped so that --max_batch_size rows of KV cache fit in half the
            memory the weights leave, or to --kv_cache_tokens; logged at start
        max_batch_size: the engine's slots: the most rows decoded together; a request for n samples of p prompts takes n * p rows
        compile: compile the engine's decode step (torch.compile), every graph a request can need, before /health answers (logged: seconds to a minute for each batch width)
        host: the address to listen on
        port: the port to listen on; 0 picks a free one, logged at start
        api_key: if given, every /v1 request needs the header "Authorization: Bearer <api_key>"; default: the environment variable LLAMA_API_KEY (a flag is visible to every user in ps)
        served_model_name: the model's id in /v1/models and in requests; default: the checkpoint folder's name
        allowed_origins: web origins whose pages may call the server (CORS), comma-separated (https://app.example.com,http://localhost:3000) or * for any; default: none
        max_queue: the most requests waiting while every slot is taken; beyond it a request is answered 503
        admission: continuous (a request starts at the next step in free slots) or static (only into an empty batch, as a server without continuous batching; kept to measure the difference)
        prefill_chunk: the most prompt tokens prefilled in one step while other rows decode: a long prompt delays them by one chunk's time per step
        heartbeat_seconds: under torchrun, how often an idle rank 0 tells the others it is alive
            (well below the process group's 30-minute timeout)
        shutdown_timeout: after SIGTERM or Ctrl-C, how many seconds running requests may take to finish before they are cancelled
    The other flags are described in llama.cli.FLAG_HELP.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not isinstance(heartbeat_seconds, (int, float)) or not 0 < heartbeat_seconds < 600:
        raise ValueError(f"--heartbeat_seconds must be a number in (0, 600), well below the process group's timeout; got {heartbeat_seconds!r}")
    if admission not in ADMISSIONS:
        raise ValueError(f"--admission must be one of {ADMISSIONS}, got {admission!r}")
    if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1:
        raise ValueError(f"--prefill_chunk must be a positive integer, got {prefill_chunk!r}")
    if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 0:
        raise ValueError(f"--max_queue must be a non-negative integer, got {max_queue!r}")
    origins = parse_origins(allowed_origins)
    api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if served_model_name is not None and (not isinstance(served_model_name, str) or not served_model_name.strip()):
        raise ValueError(f"--served_model_name must be a non-empty name, got {served_model_name!r}")
    check_speculation_flags(speculate, speculate_k, draft_ckpt_dir)
    if not isinstance(shutdown_timeout, (int, float)) or isinstance(shutdown_timeout, bool) or not 0 <= shutdown_timeout <= 3600:
        raise ValueError(f"--shutdown_timeout must be a number of seconds in [0, 3600], got {shutdown_timeout!r}")
    listener = listen(host, port) if launched_as_rank0() else None  # before the model: a port in use fails fast
    set_threads(threads)
    ckpt_dir = str(BUNDLED) if ckpt_dir is None else ckpt_dir
    tokenizer_path = resolve_tokenizer_path(ckpt_dir, tokenizer_path)
    device = resolve_device(device)
    init_distributed(device)  # before the context is chosen: the ranks agree on it
    if max_seq_len is None:
        max_seq_len, why = default_context(ckpt_dir, tokenizer_path, max_batch_size, kv_cache_tokens, device, dtype,
                                           quantize, draft_ckpt_dir, draft_quantize)
        logger.info("max_seq_len %d: %s", max_seq_len, why)
    start = time.perf_counter()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype, quantize=quantize,
                        draft_ckpt_dir=draft_ckpt_dir, draft_quantize=draft_quantize, adapter_dir=adapter_dir,
                        kv_cache_tokens=kv_cache_tokens, time_threads=threads is None)
    llama.engine = engine = Engine(  # the server's policy
        llama.model, llama.tokenizer, compile, admission, prefill_chunk, heartbeat_seconds, llama.engine.draft,
        prefix_cache=not no_prefix_cache, cache_salt=f"{ckpt_dir} {quantize} {llama.adapter_id}",
    )
    logger.info(load_line(ckpt_dir, tokenizer_path, llama, time.perf_counter() - start, quantize))
    engine.warm_up(MAX_TOP_LOGPROBS, speculate_k if speculate else None)  # on every rank: no request waits for a compile
    engine.constraints.check(None, json_object=True)  # the vocabulary grammars read, built before the first JSON request
    if not is_main_process():
        for signum in (signal.SIGINT, signal.SIGTERM):  # rank 0 ends the followers: it broadcasts the shutdown
            signal.signal(signum, signal.SIG_IGN)
        engine.follow()
        logger.info("rank %d: the server shut down", dist.get_rank())
        return
    speculation = None
    if speculate is not None:
        speculation = dict(speculate=speculate, speculate_k=speculate_k)
        logger.info("speculative decoding for every request: %s, %d token(s) proposed per step", speculate, speculate_k)
    scheduler = Scheduler(engine, max_queue, speculation)
    app = make_app(llama, scheduler, served_model_name or Path(ckpt_dir).name, api_key, origins, quantize)
    serve(app, scheduler, listener, served_model_name or Path(ckpt_dir).name, shutdown_timeout)


def parse_origins(allowed_origins: Optional[str]) -> Tuple[str, ...]:
    """--allowed_origins as a tuple of origins, each checked."""
    if allowed_origins is None:
        return ()
    if not isinstance(allowed_origins, str):
        raise ValueError(f"--allowed_origins must be origins separated by commas, or '*', got {allowed_origins!r}")
    origins = tuple(origin.strip() for origin in allowed_origins.split(","))
    for origin in origins:
        if origin != "*" and not ORIGIN.fullmatch(origin):
            raise ValueError(f"--allowed_origins: {origin!r} is not an origin: expected '*' or scheme://host[:port], e.g. http://localhost:3000, with no path")
    return origins


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening (uvicorn listens on it).

    Raises:
        ValueError: the port is not in [0, 65535], the host is unknown, or the address is taken.
    """
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be an integer in [0, 65535] (0 picks a free one), got {port!r}")
    if not isinstance(host, str):
        raise ValueError(f"--host must be an address or a host name, got {host!r}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as error:
        raise ValueError(f"--host {host}: {error.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port}: {host}:{port} is already in use (another server?); choose another --port, or 0 for a free one") from None
        raise ValueError(f"--host {host} --port {port}: cannot listen there: {error.strerror}") from None
    return sock


def serve(app, scheduler: Scheduler, listener: socket.socket, model_name: str, shutdown_timeout: float) -> None:
    """HTTP on a background thread (uvicorn's event loop); decoding on this one, which owns the
    model and the signals. A signal stops uvicorn (it stops accepting, waits up to
    ``shutdown_timeout`` for running answers, then cancels them), and then the engine."""
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout, backlog=2048, lifespan="off")
    server = uvicorn.Server(config)

    def stop(*_):
        if scheduler.stopping.is_set():  # a second Ctrl-C: no grace
            server.force_exit = True
        scheduler.refuse()
        server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)

    def run_http():
        try:
            server.run(sockets=[listener])
        finally:
            scheduler.stop()  # what still runs ends "cancelled"

    http_thread = threading.Thread(target=run_http, name="http", daemon=True)
    http_thread.start()
    while not server.started and http_thread.is_alive():
        time.sleep(0.01)
    host, port = listener.getsockname()[:2]
    logger.info("serving %s on http://%s:%d", model_name, host, port)
    try:
        scheduler.run()
    finally:
        server.should_exit = True
        http_thread.join(timeout=shutdown_timeout + 5)
        logger.info("server stopped")


if __name__ == "__main__":
    run(main)
