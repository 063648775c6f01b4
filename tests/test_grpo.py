"""python -m llama.finetune --objective grpo against independent references: TRL's advantages and losses
written out by hand, transformers' (and peft's) log-probabilities of the completions the engine sampled, one
process against two, a resumed run against an uninterrupted one, and the bundled model learning a task."""

import functools
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BUNDLED, SMALL_PARAMS, to_transformers
from llama.finetune import main as finetune
from llama.training.grpo import clipped_policy_loss, group_advantages

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The function",
    "A list is",
    "Python is a",
    "To open a file",
    "The module",
    "Return the",
    "If the",
    "A class",
]
REWARDS = """
def has_the(prompts, completions, **kwargs):
    return [1.0 if " the " in c else 0.0 for c in completions]

def short(prompts, completions, completion_ids, **kwargs):
    return [-len(ids) / 8 for ids in completion_ids]

def first_token_even(prompts, completions, completion_ids, **kwargs):
    return [float(ids[0] % 2 == 0) for ids in completion_ids]

def echo_keys(prompts, completions, completion_ids, answer, **kwargs):
    assert len(answer) == len(completions) and all(isinstance(ids, list) for ids in completion_ids)
    return [float(a == "yes") for a in answer]

calls = []

def fails_on_the_second_rollout(prompts, completions, **kwargs):
    calls.append(1)
    if len(calls) > 1:
        raise KeyError("no such answer")
    return [0.0] * len(completions)

def too_few(prompts, completions, **kwargs):
    return [0.0]

def not_a_number(prompts, completions, **kwargs):
    return ["1"] * len(completions)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grpo")
    (folder / "rewards.py").write_text(REWARDS)
    lines = [{"prompt": p, "answer": "yes" if i % 2 else "no"} for i, p in enumerate(PROMPTS)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


@pytest.fixture(scope="module")
def ends_lines(tmp_path_factory):
    """The bundled model, but ending a completion where it would start a new line: its EOS row of the output
    is its newline's (the bundled model never samples EOS, and a step's completions should differ in length)."""
    folder = tmp_path_factory.mktemp("ends_lines")
    state = torch.load(BUNDLED / "consolidated.00.pth", weights_only=True)
    state["output.weight"][2] = state["output.weight"][13]
    torch.save(state, folder / "consolidated.00.pth")
    for name in ("params.json", "tokenizer.model"):
        shutil.copy(BUNDLED / name, folder / name)
    return folder


def run(files, out, *flags, ckpt_dir=BUNDLED, reward="has_the"):
    finetune(
        ["--objective", "grpo", "--ckpt_dir", str(ckpt_dir), "--data", str(files / "prompts.jsonl"), "--out", str(out)]
        + ["--reward", f"{files / 'rewards.py'}:{reward}", "--threads", "1", "--batch_size", "2"]
        + ["--num_generations", "4", "--max_new_tokens", "8", "--lr_schedule", "constant", "--warmup_steps", "0"]
        + list(flags)
    )
    return read(out / "metrics.jsonl"), read(out / "rollouts.jsonl")


def assert_same_rollouts(ours, theirs):
    """The same completions; their log-probabilities up to float32 rounding (rows batched otherwise)."""
    assert [{**r, "logprobs": None} for r in ours] == [{**r, "logprobs": None} for r in theirs]
    for a, b in zip(ours, theirs):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-5)


def read(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_advantages_are_trls_group_normalised_rewards_with_the_sample_standard_deviation():
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0]
    groups = [rewards[:4], rewards[4:]]
    by_group = [(r - statistics.mean(g)) / (statistics.stdev(g) + 1e-4) for g in groups for r in g]
    batch_std = torch.tensor(statistics.stdev(rewards), dtype=torch.float64)
    by_batch = [(r - statistics.mean(g)) / (statistics.stdev(rewards) + 1e-4) for g in groups for r in g]
    unscaled = [r - statistics.mean(g) for g in groups for r in g]
    tensor = torch.tensor(rewards, dtype=torch.float64)
    assert group_advantages(tensor, 4, "group").tolist() == pytest.approx(by_group, rel=1e-12)
    assert group_advantages(tensor, 4, "batch", batch_std).tolist() == pytest.approx(by_batch, rel=1e-12)
    assert group_advantages(tensor, 4, "none").tolist() == pytest.approx(unscaled, rel=1e-12)
    assert group_advantages(torch.ones(4, dtype=torch.float64), 4, "group").tolist() == [0.0] * 4  # nothing to learn


def test_the_clipped_token_loss_and_its_kl_are_trls_written_out_token_by_token():
    torch.manual_seed(0)
    logprobs, old, ref = -torch.rand(3, 5) * 3, -torch.rand(3, 5) * 3, -torch.rand(3, 5) * 3
    advantages = torch.tensor([1.5, -0.7, 0.2])
    loss, clipped, kl = clipped_policy_loss(logprobs, old, advantages, 0.2, 0.28, ref, beta=0.04)
    for i, t in itertools.product(range(3), range(5)):
        ratio, a = math.exp(logprobs[i, t] - old[i, t]), advantages[i].item()
        d = (ref[i, t] - logprobs[i, t]).item()
        expected = -min(ratio * a, min(max(ratio, 0.8), 1.28) * a) + 0.04 * (math.exp(d) - d - 1)
        assert loss[i, t].item() == pytest.approx(expected, rel=1e-5)
        assert clipped[i, t].item() == ((ratio < 0.8 and a < 0) or (ratio > 1.28 and a > 0))
        assert kl[i, t].item() == pytest.approx(math.exp(d) - d - 1, rel=1e-5, abs=1e-7)
    assert clipped.any() and not clipped.all()


def hand_loss(rollouts, loss_type, max_new_tokens, mask_truncated=False):
    """A first step's loss from its rollouts: the ratio is 1 (the engine's log-probabilities are the
    trainer's), so each token's loss is -A; normalised as TRL's loss types."""
    learnt = [0 if mask_truncated and r["truncated"] else len(r["completion_tokens"]) for r in rollouts]
    summed = -sum(r["advantage"] * n for r, n in zip(rollouts, learnt))
    if loss_type == "dapo":
        return summed / sum(learnt)
    if loss_type == "grpo":
        return statistics.mean(-r["advantage"] if n else 0.0 for r, n in zip(rollouts, learnt))
    return summed / (len(rollouts) * max_new_tokens)


