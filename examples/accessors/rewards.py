"""Rewards for GRPO on the accessor prompts (docs/post-training.md): each a function of TRL's signature,
``f(prompts, completions, **kwargs) -> list[float]``, the prompts file's other keys arriving as lists."""


def uses_self(prompts, completions, **kwargs):
    """1 for a completion that mentions ``self``: code of a method, as an accessor is."""
    return [1.0 if "self" in c else 0.0 for c in completions]


def names_the_method(prompts, completions, method, **kwargs):
    """1 for a completion that defines the method its prompt names (the line's "method" key)."""
    return [1.0 if c.startswith(f"def {name}(self") else 0.0 for c, name in zip(completions, method)]
