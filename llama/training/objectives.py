"""How each objective of ``python -m llama.finetune`` is built from its flags: supervised fine-tuning
(``llama.training.loop.Supervised``), preference tuning (``llama.training.dpo``) and reinforcement learning
(``llama.training.grpo``). Each has a reader of its data (``READERS``: path, tokenizer, chat format, max_seq_len
-> items) and a builder (``OBJECTIVES``: flags, model, inputs, placement -> the ``Objective`` and its
validation, or None), and declares and checks its own flags here; the command knows none of them."""

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from llama.chat.format import ChatFormat
from llama.engine.engine import Engine
from llama.layers.parallel import group_rank, group_size
from llama.model import ModelArgs
from llama.options import EngineOptions
from llama.tokenizer import Tokenizer
from llama.training.data import evaluation_batches, micro_batches, rank_share, read_examples, step_indices
from llama.training.dpo import Preference, base_reference, evaluate_pairs, precomputed_reference, read_pairs
from llama.training.grpo import (
    LOSS_TYPES,
    ROLLOUTS_FILE,
    SCALE_REWARDS,
    GroupRelative,
    GRPOSettings,
    Reference,
    read_prompts,
)
from llama.training.loop import Supervised, evaluate
from llama.training.parallelize import trainable_parameters
from llama.training.rewards import load_rewards

DEFAULT_BETA = {"dpo": 0.1, "grpo": 0.0}  # --beta of the objectives that take it
GRPO_FLAGS = [field.name for field in dataclasses.fields(GRPOSettings)]
MAX_ROLLOUT_SLOTS = 64  # rows a rank's engine decodes at once; more wait for a free slot


class Inputs(NamedTuple):
    """What a run reads before loading the model."""

    tokenizer_path: str
    tokenizer: Tokenizer
    chat_format: ChatFormat
    args: ModelArgs
    examples: list  # the objective's: supervised examples, preference pairs, prompts
    val_examples: list


class Placement(NamedTuple):
    """Where a run's forward passes compute: the device, the autocast context, the data-parallel ranks; and
    ``frozen_copy()``, the checkpoint loaded and wrapped again as the policy was (a full fine-tuning's reference)."""

    device: torch.device
    autocast: Any
    data_group: Optional[dist.ProcessGroup]
    frozen_copy: Callable[[], nn.Module]


def check_objective_options(options: argparse.Namespace) -> None:
    """The flags of one objective given to another, and --beta (resolved to the objective's default)."""
    if options.pack and options.objective != "sft":
        raise ValueError(f"--pack packs supervised examples: --objective {options.objective} does not take it")
    if options.precompute_ref and options.objective != "dpo":
        raise ValueError(f"--precompute_ref is DPO's reference: --objective {options.objective} does not take it")
    if options.beta is not None and options.objective not in DEFAULT_BETA:
        raise ValueError(f"--beta weighs a reference model: --objective {options.objective} does not take it")
    if options.beta is None:
        options.beta = DEFAULT_BETA.get(options.objective)
    if options.objective == "dpo" and not options.beta > 0:
        raise ValueError(f"--beta must be positive for dpo (the pull toward the reference model), got {options.beta}")


def objective_settings(options: argparse.Namespace) -> dict:
    """The objective's flags a resumed run must share with the run it continues."""
    if options.objective == "grpo":
        return {**{name: getattr(options, name) for name in GRPO_FLAGS}, "reward": options.reward}
    if options.objective == "dpo":
        return {"beta": options.beta, "precompute_ref": options.precompute_ref}
    return {}