@pytest.mark.parametrize(
    "loss_type, extra", [("dapo", []), ("grpo", []), ("dr_grpo", []), ("dapo", ["--mask_truncated"])]
)
def test_a_steps_rollouts_and_loss_are_trls_formulas_of_the_rewards(files, ends_lines, tmp_path, loss_type, extra):
    metrics, rollouts = run(
        files, tmp_path, "--max_steps", "1", "--loss_type", loss_type, *extra, reward="short", ckpt_dir=ends_lines
    )
    assert len(rollouts) == 2 * 4 and [r["step"] for r in rollouts] == [1] * 8
    assert [r["group"] for r in rollouts] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert any(not r["truncated"] for r in rollouts)  # some end with EOS: lengths differ
    for group in (rollouts[:4], rollouts[4:]):
        rewards = [r["reward"] for r in group]
        assert rewards == [-len(r["completion_tokens"]) / 8 for r in group]
        expected = [(x - statistics.mean(rewards)) / (statistics.stdev(rewards) + 1e-4) for x in rewards]
        assert [r["advantage"] for r in group] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    for r in rollouts:
        assert len(r["logprobs"]) == len(r["completion_tokens"]) <= 8
        assert r["truncated"] == (len(r["completion_tokens"]) == 8 and r["completion_tokens"][-1] != 2)
    (record,) = metrics
    assert record["loss"] == pytest.approx(hand_loss(rollouts, loss_type, 8, bool(extra)), abs=1e-5)
    assert record["reward"] == pytest.approx(statistics.mean(r["reward"] for r in rollouts))
    assert record["completion_length"] == statistics.mean(len(r["completion_tokens"]) for r in rollouts)
    assert record["logprob_gap"] < 1e-5 and record["clip_fraction"] == 0.0


