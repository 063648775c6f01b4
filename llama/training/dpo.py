"""Direct preference optimisation (DPO; Rafailov et al., 2023) as TRL's ``DPOTrainer`` computes it with its
default sigmoid loss: the policy learns to raise a chosen completion's log-probability over a rejected
one's, each measured against a reference model's.

Each line of the data is a pair in one of TRL's explicit-prompt forms:

- ``{"prompt": text, "chosen": text, "rejected": text}``: BOS and the prompt encoded alone, as
  ``text_completion`` sends it (and supervised fine-tuning's prompt/completion form), then the completion
  encoded apart with EOS; the completion and EOS are learnt.
- ``{"prompt": [messages], "chosen": [one assistant message], "rejected": [one assistant message]}``: the
  dialog prompt + reply, tokenized as ``chat_completion`` sends it for the checkpoint; only the last reply
  and the token that ends its turn are learnt.

A pair is two rows: the prompt with the chosen completion, the prompt with the rejected one. The log-
probability of a completion is the sum of its learnt tokens' log-probabilities, and the loss of a pair

    -log sigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))

where pi is the policy (the model that trains) and ref the reference: with LoRA the same model with its
adapters turned off, with every weight trained a frozen copy of the checkpoint, or with ``--precompute_ref``
the reference's log-probabilities of every pair computed once before the first step.

A step takes ``batch_size`` pairs, as supervised fine-tuning takes examples (``step_indices``, split over the
data-parallel ranks by ``rank_share``), in micro-batches of pairs: one forward pass of the policy over 2m
rows (the m chosen, then the m rejected, padded on the right) and one of the reference. The step's loss is
the mean over its pairs: each micro-batch's summed loss is divided by the step's count of pairs, and scaled
by the number of ranks, whose gradients are averaged (``llama.training.loop``).
"""

import logging
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from llama.chat.format import ChatFormat
from llama.layers.lora import adapters_disabled
from llama.layers.parallel import group_rank, group_size
from llama.tokenizer import Tokenizer
from llama.training.data import (
    Batch,
    Example,
    encode_dialog,
    json_records,
    kept_within,
    learnt,
    masked,
    padded_batch,
    prompt_completion,
)
from llama.training.loop import accumulator_dtype, sum_over_ranks

logger = logging.getLogger(__name__)

KEYS = ("prompt", "chosen", "rejected")
RECORDED = ("loss", "logps_chosen", "logps_rejected", "reward_margin", "reward_accuracy")  # means over pairs


class Pair(NamedTuple):
    """A prompt with its chosen and its rejected completion, each a row that learns its completion."""

    chosen: Example
    rejected: Example


def check_reply(reply: object, key: str, where: str) -> dict:
    """A conversational completion: TRL's list of one assistant message."""
    if not isinstance(reply, list) or len(reply) != 1 or not isinstance(reply[0], dict):
        raise ValueError(
            f"{where}: {key!r} must be a list of one assistant message after a prompt of messages, got {reply!r:.80}"
        )
    if reply[0].get("role") != "assistant":
        raise ValueError(f"{where}: {key!r} must be the assistant's message, got the role {reply[0].get('role')!r}")
    return reply[0]


def last_reply(tokens: List[int], assistant: List[bool], where: str) -> Example:
    """The dialog's tokens, learning only the last run of the assistant's: the last reply and its end of turn."""
    end = len(assistant)
    while end and not assistant[end - 1]:
        end -= 1
    start = end
    while start and assistant[start - 1]:
        start -= 1
    if start == end:
        raise ValueError(f"{where}: the chat format marks no token of the reply as the assistant's")
    return Example(tokens, masked(tokens[:start]) + learnt(tokens[start:end]) + masked(tokens[end:]))


