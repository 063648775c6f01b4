"""One checkpoint tensor onto the device: the step every checkpoint reader ends with.

A reader yields this rank's slice of each tensor on the CPU (memory-mapped, nothing read yet);
``place_tensor`` converts it to the model's dtype, quantizes it when it is a linear weight, moves
it to the device and assigns it to the model built on the meta device. Tensor by tensor, so the
device never holds more than the finished model: a model that fits only quantized still loads.
``place_tensors`` first concatenates the parts of each fused layer (``llama.layers.parallel``: this rank's
wq, wk, wv slices; its w1, w3), so that each is converted, quantized and placed as one weight.
Whatever is copied (the fused parts, a converted dtype, a quantized or moved weight) gives its
memory-mapped pages back at once (``llama.checkpoints.mapped_pages``), so the process never holds a tensor twice.
"""

from typing import Iterable, Iterator, Optional, Tuple

import torch
from torch import nn

from llama.checkpoints.mapped_pages import release_copied
from llama.layers.parallel import fused_layers
from llama.layers.quantize import (
    Quantization,
    quantizable_weights,
    quantize_linear_weight,
    set_quantized_weight,
    tile_on_device,
)


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
        quantization: None, or how linear weights are stored (``llama.layers.quantize``); the embedding
            and norms keep ``dtype``.
    """
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    dtype = dtype or tensor.dtype
    if quantization is not None and name == "weight" and module_name in quantizable_weights(model):
        weight, scales = quantize_linear_weight(tensor.to(dtype), quantization, device.type)  # on the CPU
        set_quantized_weight(module, tile_on_device(to_device(weight, device)), to_device(scales.to(dtype), device))
        release_copied(tensor, weight)
        return
    old = getattr(module, name)
    placed = to_device(tensor.to(dtype), device)
    release_copied(tensor, placed)
    setattr(
        module, name, nn.Parameter(placed, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else placed
    )


def fuse(model: nn.Module, tensors: Iterable[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """``tensors`` (Meta's key, this rank's slice) with the parts of each fused layer of ``model``
    replaced by the layer's weight, the parts concatenated in the layer's order once all have come."""
    layers, pending = fused_layers(model), {}
    for key, tensor in tensors:
        module_name, _, name = key.rpartition(".")
        if module_name not in layers or name != "weight":
            yield key, tensor
            continue
        layer_key, layer = layers[module_name]
        parts = pending.setdefault(layer_key, {})
        parts[module_name.rpartition(".")[2]] = tensor
        if len(parts) == len(layer.parts):
            fused = torch.cat([parts[part] for part in layer.parts])
            for part in parts.values():
                release_copied(part, fused)
            yield layer_key, fused
            del pending[layer_key]


def place_tensors(
    model: nn.Module,
    tensors: Iterable[Tuple[str, torch.Tensor]],
    device: torch.device,
    dtype: Optional[torch.dtype],
    quantization: Optional[Quantization] = None,
) -> None:
    """``place_tensor`` for each of ``tensors`` (Meta's key, this rank's CPU slice), as a checkpoint
    reader yields them, the parts of a fused layer concatenated first."""
    for key, tensor in fuse(model, tensors):
        place_tensor(model, key, tensor, device, dtype, quantization)
