"""Weight-only quantization of the linear layers: int8 per output row, int4 in groups of input features.

Decoding one token reads every weight once and does two flops per weight, so its speed is the
memory bandwidth divided by the bytes of the weights. Activations, norms, the embedding and the KV
cache keep the model's dtype; only the linear weights shrink, and torch's own kernels dequantize
them on the fly inside the matmul:

- ``int8``: ``W ~= q * scales[:, None]``, q in [-127, 127], one scale per output row (gpt-fast's
  ``WeightOnlyInt8Linear``); ``_weight_int8pack_mm`` on every device. A quarter of float32's bytes.
- ``int4``: asymmetric, one scale and one zero per ``group_size`` consecutive input features of a
  row: ``W ~= (q - 8) * scale + zero``, q in [0, 15] (the formula of torch's tinygemm kernels).
  Packed for ``_weight_int4pack_mm_for_cpu`` on CPU and ``_weight_int4pack_mm`` on CUDA (bfloat16
  only there). An eighth of float32's bytes, plus 4 bytes of scale and zero per group.

Under tensor parallelism each rank quantizes its own slice: groups run along the input features,
so a row-parallel layer's slice must hold whole groups (``check_int4_shapes``).
"""

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llama.layers.cpu_kernels import float32_on_cpu, onednn_linear, wants_autograd

INT4_GROUP_SIZES = (32, 64, 128, 256)
# groups of 64: nearly the perplexity of 32's in fewer bytes (docs/quantization.md), and whole in every Llama 2 layer
INT4_DEFAULT_GROUP_SIZE = 64
QUANTIZE_PATTERN = re.compile(r"int8|int4(?:-g(\d+))?")
QUANTIZE_CHOICES = "None, 'int8', 'int4' or 'int4-gN' with N one of " + ", ".join(map(str, INT4_GROUP_SIZES))


@dataclass(frozen=True)
class Quantization:
    """What to do to the linear weights: ``bits`` 8 (per-row int8) or 4 (grouped int4)."""

    bits: int
    group_size: Optional[int] = None  # int4 only: input features sharing one scale and zero

    def __str__(self) -> str:
        return "int8" if self.bits == 8 else f"int4-g{self.group_size}"


def parse_quantize(value: Optional[str]) -> Optional[Quantization]:
    """``quantize`` as users write it: None, "int8", "int4" (groups of 64) or "int4-g32" (any of
    ``INT4_GROUP_SIZES``). One string, so that it travels through a command line unchanged."""
    match = QUANTIZE_PATTERN.fullmatch(value) if isinstance(value, str) else None
    if value is not None and not match:
        raise ValueError(f"quantize must be {QUANTIZE_CHOICES}, got {value!r}")
    if value is None:
        return None
    if value == "int8":
        return Quantization(8)
    group_size = int(match.group(1)) if match.group(1) else INT4_DEFAULT_GROUP_SIZE
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"quantize={value!r}: the int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    return Quantization(4, group_size)


def quantized_cpu_dtype() -> torch.dtype:
    """The activations' dtype for quantized weights on this CPU, from what it reports: bfloat16
    where torch's CPU kernels are vectorised (AVX2 or AVX-512: their int8 and int4 matmuls are written
    for bfloat16 activations, docs/quantization.md), float32 elsewhere."""
    return torch.bfloat16 if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else torch.float32


