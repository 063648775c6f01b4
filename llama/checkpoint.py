"""Reading Meta's checkpoints: ``params.json`` and ``consolidated.NN.pth`` shards.

A checkpoint published for model-parallel size M holds M shards; shard i is rank i's slice of every
split tensor (see ``llama.parallel``): column-parallel weights and the output projection split on
dim 0, row-parallel weights and the token embedding on dim 1, norms replicated. Because every split
is even, the shards concatenated along that dimension give the full tensor, and rank r of W needs
the fraction [r/W, (r+1)/W) of it. Each rank memory-maps only the shards that overlap its fraction
and copies only the bytes of its slice, converting dtype tensor by tensor, so loading never holds
a second copy of the model. ``python -m llama.reshard`` rewrites a checkpoint with another shard count.
"""

import json
import logging
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from llama.model import ModelArgs, Transformer
from llama.parallel import model_parallel_rank, model_parallel_world_size
from llama.placement import place_tensor
from llama.quantize import Quantization, check_int4_shapes, quantizable_weights

logger = logging.getLogger(__name__)

# Meta's shards carry the rotary frequencies too; they are derived from params.json, so unused.
IGNORED_KEYS = {"rope.freqs"}
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")


def split_dim(key: str) -> Optional[int]:
    """The dimension along which ``key`` is split over model-parallel ranks; None if replicated."""
    if key == "tok_embeddings.weight" or key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    if key == "output.weight" or key.endswith(
        ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight", "feed_forward.w3.weight")
    ):
        return 0
    return None


def read_params(ckpt_dir: str) -> dict:
    path = Path(ckpt_dir) / "params.json"
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"params.json not found in checkpoint directory {ckpt_dir}")
    try:
        params = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(params).__name__}")
    return params


def shard_paths(ckpt_dir: str) -> List[Path]:
    """consolidated.00.pth ... consolidated.NN.pth, checked to be numbered without gaps."""
    found = {}
    for path in Path(ckpt_dir).glob("consolidated.*.pth"):
        match = SHARD_PATTERN.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    if not found:
        raise FileNotFoundError(f"no consolidated.NN.pth shard files in checkpoint directory {ckpt_dir}")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        names = ", ".join(f"consolidated.{i:02d}.pth" for i in missing)
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} has {len(found)} shards but lacks {names}")
    return [found[i] for i in sorted(found)]


def load_shard(path: Path) -> Dict[str, torch.Tensor]:
    """Memory-map one shard. weights_only: a file from a stranger cannot run code when loaded."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:  # torch raises many types for a truncated, corrupt or unsafe file
        raise ValueError(f"cannot load checkpoint shard {path}: {error}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint shard {path} must hold a dict of tensors, found {type(state).__name__}")
    return state


def shards_for_rank(n_shards: int, rank: int, world_size: int) -> List[int]:
    """Indices of the shards whose fraction [i/M, (i+1)/M) overlaps rank's [r/W, (r+1)/W)."""
    return [i for i in range(n_shards) if i * world_size < (rank + 1) * n_shards and (i + 1) * world_size > rank * n_shards]


def check_shard(path: Path, shard: Dict[str, torch.Tensor], full_shapes: Dict[str, torch.Size], n_shards: int):
    """Every expected key present with the shape of its 1/n_shards slice; nothing unexpected."""
    missing = [key for key in full_shapes if key not in shard]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(shard) - set(full_shapes) - IGNORED_KEYS)
    if unexpected:
        raise ValueError(f"{path}: unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, full_shape in full_shapes.items():
        expected = list(full_shape)
        dim = split_dim(key)
        if dim is not None:
            expected[dim] = full_shape[dim] // n_shards if full_shape[dim] % n_shards == 0 else -1
        if list(shard[key].shape) != expected:
            raise ValueError(
                f"{path}: {key} has shape {tuple(shard[key].shape)}, expected {tuple(expected)} "
                f"(a {tuple(full_shape)} tensor split over {n_shards} shard(s))"
            )


def rank_slices(
    paths: List[Path], full_shapes: Dict[str, torch.Size], rank: int, world_size: int
) -> Iterator[Tuple[str, torch.Tensor]]:
    """Rank ``rank``'s slice of every tensor of the checkpoint whose shards are ``paths``, one
    (key, CPU tensor) at a time, each read from the memory-mapped shards only when it is used.

    ``full_shapes`` are the unsharded shapes.
    """
    n_shards = len(paths)
    needed = shards_for_rank(n_shards, rank, world_size)
    shards = {}
    for i in needed:
        shards[i] = load_shard(paths[i])
        check_shard(paths[i], shards[i], full_shapes, n_shards)

    for key, full_shape in full_shapes.items():
        dim = split_dim(key)
        if dim is None:
            parts = [shards[needed[0]][key]]
        else:
            shard_size, rank_size = full_shape[dim] // n_shards, full_shape[dim] // world_size
            begin, end = rank * rank_size, (rank + 1) * rank_size
            parts = []
            for i in needed:  # the part of shard i inside [begin, end), as a view: nothing is read yet
                lo, hi = max(begin, i * shard_size), min(end, (i + 1) * shard_size)
                parts.append(shards[i][key].narrow(dim, lo - i * shard_size, hi - lo))
        # one part stays the memory-mapped tensor itself: no copy at all
        yield key, parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=dim or 0)