def check_grpo(options: argparse.Namespace, world_size: int) -> None:
    """GRPO's flags, its reward functions loaded (``options.grpo``, ``options.rewards``), and its batch sizes:
    ``--batch_size`` prompts a step, each rank sampling its share, ``--micro_batch_size`` completions a pass."""
    if options.tensor_parallel != 1:
        raise ValueError("--objective grpo samples on each rank's whole model: --tensor_parallel is not supported")
    if options.compile_rollouts and world_size > 1:
        raise ValueError(
            "--compile_rollouts runs on one process only: under torchrun the weights a rollout gathers are "
            "allocated anew each time, and a compiled step (CUDA graphs) keeps the addresses it first read"
        )
    flags = {name: getattr(options, name) for name in GRPO_FLAGS}
    options.grpo = GRPOSettings(**flags)
    options.rewards = load_rewards(options.reward, options.reward_weights)
    rollout = options.grpo.rollout_batch_size or options.batch_size
    if rollout % options.batch_size:
        raise ValueError(f"--rollout_batch_size {rollout} must be a multiple of --batch_size {options.batch_size}")
    if options.batch_size % world_size:
        raise ValueError(f"--batch_size {options.batch_size} prompts must be divisible by the {world_size} rank(s)")
    completions = options.batch_size // world_size * options.grpo.num_generations  # a rank's, a step
    options.micro_batch_size = options.micro_batch_size or completions
    if completions % options.micro_batch_size:
        raise ValueError(
            f"--micro_batch_size {options.micro_batch_size} must divide each rank's {completions} completions a step "
            f"(--batch_size {options.batch_size} / {world_size} rank(s) x --num_generations)"
        )


def supervised(options: argparse.Namespace, model: torch.nn.Module, inputs: Inputs, placement: Placement):
    """Supervised fine-tuning's objective, and its validation (loss and perplexity) where there is one."""
    device, autocast, data_group = placement.device, placement.autocast, placement.data_group
    step_batches, val_batches = batches(
        options, inputs.examples, inputs.val_examples, group_rank(data_group), group_size(data_group)
    )
    evaluate_at = (lambda: evaluate(model, val_batches, device, autocast, data_group)) if inputs.val_examples else None
    return Supervised(model, step_batches, device, autocast, data_group), evaluate_at


def batches(options: argparse.Namespace, examples: list, val_examples: list, data_rank: int, data_ranks: int):
    """This rank's micro-batches of a step (a function of the step) and of the validation examples."""

    def step_batches(step: int):
        indices = rank_share(step_indices(len(examples), step, options.batch_size, options.seed), data_rank, data_ranks)
        return micro_batches(
            [examples[i] for i in indices], options.micro_batch_size, options.pack, options.max_seq_len
        )

    val_batches = evaluation_batches(
        val_examples, options.micro_batch_size, options.pack, options.max_seq_len, data_rank, data_ranks
    )
    return step_batches, val_batches


def preference(options: argparse.Namespace, model: torch.nn.Module, inputs: Inputs, placement: Placement):
    """DPO's objective (``llama.training.dpo``), and its validation (loss and reward accuracy) where there is one."""
    device, autocast, data_group = placement.device, placement.autocast, placement.data_group
    pairs, val_pairs, micro = inputs.examples, inputs.val_examples, options.micro_batch_size
    reference = val_reference = base_reference(reference_model(options, model, inputs, placement), device, autocast)
    if options.precompute_ref:  # the model before its first step is the reference
        reference = precomputed_reference(val_reference, pairs, micro, device, data_group)
        if val_pairs:
            val_reference = precomputed_reference(val_reference, val_pairs, micro, device, data_group)

    def step_pairs(step: int):
        indices = step_indices(len(pairs), step, options.batch_size, options.seed)
        return rank_share(indices, group_rank(data_group), group_size(data_group))

    def evaluate_at():
        return evaluate_pairs(model, val_pairs, val_reference, options.beta, micro, device, autocast, data_group)

    objective = Preference(model, pairs, step_pairs, micro, options.beta, reference, device, autocast, data_group)
    return objective, evaluate_at if val_pairs else None


def reference_model(options: argparse.Namespace, model: torch.nn.Module, inputs: Inputs, placement: Placement):
    """The model whose log-probabilities are DPO's reference: the policy itself, its adapters off for LoRA and
    QLoRA or before its first step with --precompute_ref; for full fine-tuning otherwise a frozen copy of the
    checkpoint, loaded and wrapped as the policy is."""
    if options.method != "full" or options.precompute_ref:
        return model
    return placement.frozen_copy().requires_grad_(False).eval()


