"""Serve a checkpoint with OpenAI's API: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models`` and ``GET /health``.

    python -m llama.server                                   # the bundled model, http://127.0.0.1:8000
    python -m llama.server --ckpt_dir llama-2-7b-chat/ --tokenizer_path tokenizer.model --api_key KEY
    torchrun --nproc_per_node 8 -m llama.server --ckpt_dir llama-2-70b-chat/ --tokenizer_path tokenizer.model

Under torchrun rank 0 serves HTTP and decodes; every other rank follows its batches. SIGTERM or
Ctrl-C stops the server after the current step, and every rank exits.
"""

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

from llama.cli import load_line, run
from llama.distributed import is_main_process
from llama.generation import Llama
from llama.server.batching import Scheduler, follow
from llama.server.http import LlamaHTTPServer
from llama.tokenizer import resolve_tokenizer_path

logger = logging.getLogger("llama.server")

BUNDLED = Path(__file__).resolve().parent.parent.parent / "checkpoints" / "tiny-stdlib"


def main(
    ckpt_dir: Optional[str] = None,
    tokenizer_path: Optional[str] = None,
    max_seq_len: int = 512,
    max_batch_size: int = 8,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    quantize: Optional[str] = None,
    compile: bool = False,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: Optional[str] = None,
    heartbeat_seconds: float = 10.0,
):
    """Serve a checkpoint with OpenAI's HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /health), on one process or under torchrun.

    Args:
        ckpt_dir: the checkpoint folder (Meta's layout or a Hugging Face folder); default: the bundled checkpoints/tiny-stdlib
        max_batch_size: the most rows decoded together; a request for n samples of p prompts takes n * p rows
        host: the address to listen on
        port: the port to listen on; 0 picks a free one, logged at start
        api_key: if given, every /v1 request needs the header "Authorization: Bearer <api_key>"
        heartbeat_seconds: under torchrun, how often an idle rank 0 tells the others it is alive
            (well below the process group's 30-minute timeout)
    The other flags are described in llama.cli.FLAG_HELP.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not isinstance(heartbeat_seconds, (int, float)) or not 0 < heartbeat_seconds < 600:
        raise ValueError(f"--heartbeat_seconds must be a number in (0, 600), well below the process group's timeout; got {heartbeat_seconds!r}")
    ckpt_dir = str(BUNDLED) if ckpt_dir is None else ckpt_dir
    tokenizer_path = resolve_tokenizer_path(ckpt_dir, tokenizer_path)
    start = time.perf_counter()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype=dtype, quantize=quantize, compile=compile)
    logger.info(load_line(ckpt_dir, tokenizer_path, llama, time.perf_counter() - start, quantize))
    if not is_main_process():
        for signum in (signal.SIGINT, signal.SIGTERM):  # rank 0 ends the followers: it broadcasts the shutdown
            signal.signal(signum, signal.SIG_IGN)
        return follow(llama)
    serve(llama, Path(ckpt_dir).name, host, port, api_key, heartbeat_seconds)


def serve(llama: Llama, model_name: str, host: str, port: int, api_key: Optional[str], heartbeat_seconds: float) -> None:
    """HTTP on a background thread; decoding on this one, which owns the model and the signals."""
    scheduler = Scheduler(llama, heartbeat_seconds)
    server = LlamaHTTPServer((host, port), llama, scheduler, model_name, api_key)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: scheduler.stop())
    http_thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    http_thread.start()
    logger.info("serving %s on http://%s:%d", model_name, *server.server_address[:2])
    try:
        scheduler.run()
    finally:
        server.shutdown()
        server.server_close()
        logger.info("server stopped")


if __name__ == "__main__":
    run(main)
