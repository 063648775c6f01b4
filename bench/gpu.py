"""Every GPU figure of this project from one command, for a machine lent for minutes.

    python bench/gpu.py                  # on a CUDA machine: about 9 minutes
    python bench/gpu.py --dry_run        # the same code paths on the CPU, tiny shapes (CI runs it)

In order, within ``--budget_s`` seconds:

1. ``pytest --device cuda`` on the test files that build their models on ``--device`` (model,
   generation, decoding, sampling, scores, streaming);
2. ``torchrun --nproc_per_node 1`` running the text-completion example on the bundled model over NCCL;
3. a random checkpoint of ``params/llama-2-7b.json``'s shape, loaded in bfloat16, int8 and int4, each
   measured eager and compiled (``--dry_run``: int8 only): batch-1 decode tokens/s, the fraction of
   the GPU's memory bandwidth that reaches (bytes of weights read per token x tokens/s, against a
   large device-to-device copy measured here), prefill tokens/s of one prompt, and the peak device
   memory while loading;
4. the KV cache pool: the bf16 model with 64 slots in a pool sized to 80% of the memory left after
   loading, decode tokens/s (eager) with 1, 8, 32 and 64 rows decoding together; and Llama 3 8B's shapes
   (random weights, bfloat16) with 32 rows of 8K context in a bfloat16 pool, an int8 one and a float8
   one (``--kv_cache_dtype``): the pool's bytes and the decode step's time (eager) with every row's 8K
   tokens cached (``--dry_run``: 4 rows of 64 at tiny shapes);
5. the benchmarks of ``OPTIONAL_BENCHMARKS`` (speculative decoding, the server's mixed workload,
   fine-tuning, GRPO's steps: tokens sampled per second and step time) whose scripts exist and take
   ``--device``, on the device (``--dry_run``: on the CPU, tiny runs).

It prints one table of measurements and one line per check, and exits 1 if a check failed: a test,
torchrun, a compiled step whose logits differ from the eager step's, a load whose peak device memory
exceeds the finished model's (a full-precision copy reached the device), or the time budget.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from common import bytes_per_token, print_table, read_bandwidth
from compare import Ours, cuda_bandwidth, mode_settings, timed
from llama.checkpoints.loader import layout_of, load_model
from llama.checkpoints.writers import save_checkpoint
from llama.engine.engine import engine_options_for, setup_pool
from llama.layers.kv_cache import BlockTables, attended_tables, contiguous_tables
from llama.model import ModelArgs

ROOT = Path(__file__).resolve().parent.parent
CHECKED_TOKENS = 4  # greedy tokens compared between the compiled and the eager engine
DEVICE_TESTS = [
    "test_model.py",
    "test_generation.py",
    "test_decoding.py",
    "test_sampling.py",
    "test_scores.py",
    "test_streaming.py",
]
DRY_RUN_TESTS = "logits_match_transformers"  # one test of the list, for the dry run
SHAPE_7B = ROOT / "params" / "llama-2-7b.json"
DRY_RUN_SHAPE = {"dim": 128, "n_layers": 2, "n_heads": 4, "multiple_of": 64, "norm_eps": 1e-5}
SHAPE_8B = {  # Llama 3 8B's params.json
    "dim": 4096,
    "n_layers": 32,
    "n_heads": 32,
    "n_kv_heads": 8,
    "vocab_size": 128256,
    "multiple_of": 1024,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 500000.0,
}
KV_CACHE_DTYPES = [None, "int8", "float8_e4m3fn"]  # the model's bfloat16, and the 8-bit pools
VOCAB_SIZE = 32000
MODES = ["bf16", "int8", "int4"]
# name -> (script under bench/, its arguments on the GPU, its arguments in the dry run); run when the
# script exists and takes --device, for at most OPTIONAL_LIMIT_S seconds each (or their LONGER_LIMITS_S)
OPTIONAL_BENCHMARKS = {
    "speculative decoding": (
        "speculative.py",
        ["--gen_tokens", "64", "--rounds", "2", "--prompts", "2"],
        [
            "--gen_tokens",
            "12",
            "--rounds",
            "1",
            "--prompts",
            "1",
            "--k",
            "3",
            "--threads",
            "1",
            "--dim",
            "64",
            "--n_layers",
            "2",
            "--n_heads",
            "4",
            "--vocab_size",
            "4096",
        ],
    ),
    "server, mixed workload": (
        "server.py",
        ["--sections", "mixed", "--clients", "8", "--requests_per_client", "2", "--rounds", "1"],
        [
            "--sections",
            "mixed",
            "--clients",
            "2",
            "--requests_per_client",
            "1",
            "--rounds",
            "1",
            "--slots",
            "2",
            "--threads",
            "1",
        ],
    ),
    # torchtune's published A100 figures for this setup: LoRA 8,210 tokens/s at 8.5 GiB, QLoRA 8,035 at 4.6 GiB
    "fine-tuning LoRA and QLoRA, Llama 3.2 3B shapes, batch 2 x 4096 packed, compiled": (
        "finetune.py",
        [
            "--shape",
            "llama-3.2-3b",
            "--methods",
            "lora,qlora",
            "--batch_size",
            "2",
            "--seq_len",
            "4096",
            "--pack",
            "--compile",
            "--activation_checkpointing",
            "--reference",
            "none",
            "--rounds",
            "1",
            "--steps",
            "3",
        ],
        [
            "--methods",
            "lora,qlora",
            "--batch_size",
            "1",
            "--seq_len",
            "32",
            "--reference",
            "none",
            "--rounds",
            "1",
            "--steps",
            "1",
            "--threads",
            "1",
        ],
    ),
    "GRPO with LoRA, Llama 3.2 1B shapes, 8 generations x 256 tokens, eager and compiled rollouts": (
        "post_training.py",
        [
            *("--shapes", "llama-3.2-1b", "--sections", "grpo", "--reference", "none", "--impls", "ours,ours compiled"),
            *("--batch_size", "1", "--num_generations", "8", "--max_new_tokens", "256"),
            *("--rounds", "1", "--steps", "2", "--threads", "0"),
        ],
        [
            *("--shapes", "tiny", "--sections", "grpo", "--reference", "none", "--impls", "ours"),
            *("--batch_size", "1", "--num_generations", "2", "--max_new_tokens", "8"),
            *("--rounds", "1", "--steps", "1", "--threads", "1"),
        ],
    ),
}
OPTIONAL_LIMIT_S = 120  # seconds each may run
LONGER_LIMITS_S = {"finetune.py": 300, "post_training.py": 300}  # two compiled 3B models; a 1B model compiled
# bytes a load may peak above the finished model: CUDA's int4 tiling holds one packed weight twice for a
# moment (the 7B output projection: 66 MB), nothing like a full-precision copy (13 GB)
LOAD_MEMORY_SLACK = 256 << 20


@dataclass
class Sizes:
    """What one run measures: the shape, the prompt and the number of decoded tokens."""

    params: dict
    prefill_len: int
    decode_tokens: int
    rounds: int


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


class Budget:
    """The seconds left of ``--budget_s``; a stage that would start after it is a failed check."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_command(
    name: str, command: List[str], budget: Budget, limit_s: float, env: Optional[dict] = None, show_output: bool = False
) -> Check:
    """Run ``command`` from the repository root for at most ``limit_s`` (and the budget); a check.
    ``show_output``: print what it printed (a benchmark's table)."""
    timeout = min(limit_s, budget.left())
    if timeout <= 0:
        return Check(name, False, "not started: the time budget is spent")
    start = time.monotonic()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return Check(name, False, f"still running after {timeout:.0f} s")
    seconds = time.monotonic() - start
    if show_output:
        print(result.stdout, flush=True)
    tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or [""]
    return Check(name, result.returncode == 0, f"exit {result.returncode} in {seconds:.0f} s: {tail[0][:160]}")