def group_relative(options: argparse.Namespace, model: torch.nn.Module, inputs: Inputs, placement: Placement):
    """GRPO's objective, sampling on an engine over the model being trained, and its validation (the mean
    reward of greedy completions of the validation prompts)."""
    settings, ranks = options.grpo, group_size(placement.data_group)
    rows = (settings.rollout_batch_size or options.batch_size) // ranks * settings.num_generations
    engine_options = EngineOptions(
        min(rows, MAX_ROLLOUT_SLOTS), options.max_seq_len, compile=options.compile_rollouts, prefix_cache=True
    )
    engine = Engine(model, inputs.tokenizer, engine_options)
    reference = None
    if settings.beta > 0:
        reference = Reference(model, trainable_parameters(model), adapters=options.method != "full")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    objective = GroupRelative(
        model,
        engine,
        inputs.examples,
        options.rewards,
        settings,
        options.batch_size,
        options.micro_batch_size,
        options.seed,
        placement,
        reference,
        Path(options.out) / ROLLOUTS_FILE if rank0 else None,
    )
    evaluate_at = (lambda: objective.evaluate(inputs.val_examples)) if inputs.val_examples else None
    return objective, evaluate_at


READERS = {"sft": read_examples, "dpo": read_pairs, "grpo": read_prompts}
OBJECTIVES = {"sft": supervised, "dpo": preference, "grpo": group_relative}


def add_objective_flags(p: argparse.ArgumentParser) -> None:
    """What post-training's objectives weigh, beside the method's."""
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="how far the policy may move from the reference model: dpo's beta (default 0.1); grpo's KL "
        "term's weight (default 0: no reference)",
    )
    p.add_argument(
        "--precompute_ref",
        action="store_true",
        help="dpo: compute the reference's log-probabilities of every pair once, before the first step "
        "(for full fine-tuning: no frozen copy of the model)",
    )


def add_grpo_flags(p: argparse.ArgumentParser) -> None:
    """--objective grpo: the rewards, the sampling, the loss (TRL's GRPOConfig's names and defaults)."""
    g = p.add_argument_group("grpo")
    g.add_argument(
        "--reward",
        action="append",
        default=[],
        help="a reward function, FILE.py:NAME or module:NAME; give several to add them up",
    )
    g.add_argument("--reward_weights", type=float, nargs="+", default=None, help="one weight per --reward; default 1")
    g.add_argument("--num_generations", type=int, default=8, help="completions sampled per prompt (a group)")
    g.add_argument("--max_new_tokens", type=int, default=256, help="the longest completion, in tokens")
    g.add_argument("--temperature", type=float, default=1.0, help="the sampling temperature, and the policy's")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling of the rollouts")
    g.add_argument("--epsilon", type=float, default=0.2, help="the ratio is clipped below 1 - epsilon")
    g.add_argument("--epsilon_high", type=float, default=None, help="... and above 1 + epsilon_high; default epsilon")
    g.add_argument("--ref_every", type=int, default=0, help="steps between the reference becoming the policy; 0 never")
    g.add_argument(
        "--scale_rewards",
        default="group",
        choices=SCALE_REWARDS,
        help="advantages divided by the group's reward std, the rollout's, or none",
    )
    g.add_argument(
        "--loss_type",
        default="dapo",
        choices=LOSS_TYPES,
        help="the loss's normalisation: by the "
        "tokens (dapo), per completion (grpo), by completions x max_new_tokens (dr_grpo)",
    )
    g.add_argument("--iterations_per_rollout", type=int, default=1, help="steps taken on each rollout's completions")
    g.add_argument(
        "--rollout_batch_size",
        type=int,
        default=None,
        help="prompts sampled per rollout, a multiple of --batch_size; default --batch_size",
    )
    g.add_argument("--mask_truncated", action="store_true", help="completions without an end token are not learnt")
    g.add_argument("--compile_rollouts", action="store_true", help="compile the engine's decode step")
