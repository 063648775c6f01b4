"""Serve a checkpoint with OpenAI's API: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models`` and ``GET /health``.

    python -m llama.server                                   # the bundled model, http://127.0.0.1:8000
    LLAMA_API_KEY=KEY python -m llama.server --ckpt_dir llama-2-7b-chat/ --served_model_name llama-2-7b-chat
    python -m llama.server --allowed_origins http://localhost:3000   # a web page there may call it
    python -m llama.server --lora_modules sql=out/sql poems=out/poems   # a request's model names an adapter
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

import argparse
import errno
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# OpenMP's waiting threads sleep instead of spinning (docs/performance.md): set before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch.distributed as dist
import uvicorn

from llama.cli import add_flags, check_speculation_flags, load_line, options_from, run_parser
from llama.distributed import init_distributed, is_main_process, launched_as_rank0, resolve_device, set_threads
from llama.generation import Llama
from llama.options import EngineOptions, LoadOptions
from llama.server.admission import Scheduler
from llama.server.app import make_app
from llama.server.context import default_context
from llama.server.schemas import MAX_TOP_LOGPROBS
from llama.tokenizer import resolve_tokenizer_path

logger = logging.getLogger("llama.server")

BUNDLED = Path(__file__).resolve().parent.parent.parent / "checkpoints" / "tiny-stdlib"
API_KEY_ENV = "LLAMA_API_KEY"
ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s]+")  # scheme://host[:port], as a browser's Origin header writes it


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llama.server",
        description=(
            "Serve a checkpoint with OpenAI's HTTP API (/v1/completions, /v1/chat/completions, /v1/models, "
            "/health), on one process or under torchrun."
        ),
    )
    add_flags(
        parser,
        "ckpt_dir",
        "tokenizer_path",
        "device",
        "dtype",
        "quantize",
        "adapter_dir",
        "max_seq_len",
        "max_batch_size",
        "kv_cache_tokens",
        "kv_cache_dtype",
        "prefix_cache",
        "compile",
        "admission",
        "prefill_chunk",
        "heartbeat_seconds",
        "speculate",
        "speculate_k",
        "draft_ckpt_dir",
        "draft_quantize",
        "max_loras",
        "max_lora_rank",
        "threads",
        ckpt_dir={
            "help": "the checkpoint folder (Meta's layout or a Hugging Face folder); default: the bundled "
            "checkpoints/tiny-stdlib"
        },
        max_seq_len={
            "default": None,
            "help": (
                "the context length in tokens, prompt and answer together; default: the checkpoint's (config.json's "
                "max_position_embeddings or params.json's max_seq_len, else what Meta released such a checkpoint with) "
                "and at least 512, capped so that --max_batch_size rows of KV cache fit in half the memory the weights "
                "leave, or to --kv_cache_tokens; logged at start"
            ),
        },
        max_batch_size={
            "help": "the engine's slots: the most rows decoded together; a request for n samples of p "
            "prompts takes n * p rows"
        },
        compile={
            "help": "compile the engine's decode step (torch.compile), every graph a request can need, before "
            "/health answers (logged: seconds to a minute for each batch width)"
        },
    )
    add_adapter_flags(parser)
    add_serving_flags(parser)
    return parser


def add_adapter_flags(parser: argparse.ArgumentParser) -> None:
    """The adapters served per request (beside ``--max_loras`` and ``--max_lora_rank``, the engine's)."""
    parser.add_argument(
        "--lora_modules",
        nargs="+",
        default=None,
        metavar="NAME=DIR",
        help=(
            "LoRA adapters in peft's format served per request beside the base model: a request's model names one "
            '(/v1/models lists them, with the base as their parent); or vLLM\'s JSON form {"name": NAME, "path": '
            'DIR, "base_model_name": the served model}'
        ),
    )
    parser.add_argument(
        "--allow_adapter_updates",
        action="store_true",
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes): adapters loaded and "
        "unloaded while serving",
    )


