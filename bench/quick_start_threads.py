"""The quick start's command with its default thread count (measured at load, ``llama.layers.cpu_threads``)
side by side with ``--threads 1`` and ``--threads N`` (one per core), each run a fresh process, the
configurations alternating within each round; the same for a random checkpoint of a larger shape
(134M by default) with the bundled tokenizer. Prints, per checkpoint and configuration, the median
and range of the tokens/s the command prints, the thread counts the default chose, and the load
averages seen.

    python bench/quick_start_threads.py --rounds 5
    python bench/quick_start_threads.py --rounds 3 --no_large
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

from common import add_checkpoint_args, print_table, random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_TOKENIZER = ROOT / "checkpoints" / "tiny-stdlib" / "tokenizer.model"
SPEED = re.compile(r"Generated (\d+) tokens in ([\d.]+) s \(([\d.]+) tokens/s\)")
THREADS = re.compile(r"on cpu with (\d+) thread\(s\)")


def run_command(flags: list) -> dict:
    """``python example_text_completion.py`` with ``flags``: its tokens/s, thread count, and the
    1-minute load average just before it started."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    load = os.getloadavg()[0]
    done = subprocess.run(
        [sys.executable, "example_text_completion.py", *flags], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"example_text_completion.py {' '.join(flags)} failed:\n{done.stderr}")
    return {
        "tok_s": float(SPEED.search(done.stdout).group(3)),
        "threads": int(THREADS.search(done.stdout).group(1)),
        "load": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)  # the larger checkpoint's shape
    parser.set_defaults(vocab_size=4096)  # the bundled tokenizer's
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no_large", action="store_true", help="the bundled model only")
    args = parser.parse_args()

    cores = torch.get_num_threads()
    scratch = tempfile.TemporaryDirectory(prefix="llama-bench-")
    checkpoints = {"bundled": []}
    if not args.no_large:
        large = random_checkpoint(args, str(Path(scratch.name) / "large"))
        checkpoints[f"random dim {args.dim} x {args.n_layers} layers"] = [
            "--ckpt_dir",
            large,
            "--tokenizer_path",
            str(BUNDLED_TOKENIZER),
            "--max_gen_len",
            "16",
        ]
    configs = {
        "default (measured)": [],
        "--threads 1": ["--threads", "1"],
        f"--threads {cores}": ["--threads", str(cores)],
    }
    print(
        f"torch {torch.__version__}, {cores} threads by default; "
        f"{args.rounds} rounds of {len(checkpoints) * len(configs)} runs",
        flush=True,
    )
    results = {(name, config): [] for name in checkpoints for config in configs}
    for r in range(args.rounds):
        for name, checkpoint_flags in checkpoints.items():
            for config, flags in configs.items():
                results[(name, config)].append(run_command(checkpoint_flags + flags))
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    rows = []
    for (name, config), runs in results.items():
        speeds, loads = [m["tok_s"] for m in runs], [m["load"] for m in runs]
        chosen = ", ".join(
            f"{threads}: {count}x" for threads, count in sorted(Counter(m["threads"] for m in runs).items())
        )
        rows.append(
            [
                name,
                config,
                f"{statistics.median(speeds):.1f}",
                f"{min(speeds):.1f}-{max(speeds):.1f}",
                chosen,
                f"{min(loads):.1f}-{max(loads):.1f}",
            ]
        )
    print_table(
        f"example_text_completion.py tokens/s, median and range of {args.rounds} alternating rounds",
        ["checkpoint", "threads", "median", "range", "threads used", "load"],
        rows,
    )


if __name__ == "__main__":
    main()
