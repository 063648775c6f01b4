"""Where a decode step's time goes: torch.profiler over greedy decoding on the engine, per mode.

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
from compare import Ours, mode_settings
from llama.checkpoints.loader import load_model

PROMPT = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


@torch.no_grad()  # not inference_mode: torch.compile cannot take inference tensors
def decode(decoder: Ours, steps: int) -> float:
    """Greedy decoding of ``steps`` tokens after an 8-token prompt; tokens/s (the prefill included)."""
    begin = time.perf_counter()
    decoder.generate(PROMPT, steps)
    return steps / (time.perf_counter() - begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument(
        "--modes", default="int8,int4", help="fp32, bf16, int8, int4, int4-g32 ... (see bench/compare.py)"
    )
    parser.add_argument("--compile", action="store_true", help="compile the decode step")
    parser.add_argument("--steps", type=int, default=64, help="positions decoded, timed and profiled")
    parser.add_argument("--rows", type=int, default=15, help="operators listed per mode")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = tempfile.TemporaryDirectory(prefix="llama-profile-")
    ckpt_dir = args.ckpt_dir or random_checkpoint(args, str(Path(scratch.name) / "llama"))
    model_args = checkpoint_args(ckpt_dir, PROMPT.shape[1] + args.steps, 1)
    for mode in args.modes.split(","):
        decoder = Ours(
            load_model(ckpt_dir, model_args, torch.device("cpu"), *mode_settings(mode)), compile=args.compile
        )
        decode(decoder, args.steps)  # warm-up (and compilation)
        tok_s = decode(decoder, args.steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            decode(decoder, args.steps)
        print(
            f"\n== {mode}{' compiled' if args.compile else ''}: {tok_s:.1f} tok/s, "
            f"{1e3 / tok_s:.2f} ms a token ({torch.get_num_threads()} threads)"
        )
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
