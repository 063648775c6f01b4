"""The thread count a command decodes with when given no --threads: the fastest of one per core and
fewer, timed on the model loaded, unless OMP_NUM_THREADS says or a count was given."""

import json
import os
import runpy
import subprocess
import sys
import types

import pytest
import torch
from torch import nn

from conftest import ROOT
from llama.checkpoints import loader
from llama.layers import cpu_threads
from llama.layers.cpu_threads import choose_threads, thread_counts


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """timed({threads: ms per step}) -> a CPU model whose decode step takes that long at each thread
    count, in a process of 4 threads by default (torch's count, faked), on a machine where nothing
    was timed before (the test's own cache folder)."""
    threads = [4]
    monkeypatch.setenv("LLAMA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[0])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.__setitem__(0, n))

    def make(ms: dict) -> nn.Module:
        monkeypatch.setattr(cpu_threads, "step_seconds", lambda model, repeats: ms[threads[0]] / 1e3)
        model = nn.Module()
        model.output = nn.Linear(2, 2)
        model.group = None  # whole in this process
        return model

    return make


def test_the_counts_timed_are_one_per_core_and_each_half_down_to_one():
    assert thread_counts(8) == [8, 4, 2, 1]
    assert thread_counts(6) == [6, 3, 1]
    assert thread_counts(1) == [1]


def test_a_command_without_threads_decodes_with_the_fastest_count(timed):
    model = timed({4: 2.0, 2: 1.5, 1: 1.0})
    assert choose_threads(model) == {4: 2e-3, 2: 1.5e-3, 1: 1e-3}
    assert torch.get_num_threads() == 1


def test_one_per_core_stays_unless_another_count_is_more_than_10_percent_faster(timed):
    model = timed({4: 1.0, 2: 0.95, 1: 0.92})
    choose_threads(model)
    assert torch.get_num_threads() == 4


def test_a_count_the_environment_gives_is_kept_untimed(timed, monkeypatch):
    model = timed({4: 2.0, 2: 1.5, 1: 1.0})
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert choose_threads(model) is None
    assert torch.get_num_threads() == 4


@pytest.mark.parametrize("script", ["example_text_completion.py", "example_chat.py"])
@pytest.mark.parametrize("threads", [None, 4])
def test_a_command_times_the_threads_only_when_not_given_a_count(script, threads, monkeypatch):
    """--threads N sets N before loading and keeps it; without it the model loaded chooses."""
    built = {}

    def from_options(load, engine):
        built.update(time_threads=load.time_threads, threads=torch.get_num_threads())
        raise SystemExit(0)  # the command goes no further

    command = runpy.run_path(str(ROOT / script))
    monkeypatch.setitem(command["main"].__globals__, "Llama", types.SimpleNamespace(from_options=from_options))
    before = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit):
            command["main"]([] if threads is None else ["--threads", str(threads)])
    finally:
        torch.set_num_threads(before)
    assert built["time_threads"] is (threads is None)
    assert built["threads"] == (threads or before)


def test_only_the_model_loaded_chooses_and_its_draft_decodes_with_that_count(make_llama, checkpoint, monkeypatch):
    chose = []
    monkeypatch.setattr(loader, "choose_threads", chose.append)
    llama = make_llama(draft_ckpt_dir=checkpoint[0], time_threads=True)
    assert chose == [llama.model]  # not the draft, loaded next
    chose.clear()
    make_llama()
    assert chose == []  # a build not asked to (Meta's scripts, --threads) keeps the process's count


def test_a_model_timed_at_load_generates_as_one_that_was_not(make_llama, monkeypatch):
    """The timed steps write position 0 of each cache row, which every prompt's prefill overwrites."""
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(loader, "choose_float32_kernels", lambda model: {})  # both models alike, untimed
    prompts = [[1, 5, 9, 2], [1, 7], [1, 3, 3, 3, 8]]
    try:
        plain = make_llama().generate(prompts, max_gen_len=8, temperature=0, logprobs=True)
        timed = make_llama(time_threads=True)
    finally:
        torch.set_num_threads(before)
    assert timed.generate(prompts, max_gen_len=8, temperature=0, logprobs=True) == plain


