"""Writing checkpoint folders, in either layout the loader reads:

- Meta's: ``params.json`` and ``consolidated.NN.pth`` shards (``write_meta_shard``; ``save_checkpoint``
  from whole tensors), with the tokenizer in Meta's form (``write_meta_tokenizer``).
- Hugging Face's: ``config.json`` and ``model*.safetensors`` with their index (``write_hf_weights``), in
  transformers' names and rotary row order, with the tokenizer and the files transformers reads its
  settings from (``write_hf_tokenizer``).
- A fine-tuned model in its source's layout (``write_checkpoint``).

Two formats are written beside their readers, since both directions share their names and rules:
peft's adapter files (``llama.checkpoints.peft.write_adapter``) and Llama 3's vocabulary files
(``llama.checkpoints.bpe_files``). ``llama.checkpoints.hf_tokenizer_files`` builds a Hugging Face
folder's tokenizer files, which ``write_hf_tokenizer`` writes.
"""

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from safetensors.torch import save_file

from llama.checkpoints import hf
from llama.checkpoints.bpe_files import write_tiktoken_file
from llama.checkpoints.hf import HfFolder, hf_names, to_hf_order
from llama.checkpoints.hf_tokenizer_files import write_hf_tokenizer_files
from llama.checkpoints.loader import TensorLayout, checkpoint_folder, layout_of, rank_part
from llama.model import ModelArgs, rope_frequencies
from llama.tokenizer import TOKENIZER_FILE, TiktokenTokenizer, Tokenizer

logger = logging.getLogger(__name__)

# files of a Hugging Face folder that are not weights: tokenization, generation, the chat template
HF_SIDE_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


@contextlib.contextmanager
def output_folder(out_dir: str) -> Iterator[Path]:
    """The output folder, absent or empty, created; if the block fails (a refused tokenizer, a full
    disk, Ctrl-C), what it wrote is removed, with the folders it created for it."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out_dir} already exists and is not an empty directory")
    created = None if out.exists() else out  # the outermost folder this creates
    while created is not None and not created.parent.exists():
        created = created.parent
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield out
    except BaseException:
        if created is not None:
            shutil.rmtree(created)
        else:
            for path in out.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        raise


def owned(tensor: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``tensor`` in ``dtype`` (None: as it is), as a tensor owning its storage: savers write a
    view's whole storage (torch.save) or refuse shared memory (safetensors)."""
    tensor = tensor.to(dtype or tensor.dtype)
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


# ---- Meta's layout ----------------------------------------------------------------------------------


def meta_shard_path(out: Path, shard: int) -> Path:
    return out / f"consolidated.{shard:02d}.pth"


def write_meta_shard(
    path: Path, tensors: Iterable[Tuple[str, torch.Tensor]], dtype: Optional[torch.dtype] = None
) -> None:
    """One ``consolidated.NN.pth``: the (key, slice) pairs, each in ``dtype`` (None: its own)."""
    torch.save({key: owned(tensor, dtype) for key, tensor in tensors}, path)


def write_meta_tokenizer(out: Path, tokenizer: Tokenizer, tokenizer_path: str) -> None:
    """The tokenizer in Meta's form: a sentencepiece model copied, Llama 3's as Meta's tiktoken
    ``tokenizer.model`` (refused for a vocabulary Meta's file cannot hold)."""
    if isinstance(tokenizer, TiktokenTokenizer):
        write_tiktoken_file(tokenizer.vocabulary, out / TOKENIZER_FILE)
    else:
        shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)


def save_checkpoint(
    ckpt_dir: str, params: dict, state: Dict[str, torch.Tensor], n_shards: int = 1, dtype: torch.dtype = torch.bfloat16
) -> None:
    """Write full (unsharded) tensors as ``n_shards`` shards in Meta's layout, with ``params.json``
    and the rotary frequencies Meta's shards carry."""
    args = ModelArgs.from_dict({**params, "vocab_size": state["tok_embeddings.weight"].shape[0]})
    out = Path(ckpt_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params))
    layout = layout_of(args)
    for shard in range(n_shards):
        tensors = {key: rank_part(tensor, layout[key].split_dim, shard, n_shards) for key, tensor in state.items()}
        tensors["rope.freqs"] = rope_frequencies(args.head_dim, args.rope_theta)
        write_meta_shard(meta_shard_path(out, shard), tensors.items(), dtype)


# ---- Hugging Face's layout --------------------------------------------------------------------------