def int4_outpaces_int8_on_cpu() -> bool:
    """Whether torch's int4 CPU kernel decodes faster than its int8 one here: with its AVX-512 code, not
    with its AVX2 code, which is bound by its own arithmetic (unpacking and scaling each group) rather than
    by the bytes it reads, or without vector code (``bench/quantized_matmul.py``, docs/quantization.md)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def training_cpu_dtype() -> torch.dtype:
    """The activations' dtype for training beside int4 weights (QLoRA) on this CPU: bfloat16 where it
    multiplies bfloat16 with its own instructions (AVX-512 BF16, with torch's AVX-512 kernels), float32
    elsewhere, where bfloat16 products are converted and run several times slower than float32's
    (docs/finetuning.md). Training multiplies by the weights dequantized (``Int4Matmul``), not by the
    int4 kernel."""
    native = torch.backends.cpu.get_cpu_capability() == "AVX512" and torch.cpu._is_avx512_bf16_supported()
    return torch.bfloat16 if native else torch.float32


def check_activation_dtype(quantization: Quantization, device: torch.device, dtype: torch.dtype) -> None:
    """The dtypes each kernel computes in: on CPU float32, bfloat16 and float16 (fast in
    ``quantized_cpu_dtype()``); on CUDA int8 takes bfloat16 and float16, int4 (tinygemm) bfloat16 only."""
    if quantization.bits == 4 and device.type not in ("cpu", "cuda"):
        raise ValueError(
            f"quantize='{quantization}' is packed for 'cpu' and 'cuda' only, not {device.type!r}: use quantize='int8'"
        )
    if device.type == "cuda" and quantization.bits == 4 and dtype != torch.bfloat16:
        raise ValueError(
            f"quantize='{quantization}' on CUDA computes in bfloat16 only (torch's tinygemm kernel), "
            f"got {dtype}: pass dtype='bfloat16'"
        )
    if device.type == "cuda" and dtype == torch.float32:
        raise ValueError(
            f"quantize='{quantization}' on CUDA computes in bfloat16 or float16, not float32: pass dtype='bfloat16'"
        )


def linear(x: torch.Tensor, weight: torch.Tensor, scales: Optional[torch.Tensor], onednn: bool = False) -> torch.Tensor:
    """``x W^T`` for a float ``weight`` (``scales`` None), an int8 one (``scales`` (out,)) or a packed
    int4 one (``scales`` holds scale and zero per group, (in / group_size, out, 2)). ``onednn``: a
    float32 CPU weight whose shape oneDNN's kernel was measured to multiply faster (``llama.layers.cpu_kernels``)."""
    if scales is None:
        if onednn and float32_on_cpu(weight) and not wants_autograd(x, weight):
            return onednn_linear(x, weight)
        return F.linear(x, weight)
    x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
    if scales.dim() == 1:
        y = torch.ops.aten._weight_int8pack_mm(x2, weight, scales)
    elif wants_autograd(x, weight) or training_product(x2, weight, scales):
        y = Int4Matmul.apply(x2.contiguous(), weight, scales)
    else:
        y = int4_matmul(x2.contiguous(), weight, scales)
    return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)


TRAINING_ROWS = 16  # tokens over which dequantizing a weight costs little beside the product (Int4Matmul)


