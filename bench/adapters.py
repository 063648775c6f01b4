"""LoRA adapters served per request against the base model, side by side in one run: decode tokens/s of 8 rows.

Workloads, each 8 rows of random 16-token prompts decoding ``--gen_tokens`` greedy tokens in one batch, timed in
alternating rounds (base, four, one, base rows served, base, ...) so that load from other processes hits them alike;
the median of ``--rounds`` rounds each, and the median of its ratios to the base's in the same round:

- base: the model without adapters, on an engine of its own (no adapter layers);
- four: two rows each of four adapters, on an engine serving the four (``Llama.build(adapters=...)``);
- one: every row of one adapter, on an engine serving that one;
- base rows, served: rows of no adapter on the engine serving four (eager they skip the adapter layers; the compiled
  step runs them, masked, so that one graph serves every mix).

The adapters are random, of rank ``--rank`` on every target (wq, wk, wv, wo, w1, w2, w3), served with the engine's
defaults (max_loras 8, max_lora_rank 64). Models: the bundled model and a random 134M (stories110M's shapes with an
untied output, bench/common.py), in float32, eager and compiled (each compiled engine warms its graph in an untimed
first round). Then the memory of one more adapter: the bytes its rank columns take beside the model's linears, and
its own tensors' (the file's) bytes.

    python bench/adapters.py                            # both models, eager and compiled, on the CPU
    python bench/adapters.py --models bundled --modes eager --rounds 3
    python bench/adapters.py --device cuda
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

# OpenMP's waiting threads sleep instead of spinning, as in the inference commands: set before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from common import DEFAULT_SHAPE, checkpoint_args, random_checkpoint
from llama.checkpoints.files import BUNDLED
from llama.checkpoints.loader import load_model
from llama.checkpoints.peft import META_MODULES, read_adapter, write_adapter
from llama.engine import Engine
from llama.layers.lora import TARGET_SETS, LoraConfig
from llama.model import ModelArgs
from llama.options import EngineOptions, GenerationOptions

ROWS, PROMPT_LEN = 8, 16


def random_adapter(folder: Path, ckpt_dir: str, args: ModelArgs, rank: int, seed: int) -> str:
    """A random adapter of ``rank`` on every target of ``args``'s model, written in peft's files; its folder."""
    generator = torch.Generator().manual_seed(seed)
    kv = args.n_kv_heads * args.head_dim
    shapes = {  # (out, in) of each target
        "wq": (args.n_heads * args.head_dim, args.dim),
        "wk": (kv, args.dim),
        "wv": (kv, args.dim),
        "wo": (args.dim, args.n_heads * args.head_dim),
        "w1": (args.ffn_hidden_dim, args.dim),
        "w3": (args.ffn_hidden_dim, args.dim),
        "w2": (args.dim, args.ffn_hidden_dim),
    }
    state = {}
    for layer in range(args.n_layers):
        for name, (out, inp) in shapes.items():
            lora_a = torch.randn(rank, inp, generator=generator) / inp**0.5
            state[f"layers.{layer}.{META_MODULES[name]}"] = (lora_a, 0.02 * torch.randn(out, rank, generator=generator))
    folder.mkdir()
    write_adapter(
        str(folder), state, LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGET_SETS["all"]), args, ckpt_dir
    )
    return str(folder)


def decode(engine: Engine, prompts: List[List[int]], adapters: List[Optional[str]], gen_tokens: int) -> float:
    """Seconds to decode every prompt (its row computing with its adapter) to ``gen_tokens`` tokens, in one batch."""
    start = time.perf_counter()
    requests = [
        engine.submit(
            [prompt],
            GenerationOptions(max_gen_len=gen_tokens, temperature=0, stop_tokens=[], adapter=name),
            stream_text=False,
        )
        for prompt, name in zip(prompts, adapters)
    ]
    while not all(request.done for request in requests):
        engine.step()
    return time.perf_counter() - start


def adapter_bytes(engine: Engine, rank: int) -> tuple:
    """(the device bytes an adapter of ``rank`` takes in the layers, its own tensors' bytes)."""
    layers = engine.adapters.layers.values()
    per_column = sum(
        (layer.lora_A[0].numel() + layer.lora_B[0].numel()) * layer.lora_A.element_size() for layer in layers
    )
    adapter = next(iter(engine.adapters.registered.values()))
    own = sum(a.numel() + b.numel() for a, b in adapter.tensors.values()) * torch.finfo(engine.adapters.dtype).bits // 8
    return rank * per_column, own


def measure(ckpt_dir: str, title: str, args: argparse.Namespace, compile: bool) -> None:
    model_args = checkpoint_args(ckpt_dir, PROMPT_LEN + args.gen_tokens + 16, ROWS)
    device = torch.device(args.device)
    options = EngineOptions(ROWS, model_args.max_seq_len, compile=compile)
    with tempfile.TemporaryDirectory() as folder:
        names = [f"adapter{i}" for i in range(4)]
        folders = {
            name: random_adapter(Path(folder) / name, ckpt_dir, model_args, args.rank, i)
            for i, name in enumerate(names)
        }
        read = {name: read_adapter(path, model_args) for name, path in folders.items()}

    def engine(adapters: Optional[Dict]) -> Engine:
        return Engine(load_model(ckpt_dir, model_args, device, torch.float32), None, options, adapters=adapters)

    engines = {"base": engine(None), "four": engine(read), "one": engine({names[0]: read[names[0]]})}
    generator = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, model_args.vocab_size, (PROMPT_LEN,), generator=generator).tolist() for _ in range(ROWS)
    ]
    workloads = {
        "base": (engines["base"], [None] * ROWS),
        "four adapters": (engines["four"], [names[i % 4] for i in range(ROWS)]),
        "one adapter": (engines["one"], [names[0]] * ROWS),
        "base rows, served": (engines["four"], [None] * ROWS),
    }
    for engine_, adapters in workloads.values():  # untimed: compiles, and loads the adapters onto the device
        decode(engine_, prompts, adapters, args.gen_tokens)
    times = {name: [] for name in workloads}
    for _ in range(args.rounds):
        for name, (engine_, adapters) in workloads.items():
            times[name].append(decode(engine_, prompts, adapters, args.gen_tokens))
    rates = {name: ROWS * args.gen_tokens / statistics.median(seconds) for name, seconds in times.items()}
    # each round's ratio to the base's time in the same round, whose median follows the neighbours' load less
    ratios = {name: statistics.median(b / t for b, t in zip(times["base"], seconds)) for name, seconds in times.items()}
    mode = "compiled" if compile else "eager"
    print(
        f"\n{title}, {mode}: {ROWS} rows x {args.gen_tokens} tokens, rank {args.rank}, median of {args.rounds} rounds"
    )
    print(f"{'workload':<18} {'tokens/s':>9} {'x base':>7}")
    for name, rate in rates.items():
        print(f"{name:<18} {rate:>9.1f} {ratios[name]:>6.2f}x")
    device_bytes, own = adapter_bytes(engines["four"], args.rank)
    print(
        f"one more adapter of rank {args.rank}: {device_bytes / 2**20:.2f} MiB on the device, "
        f"its tensors {own / 2**20:.2f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["bundled", "134M"], default=["bundled", "134M"])
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--gen_tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        for model in args.models:
            if model == "bundled":
                ckpt_dir, title = str(BUNDLED), f"{BUNDLED.name}, float32"
            else:
                shape = argparse.Namespace(**DEFAULT_SHAPE, n_kv_heads=None, ckpt_dtype="float32")
                ckpt_dir, title = random_checkpoint(shape, folder), "random 134M, float32"
            for mode in args.modes:
                measure(ckpt_dir, title, args, mode == "compiled")


if __name__ == "__main__":
    main()
