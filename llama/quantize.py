"""Int8 weight-only quantization (the scheme of gpt-fast's ``WeightOnlyInt8Linear``).

Decoding one token reads every weight once and does two flops per weight, so its speed is the
memory bandwidth divided by the bytes of the weights. Storing each linear weight as int8 with one
scale per output row (``W ~= q * scales[:, None]``) reads a quarter of float32's bytes and half of
bfloat16's; activations, norms, the embedding and the KV cache keep the model's dtype. The matmul
dequantizes on the fly inside torch's ``_weight_int8pack_mm`` kernel (fast for bfloat16 inputs).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def linear(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor]) -> torch.Tensor:
    """``x W^T`` for a float ``weight``, or for an int8 ``weight`` with one scale per output row."""
    if scales is None:
        return F.linear(x, weight)
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), weight, scales)  # (tokens, out)
    return y.view(*x.shape[:-1], weight.shape[0])


def quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: q in [-127, 127] (out, in) and float32 scales (out,)."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scales[:, None]).to(torch.int8), scales


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize every linear layer of ``model`` (a ``Transformer``) in place; returns it.

    The embedding and the norms stay in the model's dtype, which should be bfloat16 (or float16 on
    GPU): the int8 kernel computes in the activations' dtype and is slow for float32 on CPU.
    """
    dtype = model.tok_embeddings.weight.dtype
    for module in model.modules():
        if hasattr(module, "scales"):  # the parallel linear layers (llama.parallel)
            q, scales = quantize_weight(module.weight)
            module.weight = nn.Parameter(q, requires_grad=False)
            module.scales = scales.to(dtype)
    return model