def load_rank_state(
    paths: List[Path],
    full_shapes: Dict[str, torch.Size],
    rank: int,
    world_size: int,
    device: torch.device,
    dtype: Optional[torch.dtype],
) -> Dict[str, torch.Tensor]:
    """``rank_slices`` as a state dict on ``device``; ``dtype`` None keeps the checkpoint's dtype."""
    return {key: t.to(device=device, dtype=dtype or t.dtype) for key, t in rank_slices(paths, full_shapes, rank, world_size)}


def full_shape(key: str, local_shape: torch.Size, world_size: int) -> torch.Size:
    dim = split_dim(key)
    if dim is None:
        return local_shape
    shape = list(local_shape)
    shape[dim] *= world_size
    return torch.Size(shape)


def checkpoint_vocab_size(paths: List[Path]) -> int:
    """Rows of the token embedding (memory-mapped: reads only the header)."""
    shard = load_shard(paths[0])
    if "tok_embeddings.weight" not in shard:
        raise ValueError(f"{paths[0]}: missing key 'tok_embeddings.weight'")
    return shard["tok_embeddings.weight"].shape[0]


def load_model(
    ckpt_dir: str, args: ModelArgs, device: torch.device, dtype: torch.dtype, quantization: Optional[Quantization] = None
) -> Transformer:
    """Build the model on the meta device (no memory), then place this rank's tensors in it one by
    one (``llama.placement``), each linear weight quantized on the CPU first when ``quantization``
    is given: the device never holds a full-precision copy of the model."""
    paths = shard_paths(ckpt_dir)
    rank, world_size = model_parallel_rank(), model_parallel_world_size()
    with torch.device("meta"):
        model = Transformer(args)
    if quantization is not None and quantization.bits == 4:  # before reading anything
        shapes = {name: tuple(m.weight.shape) for name, m in quantizable_weights(model).items()}
        check_int4_shapes(shapes, quantization, world_size)
    full_shapes = {key: full_shape(key, p.shape, world_size) for key, p in model.state_dict().items()}
    logger.info("rank %d/%d: loading shard(s) %s of %s", rank, world_size, shards_for_rank(len(paths), rank, world_size), ckpt_dir)
    for key, tensor in rank_slices(paths, full_shapes, rank, world_size):
        place_tensor(model, key, tensor, device, dtype, quantization)
    model.setup_caches()
    return model


def model_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Shapes of this rank's tensors for ``args``, computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {key: tuple(p.shape) for key, p in model.state_dict().items()}


def shard_slice(tensor: torch.Tensor, key: str, n_shards: int, shard: int) -> torch.Tensor:
    """Shard ``shard`` of ``n_shards`` of the full ``tensor`` stored under ``key``, as its own copy."""
    dim = split_dim(key)
    if dim is None:
        return tensor.clone()
    return tensor.chunk(n_shards, dim=dim)[shard].clone()  # a view would save the whole storage


def save_checkpoint(
    ckpt_dir: str, params: dict, state: Dict[str, torch.Tensor], n_shards: int = 1, dtype: torch.dtype = torch.bfloat16
) -> None:
    """Write full (unsharded) tensors as ``n_shards`` shards in Meta's layout, with ``params.json``."""
    args = ModelArgs.from_dict({**params, "vocab_size": state["tok_embeddings.weight"].shape[0]})
    out = Path(ckpt_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params))
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    for shard in range(n_shards):
        tensors = {key: shard_slice(t.to(dtype), key, n_shards, shard) for key, t in state.items()}
        tensors["rope.freqs"] = freqs.to(dtype)
        torch.save(tensors, out / f"consolidated.{shard:02d}.pth")
