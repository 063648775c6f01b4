"""Fine-tuning speed and memory side by side with transformers + peft: the same weights, batch and
settings, full fine-tuning, LoRA and QLoRA, in alternating rounds, each measurement in a process of its
own (so that its peak memory is its own).

    python bench/finetune.py                                  # the bundled model on the CPU
    python bench/finetune.py --shape 134m --batch_size 1 --seq_len 256
    python bench/finetune.py --device cuda --shape llama-3.2-3b --methods lora,qlora --batch_size 2 --seq_len 4096 \\
        --pack --compile --activation_checkpointing --reference none   # bench/gpu.py's rows

Ours is ``llama.training.loop.train`` on the model ``python -m llama.finetune`` builds (LoRA beside the
project's linears, QLoRA beside its int4 weights); the reference is transformers' ``LlamaForCausalLM``
with peft's ``get_peft_model`` (no int4 base that runs on a CPU exists there: its QLoRA column is empty).
Both take AdamW steps on the same fixed batch, every token learnt. Tokens/s counts every position of
the batch. Peak memory on a GPU is torch's peak allocation; on a CPU two figures: the process's
resident peak (Python, torch's libraries, and what the allocator keeps after freeing, included), and
the peak of the tensors alive at once (the GPU's measure: the tensors alive before a further step
plus the most its allocations hold at once, from torch's profiler).
"""

import argparse
import contextlib
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_SHAPE, checkpoint_args, print_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "checkpoints" / "tiny-stdlib"
SHAPES = {
    "bundled": None,
    "134m": {**DEFAULT_SHAPE},
    "llama-3.2-3b": {
        "dim": 3072,
        "n_layers": 28,
        "n_heads": 24,
        "n_kv_heads": 8,
        "vocab_size": 128256,
        "multiple_of": 256,
        "ffn_dim_multiplier": 1.0,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
        "rope_scaling_factor": 32,
    },
    "tiny": {"dim": 128, "n_layers": 2, "n_heads": 4, "vocab_size": 512, "multiple_of": 64},  # bench/gpu.py's dry run
    # a model whose step is mostly its output layer and loss: Llama 3's vocabulary on a small body
    "large-vocab": {"dim": 256, "n_layers": 2, "n_heads": 4, "vocab_size": 128256, "multiple_of": 64},
}
METHODS = ("full", "lora", "qlora")
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_checkpoint(params: dict, ckpt_dir: str, device: str) -> str:
    """A checkpoint of ``params``' shape in Meta's layout (bfloat16, N(0, 0.02), unit norms), drawn on
    ``device`` (fast on a GPU) tensor by tensor."""
    from llama.checkpoints.loader import layout_of
    from llama.checkpoints.writers import save_checkpoint
    from llama.model import ModelArgs

    generator = torch.Generator(device).manual_seed(0)
    state = {
        key: torch.ones(shape, dtype=torch.bfloat16)
        if key.endswith("norm.weight")
        else (0.02 * torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)).cpu()
        for key, (shape, _) in layout_of(ModelArgs.from_dict(params)).items()
    }
    save_checkpoint(ckpt_dir, params, state, dtype=torch.bfloat16)
    return ckpt_dir


def fixed_batch(options, vocab_size: int):
    """The batch every step trains on: random tokens, all learnt; packed: documents of a quarter row each."""
    from llama.training.data import Batch, Example, packed_batch

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab_size, (options.batch_size, options.seq_len), generator=generator)
    if not options.pack:
        return Batch(tokens, tokens)
    quarter = options.seq_len // 4
    documents = [
        Example(row[i : i + quarter].tolist(), row[i : i + quarter].tolist())
        for row in tokens
        for i in range(0, options.seq_len, quarter)
    ]
    return packed_batch(documents, options.seq_len)


def compute_dtype(device: torch.device, method: str) -> torch.dtype:
    from llama.layers.quantize import training_cpu_dtype

    if device.type == "cuda":
        return torch.bfloat16
    return training_cpu_dtype() if method == "qlora" else torch.float32


