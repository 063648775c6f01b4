"""Many LoRA adapters beside one base model, each row of a batch computing with its own or with none
(S-LoRA's and Punica's batched adapters): ``y = W x + s_i B_i A_i x`` for the adapter i of x's row,
the base product computed once for every row.

Each adapted linear keeps the adapters resident on the device packed side by side on one rank axis of
``capacity`` columns (max_loras x max_lora_rank): adapter i holds columns [start_i, end_i), its own
rank, no padding, with its scale folded into B. A pass multiplies the rows by every resident
adapter's A at once (``h = x A^T``, (rows, seqlen, columns)), keeps each row's own adapter's columns (a
mask, 0 elsewhere: a row of the base keeps none) and adds ``h B^T``: two matmuls over the adapters'
ranks whatever the mix of rows; no loop over adapters, no merge. ``columns``, the mask's width, is a
power-of-two bucket of the packed ranks (``llama.engine.adapters``), so that one compiled graph serves
every mix of rows and only a load that outgrows the bucket compiles another.

A fused layer (wq, wk, wv as ``wqkv``; w1, w3 as ``w13``) multiplies its input by its parts' A in one
matmul, column c of part p at c * parts + p; each part's ``h_p B_p^T`` comes from its own columns, and the
parts' products, side by side as the layer's outputs are, are added to them at once. A and B^T are stored
column first, so that a pass reads the first ``columns`` of each as one matrix.

Which adapter each row of a pass computes with reaches the layers as the KV cache's pool does: through
an object every adapted layer holds (``RowAdapters``), which the engine's runner sets before a pass
(its ``mask``) and clears after it, as it writes the rows' block tables before one. The model's own
file does not change, and a pass the runner did not set up (Meta's ``forward(tokens, start_pos)``,
training, scoring outside the engine) computes the base.

Split over ranks the adapters are split as their layers are (``llama.layers.lora``'s split): beside a
column-parallel layer B holds this rank's rows of the output and A is whole; beside a row-parallel one A
holds this rank's columns of the input, and ``h B^T``, linear in h, is added to this rank's partial
product before the layer's all-reduce: no collective of its own.
"""

from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llama.layers.parallel import (
    ColumnParallelLinear,
    FusedColumnParallelLinear,
    RowParallelLinear,
    all_reduce,
    group_rank,
    group_size,
)

ADAPTED = ("attention.wqkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")  # in every block


class RowAdapters:
    """Which adapter each row of the model's next pass computes with, read by every ``MultiLoRALinear``:
    ``masks[parts]`` (rows, 1, columns * parts) holds 1 on the packed columns of the row's adapter, each
    repeated for a layer of that many parts, and 0 elsewhere; None: the pass computes the base alone (no
    adapter is resident, or no row of the pass has one)."""

    def __init__(self):
        self.masks: Optional[Dict[int, torch.Tensor]] = None

    @contextmanager
    def selected(self, mask: torch.Tensor) -> Iterator[None]:
        """``mask`` (rows, 1, columns) for the passes inside the block, the base after it."""
        self.masks = {parts: mask.repeat_interleave(parts, dim=-1) if parts > 1 else mask for parts in (1, 2, 3)}
        try:
            yield
        finally:
            self.masks = None