def file_groups(layout: Dict[str, TensorLayout], n_files: int) -> List[List[str]]:
    """The keys, in order, cut into ``n_files`` non-empty runs of about equal size."""
    keys = list(layout)
    if not 1 <= n_files <= len(keys):
        raise ValueError(
            f"--shards for the hf format must be between 1 and the number of tensors ({len(keys)}), got {n_files}"
        )
    sizes = [shape.numel() for shape, _ in layout.values()]
    total, cuts, seen = sum(sizes), [0], 0
    for i, size in enumerate(sizes):  # cut before key i when the files begun so far hold their share
        n_begun = len(cuts)
        share_held = seen * n_files >= n_begun * total
        keys_just_suffice = len(keys) - i == n_files - n_begun  # one key left for each file not begun
        if i > cuts[-1] and n_begun < n_files and (share_held or keys_just_suffice):
            cuts.append(i)
        seen += size
    cuts.append(len(keys))
    return [keys[begin:end] for begin, end in zip(cuts, cuts[1:])]


def hf_file_names(n_files: int) -> List[str]:
    if n_files == 1:
        return [hf.SAFETENSORS]
    return [f"model-{i + 1:05d}-of-{n_files:05d}.safetensors" for i in range(n_files)]


def write_hf_weights(
    out: Path,
    tensors: Iterable[Tuple[str, torch.Tensor]],
    args: ModelArgs,
    groups: List[List[str]],
    dtype: Optional[torch.dtype] = None,
) -> torch.dtype:
    """``tensors`` (Meta's keys, whole tensors, in the order of ``groups``) in transformers' names and
    row order, as one safetensors file per group of keys (with their index when more than one), each
    file assembled and written in turn; returns the dtype written."""
    names, file_names = hf_names(args.n_layers, tied=False), hf_file_names(len(groups))
    last_keys = {group[-1]: file_name for group, file_name in zip(groups, file_names)}
    weight_map, total_size, held, out_dtype = {}, 0, {}, None
    for key, tensor in tensors:
        tensor = owned(to_hf_order(key, tensor, args), dtype)
        held[names[key]], out_dtype = tensor, tensor.dtype
        total_size += tensor.nbytes
        if key in last_keys:  # this file is complete: write it and let its tensors go
            save_file(held, out / last_keys[key], metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(held, last_keys[key]))
            logger.info("wrote %s", out / last_keys[key])
            held = {}
    if len(groups) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out / hf.SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return out_dtype


def write_hf_tokenizer(out: Path, tokenizer: Tokenizer, tokenizer_path: str, max_position_embeddings: int) -> None:
    """The tokenizer of a Hugging Face folder: a sentencepiece model copied, and the files transformers
    reads the tokenizer and its settings from (``llama.checkpoints.hf_tokenizer_files``)."""
    if not isinstance(tokenizer, TiktokenTokenizer):
        shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
    write_hf_tokenizer_files(tokenizer, out, max_position_embeddings)


# ---- a fine-tuned model -----------------------------------------------------------------------------


def write_checkpoint(
    out_dir: Path,
    ckpt_dir: str,
    tokenizer_path: str,
    args: ModelArgs,
    tensors: Iterable[Tuple[str, torch.Tensor]],
    dtype: torch.dtype,
) -> None:
    """Write ``tensors`` (Meta's keys, whole tensors) in ``dtype`` as a checkpoint in ``ckpt_dir``'s
    layout, into ``out_dir`` (replaced if it exists, as a resumed run's): written beside it, then renamed,
    so that ``Llama.build`` and the examples load it alone. A Hugging Face folder keeps its source's
    tokenizer and generation settings and chat template."""
    final, out_dir = out_dir, out_dir.with_name(out_dir.name + ".partial")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    state: Dict[str, torch.Tensor] = {key: tensor.to(dtype).contiguous() for key, tensor in tensors}
    source = checkpoint_folder(ckpt_dir)
    if isinstance(source, HfFolder):
        write_hf_weights(out_dir, state.items(), args, [list(state)])
        config = {
            **hf.read_config(ckpt_dir),
            "tie_word_embeddings": False,
            "torch_dtype": str(dtype).removeprefix("torch."),
            "dtype": str(dtype).removeprefix("torch."),
        }
        (out_dir / hf.CONFIG).write_text(json.dumps(config, indent=2))
        for name in HF_SIDE_FILES:
            if (Path(ckpt_dir) / name).is_file():
                shutil.copyfile(Path(ckpt_dir) / name, out_dir / name)
    else:
        save_checkpoint(str(out_dir), source.params(), state, n_shards=1, dtype=dtype)
    if not any((out_dir / name).is_file() for name in ("tokenizer.model", "tokenizer.json")):
        shutil.copyfile(tokenizer_path, out_dir / Path(tokenizer_path).name)
    if final.exists():
        shutil.rmtree(final)
    out_dir.rename(final)
