"""The server's context when ``--max_seq_len`` is not given: the checkpoint's own, capped so that the
KV cache fits in memory.

The checkpoint's context is the one it states (config.json's ``max_position_embeddings``,
params.json's ``max_seq_len`` as ``train.py`` writes it), else the one Meta released such a checkpoint
with (``llama.convert.trained_context``: Llama 2 4096, Code Llama 16384, Llama 3.0 8192, 3.1 and 3.2
131072), and at least ``MIN_CONTEXT``. With ``--kv_cache_tokens`` a row holds at most that pool. Else
the pool holds ``--max_batch_size`` whole rows, whose length is capped to what fits in ``KV_SHARE`` of
the memory the weights (and a draft's weights and cache) leave, but not below ``MIN_CONTEXT``. Under
torchrun the ranks take the smallest of their choices, as every rank must build the same model.
"""

import os
import re
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from llama.checkpoints.hf import HfFolder, read_config
from llama.checkpoints.loader import checkpoint_folder
from llama.convert import source_model, trained_context
from llama.distributed import fail_together, job_group, resolve_dtype
from llama.layers.kv_cache import KV_CACHE_DTYPES, cache_dtype, pool_token_bytes
from llama.layers.quantize import Quantization, parse_quantize, quantizable_weights
from llama.model import ModelArgs, Transformer
from llama.options import is_int
from llama.tokenizer import Tokenizer

# the most of the memory left beside the weights the KV cache takes by default: the rest is for the
# activations (a prefill chunk's logits over the vocabulary), compiled graphs and the rest of the machine
KV_SHARE = 0.5
# the least the server defaults to, even past a checkpoint's shorter context or a rough memory estimate: a chat
# with a tool or a schema described in its prompt needs that much (rotary positions go on past a trained length,
# read less well)
MIN_CONTEXT = 512
BLOCK = 16  # the pool's block size: a context in whole blocks wastes none of it


