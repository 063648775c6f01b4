"""Shared by the benchmarks: a random checkpoint of a given shape, the machine's memory bandwidth,
and the bytes a decode step reads."""

import argparse
import time

import torch

from llama.checkpoints.loader import checkpoint_folder, shard_paths
from llama.checkpoints.writers import save_checkpoint
from llama.model import ModelArgs, Transformer

# stories110M's shapes with an untied output: 134M parameters
DEFAULT_SHAPE = {"dim": 768, "n_layers": 12, "n_heads": 12, "vocab_size": 32000}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt_dir", help="a checkpoint in Meta's layout; default: a random one of the shape below")
    parser.add_argument("--dim", type=int, default=DEFAULT_SHAPE["dim"])
    parser.add_argument("--n_layers", type=int, default=DEFAULT_SHAPE["n_layers"])
    parser.add_argument("--n_heads", type=int, default=DEFAULT_SHAPE["n_heads"])
    parser.add_argument("--n_kv_heads", type=int, default=None)
    parser.add_argument("--vocab_size", type=int, default=DEFAULT_SHAPE["vocab_size"])
    parser.add_argument(
        "--ckpt_dtype", choices=list(DTYPES), default="bfloat16", help="dtype of the random checkpoint's tensors"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def random_checkpoint(args: argparse.Namespace, ckpt_dir: str, seed: int = 0) -> str:
    """Write a random-weight checkpoint of the requested shape to ``ckpt_dir``; its path."""
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads}
    params = {k: v for k, v in params.items() if v is not None}
    torch.manual_seed(seed)
    model = Transformer(
        ModelArgs.from_dict({**params, "vocab_size": args.vocab_size, "max_seq_len": 1, "max_batch_size": 1})
    )
    save_checkpoint(
        ckpt_dir, {**params, "vocab_size": args.vocab_size}, model.state_dict(), dtype=DTYPES[args.ckpt_dtype]
    )
    return ckpt_dir


def checkpoint_args(ckpt_dir: str, max_seq_len: int, max_batch_size: int) -> ModelArgs:
    """ModelArgs of a checkpoint, the vocabulary taken from its params.json or its embedding."""
    folder = checkpoint_folder(ckpt_dir)
    params = folder.params()
    if params.get("vocab_size", -1) < 1:
        params["vocab_size"] = folder.embedding_rows(params)[0]
    return ModelArgs.from_dict({**params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size})


def checkpoint_bytes(ckpt_dir: str) -> int:
    return sum(p.stat().st_size for p in shard_paths(ckpt_dir))


def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s that torch reads from memory (a sum over a tensor far larger than the caches); best of ``repeats``."""
    x = torch.ones(n_bytes // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every weight, except that the embedding contributes one row per token."""
    total = sum(t.numel() * t.element_size() for name, t in model.named_parameters() if "embed" not in name)
    total += sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name.endswith("scales"))
    return total


def print_table(title: str, header: list, rows: list) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header] + rows:
        print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
