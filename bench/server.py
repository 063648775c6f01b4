"""``python -m llama.server`` on the bundled model under load: continuous admission against static
(``--admission static``: a request joins only an empty batch), or this tree's server against another
tree's (``--baseline_root``, e.g. an export of main), measured side by side in one run.

    python bench/server.py                         # 12 clients, 2 threads per server, 3 rounds each
    python bench/server.py --sections mixed --rounds 2 --requests_per_client 2
    python bench/server.py --device cuda
    git archive main | tar -x -C /tmp/main && python bench/server.py --sections mixed --baseline_root /tmp/main
    python bench/server.py --sections burst,stalled   # the HTTP side: many clients at once, stalled ones

Two servers start (one per admission policy, or this tree's and the baseline's, both continuous;
each on a free loopback port, each with --threads torch threads) and take turns: every measurement
alternates between them, round by round, so the machine's noise falls on both. Sections:

- mixed: ``--clients`` clients, each streaming ``--requests_per_client`` completions one after
  another: prompts of 5 to 500 tokens, max_tokens 8 to 256, greedy and sampled settings mixed (the
  same requests for both servers). Prints tokens/s, time to first token (mean, p50, p99) and the
  time between tokens (inter-token latency: mean, p50, p99).
- short: a 4-token request alone, and beside a running 600-token one (which then hangs up): the
  ratio of their median latencies.
- prefill: a row decoding while a 1,000-token prompt is admitted: its longest gap between tokens
  in that time against its median gap (continuous only: static admits nothing beside a row).
- burst: ``--burst_clients`` streaming clients at once (32 slots), against a server with
  ``--max_queue 1024`` and one with ``--max_queue 16``: how many got a complete answer, a 503 JSON
  answer, or neither (a reset connection, a stream cut mid-way). Goal: all complete with 1024; with
  16, each complete or 503.
- stalled: ``--stalled`` connections that send half a request and stop, then a real request: its
  latency beside them against alone. Goal: under 1 s.

The load average is printed with every section: the machine is shared.
"""

import argparse
import http.client
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llama.checkpoints.files import BUNDLED  # noqa: E402  (after the path: the repository's llama)
from llama.tokenizer import Tokenizer  # noqa: E402

POLICIES = ("continuous", "static")


