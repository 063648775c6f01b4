"""Preference tuning (``python -m llama.finetune --objective dpo``) against independent references: TRL's
own DPO loss code on the same log-probabilities, transformers' log-probabilities on the same weights and
tokens written out by hand, and the command on the bundled model."""

import json
import math
import re
import types
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from conftest import BUNDLED, SMALL_PARAMS, to_transformers
from llama.chat.format import chat_format_for
from llama.checkpoints.loader import load_model
from llama.finetune import main as finetune
from llama.model import ModelArgs
from llama.tokenizer import Tokenizer
from llama.training.data import Example
from llama.training.dpo import (
    Pair,
    Preference,
    dpo_loss,
    micro_batch_groups,
    pair_batch,
    read_pairs,
    sequence_logprobs,
)

SYSTEM = {"role": "system", "content": "Answer in digits."}
CHAT_PROMPT = [
    SYSTEM,
    {"role": "user", "content": "two plus two?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and times three?"},
]
CHAT_PAIR = {
    "prompt": CHAT_PROMPT,
    "chosen": [{"role": "assistant", "content": "12"}],
    "rejected": [{"role": "assistant", "content": "thirteen"}],
}
TEXT_PAIR = {"prompt": "def add(a, b):\n", "chosen": "    return a + b\n", "rejected": "    pass\n"}


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def run(ckpt_dir, data, out, *flags, tokenizer_path=None):
    extra = ["--tokenizer_path", tokenizer_path] if tokenizer_path else []
    argv = ["--objective", "dpo", "--ckpt_dir", str(ckpt_dir), "--data", str(data), "--out", str(out)]
    finetune([*argv, "--threads", "1", *extra, *flags])
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


class TrlOutputs:
    """What TRL's DPO loss reads of a model's output: each row's per-token log-probabilities (here one
    completion token per row, carrying the row's summed log-probability) and its logged statistics."""

    def __init__(self, log_probs: torch.Tensor):
        self.log_probs = log_probs
        self.entropy = self.mean_logits = torch.zeros(log_probs.shape)
        self.is_top1 = torch.zeros(log_probs.shape, dtype=torch.bool)


class TrlAccelerator:
    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def trl_dpo(policy: torch.Tensor, reference: torch.Tensor, beta: float):
    """TRL's own DPO loss, ``trl.DPOTrainer._compute_loss`` (trl 1.16, trl/trainer/dpo_trainer.py), called on a
    stand-in trainer with its default sigmoid loss and reference log-probabilities given (as with
    ``precompute_ref_log_probs``), its model a stand-in that returns ``policy`` (2m,: the m chosen, then the m
    rejected) as the log-probability of a one-token completion: (the loss, TRL's logged metrics)."""
    from trl import DPOTrainer

    m = len(policy) // 2

    def model(**_):
        return TrlOutputs(policy[:, None])

    model.training = True
    trainer = types.SimpleNamespace(
        model=model,
        accelerator=TrlAccelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * m, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * m, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * (2 * m)),
        "ref_chosen_logps": reference[:m],
        "ref_rejected_logps": reference[m:],
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {name: values[0] for name, values in trainer._metrics["train"].items()}


def random_logprobs(m: int, seed: int):
    torch.manual_seed(seed)
    return -30 * torch.rand(2 * m, dtype=torch.float64), -30 * torch.rand(2 * m, dtype=torch.float64)


def test_the_dpo_loss_and_its_gradients_equal_trls_on_the_same_logprobs():
    policy, reference = random_logprobs(6, seed=0)
    theirs = policy.clone().requires_grad_()
    trl_loss, _ = trl_dpo(theirs, reference, beta=0.1)
    trl_loss.backward()
    ours = policy.clone().requires_grad_()
    losses, chosen_rewards, rejected_rewards = dpo_loss(ours[:6], ours[6:], reference[:6], reference[6:], beta=0.1)
    losses.mean().backward()
    assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-12)
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-12, atol=0)
    assert torch.equal(chosen_rewards, 0.1 * (policy[:6] - reference[:6]))
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_a_steps_loss_gradients_and_metrics_over_micro_batches_equal_trls_over_the_whole_batch():
    m, beta = 6, 0.5
    policy, reference = random_logprobs(m, seed=1)
    leaf = policy.float().clone().requires_grad_()

    class Model:  # row i's tokens [1, 10 + i]: its one learnt token carries its log-probability
        def forward_logprobs(self, tokens, labels):
            return torch.stack([torch.zeros(len(tokens)), leaf[tokens[:, 1] - 10]], dim=1)

    pairs = [Pair(Example([1, 10 + i], [-100, 10 + i]), Example([1, 10 + m + i], [-100, 10 + m + i])) for i in range(m)]

    def reference_logprobs(indices, batch):
        return reference.float()[batch.tokens[:, 1] - 10]

    objective = Preference(
        Model(), pairs, lambda step: list(range(m)), 2, beta, reference_logprobs, torch.device("cpu"), nullcontext()
    )
    for loss in objective.losses(0):
        loss.backward()
    record = objective.record()
    theirs = policy.float().clone().requires_grad_()
    trl_loss, metrics = trl_dpo(theirs, reference.float(), beta)
    trl_loss.backward()
    assert record["loss"] == pytest.approx(trl_loss.item(), rel=1e-6)
    assert torch.allclose(leaf.grad, theirs.grad, rtol=1e-5, atol=1e-8)
    expected = {
        "logps_chosen": metrics["logps/chosen"],
        "logps_rejected": metrics["logps/rejected"],
        "reward_margin": metrics["rewards/margins"],
        "reward_accuracy": metrics["rewards/accuracies"],
    }
    assert {name: record[name] for name in expected} == pytest.approx(expected, rel=1e-5)
    assert record["tokens"] == 2 * m * 2