def run_ours(options, device: torch.device):
    """Seconds of ``options.steps`` steps of the project's loop, after one warm-up step, and a
    function that takes one more step."""
    from llama.checkpoints.loader import load_model
    from llama.layers.lora import LoraConfig, apply_lora
    from llama.layers.quantize import Quantization
    from llama.training.log import MetricsLog
    from llama.training.loop import Schedule, Supervised, make_optimizer, train
    from llama.training.parallelize import trainable_parameters, wrap_for_training

    method = options.worker_method
    args = checkpoint_args(options.ckpt_dir, options.seq_len, 1)
    dtype = compute_dtype(device, method)
    model = load_model(
        options.ckpt_dir,
        args,
        device,
        torch.float32 if method == "full" else dtype,
        Quantization(4, 64) if method == "qlora" else None,
    )
    if method != "full":
        torch.manual_seed(0)
        apply_lora(model, LoraConfig(rank=options.lora_rank, alpha=2.0 * options.lora_rank))
    wrap_for_training(model, options.activation_checkpointing, options.compile, None, None)
    optimizer = make_optimizer(trainable_parameters(model).values(), 1e-5, 0.0)
    batch = fixed_batch(options, args.vocab_size)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    log = MetricsLog(None, 1 + options.steps, every=10**9)

    def steps(first: int, last: int):
        train(
            model,
            optimizer,
            Supervised(model, lambda step: [batch], device, autocast),
            Schedule(1e-5, last, 0, "constant"),
            log,
            1.0,
            first,
        )

    steps(0, 1)  # warm-up (and compilation)
    return timed(lambda: steps(1, 1 + options.steps), device), lambda: steps(1 + options.steps, 2 + options.steps)