def transformers_logprobs(model, rollouts, temperature):
    """Each completion's tokens' log-probabilities under ``model`` (transformers), at ``temperature``."""
    scores = []
    for r in rollouts:
        tokens = torch.tensor([r["prompt_tokens"] + r["completion_tokens"]])
        with torch.no_grad():
            logits = model(input_ids=tokens).logits[0].double() / temperature
        start = len(r["prompt_tokens"])
        positions = torch.arange(start - 1, tokens.shape[1] - 1)
        scores.append(torch.log_softmax(logits[positions], -1).gather(1, tokens[0, start:, None])[:, 0].tolist())
    return scores


def test_the_engines_logprobs_are_transformers_and_peft_on_the_weights_each_rollout_was_sampled_with(
    files, checkpoint, tokenizer_path, tmp_path
):
    from peft import PeftModel

    ckpt_dir, state = checkpoint
    flags = ["--tokenizer_path", tokenizer_path, "--lr", "5e-2", "--temperature", "0.7", "--max_steps"]
    _, rollouts = run(files, tmp_path / "two", *flags, "2", ckpt_dir=ckpt_dir, reward="first_token_even")
    run(
        files, tmp_path / "one", *flags, "1", ckpt_dir=ckpt_dir, reward="first_token_even"
    )  # its adapter: the weights step 2 sampled with
    base = to_transformers(state, SMALL_PARAMS, 512)
    first, second = [r for r in rollouts if r["step"] == 1], [r for r in rollouts if r["step"] == 2]
    for ours, theirs in zip([r["logprobs"] for r in first], transformers_logprobs(base, first, 0.7)):
        assert ours == pytest.approx(theirs, abs=1e-4)
    adapted = PeftModel.from_pretrained(to_transformers(state, SMALL_PARAMS, 512), str(tmp_path / "one")).eval()
    assert any(
        abs(a - b) > 1e-3  # the step changed the weights
        for r, base_scores in zip(second, transformers_logprobs(base, second, 0.7))
        for a, b in zip(r["logprobs"], base_scores)
    )
    for ours, theirs in zip([r["logprobs"] for r in second], transformers_logprobs(adapted, second, 0.7)):
        assert ours == pytest.approx(theirs, abs=1e-4)


def test_a_run_resumed_mid_rollout_gives_the_uninterrupted_runs_rollouts_losses_and_adapter(files, tmp_path):
    from safetensors.torch import load_file

    flags = ["--rollout_batch_size", "4", "--iterations_per_rollout", "2", "--lr", "1e-2", "--reward", "has_the"]
    flags = flags[:-2]
    whole = run(files, tmp_path / "whole", "--max_steps", "5", *flags)
    run(files, tmp_path / "parts", "--max_steps", "3", "--save_every", "3", *flags)  # mid-rollout: 2 slices x 2
    parts = run(files, tmp_path / "parts", "--max_steps", "5", "--save_every", "3", "--resume", *flags)
    assert [r["step"] for r in parts[0]] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in parts[0]] == pytest.approx([r["loss"] for r in whole[0]], rel=1e-5, abs=1e-7)
    assert parts[1] == whole[1]  # rollouts.jsonl: the same completions, sampled once each
    assert sorted({r["step"] for r in whole[1]}) == [1, 2, 5, 6]  # a rollout serves 2 slices, twice
    assert any(
        r["clip_fraction"] > 0 or r["logprob_gap"] > 1e-4 for r in whole[0][1:]
    )  # later iterations are off-policy
    ours, theirs = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("whole", "parts"))
    assert all(torch.allclose(ours[key], theirs[key], atol=1e-6) for key in ours)


