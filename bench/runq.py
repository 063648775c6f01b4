"""This project's quantized CPU decoding side by side with llama2.c's int8 ``runq.c``, on the same weights.

The yardstick is a C program that does nothing but decode: ``runq.c`` reads a file of Q8_0 weights
(int8 in groups of 64 with one float32 scale each, its "version 2" format) and a tokenizer file. This
script writes both from our checkpoint (own exporter; the formats are llama2.c's), then alternates
rounds of ``runq`` and of our greedy decoding of the same number of tokens from BOS, and prints the
median tokens/s of each and their ratio. Build ``runq`` outside this repository first:

    gcc -Ofast -fopenmp -march=native runq.c -lm -o runq    # in a checkout of karpathy/llama2.c
    python bench/runq.py --runq /path/to/runq --threads 2                  # 134M random checkpoint
    python bench/runq.py --runq /path/to/runq --threads 2 --dim 2048 --n_layers 22 --n_heads 32 \\
        --n_kv_heads 4                                                       # TinyLlama-1.1B shapes

Both sides time the decoding steps after the first one (``runq`` prints that as "achieved tok/s").
"""

import argparse
import os
import re
import statistics
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, List, Optional

import torch

from common import add_checkpoint_args, checkpoint_args, random_checkpoint
from compare import mode_settings
from llama.checkpoints.loader import load_model
from llama.engine import Engine, engine_options_for
from llama.model import Transformer
from llama.options import GenerationOptions

MAGIC = 0x616B3432  # "ak42"
HEADER_BYTES = 256
RUNQ_GROUP_SIZE = 64  # the group size llama2.c's exporter uses by default


def write_q80(file: BinaryIO, weight: torch.Tensor, group_size: int) -> None:
    """Symmetric int8 per group of ``group_size`` consecutive values: the int8 values, then the float32 scales."""
    groups = weight.float().reshape(-1, group_size)
    scales = groups.abs().amax(dim=1) / 127
    q = torch.round(groups / scales.clamp(min=1e-12)[:, None]).to(torch.int8)
    file.write(q.numpy().tobytes())
    file.write(scales.numpy().astype("<f4").tobytes())


def export_runq_model(model: Transformer, path: str, max_seq_len: int, group_size: int = RUNQ_GROUP_SIZE) -> None:
    """Write ``model`` (float weights) in runq's version-2 format: a 256-byte header, the norms in
    float32, then every matrix in Q8_0, each kind for all layers in turn, the output last."""
    p, state = model.params, model.state_dict()  # Meta's keys: wq, wk, wv and w1, w3 apart
    layers = [f"layers.{i}." for i in range(p.n_layers)]
    hidden_dim = p.ffn_hidden_dim
    for size, name in ((p.dim, "dim"), (hidden_dim, "hidden_dim")):
        if size % group_size:
            raise ValueError(f"runq's group size {group_size} must divide {name} = {size}")
    with open(path, "wb") as file:
        file.write(struct.pack("<Ii", MAGIC, 2))
        file.write(
            struct.pack("<7i", p.dim, hidden_dim, p.n_layers, p.n_heads, p.n_kv_heads, p.vocab_size, max_seq_len)
        )
        file.write(struct.pack("<Bi", 0, group_size))  # 0: the output projection is its own matrix
        file.write(b"\0" * (HEADER_BYTES - file.tell()))
        norms = (
            [state[layer + "attention_norm.weight"] for layer in layers]
            + [state[layer + "ffn_norm.weight"] for layer in layers]
            + [state["norm.weight"]]
        )
        for norm in norms:
            file.write(norm.float().numpy().astype("<f4").tobytes())
        matrices = [state["tok_embeddings.weight"]]
        for kind in (
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
        ):
            matrices += [state[f"{layer}{kind}.weight"] for layer in layers]
        for matrix in matrices + [state["output.weight"]]:
            write_q80(file, matrix, group_size)


def export_runq_tokenizer(path: str, pieces: List[str], scores: List[float]) -> None:
    """llama2.c's tokenizer file: the longest piece's byte length, then (score, length, bytes) per id."""
    encoded = [piece.encode("utf-8") for piece in pieces]
    with open(path, "wb") as file:
        file.write(struct.pack("<I", max(len(b) for b in encoded)))
        for piece, score in zip(encoded, scores):
            file.write(struct.pack("<fI", score, len(piece)))
            file.write(piece)


def numbered_pieces(vocab_size: int) -> List[str]:
    """A vocabulary for a random checkpoint: id i is the text "<i>", so runq's output names the ids."""
    return [f"<{i}>" for i in range(vocab_size)]


