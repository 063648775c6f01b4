"""Llama 2, Llama 2-Chat, Code Llama and Llama 3, 3.1, 3.2 inference in native PyTorch.

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it: OpenMP threads
that wait for each other then sleep instead of spinning, so decoding degrades gracefully when another
process keeps a core busy (docs/performance.md). A process that runs ``python -m llama.finetune``
keeps OpenMP's own default (spin a while, then sleep): each of a training step's many operations
would wake sleeping threads (docs/finetuning.md). OpenMP reads the variable once, when torch loads it: this
runs before the package imports torch, and has no effect in a program that imported torch first (set
the variable in its environment instead).

Meta's public names (``Llama``, ``Dialog``, ``ModelArgs``, ``Transformer``, ``Tokenizer``) are imported
when first used: ``import llama.model`` loads torch and the model's math, not the engine, the server's
grammars or the chat templates.
"""

import importlib
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

PUBLIC_NAMES = {"Dialog": "llama.generation", "Llama": "llama.generation", "ModelArgs": "llama.model",
                "Tokenizer": "llama.tokenizer", "Transformer": "llama.model"}
__all__ = sorted(PUBLIC_NAMES)


def __getattr__(name: str):
    if name in PUBLIC_NAMES:
        return getattr(importlib.import_module(PUBLIC_NAMES[name]), name)
    raise AttributeError(f"module 'llama' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *PUBLIC_NAMES])
