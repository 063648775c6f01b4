"""Llama 2, Llama 2-Chat, Code Llama and Llama 3, 3.1, 3.2 inference in native PyTorch.

Importing the package changes nothing in the process. The inference commands (the examples,
``llama.server``, ``llama.evaluate``, ``llama.perplexity``) set ``OMP_WAIT_POLICY=PASSIVE`` where they
start, before they import torch, unless the environment sets it: OpenMP threads that wait for each other
then sleep instead of spinning, so decoding degrades gracefully when another process keeps a core busy
(docs/performance.md). ``python -m llama.finetune`` keeps OpenMP's own default (spin a while, then
sleep): each of a training step's many operations would wake sleeping threads (docs/finetuning.md).

Meta's public names (``Llama``, ``Dialog``, ``ModelArgs``, ``Transformer``, ``Tokenizer``) are imported
when first used: ``import llama.model`` loads torch and the model's math, not the engine, the server's
grammars or the chat templates.
"""

import importlib

PUBLIC_NAMES = {
    "Dialog": "llama.generation",
    "Llama": "llama.generation",
    "ModelArgs": "llama.model",
    "Tokenizer": "llama.tokenizer",
    "Transformer": "llama.model",
}
__all__ = sorted(PUBLIC_NAMES)


def __getattr__(name: str):
    if name in PUBLIC_NAMES:
        return getattr(importlib.import_module(PUBLIC_NAMES[name]), name)
    raise AttributeError(f"module 'llama' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *PUBLIC_NAMES])
