"""The command-line runner: flags are checked against the command's parameters before it runs, and a
user error is one line on stderr with exit status 2 (on rank 0 only), unless a traceback is asked for."""

import argparse
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path
from typing import List, Optional, Union

import pytest
import torch

from llama.cli import check_flags, compile_line, load_line, run, run_parser
from llama.distributed import RankFailedError, set_threads

ROOT = Path(__file__).resolve().parent.parent


def command(ckpt_dir: str = "", temperature: float = 0.6, top_p: float = 0.9, verbose: bool = False):
    """Stands for an example's main: records what it was called with."""
    calls.append({"ckpt_dir": ckpt_dir, "temperature": temperature, "top_p": top_p, "verbose": verbose})


calls = []


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    calls.clear()
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LLAMA_TRACEBACK", raising=False)


def failing(error: Exception):
    def main(flag: int = 0):
        raise error

    return main


def exit_status(main, argv) -> int:
    with pytest.raises(SystemExit) as exited:
        run(main, argv)
    return exited.value.code


@pytest.mark.parametrize("argv", [
    ["--ckpt_dir", "x", "--temperature", "0"],
    ["--ckpt_dir=x", "--temperature=0"],
    ["--top-p", "0.5"],  # fire reads hyphens as underscores
    ["--verbose", "--temperature", "-1"],  # a boolean flag, then a negative number as a value
    ["--noverbose"],
    ["-c", "x"],  # fire's one-letter shortcut for the only parameter starting with c
    ["x", "0.1"],  # positional arguments
    ["--ckpt_dir", "--", "--help"],  # after a lone --, fire's own flags
])
def test_flags_fire_reads_as_parameters_pass_the_check(argv):
    check_flags(command, argv)


def test_an_unknown_flag_names_the_close_match_and_every_known_flag():
    with pytest.raises(ValueError) as error:
        check_flags(command, ["--ckpt_dir", "x", "--temp", "0.2"])
    assert str(error.value) == (
        "unknown flag --temp (did you mean --temperature?); known flags: --ckpt_dir, --temperature, --top_p, --verbose"
    )


def test_a_misspelt_flag_names_the_close_match():
    with pytest.raises(ValueError, match=r"unknown flag --tempreture \(did you mean --temperature\?\)"):
        check_flags(command, ["--tempreture", "0.2"])


def test_a_one_letter_flag_shared_by_two_parameters_is_ambiguous():
    with pytest.raises(ValueError, match="flag -t is ambiguous: it could be --temperature, --top_p"):
        check_flags(command, ["-t", "0"])


def test_a_command_taking_any_keyword_accepts_any_flag():
    check_flags(lambda **options: None, ["--anything", "1"])


def test_an_unknown_flag_stops_the_command_before_it_runs(capsys):
    assert exit_status(command, ["--temp", "0.2"]) == 2
    assert calls == []
    assert capsys.readouterr().err.startswith("error: unknown flag --temp")


def texts(prompts: Union[str, List[str], None] = None, system: Optional[str] = None, max_gen_len: Optional[int] = None):
    """Stands for an example's main with text flags."""
    calls.append({"prompts": prompts, "system": system, "max_gen_len": max_gen_len})


@pytest.mark.parametrize("typed", ["hello, world", "True", "42", "None", "'quoted'", "1e3", "{'a': 1}"])
def test_a_text_flag_is_the_text_typed_whatever_python_would_read_it_as(typed):
    run(texts, ["--prompts", typed, "--system", typed])
    assert calls == [{"prompts": typed, "system": typed, "max_gen_len": None}]


@pytest.mark.parametrize("typed", ["['import os', 'def f(']", "('import os', 'def f(')"])
def test_a_python_list_given_to_a_flag_that_takes_a_list_is_a_list(typed):
    run(texts, [f"--prompts={typed}", "--max_gen_len", "8"])
    assert calls == [{"prompts": ["import os", "def f("], "system": None, "max_gen_len": 8}]


def test_known_flags_reach_the_command_parsed_by_fire():
    run(command, ["--ckpt_dir", "x", "--temperature", "0", "--verbose"])
    assert calls == [{"ckpt_dir": "x", "temperature": 0, "top_p": 0.9, "verbose": True}]


