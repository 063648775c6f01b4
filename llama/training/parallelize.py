"""How a model is wrapped for training, in one place and in torchtitan's order: adapters first (LoRA,
``llama.layers.lora``), then activation checkpointing, then compilation, then fully-sharded data parallelism
(FSDP2). Each is a small function of the model; the training loop knows none of them.
"""

from typing import Dict, Optional

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

WRAPPER_NAMES = ("._checkpoint_wrapped_module", "._orig_mod")  # what checkpointing and compiling add to names


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Each block's activations are recomputed in the backward pass instead of kept."""
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Each block compiled on its own (all blocks share one graph: the same code and shapes)."""
    for block in model.layers:
        block.compile()


def apply_fsdp(model: nn.Module, param_dtype: Optional[torch.dtype]) -> None:
    """Shard every block's parameters, gradients and optimizer state over the ranks (``fully_shard``),
    then the rest (embedding, norm, output). Blocks compute in ``param_dtype`` (None: the parameters'
    own) and gradients are reduced in float32."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    register_fsdp_forward_method(model, "forward_loss")  # the output weight is whole only inside the root's registered methods


def wrap_for_training(model: nn.Module, activation_checkpointing: bool, compile: bool, fsdp: bool,
                      param_dtype: Optional[torch.dtype]) -> nn.Module:
    """``model`` (adapters already in place) wrapped in torchtitan's order: AC, compile, FSDP."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if fsdp:
        apply_fsdp(model, param_dtype)
    return model


def clean_name(name: str) -> str:
    for wrapper in WRAPPER_NAMES:
        name = name.replace(wrapper, "")
    return name


def trainable_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The parameters that train, by their names in the unwrapped model."""
    return {clean_name(name): p for name, p in model.named_parameters() if p.requires_grad}


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU, gathered from every rank when FSDP shards it (a collective)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()