def test_a_later_run_on_the_machine_decodes_with_the_count_timed_first(timed, tmp_path):
    """The choice is remembered in the cache folder: a later process reads it instead of timing again
    (a timing on a busy machine could choose otherwise, and a compiled step would compile again)."""
    first = timed({4: 2.0, 2: 1.5, 1: 1.0})
    medians = choose_threads(first)
    assert torch.get_num_threads() == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "timed_choices.json"]

    torch.set_num_threads(4)  # a new process
    later = timed({4: 1.0, 2: 2.0, 1: 3.0})  # the same shapes, timed otherwise now: not timed
    assert choose_threads(later) == medians
    assert torch.get_num_threads() == 1

    torch.set_num_threads(4)
    other = timed({4: 1.0, 2: 2.0, 1: 3.0})
    other.output = nn.Linear(3, 2)  # another model: timed
    assert choose_threads(other) == {4: 1e-3, 2: 2e-3, 1: 3e-3}
    assert torch.get_num_threads() == 4


def test_a_cache_file_that_cannot_be_read_is_timed_over(timed, tmp_path, caplog):
    (tmp_path / "timed_choices.json").write_text("{not json")
    model = timed({4: 2.0, 2: 1.5, 1: 1.0})
    assert choose_threads(model) == {4: 2e-3, 2: 1.5e-3, 1: 1e-3}
    assert "timed_choices.json cannot be read" in caplog.text
    assert json.loads((tmp_path / "timed_choices.json").read_text())  # written anew, whole


def test_a_cache_folder_that_cannot_be_written_is_said_and_the_run_goes_on(timed, monkeypatch, tmp_path, caplog):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LLAMA_CACHE_DIR", str(tmp_path / "file" / "llama"))  # under a file: no folder there
    model = timed({4: 2.0, 2: 1.5, 1: 1.0})
    choose_threads(model)
    assert torch.get_num_threads() == 1
    assert "could not be remembered" in caplog.text


INFERENCE_COMMANDS = [
    "example_text_completion.py",
    "example_chat.py",
    "llama.server",
    "llama.evaluate",
    "llama.perplexity",
]
PROBE = """
import builtins, os, runpy, sys
class TorchLoads(Exception):
    pass
load = builtins.__import__
def spy(name, *args, **kwargs):  # the command stops where it would load torch: OpenMP reads the policy then, once
    if name.partition(".")[0] == "torch":
        raise TorchLoads(os.environ.get("OMP_WAIT_POLICY", "unset"))
    return load(name, *args, **kwargs)
builtins.__import__ = spy
for command in sys.argv[1:]:
    for name in [name for name in sys.modules if name.partition(".")[0] == "llama"]:
        del sys.modules[name]
    os.environ.pop("OMP_WAIT_POLICY", None)
    try:
        runpy.run_path(command) if command.endswith(".py") else runpy.run_module(command, run_name="probe")
        print(os.environ.get("OMP_WAIT_POLICY", "unset"))
    except TorchLoads as loading:
        print(loading.args[0])
"""


@pytest.fixture(scope="module")
def wait_policy_when_torch_loads():
    """The OMP_WAIT_POLICY each command (and the package alone) has set when it first imports torch, in
    an environment that sets none."""
    commands = [*INFERENCE_COMMANDS, "llama.finetune", "llama/__init__.py"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *commands], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return dict(zip(commands, done.stdout.split()))


@pytest.mark.parametrize("command", INFERENCE_COMMANDS)
def test_an_inference_command_waits_passively(wait_policy_when_torch_loads, command):
    """OpenMP's waiting threads sleep (decoding beside a busy neighbour), set where the command starts."""
    assert wait_policy_when_torch_loads[command] == "PASSIVE"


@pytest.mark.parametrize("module", ["llama.finetune", "llama/__init__.py"])
def test_the_training_command_and_the_package_alone_keep_openmps_default(wait_policy_when_torch_loads, module):
    """A ``python -m llama.finetune`` process (torchrun's workers alike) keeps OpenMP's default: a training
    step's many small operations would each wake sleeping threads. Importing the package sets nothing."""
    assert wait_policy_when_torch_loads[module] == "unset"


def test_importing_the_model_loads_its_math_and_not_the_engine():
    """``import llama.model`` (torch and the layers) leaves the engine, the grammars and the chat templates
    unloaded; Meta's names still come from the package when asked for."""
    command = (
        "import sys, llama.model; print(sorted(m for m in ('llama.engine', 'llama.generation', 'llguidance', "
        "'jinja2', 'llama.checkpoints') if m in sys.modules)); from llama import Llama, Dialog, ModelArgs, "
        "Tokenizer, Transformer; print(Llama.__module__, Tokenizer.__module__)"
    )
    printed = subprocess.run(
        [sys.executable, "-c", command], capture_output=True, text=True, cwd=ROOT
    ).stdout.splitlines()
    assert printed == ["[]", "llama.generation llama.tokenizer"]
