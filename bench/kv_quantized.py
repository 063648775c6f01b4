"""The KV cache stored in 8 bits (``--kv_cache_dtype int8`` / ``float8_e4m3fn``) against the float cache,
side by side in one run:

    python bench/kv_quantized.py --sections bytes perplexity divergence concurrency decode --threads 1

Sections (each prints the CPU, the thread count and the load average: the machine may be shared):

- bytes: a token's keys and values in one layer, scales included, at the bundled model's, 134M's and Llama 3
  8B's head shapes: 2 x n_kv_heads x (head_dim x the stored value's bytes + the scale's bytes), a float32 or
  bfloat16 pool against int8 / float8 with float32 scales (a CPU, where attention computes in float32) and
  bfloat16 ones (a GPU's bfloat16 model); and a built pool's bytes against the formula.
- perplexity: the bundled model on its held-out files (``train.py --print_heldout``), in windows of 256
  tokens overlapping by one, scored through the engine (``Engine.score``: each window's prefill writes its
  keys and values into the pool and attends over them as the pool holds them), each pool dtype in turn;
  and the cache-less forward of ``python -m llama.perplexity`` as the reference for the float pool.
- divergence: teacher-forced decoding through the cached forward (a prefill, then one token a step, each
  step reading every earlier token from the pool), each pool against the float32 one at every step: the
  mean and largest KL divergence of the next-token distributions, the mean |difference| of the fed tokens'
  log-probabilities, exp(mean difference) (the perplexity ratio over those tokens) and how often the most
  likely token agrees. On the bundled model (held-out text) and a random 134M model (random tokens:
  perplexity means nothing for random weights, the divergence from the float pool does). The pools:
  int8 and float8 with float32 scales (a CPU's), and with bfloat16 scales against a bfloat16 pool (a
  GPU's bfloat16 model, computed here on the CPU).
- concurrency: the bundled model, 300-token conversations (100 prompt + 200 greedy) in the KV memory of a
  float32 pool of 8 x 2048 tokens: as many as a float32 pool of those bytes holds whole (its blocks over a
  conversation's 19), and as many as an int8 pool of the same bytes holds, each run in as many slots (all
  at once, none preempted: checked), and a tenth more (preempted: the pool is full); and the same for the
  token counts a bfloat16 pool and an int8 pool with bfloat16 scales hold in those bytes (a GPU's case;
  run as pools of those many tokens here).
- decode: the decode step of 8 rows with 2,048 cached tokens each (each round resubmits the same prompts:
  the prefix cache holds all but their last block), eager, each pool dtype on its own copy of the model,
  taking turns round by round: median ms per step and tokens/s; ``--modes eager gather flex`` adds the
  compiled step gathering the rows' blocks and reading the pool with FlexAttention (float32 and int8).
"""

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import print_table  # noqa: E402
from bench.house import cpu_model  # noqa: E402
from bench.kv_blocks import BUNDLED, random_134m  # noqa: E402

POOLS = [None, "int8", "float8_e4m3fn"]  # the model's dtype (float32 here), and the 8-bit pools


def name(kv_cache_dtype) -> str:
    return kv_cache_dtype or "float32"


def machine(args) -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), load average {load}"


def load_model(ckpt_dir: str, max_seq_len: int, max_batch_size: int):
    from bench.common import checkpoint_args
    from llama.checkpoints.loader import load_model

    args = checkpoint_args(ckpt_dir, max_seq_len, max_batch_size)
    return load_model(ckpt_dir, args, torch.device("cpu"), torch.float32, None)


def heldout_tokens(tokenizer) -> list:
    """Each held-out file's tokens, BOS first."""
    import train

    return [tokenizer.encode(p.read_text(encoding="utf-8"), bos=True, eos=False) for p in train.split_files(5)[1]]


# --- bytes ------------------------------------------------------------------------------------------


