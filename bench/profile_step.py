"""Where a decode step's time goes: torch.profiler over greedy decoding from BOS, per mode.

    python bench/profile_step.py                          # a random 134M checkpoint, int8 and int4
    python bench/profile_step.py --modes fp32,bf16,int8 --compile --threads 2

Prints, for each mode, tokens/s without the profiler and the profiler's operators by self time.
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from common import add_checkpoint_args, checkpoint_args, random_checkpoint
from compare import mode_settings

from llama.checkpoint import load_model
from llama.decoding import DecodeStep


@torch.no_grad()  # not inference_mode: torch.compile cannot take inference tensors
def decode(step: DecodeStep, start: int, steps: int) -> float:
    """Greedy decoding of ``steps`` positions after ``start``; tokens/s."""
    token = torch.tensor([1])
    begin = time.perf_counter()
    for pos in range(start, start + steps):
        token = step(token, torch.tensor([pos]), kv_len=pos + 1).argmax(-1)
    return steps / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--modes", default="int8,int4", help="fp32, bf16, int8, int4, int4-g32 ... (see bench/compare.py)")
    parser.add_argument("--compile", action="store_true", help="compile the decode step")
    parser.add_argument("--steps", type=int, default=64, help="positions decoded, timed and profiled")
    parser.add_argument("--rows", type=int, default=15, help="operators listed per mode")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory(prefix="llama-profile-")
    ckpt_dir = args.ckpt_dir or random_checkpoint(args, str(Path(scratch.name) / "llama"))
    model_args = checkpoint_args(ckpt_dir, 3 * args.steps + 8, 1)
    for mode in args.modes.split(","):
        step = DecodeStep(load_model(ckpt_dir, model_args, torch.device("cpu"), *mode_settings(mode)), compile=args.compile)
        decode(step, 0, 8)  # warm-up (and compilation)
        tok_s = decode(step, 8, args.steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(step, 8 + args.steps, args.steps)
        print(f"\n== {mode}{' compiled' if args.compile else ''}: {tok_s:.1f} tok/s, {1e3 / tok_s:.2f} ms a token ({torch.get_num_threads()} threads)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
