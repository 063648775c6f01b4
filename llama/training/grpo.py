"""GRPO: reinforcement learning from verifiable rewards (Shao et al., 2024, DeepSeekMath), with TRL's losses.

A rollout samples ``num_generations`` completions of each of its prompts **on the project's engine, with
the weights being trained** (the trainer's model, its adapters included: no copy, no transfer), scores
them with the user's reward functions (``llama.training.rewards``), and gives each completion the advantage
of its reward over its group's (the other completions of its prompt)::

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)        # --scale_rewards group (sample std)

(``batch``: the standard deviation of the whole rollout's rewards; ``none``: not divided). Each optimizer
step then takes its prompts' completions and minimises the PPO-clipped token-level loss::

    ratio_t = exp(logp_t - old_logp_t)
    loss_t  = -min(ratio_t A, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) A) + beta KL_t
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                    # with --beta > 0

over the completion's tokens (its sampled end token included), normalised as ``--loss_type`` says: ``dapo``
(the default) by the rollout's completion tokens per step, ``grpo`` per completion then over completions,
``dr_grpo`` by completions x ``max_new_tokens``. ``logp_t`` is ``Transformer.forward_logprobs`` at the
sampling temperature; ``old_logp_t`` the engine's own log-probabilities of the tokens it sampled, at that
temperature: the same model file computing the same numbers, so no importance-sampling correction.

A rollout serves ``rollout_batch_size / batch_size`` steps (each its slice of the prompts), each
``iterations_per_rollout`` times. Every prompt's completions draw from their own seed (the run's seed, the
rollout and the prompt's place in it): a rollout is the same on any number of ranks, and after ``--resume``.
Under torchrun each data-parallel rank samples its share of each step's prompts on its own engine, the
weights gathered whole for the rollout (``gathered``).
"""

import json
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from llama.chat.format import ChatFormat
from llama.distributed import fail_together
from llama.engine.engine import Engine
from llama.layers.lora import adapters_disabled
from llama.layers.loss import IGNORE_INDEX
from llama.options import GenerationOptions
from llama.tokenizer import Tokenizer
from llama.training.data import json_records, rank_share, step_indices
from llama.training.loop import accumulator_dtype, sum_over_ranks
from llama.training.parallelize import gathered
from llama.training.rewards import score

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo")
ROLLOUTS_FILE = "rollouts.jsonl"
STD_EPSILON = 1e-4