def positive_int(value, name: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def default_context(
    ckpt_dir: str,
    tokenizer_path: str,
    max_batch_size: int,
    kv_cache_tokens: Optional[int],
    device: torch.device,
    dtype: Optional[str],
    quantize: Optional[str],
    draft_ckpt_dir: Optional[str] = None,
    draft_quantize: Optional[str] = None,
    kv_cache_dtype: Optional[str] = None,
) -> Tuple[int, str]:
    """The ``max_seq_len`` a server loading this checkpoint so uses, and why (a phrase for its log).

    The arguments are the server's flags, ``device`` resolved. Only params.json or config.json, the
    shards' headers and the tokenizer are read; the sizes are computed on the meta device.
    """
    with fail_together():  # every rank reads the files: if one fails, all do
        positive_int(max_batch_size, "max_batch_size")
        context, where = checkpoint_context(ckpt_dir, Tokenizer(tokenizer_path))
        why = f"the checkpoint's context is {context} ({where})"
        if context < MIN_CONTEXT:
            context, why = MIN_CONTEXT, f"{why}, raised to {MIN_CONTEXT}, the least this server defaults to"
        if kv_cache_tokens is None:
            choice = fitting_context(
                context,
                why,
                ckpt_dir,
                max_batch_size,
                device,
                dtype,
                quantize,
                draft_ckpt_dir,
                draft_quantize,
                KV_CACHE_DTYPES.get(kv_cache_dtype),
            )
        elif positive_int(kv_cache_tokens, "kv_cache_tokens") < context:
            choice = kv_cache_tokens, f"{why}, more than the pool's --kv_cache_tokens {kv_cache_tokens}"
        else:
            choice = context, why
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return choice
    choices = [None] * dist.get_world_size()
    dist.all_gather_object(choices, choice)
    return min(choices)  # the smallest: every rank must build the same model


def fitting_context(
    context: int,
    why: str,
    ckpt_dir: str,
    max_batch_size: int,
    device: torch.device,
    dtype: Optional[str],
    quantize: Optional[str],
    draft_ckpt_dir: Optional[str],
    draft_quantize: Optional[str],
    storage: Optional[torch.dtype] = None,
) -> Tuple[int, str]:
    """``context``, or fewer tokens if ``max_batch_size`` rows of it would not fit in ``KV_SHARE`` of
    the memory the weights leave (never fewer than ``MIN_CONTEXT``), and ``why`` so. ``storage``: the
    8-bit KV cache's dtype, or None."""
    quantization = parse_quantize(quantize)
    dtype = resolve_dtype(dtype, device, quantization)
    weights, token_bytes = model_bytes(source_model(ckpt_dir)[1], device, dtype, quantization, storage)
    if draft_ckpt_dir is not None:  # its weights, and a cache as long as the model's
        draft_quantization = parse_quantize(draft_quantize)
        draft_dtype = resolve_dtype(None, device, draft_quantization) if draft_quantization else dtype
        draft_weights, draft_token_bytes = model_bytes(
            source_model(draft_ckpt_dir)[1], device, draft_dtype, draft_quantization, storage
        )
        weights, token_bytes = weights + draft_weights, token_bytes + draft_token_bytes
    memory = available_memory(device)
    if memory is None:
        return MIN_CONTEXT, f"{why}, but the memory free on {device} is not known here"
    free, where = memory
    fits = int(KV_SHARE * (free - weights) // (max_batch_size * token_bytes)) // BLOCK * BLOCK
    cache = f"{max_batch_size} row(s) of KV cache ({gib(max_batch_size * context * token_bytes)})"
    room = f"{KV_SHARE:.0%} of what {gib(weights)} of weights leave of the {gib(free)} {where}"
    if fits >= context:
        return context, f"{why}; {cache} fit in {room}"
    return max(fits, MIN_CONTEXT), (
        f"{why}, but {cache} would take more than {room} (never under {MIN_CONTEXT}); "
        "--max_seq_len, --kv_cache_tokens or a smaller --max_batch_size choose another"
    )


def checkpoint_context(ckpt_dir: str, tokenizer: Tokenizer) -> Tuple[int, str]:
    """The context the checkpoint was trained for, and where that comes from."""
    folder = checkpoint_folder(ckpt_dir)
    source = folder.params_path
    if isinstance(folder, HfFolder):
        stated = read_config(ckpt_dir).get("max_position_embeddings")
        if stated is not None:
            if not isinstance(stated, int) or isinstance(stated, bool) or stated < 1:
                raise ValueError(f"{source}: max_position_embeddings must be a positive integer, got {stated!r}")
            return stated, f"{source}'s max_position_embeddings"
    params, args = source_model(ckpt_dir)
    context = trained_context(params, args, tokenizer)
    if "max_seq_len" in params:
        return context, f"{source}'s max_seq_len"
    return context, (
        f"{source} states none: the released context of Meta's checkpoints of its kind, Llama 2 4096, "
        "Code Llama 16384, Llama 3.0 8192, 3.1 and 3.2 131072"
    )


def model_bytes(
    args: ModelArgs,
    device: torch.device,
    dtype: torch.dtype,
    quantization: Optional[Quantization],
    storage: Optional[torch.dtype] = None,
) -> Tuple[int, int]:
    """This rank's weights in bytes, and its KV cache's bytes per token, for the model ``args``
    describes loaded on ``device`` in ``dtype`` (its linear weights quantized with ``quantization``, its
    KV cache stored as ``storage`` with its scales, or None: in ``cache_dtype``), split over the job's
    processes as ``Llama.build`` splits it."""
    with torch.device("meta"):
        model = Transformer(args, job_group())
    weights = sum(parameter.numel() for parameter in model.parameters()) * dtype.itemsize
    if quantization is not None:  # the linear weights take quantization.bits each instead (their scales left out)
        quantized = sum(module.weight.numel() for module in quantizable_weights(model).values())
        weights -= quantized * dtype.itemsize - quantized * quantization.bits // 8
    heads = sum(layer.attention.n_local_kv_heads for layer in model.layers)
    return weights, pool_token_bytes(heads, args.head_dim, cache_dtype(dtype, device), storage)  # keys and values


def available_memory(device: torch.device) -> Optional[Tuple[int, str]]:
    """Bytes this process may still fill on ``device``, and what they are (a phrase); None where
    unknown. A CPU's memory is shared by the processes torchrun started on the machine."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device}"
    meminfo = Path("/proc/meminfo")
    match = re.search(r"^MemAvailable:\s+(\d+) kB$", meminfo.read_text(), re.MULTILINE) if meminfo.is_file() else None
    if match is not None:
        free, where = int(match.group(1)) * 1024, "of memory available"
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:  # macOS: no figure for what is free
        free, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "of the machine's memory"
    else:
        return None
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return (free // processes, f"{where} to each of {processes} processes") if processes > 1 else (free, where)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