def bytes_section(args) -> None:
    from llama.engine import Engine, engine_options_for
    from llama.layers.kv_cache import KV_CACHE_DTYPES, pool_token_bytes

    shapes = {"bundled (6 x 32)": (6, 32), "134M (12 x 64)": (12, 64), "Llama 3 8B (8 x 128)": (8, 128)}
    rows = []
    for shape, (heads, head_dim) in shapes.items():
        f32, bf16 = (pool_token_bytes(heads, head_dim, dtype) for dtype in (torch.float32, torch.bfloat16))
        row = [shape, f32, bf16]
        for storage in KV_CACHE_DTYPES.values():
            stored_f32 = pool_token_bytes(heads, head_dim, torch.float32, storage)
            stored_bf16 = pool_token_bytes(heads, head_dim, torch.bfloat16, storage)
            row += [f"{stored_f32} ({stored_f32 / f32:.3f}x)", f"{stored_bf16} ({stored_bf16 / bf16:.3f}x)"]
        rows.append(row)
    header = ["heads x head_dim", "float32", "bfloat16", "int8, f32 scales", "int8, bf16 scales"]
    header += ["float8, f32 scales", "float8, bf16 scales"]
    print_table("bytes: one token's keys and values in one layer (x: of float32's, or of bfloat16's)", header, rows)
    model = load_model(str(BUNDLED), 2048, 8)
    for kv_cache_dtype in POOLS:
        engine = Engine(model, None, engine_options_for(model, kv_cache_dtype=kv_cache_dtype))
        storage = KV_CACHE_DTYPES.get(kv_cache_dtype)
        formula = pool_token_bytes(6, 32, torch.float32, storage) * 4 * engine.options.kv_cache_blocks * 16
        print(
            f"  the bundled model's pool of 8 x 2048 tokens (and the scratch block), {name(kv_cache_dtype)}: "
            f"{engine.kv_cache_bytes / 2**20:.2f} MiB, the formula {formula / 2**20:.2f} MiB"
        )


# --- perplexity -------------------------------------------------------------------------------------


def perplexity_section(args) -> None:
    from llama.engine import Engine, engine_options_for
    from llama.perplexity import document_windows, window_loss
    from llama.tokenizer import Tokenizer

    tokenizer = Tokenizer(str(BUNDLED / "tokenizer.model"))
    windows = [w for tokens in heldout_tokens(tokenizer) for w in document_windows(tokens, 256)]
    windows = [w for w in windows if len(w) >= 2]
    pairs = [(w[:1], w[1:]) for w in windows]
    model = load_model(str(BUNDLED), 256, 8)
    start = time.perf_counter()
    reference = window_loss(model, windows, 8)
    print(f"\nperplexity ({machine(args)}): the bundled model, {len(windows)} held-out windows of <= 256 tokens")
    print(
        f"  cache-less forward (python -m llama.perplexity): {reference['perplexity']:.4f} over "
        f"{reference['tokens']} tokens in {time.perf_counter() - start:.1f} s"
    )
    results = {}
    for kv_cache_dtype in POOLS:
        engine = Engine(
            model,
            None,
            engine_options_for(model, kv_cache_dtype=kv_cache_dtype, prefix_cache=False, prefill_chunk=2048),
        )
        start = time.perf_counter()
        scores = engine.score(pairs)
        seconds = time.perf_counter() - start
        logprobs = [logprob for row, _ in scores for logprob in row]
        results[kv_cache_dtype] = math.exp(-sum(logprobs) / len(logprobs))
        print(
            f"  through the engine, {name(kv_cache_dtype):14s} pool: perplexity {results[kv_cache_dtype]:.4f} "
            f"({results[kv_cache_dtype] / results[None]:.5f}x the float32 pool's) over {len(logprobs)} tokens, "
            f"scored in {seconds:.1f} s"
        )


# --- divergence -------------------------------------------------------------------------------------

# (label, dtype attention computes in, storage): the reference first, then each against it
DIVERGENCE_POOLS = [
    ("float32", torch.float32, None),
    ("int8, float32 scales", torch.float32, torch.int8),
    ("float8, float32 scales", torch.float32, torch.float8_e4m3fn),
    ("bfloat16", torch.bfloat16, None),
    ("int8, bfloat16 scales", torch.bfloat16, torch.int8),
    ("float8, bfloat16 scales", torch.bfloat16, torch.float8_e4m3fn),
]


