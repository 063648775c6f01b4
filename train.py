"""Train the small Llama that ships in checkpoints/tiny-stdlib, on the Python standard library's source.

    python train.py --out_dir checkpoints/tiny-stdlib      # the bundled model: about 14 minutes on 2 CPU cores
    python train.py                                        # the same, into checkpoints/tiny-stdlib-retrained

Every machine with Python has its standard library, so nothing is downloaded. The .py files of the
running interpreter's library (tests, codec tables and generated data left out) are split into
training and held-out files by a hash of their path, so the split is the same on every machine.
A sentencepiece tokenizer with Llama's special ids (unk 0, BOS 1, EOS 2, no pad, byte fallback so
any text round-trips) is trained on the training files' lines; then a Llama ``Transformer`` is
trained with the causal language-modelling loss (``llama.layers.loss``) and AdamW on random windows of the
training files' tokens, with a linear warmup and a cosine decay of the learning rate, by the training
loop fine-tuning runs on (``llama.training.loop``). The result is written in Meta's layout:
``params.json`` (its ``max_seq_len`` the training windows' length), ``consolidated.00.pth`` (bfloat16)
and ``tokenizer.model``.

The run is deterministic given --seed on a given machine and thread count.
"""

import argparse
import contextlib
import hashlib
import logging
import sysconfig
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

from llama.checkpoints.writers import save_checkpoint
from llama.model import ModelArgs, Transformer
from llama.perplexity import text_windows, unigram_log_probs, unigram_loss, window_loss
from llama.tokenizer import Tokenizer, train_tokenizer
from llama.training import loop
from llama.training.data import Batch
from llama.training.log import MetricsLog

logger = logging.getLogger("train")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Folders of the library that are not ordinary library code: tests, installed packages, codec
# tables and pydoc's generated help text.
DEFAULT_OUT_DIR = "checkpoints/tiny-stdlib-retrained"  # beside the bundled model, never over it
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data"}


def stdlib_files(root: Path = STDLIB) -> List[Path]:
    """The library's .py files, sorted, outside ``EXCLUDED_DIRS``."""
    return sorted(p for p in root.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))