def run_reference(options, device: torch.device):
    """Seconds of ``options.steps`` AdamW steps of transformers (+ peft for LoRA), after one warm-up
    step, and a function that takes one more step."""
    from peft import LoraConfig, get_peft_model

    from bench.transformers_llama import to_transformers
    from llama.checkpoints.files import load_tensor_dict
    from llama.checkpoints.loader import checkpoint_folder

    if options.worker_method == "qlora":
        raise SystemExit("the reference has no int4 base for QLoRA here")
    state = {
        k: v
        for k, v in load_tensor_dict(Path(options.ckpt_dir) / "consolidated.00.pth", "checkpoint shard").items()
        if k != "rope.freqs"
    }
    params = checkpoint_folder(options.ckpt_dir).params()
    vocab_size = state["tok_embeddings.weight"].shape[0]
    model = to_transformers(state, params, vocab_size, options.seq_len, dtype=torch.float32).to(device).train()
    del state
    dtype = compute_dtype(device, options.worker_method)
    if options.worker_method == "lora":
        torch.manual_seed(0)
        model.requires_grad_(False)
        if dtype != torch.float32:
            model.to(dtype)
        model = get_peft_model(
            model, LoraConfig(r=options.lora_rank, lora_alpha=2 * options.lora_rank, target_modules=PEFT_TARGETS)
        )
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()
    if options.activation_checkpointing:
        model.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    batch = fixed_batch(options, vocab_size)
    tokens = batch.tokens.to(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step():
        with autocast:
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    return timed(lambda: [step() for _ in range(options.steps)], device), step


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def live_tensor_bytes() -> int:
    """The bytes of every CPU tensor's storage that Python holds now, each storage once."""
    storages = {}
    for obj in gc.get_objects():
        if (
            issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu" and obj.layout == torch.strided
        ):  # type(): a dead weak proxy cannot be asked
            storage = obj.untyped_storage()
            with contextlib.suppress(RuntimeError):  # the fake tensors torch.compile keeps hold no memory
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def peak_tensor_bytes(step) -> int:
    """The most bytes of CPU tensors alive at once during ``step()``: those alive before it, plus the
    highest running sum of its allocations and frees (torch's profiler records each)."""
    from torch.profiler import ProfilerActivity, profile

    before = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    allocations = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    return before + max(0, *itertools.accumulate(nbytes for _, nbytes in allocations))


def worker(options) -> None:
    """One measurement: print {"tokens_per_s", "peak_gib"} (and on a CPU "tensors_peak_gib") as JSON."""
    import resource

    device = torch.device(options.device)
    if options.threads:
        torch.set_num_threads(options.threads)
    seconds, one_step = (run_ours if options.worker_impl == "ours" else run_reference)(options, device)
    result = {"tokens_per_s": options.steps * options.batch_size * options.seq_len / seconds}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        result["peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
        result["tensors_peak_gib"] = peak_tensor_bytes(one_step) / 2**30
    print(json.dumps(result))


def measure(options, impl: str, method: str, ckpt_dir: str):
    command = [
        sys.executable,
        __file__,
        "--worker_impl",
        impl,
        "--worker_method",
        method,
        "--ckpt_dir",
        ckpt_dir,
        *[f"--{name}={getattr(options, name)}" for name in ("device", "batch_size", "seq_len", "steps", "lora_rank")],
        *(["--threads", str(options.threads)] if options.threads else []),
        *[f"--{flag}" for flag in ("pack", "compile", "activation_checkpointing") if getattr(options, flag)],
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    if result.returncode:
        return None, (result.stdout + result.stderr).strip().splitlines()[-1:]
    return json.loads(result.stdout.strip().splitlines()[-1]), None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--shape",
        default="bundled",
        choices=list(SHAPES),
        help="the bundled checkpoint, or a random one of these shapes",
    )
    parser.add_argument("--ckpt_dir", default=None, help="a Meta-layout checkpoint (one shard) instead of --shape")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: full, lora, qlora")
    parser.add_argument(
        "--reference", default="transformers", choices=["transformers", "none"], help="measure transformers + peft too"
    )
    parser.add_argument("--batch_size", type=int, default=4, help="rows per step")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per row")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    parser.add_argument(
        "--lora_rank", type=int, default=8, help="LoRA's rank (alpha = 2 x rank) on every linear of the blocks"
    )
    parser.add_argument(
        "--pack",
        action="store_true",
        help="rows packed with four documents each (ours; the reference trains unpacked rows)",
    )
    parser.add_argument("--compile", action="store_true", help="compile each block (ours)")
    parser.add_argument(
        "--activation_checkpointing", action="store_true", help="recompute each block's activations (both)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads in each measurement; default: torch's choice"
    )
    parser.add_argument("--worker_impl", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_method", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.worker_impl:
        worker(options)
        return

    scratch = tempfile.TemporaryDirectory(prefix="bench-finetune-")
    ckpt_dir = options.ckpt_dir or (
        str(BUNDLED)
        if options.shape == "bundled"
        else random_checkpoint(SHAPES[options.shape], scratch.name, options.device)
    )
    methods = options.methods.split(",")
    impls = ["ours"] + (["transformers+peft"] if options.reference != "none" else [])
    results = {(impl, method): [] for impl in impls for method in methods}
    errors = {}
    for round_ in range(options.rounds):
        for method in methods:
            for impl in impls if round_ % 2 == 0 else impls[::-1]:
                if impl != "ours" and method == "qlora":
                    continue
                measured, error = measure(options, "ours" if impl == "ours" else "reference", method, ckpt_dir)
                if measured:
                    results[impl, method].append(measured)
                else:
                    errors[impl, method] = error
        print(f"round {round_ + 1} of {options.rounds} done", flush=True)

    memories = ["peak_gib"] + (["tensors_peak_gib"] if options.device == "cpu" else [])
    rows = []
    for method in methods:
        medians = {
            impl: {key: statistics.median(r[key] for r in results[impl, method]) for key in ["tokens_per_s", *memories]}
            for impl in impls
            if results[impl, method]
        }
        for impl, median in medians.items():
            reference = medians.get("transformers+peft")
            ratio = (
                f"{median['tokens_per_s'] / reference['tokens_per_s']:.2f}x" if reference and impl == "ours" else "-"
            )
            rows.append(
                [method, impl, f"{median['tokens_per_s']:.0f}", ratio, *(f"{median[key]:.2f}" for key in memories)]
            )
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if line.startswith("Model name")
            ),
            "?",
        )
        if options.device == "cpu"
        else torch.cuda.get_device_name()
    )
    print_table(
        f"{cpu}; {options.shape if not options.ckpt_dir else ckpt_dir}, batch {options.batch_size} x {options.seq_len}"
        f"{', packed' if options.pack else ''}{', compiled' if options.compile else ''}, "
        f"{options.steps} steps, median of "
        f"{options.rounds} alternating rounds; load average {os.getloadavg()[0]:.1f}",
        [
            "method",
            "implementation",
            "tokens/s",
            "vs transformers+peft",
            *(["peak GiB"] if options.device != "cpu" else ["resident peak GiB", "tensors peak GiB"]),
        ],
        rows,
    )
    if (
        "lora" in methods
        and "qlora" in methods
        and ("ours", "lora") in results
        and results["ours", "qlora"]
        and results["ours", "lora"]
    ):
        for key in memories:
            lora_peak = statistics.median(r[key] for r in results["ours", "lora"])
            qlora_peak = statistics.median(r[key] for r in results["ours", "qlora"])
            print(
                f"QLoRA's {'peak memory' if key == 'peak_gib' else 'peak of tensors'} / LoRA's: "
                f"{qlora_peak / lora_peak:.2f}"
            )
    for (impl, method), error in errors.items():
        print(f"FAILED: {impl} {method}: {error}")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
