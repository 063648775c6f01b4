"""LoRA: a small trainable product ``B A`` beside a frozen linear, ``y = W x + (alpha / rank) B A x``
(Hu et al., 2021). A starts as torch's default linear init and B at zero, so training starts from the
base model exactly.

The adapters sit beside the layers of ``llama.layers.parallel`` they adapt, which this file does not change:
``LoRALinear`` holds the layer (``base``) and one ``LoRA`` per adapted part. A fused layer (wq, wk, wv
as ``wqkv``; w1, w3 as ``w13``) gets an adapter per part that is a target, added to that part's output.
The parameter names are those ``peft`` writes (``lora_A.weight``, ``lora_B.weight``), and
``llama.checkpoints.peft`` writes them under transformers' module names in peft's files.

Beside a layer split over several ranks (tensor parallelism) the adapter is split as its layer is:
beside a column-parallel layer B holds this rank's rows of the output and A is whole; beside a
row-parallel one A holds this rank's columns of the input, and ``A x`` is summed over the ranks before
B, which is whole. Each rank keeps its slice of the adapter one process would initialise, so that any
number of ranks trains the same adapter.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from llama.layers.parallel import FusedColumnParallelLinear, all_reduce, copy_to_ranks, group_rank, group_size, local

# Meta's name of each linear LoRA can adapt -> the module of a block that computes it, and peft's
# (transformers') name for it
TARGETS = {
    "wq": ("attention.wqkv", "self_attn.q_proj"),
    "wk": ("attention.wqkv", "self_attn.k_proj"),
    "wv": ("attention.wqkv", "self_attn.v_proj"),
    "wo": ("attention.wo", "self_attn.o_proj"),
    "w1": ("feed_forward.w13", "mlp.gate_proj"),
    "w3": ("feed_forward.w13", "mlp.up_proj"),
    "w2": ("feed_forward.w2", "mlp.down_proj"),
}
TARGET_SETS = {"all": tuple(TARGETS), "attention": ("wq", "wk", "wv", "wo")}


def parse_targets(value: str) -> Tuple[str, ...]:
    """``--lora_targets``: "all", "attention", or a comma-separated list of Meta's names (wq, wk, wv,
    wo, w1, w2, w3) or peft's (q_proj, ..., down_proj)."""
    if value in TARGET_SETS:
        return TARGET_SETS[value]
    by_peft_name = {peft.rpartition(".")[2]: meta for meta, (_, peft) in TARGETS.items()}
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in TARGETS and name not in by_peft_name]
    if unknown or not names:
        raise ValueError(
            f"--lora_targets: unknown name(s) {unknown or [value]}; use 'all', 'attention', or a comma-separated "
            f"list of {', '.join(TARGETS)} (or peft's {', '.join(by_peft_name)})"
        )
    chosen = {by_peft_name.get(name, name) for name in names}
    return tuple(name for name in TARGETS if name in chosen)  # in the model's order


@dataclass(frozen=True)
class LoraConfig:
    """How a model is adapted: the ``rank`` of each B A, its scale ``alpha / rank``, the dropout of
    the adapters' input, and the ``targets`` (Meta's names of the linears adapted in every block)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = TARGET_SETS["all"]

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"--lora_rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"--lora_alpha must be positive, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--lora_dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [name for name in self.targets if name not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be some of {list(TARGETS)}, got {list(self.targets)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRA(nn.Module):
    """``scale * B A dropout(x)``: A (rank, in_features), B (out_features, rank), B zero at first.

    ``group``, ``split_dim``: the ranks the adapted layer is split over and the dimension of its weight
    they split (0: its output, B's rows; 1: its input, A's columns); this rank keeps its slice."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: LoraConfig,
        device=None,
        group: Optional[ProcessGroup] = None,
        split_dim: Optional[int] = None,
    ):
        super().__init__()
        self.scale = config.scale
        self.group, self.split_dim = group, split_dim
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.lora_A = nn.Linear(in_features, config.rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(config.rank, out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.zeros_(self.lora_B.weight)
        if group_size(group) > 1:  # initialised whole, as one process does, then sliced
            split = (self.lora_B, self.lora_A)[split_dim]
            split.weight = nn.Parameter(split.weight.chunk(group_size(group), dim=split_dim)[group_rank(group)].clone())
            split.split_dim = split_dim  # read by llama.training.parallelize, as the parallel layers' own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.dropout(x), local(self.lora_A.weight)) * self.scale  # scaled at the rank's width: fewer ops
        h = all_reduce(h, self.group) if self.split_dim == 1 else copy_to_ranks(h, self.group)
        return F.linear(h, local(self.lora_B.weight))


class LoRALinear(nn.Module):
    """A frozen linear of ``llama.layers.parallel`` (``base``) and the adapters of its parts beside it, by
    Meta's part name (a plain linear has one part, its own name)."""

    def __init__(self, base: nn.Module, adapters: Dict[str, LoRA]):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict(adapters)
        self.enabled = True  # off: the base alone (``adapters_disabled``)

    def forward(self, x: torch.Tensor):
        y = self.base(x)
        if not self.enabled:
            return y
        if isinstance(self.base, FusedColumnParallelLinear):  # one output per part: (..., part's out_features) each
            return tuple(
                part + self.adapters[name](x).to(part.dtype) if name in self.adapters else part
                for name, part in zip(self.base.parts, y)
            )
        (adapter,) = self.adapters.values()
        return y + adapter(x).to(y.dtype)


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Freeze every parameter of ``model`` (a ``Transformer``, its layers whole or split over its
    ``group``) and put adapters beside the target linears of every block, on the weights' device;
    returns the model."""
    model.requires_grad_(False)
    device = model.tok_embeddings.weight.device
    ranks = group_size(model.group)
    for block in model.layers:
        for module_name in dict.fromkeys(TARGETS[name][0] for name in config.targets):
            parent_name, _, attribute = module_name.rpartition(".")
            parent = block.get_submodule(parent_name)
            base = getattr(parent, attribute)
            # whole out_features and in_features (an int4 weight's shape is packed)
            fused = isinstance(base, FusedColumnParallelLinear)
            sizes = {name: n * ranks for name, n in base.parts.items()} if fused else {attribute: model.params.dim}
            in_features = model.params.ffn_hidden_dim if attribute == "w2" else model.params.dim
            adapters = {
                name: LoRA(in_features, out, config, device, model.group, base.split_dim)
                for name, out in sizes.items()
                if name in config.targets
            }
            setattr(parent, attribute, LoRALinear(base, adapters))
    return model


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(module, LoRALinear) for module in model.modules())


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` as its base, every adapter off, inside the block: preference tuning's and reinforcement
    learning's reference model, with no second copy of the weights."""
    adapted = [module for module in model.modules() if isinstance(module, LoRALinear)]
    for module in adapted:
        module.enabled = False
    try:
        yield model
    finally:
        for module in adapted:
            module.enabled = True