def add_serving_flags(parser: argparse.ArgumentParser) -> None:
    """The server's own flags: where it listens, who may call it, its queue and its shutdown."""
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument(
        "--port", type=int, default=8000, help=("the port to listen on; 0 picks a free one, logged at start")
    )
    parser.add_argument(
        "--api_key",
        default=None,
        help=(
            f'if given, every /v1 request needs the header "Authorization: Bearer <api_key>"; default: the environment '
            f"variable {API_KEY_ENV} (a flag is visible to every user in ps)"
        ),
    )
    parser.add_argument(
        "--served_model_name",
        default=None,
        help=("the model's id in /v1/models and in requests; default: the checkpoint folder's name"),
    )
    parser.add_argument(
        "--allowed_origins",
        default=None,
        help=(
            "web origins whose pages may call the server (CORS), comma-separated "
            "(https://app.example.com,http://localhost:3000) or * for any; default: none"
        ),
    )
    parser.add_argument(
        "--max_queue",
        type=int,
        default=64,
        help=(
            "the most rows (prompts x n) waiting while every slot is taken; a request whose rows would wait beyond "
            "it is answered 503"
        ),
    )
    parser.add_argument(
        "--shutdown_timeout",
        type=float,
        default=10.0,
        help=(
            "after SIGTERM or Ctrl-C, how many seconds running requests may take to finish before they are cancelled"
        ),
    )


def main(argv: Optional[List[str]] = None) -> None:
    run_parser(parser(), serve_checkpoint, argv)


