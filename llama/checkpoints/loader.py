"""Reading Meta's checkpoints: ``params.json`` and ``consolidated.NN.pth`` shards.

A checkpoint published for model-parallel size M holds M shards; shard i is rank i's slice of every
split tensor (see ``llama.layers.parallel``): column-parallel weights and the output projection split on
dim 0, row-parallel weights and the token embedding on dim 1, norms replicated (Meta's Llama 3 shards
split the embedding on dim 0, the vocabulary, which the reader sees from their shapes). Because every
split is even, the shards concatenated along that dimension give the full tensor, and rank r of W needs
the fraction [r/W, (r+1)/W) of it. Each rank memory-maps only the shards that overlap its fraction
(all of them for an embedding split the other way) and copies only the bytes of its slice, converting
dtype tensor by tensor, so loading never holds a second copy of the model. ``python -m llama.reshard``
rewrites a checkpoint with another shard count.

A Hugging Face folder (``config.json``, no ``params.json``) is read by ``llama.checkpoints.hf`` instead,
into the same keys and slices: ``checkpoint_folder`` chooses the layout once, and the loader asks the folder
it gives (``MetaFolder``, ``HfFolder``). ``python -m llama.convert`` converts between the two layouts.
"""

import logging
import re
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
from torch.distributed import ProcessGroup

from llama.checkpoints import hf
from llama.checkpoints.files import load_tensor_dict, read_json_object
from llama.checkpoints.hf import is_hf_checkpoint
from llama.checkpoints.mapped_pages import release_copied
from llama.checkpoints.peft import Adapter, merge_adapter
from llama.checkpoints.placement import place_tensors
from llama.layers.cpu_kernels import choose_float32_kernels
from llama.layers.cpu_threads import choose_threads
from llama.layers.parallel import fused_layers, group_rank, group_size
from llama.layers.quantize import Quantization, check_int4_shapes, int4_outpaces_int8_on_cpu, quantizable_weights
from llama.model import ModelArgs, Transformer
from llama.options import EngineOptions
from llama.tokenizer import TOKENIZER_FILE, Tokenizer

logger = logging.getLogger(__name__)

# Meta's shards carry the rotary frequencies too; they are derived from params.json, so unused.
IGNORED_KEYS = {"rope.freqs"}
SHARD_PATTERN = re.compile(r"consolidated\.(\d+)\.pth")


class TensorLayout(NamedTuple):
    shape: torch.Size  # the whole tensor's shape, as if unsharded
    split_dim: Optional[int]  # the dimension model parallelism splits it on; None: every rank holds it whole


def model_layout(model: Transformer, world_size: int) -> Dict[str, TensorLayout]:
    """Every tensor of ``model`` (this rank's part of a model built for ``world_size`` ranks) with its
    whole shape and the dimension its layer type splits (``split_dim`` of ``llama.layers.parallel``'s layers).
    The keys are Meta's: a fused layer's parts (wq, wk, wv) are listed apart, split as their layer."""
    layers = {**dict(model.named_modules()), **{part: layer for part, (_, layer) in fused_layers(model).items()}}
    layout = {}
    for key, tensor in model.state_dict().items():
        split_dim = getattr(layers[key.rpartition(".")[0]], "split_dim", None)
        shape = list(tensor.shape)
        if split_dim is not None:
            shape[split_dim] *= world_size
        layout[key] = TensorLayout(torch.Size(shape), split_dim)
    return layout


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
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} has {shard_count(len(found))} but lacks {names}")
    return [found[i] for i in sorted(found)]


def shard_count(n: int) -> str:
    return f"{n} shard" if n == 1 else f"{n} shards"


# A tensor every shard splits on dim 0 (wq is column-parallel in Llama 2's and 3's shards alike), whose
# whole number of rows params.json gives: a shard's rows tell how many shards there are.
COUNTED_KEY = "layers.0.attention.wq.weight"