class MultiLoRALinear(nn.Module):
    """A linear of ``llama.layers.parallel`` (``base``) with the resident adapters of its parts beside it.

    Args:
        base: the layer: column-parallel (a plain one or a fused one's parts) or row-parallel.
        parts: each part's Meta name and whole out_features (a plain layer: its own name).
        in_features: the whole input's features.
        capacity: the columns of the rank axis (max_loras x max_lora_rank).
        rows: the model's ``RowAdapters``.
        dtype: the activations'.
    """

    def __init__(
        self,
        base: nn.Module,
        parts: Dict[str, int],
        in_features: int,
        capacity: int,
        rows: RowAdapters,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.base, self.rows, self.group = base, rows, base.group
        ranks = group_size(base.group)
        self.row_parallel = isinstance(base, RowParallelLinear)
        self.parts = {name: out if self.row_parallel else out // ranks for name, out in parts.items()}  # local out
        local_in = in_features // ranks if self.row_parallel else in_features
        device = base.weight.device
        n = len(parts)
        out = sum(self.parts.values())
        # A (capacity, parts, local in) and B^T (capacity, local out of all parts, each part's in its outputs)
        self.register_buffer("lora_A", torch.zeros(capacity, n, local_in, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_B", torch.zeros(capacity, out, dtype=dtype, device=device), persistent=False)

    def forward(self, x: torch.Tensor):
        if self.rows.masks is None:
            return self.base(x)
        mask = self.rows.masks[len(self.parts)]  # (bsz, 1, columns * parts)
        columns = mask.shape[-1] // len(self.parts)
        # this rank's product (a row-parallel layer's partial one), (bsz, seqlen, local out of all parts)
        y = self.base.partial(x) if self.row_parallel else ColumnParallelLinear.forward(self.base, x)
        h = F.linear(x, self.lora_A[:columns].flatten(0, 1)) * mask  # every resident adapter's, the row's own kept
        h = h.view(*h.shape[:-1], columns, len(self.parts))  # (bsz, seqlen, columns, parts)
        deltas, first = [], 0
        for p, out in enumerate(self.parts.values()):  # each part's outputs from its own columns
            deltas.append(torch.matmul(h[..., p], self.lora_B[:columns, first : first + out]))
            first += out
        y = y + (torch.cat(deltas, dim=-1) if len(deltas) > 1 else deltas[0])
        if self.row_parallel:  # the adapters' term joined this rank's partial product before the sum over ranks
            return all_reduce(y, self.group)
        return self.base.split(y) if isinstance(self.base, FusedColumnParallelLinear) else y

    def write(self, start: int, rank: int, pairs: Dict[str, Tuple[torch.Tensor, torch.Tensor]], scale: float) -> None:
        """An adapter into columns [start, start + rank): ``pairs``, each part's whole (A (rank, in), B (out, rank))
        in Meta's row order, of which this rank keeps its slice; a part the adapter leaves alone gets zeros."""
        rank_index, ranks = group_rank(self.group), group_size(self.group)
        self.clear(start, start + rank)
        first = 0  # the part's first output
        for p, (name, out) in enumerate(self.parts.items()):
            if name in pairs:
                lora_a, lora_b = pairs[name]
                if self.row_parallel:
                    lora_a = lora_a.chunk(ranks, dim=1)[rank_index]
                else:
                    lora_b = lora_b.chunk(ranks, dim=0)[rank_index]
                self.lora_A[start : start + rank, p] = lora_a.to(self.lora_A.dtype)
                self.lora_B[start : start + rank, first : first + out] = (lora_b.float() * scale).T.to(
                    self.lora_B.dtype
                )
            first += out

    def clear(self, start: int, end: int) -> None:
        """Zeros in columns [start, end)."""
        self.lora_A[start:end] = 0
        self.lora_B[start:end] = 0


def apply_multi_lora(model: nn.Module, capacity: int) -> Tuple[RowAdapters, Dict[str, MultiLoRALinear]]:
    """Put a ``MultiLoRALinear`` of ``capacity`` columns, empty, beside every linear LoRA can adapt in every
    block of ``model`` (a ``Transformer``, loaded: the layers' names change); returns the model's
    ``RowAdapters`` and the adapted layers by their names (``layers.0.attention.wqkv``)."""
    rows, layers = RowAdapters(), {}
    params, dtype = model.params, model.tok_embeddings.weight.dtype
    for i, block in enumerate(model.layers):
        for name in ADAPTED:
            parent_name, _, attribute = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            base = getattr(parent, attribute)
            if isinstance(base, FusedColumnParallelLinear):
                parts = {part: out * group_size(base.group) for part, out in base.parts.items()}
            else:
                parts = {attribute: params.dim}
            wide_inputs = {"w2": params.ffn_hidden_dim, "wo": params.n_heads * params.head_dim}
            in_features = wide_inputs.get(attribute, params.dim)
            layer = MultiLoRALinear(base, parts, in_features, capacity, rows, dtype)
            setattr(parent, attribute, layer)
            layers[f"layers.{i}.{name}"] = layer
    return rows, layers
