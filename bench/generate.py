"""Decode tokens/s through ``Llama.generate``, eager against compiled, in one run.

Greedy decoding of a batch of random prompts (no early stop), the prefill subtracted: each round times
``generate`` for max_gen_len tokens and for one token, eager and compiled alternating so load from
other processes hits both alike; prints the median tokens/s of each and the ratio. Uses only
``Llama.build`` and ``generate``, so it times any version of this project alike (run it with
PYTHONPATH pointing at another checkout to compare versions).

    python bench/generate.py                                   # the bundled model, batch 1 and 8
    python bench/generate.py --ckpt_dir CKPT --batch_sizes 1 --gen_tokens 128
"""

import argparse
import statistics
import time

import torch

from llama.checkpoints.files import BUNDLED
from llama.generation import Llama


def timed_generate(llama: Llama, prompts, n_tokens: int) -> float:
    start = time.perf_counter()
    llama.generate(prompts, max_gen_len=n_tokens, temperature=0, stop_tokens=[])
    return time.perf_counter() - start


def decode_tokens_per_second(llama: Llama, prompts, n_tokens: int) -> float:
    """Tokens/s of the decoding steps: generate's time for n tokens less its time for one."""
    total, first = timed_generate(llama, prompts, n_tokens), timed_generate(llama, prompts, 1)
    return len(prompts) * (n_tokens - 1) / max(total - first, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", default=str(BUNDLED))
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--gen_tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    max_seq_len = args.prompt_len + args.gen_tokens
    builds = {
        "eager": Llama.build(
            args.ckpt_dir, max_seq_len=max_seq_len, max_batch_size=max(args.batch_sizes), device="cpu", dtype="float32"
        ),
        "compiled": Llama.build(
            args.ckpt_dir,
            max_seq_len=max_seq_len,
            max_batch_size=max(args.batch_sizes),
            device="cpu",
            dtype="float32",
            compile=True,
        ),
    }
    vocab_size = builds["eager"].model.params.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = [
        [1] + torch.randint(3, vocab_size, (args.prompt_len - 1,), generator=generator).tolist()
        for _ in range(max(args.batch_sizes))
    ]
    for llama in builds.values():  # warm-up: compiles every graph the rounds use
        for bsz in args.batch_sizes:
            timed_generate(llama, prompts[:bsz], args.gen_tokens)
    results = {(name, bsz): [] for name in builds for bsz in args.batch_sizes}
    for _ in range(args.rounds):
        for bsz in args.batch_sizes:
            for name, llama in builds.items():
                results[name, bsz].append(decode_tokens_per_second(llama, prompts[:bsz], args.gen_tokens))
    print(f"{args.ckpt_dir}, {args.threads} threads, {args.gen_tokens} tokens, median of {args.rounds} rounds")
    for bsz in args.batch_sizes:
        eager, compiled = (statistics.median(results[name, bsz]) for name in builds)
        print(
            f"batch {bsz}: eager {eager:.1f} tok/s, compiled {compiled:.1f} tok/s, "
            f"compiled/eager {compiled / eager:.2f}x"
        )


if __name__ == "__main__":
    main()
