"""Model-parallel layers on plain torch.distributed: every collective the model uses is in this file.

Tensor parallelism (Megatron-style, the layout of Meta's published shards):

- ``ColumnParallelLinear`` splits the weight on its *output* dimension: each rank computes a slice of
  the output features (wq, wk, wv, w1, w3 each give this rank its own heads / hidden units).
  ``FusedColumnParallelLinear`` holds several of them that read the same input as one weight (wq, wk,
  wv; w1, w3): this rank's slice of each, concatenated, so one matmul computes them all.
- ``RowParallelLinear`` splits the weight on its *input* dimension: each rank multiplies its slice
  of the features and the partial sums are all-reduced (wo, w2 close the column-parallel blocks).
- ``ParallelEmbedding`` splits the embedding dimension and all-gathers it.
- The output projection is a column-parallel linear over the vocabulary, gathered.

So one attention block and one feed-forward block each cost exactly one all-reduce; generation adds
one broadcast per step, so that every rank continues with rank 0's sampled token. Each layer is given
the group of ranks that split it (a ``torch.distributed`` process group: the job's under torchrun, the
tensor-parallel dimension of a training mesh); with None, or a group of one, they are plain
``F.linear`` / ``F.embedding`` and no collective runs.

Training differentiates through the collectives as Megatron-LM does: the sum of a row-parallel layer
passes its gradient through unchanged, the input of a column-parallel layer (whole on every rank) sums
its gradient over the ranks, and a gather hands each rank its slice of the gradient back. A parameter
that training lays out on a device mesh (``llama.training.parallelize``) is a ``DTensor``; the layers
compute with this rank's slice of it (``local``).
"""

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from llama.layers.quantize import linear


def group_size(group: Optional[ProcessGroup]) -> int:
    """The number of ranks that split a layer (1 for None: the layer is whole)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    """This process's rank within ``group`` (0 for None)."""
    return 0 if group is None else dist.get_rank(group)


def world_sizes_dividing(sizes: Dict[str, int]) -> List[int]:
    """Every world size that divides all of ``sizes`` evenly."""
    common = math.gcd(*sizes.values())
    return [n for n in range(1, common + 1) if common % n == 0]


def check_world_size(sizes: Dict[str, int], world_size: int) -> None:
    """Each of ``sizes`` (name: size of a dimension split over the ranks) must divide evenly over
    ``world_size`` ranks; the error names those that do not and the world sizes that would work."""
    bad = [f"{name} = {size}" for name, size in sizes.items() if size % world_size]
    if bad:
        works = ", ".join(map(str, world_sizes_dividing(sizes)))
        raise ValueError(
            f"cannot split the model over {world_size} model-parallel ranks or shards: {', '.join(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not divisible by {world_size}; a world size or shard count "
            f"dividing {', '.join(sizes)} would work: {works}"
        )


def split_size(total: int, what: str, group: Optional[ProcessGroup]) -> int:
    """The size of this rank's slice of a dimension that must divide evenly over ``group``'s ranks."""
    world_size = group_size(group)
    check_world_size({what: total}, world_size)
    return total // world_size


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a parameter that training laid out on a device mesh (a ``DTensor``); any
    other tensor as it is. (``torch.distributed.tensor`` is imported only where there can be one: it
    takes a second to import.)"""
    if type(tensor) in (torch.Tensor, nn.Parameter):
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def needs_gradient(x: torch.Tensor, group: Optional[ProcessGroup]) -> bool:
    return group_size(group) > 1 and torch.is_grad_enabled() and x.requires_grad


class SumOverRanks(torch.autograd.Function):
    """Forward: the sum of every rank's ``x``; backward: the gradient as it is (each rank's partial
    product contributed to the sum once)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class CopyToRanks(torch.autograd.Function):
    """Forward: ``x`` as it is (every rank holds it whole); backward: the sum of the ranks' gradients,
    each of which is that of this rank's slice of the layer's output."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GatherLastDim(torch.autograd.Function):
    """Forward: every rank's ``x`` concatenated along the last dimension, in rank order; backward:
    this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.chunk(group_size(ctx.group), dim=-1)[group_rank(ctx.group)].contiguous(), None