def serve_checkpoint(args: argparse.Namespace) -> None:
    """The command, on every rank: check the flags, bind the port (rank 0), load the checkpoint on an engine
    of the server's options, and serve (rank 0) or follow rank 0's engine (the others) until stopped."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    ckpt_dir = args.ckpt_dir or str(BUNDLED)
    model_name = args.served_model_name or Path(ckpt_dir).name
    adapters = parse_lora_modules(args.lora_modules, model_name, args.allow_adapter_updates)
    load = options_from(LoadOptions, args, ckpt_dir=ckpt_dir, time_threads=args.threads is None, adapters=adapters)
    # checked before anything loads; without --max_seq_len, the context is chosen once the checkpoint is read
    chosen = args.max_seq_len is None
    engine = options_from(EngineOptions, args, max_seq_len=EngineOptions.max_seq_len if chosen else args.max_seq_len)
    check_speculation_flags(args.speculate, args.speculate_k, load.draft_ckpt_dir)
    origins = parse_origins(args.allowed_origins)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    check_serving_flags(args)
    listener = listen(args.host, args.port) if launched_as_rank0() else None  # before loading: a port in use fails fast
    set_threads(args.threads)
    llama = load_checkpoint(load, engine, choose_context=chosen)
    llama.engine.warm_up(MAX_TOP_LOGPROBS, args.speculate_k if args.speculate else None)  # every rank: no request waits
    llama.engine.check_grammar(None, json_object=True)  # the vocabulary grammars read before the first JSON request
    if not is_main_process():
        for signum in (signal.SIGINT, signal.SIGTERM):  # rank 0 ends the followers: it broadcasts the shutdown
            signal.signal(signum, signal.SIG_IGN)
        llama.engine.follow()
        logger.info("rank %d: the server shut down", dist.get_rank())
        return
    speculation = None
    if args.speculate is not None:
        speculation = dict(speculate=args.speculate, speculate_k=args.speculate_k)
        logger.info(
            "speculative decoding for every request: %s, %d token(s) proposed per step",
            args.speculate,
            args.speculate_k,
        )
    scheduler = Scheduler(llama.engine, args.max_queue, speculation)
    app = make_app(llama, scheduler, model_name, api_key, origins, load.quantize, args.allow_adapter_updates)
    serve(app, scheduler, listener, model_name, args.shutdown_timeout)


def check_serving_flags(args: argparse.Namespace) -> None:
    """The flags of serving itself (the queue, the model's name, the shutdown), before anything loads."""
    if args.max_queue < 0:
        raise ValueError(f"--max_queue must be a non-negative integer, got {args.max_queue!r}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError(f"--served_model_name must be a non-empty name, got {args.served_model_name!r}")
    if not 0 <= args.shutdown_timeout <= 3600:
        raise ValueError(f"--shutdown_timeout must be a number of seconds in [0, 3600], got {args.shutdown_timeout!r}")


def parse_lora_modules(modules: Optional[List[str]], model_name: str, updates: bool) -> Optional[Dict[str, str]]:
    """--lora_modules NAME=DIR ... (or vLLM's JSON form, ``lora_module``) as {name: folder}, each name new and not
    the base model's; None: no adapters (with ``updates``, --allow_adapter_updates: {}, none yet)."""
    if modules is None:
        return {} if updates else None
    adapters: Dict[str, str] = {}
    for module in modules:
        name, folder = lora_module(module, model_name)
        if name in adapters or name == model_name:
            taken = "the base model's" if name == model_name else "given twice"
            raise ValueError(f"--lora_modules: the name {name!r} is {taken}; each adapter needs a name of its own")
        adapters[name] = folder
    return adapters


def lora_module(module: str, model_name: str) -> Tuple[str, str]:
    """One --lora_modules value: ``NAME=DIR``, or vLLM's JSON object ``{"name": NAME, "path": DIR}`` with an
    optional ``"base_model_name"``, which must be the model served (``--served_model_name``)."""
    if not module.lstrip().startswith("{"):
        name, equals, folder = module.partition("=")
        if not equals or not name.strip() or not folder:
            raise ValueError(f"--lora_modules: expected NAME=DIR (an adapter's name and its folder), got {module!r}")
        return name, folder
    try:
        fields = json.loads(module)
    except json.JSONDecodeError as error:
        raise ValueError(f"--lora_modules: {module!r} is not a JSON object ({error})") from None
    keys = {"name", "path", "base_model_name"}
    if not isinstance(fields, dict) or not {"name", "path"} <= set(fields) or not set(fields) <= keys:
        raise ValueError(
            f'--lora_modules: expected {{"name": NAME, "path": DIR}} and optionally "base_model_name", got {module!r}'
        )
    name, folder = fields["name"], fields["path"]
    if not isinstance(name, str) or not name.strip() or not isinstance(folder, str) or not folder:
        raise ValueError(f"--lora_modules: the name and the path must be non-empty strings, got {module!r}")
    base = fields.get("base_model_name", model_name)
    if base != model_name:
        raise ValueError(
            f"--lora_modules: adapter {name!r} names base_model_name {base!r}, but this server serves "
            f"{model_name!r}: give --served_model_name {base!r}, or leave base_model_name out"
        )
    return name, folder


def load_checkpoint(load: LoadOptions, engine: EngineOptions, choose_context: bool) -> Llama:
    """The model, on an engine of ``engine``'s options; ``choose_context``: its ``max_seq_len`` is the
    checkpoint's, fitted to memory (``llama.server.context``), the same on every rank."""
    load = replace(load, tokenizer_path=resolve_tokenizer_path(load.ckpt_dir, load.tokenizer_path))
    device = resolve_device(load.device)
    init_distributed(device)  # before the context is chosen: the ranks agree on it
    if choose_context:
        max_seq_len, why = default_context(
            load.ckpt_dir,
            load.tokenizer_path,
            engine.max_batch_size,
            engine.kv_cache_tokens,
            device,
            load.dtype,
            load.quantize,
            load.draft_ckpt_dir,
            load.draft_quantize,
            engine.kv_cache_dtype,
        )
        logger.info("max_seq_len %d: %s", max_seq_len, why)
        engine = replace(engine, max_seq_len=max_seq_len)
    start = time.perf_counter()
    llama = Llama.from_options(replace(load, device=device), engine)
    logger.info(load_line(load.ckpt_dir, load.tokenizer_path, llama, time.perf_counter() - start, load.quantize))
    for name, adapter in llama.engine.adapters.registered.items() if llama.engine.adapters else ():
        logger.info("serving the adapter %s per request: %s (rank %d)", name, adapter.path, adapter.config.rank)
    return llama


def parse_origins(allowed_origins: Optional[str]) -> Tuple[str, ...]:
    """--allowed_origins as a tuple of origins, each checked."""
    if allowed_origins is None:
        return ()
    origins = tuple(origin.strip() for origin in allowed_origins.split(","))
    for origin in origins:
        if origin != "*" and not ORIGIN.fullmatch(origin):
            raise ValueError(
                f"--allowed_origins: {origin!r} is not an origin: expected '*' or scheme://host[:port], "
                "e.g. http://localhost:3000, with no path"
            )
    return origins


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening (uvicorn listens on it).

    Raises:
        ValueError: the port is not in [0, 65535], the host is unknown, or the address is taken.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be an integer in [0, 65535] (0 picks a free one), got {port!r}")
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
            raise ValueError(
                f"--port {port}: {host}:{port} is already in use (another server?); "
                "choose another --port, or 0 for a free one"
            ) from None
        raise ValueError(f"--host {host} --port {port}: cannot listen there: {error.strerror}") from None
    return sock


def serve(app, scheduler: Scheduler, listener: socket.socket, model_name: str, shutdown_timeout: float) -> None:
    """HTTP on a background thread (uvicorn's event loop); decoding on this one, which owns the
    model and the signals. A signal stops uvicorn (it stops accepting, waits up to
    ``shutdown_timeout`` for running answers, then cancels them), and then the engine."""
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=shutdown_timeout, backlog=2048, lifespan="off"
    )
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
    main()
