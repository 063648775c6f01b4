"""This project side by side with transformers' LlamaForCausalLM, on the same weights, in one run.

Prints decode tokens/s (batch 1 and 8), prefill tokens/s (one 512-token prompt), time to first
token, load time and peak memory added by loading (each load in a fresh process), the machine's
read bandwidth and the fraction of it that decoding achieves (bytes of weights per token x tokens/s),
and the accuracy of the fast modes against float32. Runs alternate between implementations, so
load from other processes hits them alike; each number is the median over --rounds.

    python bench/compare.py                      # a random 134M checkpoint (stories110M shapes)
    python bench/compare.py --ckpt_dir CKPT      # your checkpoint
    python bench/compare.py --device cuda --dim 4096 --n_layers 32 --n_heads 32 --modes bf16,int8 --no_transformers
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import (
    DTYPES,
    add_checkpoint_args,
    bytes_per_token,
    checkpoint_args,
    checkpoint_bytes,
    print_table,
    random_checkpoint,
    read_bandwidth,
)
from llama.checkpoints.loader import load_model
from llama.engine import Engine, engine_options_for
from llama.layers.quantize import parse_quantize
from llama.options import GenerationOptions
from transformers_llama import to_transformers

ACCURACY_TOKENS = 64
DENSE_MODES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mode_settings(mode: str):
    """(dtype, quantization) of a mode: fp32, bf16, or a quantize value (int8, int4, int4-g32, ...)
    with bfloat16 activations."""
    if mode in DENSE_MODES:
        return DENSE_MODES[mode], None
    return torch.bfloat16, parse_quantize(mode)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Ours:
    """Greedy decoding on this project's engine, the loop of ``Llama.generate``: one prefill pass,
    then the decode step (eager, or compiled with ``compile``) once per token."""

    def __init__(self, model, compile: bool = False):
        self.model = model
        self.engine = Engine(model, None, engine_options_for(model, compile=compile))

    def generate(self, prompt, n_tokens):
        options = GenerationOptions(max_gen_len=n_tokens, temperature=0, stop_tokens=[])
        request = self.engine.submit(prompt.tolist(), options, stream_text=False)
        for _ in self.engine.run_until_done(request):
            pass
        return request.tokens

    def prefill(self, prompt):
        return self.generate(prompt, 1)

    def decode(self, prompt, n_tokens):
        return self.generate(prompt, n_tokens + 1)


class Transformers:
    """Greedy decoding with transformers' model and its dynamic KV cache, the loop of its ``generate``."""

    def __init__(self, model):
        self.model = model

    def prefill(self, prompt, cache=None):
        out = self.model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

    def decode(self, prompt, n_tokens):
        token, cache = self.prefill(prompt)
        for _ in range(n_tokens):
            token, cache = self.prefill(token, cache)
        return token


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


@torch.no_grad()  # not inference_mode: torch.compile cannot take inference tensors
def speed_round(impl, args, vocab_size, device) -> dict:
    """One measurement of every speed metric for ``impl``."""
    gen = torch.Generator().manual_seed(0)
    short = torch.randint(3, vocab_size, (max(args.batch_sizes), args.prompt_len), generator=gen).to(device)
    long = torch.randint(3, vocab_size, (1, args.prefill_len), generator=gen).to(device)
    out = {"ttft_ms": 1e3 * timed(lambda: impl.prefill(short[:1]), device)}
    out["prefill_tok_s"] = args.prefill_len / timed(lambda: impl.prefill(long), device)
    for bsz in args.batch_sizes:
        prompt = short[:bsz]
        total = timed(lambda prompt=prompt: impl.decode(prompt, args.gen_tokens), device)
        first = timed(lambda prompt=prompt: impl.prefill(prompt), device)
        out[f"decode_b{bsz}_tok_s"] = bsz * args.gen_tokens / max(total - first, 1e-9)
    return out