def test_two_processes_under_torchrun_sample_and_learn_as_one(files, tmp_path):
    flags = ["--max_steps", "2", "--lr", "1e-2"]
    single = run(files, tmp_path / "one", *flags)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "llama.finetune", "--objective", "grpo", "--ckpt_dir", str(BUNDLED), "--data"]
    command += [str(files / "prompts.jsonl"), "--out", str(tmp_path / "two"), "--reward"]
    command += [f"{files / 'rewards.py'}:has_the", "--batch_size", "2", "--num_generations", "4"]
    command += ["--max_new_tokens", "8", "--lr_schedule", "constant", "--warmup_steps", "0", *flags]
    result = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics, rollouts = read(tmp_path / "two" / "metrics.jsonl"), read(tmp_path / "two" / "rollouts.jsonl")
    assert_same_rollouts(rollouts, single[1])  # each rank sampled its share, with the prompts' own seeds
    for ours, theirs in zip(metrics, single[0]):
        for key in ("loss", "reward", "reward_std", "completion_length", "clip_fraction"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_the_bundled_model_learns_a_reward_it_earns_sometimes_at_first(files, tmp_path, method):
    lr = {"lora": "3e-3", "qlora": "3e-3", "full": "3e-4"}[method]
    validation = files / "validation.jsonl"
    validation.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    metrics, _ = run(
        files,
        tmp_path,
        "--method",
        method,
        "--max_steps",
        "10",
        "--max_new_tokens",
        "16",
        "--batch_size",
        "4",
        "--num_generations",
        "8",
        "--lr",
        lr,
        "--val_data",
        str(validation),
        "--eval_every",
        "5",
    )
    rewards = [r["reward"] for r in metrics]
    assert 0 < rewards[0] < 0.6 and statistics.mean(rewards[-3:]) > 0.85, rewards
    assert [r["step"] for r in metrics if "val_reward" in r] == [5, 10]
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.parametrize(
    "reward, message",
    [
        ("fails_on_the_second_rollout", r"reward fails_on_the_second_rollout \(.*\) raised KeyError: 'no such answer'"),
        ("too_few", r"reward too_few \(.*\) returned 1 values for 8 completions"),
        (
            "not_a_number",
            r"reward not_a_number \(.*\) returned '1' for completion 0: each reward must be a finite number",
        ),
    ],
)
def test_a_failing_reward_stops_the_run_with_one_line_before_the_next_update(files, tmp_path, capsys, reward, message):
    with pytest.raises(SystemExit):
        run(files, tmp_path, "--max_steps", "2", "--save_every", "1", reward=reward)
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line.lower()]) == 1 and __import__("re").search(message, err[-1])
    steps = [r["step"] for r in read(tmp_path / "metrics.jsonl")] if (tmp_path / "metrics.jsonl").exists() else []
    assert steps == ([1] if reward == "fails_on_the_second_rollout" else [])
    assert not list(tmp_path.glob("adapter_*"))  # nothing written for the failed step


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reward", "missing.py:f"], "--reward 'missing.py:f': missing.py not found"),
        (["--reward", "REWARDS:nothing"], "defines no function nothing"),
        (["--num_generations", "1"], "--num_generations must be at least 2"),
        (["--temperature", "0"], "--temperature must be positive"),
        (["--pack"], "--pack packs supervised examples"),
        (["--micro_batch_size", "3"], "--micro_batch_size 3 must divide each rank's 8 completions"),
        (["--rollout_batch_size", "3"], "--rollout_batch_size 3 must be a multiple of --batch_size 2"),
        (["--reward_weights", "1", "2"], "--reward_weights gives 2 weight(s) for 1 --reward function(s)"),
    ],
)
def test_bad_grpo_flags_are_one_line_before_the_model_loads(files, tmp_path, capsys, flags, message):
    flags = [str(files / "rewards.py") + flag[7:] if flag.startswith("REWARDS") else flag for flag in flags]
    command = ["--objective", "grpo", "--ckpt_dir", str(BUNDLED), "--data", str(files / "prompts.jsonl")]
    command += ["--out", str(tmp_path / "out"), "--batch_size", "2", "--num_generations", "4"]
    if "--reward" not in flags:
        command += ["--reward", f"{files / 'rewards.py'}:has_the"]
    with pytest.raises(SystemExit):
        finetune(command + flags)
    err = capsys.readouterr().err
    assert message in err and "loading" not in err and not (tmp_path / "out").exists()


