"""The KV cache as a pool of blocks, side by side in one run: memory, prefix caching, decode speed
against a checkout with the contiguous cache, concurrency at equal memory, and the compiled step's
two ways of reading the pool.

    python bench/kv_blocks.py --sections memory prefix concurrency
    git archive 53e6fd0 | tar -x -C /tmp/contiguous    # the last commit with the contiguous cache
    python bench/kv_blocks.py --sections decode --reference /tmp/contiguous
    python bench/kv_blocks.py --sections flex

Sections (the load average is printed with each: the machine may be shared):

- memory: a random 134M model (stories110M's shapes) built with max_batch_size=32,
  max_seq_len=4096, kv_cache_tokens=8192: the cache's bytes against a contiguous cache of 32 x 4096
  (computed: 2 x layers x rows x positions x dim x 4 bytes), the process's resident memory after
  loading and after decoding 32 rows of 16 + 200 tokens together.
- prefix: a growing 6-turn chat on the bundled model, a ~1,000-token system prompt, greedy answers
  of 24 tokens: time to first token of each turn with the prefix cache and without, the two engines
  (one model) taking turns; means over the turns, their ratio, and whether the answers agree.
- decode: batch-1 decode tokens/s (``Llama.generate``, prefill subtracted) of this checkout and of
  ``--reference`` (another checkout, e.g. the contiguous cache), eager and compiled, the bundled
  model and the 134M one, in two worker processes taking turns round by round (each round's figure the
  median of 3 runs); medians and ratios.
- concurrency: the KV memory of 8 slots x 2048 positions (16,384 tokens) as a pool for 48 slots:
  how many of 48 300-token conversations (100 prompt + 200 generated) run at once, and how many
  preemptions that took, against the contiguous cache's 8 slots.
- flex: the compiled decode step of batch 1 and batch 8, its attention reading the pool with
  FlexAttention against gathering each row's blocks (``Engine(compiled_attention=...)``), the bundled
  model and the 134M one (max_seq_len 512): ms per step after a prefill of ``--flex_prompt`` random
  tokens per row, the two engines (one model) taking turns round by round; medians, the rounds' range
  and the ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "checkpoints" / "tiny-stdlib"


def load_average() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def random_134m(folder: str) -> str:
    from bench.common import DEFAULT_SHAPE, random_checkpoint

    return random_checkpoint(argparse.Namespace(**DEFAULT_SHAPE, n_kv_heads=None, ckpt_dtype="bfloat16"), folder)


def load(ckpt_dir: str, max_seq_len: int, max_batch_size: int, compile: bool = False, **engine_options):
    """An engine (no tokenizer: every request gives its stop tokens) on a float32 CPU model. ``engine_options``:
    more ``EngineOptions`` (kv_cache_tokens, kv_cache_dtype, ...)."""
    import torch

    from bench.common import checkpoint_args
    from llama.checkpoints.loader import load_model
    from llama.engine import Engine, engine_options_for

    args = checkpoint_args(ckpt_dir, max_seq_len, max_batch_size)
    model = load_model(ckpt_dir, args, torch.device("cpu"), torch.float32, None)
    return Engine(model, None, engine_options_for(model, compile=compile, **engine_options))


def generate(engine, prompts, n_tokens: int):
    """Greedy, no early stop: each row's tokens."""
    from llama.options import GenerationOptions

    request = engine.submit(
        prompts, GenerationOptions(max_gen_len=n_tokens, temperature=0, stop_tokens=[]), stream_text=False
    )
    for _ in engine.run_until_done(request):
        pass
    return request.tokens


# --- memory -----------------------------------------------------------------------------------------


def memory(args) -> None:
    import torch

    with tempfile.TemporaryDirectory() as folder:
        ckpt_dir = random_134m(folder)
        before = resident_bytes()
        rows, positions = 32, 4096
        engine = load(ckpt_dir, positions, rows, kv_cache_tokens=8192)
        loaded = resident_bytes()
        model = engine.model
        params = model.params
        pool = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "cache" in name)
        contiguous = 2 * params.n_layers * rows * positions * params.dim * 4
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        prompts = [torch.randint(3, params.vocab_size, (16,)).tolist() for _ in range(rows)]
        start = time.perf_counter()
        tokens = generate(engine, prompts, 200)
        seconds = time.perf_counter() - start
        print(
            f"\nmemory ({load_average()}): 134M, max_batch_size={rows}, max_seq_len={positions}, kv_cache_tokens=8192"
        )
        print(
            f"  weights {weights / 1e9:.2f} GB, pool {pool / 1e9:.3f} GB, "
            f"a contiguous cache would be {contiguous / 1e9:.2f} GB"
        )
        print(
            f"  resident: {before / 1e9:.2f} GB before, {loaded / 1e9:.2f} GB loaded, "
            f"{resident_bytes() / 1e9:.2f} GB after decoding"
        )
        print(
            f"  decoded {rows} rows x {len(tokens[0])} tokens together in {seconds:.1f} s, "
            f"{engine.preemptions} preemption(s)"
        )