def check_shard_count(ckpt_dir: str, paths: List[Path], params: dict) -> None:
    """Raise FileNotFoundError naming the shards missing after the last one found (or ValueError for
    more shards than the split implies), from the part of ``COUNTED_KEY`` in the first shard."""
    shape = getattr(load_shard(paths[0]).get(COUNTED_KEY), "shape", None)
    rows = params.get("dim", ModelArgs.dim)  # n_heads x head_dim
    if shape is None or len(shape) != 2 or shape[0] == 0 or rows % shape[0]:
        return  # the shard's keys and shapes are checked as it is read
    n_shards = rows // shape[0]
    if n_shards == len(paths):
        return
    split = (
        f"{paths[0].name}'s {COUNTED_KEY} has {shape[0]} of the {rows} rows params.json's dim gives: "
        f"it is 1 of {shard_count(n_shards)}"
    )
    if n_shards < len(paths):
        raise ValueError(f"checkpoint directory {ckpt_dir} has {shard_count(len(paths))}, but {split}")
    missing = ", ".join(f"consolidated.{i:02d}.pth" for i in range(len(paths), n_shards))
    raise FileNotFoundError(
        f"checkpoint directory {ckpt_dir} lacks {missing}: {split}, "
        f"and {len(paths)} {'is' if len(paths) == 1 else 'are'} there"
    )


def load_shard(path: Path) -> Dict[str, torch.Tensor]:
    """Memory-map one shard (``llama.checkpoints.files``: its code cannot run)."""
    return load_tensor_dict(path, "checkpoint shard")


def shards_for_rank(n_shards: int, rank: int, world_size: int) -> List[int]:
    """Indices of the shards whose fraction [i/M, (i+1)/M) overlaps rank's [r/W, (r+1)/W)."""
    return [
        i for i in range(n_shards) if i * world_size < (rank + 1) * n_shards and (i + 1) * world_size > rank * n_shards
    ]


# Meta's Llama 3 code splits the token embedding on the vocabulary (dim 0, fairscale's
# VocabParallelEmbedding), Llama 2's on the features (dim 1), as this model's ParallelEmbedding does:
# shards split either way are read.
EMBEDDING_KEY, VOCABULARY_DIM, FEATURES_DIM = "tok_embeddings.weight", 0, 1


