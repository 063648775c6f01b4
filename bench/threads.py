"""Decoding speed at 1 and 2 CPU threads, on a quiet machine and beside a busy neighbour (``yes >
/dev/null``, which keeps one core busy), with OpenMP's default wait policy and with
``OMP_WAIT_POLICY=PASSIVE``. Each measurement is a fresh process (the wait policy is read when OpenMP
starts), greedy batch-1 decoding on the engine; the configurations alternate within each
round, and the load average is recorded with each figure. Prints the median tokens/s of each
configuration over the rounds, with the range of load averages seen.

    python bench/threads.py                                   # the bundled model and a random 134M checkpoint
    python bench/threads.py --ckpt_dir checkpoints/tiny-stdlib --rounds 5
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # each run's environment decides OMP_WAIT_POLICY: only the commands set it, where it is unset

from common import add_checkpoint_args, checkpoint_args, print_table, random_checkpoint
from compare import Ours, timed
from llama.checkpoints.files import BUNDLED
from llama.checkpoints.loader import load_model
from llama.distributed import set_threads

PROMPT_LEN = 16


@torch.no_grad()
def measure(ckpt_dir: str, threads: int, n_tokens: int) -> float:
    """Greedy batch-1 decode tokens/s of ``ckpt_dir`` in this process, at ``threads`` threads."""
    set_threads(threads)
    args = checkpoint_args(ckpt_dir, PROMPT_LEN + n_tokens + 1, 1)
    decoder = Ours(load_model(ckpt_dir, args, torch.device("cpu"), torch.float32))
    prompt = torch.randint(3, args.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    decoder.decode(prompt, 4)  # warm-up
    total = timed(lambda: decoder.decode(prompt, n_tokens), torch.device("cpu"))
    first = timed(lambda: decoder.prefill(prompt), torch.device("cpu"))
    return n_tokens / max(total - first, 1e-9)


def run_worker(ckpt_dir: str, threads: int, n_tokens: int, policy: str) -> dict:
    """``measure`` in a fresh process with OpenMP's wait ``policy`` ("default": unset); its tokens/s
    and the 1-minute load average just before it started."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    load = os.getloadavg()[0]
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--ckpt_dir",
        ckpt_dir,
        "--threads",
        str(threads),
        "--tokens",
        str(n_tokens),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr}")
    return {"tok_s": json.loads(done.stdout.strip().splitlines()[-1])["tok_s"], "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)  # --ckpt_dir: one checkpoint instead of the two; the shape: the random one's
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="tokens decoded per measurement; default: 64 for the bundled model, 32 otherwise",
    )
    parser.add_argument("--thread_counts", default="1,2")
    parser.add_argument(
        "--policies", default="default,PASSIVE", help="OMP_WAIT_POLICY values; 'default' leaves it unset"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"tok_s": measure(args.ckpt_dir, args.threads, args.tokens)}))
        return

    scratch = tempfile.TemporaryDirectory(prefix="llama-bench-")
    if args.ckpt_dir:
        checkpoints = {Path(args.ckpt_dir).name: args.ckpt_dir}
    else:
        checkpoints = {"bundled": str(BUNDLED), "134M": random_checkpoint(args, str(Path(scratch.name) / "134M"))}
    tokens = {
        name: args.tokens or (64 if Path(path).resolve() == BUNDLED else 32) for name, path in checkpoints.items()
    }
    configs = list(
        itertools.product(checkpoints, [int(t) for t in args.thread_counts.split(",")], args.policies.split(","))
    )
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs; {args.rounds} rounds of "
        f"{len(configs)} configurations x (quiet, neighbour)",
        flush=True,
    )

    results = {(neighbour, *config): [] for neighbour in ("quiet", "neighbour") for config in configs}
    for r in range(args.rounds):
        for neighbour in ("quiet", "neighbour"):
            busy = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if neighbour == "neighbour" else None
            try:
                for name, threads, policy in configs:
                    results[(neighbour, name, threads, policy)].append(
                        run_worker(checkpoints[name], threads, tokens[name], policy)
                    )
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            time.sleep(2)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    header = [
        "checkpoint",
        "threads",
        "OMP_WAIT_POLICY",
        "quiet tok/s",
        "load",
        "with neighbour tok/s",
        "load",
        "ratio",
    ]
    rows = []
    for name, threads, policy in configs:
        quiet, busy = results[("quiet", name, threads, policy)], results[("neighbour", name, threads, policy)]
        quiet_tok_s, busy_tok_s = (
            statistics.median(m["tok_s"] for m in quiet),
            statistics.median(m["tok_s"] for m in busy),
        )
        rows.append(
            [
                name,
                threads,
                policy,
                f"{quiet_tok_s:.1f}",
                load_range(quiet),
                f"{busy_tok_s:.1f}",
                load_range(busy),
                f"{busy_tok_s / quiet_tok_s:.2f}",
            ]
        )
    print_table(
        f"greedy batch-1 decode tokens/s, median of {args.rounds} rounds (load: 1-minute load average before each run)",
        header,
        rows,
    )


def load_range(measurements: list) -> str:
    loads = [m["load"] for m in measurements]
    return f"{min(loads):.1f}-{max(loads):.1f}"


if __name__ == "__main__":
    main()