@pytest.mark.parametrize("error", [ValueError("bad value"), TypeError("bad type"), FileNotFoundError("no file"),
                                   RankFailedError("rank 1 failed with ValueError: bad")])
def test_a_user_error_is_one_line_and_exit_status_2(error, capsys):
    assert exit_status(failing(error), []) == 2
    assert capsys.readouterr() == ("", f"error: {error}\n")


def test_under_torchrun_only_rank_0_prints_the_error_but_every_rank_exits(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert exit_status(failing(ValueError("bad value")), []) == 2
    assert capsys.readouterr() == ("", "")


def test_traceback_flag_lets_the_user_error_through():
    with pytest.raises(ValueError, match="bad value"):
        run(failing(ValueError("bad value")), ["--traceback"])


def test_traceback_environment_variable_lets_the_user_error_through(monkeypatch):
    monkeypatch.setenv("LLAMA_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad value"):
        run(failing(ValueError("bad value")), [])


def test_an_error_that_is_not_the_users_keeps_its_traceback():
    with pytest.raises(RuntimeError, match="a bug"):
        run(failing(RuntimeError("a bug")), [])


def test_ctrl_c_is_one_line_and_exit_status_130(capsys):
    assert exit_status(failing(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr() == ("", "interrupted (Ctrl-C)\n")


def test_ctrl_c_under_torchrun_is_said_by_rank_0_only(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert exit_status(failing(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr() == ("", "")


def argparse_command():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", type=int, required=True)
    return parser


def test_an_argparse_command_reports_its_parse_errors_in_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        run_parser(argparse_command(), calls.append, ["--shard", "2", "--extra"])
    assert exited.value.code == 2
    assert capsys.readouterr() == ("", "error: unrecognized arguments: --extra\n")
    assert calls == []


def test_an_argparse_command_reports_its_user_errors_in_one_line(capsys):
    def main(options):
        raise ValueError(f"cannot write {options.shards} shards")

    with pytest.raises(SystemExit) as exited:
        run_parser(argparse_command(), main, ["--shards", "3"])
    assert exited.value.code == 2
    assert capsys.readouterr() == ("", "error: cannot write 3 shards\n")


def help_text(command: str, capsys, example_script) -> str:
    """What ``--help`` prints for a command; fire's commands through ``run``, argparse's through their main."""
    if command.endswith(".py"):
        run(example_script(command).main, ["--help"])
    elif command == "llama.server":
        from llama.server.__main__ import main

        run(main, ["--help"])
    else:
        with pytest.raises(SystemExit) as exited:
            importlib.import_module(command).main(["--help"])
        assert exited.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> dict:
    """argparse's help, option by option: {"--flag": "its description"}."""
    entries, flag = {}, None
    for line in re.split(r"\n(?:options|optional arguments):\n", text, maxsplit=1)[1].splitlines():
        match = re.match(r"^  (-[^\s,]+(?:, -[^\s,]+)*)(?: \S+)?(?:\s{2,}(.*))?$", line)
        if match:
            flag = match.group(1).split(", ")[-1]
            entries[flag] = match.group(2) or ""
        elif flag and line.startswith("    "):
            entries[flag] = (entries[flag] + " " + line.strip()).strip()
    return entries


META_FLAGS = ["--ckpt_dir", "--tokenizer_path", "--temperature", "--top_p", "--max_seq_len", "--max_gen_len", "--max_batch_size"]
COMMANDS = ["example_text_completion.py", "example_chat.py", "llama.server", "llama.perplexity", "llama.convert", "llama.reshard", "llama.finetune"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_describes_every_flag_in_one_style(command, capsys, example_script):
    text = help_text(command, capsys, example_script)
    entries = option_entries(text)
    assert "--traceback" in entries and "--help" in entries
    for flag, description in entries.items():
        assert len(description) > 10, f"{command}: {flag} has no description"


@pytest.mark.parametrize("command", ["example_text_completion.py", "example_chat.py"])
def test_the_examples_help_keeps_metas_flags_and_shows_every_default(command, capsys, example_script):
    main = example_script(command).main
    entries = option_entries(help_text(command, capsys, example_script))
    assert set(META_FLAGS) <= set(entries)
    for name, parameter in inspect.signature(main).parameters.items():
        if parameter.default is not None:
            assert entries[f"--{name}"].endswith(f"(default: {parameter.default})"), name


def test_the_servers_help_is_titled_with_how_it_is_started():
    done = subprocess.run([sys.executable, "-m", "llama.server", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m llama.server [-h]")
    assert "--heartbeat_seconds HEARTBEAT_SECONDS" in done.stdout


def test_the_load_line_names_the_tokenizer_and_what_a_plain_model_lacks(make_checkpoint, tokenizer_path, tmp_path):
    from llama.checkpoints.peft import write_adapter
    from llama.generation import Llama
    from llama.layers.lora import LoraConfig
    from llama.model import ModelArgs

    ckpt_dir, _ = make_checkpoint()
    threads = f"cpu with {torch.get_num_threads()} thread(s)"
    plain = Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", dtype="float32")
    assert load_line(ckpt_dir, tokenizer_path, plain, 0.25) == (  # the README's line: nothing besides the checkpoint
        f"Loaded {ckpt_dir} (tokenizer: {tokenizer_path}) on {threads} (torch.float32) in 0.25 s"
    )
    quantized = Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", dtype="bfloat16", quantize="int4-g32")
    assert quantized.model.output.weight.dtype == torch.uint8  # int4's storage, which the line must not report
    assert load_line(ckpt_dir, tokenizer_path, quantized, 1.5, "int4-g32") == (
        f"Loaded {ckpt_dir} (tokenizer: {tokenizer_path}) on {threads} "
        "(torch.bfloat16 activations, int4-g32 weights, torch.float32 KV cache) in 1.50 s"
    )
    half = Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", dtype="bfloat16")
    assert load_line(ckpt_dir, tokenizer_path, half, 1.0).endswith(
        f"on {threads} (torch.bfloat16, torch.float32 KV cache) in 1.00 s"  # attention on a CPU computes in float32
    )

    args = ModelArgs.from_dict({**json.loads((Path(ckpt_dir) / "params.json").read_text()), "vocab_size": 512})
    lora = (0.01 * torch.randn(2, args.dim), 0.01 * torch.randn(args.dim, 2))
    config = LoraConfig(rank=2, alpha=4.0, targets=("wq",))
    write_adapter(str(tmp_path), {"layers.0.attention.wq": lora}, config, args, ckpt_dir)
    adapted = Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", dtype="float32", adapter_dir=str(tmp_path))
    assert adapted.adapter_dir == str(tmp_path) and plain.adapter_dir is None
    assert load_line(ckpt_dir, tokenizer_path, adapted, 0.5) == (
        f"Loaded {ckpt_dir} with the adapter {tmp_path} (tokenizer: {tokenizer_path}) on {threads} (torch.float32) "
        "in 0.50 s"
    )


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_threads_must_be_a_positive_integer(threads):
    with pytest.raises(ValueError, match=re.escape(f"--threads must be a positive integer, got {threads!r}")):
        set_threads(threads)


def test_threads_sets_torchs_thread_count_and_none_keeps_it_until_a_model_is_loaded():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 == torch.get_num_threads()
        assert set_threads(None) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_an_inference_command_makes_openmp_threads_wait_passively_unless_the_environment_says(given, expected):
    """Spinning OpenMP threads collapse decoding beside a busy process (docs/performance.md)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = "import os, llama.perplexity; print(os.environ['OMP_WAIT_POLICY'])"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{expected}\n"


def test_the_compile_line_names_every_step_that_was_compiled_and_none_when_nothing_was():
    def step(name, seconds):
        return types.SimpleNamespace(name=name, compile_seconds=seconds)

    runner = types.SimpleNamespace(compile_seconds=None, verify_forward=step("verification pass", None), draft_forward=None)
    engine = types.SimpleNamespace(runner=runner)
    assert compile_line(engine) is None
    runner.compile_seconds, runner.verify_forward.compile_seconds = 12.34, 5.0
    runner.draft_forward = step("draft's step", 3.06)
    assert compile_line(engine) == "Compiled the decode step in 12.3 s, the verification pass in 5.0 s, the draft's step in 3.1 s (on first use, counted above)"
