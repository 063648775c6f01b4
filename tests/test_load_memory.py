"""Loading does not hold the model twice: a bfloat16 checkpoint loaded as bfloat16 on the CPU adds
about its own size to the peak resident memory (``bench/load.py``, in a fresh process), the parts of
the fused weights included."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from llama.checkpoints.writers import save_checkpoint
from llama.model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
PARAMS = {
    "dim": 512,
    "n_layers": 4,
    "n_heads": 8,
    "vocab_size": 16000,
}  # 60 MB in bfloat16: well above the process's noise


def test_loading_a_bfloat16_checkpoint_adds_at_most_1_2_times_its_size_to_the_peak_resident_memory(tmp_path):
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = Transformer(ModelArgs.from_dict({**PARAMS, "max_seq_len": 1, "max_batch_size": 1})).state_dict()
    state = {key: torch.randn(tensor.shape, dtype=torch.bfloat16) * 0.02 for key, tensor in shapes.items()}
    save_checkpoint(str(tmp_path), PARAMS, state)
    command = [
        sys.executable,
        str(ROOT / "bench" / "load.py"),
        "--impl",
        "llama",
        "--ckpt_dir",
        str(tmp_path),
        "--dtype",
        "bfloat16",
        "--max_seq_len",
        "64",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.splitlines()[-1])
    assert measured["peak_added_ratio"] <= 1.2, measured