def all_reduce(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Sum ``x`` over ``group``'s ranks (in place, unless a gradient flows through it)."""
    if needs_gradient(x, group):
        return SumOverRanks.apply(x, group)
    if group_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def copy_to_ranks(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """``x``, whole on every rank, as the input of a layer split over ``group``: its gradient is summed
    over the ranks."""
    return CopyToRanks.apply(x, group) if needs_gradient(x, group) else x


def all_gather_last_dim(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension, in rank order."""
    if needs_gradient(x, group):
        return GatherLastDim.apply(x, group)
    world_size = group_size(group)
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def broadcast_from_rank0(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Overwrite ``x`` on every rank of ``group`` with its rank 0's ``x`` (in place)."""
    if group_size(group) > 1:
        dist.broadcast(x, src=dist.get_global_rank(group, 0), group=group)
    return x


def init_weight(weight: nn.Parameter) -> None:
    """N(0, 0.02) until a checkpoint overwrites it. Skipped on the meta device, where the loader builds
    the model: initialising meta tensors would import torch's Python decompositions (~70 MB of RAM)."""
    if not weight.is_meta:
        nn.init.normal_(weight, std=0.02)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T`` with ``W`` (out_features, in_features) split by rows: this rank holds
    ``out_features / world_size`` of them and computes that slice of ``y``; ``gather_output``: every
    rank gets the whole ``y``."""

    split_dim = 0  # of the weight: the dimension each rank holds a slice of (read by llama.checkpoints.loader)

    def __init__(
        self, in_features: int, out_features: int, group: Optional[ProcessGroup] = None, gather_output: bool = False
    ):
        super().__init__()
        self.group = group  # the ranks that split the weight; None: whole here
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(split_size(out_features, "out_features", group), in_features))
        self.register_buffer("scales", None, persistent=False)  # set when the weight is int8 (llama.layers.quantize)
        self.onednn = False  # set at load where oneDNN's float32 kernel is measured faster (llama.layers.cpu_kernels)
        init_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_ranks(x, self.group)
        y = linear(x, local(self.weight), self.scales, self.onednn)  # (..., out_features / world_size)
        return all_gather_last_dim(y, self.group) if self.gather_output else y


class FusedColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel layers reading the same input, stored as one weight: this rank's slice of each
    part, concatenated in order, (sum of the parts' local out_features, in_features). One matmul
    reads the input once and makes one kernel call instead of one a part.

    Checkpoints and state dicts keep the parts apart under their own (Meta's) names, e.g.
    ``attention.wq.weight``: ``state_dict()`` splits the weight, ``load_state_dict`` and the
    checkpoint readers (``llama.checkpoints.placement``) concatenate the parts.
    """

    def __init__(self, in_features: int, parts: Dict[str, int], group: Optional[ProcessGroup] = None):
        """``parts``: each part's name, a sibling of this layer in Meta's keys, and its out_features."""
        super().__init__(in_features, sum(parts.values()), group)
        self.parts = {name: split_size(size, name, group) for name, size in parts.items()}  # local out_features
        self.register_state_dict_post_hook(split_parts)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return self.split(super().forward(x))

    def split(self, y: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """The parts of the layer's output (..., local out_features): each (..., part's out_features / world_size)."""
        return y.split(list(self.parts.values()), dim=-1)


def part_keys(layer_key: str, layer: FusedColumnParallelLinear) -> List[str]:
    """The state-dict keys of ``layer``'s parts: ``layers.0.attention.wqkv.weight`` ->
    ``layers.0.attention.wq.weight``, ``...wk.weight``, ``...wv.weight``."""
    parent, _, _ = layer_key.rpartition(".")[0].rpartition(".")
    return [f"{parent}.{name}.weight".lstrip(".") for name in layer.parts]


def split_parts(layer: FusedColumnParallelLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict hook: this rank's weight under its parts' own keys."""
    weight = state_dict.pop(prefix + "weight")
    state_dict.update(zip(part_keys(prefix + "weight", layer), weight.split(list(layer.parts.values()))))


def fused_layers(model: nn.Module) -> Dict[str, Tuple[str, FusedColumnParallelLinear]]:
    """Each part's module name in Meta's keys (``layers.0.attention.wq``) -> (the fused layer's
    weight key, the layer)."""
    found = {}
    for name, layer in model.named_modules():
        if isinstance(layer, FusedColumnParallelLinear):
            for key in part_keys(f"{name}.weight", layer):
                found[key.rpartition(".")[0]] = (f"{name}.weight", layer)
    return found


def fuse_parts(model: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook of a model: the parts of each fused layer, under their own keys,
    concatenated into its weight (registered on the model, so that it runs before any of its
    layers checks its keys)."""
    for layer_key, layer in dict(fused_layers(model).values()).items():
        keys = [prefix + key for key in part_keys(layer_key, layer)]
        if all(key in state_dict for key in keys):
            state_dict[prefix + layer_key] = torch.cat([state_dict.pop(key) for key in keys])


class RowParallelLinear(nn.Module):
    """``y = x W^T`` with ``W`` (out_features, in_features) split by columns: this rank takes its
    slice of ``x``'s features (the output of a column-parallel layer) and the partial products are
    summed over ranks."""

    split_dim = 1

    def __init__(self, in_features: int, out_features: int, group: Optional[ProcessGroup] = None):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(out_features, split_size(in_features, "in_features", group)))
        self.register_buffer("scales", None, persistent=False)  # set when the weight is int8 (llama.layers.quantize)
        self.onednn = False  # set at load where oneDNN's float32 kernel is measured faster (llama.layers.cpu_kernels)
        init_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.partial(x), self.group)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's term of the sum over ranks: its slice of the input times its columns of the weight."""
        return linear(x, local(self.weight), self.scales, self.onednn)


class ParallelEmbedding(nn.Module):
    """Token embedding whose ``embedding_dim`` is split over the ranks and gathered."""

    split_dim = 1

    def __init__(self, num_embeddings: int, embedding_dim: int, group: Optional[ProcessGroup] = None):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(torch.empty(num_embeddings, split_size(embedding_dim, "dim", group)))
        init_weight(self.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(F.embedding(tokens, local(self.weight)), self.group)
