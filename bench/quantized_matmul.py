"""One token's products with int8 and int4 weights (torch's CPU kernels, bfloat16 activations, as a
quantized model decodes), over the linear weights of one block of a model shape, in alternating rounds:
milliseconds per block and the weight bytes read per second. Decoding one token reads every weight
once, so a kernel that streams its bytes as fast as memory allows makes int4 (half int8's bytes) up to
2x faster; one that is bound by its own arithmetic does not.

    python bench/quantized_matmul.py                         # TinyLlama 1.1B's block: dim 2048, hidden 5632, 4 KV heads
    ATEN_CPU_CAPABILITY=avx2 python bench/quantized_matmul.py   # torch's AVX2 kernels, on a CPU that has AVX-512
"""

import argparse
import statistics
import time

import torch

from llama.layers.quantize import Quantization, linear, quantize_linear_weight


def block_shapes(dim: int, hidden: int, n_heads: int, n_kv_heads: int):
    """(out, in) of a block's linear weights as this project fuses them: wqkv, wo, w13, w2."""
    head_dim = dim // n_heads
    return [(dim + 2 * n_kv_heads * head_dim, dim), (dim, dim), (2 * hidden, dim), (dim, hidden)]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--hidden_dim", type=int, default=5632)
    parser.add_argument("--n_heads", type=int, default=32)
    parser.add_argument("--n_kv_heads", type=int, default=4)
    parser.add_argument(
        "--blocks", type=int, default=4, help="copies of the block's weights, read in turn (more than the caches hold)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=20, help="passes over the blocks per round")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = block_shapes(args.dim, args.hidden_dim, args.n_heads, args.n_kv_heads)
    modes = {"int8": Quantization(8), "int4-g64": Quantization(4, 64)}
    weights = {name: [] for name in modes}
    for _ in range(args.blocks):
        for shape in shapes:
            weight = 0.02 * torch.randn(shape)
            for name, quantization in modes.items():
                packed, scales = quantize_linear_weight(weight, quantization, "cpu")
                weights[name].append((packed, scales.to(torch.bfloat16)))
    inputs = {k: torch.randn(1, k, dtype=torch.bfloat16) for _, k in shapes}
    seconds = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name in modes:
            start = time.perf_counter()
            for _ in range(args.repeats):
                for packed, scales in weights[name]:
                    linear(inputs[packed.shape[1] * (2 if name.startswith("int4") else 1)], packed, scales)
            seconds[name].append((time.perf_counter() - start) / (args.repeats * args.blocks))
    elements = sum(out * k for out, k in shapes)
    print(
        f"one token's products over a block of dim {args.dim}, hidden {args.hidden_dim} "
        f"({elements / 1e6:.1f}M weights), "
        f"{torch.get_num_threads()} thread(s), torch's {torch.backends.cpu.get_cpu_capability()} kernels; "
        f"median of {args.rounds} rounds"
    )
    base = statistics.median(seconds["int8"])
    for name, bits in (("int8", 8), ("int4-g64", 4)):
        median = statistics.median(seconds[name])
        print(
            f"{name:10} {median * 1e3:7.3f} ms  {elements * bits / 8 / median / 1e9:5.1f} GB/s of weights  "
            f"{base / median:5.2f}x int8's speed"
        )


if __name__ == "__main__":
    main()