def hand_llama2_chat(sp, prompt, reply):
    """Meta's Llama 2 chat format written out: each exchange BOS [INST] user [/INST] answer EOS, the system
    text inside the first user message; only the last answer and its EOS are learnt."""
    users = [prompt[1]["content"], prompt[3]["content"]]
    users[0] = f"<<SYS>>\n{prompt[0]['content']}\n<</SYS>>\n\n{users[0]}"
    first = [1] + sp.encode(f"[INST] {users[0]} [/INST] {prompt[2]['content']} ") + [2]
    asked = [1] + sp.encode(f"[INST] {users[1]} [/INST]")
    last = [1] + sp.encode(f"[INST] {users[1]} [/INST] {reply} ") + [2]
    assert last[: len(asked)] == asked
    return first + last, [-100] * (len(first) + len(asked)) + last[len(asked) :]


def hand_text(sp, prompt, completion):
    """BOS, the prompt encoded alone, the completion encoded apart, EOS; the completion and EOS learnt."""
    prompt_tokens = [1] + sp.encode(prompt)
    completion_tokens = sp.encode(completion) + [2]
    return prompt_tokens + completion_tokens, [-100] * len(prompt_tokens) + completion_tokens


def transformers_sequence_logprobs(model, tokens, labels) -> float:
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), dim=-1)
    return sum(logprobs[t - 1, label].item() for t, label in enumerate(labels) if label != -100)


