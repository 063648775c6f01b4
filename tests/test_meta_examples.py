"""Scripts written as Meta's example scripts are (tests/meta_style: Meta's calls in Meta's order,
printing on every rank) run on this package under torchrun with 2 processes: each line they print
appears once, as with Meta's code, because ``Llama.build`` sends stdout to /dev/null on local ranks > 0."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
META = ROOT / "tests" / "meta_style"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SEPARATOR = "=================================="


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    ckpt_dir, _ = make_checkpoint(n_shards=2)
    return ckpt_dir


def run_meta_script(script: str, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}  # this package, on CPU + gloo
    return subprocess.run(
        TORCHRUN + [str(META / script), *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )


def test_metas_text_completion_script_prints_each_result_once_under_torchrun(ckpt, tokenizer_path):
    result = run_meta_script(
        "text_completion.py", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path, "--max_gen_len", "4"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("I believe the meaning of life is\n> ") == 1
    assert result.stdout.count("Simply put, the theory of relativity states that \n> ") == 1
    assert result.stdout.count(SEPARATOR) == 2


def test_metas_chat_completion_script_prints_each_dialog_once_under_torchrun(ckpt, tokenizer_path):
    result = run_meta_script(
        "chat_completion.py", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path, "--max_gen_len", "4"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("User: what is the recipe of mayonnaise?\n") == 1
    assert result.stdout.count("> Assistant: ") == 3
    assert result.stdout.count("> Assistant: Error: special tags are not allowed as part of the prompt.") == 1
    assert result.stdout.count(SEPARATOR) == 3
