"""The command-line runner: flags, declared once, are parsed and checked before the command runs, and a
user error is one line on stderr with exit status 2 (on rank 0 only), unless a traceback is asked for."""

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from llama.cli import add_flags, compile_line, load_line, options_from, run_parser, text_or_list
from llama.distributed import RankFailedError, set_threads
from llama.engine import Engine
from llama.options import EngineOptions, GenerationOptions, LoadOptions

ROOT = Path(__file__).resolve().parent.parent


def command_parser() -> argparse.ArgumentParser:
    """Stands for an example's flags: a text, two numbers and a switch."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt_dir", default="")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top_p", type=float, default=0.9)
    parser.add_argument("--verbose", action="store_true")
    return parser


calls = []


def command(args: argparse.Namespace):
    """Stands for an example's command: records what it was called with."""
    calls.append(vars(args))


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    calls.clear()
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LLAMA_TRACEBACK", raising=False)


def failing(error: Exception):
    def main(args):
        raise error

    return main


def run(main, argv):
    run_parser(command_parser(), main, argv)


def exit_status(main, argv) -> int:
    with pytest.raises(SystemExit) as exited:
        run(main, argv)
    return exited.value.code


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--ckpt_dir", "x", "--temperature", "0"], {"ckpt_dir": "x", "temperature": 0}),
        (["--ckpt_dir=x", "--temperature=0"], {"ckpt_dir": "x", "temperature": 0}),
        (["--top-p", "0.5"], {"top_p": 0.5}),  # hyphens read as underscores
        (
            ["--verbose", "--temperature", "-1"],
            {"verbose": True, "temperature": -1},
        ),  # a switch, then a negative number
    ],
)
def test_flags_reach_the_command_as_written_with_underscores_hyphens_or_an_equals_sign(argv, expected):
    run(command, argv)
    defaults = {"ckpt_dir": "", "temperature": 0.6, "top_p": 0.9, "verbose": False, "traceback": False}
    assert calls == [{**defaults, **expected}]


def test_an_unknown_flag_names_the_close_match_and_every_known_flag(capsys):
    assert exit_status(command, ["--ckpt_dir", "x", "--temp", "0.2"]) == 2
    assert capsys.readouterr().err == (
        "error: unknown flag --temp (did you mean --temperature?); known flags: --ckpt_dir, --temperature, --top_p, "
        "--verbose\n"
    )


def test_a_misspelt_flag_names_the_close_match(capsys):
    assert exit_status(command, ["--tempreture", "0.2"]) == 2
    assert re.match(r"error: unknown flag --tempreture \(did you mean --temperature\?\)", capsys.readouterr().err)


def test_a_flag_is_its_whole_name_not_an_abbreviation(capsys):
    assert exit_status(command, ["--verb"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown flag --verb (did you mean --verbose?)")


def test_an_unknown_flag_stops_the_command_before_it_runs(capsys):
    assert exit_status(command, ["--temp", "0.2"]) == 2
    assert calls == []
    assert capsys.readouterr().err.startswith("error: unknown flag --temp")


@pytest.mark.parametrize("typed", ["hello, world", "True", "42", "None", "'quoted'", "1e3", "{'a': 1}"])
def test_a_text_flag_is_the_text_typed_whatever_python_would_read_it_as(typed):
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=text_or_list)
    parser.add_argument("--system")
    run_parser(parser, calls.append, ["--prompts", typed, "--system", typed])
    assert (calls[0].prompts, calls[0].system) == (typed, typed)


@pytest.mark.parametrize("typed", ["['import os', 'def f(']", "('import os', 'def f(')"])
def test_a_python_list_given_to_a_flag_that_takes_a_list_is_a_list(typed):
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=text_or_list)
    run_parser(parser, calls.append, [f"--prompts={typed}"])
    assert calls[0].prompts == ["import os", "def f("]


def test_declared_flags_take_their_options_type_default_and_help_and_come_back_as_the_options():
    parser = argparse.ArgumentParser()
    add_flags(
        parser,
        "ckpt_dir",
        "max_seq_len",
        "prefix_cache",
        "compile",
        "kv_cache_tokens",
        "temperature",
        ckpt_dir={"required": True},
        max_seq_len={"default": 128},
    )
    args = parser.parse_args(["--ckpt_dir", "x", "--no_prefix_cache", "--compile", "--temperature", "0"])
    assert options_from(EngineOptions, args) == EngineOptions(max_seq_len=128, prefix_cache=False, compile=True)
    assert options_from(LoadOptions, args, dtype="float32") == LoadOptions("x", dtype="float32")
    assert options_from(GenerationOptions, args) == GenerationOptions(temperature=0.0)
    with pytest.raises(ValueError, match="kv_cache_tokens must be a positive integer, got 0"):
        options_from(EngineOptions, parser.parse_args(["--ckpt_dir", "x", "--kv_cache_tokens", "0"]))
    help_of = {action.dest: action.help for action in parser._actions}
    assert help_of["max_seq_len"] == "the context length in tokens: prompt and generation together"


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad value"),
        TypeError("bad type"),
        FileNotFoundError("no file"),
        RankFailedError("rank 1 failed with ValueError: bad"),
    ],
)
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shards", "2", "--extra"], "unknown flag --extra; known flags: --shards"),
        (["--shards", "2", "stray"], "unrecognized arguments: stray"),
        (["--shards", "two"], "argument --shards: invalid int value: 'two'"),
        ([], "the following arguments are required: --shards"),
    ],
)
def test_an_argparse_command_reports_its_parse_errors_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        run_parser(argparse_command(), calls.append, argv)
    assert exited.value.code == 2
    assert capsys.readouterr() == ("", f"error: {message}\n")
    assert calls == []


