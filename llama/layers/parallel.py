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
one broadcast per step, so that every rank continues with rank 0's sampled token. The layers
use the model-parallel group: the default process group, unless training set another (fully-sharded data
parallelism gives each rank a group of its own, ``set_model_parallel_group``); when none is initialised
(or its size is 1) they are plain ``F.linear`` / ``F.embedding`` and no collective runs.
"""

import math
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llama.layers.quantize import linear


_model_parallel_group = None  # None: the default process group


def set_model_parallel_group(group) -> None:
    """The ranks that split each layer between them from now on (None: every process of the job).
    Data-parallel training gives each rank a group of one: every rank builds and reads the whole model."""
    global _model_parallel_group
    _model_parallel_group = group


def model_parallel_world_size() -> int:
    return dist.get_world_size(_model_parallel_group) if dist.is_initialized() else 1


def model_parallel_rank() -> int:
    return dist.get_rank(_model_parallel_group) if dist.is_initialized() else 0


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


def split_size(total: int, what: str) -> int:
    """The size of this rank's slice of a dimension that must divide evenly over the ranks."""
    world_size = model_parallel_world_size()
    check_world_size({what: total}, world_size)
    return total // world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the ranks (in place)."""
    if model_parallel_world_size() > 1:
        dist.all_reduce(x, group=_model_parallel_group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension, in rank order."""
    world_size = model_parallel_world_size()
    if world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous(), group=_model_parallel_group)
    return torch.cat(parts, dim=-1)


def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Overwrite ``x`` on every rank with rank 0's ``x`` (in place)."""
    if model_parallel_world_size() > 1:
        dist.broadcast(x, src=0)
    return x


def init_weight(weight: nn.Parameter) -> None:
    """N(0, 0.02) until a checkpoint overwrites it. Skipped on the meta device, where the loader builds
    the model: initialising meta tensors would import torch's Python decompositions (~70 MB of RAM)."""
    if not weight.is_meta:
        nn.init.normal_(weight, std=0.02)


class ColumnParallelLinear(nn.Module):
    """``y = x W^T`` with ``W`` (out_features, in_features) split by rows: this rank holds
    ``out_features / world_size`` of them and computes that slice of ``y``."""

    split_dim = 0  # of the weight: the dimension each rank holds a slice of (read by llama.checkpoints.loader)

    def __init__(self, in_features: int, out_features: int, gather_output: bool = False):
        super().__init__()
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(split_size(out_features, "out_features"), in_features))
        self.register_buffer("scales", None, persistent=False)  # set when the weight is int8 (llama.layers.quantize)
        self.onednn = False  # set at load where oneDNN's float32 kernel is measured faster (llama.layers.cpu_kernels)
        init_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.scales, self.onednn)  # (..., out_features / world_size)
        return all_gather_last_dim(y) if self.gather_output else y


class FusedColumnParallelLinear(ColumnParallelLinear):
    """Column-parallel layers reading the same input, stored as one weight: this rank's slice of each
    part, concatenated in order, (sum of the parts' local out_features, in_features). One matmul
    reads the input once and makes one kernel call instead of one a part.

    Checkpoints and state dicts keep the parts apart under their own (Meta's) names, e.g.
    ``attention.wq.weight``: ``state_dict()`` splits the weight, ``load_state_dict`` and the
    checkpoint readers (``llama.checkpoints.placement``) concatenate the parts.
    """

    def __init__(self, in_features: int, parts: Dict[str, int]):
        """``parts``: each part's name, a sibling of this layer in Meta's keys, and its out_features."""
        super().__init__(in_features, sum(parts.values()))
        self.parts = {name: split_size(out_features, name) for name, out_features in parts.items()}  # local sizes
        self.register_state_dict_post_hook(split_parts)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return super().forward(x).split(list(self.parts.values()), dim=-1)  # each (..., part's out_features / world_size)


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

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, split_size(in_features, "in_features")))
        self.register_buffer("scales", None, persistent=False)  # set when the weight is int8 (llama.layers.quantize)
        self.onednn = False  # set at load where oneDNN's float32 kernel is measured faster (llama.layers.cpu_kernels)
        init_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(linear(x, self.weight, self.scales, self.onednn))


class ParallelEmbedding(nn.Module):
    """Token embedding whose ``embedding_dim`` is split over the ranks and gathered."""

    split_dim = 1

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, split_size(embedding_dim, "dim")))
        init_weight(self.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(F.embedding(tokens, self.weight))