def encode_pair(record: object, tokenizer: Tokenizer, chat_format: ChatFormat, where: str) -> Pair:
    """One JSONL record as a ``Pair`` (the module's docstring); ``where`` names it in errors."""
    if not isinstance(record, dict) or set(record) != set(KEYS):
        found = sorted(record) if isinstance(record, dict) else f"a {type(record).__name__}"
        raise ValueError(f"{where}: expected an object with the keys prompt, chosen and rejected, got {found}")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        for key in ("chosen", "rejected"):
            if not isinstance(record[key], str):
                raise ValueError(
                    f"{where}: {key!r} must be a string after a string prompt, got {type(record[key]).__name__}"
                )
        return Pair(*(prompt_completion(tokenizer, prompt, record[key]) for key in ("chosen", "rejected")))
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: 'prompt' must be a string or a non-empty list of messages, got {prompt!r:.80}")
    if not isinstance(prompt[-1], dict) or prompt[-1].get("role") != "user":
        raise ValueError(
            f"{where}: 'prompt' must end with the user's message (the replies are 'chosen' and 'rejected'), "
            f"got {prompt[-1]!r:.80}"
        )
    examples = []
    for key in ("chosen", "rejected"):
        tokens, assistant = encode_dialog(prompt + [check_reply(record[key], key, where)], chat_format, where)
        examples.append(last_reply(tokens, assistant, where))
    return Pair(*examples)


def read_pairs(path: str, tokenizer: Tokenizer, chat_format: ChatFormat, max_seq_len: int) -> List[Pair]:
    """Every line of the JSONL file ``path`` as a ``Pair``; a pair with a row longer than ``max_seq_len``
    tokens is dropped, and said with their count."""
    pairs = [encode_pair(record, tokenizer, chat_format, where) for where, record in json_records(path)]
    lengths = [max(len(pair.chosen.tokens), len(pair.rejected.tokens)) for pair in pairs]
    return kept_within(pairs, lengths, path, max_seq_len, noun="pairs")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's sigmoid DPO loss of each pair from the summed log-probabilities of its completions (pairs,),
    and the rewards TRL logs: ``beta * (pi - ref)`` of the chosen and of the rejected, without gradient."""
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def pair_batch(pairs: Sequence[Pair]) -> Batch:
    """One forward pass over ``m`` pairs: 2m rows, the m chosen then the m rejected, padded on the right."""
    return padded_batch([pair.chosen for pair in pairs] + [pair.rejected for pair in pairs])


def sequence_logprobs(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Each row's summed log-probability of its learnt tokens, (rows,) in float32."""
    return model.forward_logprobs(batch.tokens.to(device), batch.labels.to(device)).sum(-1)


# pair indices and their ``pair_batch`` -> the reference's summed log-probabilities of the rows (2m,), no gradient
Reference = Callable[[List[int], Batch], torch.Tensor]


def base_reference(model: nn.Module, device: torch.device, autocast) -> Reference:
    """The log-probabilities of ``model`` with its adapters turned off (``adapters_disabled``): the base of
    a LoRA policy, with no second copy; a model without adapters as it is."""

    def reference(indices: List[int], batch: Batch) -> torch.Tensor:
        with torch.no_grad(), adapters_disabled(model), autocast:
            return sequence_logprobs(model, batch, device)

    return reference


def micro_batch_groups(
    n_pairs: int, micro_batch_size: int, data_group: Optional[ProcessGroup]
) -> List[Tuple[List[int], bool]]:
    """This rank's share of pairs 0..n_pairs-1 in micro-batches, each with whether it counts. Every rank of
    ``data_group`` makes the same number of forward passes (sharded layers gather their weights in each): a
    rank short of one scores the first micro-batch again, uncounted."""
    groups = [list(range(i, min(i + micro_batch_size, n_pairs))) for i in range(0, n_pairs, micro_batch_size)]
    ranks = group_size(data_group)
    counted = [(group, True) for group in groups] + [(groups[0], False)] * (-len(groups) % ranks)
    return counted[group_rank(data_group) :: ranks]


def precomputed_reference(
    reference: Reference,
    pairs: Sequence[Pair],
    micro_batch_size: int,
    device: torch.device,
    data_group: Optional[ProcessGroup] = None,
) -> Reference:
    """``reference``'s log-probabilities of every pair, computed now (each rank a share) and looked up after."""
    logger.info("computing the reference log-probabilities of %d pairs", len(pairs))
    table = torch.zeros(len(pairs), 2, device=device)  # (pairs, chosen and rejected)
    for indices, counted in micro_batch_groups(len(pairs), micro_batch_size, data_group):
        logprobs = reference(indices, pair_batch([pairs[i] for i in indices]))
        if counted:
            table[indices] = logprobs.float().view(2, -1).T
    sum_over_ranks(table, data_group)  # each pair's row from the one rank that computed it

    def lookup(indices: List[int], batch: Batch) -> torch.Tensor:
        return table[indices].T.reshape(-1)

    return lookup


