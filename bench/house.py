"""This tree's ``llama`` side by side with another git revision's (by default 11302d3), in one run.

Measurements (``--measurements``, all by default):

- bundled-eager, bundled-compiled: decode tokens/s of the bundled model through ``Llama.generate``,
  batch 1, greedy, no early stop, the prefill subtracted (bench/generate.py's timing), the decode step
  eager or compiled (``compile=True``).
- 134M-eager, 134M-compiled: the same on a random 134M model (bench/common.py's shape, stored in
  bfloat16, decoded in float32) with the bundled tokenizer padded to its 32,000 tokens.
- server: ``python -m llama.server`` on the bundled model under bench/server.py's mixed workload
  (clients streaming completions of 5 to 500 prompt tokens and 8 to 256 generated ones, greedy and
  sampled): tokens/s and mean time to first token.

The revision is checked out as a git worktree in a temporary folder, removed at the end. Rounds
alternate between the two trees (which goes first alternates too, so the machine's noise falls on
both); every measurement runs in a fresh process (a fresh server) whose PYTHONPATH is its tree, so each
imports its own ``llama``, and uses only what both trees offer: ``Llama.build``, ``generate`` and the
server's flags. Prints each tree's median over the rounds, their ratio, the median of the rounds'
ratios, the CPU, the thread count and the load average.

    python bench/house.py                                     # against 11302d3, every measurement, 5 rounds
    python bench/house.py --quick                             # a smoke run: one short round
    python bench/house.py --baseline main --measurements bundled-eager server --rounds 7 --threads 1
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "checkpoints" / "tiny-stdlib"
DECODES = {
    "bundled-eager": ("bundled", False),
    "bundled-compiled": ("bundled", True),
    "134M-eager": ("134M", False),
    "134M-compiled": ("134M", True),
}
MEASUREMENTS = [*DECODES, "server"]
PROMPT_LEN = 16


def decode_worker(args) -> None:
    """In a fresh process whose PYTHONPATH is the tree under test: build, warm up (compiling, paging the
    weights in), then print the median decode tokens/s of ``--repeats`` timings as JSON."""
    import torch

    from generate import decode_tokens_per_second  # bench/, beside this file: no llama of its own
    from llama.generation import Llama

    torch.set_num_threads(args.threads)
    llama = Llama.build(
        args.decode_worker,
        max_seq_len=PROMPT_LEN + args.gen_tokens,
        max_batch_size=1,
        device="cpu",
        dtype="float32",
        compile=args.compile,
    )
    generator = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, llama.tokenizer.n_words, (PROMPT_LEN - 1,), generator=generator).tolist()]
    decode_tokens_per_second(llama, prompts, args.gen_tokens)  # warm-up: compiles both calls' graphs
    timings = [decode_tokens_per_second(llama, prompts, args.gen_tokens) for _ in range(args.repeats)]
    print(json.dumps(statistics.median(timings)))


def measure_decode(tree: Path, ckpt_dir: str, compile: bool, args) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--decode_worker",
        ckpt_dir,
        "--threads",
        str(args.threads),
        "--gen_tokens",
        str(args.gen_tokens),
        "--repeats",
        str(args.repeats),
    ]
    command += ["--compile"] if compile else []
    environment = {**os.environ, "PYTHONPATH": str(tree)}
    result = subprocess.run(command, cwd=tree, env=environment, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"decoding {ckpt_dir} with {tree}'s llama failed:\n{result.stderr[-3000:]}")
    return {"tokens/s": json.loads(result.stdout.strip().splitlines()[-1])}


def measure_server(label: str, tree: Path, bodies: list, args, log_dir: str) -> dict:
    """One mixed-workload round on a fresh server started from ``tree``."""
    from server import Server, post, run_mixed

    settings = argparse.Namespace(
        slots=args.slots, max_seq_len=1024, device="cpu", prefill_chunk=256, threads=args.threads
    )
    server = Server(label, settings, Path(log_dir) / f"server-{label}.log", tree)
    try:
        post(server.port, {**bodies[0], "max_tokens": 2})  # warm-up
        r = run_mixed(server.port, bodies, args.clients)
    finally:
        server.stop()
    return {"tokens/s": r["tokens"] / r["seconds"], "TTFT mean s": statistics.mean(r["ttft"])}


def padded_tokenizer(source: Path, path: Path, n_words: int) -> None:
    """``source`` (a sentencepiece model) with unused pieces appended up to ``n_words``: a random
    checkpoint's vocabulary, which Llama.build checks against its tokenizer's."""
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(source.read_bytes())
    for i in range(len(model.pieces), n_words):
        model.pieces.add(piece=f"<unused{i}>", score=0.0, type=sentencepiece_model_pb2.ModelProto.SentencePiece.UNUSED)
    path.write_bytes(model.SerializeToString())


def random_134m(folder: Path) -> str:
    from common import DEFAULT_SHAPE, random_checkpoint

    shape = argparse.Namespace(**DEFAULT_SHAPE, n_kv_heads=None, ckpt_dtype="bfloat16")
    ckpt_dir = random_checkpoint(shape, str(folder))
    padded_tokenizer(BUNDLED / "tokenizer.model", folder / "tokenizer.model", DEFAULT_SHAPE["vocab_size"])
    return ckpt_dir


def git(*command: str) -> str:
    return subprocess.run(["git", *command], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    """The CPU's model name as Linux reports it, else what the platform module knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_rounds(trees: dict, args, scratch: Path) -> dict:
    """{(measurement, tree label): [one result dict per round]}, the trees taking turns."""
    from llama.tokenizer import Tokenizer
    from server import mixed_requests

    checkpoints = {"bundled": str(BUNDLED)}
    if any(DECODES[m][0] == "134M" for m in args.measurements if m in DECODES):
        checkpoints["134M"] = random_134m(scratch / "134M")
    tokenizer = Tokenizer(str(BUNDLED / "tokenizer.model"))
    bodies = mixed_requests(tokenizer, args.clients * args.requests_per_client, seed=0)
    results = {(m, label): [] for m in args.measurements for label in trees}
    for round_ in range(args.rounds):
        for measurement in args.measurements:
            for label in sorted(trees, reverse=round_ % 2 == 1):
                start = time.perf_counter()
                if measurement == "server":
                    result = measure_server(label, trees[label], bodies, args, str(scratch))
                else:
                    model, compile = DECODES[measurement]
                    result = measure_decode(trees[label], checkpoints[model], compile, args)
                results[measurement, label].append(result)
                figures = ", ".join(f"{k} {v:.3g}" for k, v in result.items())
                print(
                    f"round {round_ + 1}/{args.rounds} {measurement} {label}: {figures} "
                    f"({time.perf_counter() - start:.0f} s, load {load_average()})",
                    flush=True,
                )
    return results