def split_dims(
    path: Path, shard: Dict[str, torch.Tensor], layout: Dict[str, TensorLayout], n_shards: int
) -> Dict[str, Optional[int]]:
    """The dimension the shards split each tensor on, seen from this shard's shapes: the layer type's
    (``layout``), or for the embedding Meta's other one; None when one shard holds everything. Every
    expected key present with the shape of its 1/n_shards slice; nothing unexpected."""
    missing = [key for key in layout if key not in shard]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    unexpected = sorted(set(shard) - set(layout) - IGNORED_KEYS)
    if unexpected:
        raise ValueError(f"{path}: unexpected key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    dims = {}
    for key, (full_shape, dim) in layout.items():
        candidates = (
            [None]
            if n_shards == 1
            else [dim] + [d for d in (VOCABULARY_DIM, FEATURES_DIM) if key == EMBEDDING_KEY and d != dim]
        )
        shapes = {candidate: split_shape(full_shape, candidate, n_shards) for candidate in candidates}
        found = [candidate for candidate, shape in shapes.items() if list(shard[key].shape) == shape]
        if not found:
            raise ValueError(
                f"{path}: {key} has shape {tuple(shard[key].shape)}, "
                f"expected {' or '.join(str(tuple(s)) for s in shapes.values())} "
                f"(a {tuple(full_shape)} tensor split over {n_shards} shard(s))"
            )
        dims[key] = found[0]
    return dims


def split_shape(full_shape: torch.Size, dim: Optional[int], n_shards: int) -> List[int]:
    """The shape of one of ``n_shards`` slices on ``dim`` (-1 there when it does not divide)."""
    shape = list(full_shape)
    if dim is not None:
        shape[dim] = full_shape[dim] // n_shards if full_shape[dim] % n_shards == 0 else -1
    return shape


def meta_layout(layout: Dict[str, TensorLayout], splits_vocabulary: bool) -> Dict[str, TensorLayout]:
    """``layout`` as Meta's code splits it: Llama 3's (``splits_vocabulary``) splits the embedding on the
    vocabulary, Llama 2's as this model does."""
    if not splits_vocabulary:
        return layout
    return {**layout, EMBEDDING_KEY: layout[EMBEDDING_KEY]._replace(split_dim=VOCABULARY_DIM)}


def check_shard(path: Path, shard: Dict[str, torch.Tensor], layout: Dict[str, TensorLayout], n_shards: int) -> None:
    """Every expected key present with the shape of its 1/n_shards slice; nothing unexpected."""
    split_dims(path, shard, layout, n_shards)


def rank_slices(
    paths: List[Path], layout: Dict[str, TensorLayout], rank: int, world_size: int
) -> Iterator[Tuple[str, torch.Tensor]]:
    """(key, rank ``rank``'s slice on the CPU) for every key of ``layout``, tensor by tensor, from Meta's
    shards ``paths``. A slice inside one shard stays a view of the memory-mapped file; one that spans
    shards is concatenated, one tensor at a time. A tensor the shards split on another dimension than
    ``layout``'s (Llama 3's embedding) is this rank's part of every shard, concatenated."""
    n_shards = len(paths)
    shards = {0: load_shard(paths[0])}
    source_dims = split_dims(paths[0], shards[0], layout, n_shards)

    def shard(i: int) -> Dict[str, torch.Tensor]:
        """Shard i, memory-mapped and checked on first use."""
        if i not in shards:
            shards[i] = load_shard(paths[i])
            if split_dims(paths[i], shards[i], layout, n_shards) != source_dims:
                raise ValueError(f"{paths[i]} splits its tensors on other dimensions than {paths[0]}")
        return shards[i]

    needed = shards_for_rank(n_shards, rank, world_size)
    for i in needed:
        shard(i)
    for key, (full_shape, dim) in layout.items():
        source_dim = dim if n_shards == 1 else source_dims[key]
        if source_dim != dim:
            sources = list(range(n_shards))
            tensor = torch.cat([rank_part(shard(i)[key], dim, rank, world_size) for i in sources], dim=source_dim)
        elif dim is None:
            sources = needed[:1]
            tensor = shard(needed[0])[key].contiguous()
        else:
            shard_size, rank_size = full_shape[dim] // n_shards, full_shape[dim] // world_size
            begin, end = rank * rank_size, (rank + 1) * rank_size
            parts, sources = [], needed
            for i in needed:  # the part of shard i inside [begin, end), as a view: nothing is read yet
                lo, hi = max(begin, i * shard_size), min(end, (i + 1) * shard_size)
                parts.append(shard(i)[key].narrow(dim, lo - i * shard_size, hi - lo))
            tensor = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=dim)
        for i in sources:  # a slice copied (across shards, or strided) gives back the pages it was read from
            release_copied(shard(i)[key], tensor)
        yield key, tensor


