"""Speculative decoding side by side with plain decoding, greedy, in one run.

Two setups, each timed in alternating rounds (plain, speculative, plain, ...) so load from other
processes hits both alike; per prompt the median tokens/s of each, the ratio, the acceptance rate
(accepted proposals / proposals) and the mean tokens emitted per verification step; then the median
ratio over the prompts.

- lookup: the bundled model (checkpoints/tiny-stdlib), batch 1, prompt lookup, on code that
  continues (a function body, a class) and code that repeats its prompt (a function to copy or
  edit, a table of similar lines);
- draft: a random 134M checkpoint (stories110M's shapes, as bench/compare.py makes it; ``--dim``
  and the rest for another) in float32, with its own int8 copy (bfloat16 activations) as the draft,
  on random prompts.

    python bench/speculative.py                         # both setups, on the CPU
    python bench/speculative.py --setups lookup --k 4 6 8
    python bench/speculative.py --setups draft --ckpt_dir CKPT --k 3
    python bench/speculative.py --device cuda
"""

import argparse
import statistics
import tempfile
import time

import torch

from common import DEFAULT_SHAPE, DTYPES, checkpoint_args, random_checkpoint
from llama.checkpoints.files import BUNDLED
from llama.checkpoints.loader import load_model
from llama.engine import Engine, engine_options_for
from llama.layers.quantize import parse_quantize
from llama.options import GenerationOptions
from llama.tokenizer import Tokenizer

CONTINUING = {
    "main": "import os\nimport sys\n\n\ndef main():\n",
    "class": "class Stack:\n    def __init__(self):\n",
    "docstring": 'def remove_non_ascii(s: str) -> str:\n    """',
}
REPEATING = {
    "copy": (
        "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument('--input', type=str)\n"
        "    parser.add_argument('--output', type=str)\n    return parser.parse_args(argv)\n\n\n"
        "def parse_args_again(argv):\n    parser = argparse.ArgumentParser()\n"
    ),
    "rename": (
        "def read_file(path):\n    with open(path) as f:\n        data = f.read()\n    return data.splitlines()\n\n\n"
        "# the same function, for bytes\ndef read_bytes(path):\n    with open(path"
    ),
    "table": "COLORS = {\n    'red': (255, 0, 0),\n    'green': (0, 255, 0),\n"
    "    'blue': (0, 0, 255),\n    'black': (0, 0, 0),\n",
}


def generate(engine: Engine, prompt, options: GenerationOptions):
    """(seconds, the request's only row) of one greedy generation."""
    start = time.perf_counter()
    request = engine.submit([prompt], options, stream_text=False)
    for _ in engine.run_until_done(request):
        pass
    return time.perf_counter() - start, request.rows[0]


def compare(engines, prompts, args, speculate: str, title: str) -> None:
    """Alternating rounds of plain and speculative decoding per prompt; prints the table."""
    plain = GenerationOptions(max_gen_len=args.gen_tokens, temperature=0, stop_tokens=[])
    where = f"{args.threads} threads" if args.device == "cpu" else args.device
    print(f"\n{title}: {args.gen_tokens} tokens, batch 1, {where}, median of {args.rounds} rounds")
    print(f"{'prompt':<10} {'k':>2} {'plain tok/s':>11} {'spec tok/s':>10} {'ratio':>6} {'accept':>7} {'tok/step':>8}")
    ratios = {k: [] for k in args.k}
    for name, prompt in prompts.items():
        for k in args.k:
            fast = GenerationOptions(
                max_gen_len=args.gen_tokens, temperature=0, stop_tokens=[], speculate=speculate, speculate_k=k
            )
            generate(engines["plain"], prompt, plain), generate(engines["speculative"], prompt, fast)  # warm-up
            times = {"plain": [], "speculative": []}
            for _ in range(args.rounds):
                times["plain"].append(generate(engines["plain"], prompt, plain)[0])
                seconds, row = generate(engines["speculative"], prompt, fast)
                times["speculative"].append(seconds)
            plain_rate, fast_rate = (
                len(row.tokens) / statistics.median(times[name]) for name in ("plain", "speculative")
            )
            acceptance = row.accepted / (row.speculative_steps * k)
            per_step = (len(row.tokens) - 1) / row.speculative_steps  # the first token comes from the prefill
            ratios[k].append(fast_rate / plain_rate)
            print(
                f"{name:<10} {k:>2} {plain_rate:>11.1f} {fast_rate:>10.1f} "
                f"{fast_rate / plain_rate:>5.2f}x {acceptance:>7.2f} {per_step:>8.2f}"
            )
    for k, values in ratios.items():
        print(f"k={k}: median speed-up over the prompts {statistics.median(values):.2f}x")


def lookup_setup(args) -> None:
    tokenizer = Tokenizer(str(BUNDLED / "tokenizer.model"))
    model_args = checkpoint_args(str(BUNDLED), args.gen_tokens + 256, 1)
    model = load_model(str(BUNDLED), model_args, torch.device(args.device), torch.float32)
    options = engine_options_for(model)
    engines = {"plain": Engine(model, None, options), "speculative": Engine(model, None, options)}
    prompts = {name: tokenizer.encode(text, bos=True, eos=False) for name, text in {**CONTINUING, **REPEATING}.items()}
    compare(engines, prompts, args, "lookup", f"prompt lookup, {BUNDLED.name}, float32")


def draft_setup(args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        shape = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, vocab_size=args.vocab_size)
        ckpt_dir = args.ckpt_dir or random_checkpoint(
            argparse.Namespace(**shape, n_kv_heads=None, ckpt_dtype="float32"), folder
        )
        model_args = checkpoint_args(ckpt_dir, args.prompt_len + args.gen_tokens + 16, 1)
        device = torch.device(args.device)
        model = load_model(ckpt_dir, model_args, device, DTYPES[args.dtype])
        draft = load_model(ckpt_dir, model_args, device, torch.bfloat16, parse_quantize(args.draft_quantize))
    options = engine_options_for(model)
    engines = {"plain": Engine(model, None, options), "speculative": Engine(model, None, options, draft)}
    generator = torch.Generator().manual_seed(0)
    prompts = {
        f"random{i}": torch.randint(3, model_args.vocab_size, (args.prompt_len,), generator=generator).tolist()
        for i in range(args.prompts)
    }
    name = args.ckpt_dir or f"random {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M"
    compare(
        engines,
        prompts,
        args,
        "draft",
        f"draft model, {name} in {args.dtype}, its {args.draft_quantize} copy as the draft",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", choices=["lookup", "draft"], default=["lookup", "draft"])
    parser.add_argument(
        "--k", type=int, nargs="+", default=None, help="speculate_k values (default: 6 for lookup, 3 for draft)"
    )
    parser.add_argument("--gen_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ckpt_dir", help="the draft setup's checkpoint; default: a random 134M one")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="the draft setup's model dtype")
    parser.add_argument("--draft_quantize", default="int8")
    parser.add_argument("--prompts", type=int, default=3, help="random prompts of the draft setup")
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="where both setups run: cpu, cuda, ...")
    for name in ("dim", "n_layers", "n_heads", "vocab_size"):
        parser.add_argument(
            f"--{name}", type=int, default=DEFAULT_SHAPE[name], help="the draft setup's random checkpoint's shape"
        )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for setup in args.setups:
        setup_args = argparse.Namespace(**{**vars(args), "k": args.k or ([6] if setup == "lookup" else [3])})
        with torch.no_grad():
            {"lookup": lookup_setup, "draft": draft_setup}[setup](setup_args)


if __name__ == "__main__":
    main()