class Server:
    """A server process on a free loopback port, started in its own process group, from the code in
    ``root``; ``label`` names it in the tables. It serves ``ckpt_dir`` (the bundled model by default), with
    ``flags`` added to its command line."""

    def __init__(
        self,
        label: str,
        args,
        log_path: Path,
        root: Path = ROOT,
        admission: str = "continuous",
        max_queue: int = 1000,
        slots: Optional[int] = None,
        ckpt_dir: Path = BUNDLED,
        flags: Sequence[str] = (),
    ):
        command = [
            sys.executable,
            "-m",
            "llama.server",
            "--port",
            "0",
            "--max_batch_size",
            str(slots or args.slots),
            "--max_seq_len",
            str(args.max_seq_len),
            "--device",
            args.device,
            "--admission",
            admission,
            "--max_queue",
            str(max_queue),
            "--prefill_chunk",
            str(args.prefill_chunk),
            "--threads",
            str(args.threads),
            "--ckpt_dir",
            str(ckpt_dir),
            *flags,
        ]
        self.label, self.admission, self.log_path = label, admission, log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                command,
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(root)},
            )
        self.port = self.wait_for_port()

    def wait_for_port(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text().splitlines():
                if " on http://127.0.0.1:" in line:
                    return int(line.rsplit(":", 1)[1])
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the {self.label} server did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass


class Stream:
    """One streamed completion, read as it arrives: when each chunk with text came, and the usage."""

    def __init__(self, port: int, body: dict, timeout: float = 600):
        self.start = time.perf_counter()
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        self.connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        self.response = self.connection.getresponse()
        if self.response.status != 200:
            raise RuntimeError(f"HTTP {self.response.status}: {self.response.read()[:300]!r}")
        self.arrivals: List[float] = []  # perf_counter() of each chunk with text
        self.tokens = 0

    def read(self, until_arrivals: Optional[int] = None) -> "Stream":
        """Read chunks to the end (or until ``until_arrivals`` chunks with text have come)."""
        while until_arrivals is None or len(self.arrivals) < until_arrivals:
            line = self.response.readline()
            if not line or line.strip() == b"data: [DONE]":
                self.response.close()
                break
            if not line.startswith(b"data: "):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                self.tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices") and chunk["choices"][0].get("text"):
                self.arrivals.append(time.perf_counter())
        return self

    def hang_up(self) -> None:
        self.response.close()  # with "Connection: close" the response holds the socket, not the connection

    @property
    def time_to_first_token(self) -> float:
        return self.arrivals[0] - self.start

    @property
    def gaps(self) -> List[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


def post(port: int, body: dict) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {answer}")
    return answer


def corpus_tokens(tokenizer: Tokenizer) -> List[int]:
    """Python source to cut prompts from (the bundled model was trained on the standard library)."""
    sources = sorted(Path(os.__file__).parent.glob("*.py"))[:40]
    return tokenizer.encode("\n".join(p.read_text(errors="replace") for p in sources), bos=False, eos=False)


def mixed_requests(tokenizer: Tokenizer, n: int, seed: int) -> List[dict]:
    """``n`` completion bodies: prompts of 5 to 500 tokens (log-uniform: many short, some long),
    max_tokens 8 to 256, half greedy, half sampled with assorted settings, EOS kept off so every
    request generates its max_tokens."""
    rng, corpus = random.Random(seed), corpus_tokens(tokenizer)
    no_eos = {str(tokenizer.eos_id): -100}
    samplers = [
        {"temperature": 0.8, "top_p": 0.9},
        {"temperature": 1.0, "top_k": 40},
        {"temperature": 0.7, "min_p": 0.05, "presence_penalty": 0.5},
        {"temperature": 1.0, "top_p": 0.95, "frequency_penalty": 0.3, "repetition_penalty": 1.1},
    ]
    bodies = []
    for i in range(n):
        length = round(5 * 100 ** rng.random())  # 5 .. 500
        start = rng.randrange(len(corpus) - length)
        prompt = tokenizer.decode(
            corpus[start : start + length - 1]
        )  # BOS makes it `length` (about: decoding may merge)
        settings = {"temperature": 0} if i % 2 == 0 else {**rng.choice(samplers), "seed": i}
        max_tokens = round(8 * 32 ** rng.random())  # 8 .. 256
        bodies.append({"prompt": prompt, "max_tokens": max_tokens, "logit_bias": no_eos, **settings})
    return bodies


def percentile(values: List[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_mixed(port: int, bodies: List[dict], clients: int) -> dict:
    """``clients`` threads stream ``bodies`` (client c takes bodies c, c + clients, ...)."""
    streams: List[Stream] = []
    lock = threading.Lock()

    def client(c: int):
        for body in bodies[c::clients]:
            stream = Stream(port, body).read()
            with lock:
                streams.append(stream)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "tokens": sum(s.tokens for s in streams),
        "ttft": [s.time_to_first_token for s in streams],
        "gaps": [g for s in streams for g in s.gaps],
    }


def section_mixed(servers, tokenizer, args) -> None:
    bodies = mixed_requests(tokenizer, args.clients * args.requests_per_client, args.seed)
    post(servers[0].port, {**bodies[0], "max_tokens": 2})  # warm up
    post(servers[1].port, {**bodies[0], "max_tokens": 2})
    totals = {server.label: {"seconds": 0.0, "tokens": 0, "ttft": [], "gaps": []} for server in servers}
    print(
        f"\n## mixed: {args.clients} clients x {args.requests_per_client} streamed requests, "
        f"{args.rounds} round(s) per server, "
        f"{args.slots} slots, {args.threads} thread(s) per server; load average {load()}"
    )
    for round_ in range(args.rounds):
        for server in servers:
            r = run_mixed(server.port, bodies, args.clients)
            for key in r:
                totals[server.label][key] += r[key]
            print(
                f"round {round_ + 1} {server.label}: {r['tokens'] / r['seconds']:.0f} tokens/s, mean TTFT "
                f"{statistics.mean(r['ttft']):.2f} s ({r['seconds']:.1f} s, load {load()})",
                flush=True,
            )
    print("\n| server | tokens/s | TTFT mean | TTFT p50 | TTFT p99 | ITL mean | ITL p50 | ITL p99 |")
    print("|---|---|---|---|---|---|---|---|")
    for policy, t in totals.items():
        ttft, gaps = t["ttft"], t["gaps"]
        print(
            f"| {policy} | {t['tokens'] / t['seconds']:.0f} | {statistics.mean(ttft):.3f} s | "
            f"{percentile(ttft, 0.5):.3f} s | "
            f"{percentile(ttft, 0.99):.3f} s | {1000 * statistics.mean(gaps):.1f} ms | "
            f"{1000 * percentile(gaps, 0.5):.1f} ms | "
            f"{1000 * percentile(gaps, 0.99):.1f} ms |"
        )
    (first, c), (second, s) = totals.items()
    goals = "(goal >= 1.5)", "(goal <= 0.25)"
    if args.baseline_root:
        goals = "(goal >= 1: no worse)", "(goal <= 1: no worse)"
    print(
        f"\n{first} / {second}: {(c['tokens'] / c['seconds']) / (s['tokens'] / s['seconds']):.2f}x tokens/s "
        f"{goals[0]}, "
        f"{statistics.mean(c['ttft']) / statistics.mean(s['ttft']):.2f}x mean TTFT {goals[1]}"
    )


def section_short(servers, tokenizer, args) -> None:
    """A 4-token request alone, then beside a running 600-token one; alternating, per policy."""
    short = {"prompt": "import os\n", "max_tokens": 4, "temperature": 0, "logit_bias": {str(tokenizer.eos_id): -100}}
    long = {**short, "prompt": "def main():\n", "max_tokens": 600}
    print(
        "\n## short: a 4-token request alone and beside a running 600-token one, "
        f"{args.rounds * 3} of each; load average {load()}"
    )
    print("| server | alone (median) | beside (median) | ratio |")
    print("|---|---|---|---|")
    results = {server.label: {"alone": [], "beside": []} for server in servers}
    for _ in range(args.rounds * 3):
        for server in servers:
            start = time.perf_counter()
            post(server.port, short)
            results[server.label]["alone"].append(time.perf_counter() - start)
            running = Stream(server.port, long).read(until_arrivals=5)
            start = time.perf_counter()
            post(server.port, short)
            results[server.label]["beside"].append(time.perf_counter() - start)
            running.hang_up()  # frees its slot at the next step
            wait_idle(server.port)
    for policy, r in results.items():
        alone, beside = statistics.median(r["alone"]), statistics.median(r["beside"])
        print(f"| {policy} | {1000 * alone:.1f} ms | {1000 * beside:.1f} ms | {beside / alone:.2f}x |")
    print("goal (continuous): <= 3x")


def section_prefill(servers, tokenizer, args) -> None:
    """A running row's gaps between tokens while a 1,000-token prompt is admitted beside it."""
    server = servers[0]
    corpus = corpus_tokens(tokenizer)
    no_eos = {str(tokenizer.eos_id): -100}
    long_prompt = {"prompt": tokenizer.decode(corpus[:999]), "max_tokens": 4, "temperature": 0}
    running_body = {"prompt": "class Stack:\n", "max_tokens": 300, "temperature": 0, "logit_bias": no_eos}
    print(
        "\n## prefill: a running row while a "
        f"{len(tokenizer.encode(long_prompt['prompt'], bos=True, eos=False))}-token prompt "
        f"is admitted ({server.label}, --prefill_chunk {args.prefill_chunk}); load average {load()}"
    )
    print("| run | median gap | longest gap while admitting | ratio | longest gap overall |")
    print("|---|---|---|---|---|")
    ratios = []
    for run in range(args.rounds):
        running = Stream(server.port, running_body).read(until_arrivals=60)
        reader = threading.Thread(target=running.read)  # its chunks are timed as they come, not after the long prompt's
        reader.start()
        admitted_at = time.perf_counter()
        long_request = Stream(server.port, long_prompt).read()
        first_token = long_request.arrivals[0] if long_request.arrivals else time.perf_counter()
        reader.join()
        gaps = running.gaps
        window = [
            b - a for a, b in zip(running.arrivals, running.arrivals[1:]) if b >= admitted_at and a <= first_token
        ]
        median, worst = statistics.median(gaps), max(window)
        ratios.append(worst / median)
        print(
            f"| {run + 1} | {1000 * median:.1f} ms | {1000 * worst:.1f} ms | "
            f"{worst / median:.2f}x | {1000 * max(gaps):.1f} ms |"
        )
    print(f"median ratio {statistics.median(ratios):.2f}x (goal <= 3x)")


def wait_idle(port: int, timeout: float = 30) -> None:
    """Until the server's /metrics shows no running slot (a hung-up row leaves at the next step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        connection.close()
        running = [line.split()[-1] for line in text.splitlines() if line.startswith("llama_running_slots ")]
        if running and float(running[0]) == 0:
            return
        time.sleep(0.02)
    raise RuntimeError("the server's slots did not empty")


def burst_client(port: int, body: dict, outcomes: dict, lock: threading.Lock, start: threading.Barrier) -> None:
    """One client of a burst: "complete" (the stream's [DONE] came), "503" (a JSON 503), or what
    else happened ("reset", "cut": a stream that ended before [DONE], "HTTP <status>")."""
    start.wait()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        connection.request(
            "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        if response.status == 503:
            outcome = "503" if "error" in json.loads(response.read()) else "503 (not JSON)"
        elif response.status != 200:
            outcome = f"HTTP {response.status}"
        else:
            outcome = "complete" if response.read().rstrip().endswith(b"data: [DONE]") else "cut"
        connection.close()
    except (ConnectionError, http.client.HTTPException, OSError) as error:
        outcome = f"reset ({type(error).__name__})"
    with lock:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1


def section_burst(servers, tokenizer, args) -> None:
    """``--burst_clients`` streaming clients started at once against 32 slots, per --max_queue."""
    body = {"prompt": "import os\n", "max_tokens": 16, "temperature": 0, "logit_bias": {str(tokenizer.eos_id): -100}}
    print(
        f"\n## burst: {args.burst_clients} streaming clients at once, 32 slots, 16 tokens each; load average {load()}"
    )
    print("| server | --max_queue | outcomes | seconds |")
    print("|---|---|---|---|")
    for label, root in roots(args):
        for max_queue in (1024, 16):
            server = Server(
                label,
                args,
                Path(args.log_dir) / f"llama-bench-burst-{label}-{max_queue}.log",
                root,
                max_queue=max_queue,
                slots=32,
            )
            try:
                post(server.port, {**body, "max_tokens": 2})  # warm up
                outcomes, lock = {}, threading.Lock()
                barrier = threading.Barrier(args.burst_clients)
                threads = [
                    threading.Thread(target=burst_client, args=(server.port, body, outcomes, lock, barrier))
                    for _ in range(args.burst_clients)
                ]
                start = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                print(
                    f"| {label} | {max_queue} | {dict(sorted(outcomes.items()))} | {time.perf_counter() - start:.1f} |",
                    flush=True,
                )
            finally:
                server.stop()
    print("goal (this tree): all complete with 1024; complete or 503 with 16")


def section_stalled(servers, tokenizer, args) -> None:
    """A real request's latency beside ``--stalled`` connections that sent half a request."""
    body = json.dumps({"prompt": "import os\n", "max_tokens": 4, "temperature": 0})
    half = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n" + body[: len(body) // 2]
    ).encode()
    print(
        f"\n## stalled: a 4-token request alone and beside {args.stalled} connections "
        f"that sent half a request; load average {load()}"
    )
    print("| server | alone (median) | beside (median, max) |")
    print("|---|---|---|")
    for server in servers[:1] if not args.baseline_root else servers:
        alone, beside, stalled = [], [], []
        try:
            for _ in range(5):
                start = time.perf_counter()
                post(server.port, json.loads(body))
                alone.append(time.perf_counter() - start)
            for _ in range(args.stalled):
                connection = socket.create_connection(("127.0.0.1", server.port), timeout=30)
                connection.sendall(half)
                stalled.append(connection)
            for _ in range(5):
                start = time.perf_counter()
                post(server.port, json.loads(body))
                beside.append(time.perf_counter() - start)
            print(
                f"| {server.label} | {1000 * statistics.median(alone):.1f} ms | "
                f"{1000 * statistics.median(beside):.1f} ms, {1000 * max(beside):.1f} ms |"
            )
        except (ConnectionError, OSError, RuntimeError) as error:
            print(
                f"| {server.label} | {1000 * statistics.median(alone) if alone else float('nan'):.1f} ms | "
                f"failed: {error!r:.80} |"
            )
        finally:
            for connection in stalled:
                connection.close()
    print("goal: beside < 1 s")


def roots(args) -> List[tuple]:
    """(label, code tree) of the servers compared."""
    return [("this tree", ROOT)] + ([("baseline", Path(args.baseline_root))] if args.baseline_root else [])


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


SECTIONS = {
    "mixed": section_mixed,
    "short": section_short,
    "prefill": section_prefill,
    "burst": section_burst,
    "stalled": section_stalled,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="mixed,short,prefill", help=f"comma-separated, of {list(SECTIONS)}")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--requests_per_client", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per policy, alternating")
    parser.add_argument("--slots", type=int, default=8, help="the servers' --max_batch_size")
    parser.add_argument("--max_seq_len", type=int, default=1024)
    parser.add_argument("--prefill_chunk", type=int, default=256, help="the servers' --prefill_chunk")
    parser.add_argument("--threads", type=int, default=2, help="each server's --threads")
    parser.add_argument("--seed", type=int, default=0, help="of the mixed workload")
    parser.add_argument("--log_dir", default="/tmp")
    parser.add_argument("--device", default="cpu", help="the servers' --device")
    parser.add_argument(
        "--baseline_root",
        default=None,
        help="another tree (an export of main) whose server is compared with this one's, both continuous",
    )
    parser.add_argument("--burst_clients", type=int, default=512)
    parser.add_argument("--stalled", type=int, default=300, help="half-sent requests of the stalled section")
    args = parser.parse_args()
    sections = args.sections.split(",")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")

    tokenizer = Tokenizer(str(BUNDLED / "tokenizer.model"))
    servers = []
    try:
        if args.baseline_root:
            for label, root in roots(args):
                servers.append(
                    Server(label, args, Path(args.log_dir) / f"llama-bench-server-{label.replace(' ', '-')}.log", root)
                )
        else:
            for policy in POLICIES:
                servers.append(
                    Server(policy, args, Path(args.log_dir) / f"llama-bench-server-{policy}.log", admission=policy)
                )
        print(f"load average at start {load()}; {os.cpu_count()} CPUs")
        for name in sections:
            SECTIONS[name](servers, tokenizer, args)
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()