def rank_part(tensor: torch.Tensor, dim: Optional[int], rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank`` of ``world_size``'s even slice of ``tensor`` on ``dim`` (all of it for None)."""
    return tensor if dim is None else tensor.chunk(world_size, dim=dim)[rank]


class MetaFolder:
    """A checkpoint in Meta's layout: ``params.json`` and ``consolidated.NN.pth`` shards. It answers the
    questions ``llama.checkpoints.hf.HfFolder`` answers for a Hugging Face folder, with the same methods."""

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = ckpt_dir
        self.params_path = Path(ckpt_dir) / "params.json"  # where the hyper-parameters come from

    def params(self) -> dict:
        if not self.params_path.is_file():
            raise FileNotFoundError(f"params.json not found in checkpoint directory {self.ckpt_dir}")
        return read_json_object(self.params_path)

    def embedding_rows(self, params: dict) -> Tuple[int, Path]:
        """Rows of the token embedding and the shard read for them (headers only); ``params``: the
        checkpoint's (``params()``), which also say how many shards there must be."""
        paths = shard_paths(self.ckpt_dir)
        check_shard_count(self.ckpt_dir, paths, params)
        return checkpoint_vocab_size(paths, params.get("dim", ModelArgs.dim)), paths[0]

    def rank_tensors(
        self, args: ModelArgs, layout: Dict[str, TensorLayout], rank: int, world_size: int
    ) -> Iterator[Tuple[str, torch.Tensor]]:
        """(Meta's key, this rank's CPU slice) for every key of ``layout``, one tensor at a time."""
        return rank_slices(shard_paths(self.ckpt_dir), layout, rank, world_size)


CheckpointFolder = Union[MetaFolder, hf.HfFolder]


def checkpoint_folder(ckpt_dir: str) -> CheckpointFolder:
    """The checkpoint in ``ckpt_dir``, in the layout found there: a Hugging Face folder (``config.json``,
    no ``params.json``) or Meta's. Both yield Meta's keys and slices, so that placing a tensor on its
    device is one step for both."""
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    return hf.HfFolder(ckpt_dir) if is_hf_checkpoint(ckpt_dir) else MetaFolder(ckpt_dir)


def read_model_args(ckpt_dir: str, tokenizer: Tokenizer, tokenizer_path: str, sizes: EngineOptions) -> ModelArgs:
    """``params.json`` with the engine's rows and context (``sizes``), checked against the tokenizer and the
    shards: the vocabulary is the tokenizer's, and must be the embedding's and params.json's (when it gives one)."""
    folder = checkpoint_folder(ckpt_dir)
    params = folder.params()
    rows, rows_file = folder.embedding_rows(params)
    if rows != tokenizer.n_words:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the checkpoint's "
            f"tok_embeddings.weight has {rows} rows ({rows_file}): this tokenizer is not the checkpoint's"
        )
    vocab_size = params.get("vocab_size", -1)
    if vocab_size not in (-1, tokenizer.n_words):
        raise ValueError(
            f"{folder.params_path} says vocab_size={vocab_size} but the tokenizer has {tokenizer.n_words} tokens"
        )
    return ModelArgs.from_dict(
        {
            **params,
            "vocab_size": tokenizer.n_words,
            "max_seq_len": sizes.max_seq_len,
            "max_batch_size": sizes.max_batch_size,
        },
        source=str(folder.params_path),
    )


def check_draft_vocabulary(draft_ckpt_dir: str, tokenizer: Tokenizer, tokenizer_path: str) -> None:
    """A draft model proposes token ids of the model's vocabulary: its embedding must have the
    tokenizer's rows, and a ``tokenizer.model`` in its folder must give each id the same bytes."""
    draft = checkpoint_folder(draft_ckpt_dir)
    rows, rows_file = draft.embedding_rows(draft.params())
    if rows != tokenizer.n_words:
        raise ValueError(
            f"draft checkpoint {draft_ckpt_dir} has a vocabulary of {rows} tokens ({rows_file}) but the model's "
            f"tokenizer {tokenizer_path} has {tokenizer.n_words}: a draft must share the model's vocabulary"
        )
    own = Path(draft_ckpt_dir) / TOKENIZER_FILE
    if own.is_file() and own.resolve() != Path(tokenizer_path).resolve():
        draft_tokenizer = Tokenizer(str(own))
        if [draft_tokenizer.token_bytes(i) for i in range(rows)] != [tokenizer.token_bytes(i) for i in range(rows)]:
            raise ValueError(
                f"draft tokenizer {own} and the model's tokenizer {tokenizer_path} both have {rows} tokens but "
                "different pieces: a draft must share the model's vocabulary"
            )


