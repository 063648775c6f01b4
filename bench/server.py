"""Throughput and latency of ``python -m llama.server`` on the bundled model, with N clients that each
send one request after another, and the HTTP stack's own cost.

    python bench/server.py --clients 1,4,8 --requests 32 --max_tokens 32

Starts the server in a subprocess on a free loopback port, then per client count: requests/s, p50 and
p99 latency, generated tokens/s. The HTTP stack's cost is measured twice: GET /health round trips
(no model), and a 1-token completion over HTTP against the same ``text_completion`` in this process.
"""

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["import os\n", "def main():\n", "class Stack:\n    def __init__(self):\n", "for i in range(10):\n"]


def start_server(args, log_path: Path) -> tuple:
    """(process, port) of a server on the bundled model, once it listens."""
    command = [sys.executable, "-m", "llama.server", "--port", "0", "--max_batch_size", str(args.max_batch_size),
               "--max_seq_len", str(args.max_seq_len), "--device", "cpu"]
    log = open(log_path, "w")
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if " on http://127.0.0.1:" in line:
                return process, int(line.rsplit(":", 1)[1])
        if process.poll() is not None:
            break
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    raise RuntimeError(f"the server did not start:\n{log_path.read_text()}")


def post(port: int, body: dict) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {answer}")
    return answer


def run_clients(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    """``clients`` threads share ``requests`` greedy completions; their latencies and tokens."""
    latencies, tokens, lock = [], [0], threading.Lock()
    next_request = iter(range(requests))

    def client():
        for i in iter(lambda: next(next_request, None), None):
            start = time.perf_counter()
            answer = post(port, {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0})
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens[0] += answer["usage"]["completion_tokens"]

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    latencies.sort()
    return {
        "clients": clients, "requests/s": requests / seconds, "p50 ms": 1000 * statistics.median(latencies),
        "p99 ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "tokens/s": tokens[0] / seconds,
    }


def health_round_trips(port: int, n: int = 500) -> float:
    """GET /health per second on one keep-alive connection: the HTTP stack alone."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    start = time.perf_counter()
    for _ in range(n):
        connection.request("GET", "/health")
        connection.getresponse().read()
    connection.close()
    return n / (time.perf_counter() - start)


def one_token_overhead(port: int, args, n: int = 30) -> tuple:
    """Median ms of a 1-token completion over HTTP, and of text_completion in this process."""
    import torch

    from llama import Llama

    torch.set_num_threads(args.threads)
    bundled = ROOT / "checkpoints" / "tiny-stdlib"
    llama = Llama.build(str(bundled), str(bundled / "tokenizer.model"), args.max_seq_len, args.max_batch_size, device="cpu")
    http_ms, local_ms = [], []
    for _ in range(n):
        start = time.perf_counter()
        post(port, {"prompt": PROMPTS[0], "max_tokens": 1, "temperature": 0})
        http_ms.append(1000 * (time.perf_counter() - start))
        start = time.perf_counter()
        llama.text_completion(PROMPTS[:1], temperature=0, max_gen_len=1)
        local_ms.append(1000 * (time.perf_counter() - start))
    return statistics.median(http_ms), statistics.median(local_ms)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,8", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=32, help="requests per client count")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--max_batch_size", type=int, default=8)
    parser.add_argument("--max_seq_len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--log", default="/tmp/llama-bench-server.log")
    args = parser.parse_args()

    process, port = start_server(args, Path(args.log))
    try:
        post(port, {"prompt": "x", "max_tokens": 2})  # warm up
        print(f"GET /health: {health_round_trips(port):.0f} requests/s on one connection")
        http_ms, local_ms = one_token_overhead(port, args)
        print(f"1-token completion: {http_ms:.1f} ms over HTTP, {local_ms:.1f} ms in-process text_completion")
        print("| clients | requests/s | p50 latency | p99 latency | tokens/s |")
        print("|---|---|---|---|---|")
        for clients in map(int, args.clients.split(",")):
            r = run_clients(port, clients, args.requests, args.max_tokens)
            print(f"| {clients} | {r['requests/s']:.1f} | {r['p50 ms']:.0f} ms | {r['p99 ms']:.0f} ms | {r['tokens/s']:.0f} |", flush=True)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