@torch.no_grad()
def accuracy(reference, candidate, vocab_size, n_tokens, device) -> dict:
    """Greedy agreement and logit error of ``candidate`` against ``reference`` (our float32 model)
    along reference's own greedy continuation of a random prompt, scored in one pass."""
    prompt = torch.randint(3, vocab_size, (1, 16), generator=torch.Generator().manual_seed(1)).to(device)
    tokens = prompt
    for _ in range(n_tokens):
        tokens = torch.cat([tokens, reference(tokens)[:, -1:].argmax(-1)], dim=1)
    ref, cand = reference(tokens)[0, 15:-1], candidate(tokens)[0, 15:-1]  # the positions that chose a token
    return {
        "greedy_agreement": (ref.argmax(-1) == cand.argmax(-1)).float().mean().item(),
        "max_logit_error": (ref - cand).abs().max().item(),
        "logit_std": ref.std().item(),
    }


def measure_load(script_args: list, rounds: int) -> dict:
    runs = []
    for _ in range(rounds):
        result = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("load.py"))] + script_args, capture_output=True, text=True
        )
        if result.returncode:
            raise RuntimeError(f"load.py {' '.join(script_args)} failed:\n{result.stderr}")
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def median_rounds(rounds: list) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--modes", default="fp32,bf16,int8,int4", help="this project's modes: fp32, bf16, int8, int4, int4-g32 ..."
    )
    parser.add_argument(
        "--compiled_modes", default="fp32", help="modes also measured with the decode step compiled ('' for none)"
    )
    parser.add_argument("--transformers_dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--no_transformers", action="store_true", help="skip transformers (e.g. a 7B model on GPU)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--gen_tokens", type=int, default=32)
    parser.add_argument("--prefill_len", type=int, default=512)
    parser.add_argument("--batch_sizes", default="1,8")
    parser.add_argument("--load_rounds", type=int, default=2, help="fresh processes per load measurement (0: skip)")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    scratch = tempfile.TemporaryDirectory(
        prefix="llama-bench-"
    )  # the random checkpoint, transformers' copy: removed at exit
    ckpt_dir = args.ckpt_dir or random_checkpoint(args, str(Path(scratch.name) / "llama"))
    max_seq_len = max(args.prefill_len, args.prompt_len + args.gen_tokens, 16 + ACCURACY_TOKENS) + 1
    model_args = checkpoint_args(ckpt_dir, max_seq_len, max(args.batch_sizes))
    params = {k: v for k, v in json.loads((Path(ckpt_dir) / "params.json").read_text()).items()}
    print(f"checkpoint {ckpt_dir}: {checkpoint_bytes(ckpt_dir) / 1e6:.0f} MB on disk, params {params}")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")

    impls = {}
    reference = load_model(ckpt_dir, model_args, device, torch.float32)
    for mode in modes:
        dtype, quantization = mode_settings(mode)
        model = reference if mode == "fp32" else load_model(ckpt_dir, model_args, device, dtype, quantization)
        impls[f"llama {mode}"] = Ours(model)
        if mode in args.compiled_modes.split(","):  # the same weights and cache, the step compiled
            impls[f"llama {mode} compiled"] = Ours(model, compile=True)
    if not args.no_transformers:
        state = {k: v.float().cpu() for k, v in reference.state_dict().items()}
        hf = to_transformers(state, params, model_args.vocab_size, max_seq_len, DTYPES[args.transformers_dtype]).to(
            device
        )
        impls[f"transformers {args.transformers_dtype}"] = Transformers(hf)
        del state
    n_params = sum(p.numel() for p in reference.parameters())
    print(f"{n_params / 1e6:.1f}M parameters")

    bandwidth = read_bandwidth() if device.type == "cpu" else cuda_bandwidth(device)
    rounds = {name: [] for name in impls}
    for _name, impl in impls.items():  # warm-up
        speed_round(
            impl,
            argparse.Namespace(**{**vars(args), "gen_tokens": 2, "prefill_len": 32}),
            model_args.vocab_size,
            device,
        )
    for r in range(args.rounds):
        for name, impl in impls.items():
            rounds[name].append(speed_round(impl, args, model_args.vocab_size, device))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    results = {name: median_rounds(rs) for name, rs in rounds.items()}

    metrics = (
        ["decode_b1_tok_s"] + [f"decode_b{b}_tok_s" for b in args.batch_sizes if b != 1] + ["prefill_tok_s", "ttft_ms"]
    )
    header = ["implementation"] + metrics + ["MB/token", "bandwidth %"]
    rows = []
    for name, impl in impls.items():
        per_token = bytes_per_token(impl.model)
        achieved = per_token * results[name].get("decode_b1_tok_s", 0)
        rows.append(
            [name]
            + [f"{results[name][m]:.1f}" for m in metrics]
            + [f"{per_token / 1e6:.0f}", f"{100 * achieved / bandwidth:.0f}"]
        )
    print_table(
        f"speed (median of {args.rounds} alternating rounds; measured read bandwidth {bandwidth / 1e9:.1f} GB/s)",
        header,
        rows,
    )
    if not args.no_transformers:
        base = results[f"transformers {args.transformers_dtype}"]
        print_table(
            f"ratio to transformers {args.transformers_dtype}",
            ["implementation"] + metrics[:-1] + ["ttft"],
            [
                [name]
                + [f"{results[name][m] / base[m]:.2f}x" for m in metrics[:-1]]
                + [f"{base['ttft_ms'] / results[name]['ttft_ms']:.2f}x faster"]
                for name in impls
            ],
        )

    compiled = [(name, name[: -len(" compiled")]) for name in impls if name.endswith(" compiled")]
    if compiled:
        print_table(
            "compiled decode step against eager (same weights, same run)",
            ["implementation"] + metrics[:-1],
            [
                [name] + [f"{results[name][m] / results[eager][m]:.2f}x" for m in metrics[:-1]]
                for name, eager in compiled
            ],
        )

    acc_rows = []
    for name, impl in impls.items():
        a = accuracy(
            reference,
            impl.model if name.startswith("llama") else (lambda t, m=impl.model: m(t).logits.float()),
            model_args.vocab_size,
            ACCURACY_TOKENS,
            device,
        )
        acc_rows.append(
            [name, f"{100 * a['greedy_agreement']:.1f}%", f"{a['max_logit_error']:.4f}", f"{a['logit_std']:.3f}"]
        )
    print_table(
        f"accuracy against llama fp32 ({ACCURACY_TOKENS} greedy positions, teacher-forced)",
        ["implementation", "greedy agreement", "max |logit error|", "logit std"],
        acc_rows,
    )

    if args.load_rounds and device.type == "cpu":
        load_rows = []
        disk = checkpoint_bytes(ckpt_dir)
        hf_dir = None
        if not args.no_transformers:
            hf_dir = str(Path(scratch.name) / "hf")
            hf.to(DTYPES[args.ckpt_dtype]).save_pretrained(hf_dir)
            del hf
        del impls, reference
        for dtype in sorted({args.ckpt_dtype, "float32"}):
            runs = {"llama": ["--ckpt_dir", ckpt_dir, "--impl", "llama", "--dtype", dtype]}
            if hf_dir:
                runs["transformers"] = ["--ckpt_dir", hf_dir, "--impl", "transformers", "--dtype", dtype]
            measured = {name: [] for name in runs}
            for _ in range(args.load_rounds):
                for name, script_args in runs.items():
                    measured[name].append(measure_load(script_args, 1))
            for name, ms in measured.items():
                m = median_rounds(ms)
                load_rows.append(
                    [
                        name,
                        dtype,
                        f"{m['load_s']:.2f}",
                        f"{m['peak_added_bytes'] / 1e6:.0f}",
                        f"{m['kv_cache_bytes'] / 1e6:.0f}",
                        f"{m['peak_added_bytes'] / disk:.2f}x",
                    ]
                )
        print_table(
            f"loading, each in a fresh process ({args.ckpt_dtype} checkpoint, "
            f"{disk / 1e6:.0f} MB on disk; llama's KV cache: batch 1 x 512 positions)",
            ["implementation", "dtype", "load s", "peak RSS added MB", "KV cache MB", "added / on disk"],
            load_rows,
        )


def cuda_bandwidth(device: torch.device, n_bytes: int = 1 << 30) -> float:
    """Bytes/s a device-to-device copy moves (read + write), best of 5."""
    x = torch.empty(n_bytes // 2, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        best = min(best, timed(lambda: y.copy_(x), device))
    return 2 * x.numel() / best


if __name__ == "__main__":
    main()
