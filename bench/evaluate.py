"""Log-likelihood requests through lm-evaluation-harness: this project's ``LlamaLM`` side by side with
lm-eval's own ``hf`` backend (transformers' LlamaForCausalLM) on the same weights, in one run.

The requests are shaped like a multiple-choice task's: --questions contexts of 40 to 120 random tokens,
each with --choices continuations of 1 to 8 tokens, handed as token pairs to each backend's
``_loglikelihood_tokens`` (what ``loglikelihood`` calls after tokenizing). Rounds alternate between
the backends; each figure is the median over --rounds, and the largest difference between the two
backends' log-likelihoods is printed with them.

    python bench/evaluate.py                       # a random 134M checkpoint (stories110M shapes)
    python bench/evaluate.py --choices 1           # every context different: nothing shared
"""

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import DTYPES, add_checkpoint_args, checkpoint_args, print_table, random_checkpoint
from llama.checkpoints.files import BUNDLED
from llama.checkpoints.loader import load_model
from llama.evaluation.harness import LlamaLM
from llama.generation import Llama
from llama.tokenizer import Tokenizer
from transformers_llama import to_transformers

TOKENIZER = BUNDLED / "tokenizer.model"  # only BOS and EOS are read: the requests are tokens


def make_requests(questions: int, choices: int, vocab_size: int, seed: int = 0) -> list:
    """lm-eval's token requests: ((context text, continuation text), context tokens, continuation tokens)."""
    rng = random.Random(seed)
    requests = []
    for _ in range(questions):
        context = [1] + [rng.randrange(3, vocab_size) for _ in range(rng.randrange(40, 121))]
        for _ in range(choices):
            requests.append(((None, None), context, [rng.randrange(3, vocab_size) for _ in range(rng.randrange(1, 9))]))
    return requests


def hf_backend(model, batch_size: int):
    from lm_eval.models.huggingface import HFLM
    from transformers import LlamaTokenizer

    return HFLM(pretrained=model, tokenizer=LlamaTokenizer(vocab_file=str(TOKENIZER)), batch_size=batch_size)


def timed(backend, requests) -> tuple:
    start = time.perf_counter()
    answers = backend._loglikelihood_tokens(requests, disable_tqdm=True)
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(parser)
    parser.add_argument("--questions", type=int, default=75)
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    scratch = tempfile.TemporaryDirectory(prefix="llama-bench-")
    ckpt_dir = args.ckpt_dir or random_checkpoint(args, str(Path(scratch.name) / "llama"))
    max_seq_len = 256
    model_args = checkpoint_args(ckpt_dir, max_seq_len, args.batch_size)
    model = load_model(ckpt_dir, model_args, torch.device("cpu"), torch.float32)
    ours = LlamaLM(Llama(model, Tokenizer(str(TOKENIZER))))
    params = {
        k: v
        for k, v in vars(model_args).items()
        if k
        in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "ffn_dim_multiplier", "norm_eps", "rope_theta")
    }
    state = {k: v.float() for k, v in model.state_dict().items()}
    theirs = hf_backend(
        to_transformers(state, params, model_args.vocab_size, max_seq_len, DTYPES["float32"]), args.batch_size
    )
    del state
    requests = make_requests(args.questions, args.choices, model_args.vocab_size)
    print(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(requests)} requests "
        f"({args.questions} contexts x {args.choices}), batch size {args.batch_size}, {torch.get_num_threads()} threads"
    )

    backends = {"llama LlamaLM": ours, "lm-eval hf": theirs}
    timed(ours, requests[: args.choices * 2]), timed(theirs, requests[: args.choices * 2])  # warm-up
    seconds = {name: [] for name in backends}
    answers = {}
    for r in range(args.rounds):
        for name, backend in backends.items():
            elapsed, answers[name] = timed(backend, requests)
            seconds[name].append(elapsed)
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{name} {s[-1]:.2f} s" for name, s in seconds.items()),
            flush=True,
        )
    difference = max(abs(a[0] - b[0]) for a, b in zip(answers["llama LlamaLM"], answers["lm-eval hf"]))
    same_greedy = all(a[1] == b[1] for a, b in zip(answers["llama LlamaLM"], answers["lm-eval hf"]))
    reference = statistics.median(seconds["lm-eval hf"])
    rows = []
    for name, s in seconds.items():
        median = statistics.median(s)
        rows.append(
            [
                name,
                f"{median:.2f}",
                f"{min(s):.2f}-{max(s):.2f}",
                f"{len(requests) / median:.1f}",
                f"{reference / median:.2f}x",
            ]
        )
    print_table(
        "log-likelihood requests, median of rounds", ["backend", "seconds", "range", "requests/s", "speed vs hf"], rows
    )
    print(f"largest |logprob difference| {difference:.2e}; is_greedy equal on every request: {same_greedy}")


if __name__ == "__main__":
    main()