def run_runq(runq: str, model_path: str, tokenizer_path: str, steps: int, threads: int):
    """(tokens/s, generated ids) of one greedy runq run from BOS."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(
        [runq, model_path, "-z", tokenizer_path, "-t", "0", "-n", str(steps), "-i", ""],
        capture_output=True,
        text=True,
        env=env,
    )
    match = re.search(r"achieved tok/s: ([0-9.]+)", result.stderr)
    if result.returncode or not match:
        raise RuntimeError(f"{runq} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return float(match.group(1)), [int(i) for i in re.findall(r"<(\d+)>", result.stdout)]


def run_ours(engine: Engine, steps: int):
    """(tokens/s, generated ids) of greedy decoding from BOS on the engine of ``Llama.generate``,
    timed as runq times itself: from the first token on."""
    request = engine.submit(
        [[1]], GenerationOptions(max_gen_len=steps, temperature=0, stop_tokens=[]), stream_text=False
    )
    start = None
    for _ in engine.run_until_done(request):
        if start is None:
            start = time.perf_counter()
    tokens = request.tokens[0]  # the context holds BOS and steps - 1 of them
    return (len(tokens) - 1) / (time.perf_counter() - start), tokens


def agreement(a: List[int], b: List[int]) -> int:
    """Length of the common prefix of two greedy continuations."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--runq", required=True, help="path to the runq binary built from llama2.c's runq.c")
    parser.add_argument("--modes", default="int8,int4", help="this project's modes to time (see bench/compare.py)")
    parser.add_argument(
        "--compiled_modes", default="", help="modes also timed with the decode step compiled, e.g. int8,int4"
    )
    parser.add_argument("--steps", type=int, default=128, help="positions decoded per run, BOS included")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if not Path(args.runq).is_file():
        raise FileNotFoundError(f"--runq {args.runq}: no such file; build it from llama2.c's runq.c (see --help)")

    scratch = tempfile.TemporaryDirectory(prefix="llama-runq-")
    ckpt_dir = args.ckpt_dir or random_checkpoint(args, str(Path(scratch.name) / "llama"))
    model_args = checkpoint_args(ckpt_dir, args.steps, 1)
    model_path, tokenizer_path = str(Path(scratch.name) / "model.bin"), str(Path(scratch.name) / "tokenizer.bin")
    export_runq_model(load_model(ckpt_dir, model_args, torch.device("cpu"), torch.float32), model_path, args.steps)
    export_runq_tokenizer(tokenizer_path, numbered_pieces(model_args.vocab_size), [0.0] * model_args.vocab_size)
    models = {
        mode: load_model(ckpt_dir, model_args, torch.device("cpu"), *mode_settings(mode))
        for mode in args.modes.split(",")
    }
    steps = {mode: Engine(model, None, engine_options_for(model)) for mode, model in models.items()}
    for mode in filter(None, args.compiled_modes.split(",")):  # the same model, its step compiled
        steps[f"{mode} compiled"] = Engine(models[mode], None, engine_options_for(models[mode], compile=True))
    print(
        f"checkpoint {ckpt_dir}, {model_args.dim} dim, {model_args.n_layers} layers; "
        f"{threads} threads; {args.steps} positions per run"
    )

    speeds = {name: [] for name in ["runq"] + list(steps)}
    continuations = {}
    run_runq(args.runq, model_path, tokenizer_path, 8, threads)  # warm-up: the file in the page cache
    for step in steps.values():  # every attended-length bucket of a compiled step, compiled before timing
        run_ours(step, args.steps)
    for r in range(args.rounds):
        tok_s, continuations["runq"] = run_runq(args.runq, model_path, tokenizer_path, args.steps, threads)
        speeds["runq"].append(tok_s)
        for name, step in steps.items():
            tok_s, continuations[name] = run_ours(step, args.steps)
            speeds[name].append(tok_s)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {s[-1]:.1f}" for n, s in speeds.items()), flush=True)

    base = statistics.median(speeds["runq"])
    print(
        f"\n{'implementation':<16}{'tok/s (median)':>16}{'min-max':>16}{'vs runq':>10}"
        f"{'same greedy tokens as runq':>30}"
    )
    for name, s in speeds.items():
        same = agreement(continuations[name], continuations["runq"])
        print(
            f"{name:<16}{statistics.median(s):>16.1f}{f'{min(s):.1f}-{max(s):.1f}':>16}"
            f"{statistics.median(s) / base:>9.2f}x"
            f"{f'{same}/{len(continuations[name])}':>30}"
        )


if __name__ == "__main__":
    main()