# --- prefix -----------------------------------------------------------------------------------------

SYSTEM_LINE = "You answer questions about Python's standard library with short, exact code. "
QUESTIONS = [
    "How do I list a folder?",
    "And only the .py files?",
    "Sorted by size?",
    "Now recursively.",
    "Print their total size.",
    "Write it as a function.",
]


def prefix(args) -> None:
    from dataclasses import replace

    from llama.engine import Engine
    from llama.generation import Llama
    from llama.options import GenerationOptions

    llama = Llama.build(str(BUNDLED), max_seq_len=2048, max_batch_size=1, device="cpu", dtype="float32")
    engines = {
        "prefix cache": Engine(llama.model, llama.tokenizer, llama.engine.options),
        "none": Engine(llama.model, llama.tokenizer, replace(llama.engine.options, prefix_cache=False)),
    }
    options = GenerationOptions(max_gen_len=24, temperature=0)
    ttft = {name: [] for name in engines}
    agree = True
    for round_ in range(args.rounds):
        system = f"{round_}: " + SYSTEM_LINE * 60  # ~1,000 tokens, new each round
        dialogs = {name: [{"role": "system", "content": system}] for name in engines}
        for turn, question in enumerate(QUESTIONS):
            answers = {}
            for name in sorted(engines, reverse=(round_ + turn) % 2 == 1):  # alternate who goes first
                dialog = dialogs[name] + [{"role": "user", "content": question}]
                prompt = llama.encode_dialog(dialog)
                request = engines[name].submit([prompt], options)
                for _ in engines[name].run_until_done(request):
                    pass
                ttft[name].append(request.first_token_at - request.submitted_at)
                answers[name] = request.texts()[0]
                dialogs[name] = dialog + [{"role": "assistant", "content": answers[name]}]
            agree &= len(set(answers.values())) == 1
    prompt_tokens = len(prompt)
    means = {name: statistics.mean(values) for name, values in ttft.items()}
    print(
        f"\nprefix ({load_average()}): bundled model, 6 turns x {args.rounds} round(s), "
        f"last prompt {prompt_tokens} tokens"
    )
    for name, values in ttft.items():
        print(
            f"  {name:12s} mean time to first token {means[name] * 1e3:7.1f} ms "
            f"(per turn, last round: {', '.join(f'{v * 1e3:.0f}' for v in values[-6:])} ms)"
        )
    print(f"  ratio {means['prefix cache'] / means['none']:.3f}; same answers: {agree}")


# --- decode -----------------------------------------------------------------------------------------


def worker() -> None:
    """A decoding worker on stdin/stdout: "build <ckpt_dir> <compile>" then "round <n>" lines."""
    import torch

    sys.path.insert(0, os.getcwd())  # the checkout under test
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    engines = {}
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "build":
            ckpt_dir, compile = rest[0], rest[1] == "1"
            engines[ckpt_dir, compile] = load(ckpt_dir, 256, 1, compile)
            result = 0.0
        else:
            ckpt_dir, compile, n_tokens = rest[0], rest[1] == "1", int(rest[2])
            engine = engines[ckpt_dir, compile]
            prompt = [[1] + list(range(3, 18))]

            def timed(n, engine=engine, prompt=prompt):
                start = time.perf_counter()
                generate(engine, prompt, n)
                return time.perf_counter() - start

            result = statistics.median((n_tokens - 1) / max(timed(n_tokens) - timed(1), 1e-9) for _ in range(3))
        print(json.dumps(result), flush=True)


class Worker:
    def __init__(self, pythonpath: str, threads: int):
        env = {**os.environ, "PYTHONPATH": pythonpath, "BENCH_THREADS": str(threads)}
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=pythonpath,
        )

    def ask(self, line: str) -> float:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def decode(args) -> None:
    if not args.reference:
        print("decode: needs --reference (another checkout)")
        return
    with tempfile.TemporaryDirectory() as folder:
        models = {"bundled": str(BUNDLED), "134M": random_134m(folder)}
        workers = {"blocks": Worker(str(ROOT), args.threads), "reference": Worker(args.reference, args.threads)}
        cases = [(model, compile) for model in models for compile in ("0", "1")]
        for model, compile in cases:
            for w in workers.values():
                w.ask(f"build {models[model]} {compile}")
                w.ask(f"round {models[model]} {compile} {args.decode_tokens}")  # warm-up, compiles
        results = {(name, case): [] for name in workers for case in cases}
        for round_ in range(args.rounds):
            for case in cases:
                for name in sorted(workers, reverse=round_ % 2 == 1):
                    results[name, case].append(
                        workers[name].ask(f"round {models[case[0]]} {case[1]} {args.decode_tokens}")
                    )
        for w in workers.values():
            w.close()
    print(
        f"\ndecode ({load_average()}): batch 1, {args.decode_tokens} tokens, {args.threads} threads, "
        f"median of {args.rounds} rounds; reference {args.reference}"
    )
    for model, compile in cases:
        ours, theirs = (statistics.median(results[name, (model, compile)]) for name in ("blocks", "reference"))
        per_round = statistics.median(
            a / b for a, b in zip(results["blocks", (model, compile)], results["reference", (model, compile)])
        )
        print(
            f"  {model:8s} {'compiled' if compile == '1' else 'eager':8s} blocks {ours:7.1f} tok/s, "
            f"reference {theirs:7.1f} tok/s, "
            f"ratio {ours / theirs:.3f} (median of the rounds' ratios {per_round:.3f})"
        )


