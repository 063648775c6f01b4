"""Perplexity of a checkpoint on text files, and the unigram baseline to read it against.

    python -m llama.perplexity --ckpt_dir checkpoints/tiny-stdlib --text_file some.py other.py

Each file is one document: BOS, then its tokens. A document longer than ``max_seq_len`` is cut
into windows that overlap by one token, so every token after BOS is scored exactly once, with the
window's earlier tokens as its context. Windows are batched, right-padded with ignored labels, and
scored with the loss of training (``Transformer.forward_loss``: the causal language-modelling loss,
chunk by chunk of tokens, never the logits of a whole batch, 1 GB of float32 at Llama 3's vocabulary
for 8 windows of 256 tokens).
"""

import argparse
import math
import os
import time
from pathlib import Path
from typing import Dict, List, Sequence

# OpenMP's waiting threads sleep instead of spinning (docs/performance.md): set before torch loads OpenMP
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from llama.cli import add_flags, load_line, options_from, run_parser
from llama.distributed import set_threads
from llama.layers.loss import IGNORE_INDEX, scored_token_count
from llama.model import Transformer
from llama.options import EngineOptions, LoadOptions
from llama.tokenizer import Tokenizer, resolve_tokenizer_path


def document_windows(tokens: Sequence[int], max_seq_len: int) -> List[List[int]]:
    """Windows of at most ``max_seq_len`` tokens, each starting on the previous one's last token."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2 (one context token and one scored token), got {max_seq_len}")
    stride = max_seq_len - 1
    return [list(tokens[start : start + max_seq_len]) for start in range(0, max(len(tokens) - 1, 1), stride)]


def text_windows(tokenizer: Tokenizer, texts: Sequence[str], max_seq_len: int) -> List[List[int]]:
    """The windows of every text, each text encoded as BOS + its tokens."""
    return [w for text in texts for w in document_windows(tokenizer.encode(text, bos=True, eos=False), max_seq_len)]


@torch.no_grad()
def window_loss(
    model: Transformer, windows: Sequence[Sequence[int]], batch_size: int, compile: bool = False
) -> Dict[str, float]:
    """Mean loss (nats per scored token), perplexity and scored-token count of ``model`` on ``windows``;
    ``compile``: the loss under ``torch.compile`` (one graph per batch shape)."""
    device = model.output.weight.device
    summed_loss = torch.compile(model.forward_loss, dynamic=False) if compile else model.forward_loss
    total_loss, n_scored = 0.0, 0
    for begin in range(0, len(windows), batch_size):
        batch = windows[begin : begin + batch_size]
        width = max(len(w) for w in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)  # padding: any id, its labels are ignored
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, window in enumerate(batch):
            tokens[row, : len(window)] = labels[row, : len(window)] = torch.tensor(window)
        total_loss += summed_loss(tokens.to(device), labels.to(device)).item()
        n_scored += scored_token_count(labels)
    if n_scored == 0:
        raise ValueError("nothing to score: every window has fewer than two tokens")
    loss = total_loss / n_scored
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": n_scored}


def unigram_log_probs(train_tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Log-frequency of every token id in ``train_tokens``, add-one smoothed so none is -inf."""
    counts = torch.bincount(train_tokens.flatten(), minlength=vocab_size).double() + 1
    return (counts / counts.sum()).log()


def unigram_loss(log_probs: torch.Tensor, windows: Sequence[Sequence[int]]) -> Dict[str, float]:
    """The unigram model's mean loss and perplexity on exactly the tokens ``window_loss`` scores."""
    scored = torch.tensor([t for window in windows for t in window[1:]], dtype=torch.long)
    if scored.numel() == 0:
        raise ValueError("nothing to score: every window has fewer than two tokens")
    loss = -log_probs[scored].mean().item()
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": scored.numel()}


def read_texts(paths: Sequence[str]) -> List[str]:
    texts = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if not text:
            raise ValueError(f"text file {path} is empty: there is nothing to score")
        texts.append(text)
    return texts


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m llama.perplexity", description="Mean loss and perplexity of a checkpoint on text files."
    )
    add_flags(parser, "ckpt_dir", "tokenizer_path", ckpt_dir={"required": True})
    parser.add_argument("--text_file", required=True, nargs="+", help="one or more files, each scored as a document")
    add_flags(
        parser,
        "max_seq_len",
        max_seq_len={"default": 256, "help": "window length in tokens (the bundled model was trained on 256)"},
    )
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    add_flags(parser, "device", "dtype", "quantize")
    parser.add_argument("--compile", action="store_true", help="score with the model under torch.compile")
    add_flags(parser, "threads")
    run_parser(parser, score_files, argv)


def score_files(args: argparse.Namespace) -> None:
    """Print the checkpoint's mean loss and perplexity on the files of ``--text_file``."""
    from llama.generation import Llama  # the CLI's loader; the functions above need only a Transformer

    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be a positive integer, got {args.batch_size}")
    if args.max_seq_len < 2:
        raise ValueError(f"--max_seq_len must be at least 2, got {args.max_seq_len}")
    set_threads(args.threads)
    load = options_from(
        LoadOptions,
        args,
        tokenizer_path=resolve_tokenizer_path(args.ckpt_dir, args.tokenizer_path),
        time_threads=args.threads is None,
    )
    texts = read_texts(args.text_file)
    start = time.perf_counter()
    generator = Llama.from_options(load, EngineOptions(max_batch_size=args.batch_size, max_seq_len=args.max_seq_len))
    print(load_line(load.ckpt_dir, load.tokenizer_path, generator, time.perf_counter() - start, load.quantize))
    windows = text_windows(generator.tokenizer, texts, args.max_seq_len)
    result = window_loss(generator.model, windows, args.batch_size, compile=args.compile)
    print(
        f"{len(texts)} file(s), {result['tokens']} tokens scored in {len(windows)} window(s) "
        f"of up to {args.max_seq_len}"
    )
    print(f"mean loss {result['loss']:.4f} nats/token, perplexity {result['perplexity']:.2f}")


if __name__ == "__main__":
    main()