def test_pairs_are_the_tokens_written_by_hand_and_their_logprobs_equal_transformers(
    checkpoint, tokenizer_path, tmp_path
):
    ckpt_dir, state = checkpoint
    tokenizer = Tokenizer(tokenizer_path)
    sp = tokenizer.sp_model
    data = write_jsonl(tmp_path / "pairs.jsonl", [TEXT_PAIR, CHAT_PAIR])
    text, chat = read_pairs(data, tokenizer, chat_format_for(tokenizer), max_seq_len=128)
    expected = [
        hand_text(sp, TEXT_PAIR["prompt"], TEXT_PAIR["chosen"]),
        hand_llama2_chat(sp, CHAT_PROMPT, "12"),
        hand_text(sp, TEXT_PAIR["prompt"], TEXT_PAIR["rejected"]),
        hand_llama2_chat(sp, CHAT_PROMPT, "thirteen"),
    ]
    assert [tuple(row) for row in (text.chosen, chat.chosen, text.rejected, chat.rejected)] == expected

    args = ModelArgs.from_dict({**SMALL_PARAMS, "vocab_size": 512, "max_seq_len": 128, "max_batch_size": 1})
    model = load_model(ckpt_dir, args, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        ours = sequence_logprobs(model, pair_batch([text, chat]), torch.device("cpu"))  # one pass, padded rows
    reference = to_transformers(state, SMALL_PARAMS, 512)
    theirs = [transformers_sequence_logprobs(reference, tokens, labels) for tokens, labels in expected]
    assert ours.tolist() == pytest.approx(theirs, rel=1e-5)


def test_every_rank_scores_validation_pairs_in_as_many_forward_passes_each_pair_counted_once(fake_world):
    fake_world(2)
    import torch.distributed as dist

    group = dist.group.WORLD
    assert micro_batch_groups(5, 2, group) == [([0, 1], True), ([4], True)]  # rank 0 of 2
    assert micro_batch_groups(5, 2, None) == [([0, 1], True), ([2, 3], True), ([4], True)]


EASY = [  # the bundled code model, taught to prefer the accessor its comment names
    {"prompt": f"# {verb} {name}\n", "chosen": chosen, "rejected": rejected}
    for verb, name, chosen, rejected in [
        ("get", "color", "def get_color(self):\n    return self._color\n", "def set_color(self, value):\n"),
        ("set", "width", "def set_width(self, value):\n    self._width = value\n", "def get_width(self):\n"),
        ("has", "name", "def has_name(self):\n    return self._name is not None\n", "def clear_name(self):\n"),
        ("clear", "size", "def clear_size(self):\n    self._size = None\n", "def has_size(self):\n"),
    ]
]


def test_the_command_starts_at_ln2_with_lora_and_the_bundled_model_learns_four_easy_pairs(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", EASY)
    flags = ["--batch_size", "4", "--micro_batch_size", "2", "--lr", "1e-2", "--lr_schedule", "constant"]
    records = run(BUNDLED, data, tmp_path / "out", *flags, "--max_steps", "6", "--val_data", data)
    first, last = records[0], records[-1]
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)  # B = 0: the policy is the reference
    assert first["reward_margin"] == 0 and first["reward_accuracy"] == 0  # margins of 0 are not > 0
    assert set(first) == {"step", "loss", "lr", "tokens", "tokens_per_s"} | {
        "logps_chosen",
        "logps_rejected",
        "reward_margin",
        "reward_accuracy",
    }
    assert all(0 <= record["reward_accuracy"] <= 1 for record in records)
    assert last["loss"] < math.log(2) and last["reward_accuracy"] == 1
    assert last["val_reward_accuracy"] == 1 and last["val_loss"] < math.log(2)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_precomputed_reference_gives_the_losses_of_the_reference_model_and_resumes_them(
    method, checkpoint, tokenizer_path, tmp_path
):
    data = write_jsonl(tmp_path / "pairs.jsonl", [TEXT_PAIR, CHAT_PAIR, {**TEXT_PAIR, "rejected": "    return a\n"}])
    flags = ["--method", method, "--batch_size", "2", "--lr", "1e-2", "--lr_schedule", "constant"]
    flags += ["--max_seq_len", "128"]

    def losses(out, *more):
        return [
            r["loss"] for r in run(checkpoint[0], data, tmp_path / out, *flags, *more, tokenizer_path=tokenizer_path)
        ]

    with_model = losses("model", "--max_steps", "3")  # LoRA: the adapters off; full: a frozen copy
    assert with_model[0] == pytest.approx(math.log(2), rel=1e-6) and with_model[1] != with_model[0]
    if method == "lora":
        precomputed = losses("precomputed", "--max_steps", "3", "--precompute_ref")
    else:  # the policy after its first step, trained, computes the reference again on --resume
        losses("precomputed", "--max_steps", "1", "--save_every", "1", "--precompute_ref")
        precomputed = losses("precomputed", "--max_steps", "3", "--precompute_ref", "--resume")
    assert precomputed == pytest.approx(with_model, rel=1e-5)


CHAT_BAD = {**CHAT_PAIR, "prompt": CHAT_PROMPT[:3]}


@pytest.mark.parametrize(
    "record, flags, error",
    [
        ({"prompt": "a", "chosen": "b"}, [], r"pairs.jsonl, line 2: expected an object with the keys prompt, chosen"),
        ({**TEXT_PAIR, "chosen": 3}, [], r"pairs.jsonl, line 2: 'chosen' must be a string after a string prompt"),
        (CHAT_BAD, [], r"pairs.jsonl, line 2: 'prompt' must end with the user's message"),
        (
            {**CHAT_PAIR, "chosen": [{"role": "assistant", "content": "1"}] * 2},
            [],
            r"pairs.jsonl, line 2: 'chosen' must be a list of one assistant message",
        ),
        (TEXT_PAIR, ["--beta", "0"], r"--beta must be positive for dpo"),
        (TEXT_PAIR, ["--pack"], r"--pack packs supervised examples: --objective dpo does not take it"),
    ],
)
def test_bad_input_is_one_line_naming_the_line_or_flag(
    checkpoint, tokenizer_path, tmp_path, capsys, record, flags, error
):
    data = write_jsonl(tmp_path / "pairs.jsonl", [TEXT_PAIR, record])
    with pytest.raises(SystemExit) as exit:
        run(checkpoint[0], data, tmp_path / "out", *flags, tokenizer_path=tokenizer_path)
    assert exit.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("error: ") and re.search(error, message), message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", [["--beta", "0.1"], ["--precompute_ref"]])
def test_dpos_flags_are_refused_by_supervised_fine_tuning(checkpoint, tmp_path, capsys, flag):
    data = write_jsonl(tmp_path / "data.jsonl", [{"text": "a"}])
    with pytest.raises(SystemExit):
        finetune(["--ckpt_dir", checkpoint[0], "--data", data, "--out", str(tmp_path / "out"), *flag])
    assert f"{flag[0]} " in capsys.readouterr().err.splitlines()[-1]


def test_pairs_longer_than_max_seq_len_on_either_side_are_dropped_and_counted(tokenizer_path, tmp_path, caplog):
    tokenizer = Tokenizer(tokenizer_path)
    chat_format = chat_format_for(tokenizer)
    long = "import os\n" * 20
    data = write_jsonl(tmp_path / "pairs.jsonl", [TEXT_PAIR, {**TEXT_PAIR, "rejected": long}, TEXT_PAIR])
    pairs = read_pairs(data, tokenizer, chat_format, max_seq_len=32)
    assert len(pairs) == 2 and "dropped 1 of 3 pairs longer than --max_seq_len 32 tokens" in caplog.text
    with pytest.raises(ValueError, match=r"every one of its 1 pairs is longer than --max_seq_len 32"):
        read_pairs(write_jsonl(tmp_path / "long.jsonl", [{**TEXT_PAIR, "chosen": long}]), tokenizer, chat_format, 32)
    with pytest.raises(ValueError, match=r"empty.jsonl: no pairs \(the file is empty\)"):
        read_pairs(write_jsonl(tmp_path / "empty.jsonl", []), tokenizer, chat_format, 32)