def training_product(x2: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> bool:
    """A product of training's that needs no gradient (a block's first, whose input is the frozen
    embedding's) by an int4 weight a CPU unpacks: dequantized too, as ``Int4Matmul`` says why."""
    return torch.is_grad_enabled() and x2.shape[0] >= TRAINING_ROWS and unpacks_on_cpu(weight, scales, x2.shape[-1])


def int4_matmul(x2: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(tokens, in) x packed int4 (out, in)^T -> (tokens, out), by the device's kernel."""
    group_size = x2.shape[-1] // scales.shape[0]
    int4_mm = torch.ops.aten._weight_int4pack_mm if x2.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    return int4_mm(x2, weight, group_size, scales)


def dequantized_weight(
    weight: torch.Tensor, scales: Optional[torch.Tensor], in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """The (out, in) weight in ``dtype`` that ``linear(x, weight, scales)`` multiplies by: a float weight
    itself, an int8 one times its row scales, a packed int4 one unpacked from the CPU kernel's layout
    (``unpack_int4``), else as its kernel reads it (the kernel's product with the identity, which costs
    a product of in x in x out)."""
    if scales is None:
        return weight.to(dtype)
    if scales.dim() == 1:
        return weight.to(dtype) * scales[:, None].to(dtype)
    q = unpack_int4(weight, in_features) if weight.device.type == "cpu" else None
    if q is not None:
        return dequantize_int4(q, scales, dtype)
    eye = torch.eye(in_features, dtype=dtype, device=weight.device)
    return int4_matmul(eye, weight, scales).T  # (in, out) -> (out, in)


def out_features(weight: torch.Tensor, scales: Optional[torch.Tensor]) -> int:
    """The output features of a float, int8 or int4 weight (a packed int4 weight's shape is the kernel's own)."""
    return scales.shape[1] if scales is not None and scales.dim() == 3 else weight.shape[0]


class Int4Matmul(torch.autograd.Function):
    """``x W^T`` by a frozen int4 weight, with the gradient of its input, for adapters trained beside it
    (QLoRA): grad_x = grad_y W. The weight gets no gradient, and only its packed form is kept for the
    backward. On a CPU whose kernel's layout ``unpack_int4`` reads, W is dequantized for each product
    (a pass over the weight, against a product of tokens x in x out), which runs at the float kernels'
    speed in the activations' dtype: the int4 kernel is slow in float32, and bfloat16 products are slow
    where the CPU has no bfloat16 instructions. Elsewhere the forward is the kernel's, and the backward's
    W the kernel's product with the identity, so exactly the weight the forward used."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, scales)
        ctx.in_features = x2.shape[-1]
        if unpacks_on_cpu(weight, scales, x2.shape[-1]):
            return x2 @ dequantized_weight(weight, scales, x2.shape[-1], x2.dtype).T
        return int4_matmul(x2, weight, scales)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        weight, scales = ctx.saved_tensors
        return grad_y @ dequantized_weight(weight, scales, ctx.in_features, grad_y.dtype), None, None


# The CPU kernel's packing (``_convert_weight_to_int4pack_for_cpu``) differs with the vector instructions
# it was built for: blocks of ``rows`` output rows, each stored input feature by input feature as
# rows / 2 bytes, a byte holding two rows' values. The layouts seen: AVX-512 64 rows, byte j holding
# rows j (low 4 bits) and 32 + j; AVX2 32 rows, j and 16 + j; without either 32 rows, 2j and 2j + 1.
INT4_CPU_LAYOUTS = [(rows, halves) for rows in (64, 32, 16, 128) for halves in (True, False)]
_int4_cpu_layouts: Dict[Tuple[int, int], Optional[Tuple[int, bool]]] = {}  # (out, in) -> the layout found, or None


def unpack_int4_as(packed: torch.Tensor, in_features: int, rows: int, halves: bool) -> torch.Tensor:
    """q (out, in) uint8 from ``packed`` (out, in / 2) uint8, read in the layout ``rows``, ``halves``."""
    blocks = packed.reshape(-1, in_features, rows // 2)  # (out / rows, in, rows / 2)
    low, high = blocks & 15, blocks >> 4
    if halves:
        q = torch.cat([low, high], dim=-1)  # (out / rows, in, rows)
    else:
        q = torch.stack([low, high], dim=-1).flatten(-2)
    return q.transpose(1, 2).reshape(-1, in_features)


def unpacks_on_cpu(weight: torch.Tensor, scales: Optional[torch.Tensor], in_features: int) -> bool:
    """Whether ``weight`` is an int4 CPU weight whose packing ``unpack_int4`` reads: training multiplies
    by it dequantized (``Int4Matmul``)."""
    int4 = scales is not None and scales.dim() == 3 and weight.device.type == "cpu"
    return int4 and int4_cpu_layout(weight, in_features) is not None


def int4_cpu_layout(packed: torch.Tensor, in_features: int) -> Optional[Tuple[int, bool]]:
    """The layout (one of ``INT4_CPU_LAYOUTS``) of the CPU kernel's packing of this shape of weight, or None
    where it is none of them; found once a shape, by packing random values of it."""
    out_features = packed.shape[0]
    shape = (out_features, in_features)
    if shape not in _int4_cpu_layouts:
        probe = torch.randint(0, 16, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        packed_probe = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.int(), 1)
        fits = [
            layout
            for layout in INT4_CPU_LAYOUTS
            if out_features % layout[0] == 0 and packed_probe.shape == packed.shape
        ]
        reads = [layout for layout in fits if torch.equal(unpack_int4_as(packed_probe, in_features, *layout), probe)]
        _int4_cpu_layouts[shape] = reads[0] if reads else None
    return _int4_cpu_layouts[shape]


def unpack_int4(packed: torch.Tensor, in_features: int) -> Optional[torch.Tensor]:
    """q (out, in) in [0, 15], uint8, from the CPU kernel's packing, or None where its layout is unknown
    (``int4_cpu_layout``)."""
    layout = int4_cpu_layout(packed, in_features)
    return None if layout is None else unpack_int4_as(packed, in_features, *layout)


# int8


def quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: q in [-127, 127] (out, in) and float32 scales (out,)."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scales[:, None]).to(torch.int8), scales


# int4


def int4_groups(weight: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 of each group of ``group_size`` input features: the group's range [min, max]
    is cut into 15 steps. Returns q in [0, 15] as int32 (out, in) and scale and zero as float32
    (in / group_size, out, 2), the layout of torch's kernels: ``W ~= (q - 8) * scale + zero``."""
    out_features, in_features = weight.shape
    w = weight.float().view(out_features, in_features // group_size, group_size)  # (out, groups, group_size)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (out, groups)
    scale = ((high - low) / 15).clamp(min=1e-6)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    zero = low + 8 * scale  # the value of q = 8, the kernels' midpoint
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (groups, out, 2)
    return q.view(out_features, in_features), scales_and_zeros


def dequantize_int4(
    q: torch.Tensor, scales_and_zeros: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight (out, in) in ``dtype`` that int4 groups stand for, computed in place in that dtype (one
    weight's worth of memory beside ``q``)."""
    out_features, in_features = q.shape
    groups = scales_and_zeros.shape[0]
    scale, zero = scales_and_zeros.to(dtype).transpose(0, 1).unbind(-1)  # each (out, groups)
    w = q.to(dtype).view(out_features, groups, -1).sub_(8).mul_(scale[..., None]).add_(zero[..., None])
    return w.view(out_features, in_features)


def inner_k_tiles(in_features: int) -> int:
    """The CUDA kernel's tiling of the input features: the largest of 8, 4, 2 with 16 x it dividing them."""
    return next(tiles for tiles in (8, 4, 2) if in_features % (16 * tiles) == 0)


def pack_int4(q: torch.Tensor, device_type: str) -> torch.Tensor:
    """q (out, in) in [0, 15], packed on the CPU two values a byte, (out, in / 2) uint8: for the CPU
    kernel in its own layout; for CUDA as plain pairs, which ``tile_on_device`` finishes there."""
    if device_type == "cuda":
        return (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)


def tile_on_device(packed: torch.Tensor) -> torch.Tensor:
    """A quantized weight already on its device, in the layout of that device's kernel (only CUDA's
    int4 kernel has one of its own; ``packed`` is returned as it is otherwise)."""
    if packed.is_cuda and packed.dtype == torch.uint8:
        return torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles(2 * packed.shape[1]))
    return packed


def int4_shape_errors(shapes: Dict[str, Tuple[int, int]], group_size: int) -> Dict[str, str]:
    """For each linear weight (name: this rank's (out, in)) that int4 with ``group_size`` cannot
    hold, why: whole groups along the input, and 16 output rows at a time for the kernels."""
    errors = {}
    for name, (out_features, in_features) in shapes.items():
        if in_features % group_size:
            errors[name] = f"its {in_features} input features are not a multiple of the group size {group_size}"
        elif out_features % 16:
            errors[name] = f"its {out_features} output features are not a multiple of 16"
    return errors


def check_int4_shapes(shapes: Dict[str, Tuple[int, int]], quantization: Quantization, world_size: int = 1) -> None:
    """Raise a ValueError naming every weight int4 cannot hold, and the group sizes that would work.

    ``shapes`` are this rank's slices: under tensor parallelism a row-parallel layer's slice of the
    input features must hold whole groups, so that no group straddles two ranks."""
    errors = int4_shape_errors(shapes, quantization.group_size)
    if not errors:
        return
    works = [g for g in INT4_GROUP_SIZES if not int4_shape_errors(shapes, g)]
    listed = "; ".join(f"{name}: {why}" for name, why in list(errors.items())[:3]) + (" ..." if len(errors) > 3 else "")
    remedy = f"quantize='int4-g{works[-1]}' would work" if works else "no int4 group size fits; use quantize='int8'"
    raise ValueError(
        f"quantize='{quantization}' cannot hold {len(errors)} weight(s) of this model"
        f"{f' split over {world_size} ranks' if world_size > 1 else ''}: {listed}; {remedy}"
    )


# both


def quantize_linear_weight(
    weight: torch.Tensor, quantization: Quantization, device_type: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The quantized form of ``weight`` (out, in) that travels to a ``device_type`` device, and its
    float32 scales, both computed on the CPU: int8 (out, in) and (out,); int4 packed (out, in / 2)
    and (in / group_size, out, 2)."""
    if quantization.bits == 8:
        return quantize_weight(weight)
    q, scales_and_zeros = int4_groups(weight, quantization.group_size)
    return pack_int4(q, device_type), scales_and_zeros


def quantizable_weights(model: nn.Module) -> Dict[str, nn.Module]:
    """The linear layers whose weight is quantized (the parallel linears of ``llama.layers.parallel``), by name."""
    return {name: module for name, module in model.named_modules() if hasattr(module, "scales")}


def set_quantized_weight(module: nn.Module, weight: torch.Tensor, scales: torch.Tensor) -> None:
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.scales = scales
