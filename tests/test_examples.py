"""The example scripts run as a user runs them: plain python, and under torchrun."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUNDLED_TOKENIZER
from llama.chat.format import chat_format_for
from llama.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def run(args, timeout=120):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    ckpt_dir, _ = make_checkpoint()
    return ckpt_dir


@pytest.mark.parametrize(
    "launcher", [[sys.executable], [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]]
)
def test_text_completion_example(ckpt, tokenizer_path, launcher):
    prompt = "import sys"
    result = run(
        launcher
        + [
            "example_text_completion.py",
            "--ckpt_dir",
            ckpt,
            "--tokenizer_path",
            tokenizer_path,
            "--max_gen_len",
            "6",
            "--prompts",
            f"['{prompt}']",
            "--device",
            "cpu",
            "--threads",
            "1",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert f"Loaded {ckpt} (tokenizer: {tokenizer_path}) on cpu with 1 thread(s) (torch.float32) in" in result.stdout
    assert f"{prompt}\n> " in result.stdout
    assert "tokens/s)" in result.stdout


@pytest.mark.parametrize(
    "launcher", [[sys.executable], [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1"]]
)
def test_chat_example(ckpt, tokenizer_path, launcher):
    result = run(
        launcher
        + [
            "example_chat.py",
            "--ckpt_dir",
            ckpt,
            "--tokenizer_path",
            tokenizer_path,
            "--max_gen_len",
            "4",
            "--dtype",
            "bfloat16",
        ]
    )
    assert result.returncode == 0, result.stderr
    # attention on a CPU computes in float32
    assert re.search(r"\(torch\.bfloat16, torch\.float32 KV cache of \d+\.\d MiB\)", result.stdout)
    assert "User: what is the recipe of mayonnaise?" in result.stdout
    assert result.stdout.count("> Assistant: ") == 4


def test_metas_download_layout_needs_no_tokenizer_flag_and_the_load_line_names_the_file(ckpt, tokenizer_path, tmp_path):
    folder = tmp_path / "llama-2-7b"  # Meta's download: tokenizer.model beside the checkpoint folder
    shutil.copytree(ckpt, folder)
    shutil.copyfile(tokenizer_path, tmp_path / "tokenizer.model")
    result = run(
        [
            sys.executable,
            "example_text_completion.py",
            "--ckpt_dir",
            str(folder),
            "--max_gen_len",
            "2",
            "--prompts",
            "['import sys']",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert f"Loaded {folder} (tokenizer: {tmp_path / 'tokenizer.model'}) on cpu" in result.stdout
    assert result.stdout.count("import sys\n> ") == 1


def test_a_prompt_given_as_one_string_is_one_prompt_even_with_a_comma(ckpt, tokenizer_path):
    result = run(
        [
            sys.executable,
            "example_text_completion.py",
            "--ckpt_dir",
            ckpt,
            "--tokenizer_path",
            tokenizer_path,
            "--max_gen_len",
            "2",
            "--prompts",
            "import os, sys",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("import os, sys\n> ") == 1
    assert result.stdout.count("==================================") == 1


def test_an_unknown_flag_is_rejected_before_anything_loads(tmp_path):
    missing = tmp_path / "missing"  # loading it would fail with another error
    result = run([sys.executable, "example_text_completion.py", "--ckpt_dir", str(missing), "--temp", "0.2"])
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: unknown flag --temp (did you mean --temperature?); known flags: --ckpt_dir, "
    )
    assert result.stderr.count("\n") == 1


def test_a_bad_argument_is_one_error_line_and_exit_status_2(ckpt, tokenizer_path):
    result = run(
        [
            sys.executable,
            "example_chat.py",
            "--ckpt_dir",
            ckpt,
            "--tokenizer_path",
            tokenizer_path,
            "--max_seq_len",
            "0",
        ]
    )
    assert result.returncode == 2
    assert result.stderr == "error: max_seq_len must be a positive integer, got 0\n"


def test_traceback_flag_shows_the_traceback_of_a_bad_argument(ckpt, tokenizer_path):
    result = run(
        [
            sys.executable,
            "example_chat.py",
            "--ckpt_dir",
            ckpt,
            "--tokenizer_path",
            tokenizer_path,
            "--max_seq_len",
            "0",
            "--traceback",
        ]
    )
    assert result.returncode != 0
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert result.stderr.endswith("ValueError: max_seq_len must be a positive integer, got 0\n")


def test_verbose_text_completion_prints_the_same_text_and_prompt_and_decode_speeds(ckpt, tokenizer_path):
    args = [
        sys.executable,
        "example_text_completion.py",
        "--ckpt_dir",
        ckpt,
        "--tokenizer_path",
        tokenizer_path,
        "--max_gen_len",
        "6",
        "--prompts",
        "['import sys', 'héllo']",
        "--device",
        "cpu",
        "--temperature",
        "0",
    ]
    plain, verbose = run(args), run(args + ["--verbose"])
    assert verbose.returncode == 0, verbose.stderr
    texts = plain.stdout.split("Generated")[0].split("\n", 1)[1]  # after the "Loaded ..." line
    assert texts in verbose.stdout
    assert re.search(
        r"prompt: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\), generated: \d+ tokens, "
        r"the first of each row with the prompt, "
        r"then decode: \d+ tokens in [\d.]+ s \([\d.]+ tokens/s\)",
        verbose.stdout,
    )


def test_compiled_text_completion_on_two_processes_prints_the_eager_text_and_the_compile_time(ckpt, tokenizer_path):
    args = [
        "example_text_completion.py",
        "--ckpt_dir",
        ckpt,
        "--tokenizer_path",
        tokenizer_path,
        "--max_gen_len",
        "6",
        "--prompts",
        "['import sys', 'héllo']",
        "--device",
        "cpu",
        "--temperature",
        "0",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    eager, compiled = run([sys.executable] + args), run(torchrun + args + ["--compile"], timeout=300)
    assert compiled.returncode == 0, compiled.stderr
    texts = eager.stdout.split("Generated")[0].split("\n", 1)[1]  # after the "Loaded ..." line
    assert texts in compiled.stdout
    assert re.search(r"Compiled the decode step in [\d.]+ s", compiled.stdout)


@pytest.mark.parametrize("script, max_seq_len", [("example_text_completion.py", 40), ("example_chat.py", 112)])
def test_the_default_command_compiled_generates_to_the_end_of_a_small_context(script, max_seq_len, example_script):
    """The bundled model's default prompts or dialogs, sampled as by default, with --compile: every row
    decodes to the context's last position (the bundled model emits no EOS on them)."""
    example = example_script(script)
    tokenizer = Tokenizer(str(BUNDLED_TOKENIZER))
    if script == "example_chat.py":
        prompt_lens = [len(chat_format_for(tokenizer).encode_dialog(dialog)) for dialog in example.DIALOGS]
    else:
        prompt_lens = [len(tokenizer.encode(prompt, bos=True, eos=False)) for prompt in example.CODE_PROMPTS]
    result = run(
        [sys.executable, script, "--compile", "--max_seq_len", str(max_seq_len), "--max_gen_len", str(max_seq_len)],
        timeout=420,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Generated {sum(max_seq_len - n for n in prompt_lens)} tokens" in result.stdout
    assert "Compiled the decode step in" in result.stdout


def readme_quick_start():
    """The README's quick start: the last command of its first bash block, and the output block after it."""
    section = (ROOT / "README.md").read_text().split("## Quick start", 1)[1]
    commands, after = re.search(r"```bash\n(.*?)```(.*)", section, re.S).groups()
    sample = re.search(r"```\n(.*?)```", after, re.S).group(1)
    return commands.strip().splitlines()[-1], sample.splitlines()


def test_the_readmes_quick_start_prints_the_output_the_readme_shows():
    command, sample = readme_quick_start()
    program, *args = command.split()
    assert program == "python", command
    result = run([sys.executable, *args])
    assert result.returncode == 0, result.stderr
    printed = [line.rstrip() for line in result.stdout.splitlines()]
    patterns = [
        ".*".join(re.escape(part) for part in line.split("…")) for line in sample
    ]  # … : what the machine decides
    differing = [
        (n, want, got)
        for n, (want, got) in enumerate(zip(sample, printed), 1)
        if not re.fullmatch(patterns[n - 1], got)
    ]
    assert len(printed) == len(sample) and not differing, (
        f"the README's quick-start sample ({len(sample)} lines) is not what `{command}` prints ({len(printed)} lines); "
        f"first differing line: {differing[:1]}; it printed:\n{result.stdout}"
    )