def device_tests(device: str, dry_run: bool, budget: Budget) -> Check:
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--device", device]
    command += [f"tests/{name}" for name in DEVICE_TESTS] + (["-k", DRY_RUN_TESTS] if dry_run else [])
    return run_command(f"pytest --device {device}", command, budget, limit_s=240)


def torchrun_example(device: str, budget: Budget) -> Check:
    """The example on the bundled model in a one-process torchrun job, over NCCL on CUDA (gloo on CPU)."""
    backend = "nccl" if device == "cuda" else "gloo"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        "example_text_completion.py",
        "--device",
        device,
        "--temperature",
        "0",
        "--max_gen_len",
        "8",
        "--prompts",
        "import os",
    ]
    env = {**os.environ, "LLAMA_DIST_BACKEND": backend}
    return run_command(f"torchrun --nproc_per_node 1 ({backend})", command, budget, limit_s=120, env=env)


def write_random_checkpoint(params: dict, ckpt_dir: str, device: torch.device) -> None:
    """A checkpoint of ``params``' shape in Meta's layout, bfloat16, N(0, 0.02) weights and unit
    norms, generated tensor by tensor on ``device`` (fast on a GPU) and saved from the CPU."""
    args = ModelArgs.from_dict({**params, "vocab_size": VOCAB_SIZE})
    generator = torch.Generator(device).manual_seed(0)
    state = {}
    for key, (shape, _) in layout_of(args).items():
        if key.endswith("norm.weight"):
            state[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            state[key] = (0.02 * torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)).cpu()
    save_checkpoint(ckpt_dir, {**params, "vocab_size": VOCAB_SIZE}, state, dtype=torch.bfloat16)


