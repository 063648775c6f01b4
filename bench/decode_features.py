"""The compiled decode step's cost per step, on greedy rows: the graph the engine runs for them on a CPU
(logprobs and 32 top logprobs, a grammar's mask, the sampler and the penalties left out:
``Runner.compiled_features``), against a step specialised to greedy rows without penalties or
alternatives, and against the whole sampler (the graph of a step where some row samples), in
alternating rounds on the same engine, at width 1 and the full batch.

    python bench/decode_features.py --threads 2                             # the bundled model
    python bench/decode_features.py --ckpt_dir "" --dim 256 --n_layers 4 --vocab_size 32000 --threads 2
"""

import argparse
import statistics
import tempfile
import time

import torch

from common import add_checkpoint_args, checkpoint_args, print_table, random_checkpoint
from llama.checkpoints.files import BUNDLED
from llama.checkpoints.loader import load_model
from llama.engine import Engine, engine_options_for
from llama.engine.runner import Features

MAX_TOP_LOGPROBS = 20  # the server's limit


@torch.no_grad()
def step_seconds(engine: Engine, width: int, features: Features, steps: int) -> float:
    """Median seconds of ``steps`` compiled steps on ``width`` idle slots at the cache's 64th position."""
    vocab = engine.model.params.vocab_size
    live = torch.zeros(width, dtype=torch.bool)
    noise = torch.ones(width, vocab if features.sampling else 1)
    tables = engine.runner.decode_tables(width, 64)
    engine.runner.positions[:width] = 63
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.runner.compiled_step(tables, live, noise, features).tolist()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.set_defaults(ckpt_dir=str(BUNDLED))
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="steps timed per round")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = args.ckpt_dir or random_checkpoint(args, tmp)
        model = load_model(
            ckpt_dir, checkpoint_args(ckpt_dir, 256, args.batch_size), torch.device("cpu"), torch.float32
        )
    engine = Engine(model, None, engine_options_for(model, compile=True))
    alternatives = min(1 << (MAX_TOP_LOGPROBS - 1).bit_length(), model.params.vocab_size)
    variants = {
        "greedy only": Features(False, False, True, 0),
        "greedy rows' graph": Features(False, False, True, alternatives, constrained=True),
        "whole sampler": Features(True, True, True, alternatives, constrained=True),
    }
    widths = sorted({1, args.batch_size})
    start = time.perf_counter()
    for width in widths:
        for features in variants.values():
            step_seconds(engine, width, features, 1)
    print(f"compiled {len(widths) * len(variants)} graphs in {time.perf_counter() - start:.1f} s")
    timings = {(name, width): [] for name in variants for width in widths}
    for _ in range(args.rounds):
        for width in widths:
            for name, features in variants.items():
                timings[name, width].append(step_seconds(engine, width, features, args.steps))
    rows = []
    for width in widths:
        greedy, *others = (statistics.median(timings[name, width]) for name in variants)
        rows.append(
            [width, f"{greedy * 1e3:.3f}", *(f"{seconds * 1e3:.3f} ({seconds / greedy:.2f}x)" for seconds in others)]
        )
    params = model.params
    title = (
        f"compiled decode step, ms (median of {args.rounds} rounds x {args.steps} steps); dim {params.dim}, "
        f"{params.n_layers} layers, vocab {params.vocab_size}, {torch.get_num_threads()} threads"
    )
    print_table(title, ["width", "greedy only", f"greedy rows' graph (top {alternatives})", "whole sampler"], rows)


if __name__ == "__main__":
    main()
