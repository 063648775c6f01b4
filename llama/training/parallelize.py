"""How a model is wrapped for training, in one place and in torchtitan's order: adapters first (LoRA,
``llama.layers.lora``), then tensor parallelism, activation checkpointing, compilation, and fully-sharded
data parallelism (FSDP2). Each is a small function of the model; the training loop knows none of them.

The processes of a job form a 2-D device mesh ("dp", "tp"): the ranks of a "tp" row split each layer
between them (the model is built and loaded with that row's group, ``llama.layers.parallel``), and the
rows shard what each holds with FSDP2 over "dp", each row training on its own share of the examples.
"""

from contextlib import contextmanager
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, Shard

WRAPPER_NAMES = ("._checkpoint_wrapped_module", "._orig_mod")  # what checkpointing and compiling add to names


def training_mesh(device: torch.device, tensor_parallel: int) -> Optional[DeviceMesh]:
    """The job's processes as a ("dp", "tp") mesh of ``tensor_parallel`` ranks a row; None for one process."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"--tensor_parallel must be a positive integer, got {tensor_parallel!r}")
    if world_size % tensor_parallel:
        raise ValueError(f"--tensor_parallel {tensor_parallel} must divide the {world_size} process(es) of the job")
    if world_size == 1:
        return None
    return init_device_mesh(device.type, (world_size // tensor_parallel, tensor_parallel), mesh_dim_names=("dp", "tp"))


def tensor_parallel_group(mesh: Optional[DeviceMesh]) -> Optional[ProcessGroup]:
    """The ranks that split each layer of the model: the mesh's "tp" row; None where layers are whole."""
    return mesh["tp"].get_group() if mesh is not None and mesh["tp"].size() > 1 else None


def data_parallel_group(mesh: Optional[DeviceMesh]) -> Optional[ProcessGroup]:
    """The ranks that train on different examples: the mesh's "dp" column; None for one process."""
    return mesh["dp"].get_group() if mesh is not None else None


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Each trainable weight that a layer holds a slice of (its ``split_dim``: the parallel layers', an
    adapter's split half) becomes a ``DTensor`` of the mesh, sharded on that dimension: the optimizer,
    FSDP2, the gradient's norm and the saved state then see whole tensors, split over the ranks."""
    for module in model.modules():
        weight, dim = getattr(module, "weight", None), getattr(module, "split_dim", None)
        if dim is not None and isinstance(weight, nn.Parameter) and weight.requires_grad:
            module.weight = nn.Parameter(DTensor.from_local(weight.detach(), tp_mesh, [Shard(dim)], run_check=False))


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Each block's activations are recomputed in the backward pass instead of kept."""
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Each block compiled on its own (all blocks share one graph: the same code and shapes)."""
    for block in model.layers:
        block.compile()


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: Optional[torch.dtype]) -> None:
    """Shard every block's parameters, gradients and optimizer state over the ranks of ``dp_mesh``
    (``fully_shard``), then the rest (embedding, norm, output). Blocks compute in ``param_dtype`` (None:
    the parameters' own) and gradients are reduced in float32."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)
    for method in ("forward_loss", "forward_logprobs"):  # the output weight is whole only inside registered methods
        register_fsdp_forward_method(model, method)


def wrap_for_training(
    model: nn.Module,
    activation_checkpointing: bool,
    compile: bool,
    mesh: Optional[DeviceMesh],
    param_dtype: Optional[torch.dtype],
) -> nn.Module:
    """``model`` (adapters already in place, its layers split over ``mesh``'s "tp" rows) wrapped in
    torchtitan's order: TP, AC, compile, FSDP (over ``mesh``'s "dp" columns; None: one process)."""
    if tensor_parallel_group(mesh) is not None:
        apply_tensor_parallel(model, mesh["tp"])
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if mesh is not None:
        apply_fsdp(model, mesh["dp"], param_dtype)
    return model


def clean_name(name: str) -> str:
    for wrapper in WRAPPER_NAMES:
        name = name.replace(wrapper, "")
    return name


def trainable_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The parameters that train, by their names in the unwrapped model."""
    return {clean_name(name): p for name, p in model.named_parameters() if p.requires_grad}


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU, gathered from every rank when FSDP or tensor parallelism splits it
    (a collective)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu()


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every parameter FSDP2 shards is whole on each rank, and the forward passes keep it
    so: the engine then samples on the weights being trained with no collective per step, each rank taking
    as many steps as its own rows need. On leaving, the shards are all that is kept. One process: nothing."""
    sharded = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in sharded:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield model
    finally:
        for module in sharded:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)  # the root keeps its own whole