# --- concurrency ------------------------------------------------------------------------------------


def concurrency(args) -> None:
    import torch

    from llama.options import GenerationOptions

    tokens = 8 * 2048
    print(
        f"\nconcurrency ({load_average()}): the bundled model, "
        f"KV memory of 8 x 2048 = {tokens} tokens, 300-token conversations"
    )
    for name, rows in [("contiguous (8 slots)", 8), ("pool (48 slots)", 48)]:
        engine = load(str(BUNDLED), 2048, rows, kv_cache_tokens=tokens)
        generator = torch.Generator().manual_seed(0)
        options = GenerationOptions(max_gen_len=200, temperature=0, stop_tokens=[])
        requests = [
            engine.submit([torch.randint(3, 4096, (100,), generator=generator).tolist()], options, stream_text=False)
            for _ in range(48)
        ]
        most = 0
        while not all(request.done for request in requests):
            engine.step()
            most = max(most, engine.running_slots)
        print(f"  {name:28s} {most} conversations at once, {engine.preemptions} preemption(s)")


# --- flex -------------------------------------------------------------------------------------------


def decode_seconds(engine, prompts, n_steps: int) -> float:
    """Seconds per decode step of all rows together, after their prefill (one pass: the engine's
    prefill_chunk holds every prompt) and first token."""
    from llama.options import GenerationOptions

    request = engine.submit(
        prompts, GenerationOptions(max_gen_len=n_steps + 1, temperature=0, stop_tokens=[]), stream_text=False
    )
    while not request.tokens[0]:
        engine.step()
    start = time.perf_counter()
    while not request.done:
        engine.step()
    return (time.perf_counter() - start) / n_steps


def flex(args) -> None:
    import torch

    from bench.common import checkpoint_args
    from llama.checkpoints.loader import load_model
    from llama.engine import Engine, engine_options_for

    torch._dynamo.config.recompile_limit = 64  # every engine's graphs are the one decode step's, by its code
    rows, steps, max_seq_len = 8, args.decode_tokens, 512
    generator = torch.Generator().manual_seed(0)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, ckpt_dir in {"bundled": str(BUNDLED), "134M": random_134m(folder)}.items():
            model = load_model(
                ckpt_dir, checkpoint_args(ckpt_dir, max_seq_len, rows), torch.device("cpu"), torch.float32, None
            )
            vocab = model.params.vocab_size
            # no prefix cache: the two engines share the model's pool, one after the other
            policy = dict(compile=True, prefill_chunk=rows * args.flex_prompt, prefix_cache=False)
            engines = {
                attention: Engine(model, None, engine_options_for(model, compiled_attention=attention, **policy))
                for attention in ("gather", "flex")
            }
            for bsz in (1, rows):
                prompts = [
                    torch.randint(3, vocab, (args.flex_prompt,), generator=generator).tolist() for _ in range(bsz)
                ]
                for engine in engines.values():
                    decode_seconds(engine, prompts, steps)  # compiles this width's steps
                for round_ in range(args.rounds):
                    for attention in sorted(engines, reverse=round_ % 2 == 1):
                        results.setdefault((name, bsz, attention), []).append(
                            decode_seconds(engines[attention], prompts, steps)
                        )
    print(
        f"\nflex ({load_average()}): the compiled decode step, max_seq_len {max_seq_len}, "
        f"{args.flex_prompt}-token prompts, "
        f"{steps} steps, {args.threads} thread(s), median of {args.rounds} rounds"
    )
    for name, bsz in dict.fromkeys((name, bsz) for name, bsz, _ in results):
        times = {attention: [t * 1e3 for t in results[name, bsz, attention]] for attention in ("gather", "flex")}
        medians = {attention: statistics.median(t) for attention, t in times.items()}
        spread = {attention: f"{min(t):.2f}-{max(t):.2f}" for attention, t in times.items()}
        print(
            f"  {name:8s} batch {bsz}: gather {medians['gather']:7.2f} ms/step ({spread['gather']}), "
            f"flex {medians['flex']:7.2f} ms/step ({spread['flex']}), "
            f"flex/gather {medians['flex'] / medians['gather']:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["memory", "prefix", "concurrency"],
        choices=["memory", "prefix", "decode", "concurrency", "flex"],
    )
    parser.add_argument("--reference", help="another checkout of this project, for the decode section")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode_tokens", type=int, default=100)
    parser.add_argument(
        "--flex_prompt", type=int, default=200, help="prompt tokens per row before the flex section's decode steps"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    for section in args.sections:
        globals()[section](args)


if __name__ == "__main__":
    main()