def pair_scores(
    model: nn.Module,
    pairs: Sequence[Pair],
    indices: List[int],
    reference: Reference,
    beta: float,
    device: torch.device,
    autocast,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The DPO losses of the pairs ``indices`` (m,), with the policy's gradient, and their sums of what a step
    records (``RECORDED``, then the rows' tokens), in float64 where the device has it."""
    batch = pair_batch([pairs[i] for i in indices])
    with autocast:
        policy = sequence_logprobs(model, batch, device)  # (2m,): the m chosen, then the m rejected
    ref = reference(indices, batch)
    m = len(indices)
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy[:m], policy[m:], ref[:m], ref[m:], beta)
    margins = chosen_rewards - rejected_rewards
    policy = policy.detach()
    sums = [losses.detach().sum(), policy[:m].sum(), policy[m:].sum(), margins.sum(), (margins > 0).sum()]
    sums.append(torch.tensor(batch.tokens.numel(), device=device))
    return losses, torch.stack([value.to(accumulator_dtype(device)) for value in sums])


class Preference:
    """DPO's loss of the step's pairs (the module's docstring), from ``step_pairs`` (step -> this rank's
    indices into ``pairs``), on the ranks of ``data_group``; ``reference`` gives the reference's
    log-probabilities (``base_reference``, ``precomputed_reference``)."""

    def __init__(
        self,
        model: nn.Module,
        pairs: Sequence[Pair],
        step_pairs: Callable[[int], List[int]],
        micro_batch_size: int,
        beta: float,
        reference: Reference,
        device: torch.device,
        autocast,
        data_group: Optional[ProcessGroup] = None,
    ):
        self.model, self.pairs, self.step_pairs, self.reference = model, pairs, step_pairs, reference
        self.micro_batch_size, self.beta = micro_batch_size, beta
        self.device, self.autocast, self.data_group = device, autocast, data_group
        self.ranks = dist.get_world_size(data_group) if data_group is not None else 1

    def losses(self, step: int) -> Iterator[torch.Tensor]:
        indices = self.step_pairs(step)
        self.n_pairs = len(indices) * self.ranks  # every rank holds an equal share of the step's pairs
        self.sums = torch.zeros(len(RECORDED) + 1, dtype=accumulator_dtype(self.device), device=self.device)
        for start in range(0, len(indices), self.micro_batch_size):
            group = indices[start : start + self.micro_batch_size]
            losses, sums = pair_scores(
                self.model, self.pairs, group, self.reference, self.beta, self.device, self.autocast
            )
            yield losses.sum() * self.ranks / self.n_pairs
            self.sums += sums

    def record(self) -> dict:
        sums = sum_over_ranks(self.sums, self.data_group)
        record = {name: (value / self.n_pairs).item() for name, value in zip(RECORDED, sums)}
        return {**record, "tokens": int(sums[-1].item())}


@torch.no_grad()
def evaluate_pairs(
    model: nn.Module,
    pairs: Sequence[Pair],
    reference: Reference,
    beta: float,
    micro_batch_size: int,
    device: torch.device,
    autocast,
    data_group: Optional[ProcessGroup] = None,
) -> dict:
    """The mean DPO loss and reward accuracy over every pair of ``pairs`` (each rank a share)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(3, dtype=accumulator_dtype(device), device=device)  # summed loss, margins > 0, pairs
    for indices, counted in micro_batch_groups(len(pairs), micro_batch_size, data_group):
        _, sums = pair_scores(model, pairs, indices, reference, beta, device, autocast)
        if counted:
            total += torch.stack([sums[0], sums[RECORDED.index("reward_accuracy")], sums.new_tensor(len(indices))])
    model.train(was_training)
    loss, correct, counted_pairs = sum_over_ranks(total, data_group).tolist()
    return {"val_loss": loss / counted_pairs, "val_reward_accuracy": correct / counted_pairs}
