"""Llama 2, Llama 2-Chat, Code Llama and Llama 3, 3.1, 3.2 inference in native PyTorch.

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it: OpenMP threads
that wait for each other then sleep instead of spinning, so decoding degrades gracefully when another
process keeps a core busy (measured in docs/performance.md: 10x faster beside other jobs on 2 cores).
A process that runs ``python -m llama.finetune`` keeps OpenMP's own default (spin a while, then
sleep): a training step's many operations each wake sleeping threads, which made the bundled model's
LoRA steps 1.7x slower (docs/finetuning.md). OpenMP reads the variable once, when torch loads it: this
runs before the package imports torch, and has no effect in a program that imported torch first (set
the variable in its environment instead).
"""

import os
import sys

TRAINING_COMMANDS = ("llama.finetune",)


def runs_a_training_command() -> bool:
    """Whether this process was started as ``python -m`` one of ``TRAINING_COMMANDS`` (torchrun starts
    its workers so too); read from the interpreter's own arguments, as the package loads before the command."""
    argv = getattr(sys, "orig_argv", [])  # Python 3.10+
    return any(flag == "-m" and module in TRAINING_COMMANDS for flag, module in zip(argv, argv[1:]))


if not runs_a_training_command():
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from llama.generation import Dialog, Llama  # noqa: E402 (after the wait policy, which torch reads when it loads)
from llama.model import ModelArgs, Transformer  # noqa: E402
from llama.tokenizer import Tokenizer  # noqa: E402

__all__ = ["Dialog", "Llama", "ModelArgs", "Tokenizer", "Transformer"]