@torch.no_grad()  # not inference_mode: torch.compile cannot take inference tensors
def decode_tok_s(decoder: Ours, prompt: torch.Tensor, n_tokens: int, device: torch.device) -> float:
    """Batch-1 greedy decoding of ``n_tokens`` tokens after ``prompt`` on the engine, less its
    prefill (timed alone); tokens/s."""
    total = timed(lambda: decoder.decode(prompt, n_tokens), device)
    first = timed(lambda: decoder.prefill(prompt), device)
    return n_tokens / max(total - first, 1e-9)


@torch.no_grad()
def prefill_tok_s(model, prompt: torch.Tensor, device: torch.device) -> float:
    positions = torch.arange(prompt.shape[1], device=device)[None]
    block_size = model.layers[0].attention.kv_cache.block_size
    cache = BlockTables(
        attended_tables(
            contiguous_tables(1, -(-model.params.max_seq_len // block_size), device), prompt.shape[1], block_size
        )
    )
    return prompt.shape[1] / timed(lambda: model(prompt, positions=positions, cache=cache, logits_at=-1), device)


def device_memory(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def measure_mode(
    ckpt_dir: str, args: ModelArgs, mode: str, compiled_too: bool, sizes: Sizes, device: torch.device, bandwidth: float
) -> tuple:
    """Load ``mode``, then time prefill and decoding eager (and compiled); (table rows, checks)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = load_model(ckpt_dir, args, device, *mode_settings(mode))
    load_s = time.perf_counter() - start
    peak, resident = device_memory(device), torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    checks = []
    if peak is not None:
        checks.append(
            Check(
                f"{mode}: loading peaks at the finished model's memory",
                peak <= resident + LOAD_MEMORY_SLACK,
                f"peak {peak / 2**30:.2f} GiB, finished {resident / 2**30:.2f} GiB",
            )
        )
    prompt = torch.randint(3, VOCAB_SIZE, (1, sizes.prefill_len), generator=torch.Generator().manual_seed(0)).to(device)
    setup_pool(model, engine_options_for(model))  # the pool an engine sets up, which the prefill writes
    prefill_tok_s(model, prompt[:, :8], device)  # warm-up
    prefill = statistics.median(prefill_tok_s(model, prompt, device) for _ in range(sizes.rounds))
    per_token = bytes_per_token(model)
    rows, greedy = [], {}
    for compiled in (False, True) if compiled_too else (False,):
        decoder = Ours(model, compile=compiled)
        greedy[compiled] = decoder.decode(prompt[:, :8], CHECKED_TOKENS)[0][:CHECKED_TOKENS]  # compiles, the first time
        decode_tok_s(decoder, prompt, 4, device)  # warm-up (CUDA graphs are recorded per length bucket)
        tok_s = statistics.median(
            decode_tok_s(decoder, prompt, sizes.decode_tokens, device) for _ in range(sizes.rounds)
        )
        step = decoder.engine
        rows.append(
            [
                mode + (" compiled" if compiled else ""),
                f"{tok_s:.1f}",
                f"{100 * per_token * tok_s / bandwidth:.0f}",
                f"{prefill:.0f}",
                f"{per_token / 2**30:.2f}",
                f"{load_s:.1f}",
                "-" if peak is None else f"{peak / 2**30:.2f}",
                "-" if not compiled else f"{step.compile_seconds:.1f}",
            ]
        )
    if compiled_too:  # a random model's logits are nearly flat: later tokens may part ways on rounding alone
        checks.append(
            Check(
                f"{mode}: compiled greedy tokens equal the eager ones",
                greedy[True] == greedy[False],
                f"first {CHECKED_TOKENS}: eager {greedy[False]}, compiled {greedy[True]}",
            )
        )
    return rows, checks


POOL_BATCHES = (1, 8, 32, 64)


@torch.no_grad()
def block_pool_rows(ckpt_dir: str, args: ModelArgs, sizes: Sizes, device: torch.device) -> List[list]:
    """The bf16 model with ``max(POOL_BATCHES)`` slots over a pool of 80% of the memory left after
    loading (dry run: every slot's whole context); per batch, decode tokens/s of that many rows."""
    from llama.engine import Engine
    from llama.layers.kv_cache import cache_dtype
    from llama.options import GenerationOptions

    slots = max(POOL_BATCHES)
    args = ModelArgs(**{**args.__dict__, "max_batch_size": slots})
    model = load_model(ckpt_dir, args, device, *mode_settings("bf16"))
    token_bytes = (
        2
        * args.n_layers
        * args.n_kv_heads
        * args.head_dim
        * cache_dtype(model.tok_embeddings.weight.dtype, device).itemsize
    )
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 0
    pool_tokens = (
        int(0.8 * free / token_bytes) if free else slots * args.max_seq_len
    )  # the pool comes after the weights
    engine = Engine(
        model, None, engine_options_for(model, kv_cache_tokens=pool_tokens, prefix_cache=False)
    )  # computed anew
    prompts = torch.randint(
        3, VOCAB_SIZE, (slots, sizes.prefill_len), generator=torch.Generator().manual_seed(1)
    ).tolist()

    def seconds(bsz: int, n_tokens: int) -> float:
        request = engine.submit(
            prompts[:bsz], GenerationOptions(max_gen_len=n_tokens, temperature=0, stop_tokens=[]), stream_text=False
        )
        return timed(lambda: [None for _ in engine.run_until_done(request)], device)

    rows = []
    for bsz in POOL_BATCHES:
        seconds(bsz, 2)  # warm-up
        tok_s = statistics.median(
            bsz * (sizes.decode_tokens - 1) / max(seconds(bsz, sizes.decode_tokens) - seconds(bsz, 1), 1e-9)
            for _ in range(sizes.rounds)
        )
        rows.append([str(bsz), f"{tok_s:.1f}", f"{pool_tokens}", f"{engine.preemptions}"])
    return rows


@dataclass
class PoolSizes:
    """The 8-bit pools' row: the model's shape, its rows and the tokens each has cached."""

    params: dict
    rows: int
    context: int
    decode_tokens: int
    rounds: int


def random_model(params: dict, max_seq_len: int, device: torch.device):
    """A bfloat16 model of ``params``' shape made on ``device`` (no checkpoint): N(0, 0.02) weights, unit norms."""
    from llama.model import Transformer

    with torch.device("meta"):
        model = Transformer(ModelArgs.from_dict({**params, "max_seq_len": max_seq_len, "max_batch_size": 1}))
    model.drop_cache()
    model = model.to_empty(device=device).to(torch.bfloat16)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    model.setup_rope()
    return model


@torch.no_grad()
def kv_cache_dtype_rows(sizes: PoolSizes, device: torch.device) -> List[list]:
    """Per pool dtype (the model's, int8, float8_e4m3fn): an engine of ``sizes.rows`` slots whose rows each prefill
    ``sizes.context`` random tokens (the prefix cache keeps them for the next round), then the decode step's
    median time over the rounds."""
    from llama.engine import Engine
    from llama.options import EngineOptions, GenerationOptions

    max_seq_len = sizes.context + sizes.decode_tokens + 32  # room for a round's blocks beside the cached ones
    model = random_model(sizes.params, max_seq_len, device)
    vocab = sizes.params.get("vocab_size", VOCAB_SIZE)
    generator = torch.Generator().manual_seed(2)
    prompts = torch.randint(3, vocab, (sizes.rows, sizes.context), generator=generator).tolist()
    options = GenerationOptions(max_gen_len=sizes.decode_tokens + 1, temperature=0, stop_tokens=[])
    rows, base = [], None
    for kv_cache_dtype in KV_CACHE_DTYPES:
        engine_options = EngineOptions(
            sizes.rows, max_seq_len, kv_cache_dtype=kv_cache_dtype, prefill_chunk=sizes.context
        )
        engine = Engine(model, None, engine_options)

        def step_seconds(engine=engine) -> float:
            request = engine.submit(prompts, options, stream_text=False)
            while not all(request.tokens):
                engine.step()
            return timed(lambda: [engine.step() for _ in range(sizes.decode_tokens)], device) / sizes.decode_tokens

        prefill = timed(step_seconds, device)  # every row's prefill, then the first round
        seconds = statistics.median(step_seconds() for _ in range(sizes.rounds))
        base = base or seconds
        rows.append(
            [
                str(model.layers[0].attention.kv_cache.cache_k.dtype).removeprefix("torch."),  # float32 on a CPU
                f"{engine.kv_cache_bytes / 2**30:.3f}",
                f"{prefill:.1f}",
                f"{seconds * 1e3:.1f}",
                f"{sizes.rows / seconds:.0f}",
                f"{base / seconds:.2f}",
            ]
        )
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def optional_benchmarks(device: str, dry_run: bool, budget: Budget) -> List[Check]:
    """Each of ``OPTIONAL_BENCHMARKS`` whose script exists and takes --device, with its dry-run arguments
    under ``dry_run``; the check's detail ends with the last line it printed."""
    checks = []
    for name, (script, script_args, dry_run_args) in OPTIONAL_BENCHMARKS.items():
        path = ROOT / "bench" / script
        if not path.is_file():
            continue
        usage = subprocess.run(
            [sys.executable, str(path), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        if usage.returncode or "--device" not in usage.stdout:
            checks.append(Check(name, True, f"skipped: bench/{script} does not take --device"))
        else:
            command = [sys.executable, str(path), "--device", device] + (dry_run_args if dry_run else script_args)
            limit_s = OPTIONAL_LIMIT_S if dry_run else LONGER_LIMITS_S.get(script, OPTIONAL_LIMIT_S)
            checks.append(run_command(name, command, budget, limit_s=limit_s, show_output=True))
    return checks


def goals(results: Dict[str, float], fractions: Dict[str, float]) -> List[str]:
    """The goals for a GPU, from the decode tokens/s and bandwidth fractions measured."""
    lines = []
    if "bf16 compiled" in fractions:
        lines.append(
            f"compiled bf16 reads at {100 * fractions['bf16 compiled']:.0f}% of the measured bandwidth (goal >= 80%)"
        )
    if "bf16 compiled" in results and "bf16" in results:
        lines.append(
            f"compiled bf16 against eager bf16: {results['bf16 compiled'] / results['bf16']:.2f}x (goal >= 3x)"
        )
    if "int4 compiled" in results and "bf16 compiled" in results:
        lines.append(
            f"int4 against bf16, compiled: {results['int4 compiled'] / results['bf16 compiled']:.2f}x (goal >= 1.8x)"
        )
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dry_run", action="store_true", help="on the CPU, tiny shapes, one device test: checks the script itself"
    )
    parser.add_argument(
        "--ckpt_dir", help="a checkpoint to measure instead of a random one of params/llama-2-7b.json's shape"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="modes to measure (see bench/compare.py)")
    parser.add_argument(
        "--compiled_modes", default=None, help="modes also measured compiled (default: every mode; dry run: int8)"
    )
    parser.add_argument("--budget_s", type=float, default=540, help="every stage must start within this many seconds")
    parser.add_argument("--skip_tests", action="store_true", help="skip pytest and torchrun")
    options = parser.parse_args(argv)
    device = torch.device("cpu" if options.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry_run")
    if options.dry_run:
        sizes = Sizes(DRY_RUN_SHAPE, prefill_len=32, decode_tokens=8, rounds=1)
        pool_sizes = PoolSizes({**DRY_RUN_SHAPE, "vocab_size": 512}, rows=4, context=64, decode_tokens=4, rounds=1)
        torch.set_num_threads(min(2, torch.get_num_threads()))
    else:
        sizes = Sizes(json.loads(SHAPE_7B.read_text()), prefill_len=512, decode_tokens=64, rounds=3)
        pool_sizes = PoolSizes(SHAPE_8B, rows=32, context=8192, decode_tokens=16, rounds=3)
    compiled_modes = (
        options.compiled_modes if options.compiled_modes is not None else "int8" if options.dry_run else options.modes
    ).split(",")
    budget = Budget(options.budget_s)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"{name}, torch {torch.__version__}", flush=True)

    checks = []
    if not options.skip_tests:
        checks += [device_tests(device.type, options.dry_run, budget), torchrun_example(device.type, budget)]
        print("\n".join(f"{'ok' if c.ok else 'FAILED'}: {c.name} ({c.detail})" for c in checks), flush=True)

    scratch = tempfile.TemporaryDirectory(prefix="llama-gpu-")
    ckpt_dir = options.ckpt_dir
    if ckpt_dir is None:
        ckpt_dir = str(Path(scratch.name) / "random")
        start = time.perf_counter()
        write_random_checkpoint(sizes.params, ckpt_dir, device)
        print(f"wrote a random checkpoint of {sizes.params} in {time.perf_counter() - start:.0f} s", flush=True)
    args = ModelArgs.from_dict(
        {
            **sizes.params,
            "vocab_size": VOCAB_SIZE,
            "max_seq_len": sizes.prefill_len + sizes.decode_tokens + 8,
            "max_batch_size": 1,
        }
    )
    bandwidth = cuda_bandwidth(device) if device.type == "cuda" else read_bandwidth(1 << 26)
    rows, speeds, fractions = [], {}, {}
    for mode in options.modes.split(","):
        if budget.left() <= 0:
            checks.append(Check(f"{mode}: measured", False, "not started: the time budget is spent"))
            continue
        mode_rows, mode_checks = measure_mode(ckpt_dir, args, mode, mode in compiled_modes, sizes, device, bandwidth)
        rows += mode_rows
        checks += mode_checks
        speeds.update({row[0]: float(row[1]) for row in mode_rows})
        fractions.update({row[0]: float(row[2]) / 100 for row in mode_rows})
        print(f"measured {mode} ({budget.left():.0f} s of the budget left)", flush=True)
    pool_rows = []
    if budget.left() > 0 and "bf16" in options.modes.split(","):
        pool_rows = block_pool_rows(ckpt_dir, args, sizes, device)
        print(f"measured the block pool ({budget.left():.0f} s of the budget left)", flush=True)
    kv_rows = []
    if budget.left() > 0:
        kv_rows = kv_cache_dtype_rows(pool_sizes, device)
        print(f"measured the 8-bit KV cache pools ({budget.left():.0f} s of the budget left)", flush=True)
    checks += optional_benchmarks(device.type, options.dry_run, budget)

    header = [
        "mode",
        "decode tok/s (b1)",
        "% of bandwidth",
        "prefill tok/s",
        "GiB read/token",
        "load s",
        "peak GiB loading",
        "compile s",
    ]
    print_table(
        f"{name}: {sizes.params}, prompt {sizes.prefill_len}, {sizes.decode_tokens} decoded tokens, median of "
        f"{sizes.rounds}; measured bandwidth {bandwidth / 1e9:.0f} GB/s",
        header,
        rows,
    )
    if pool_rows:
        print_table(
            f"the KV cache pool: bf16, {max(POOL_BATCHES)} slots, "
            f"prompts of {sizes.prefill_len}, {sizes.decode_tokens} decoded tokens",
            ["rows", "decode tok/s", "pool tokens", "preemptions"],
            pool_rows,
        )
    if kv_rows:
        print_table(
            f"the KV cache pool stored in 8 bits: {pool_sizes.params}, bfloat16, {pool_sizes.rows} rows x "
            f"{pool_sizes.context} cached tokens, the decode step eager, median of {pool_sizes.rounds}",
            ["pool", "pool GiB", "prefill + first round s", "ms/step", "tok/s", "x the first's"],
            kv_rows,
        )
    for line in goals(speeds, fractions):
        print(line)
    for check in checks:
        print(f"{'ok' if check.ok else 'FAILED'}: {check.name} ({check.detail})")
    failed = [check.name for check in checks if not check.ok]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
