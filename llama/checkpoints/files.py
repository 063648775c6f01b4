"""Reading a checkpoint's files without running their code: JSON objects (``params.json``,
``config.json``) and pickled dicts of tensors (``consolidated.NN.pth``, ``pytorch_model*.bin``),
memory-mapped and loaded with ``weights_only``, so a file from a stranger cannot run code."""

import json
from pathlib import Path
from typing import Dict

import torch

# The small model that ships with the repository (``train.py`` makes it): what the examples, the server and
# the benchmarks load when given no checkpoint.
BUNDLED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-stdlib"


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object."""
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value


def load_tensor_dict(path: Path, what: str) -> Dict[str, torch.Tensor]:
    """Memory-map a pickled dict of tensors; ``what`` names the file in errors ("checkpoint shard")."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises many types for a truncated, corrupt or unsafe file
        raise ValueError(f"cannot load {what} {path}: {error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path} must hold a dict of tensors, found {type(state).__name__}")
    return state
