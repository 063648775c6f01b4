"""The example scripts run as a user runs them: plain python, and under torchrun."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args, timeout=120):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    ckpt_dir, _ = make_checkpoint()
    return ckpt_dir


@pytest.mark.parametrize("launcher", [[sys.executable], [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]])
def test_text_completion_example(ckpt, tokenizer_path, launcher):
    prompt = "import sys"
    result = run(launcher + ["example_text_completion.py", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path,
                             "--max_gen_len", "6", "--prompts", f"['{prompt}']", "--device", "cpu"])
    assert result.returncode == 0, result.stderr
    assert f"Loaded {ckpt} on cpu (torch.float32) in" in result.stdout
    assert f"{prompt}\n> " in result.stdout
    assert "tokens/s)" in result.stdout


@pytest.mark.parametrize("launcher", [[sys.executable], [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]])
def test_chat_example(ckpt, tokenizer_path, launcher):
    result = run(launcher + ["example_chat.py", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path,
                             "--max_gen_len", "4", "--dtype", "bfloat16"])
    assert result.returncode == 0, result.stderr
    assert "(torch.bfloat16)" in result.stdout
    assert "User: what is the recipe of mayonnaise?" in result.stdout
    assert result.stdout.count("> Assistant: ") == 4


def test_checkpoint_dir_without_tokenizer_is_a_clear_error(ckpt):
    result = run([sys.executable, "example_text_completion.py", "--ckpt_dir", ckpt])
    assert result.returncode != 0
    assert "no tokenizer_path given and no tokenizer.model in the checkpoint folder" in result.stderr


def test_verbose_text_completion_prints_the_same_text_and_prompt_and_decode_speeds(ckpt, tokenizer_path):
    args = [sys.executable, "example_text_completion.py", "--ckpt_dir", ckpt, "--tokenizer_path", tokenizer_path,
            "--max_gen_len", "6", "--prompts", "['import sys', 'héllo']", "--device", "cpu", "--temperature", "0"]
    plain, verbose = run(args), run(args + ["--verbose"])
    assert verbose.returncode == 0, verbose.stderr
    texts = plain.stdout.split("Generated")[0].split("\n", 1)[1]  # after the "Loaded ..." line
    assert texts in verbose.stdout
    assert re.search(r"prompt: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\), decode: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)", verbose.stdout)
