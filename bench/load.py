"""Peak resident memory added by loading a checkpoint on the CPU, against the checkpoint's size.

With ``--impl``: load once, in this fresh process, run one token through the model (memory-mapped
weights are read on first use), and print the load time and the peak resident memory added (JSON);
``compare.py`` runs it so, in a subprocess per measurement.

    python bench/load.py --ckpt_dir CKPT --impl llama --dtype bfloat16
    python bench/load.py --ckpt_dir HF_DIR --impl transformers --dtype bfloat16
    python bench/load.py --ckpt_dir CKPT --impl meta --meta_llama PATH --dtype bfloat16

Without ``--impl``: rounds of fresh processes alternating this project's loading and, with
``--meta_llama``, Meta's reference's, and a table of the medians (``--ckpt_dir`` defaults to a random
134M-parameter bfloat16 checkpoint, 268 MB):

    python bench/load.py --dtype bfloat16 --max_seq_len 1024 --meta_llama PATH --rounds 3

``--impl meta`` runs the loading code of Meta's ``Llama.build`` (github.com/meta-llama/llama,
``llama/generation.py``; ``--meta_llama``: a clone of it) on the CPU: ``torch.load`` of the shard
(read whole, not memory-mapped), Meta's ``Transformer`` (``llama/model.py``, unchanged) built with the
default dtype set to ``--dtype``, as Meta sets ``torch.cuda.HalfTensor``, then ``load_state_dict``. Its
fairscale layers are stood in for by their one-process equivalents (``nn.Linear``, ``nn.Embedding``)
and its caches' ``.cuda()`` is the identity: on a GPU its model would live in GPU memory and only the
checkpoint in the process's.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from common import DTYPES, add_checkpoint_args, checkpoint_args, checkpoint_bytes, print_table, random_checkpoint
from llama.checkpoints.loader import checkpoint_folder, load_model, shard_paths
from llama.engine.engine import engine_options_for, setup_pool
from llama.layers.quantize import parse_quantize


def status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak() -> None:
    """Restart the peak (VmHWM) from the current RSS (Linux >= 4.0); ru_maxrss cannot be reset."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def stand_in_fairscale() -> None:
    """fairscale's model-parallel layers as one process has them, for Meta's model.py."""
    initialize = types.ModuleType("fairscale.nn.model_parallel.initialize")
    initialize.get_model_parallel_world_size = lambda: 1
    layers = types.ModuleType("fairscale.nn.model_parallel.layers")
    layers.ColumnParallelLinear = lambda in_features, out_features, bias=True, **_: nn.Linear(
        in_features, out_features, bias=bias
    )
    layers.RowParallelLinear = lambda in_features, out_features, bias=True, **_: nn.Linear(
        in_features, out_features, bias=bias
    )
    layers.ParallelEmbedding = lambda num_embeddings, embedding_dim, **_: nn.Embedding(num_embeddings, embedding_dim)
    model_parallel = types.ModuleType("fairscale.nn.model_parallel")
    model_parallel.initialize, model_parallel.layers = initialize, layers
    fairscale_nn = types.ModuleType("fairscale.nn")
    fairscale_nn.model_parallel = model_parallel
    fairscale = types.ModuleType("fairscale")
    fairscale.nn = fairscale_nn
    sys.modules.update(
        {
            "fairscale": fairscale,
            "fairscale.nn": fairscale_nn,
            "fairscale.nn.model_parallel": model_parallel,
            "fairscale.nn.model_parallel.initialize": initialize,
            "fairscale.nn.model_parallel.layers": layers,
        }
    )


def load_meta(ckpt_dir: str, meta_llama: str, dtype: torch.dtype, max_seq_len: int, max_batch_size: int) -> nn.Module:
    """Meta's ``Llama.build`` from ``torch.load`` to ``load_state_dict``, on the CPU (module docstring)."""
    stand_in_fairscale()
    spec = importlib.util.spec_from_file_location("meta_llama_model", Path(meta_llama) / "llama" / "model.py")
    meta = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(meta)
    checkpoint = torch.load(shard_paths(ckpt_dir)[0], map_location="cpu")
    params = checkpoint_folder(ckpt_dir).params()
    known = {f.name for f in fields(meta.ModelArgs)}
    model_args = meta.ModelArgs(
        max_seq_len=max_seq_len, max_batch_size=max_batch_size, **{k: v for k, v in params.items() if k in known}
    )
    model_args.vocab_size = checkpoint["tok_embeddings.weight"].shape[0]  # Meta takes the tokenizer's
    cuda, torch.Tensor.cuda = torch.Tensor.cuda, lambda self, *args, **kwargs: self
    torch.set_default_dtype(dtype)
    try:
        model = meta.Transformer(model_args)
    finally:
        torch.Tensor.cuda = cuda
        torch.set_default_dtype(torch.float32)
    model.load_state_dict(checkpoint, strict=False)
    return model


