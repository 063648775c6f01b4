"""Which kernel multiplies a float32 weight on a CPU: measured on the machine, not assumed.

torch's ``F.linear`` in float32 calls its BLAS (MKL in the pip builds); oneDNN, which torch also
carries, has its own float32 kernel. Which one reads a weight faster depends on the CPU and on the
weight's shape: oneDNN can stream a large matrix faster than MKL, while its fixed cost per call makes
it slower for small ones (docs/performance.md has the figures). So ``choose_float32_kernels`` times both kernels at
load over the model's own weights, one shape at a time, and lets each layer use the faster one.

The two kernels differ only in the order of the float32 sums (logits agree to ~1e-5); the choice is
made once per weight shape and thread count on a machine, so every model a process loads computes
alike, and a later run reads it (``llama.layers.timed_choices``) and compiles as the first did.
Autograd, which oneDNN's kernel lacks, always takes ``F.linear``. The timing draws its input
from a generator of its own: torch's global generator, which ``Llama.build`` seeds, is left as seeded,
whatever shapes are timed (they differ with the world size) or whether a choice was cached.
"""

import statistics
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from llama.layers.timed_choices import recall, remember

ROUNDS = 5  # alternating timings of each kernel per shape; the median decides
MARGIN = 0.95  # oneDNN must take under 95% of BLAS's time: a tie keeps torch's default
TIMED_BYTES = 32 << 20  # weight bytes read per timing: a few layers of a large model, more than the caches hold
SMALL_MODEL_PASSES = (
    4  # a small model's layers of a shape, cached however often they are read, are timed this many times over
)

_chosen: Dict[Tuple[int, int, int], bool] = {}  # (out_features, in_features, threads) -> use oneDNN


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x W^T`` by oneDNN's float32 kernel. Compiled code calls it through ``compiled_onednn_linear``:
    the compiler's own lowering of the op expects weights frozen into the graph."""
    if torch.compiler.is_compiling():
        return compiled_onednn_linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@torch.library.custom_op("llama::onednn_linear", mutates_args=())
def compiled_onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The same kernel as one opaque call in a compiled graph."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


@compiled_onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def float32_on_cpu(weight: torch.Tensor) -> bool:
    """A weight the choice is about (a layer timed on it may have moved or been converted since)."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu"


def wants_autograd(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def _pass_seconds(layers: List[nn.Module], x: torch.Tensor, onednn: bool) -> float:
    """Seconds for one product with each weight of ``layers`` in turn, as a decode step reads them."""
    start = time.perf_counter()
    for layer in layers:
        onednn_linear(x, layer.weight) if onednn else F.linear(x, layer.weight)
    return time.perf_counter() - start


def timed_layers(layers: List[nn.Module]) -> List[nn.Module]:
    """About ``TIMED_BYTES`` of weights from ``layers``: the first few of a large model's; a small
    model's all, ``SMALL_MODEL_PASSES`` times over (read from the caches, as that model's decoding
    reads them: more passes would time the same thing again)."""
    nbytes = layers[0].weight.numel() * layers[0].weight.element_size()
    count = max(1, min(TIMED_BYTES // nbytes, SMALL_MODEL_PASSES * len(layers)))
    return (layers * (count // len(layers) + 1))[:count]


def onednn_is_faster(layers: List[nn.Module]) -> bool:
    """Whether oneDNN multiplies one token by the weights of ``layers`` (all of one shape) faster than
    BLAS, by ``MARGIN``, in alternating rounds."""
    x = torch.randn(1, layers[0].weight.shape[1], generator=torch.Generator().manual_seed(0))
    timed = timed_layers(layers)
    onednn_linear(x, layers[0].weight)  # oneDNN prepares its kernel for the shape on first use
    seconds = {False: [], True: []}
    for _ in range(ROUNDS):
        for onednn in (False, True):
            seconds[onednn].append(_pass_seconds(timed, x, onednn))
    return statistics.median(seconds[True]) < MARGIN * statistics.median(seconds[False])


@torch.no_grad()
def choose_float32_kernels(model: nn.Module) -> Dict[Tuple[int, int], bool]:
    """Set ``onednn`` on each float32 CPU linear layer of ``model`` (the layers of ``llama.layers.parallel``)
    to whether oneDNN multiplies its shape of weight faster here than torch's default, timed on one
    token's input; returns the choice per (out_features, in_features)."""
    layers: Dict[Tuple[int, int], List[nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "onednn") and module.scales is None and float32_on_cpu(weight):
            layers.setdefault(tuple(weight.shape), []).append(module)
    if not layers or not torch.backends.mkldnn.is_available():
        return {}
    threads = torch.get_num_threads()
    for shape, group in layers.items():
        key = (*shape, threads)
        what = f"oneDNN for a float32 {shape[0]}x{shape[1]} weight at {threads} threads"
        if key not in _chosen and isinstance(remembered := recall(what), bool):
            _chosen[key] = remembered
        if key not in _chosen:
            _chosen[key] = onednn_is_faster(group)
            remember(what, _chosen[key])
        for module in group:
            module.onednn = _chosen[key]
    return {shape: _chosen[(*shape, threads)] for shape in layers}