def checkpoint_vocab_size(paths: List[Path], dim: int) -> int:
    """Rows of the token embedding (memory-mapped: reads only the header): the first shard's, times
    the number of shards when they split the vocabulary (Llama 3's: each holds all ``dim`` features)."""
    shard = load_shard(paths[0])
    if "tok_embeddings.weight" not in shard:
        raise ValueError(f"{paths[0]}: missing key 'tok_embeddings.weight'")
    rows, features = shard["tok_embeddings.weight"].shape
    return rows * len(paths) if len(paths) > 1 and features == dim else rows


def load_model(
    ckpt_dir: str,
    args: ModelArgs,
    device: torch.device,
    dtype: torch.dtype,
    quantization: Optional[Quantization] = None,
    adapter: Optional[Adapter] = None,
    group: Optional[ProcessGroup] = None,
    training: bool = False,
    time_threads: bool = False,
) -> Transformer:
    """Build the model on the meta device (no memory), then place this rank's tensors in it one by
    one (``llama.checkpoints.placement``), each linear weight quantized on the CPU first when ``quantization``
    is given: the device never holds a full-precision copy of the model. A LoRA ``adapter``
    (``llama.checkpoints.peft``) is merged into each weight it adapts as the weight is read.

    ``group``: the processes that split each layer (``Transformer``'s); this process reads its rank's
    slice; None: the whole model. The model has no KV cache pool: an engine sets up the one it decodes with.
    ``training``: the model is for training, which makes none of decoding's choices (float32 kernels, timed
    on a decode step). ``time_threads``: first choose the thread count the model decodes fastest with
    (``llama.layers.cpu_threads.choose_threads``), for which the kernels are then chosen: what an
    inference command given no ``--threads`` asks for."""
    rank, world_size = group_rank(group), group_size(group)
    with torch.device("meta"):
        model = Transformer(args, group)
    if quantization is not None and quantization.bits == 4:  # before reading anything
        shapes = {name: tuple(m.weight.shape) for name, m in quantizable_weights(model).items()}
        check_int4_shapes(shapes, quantization, world_size)
    logger.info("rank %d/%d: loading %s", rank, world_size, ckpt_dir)
    layout = model_layout(model, world_size)
    tensors = checkpoint_folder(ckpt_dir).rank_tensors(args, layout, rank, world_size)  # Meta's keys and row order
    if adapter is not None:
        tensors = merge_adapter(
            tensors, adapter, {key: entry.split_dim for key, entry in layout.items()}, rank, world_size
        )
    place_tensors(model, tensors, device, dtype, quantization)
    model.setup_rope()
    model.drop_cache()  # built on the meta device: an engine sets up the pool it decodes with (Engine)
    if training:
        return model
    if quantization is not None and quantization.bits == 4 and device.type == "cpu" and not int4_outpaces_int8_on_cpu():
        logger.warning(
            "int4 weights decode about as fast as int8 on this CPU (torch's %s int4 kernel is bound "
            "by its own arithmetic, not by memory): int4 saves memory here, not time (docs/quantization.md)",
            torch.backends.cpu.get_cpu_capability(),
        )
    if time_threads:
        choose_threads(model)  # before the kernels, which are chosen for the thread count
    kernels = choose_float32_kernels(model)
    if kernels:
        logger.info(
            "float32 kernel per weight shape, timed: %s",
            {shape: "oneDNN" if onednn else "BLAS" for shape, onednn in kernels.items()},
        )
    return model


def layout_of(args: ModelArgs, group: Optional[ProcessGroup] = None) -> Dict[str, TensorLayout]:
    """The layout of the model ``args`` describes, split over ``group`` (None: whole, in one process)."""
    with torch.device("meta"):
        return model_layout(Transformer(args, group), group_size(group))
