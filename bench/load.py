"""Load a checkpoint once, in this fresh process, run one token through it (memory-mapped weights
are read on first use), and print the load time and the peak resident memory added (JSON).
``compare.py`` runs it in a subprocess per measurement.

    python bench/load.py --ckpt_dir CKPT --impl llama --dtype bfloat16
    python bench/load.py --ckpt_dir HF_DIR --impl llama --dtype bfloat16
    python bench/load.py --ckpt_dir CKPT --impl llama --dtype bfloat16 --quantize int4
    python bench/load.py --ckpt_dir HF_DIR --impl transformers --dtype bfloat16
"""

import argparse
import json
import time

import torch

from common import DTYPES, checkpoint_args

from llama.checkpoint import load_model
from llama.quantize import parse_quantize


def status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, from /proc/self/status."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak() -> None:
    """Restart the peak (VmHWM) from the current RSS (Linux >= 4.0); ru_maxrss cannot be reset."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", required=True, help="Meta's layout or a Hugging Face folder for --impl llama; a save_pretrained folder for transformers")
    parser.add_argument("--impl", choices=["llama", "transformers"], required=True)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--max_seq_len", type=int, default=512, help="KV cache length (llama allocates it at load)")
    parser.add_argument("--max_batch_size", type=int, default=1)
    parser.add_argument("--quantize", default=None, help="llama only: int8, int4, int4-g32 ... (quantized while loading)")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    if args.impl == "transformers":
        from transformers import LlamaForCausalLM
    reset_peak()
    before = status_bytes("VmRSS")
    start = time.perf_counter()
    if args.impl == "llama":  # Llama.build minus the tokenizer: read params, map the shards, build the model
        model_args = checkpoint_args(args.ckpt_dir, args.max_seq_len, args.max_batch_size)
        model = load_model(args.ckpt_dir, model_args, torch.device("cpu"), dtype, parse_quantize(args.quantize))
    else:
        model = LlamaForCausalLM.from_pretrained(args.ckpt_dir, dtype=dtype)
    seconds = time.perf_counter() - start
    peak_at_load = status_bytes("VmHWM")
    # memory-mapped weights are read on first use: one token through the model touches every weight
    start = time.perf_counter()
    with torch.inference_mode():
        if args.impl == "llama":
            model.forward(torch.ones(1, 1, dtype=torch.long), 0)
        else:
            model(torch.ones(1, 1, dtype=torch.long))
    first_token_seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM")
    cache = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "cache" in name)
    tensors = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    print(json.dumps({"load_s": seconds, "first_token_s": first_token_seconds, "peak_added_at_load_bytes": peak_at_load - before,
                      "peak_added_bytes": peak - before, "kv_cache_bytes": cache, "model_bytes": tensors}))


if __name__ == "__main__":
    main()