@dataclass(frozen=True)
class GRPOSettings:
    """The flags of ``--objective grpo`` (``python -m llama.finetune --help``), checked once."""

    num_generations: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # None: epsilon
    beta: float = 0.0
    ref_every: int = 0
    scale_rewards: str = "group"
    loss_type: str = "dapo"
    iterations_per_rollout: int = 1
    rollout_batch_size: Optional[int] = None  # prompts a rollout samples; None: --batch_size
    mask_truncated: bool = False

    def __post_init__(self):
        for name in ("num_generations", "max_new_tokens", "iterations_per_rollout"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        if self.num_generations < 2:
            raise ValueError(f"--num_generations must be at least 2 (a group's advantages), got {self.num_generations}")
        if not self.temperature > 0:
            raise ValueError(f"--temperature must be positive (the policy samples), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise ValueError(
                f"--epsilon must be in (0, 1) and --epsilon_high positive, got {self.epsilon}, {self.epsilon_high}"
            )
        if self.beta < 0 or self.ref_every < 0:
            raise ValueError(f"--beta and --ref_every must be >= 0, got {self.beta}, {self.ref_every}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"--scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


class Prompt(NamedTuple):
    """A line of the prompts file: the prompt as given (text, or messages), its tokens, its other keys."""

    prompt: Union[str, list]
    tokens: List[int]
    extra: dict


def read_prompts(path: str, tokenizer: Tokenizer, chat_format: ChatFormat, max_seq_len: int) -> List[Prompt]:
    """Each line's ``prompt``: a text, sent as ``text_completion`` sends it (BOS + text), or a message list
    ending with the user's, sent as ``chat_completion`` sends it. Prompts with no room left in
    ``max_seq_len`` for a completion are refused."""
    prompts = []
    for where, record in json_records(path):
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValueError(f"{where}: expected a JSON object with a 'prompt' (text or messages) and any other keys")
        prompt = record["prompt"]
        if isinstance(prompt, str):
            tokens = tokenizer.encode(prompt, bos=True, eos=False)
        elif isinstance(prompt, list):
            try:
                tokens = chat_format.encode_dialog(prompt)
            except (ValueError, TypeError, KeyError) as error:
                raise ValueError(f"{where}: 'prompt' is not a dialog to answer: {error}") from None
        else:
            raise ValueError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
        if len(tokens) >= max_seq_len:
            raise ValueError(
                f"{where}: the prompt has {len(tokens)} tokens, leaving no room for a completion in "
                f"--max_seq_len {max_seq_len}"
            )
        prompts.append(Prompt(prompt, tokens, {key: value for key, value in record.items() if key != "prompt"}))
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    return prompts


@dataclass
class Completion:
    """One sampled completion and what it earned."""

    group: int  # its prompt's place in the step's prompts
    prompt: Prompt
    tokens: List[int]  # with the end token it sampled, which is learnt
    logprobs: List[float]  # the engine's, one per token, at the sampling temperature
    truncated: bool  # it reached max_new_tokens (or the context's end) before an end token
    text: str = ""  # its text, without the end token
    reward: float = 0.0
    rewards: Optional[Dict[str, float]] = None  # each function's
    advantage: float = 0.0
    ref_logprobs: Optional[List[float]] = None  # the reference's, with --beta > 0


def sample(
    engine: Engine,
    prompts: Sequence[Prompt],
    groups: Sequence[int],
    seeds: Sequence[int],
    settings: GRPOSettings,
    temperature: Optional[float] = None,
) -> List[Completion]:
    """Each prompt's completions, ``settings.num_generations`` of them (one, greedy, at ``temperature`` 0),
    sampled together on ``engine``; prompt i's draw from ``seeds[i]`` (row j from seed + j)."""
    greedy = temperature == 0
    options = GenerationOptions(
        max_gen_len=settings.max_new_tokens,
        temperature=settings.temperature if temperature is None else temperature,
        top_p=settings.top_p,
        num_return_sequences=1 if greedy else settings.num_generations,
        logprobs=True,
        tempered_logprobs=True,
    )
    requests = [
        engine.submit([prompt.tokens], GenerationOptions(**{**vars(options), "seed": seed}), stream_text=False)
        for prompt, seed in zip(prompts, seeds)
    ]
    while not all(request.done for request in requests):
        engine.step()
    completions = []
    for prompt, group, request in zip(prompts, groups, requests):
        for tokens, logprobs, stop in zip(request.tokens, request.logprobs, request.stopped_by):
            text = engine.tokenizer.decode(tokens)
            end = [] if stop is None else [stop]
            completions.append(
                Completion(
                    group, prompt, tokens + [t for t, _ in end], logprobs + [p for _, p in end], stop is None, text
                )
            )
    return completions


def reward_inputs(completions: Sequence[Completion]):
    """TRL's arguments of a reward function: prompts, completions, and keywords (``completion_ids`` and the
    lines' other keys, as lists)."""
    prompts = [c.prompt.prompt for c in completions]
    texts = [
        [{"role": "assistant", "content": c.text}] if isinstance(c.prompt.prompt, list) else c.text for c in completions
    ]
    keywords = {"completion_ids": [c.tokens for c in completions]}
    for key in dict.fromkeys(key for c in completions for key in c.prompt.extra):
        keywords[key] = [c.prompt.extra.get(key) for c in completions]
    return prompts, texts, keywords


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale: str, batch_std: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """TRL's advantages of rewards (n,) in groups of ``num_generations`` consecutive completions: the reward
    less its group's mean, divided by the group's sample standard deviation (``scale`` "group"), by
    ``batch_std`` ("batch": that of the whole rollout, over every rank) or by nothing ("none"), + 1e-4."""
    grouped = rewards.view(-1, num_generations)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        return advantages / (grouped.std(dim=1).repeat_interleave(num_generations) + STD_EPSILON)
    if scale == "batch":
        return advantages / (batch_std + STD_EPSILON)
    return advantages


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    ref_logprobs: Optional[torch.Tensor] = None,
    beta: float = 0.0,
):
    """Each token's loss (rows, tokens) (the module docstring), whether its ratio was clipped (TRL's region:
    below 1 - epsilon with a negative advantage, above 1 + epsilon_high with a positive one), and its KL to
    the reference (None without one). ``advantages``: (rows,)."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantages = advantages[:, None]
    loss = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantages)
    clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    kl = None
    if ref_logprobs is not None:
        kl = torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1
        loss = loss + beta * kl
    return loss, clipped, kl


class Reference:
    """The log-probabilities the KL term is measured against (``--beta`` > 0): the base model with the
    adapters off (no second copy), or a snapshot of the trained weights (``--method full``: the initial
    ones; ``--ref_every N``: the policy's every N steps, TRL's ``sync_ref_model`` at mixing 1), copied into
    the model for the reference's forward passes and back."""

    def __init__(self, model: nn.Module, parameters: Dict[str, nn.Parameter], adapters: bool):
        self.model, self.parameters = model, parameters
        self.snapshot = None if adapters else self.copy()

    def copy(self) -> List[torch.Tensor]:
        return [p.detach().clone() for p in self.parameters.values()]

    def update(self) -> None:
        self.snapshot = self.copy()

    def state_dict(self) -> dict:
        """The snapshot (this rank's shards), for ``--resume``."""
        return {"snapshot": None if self.snapshot is None else [local_tensor(t).cpu() for t in self.snapshot]}

    def load_state_dict(self, state: dict) -> None:
        if state["snapshot"] is None:
            self.snapshot = None
            return
        self.snapshot = self.copy()
        for tensor, saved in zip(self.snapshot, state["snapshot"]):
            local_tensor(tensor).copy_(saved)

    @torch.no_grad()
    def logprobs(self, tokens, labels, temperature: float) -> torch.Tensor:
        if self.snapshot is None:
            with adapters_disabled(self.model):
                return self.model.forward_logprobs(tokens, labels, temperature=temperature)
        current = self.copy()
        for parameter, value in zip(self.parameters.values(), self.snapshot):
            parameter.copy_(value)
        try:
            return self.model.forward_logprobs(tokens, labels, temperature=temperature)
        finally:
            for parameter, value in zip(self.parameters.values(), current):
                parameter.copy_(value)


class Batch(NamedTuple):
    """Completions as one forward pass: prompt + completion rows, right-padded; ``labels`` the completion
    tokens (-100 elsewhere); ``old`` the engine's log-probabilities and ``mask`` the learnt tokens, aligned
    with the labels; ``advantages`` (rows,)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    old: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    ref: Optional[torch.Tensor]


def completion_batch(completions: Sequence["Completion"], mask_truncated: bool, device: torch.device) -> Batch:
    length = max(len(c.prompt.tokens) + len(c.tokens) for c in completions)
    shape = (len(completions), length)
    tokens = torch.zeros(shape, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    old = torch.zeros(shape)
    ref = torch.zeros(shape) if any(c.ref_logprobs is not None for c in completions) else None
    for row, c in enumerate(completions):
        start, end = len(c.prompt.tokens), len(c.prompt.tokens) + len(c.tokens)
        tokens[row, :end] = torch.tensor(c.prompt.tokens + c.tokens)
        labels[row, start:end] = torch.tensor(c.tokens)
        old[row, start:end] = torch.tensor(c.logprobs)
        if ref is not None:
            ref[row, start:end] = torch.tensor(c.ref_logprobs)
    mask = labels != IGNORE_INDEX
    if mask_truncated:
        mask &= torch.tensor([not c.truncated for c in completions])[:, None]
    advantages = torch.tensor([c.advantage for c in completions])
    return Batch(*(None if t is None else t.to(device) for t in (tokens, labels, old, mask, advantages, ref)))


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor FSDP2 shards (a ``DTensor``), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def rollout_seed(seed: int, rollout: int, position: int, num_generations: int) -> int:
    """The seed of the prompt at ``position`` in ``rollout``: its row j draws from this + j."""
    return (seed * 1_000_003 + rollout) * (1 << 24) + position * num_generations


class GroupRelative:
    """GRPO's ``Objective`` (``llama.training.loop``): a rollout when a step needs a new one, then the
    clipped loss of the step's completions, in micro-batches of ``micro_batch_size`` completions.

    Args:
        model: the model as wrapped for training; ``engine`` samples on it.
        engine: an ``Engine`` on ``model`` (its pool set up), for rollouts and the greedy evaluation.
        prompts: the training prompts (``read_prompts``).
        rewards: the reward functions.
        settings: GRPO's flags.
        batch_size, micro_batch_size, seed: prompts a step (over all ranks), completions a forward pass,
            the seed of the prompts' order and of the rollouts.
        placement: device, autocast, data-parallel group (``llama.finetune.Placement``).
        reference: the KL term's log-probabilities (``--beta`` > 0), else None.
        rollouts_path: where rank 0 appends each rollout's completions (``rollouts.jsonl``); None: nowhere.
    """

    def __init__(
        self,
        model,
        engine,
        prompts,
        rewards,
        settings,
        batch_size,
        micro_batch_size,
        seed,
        placement,
        reference=None,
        rollouts_path=None,
    ):
        self.model, self.engine, self.prompts, self.rewards, self.settings = model, engine, prompts, rewards, settings
        self.batch_size, self.micro_batch_size, self.seed = batch_size, micro_batch_size, seed
        self.device, self.autocast, self.data_group = placement.device, placement.autocast, placement.data_group
        self.reference, self.rollouts_path = reference, rollouts_path
        self.rank = dist.get_rank(self.data_group) if self.data_group is not None else 0
        self.ranks = dist.get_world_size(self.data_group) if self.data_group is not None else 1
        self.rollout_prompts = settings.rollout_batch_size or batch_size
        self.slices = self.rollout_prompts // batch_size  # steps a rollout's prompts make
        self.rollout: Optional[int] = None  # the rollout in ``completions``
        self.completions: List[List[Completion]] = []  # this rank's, by slice
        self.reward_names = [reward.name for reward in rewards]

    def rollout_of(self, step: int):
        """(the rollout ``step`` trains on, its slice)."""
        span = self.slices * self.settings.iterations_per_rollout
        return step // span, step % span % self.slices

    def losses(self, step: int) -> Iterator[torch.Tensor]:
        started = time.perf_counter()
        rollout, part = self.rollout_of(step)
        self.sampling_seconds = 0.0
        if self.reference is not None and self.settings.ref_every and step and step % self.settings.ref_every == 0:
            self.reference.update()  # --ref_every: the reference becomes the policy
        if self.rollout != rollout:
            self.roll_out(rollout, step)
            self.sampling_seconds = time.perf_counter() - started
        completions = self.step_completions = self.completions[part]
        self.sums = torch.zeros(5, dtype=accumulator_dtype(self.device), device=self.device)
        self.tokens = 0
        for start in range(0, len(completions), self.micro_batch_size):
            batch = completion_batch(
                completions[start : start + self.micro_batch_size], self.settings.mask_truncated, self.device
            )
            with self.autocast:
                logprobs = self.model.forward_logprobs(
                    batch.tokens, batch.labels, temperature=self.settings.temperature
                )
            loss, clipped, kl = clipped_policy_loss(
                logprobs,
                batch.old,
                batch.advantages,
                self.settings.epsilon,
                self.settings.clip_high,
                batch.ref,
                self.settings.beta,
            )
            summed = self.reduce(loss * batch.mask, batch.mask)
            yield summed * self.ranks
            mask = batch.mask
            kl_sum = (kl * mask).sum().detach() if kl is not None else torch.zeros((), device=self.device)
            gap = ((logprobs.detach() - batch.old).abs() * mask).sum()  # the trainer's against the engine's
            self.sums += torch.stack([summed.detach(), (clipped & mask).sum(), mask.sum(), kl_sum, gap]).to(
                self.sums.dtype
            )
            self.tokens += batch.tokens.numel()
        self.training_seconds = time.perf_counter() - started - self.sampling_seconds

    def reduce(self, token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A micro-batch's share of the step's loss, by ``--loss_type`` (TRL's normalisations)."""
        completions = self.batch_size * self.settings.num_generations  # the step's, over every rank
        if self.settings.loss_type == "grpo":
            return (token_losses.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / completions
        if self.settings.loss_type == "dr_grpo":
            return token_losses.sum() / (completions * self.settings.max_new_tokens)
        return token_losses.sum() / self.learnt_per_step

    def roll_out(self, rollout: int, step: int) -> None:
        """Sample, score and weigh this rank's completions of ``rollout``, and say them in ``rollouts.jsonl``."""
        order = step_indices(len(self.prompts), rollout, self.rollout_prompts, self.seed)
        mine = [
            rank_share(range(k * self.batch_size, (k + 1) * self.batch_size), self.rank, self.ranks)
            for k in range(self.slices)
        ]  # positions in the rollout, by slice
        positions = [p for part in mine for p in part]
        completions = self.sample(
            [self.prompts[order[p]] for p in positions],
            [p % self.batch_size for p in positions],
            [rollout_seed(self.seed, rollout, p, self.settings.num_generations) for p in positions],
        )
        self.weigh(completions)
        per_slice = len(mine[0]) * self.settings.num_generations
        self.completions = [completions[i : i + per_slice] for i in range(0, len(completions), per_slice)]
        self.rollout = rollout
        learnt = torch.tensor(
            float(
                sum(
                    completion_batch(c, self.settings.mask_truncated, torch.device("cpu")).mask.sum()
                    for c in self.completions
                )
            ),
            device=self.device,
        )
        self.learnt_per_step = sum_over_ranks(learnt, self.data_group).clamp(min=1) / self.slices
        self.write_rollouts(rollout)

    def sample(self, prompts, groups, seeds, temperature=None) -> List[Completion]:
        """The completions of ``prompts`` on the engine, with the weights as they are now."""
        was_training = self.model.training
        self.model.eval()  # no dropout while sampling
        try:
            with torch.no_grad(), self.autocast, gathered(self.model):
                self.engine.reset_prefix_cache()  # the weights changed since the cached blocks were computed
                return sample(self.engine, prompts, groups, seeds, self.settings, temperature)
        finally:
            self.model.train(was_training)

    def weigh(self, completions: List[Completion]) -> None:
        """Each completion's rewards and advantage, and with --beta its reference's log-probabilities."""
        with fail_together():  # a reward that fails on one rank stops every rank
            totals, by_function = score(self.rewards, *reward_inputs(completions))
        rewards = torch.tensor(totals, dtype=torch.float64)
        batch_std = None
        if self.settings.scale_rewards == "batch":
            moments = torch.tensor([len(totals), rewards.sum(), (rewards**2).sum()], dtype=torch.float64)
            n, total, squares = sum_over_ranks(moments.to(self.device), self.data_group).cpu()
            batch_std = ((squares - total**2 / n) / (n - 1)).clamp(min=0).sqrt()
        advantages = group_advantages(rewards, self.settings.num_generations, self.settings.scale_rewards, batch_std)
        for i, completion in enumerate(completions):
            completion.reward, completion.advantage = totals[i], float(advantages[i])
            completion.rewards = {name: values[i] for name, values in by_function.items()}
        if self.reference is not None:
            for start in range(0, len(completions), self.micro_batch_size):
                part = completions[start : start + self.micro_batch_size]
                batch = completion_batch(part, False, self.device)
                with self.autocast:
                    ref = self.reference.logprobs(batch.tokens, batch.labels, self.settings.temperature).cpu()
                for row, completion in enumerate(part):
                    start_at = len(completion.prompt.tokens)
                    completion.ref_logprobs = ref[row, start_at : start_at + len(completion.tokens)].tolist()

    def write_rollouts(self, rollout: int) -> None:
        """Every rank's completions of the rollout, one line each, by rank 0 (steps numbered as metrics.jsonl's)."""
        first_step = rollout * self.slices * self.settings.iterations_per_rollout + 1
        lines = [rollout_line(c, first_step + part) for part, cs in enumerate(self.completions) for c in cs]
        if self.data_group is not None:
            every_rank = [None] * self.ranks
            dist.all_gather_object(every_rank, lines, group=self.data_group)
            lines = sorted(
                (line for part in every_rank for line in part), key=lambda line: (line["step"], line["group"])
            )
        if self.rank == 0 and self.rollouts_path is not None:
            with open(self.rollouts_path, "a") as file:
                file.writelines(json.dumps(line) + "\n" for line in lines)

    def evaluate(self, prompts: Sequence[Prompt]) -> dict:
        """The mean reward of one greedy completion of each of ``prompts`` (each rank its share)."""
        mine = list(prompts)[self.rank :: self.ranks]
        completions = self.sample(mine, list(range(len(mine))), [0] * len(mine), temperature=0.0)
        with fail_together():
            totals, _ = score(self.rewards, *reward_inputs(completions))
        summed = sum_over_ranks(
            torch.tensor([sum(totals), len(totals)], dtype=torch.float64, device=self.device), self.data_group
        )
        return {"val_reward": (summed[0] / summed[1]).item()}

    def state_dict(self) -> dict:
        """What ``--resume`` needs to go on mid-rollout as if uninterrupted: this rank's rollout, and the reference."""
        completions = [[completion_state(c) for c in part] for part in self.completions]
        return {
            "rollout": self.rollout,
            "completions": completions,
            "learnt_per_step": None if self.rollout is None else float(self.learnt_per_step),
            "reference": None if self.reference is None else self.reference.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.rollout = state["rollout"]
        self.completions = [
            [Completion(**{**c, "prompt": Prompt(*c["prompt"])}) for c in part] for part in state["completions"]
        ]
        if state["learnt_per_step"] is not None:
            self.learnt_per_step = torch.tensor(state["learnt_per_step"], device=self.device)
        if self.reference is not None:
            self.reference.load_state_dict(state["reference"])

    def record(self) -> dict:
        completions = self.step_completions
        rewards = torch.tensor([c.reward for c in completions], dtype=torch.float64)
        group_std = rewards.view(-1, self.settings.num_generations).std(dim=1)
        local = [len(completions), rewards.sum(), group_std.sum(), sum(len(c.tokens) for c in completions), self.tokens]
        local += [sum(c.rewards[name] for c in completions) for name in self.reward_names]
        totals = (
            sum_over_ranks(
                torch.cat([torch.tensor(local, dtype=torch.float64), self.sums.cpu().double()]).to(self.device),
                self.data_group,
            )
            .cpu()
            .tolist()
        )
        n, reward, std, length, tokens = totals[:5]
        by_function = totals[5 : 5 + len(self.reward_names)]
        loss, clipped, learnt, kl, gap = totals[5 + len(self.reward_names) :]
        groups = n / self.settings.num_generations
        record = {"loss": loss, "tokens": int(tokens), "reward": reward / n, "reward_std": std / groups}
        record.update({f"reward_{name}": value / n for name, value in zip(self.reward_names, by_function)})
        record.update(completion_length=length / n, clip_fraction=clipped / max(learnt, 1))
        if self.reference is not None:
            record["kl"] = kl / max(learnt, 1)
        record.update(
            logprob_gap=gap / max(learnt, 1), sampling_s=self.sampling_seconds, training_s=self.training_seconds
        )
        return record


def rollout_line(completion: Completion, step: int) -> dict:
    """A completion as ``rollouts.jsonl`` says it: ``step`` the step that first learns it."""
    return {
        "step": step,
        "group": completion.group,
        "prompt": completion.prompt.prompt,
        "prompt_tokens": completion.prompt.tokens,
        "completion": completion.text,
        "completion_tokens": completion.tokens,
        "logprobs": completion.logprobs,
        "truncated": completion.truncated,
        "reward": completion.reward,
        "rewards": completion.rewards,
        "advantage": completion.advantage,
    }


def completion_state(completion: Completion) -> dict:
    """A completion as plain values (``torch.load(weights_only=True)`` reads them back)."""
    state = dict(vars(completion))
    state["prompt"] = list(completion.prompt)
    return state