def report(results: dict, args) -> None:
    from common import print_table

    rows = []
    for measurement in args.measurements:
        new, old = results[measurement, "new"], results[measurement, "old"]
        for metric in new[0]:
            new_median, old_median = (statistics.median(r[metric] for r in rs) for rs in (new, old))
            ratios = [n[metric] / o[metric] for n, o in zip(new, old)]
            rows.append(
                [
                    f"{measurement} {metric}",
                    f"{old_median:.4g}",
                    f"{new_median:.4g}",
                    f"{new_median / old_median:.3f}",
                    f"{statistics.median(ratios):.3f}",
                    f"{min(ratios):.2f}-{max(ratios):.2f}",
                ]
            )
    print_table(
        f"median of {args.rounds} alternating rounds (TTFT: lower is better)",
        ["measurement", "old", "new", "new/old", "median of rounds' new/old", "rounds' range"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="11302d3", help="the git revision compared with this tree")
    parser.add_argument("--measurements", nargs="+", choices=MEASUREMENTS, default=MEASUREMENTS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each decoding process and server")
    parser.add_argument("--gen_tokens", type=int, default=128, help="tokens a decode timing generates")
    parser.add_argument("--repeats", type=int, default=3, help="decode timings per process (their median)")
    parser.add_argument("--clients", type=int, default=12, help="of the server's mixed workload")
    parser.add_argument("--requests_per_client", type=int, default=2)
    parser.add_argument("--slots", type=int, default=8, help="the server's --max_batch_size")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round, 8 tokens, 2 clients of 1 request")
    parser.add_argument("--decode_worker", metavar="CKPT_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.decode_worker:
        return decode_worker(args)
    if args.quick:
        args.rounds, args.gen_tokens, args.repeats, args.clients, args.requests_per_client = 1, 8, 1, 2, 1
    sys.path.insert(0, str(ROOT))  # this tree's llama, for the 134M checkpoint and the workload's tokenizer

    revision = git("rev-parse", "--short", args.baseline)
    changed = " with uncommitted changes" if git("status", "--porcelain", "llama") else ""
    print(f"old: {args.baseline} ({revision}); new: {ROOT} at {git('rev-parse', '--short', 'HEAD')}{changed}")
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs; {args.threads} torch thread(s) per process; "
        f"python {platform.python_version()}, torch {version('torch')}; load average {load_average()}",
        flush=True,
    )
    scratch = Path(tempfile.mkdtemp(prefix="llama-house-"))
    baseline = scratch / "old"
    try:
        git("worktree", "add", "--detach", str(baseline), revision)
        results = run_rounds({"old": baseline, "new": ROOT}, args, scratch)
    finally:
        if baseline.exists():
            git("worktree", "remove", "--force", str(baseline))
        shutil.rmtree(scratch, ignore_errors=True)
    report(results, args)
    print(f"load average at the end {load_average()}")


if __name__ == "__main__":
    main()