def measure(args: argparse.Namespace) -> dict:
    """One load and one token in this process (``--impl``)."""
    dtype = DTYPES[args.dtype]
    if args.impl == "transformers":
        from transformers import LlamaForCausalLM
    reset_peak()
    before = status_bytes("VmRSS")
    start = time.perf_counter()
    if args.impl == "llama":  # Llama.build minus the tokenizer: read params, map the shards, build the model
        model_args = checkpoint_args(args.ckpt_dir, args.max_seq_len, args.max_batch_size)
        model = load_model(args.ckpt_dir, model_args, torch.device("cpu"), dtype, parse_quantize(args.quantize))
        setup_pool(model, engine_options_for(model))  # the pool Llama.build's engine sets up
    elif args.impl == "meta":
        model = load_meta(args.ckpt_dir, args.meta_llama, dtype, args.max_seq_len, args.max_batch_size)
    else:
        model = LlamaForCausalLM.from_pretrained(args.ckpt_dir, dtype=dtype)
    seconds = time.perf_counter() - start
    peak_at_load = status_bytes("VmHWM")
    # memory-mapped weights are read on first use: one token through the model touches every weight
    start = time.perf_counter()
    with torch.inference_mode():
        if args.impl == "transformers":
            model(torch.ones(1, 1, dtype=torch.long))
        else:
            model.forward(torch.ones(1, 1, dtype=torch.long), 0)
    first_token_seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    caches = [
        getattr(m, name, None) for m in model.modules() for name in ("cache_k", "cache_v")
    ]  # buffers, or Meta's attributes
    cache = sum(t.numel() * t.element_size() for t in caches if isinstance(t, torch.Tensor))
    tensors = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    disk = sum(p.stat().st_size for p in Path(args.ckpt_dir).iterdir() if p.suffix in (".pth", ".safetensors", ".bin"))
    return {
        "load_s": seconds,
        "first_token_s": first_token_seconds,
        "peak_added_at_load_bytes": peak_at_load - before,
        "peak_added_bytes": peak - before,
        "kv_cache_bytes": cache,
        "model_bytes": tensors,
        "checkpoint_bytes": disk,
        "peak_added_ratio": (peak - before) / disk,
    }


def compare(args: argparse.Namespace) -> None:
    """Alternating rounds of fresh processes, one per implementation, and the medians."""
    impls = ["llama"] + (["meta"] if args.meta_llama else [])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = args.ckpt_dir or random_checkpoint(args, tmp)
        runs = {impl: [] for impl in impls}
        for _ in range(args.rounds):
            for impl in impls:
                command = [
                    sys.executable,
                    __file__,
                    "--impl",
                    impl,
                    "--ckpt_dir",
                    ckpt_dir,
                    "--dtype",
                    args.dtype,
                    "--max_seq_len",
                    str(args.max_seq_len),
                    "--max_batch_size",
                    str(args.max_batch_size),
                ]
                command += ["--meta_llama", args.meta_llama] if impl == "meta" else []
                command += ["--quantize", args.quantize] if args.quantize and impl == "llama" else []
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
                runs[impl].append(json.loads(result.stdout.splitlines()[-1]))
        disk = checkpoint_bytes(ckpt_dir)
    rows = []
    for impl, measured in runs.items():

        def median(key, measured=measured):
            return statistics.median(m[key] for m in measured)

        rows.append(
            [
                impl,
                f"{median('load_s'):.2f}",
                f"{median('peak_added_at_load_bytes') / 2**20:.0f}",
                f"{median('peak_added_bytes') / 2**20:.0f}",
                f"{median('kv_cache_bytes') / 2**20:.0f}",
                f"{median('peak_added_bytes') / disk:.2f}x",
                f"{(median('peak_added_bytes') - median('kv_cache_bytes')) / disk:.2f}x",
            ]
        )
    print_table(
        f"loading {disk / 2**20:.0f} MiB of checkpoint as {args.dtype} on the CPU, "
        f"{args.max_batch_size} x {args.max_seq_len} cache, "
        f"median of {args.rounds} fresh processes each",
        [
            "impl",
            "load s",
            "peak added at load MiB",
            "peak added after 1 token MiB",
            "of which KV cache MiB",
            "/ checkpoint",
            "less the cache / checkpoint",
        ],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument(
        "--impl",
        choices=["llama", "transformers", "meta"],
        help="one measurement in this process (JSON); none: the comparison",
    )
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--max_seq_len", type=int, default=512, help="KV cache length (llama allocates it at load)")
    parser.add_argument("--max_batch_size", type=int, default=1)
    parser.add_argument(
        "--quantize", default=None, help="llama only: int8, int4, int4-g32 ... (quantized while loading)"
    )
    parser.add_argument(
        "--meta_llama", help="a clone of github.com/meta-llama/llama, for --impl meta and the comparison"
    )
    parser.add_argument("--rounds", type=int, default=3, help="the comparison's rounds")
    args = parser.parse_args()
    if args.impl is None:
        compare(args)
        return
    if args.ckpt_dir is None:
        parser.error("--impl needs --ckpt_dir")
    print(json.dumps(measure(args)))


if __name__ == "__main__":
    main()