def test_an_argparse_command_reports_its_user_errors_in_one_line(capsys):
    def main(options):
        raise ValueError(f"cannot write {options.shards} shards")

    with pytest.raises(SystemExit) as exited:
        run_parser(argparse_command(), main, ["--shards", "3"])
    assert exited.value.code == 2
    assert capsys.readouterr() == ("", "error: cannot write 3 shards\n")


def help_text(command: str, capsys, example_script) -> str:
    """What ``--help`` prints for a command, through its main."""
    if command.endswith(".py"):
        main = example_script(command).main
    else:
        main = importlib.import_module("llama.server.__main__" if command == "llama.server" else command).main
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
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


META_FLAGS = [
    "--ckpt_dir",
    "--tokenizer_path",
    "--temperature",
    "--top_p",
    "--max_seq_len",
    "--max_gen_len",
    "--max_batch_size",
]
COMMANDS = [
    "example_text_completion.py",
    "example_chat.py",
    "llama.server",
    "llama.perplexity",
    "llama.convert",
    "llama.reshard",
    "llama.finetune",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_describes_every_flag_in_one_style(command, capsys, example_script):
    text = help_text(command, capsys, example_script)
    entries = option_entries(text)
    assert "--traceback" in entries and "--help" in entries
    for flag, description in entries.items():
        assert len(description) > 10, f"{command}: {flag} has no description"


@pytest.mark.parametrize("command", ["example_text_completion.py", "example_chat.py"])
def test_the_examples_help_keeps_metas_flags_and_shows_every_default(command, capsys, example_script):
    parser = example_script(command).parser()
    entries = option_entries(help_text(command, capsys, example_script))
    assert set(META_FLAGS) <= set(entries)
    for action in parser._actions:
        if action.option_strings and action.default not in (None, argparse.SUPPRESS):
            assert entries[action.option_strings[-1]].endswith(f"(default: {action.default})"), action.dest


def test_the_servers_help_is_titled_with_how_it_is_started():
    done = subprocess.run(
        [sys.executable, "-m", "llama.server", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
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
    # the pool: 2 layers x (1 + 2 rows x 4 blocks) x 16 tokens x 4 heads x 8 values, keys and values, float32
    assert load_line(ckpt_dir, tokenizer_path, quantized, 1.5, "int4-g32") == (
        f"Loaded {ckpt_dir} (tokenizer: {tokenizer_path}) on {threads} "
        "(torch.bfloat16 activations, int4-g32 weights, torch.float32 KV cache of 0.1 MiB) in 1.50 s"
    )
    half = Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", dtype="bfloat16")
    assert load_line(ckpt_dir, tokenizer_path, half, 1.0).endswith(
        f"on {threads} (torch.bfloat16, torch.float32 KV cache of 0.1 MiB) in 1.00 s"  # a CPU attends in float32
    )
    # 2 layers x (1 + 8 rows x 64 blocks) x 16 tokens x 4 heads x (8 values + a float32 scale), keys and values
    stored = Llama.build(ckpt_dir, tokenizer_path, 1024, 8, device="cpu", dtype="float32", kv_cache_dtype="int8")
    assert load_line(ckpt_dir, tokenizer_path, stored, 1.0).endswith(
        f"on {threads} (torch.float32, torch.int8 KV cache of 1.5 MiB) in 1.00 s"
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

    runner = types.SimpleNamespace(compile_seconds=None)
    speculator = types.SimpleNamespace(verify_forward=step("verification pass", None), draft_forward=None)
    engine = types.SimpleNamespace(runner=runner, speculator=speculator)
    engine.compile_times = lambda: Engine.compile_times(engine)  # the engine's own, over these passes
    assert compile_line(engine) is None
    runner.compile_seconds, speculator.verify_forward.compile_seconds = 12.34, 5.0
    speculator.draft_forward = step("draft's step", 3.06)
    assert (
        compile_line(engine) == "Compiled the decode step in 12.3 s, the verification pass in 5.0 s, "
        "the draft's step in 3.1 s (on first use, counted above)"
    )