def test_a_prompt_line_without_a_prompt_or_with_a_dialog_to_continue_is_named(files, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    for line, message in [
        ({"question": "x"}, "line 2: expected a JSON object with a 'prompt'"),
        ({"prompt": [{"role": "assistant", "content": "hi"}]}, "line 2: 'prompt' is not a dialog to answer"),
        ({"prompt": 3}, "line 2: 'prompt' must be a string or a list of messages, got int"),
    ]:
        data.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(line) + "\n")
        with pytest.raises(SystemExit):
            finetune(
                [
                    "--objective",
                    "grpo",
                    "--ckpt_dir",
                    str(BUNDLED),
                    "--data",
                    str(data),
                    "--out",
                    str(tmp_path / "out"),
                    "--reward",
                    f"{files / 'rewards.py'}:has_the",
                ]
            )
        assert message in capsys.readouterr().err


def test_rewards_get_the_lines_other_keys_and_weights_add_functions_up(files, tmp_path):
    metrics, rollouts = run(
        files,
        tmp_path,
        "--max_steps",
        "1",
        "--reward",
        f"{files / 'rewards.py'}:short",
        "--reward_weights",
        "2",
        "0.5",
        reward="echo_keys",
    )
    for r in rollouts:
        answer = "yes" if PROMPTS.index(r["prompt"]) % 2 else "no"
        assert r["rewards"] == {"echo_keys": float(answer == "yes"), "short": -len(r["completion_tokens"]) / 8}
        assert r["reward"] == pytest.approx(2 * r["rewards"]["echo_keys"] + 0.5 * r["rewards"]["short"])
    assert {"reward_echo_keys", "reward_short"} <= set(metrics[0])


def test_compiled_rollouts_sample_the_eager_rollouts_after_the_weights_change(files, tmp_path, monkeypatch):
    """Traced by dynamo's eager backend (the graphs inductor would compile, in a fraction of the time): the
    second rollout samples on the weights the first step updated in place."""
    flags = ["--max_steps", "2", "--lr", "1e-2"]
    eager = run(files, tmp_path / "eager", *flags)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    compiled = run(files, tmp_path / "compiled", *flags, "--compile_rollouts")
    assert_same_rollouts(compiled[1], eager[1])
    assert [r["loss"] for r in compiled[0]] == pytest.approx([r["loss"] for r in eager[0]], abs=1e-6)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_with_beta_the_kl_to_the_reference_starts_at_zero_and_grows_and_ref_every_resets_it(files, tmp_path, method):
    flags = ["--method", method, "--max_steps", "3", "--beta", "0.04", "--lr", "1e-2" if method == "lora" else "1e-3"]
    metrics, _ = run(files, tmp_path / "kept", *flags)
    kl = [r["kl"] for r in metrics]
    assert kl[0] < 1e-6 < kl[1] < kl[2], kl  # the policy starts as its reference, then moves away
    synced, _ = run(files, tmp_path / "synced", *flags, "--ref_every", "2")
    assert synced[2]["kl"] < 1e-6 < synced[1]["kl"]  # after step 2 the policy is the reference again