def is_heldout(path: Path, heldout_percent: int, root: Path = STDLIB) -> bool:
    """A file is held out when the hash of its path inside the library falls in the first percents."""
    digest = hashlib.sha256(path.relative_to(root).as_posix().encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < heldout_percent


def split_files(heldout_percent: int, root: Path = STDLIB) -> Tuple[List[Path], List[Path]]:
    """(training files, held-out files)."""
    files = stdlib_files(root)
    heldout = [p for p in files if is_heldout(p, heldout_percent, root)]
    return [p for p in files if p not in heldout], heldout


def read_texts(paths: Sequence[Path]) -> List[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in paths]


def token_stream(tokenizer: Tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """All texts as one sequence of ids, each text framed by BOS and EOS."""
    ids = tokenizer.sp_model.encode(list(texts))
    return torch.tensor([t for doc in ids for t in [tokenizer.bos_id, *doc, tokenizer.eos_id]], dtype=torch.long)


def random_windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size, seq_len) windows of ``stream`` at uniformly random offsets."""
    starts = torch.randint(0, len(stream) - seq_len + 1, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    train_files, heldout_files = split_files(args.heldout_percent)
    if args.max_train_files is not None:
        train_files = train_files[: args.max_train_files]
    train_texts, heldout_texts = read_texts(train_files), read_texts(heldout_files)
    logger.info(
        "%s: %d training files (%.1f MB), %d held-out files (%.1f MB)",
        STDLIB,
        len(train_files),
        sum(map(len, train_texts)) / 1e6,
        len(heldout_files),
        sum(map(len, heldout_texts)) / 1e6,
    )

    lines = [line for text in train_texts for line in text.splitlines() if line.strip()]
    (out_dir / "tokenizer.model").write_bytes(train_tokenizer(lines, args.vocab_size))
    tokenizer = Tokenizer(str(out_dir / "tokenizer.model"))
    stream = token_stream(tokenizer, train_texts)
    logger.info(
        "tokenizer: %d pieces; %d training tokens (%.2f characters per token)",
        tokenizer.n_words,
        len(stream),
        sum(map(len, train_texts)) / len(stream),
    )

    params = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.n_heads,
        "n_kv_heads": args.n_kv_heads,
        "multiple_of": args.multiple_of,
        "norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": tokenizer.n_words,
        "max_seq_len": args.seq_len,  # the context it is trained for, which the checkpoint's readers cannot guess
    }
    model_args = ModelArgs.from_dict({**params, "max_batch_size": 1})
    with device:
        model = Transformer(model_args)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %s, %.2fM parameters (%.1f MB in bfloat16)", params, n_params / 1e6, 2 * n_params / 1e6)

    # the training loop of every training in this repository (llama.training.loop), on random windows of the stream
    generator = torch.Generator().manual_seed(args.seed)
    heldout_windows = text_windows(tokenizer, heldout_texts, args.seq_len)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16_autocast else contextlib.nullcontext()
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else args.steps // 20

    def step_batches(step: int) -> List[Batch]:
        tokens = random_windows(stream, args.batch_size, args.seq_len, generator)
        return [Batch(tokens, tokens)]  # every token is learnt

    def heldout_loss() -> dict:
        with autocast:
            heldout = window_loss(model, heldout_windows[: args.eval_windows], args.batch_size)
        return {"val_loss": heldout["loss"], "val_perplexity": heldout["perplexity"]}

    loop.train(
        model,
        loop.make_optimizer(model.parameters(), args.lr, args.weight_decay, betas=(0.9, 0.95)),
        loop.Supervised(model, step_batches, device, autocast),
        loop.Schedule(args.lr, args.steps, warmup_steps, "cosine", args.lr * args.min_lr_ratio),
        MetricsLog(None, args.steps, every=args.log_interval),
        args.grad_clip,
        evaluate_every=args.eval_interval,
        evaluate_at=heldout_loss,
    )

    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    save_checkpoint(str(out_dir), params, state, n_shards=1, dtype=torch.bfloat16)
    logger.info("wrote %s", ", ".join(sorted(p.name for p in out_dir.iterdir())))

    # Score the weights as saved (rounded to bfloat16), in float32 like Llama.build on a CPU.
    model.load_state_dict({key: value.to(torch.bfloat16).float() for key, value in state.items()})
    scored_windows = heldout_windows[: args.eval_windows]
    heldout = window_loss(model, scored_windows, args.batch_size)
    unigram = unigram_loss(unigram_log_probs(stream, tokenizer.n_words), scored_windows)
    logger.info(
        "held-out: loss %.3f, perplexity %.2f over %d tokens; unigram baseline: loss %.3f, perplexity %.2f",
        heldout["loss"],
        heldout["perplexity"],
        heldout["tokens"],
        unigram["loss"],
        unigram["perplexity"],
    )
    logger.info("done in %.1f minutes", (time.perf_counter() - started) / 60)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--out_dir",
        default=DEFAULT_OUT_DIR,
        help=(
            "where params.json, consolidated.00.pth and tokenizer.model go; "
            "the bundled model is remade with --out_dir checkpoints/tiny-stdlib"
        ),
    )
    parser.add_argument("--print_heldout", action="store_true", help="print the held-out files, one per line, and exit")
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and the training windows")
    parser.add_argument("--heldout_percent", type=int, default=5, help="percent of the files held out for evaluation")
    parser.add_argument(
        "--max_train_files",
        type=int,
        default=None,
        help="train on only the first N training files (quick tries); default: all",
    )
    parser.add_argument(
        "--vocab_size", type=int, default=4096, help="sentencepiece pieces, 259 of them special or bytes"
    )
    parser.add_argument("--dim", type=int, default=192, help="the model's width (params.json's dim)")
    parser.add_argument("--n_layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--n_heads", type=int, default=6, help="attention heads (dim must be divisible by it)")
    parser.add_argument(
        "--n_kv_heads", type=int, default=None, help="key/value heads for grouped-query attention; default: n_heads"
    )
    parser.add_argument(
        "--multiple_of", type=int, default=32, help="the SwiGLU hidden size is rounded up to a multiple of this"
    )
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per training window")
    parser.add_argument("--batch_size", type=int, default=16, help="windows per step")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    parser.add_argument(
        "--warmup_steps", type=int, default=None, help="steps of linear learning-rate warmup; default: 5%% of --steps"
    )
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--min_lr_ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    parser.add_argument(
        "--weight_decay", type=float, default=0.1, help="AdamW's decoupled weight decay (matrices only)"
    )
    parser.add_argument("--grad_clip", type=float, default=1.0, help="maximum gradient norm")
    parser.add_argument(
        "--bf16_autocast",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compute in bfloat16 (weights and optimizer stay float32)",
    )
    parser.add_argument("--device", default="cpu", help="where to train: cpu, cuda, mps")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads; with one the result does not depend on the core count, "
        "and on cores shared with other work it is the fastest",
    )
    parser.add_argument("--log_interval", type=int, default=10, help="steps between progress lines")
    parser.add_argument(
        "--eval_interval", type=int, default=100, help="steps between held-out losses (on --eval_windows windows)"
    )
    parser.add_argument(
        "--eval_windows", type=int, default=64, help="held-out windows scored during and after training"
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    positive = [
        "heldout_percent",
        "vocab_size",
        "dim",
        "n_layers",
        "n_heads",
        "multiple_of",
        "seq_len",
        "batch_size",
        "steps",
        "threads",
        "log_interval",
        "eval_interval",
        "eval_windows",
    ]
    for name in positive + ["max_train_files", "n_kv_heads"]:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be a positive integer, got {value}")
    if not 1 <= args.heldout_percent < 100:
        parser.error(f"--heldout_percent must be in [1, 99], got {args.heldout_percent}")
    if args.warmup_steps is not None and not 0 <= args.warmup_steps < args.steps:
        parser.error(f"--warmup_steps must be in [0, --steps), got {args.warmup_steps} with --steps {args.steps}")
    if args.seq_len < 2:
        parser.error(f"--seq_len must be at least 2, got {args.seq_len}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.print_heldout:
        print("\n".join(str(p) for p in split_files(args.heldout_percent)[1]))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    train(args)


if __name__ == "__main__":
    main()