@torch.no_grad()
def teacher_forced(model, tokens: torch.Tensor, prompt: int, dtype: torch.dtype, storage) -> torch.Tensor:
    """Log-probabilities (rows, steps, vocab) of decoding ``tokens`` (rows, length) through the cached forward:
    ``prompt`` tokens prefilled, then one token a step, every step reading the earlier ones from the pool."""
    from llama.layers.kv_cache import BlockTables, attended_tables, contiguous_tables

    rows, length = tokens.shape
    blocks_per_row = -(-length // 16)
    model.setup_cache(1 + rows * blocks_per_row, 16, dtype, storage)
    tables = contiguous_tables(rows, blocks_per_row, tokens.device)
    positions = torch.arange(length).expand(rows, length)

    def step(begin: int, end: int) -> torch.Tensor:
        cache = BlockTables(attended_tables(tables, end, 16))
        return model(tokens[:, begin:end], positions=positions[:, begin:end], cache=cache)

    logits = [step(0, prompt)[:, -1:]]
    logits += [step(t, t + 1) for t in range(prompt, length - 1)]
    return torch.log_softmax(torch.cat(logits, dim=1).float(), dim=-1)


def divergence_rows(model, tokens: torch.Tensor, prompt: int) -> list:
    reference = teacher_forced(model, tokens, prompt, torch.float32, None)
    fed = tokens[:, prompt:, None]  # the token each step is fed next: (rows, steps, 1)
    chosen = reference.gather(2, fed)
    rows = []
    for label, dtype, storage in DIVERGENCE_POOLS[1:]:
        logprobs = teacher_forced(model, tokens, prompt, dtype, storage)
        kl = (reference.exp() * (reference - logprobs)).sum(-1)  # (rows, steps)
        difference = chosen - logprobs.gather(2, fed)
        agree = (reference.argmax(-1) == logprobs.argmax(-1)).float().mean()
        rows.append(
            [
                label,
                f"{kl.mean():.2e}",
                f"{kl.max():.2e}",
                f"{difference.abs().mean():.2e}",
                f"{math.exp(difference.mean()):.5f}",
                f"{100 * agree:.1f}%",
            ]
        )
    model.drop_cache()
    return rows


def divergence_section(args) -> None:
    from llama.tokenizer import Tokenizer

    header = ["pool", "mean KL", "max KL", "mean |dlogprob|", "ppl ratio", "top-1 agreement"]
    rows, prompt, steps = 4, 128, args.divergence_steps
    tokenizer = Tokenizer(str(BUNDLED / "tokenizer.model"))
    documents = [t for t in heldout_tokens(tokenizer) if len(t) >= prompt + steps + 1]
    tokens = torch.tensor([d[: prompt + steps + 1] for d in documents[:rows]])
    bundled = load_model(str(BUNDLED), prompt + steps + 1, rows)
    title = f"divergence ({machine(args)}): each pool against the float32 pool, {rows} rows x {steps} steps"
    print_table(f"{title}; the bundled model, held-out text", header, divergence_rows(bundled, tokens, prompt))
    with tempfile.TemporaryDirectory() as folder:
        model = load_model(random_134m(folder), prompt + steps + 1, rows)
        vocab = model.params.vocab_size
        tokens = torch.randint(3, vocab, (rows, prompt + steps + 1), generator=torch.Generator().manual_seed(0))
        print_table(
            "the random 134M model, random tokens (its perplexity means nothing: read the divergence)",
            header,
            divergence_rows(model, tokens, prompt),
        )


# --- concurrency ------------------------------------------------------------------------------------


def conversations_at_once(kv_cache_dtype, pool_tokens: int, conversations: int) -> tuple:
    """``conversations`` greedy 300-token conversations (100 random prompt tokens, 200 generated) in as many
    slots over a pool of ``pool_tokens``: the most running at once, the preemptions, the pool's bytes, seconds."""
    from bench.kv_blocks import load
    from llama.options import GenerationOptions

    engine = load(str(BUNDLED), 512, conversations, kv_cache_tokens=pool_tokens, kv_cache_dtype=kv_cache_dtype)
    generator = torch.Generator().manual_seed(0)
    options = GenerationOptions(max_gen_len=200, temperature=0, stop_tokens=[])
    requests = [
        engine.submit([torch.randint(3, 4096, (100,), generator=generator).tolist()], options, stream_text=False)
        for _ in range(conversations)
    ]
    most, start = 0, time.perf_counter()
    while not all(request.done for request in requests):
        engine.step()
        most = max(most, engine.running_slots)
    return most, engine.preemptions, engine.kv_cache_bytes, time.perf_counter() - start


def concurrency_section(args) -> None:
    from llama.layers.kv_cache import pool_token_bytes

    memory = 8 * 2048 * pool_token_bytes(6, 32, torch.float32)  # a float32 pool of 8 x 2048, per layer
    cases = [  # (label, pool dtype run, the pool's tokens in that memory)
        ("float32", None, memory // pool_token_bytes(6, 32, torch.float32)),
        ("int8, float32 scales", "int8", memory // pool_token_bytes(6, 32, torch.float32, torch.int8)),
        ("bfloat16 (as tokens)", None, memory // pool_token_bytes(6, 32, torch.bfloat16)),
        ("int8, bfloat16 scales (as tokens)", "int8", memory // pool_token_bytes(6, 32, torch.bfloat16, torch.int8)),
    ]
    blocks = -(-300 // 16)  # a conversation's blocks once it is whole
    print(
        f"\nconcurrency ({machine(args)}): the bundled model, 300-token conversations (100 prompt + 200 greedy), in "
        f"the KV memory of a float32 pool of 8 x 2048 tokens ({4 * memory / 2**20:.1f} MiB): the pool's blocks over "
        f"a conversation's {blocks} conversations run in as many slots (all at once, none preempted), and a tenth "
        "more (preempted)"
    )
    held = {}
    for label, kv_cache_dtype, tokens in cases:
        held[label] = tokens // 16 // blocks
        for conversations in (held[label], held[label] + held[label] // 10):
            most, preemptions, pool, seconds = conversations_at_once(kv_cache_dtype, tokens, conversations)
            print(
                f"  {label:34s} {tokens:6d} tokens ({pool / 2**20:5.1f} MiB), {conversations:3d} conversations: "
                f"{most:3d} at once, {preemptions:3d} preemption(s), {seconds:.0f} s",
                flush=True,
            )
    print(
        f"  conversations at once, int8 against float32: {held['int8, float32 scales'] / held['float32']:.2f}x; "
        f"against bfloat16 (a GPU's): {held['int8, bfloat16 scales (as tokens)'] / held['bfloat16 (as tokens)']:.2f}x"
    )


# --- decode -----------------------------------------------------------------------------------------


def decode_section(args) -> None:
    from bench.kv_blocks import decode_seconds
    from llama.engine import Engine, engine_options_for

    rows, cached, steps = 8, 2048, args.decode_steps
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        for model_name, ckpt_dir in (("bundled", str(BUNDLED)), ("134M", random_134m(folder))):
            if model_name not in args.models:
                continue
            model = load_model(ckpt_dir, cached + 2 * steps + 16, rows)
            vocab = model.params.vocab_size
            prompts = [torch.randint(3, vocab, (cached,), generator=generator).tolist() for _ in range(rows)]
            policies = [(kv_cache_dtype, None) for kv_cache_dtype in POOLS] if "eager" in args.modes else []
            compiled = [attention for attention in ("gather", "flex") if attention in args.modes]
            policies += [(kv_cache_dtype, attention) for kv_cache_dtype in (None, "int8") for attention in compiled]
            engines = {}
            for kv_cache_dtype, attention in policies:
                compile_options = dict(compile=True, compiled_attention=attention) if attention else {}
                options = engine_options_for(
                    model, kv_cache_dtype=kv_cache_dtype, prefill_chunk=rows * cached, **compile_options
                )
                engine = Engine(copy.deepcopy(model), None, options)
                start = time.perf_counter()
                decode_seconds(engine, prompts, steps)  # the prefill, and the compile
                print(
                    f"  ({model_name}, {name(kv_cache_dtype)} {attention or 'eager'}: first round "
                    f"{time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
                engines[kv_cache_dtype, attention] = engine
            times = {key: [] for key in engines}
            for round_ in range(args.rounds):
                for key in sorted(engines, key=str, reverse=round_ % 2 == 1):
                    times[key].append(decode_seconds(engines[key], prompts, steps))
            print(
                f"\ndecode ({machine(args)}): {model_name}, {rows} rows x {cached} cached tokens, {steps} steps a "
                f"round, median of {args.rounds} rounds"
            )
            reference = (None, None) if (None, None) in times else (None, "flex" if "flex" in args.modes else "gather")
            base = times[reference]
            for attention in (None, "gather", "flex"):
                for kv_cache_dtype in POOLS:
                    if (kv_cache_dtype, attention) not in times:
                        continue
                    t = times[kv_cache_dtype, attention]
                    median = statistics.median(t)
                    print(
                        f"  {attention or 'eager':6s} {name(kv_cache_dtype):14s} {median * 1e3:8.1f} ms/step "
                        f"({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f}), {rows / median:7.1f} tok/s, "
                        f"{statistics.median(base) / median:.3f}x the {reference[1] or 'eager'} float32 pool's"
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sections = ["bytes", "perplexity", "divergence", "concurrency", "decode"]
    parser.add_argument("--sections", nargs="+", default=sections, choices=sections)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--decode_steps", type=int, default=16, help="decode steps timed a round")
    parser.add_argument("--models", nargs="+", default=["bundled", "134M"], choices=["bundled", "134M"])
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["eager"],
        choices=["eager", "gather", "flex"],
        help="decode: the eager step (every pool), the compiled one gathering the rows' blocks or reading the pool "
        "with FlexAttention (float32 and int8)",
    )
    parser.add_argument("--divergence_steps", type=int, default=128, help="divergence: teacher-forced steps a row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # every engine's graphs are the one decode step's, by its code
    for section in args.sections:
        globals()[f"{section}_section"](args)


if __name__ == "__main__":
    main()
