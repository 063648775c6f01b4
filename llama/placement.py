"""One checkpoint tensor onto the device: the step every checkpoint reader ends with.

A reader yields this rank's slice of each tensor on the CPU (memory-mapped, nothing read yet);
``place_tensor`` converts it to the model's dtype, quantizes it when it is a linear weight, moves
it to the device and assigns it to the model built on the meta device. Tensor by tensor, so the
device never holds more than the finished model: a model that fits only quantized still loads.
"""

from typing import Optional

import torch
from torch import nn

from llama.quantize import Quantization, quantizable_weights, quantize_linear_weight, set_quantized_weight, tile_on_device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Every byte that reaches the device while loading passes here (the tests count them)."""
    return tensor.to(device)


def place_tensor(
    model: nn.Module,
    key: str,
    tensor: torch.Tensor,
    device: torch.device,
    dtype: Optional[torch.dtype],
    quantization: Optional[Quantization] = None,
) -> None:
    """Assign ``tensor`` (this rank's slice of checkpoint entry ``key``, on the CPU) to ``model``.

    Args:
        model: a ``Transformer``, usually built on the meta device.
        key: the state-dict name, e.g. ``layers.0.attention.wq.weight``.
        tensor: the slice, shaped as the model's parameter.
        device: where the model runs.
        dtype: the model's dtype; None keeps the checkpoint's.
        quantization: None, or how linear weights are stored (``llama.quantize``); the embedding
            and norms keep ``dtype``.
    """
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    dtype = dtype or tensor.dtype
    if quantization is not None and name == "weight" and module_name in quantizable_weights(model):
        weight, scales = quantize_linear_weight(tensor.to(dtype), quantization, device.type)  # on the CPU
        set_quantized_weight(module, tile_on_device(to_device(weight, device)), to_device(scales.to(dtype), device))
        return
    old = getattr(module, name)
    placed = to_device(tensor.to(dtype), device)
    setattr(module, name, nn.Parameter(placed, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else placed)
