"""Reinforcement learning's rewards: the user's Python functions that score sampled completions.

A reward function has TRL's signature::

    def f(prompts, completions, **kwargs) -> list[float]

``prompts`` and ``completions`` are lists of the same length, one entry per completion (a prompt repeated
for each of its completions): the text, or for a chat the messages and the reply as a one-message list
``[{"role": "assistant", "content": ...}]``. ``kwargs`` holds ``completion_ids`` (each completion's
token ids) and every other key of the data's lines, as lists of the same length. ``--reward
FILE.py:NAME`` (or ``package.module:NAME``) names one; several add up, weighted by ``--reward_weights``.

A reward that raises, returns another count than the completions', or a value that is not a finite
number stops the run with one line naming the function: ``RewardError``.
"""

import importlib
import importlib.util
import inspect
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple


class RewardError(ValueError):
    """A reward function failed; the message names it and says how."""


@dataclass(frozen=True)
class Reward:
    name: str  # the function's name, as the metrics call it
    source: str  # where it was found: the --reward value
    function: Callable
    weight: float


def load_function(spec: str) -> Callable:
    """``FILE.py:NAME`` or ``module:NAME`` -> the function NAME defined there."""
    location, colon, name = spec.rpartition(":")
    if not colon or not location or not name:
        raise ValueError(f"--reward {spec!r}: expected FILE.py:FUNCTION or module:FUNCTION")
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise FileNotFoundError(f"--reward {spec!r}: {location} not found")
        module_spec = importlib.util.spec_from_file_location(f"reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise ValueError(f"--reward {spec!r}: cannot import {location}: {error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--reward {spec!r}: {location} defines no function {name}")
    return function


def load_rewards(specs: Sequence[str], weights: Optional[Sequence[float]]) -> List[Reward]:
    """The ``--reward`` functions, with their ``--reward_weights`` (default: 1 each)."""
    if not specs:
        raise ValueError("--objective grpo needs at least one --reward FILE.py:FUNCTION")
    if weights is not None and len(weights) != len(specs):
        raise ValueError(f"--reward_weights gives {len(weights)} weight(s) for {len(specs)} --reward function(s)")
    rewards = []
    for spec, weight in zip(specs, weights or [1.0] * len(specs)):
        function = load_function(spec)
        rewards.append(Reward(spec.rpartition(":")[2], spec, function, float(weight)))
    names = [reward.name for reward in rewards]
    if len(set(names)) < len(names):
        raise ValueError(f"--reward: two functions have the same name ({names}): the metrics name them apart")
    return rewards


def call_reward(reward: Reward, prompts: list, completions: list, keywords: Dict[str, list]) -> List[float]:
    """One function's reward for each completion, checked."""
    try:
        values = reward.function(prompts=prompts, completions=completions, **keywords)
    except Exception as error:  # the user's code: any failure is its
        where = inspect.trace()[-1]
        raise RewardError(
            f"reward {reward.name} ({reward.source}) raised {type(error).__name__}: {error} "
            f"(at {Path(where.filename).name}, line {where.lineno})"
        ) from error
    if not isinstance(values, (list, tuple)) or len(values) != len(completions):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
        raise RewardError(
            f"reward {reward.name} ({reward.source}) returned {got} for {len(completions)} completions: "
            "it must return a list of one number per completion"
        )
    for i, value in enumerate(values):
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(
                f"reward {reward.name} ({reward.source}) returned {value!r} for completion {i}: "
                "each reward must be a finite number"
            )
    return [float(value) for value in values]


def score(
    rewards: Sequence[Reward], prompts: list, completions: list, keywords: Dict[str, list]
) -> Tuple[List[float], Dict[str, List[float]]]:
    """Each completion's total reward (the weighted sum), and each function's rewards by its name."""
    by_function = {reward.name: call_reward(reward, prompts, completions, keywords) for reward in rewards}
    totals = [sum(reward.weight * by_function[reward.name][i] for reward in rewards) for i in range(len(completions))]
    return totals, by_function
