"""Convert a checkpoint between Meta's layout and Hugging Face transformers' Llama layout.

    python -m llama.convert --ckpt_dir Llama-2-7b-hf/ --out llama-2-7b/ --format meta
    python -m llama.convert --ckpt_dir llama-2-13b/ --out Llama-2-13b-hf/ --format hf --shards 3

The source may be either layout (Meta's ``params.json`` + ``consolidated.NN.pth``, or a folder with
``config.json``). To Meta: ``params.json`` with only the keys Meta's own ``ModelArgs`` knows (any
feed-forward size written through multiple_of / ffn_dim_multiplier, rope_theta only when it is not
10000), and ``--shards`` files ``consolidated.NN.pth`` split as Meta splits them, so that Meta's
reference code loads the result unchanged. To Hugging Face: ``config.json`` for ``LlamaForCausalLM``
and ``--shards`` safetensors files (with ``model.safetensors.index.json`` when more than one), wq and
wk rows in transformers' rotary order. Llama 3's rope scaling is ``use_scaled_rope`` (with the keys of
``llama.model.ROPE_SCALING_KEYS`` for values other than Meta's constants) in params.json and
``rope_scaling`` of type llama3 in config.json; Meta's Llama 3 shards split the embedding on the
vocabulary. A sentencepiece ``tokenizer.model`` is copied; Llama 3's tokenizer is written in the
target's form (Meta's tiktoken ``tokenizer.model``, or ``tokenizer.json``), which reads back with the
same ids. A Hugging Face folder also gets the files transformers reads the tokenizer's settings, chat
template and stop tokens from (``llama.checkpoints.hf_tokenizer_files``), so that ``AutoTokenizer`` and
``generate`` work as this package does. One output file is assembled at a time from memory-mapped
sources: the tool needs memory for one output file. A conversion that fails or is interrupted removes
what it wrote.
"""

import argparse
import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from safetensors.torch import save_file

from llama.checkpoints.bpe_files import write_tiktoken_file
from llama.checkpoints.loader import TensorLayout, embedding_rows, layout_of, meta_layout, params_path, rank_tensors, read_params
from llama.cli import add_flags, run_parser
from llama.checkpoints.hf import SAFETENSORS, SAFETENSORS_INDEX, hf_names, params_to_config, rotary_to_hf
from llama.checkpoints.hf_tokenizer_files import write_hf_tokenizer_files
from llama.model import ModelArgs
from llama.layers.parallel import check_world_size
from llama.tokenizer import TOKENIZER_FILE, TiktokenTokenizer, Tokenizer, resolve_tokenizer_path

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "source": None}


def source_model(ckpt_dir: str) -> Tuple[dict, ModelArgs]:
    """The source's params (Meta's keys) and its full hyper-parameters, vocabulary size included."""
    params = read_params(ckpt_dir)
    rows, _ = embedding_rows(ckpt_dir, params)
    return params, ModelArgs.from_dict({**params, "vocab_size": rows}, source=str(params_path(ckpt_dir)))


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


def write_meta_tokenizer(out: Path, tokenizer: Tokenizer, tokenizer_path: str) -> None:
    """The tokenizer in Meta's form: a sentencepiece model copied, Llama 3's as Meta's tiktoken
    ``tokenizer.model`` (refused for a vocabulary Meta's file cannot hold)."""
    if isinstance(tokenizer, TiktokenTokenizer):
        write_tiktoken_file(tokenizer.vocabulary, out / TOKENIZER_FILE)
    else:
        shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)


def owned(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``tensor`` in ``dtype`` (None: as it is), as a tensor owning its storage: savers write a
    view's whole storage (torch.save) or refuse shared memory (safetensors)."""
    tensor = tensor.to(dtype or tensor.dtype)
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor


def to_meta(
    ckpt_dir: str, params: dict, args: ModelArgs, out_dir: str, n_shards: int, dtype: Optional[torch.dtype],
    tokenizer: Tokenizer, tokenizer_path: str,
) -> None:
    """Write ``n_shards`` consolidated.NN.pth files: shard s is what rank s of n_shards loads in Meta's
    code for the model (Llama 3's splits the embedding on the vocabulary)."""
    check_world_size(args.split_sizes, n_shards)
    layout = meta_layout(layout_of(args), tokenizer.chat_format == "llama3")  # this single process: whole shapes
    with output_folder(out_dir) as out:
        write_meta_tokenizer(out, tokenizer, tokenizer_path)
        (out / "params.json").write_text(json.dumps(params, indent=2))
        for shard in range(n_shards):
            state = {key: owned(tensor, dtype) for key, tensor in rank_tensors(ckpt_dir, args, layout, shard, n_shards)}
            path = out / f"consolidated.{shard:02d}.pth"
            torch.save(state, path)
            logger.info("wrote %s (%d of %d)", path, shard + 1, n_shards)


def file_groups(layout: Dict[str, TensorLayout], n_files: int) -> List[List[str]]:
    """The keys, in order, cut into ``n_files`` non-empty runs of about equal size."""
    keys = list(layout)
    if not 1 <= n_files <= len(keys):
        raise ValueError(f"--shards for the hf format must be between 1 and the number of tensors ({len(keys)}), got {n_files}")
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
        return [SAFETENSORS]
    return [f"model-{i + 1:05d}-of-{n_files:05d}.safetensors" for i in range(n_files)]


def hf_tensor(key: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """A full tensor in transformers' row order (only wq and wk differ)."""
    if key.endswith("attention.wq.weight"):
        return rotary_to_hf(tensor, args.n_heads)
    if key.endswith("attention.wk.weight"):
        return rotary_to_hf(tensor, args.n_kv_heads)
    return tensor


def trained_context(params: dict, args: ModelArgs, tokenizer: Tokenizer) -> int:
    """The context length the checkpoint was trained for: params.json's max_seq_len where it states one
    (train.py writes its windows' length there); otherwise the one a Meta checkpoint was released with,
    which Meta's files do not state: 131072 with Llama 3.1's rope scaling (3.1, 3.2), 8192 for Llama 3.0
    (a tiktoken tokenizer), 16384 for Code Llama (rope_theta 1e6), 4096 for Llama 2."""
    if "max_seq_len" in params:
        return args.max_seq_len
    if args.rope_scaling is not None:
        return 131072
    if isinstance(tokenizer, TiktokenTokenizer):
        return 8192
    return 16384 if args.rope_theta == 1e6 else 4096


def to_hf(
    ckpt_dir: str, params: dict, args: ModelArgs, out_dir: str, n_files: int, dtype: Optional[torch.dtype],
    tokenizer: Tokenizer, tokenizer_path: str, max_position_embeddings: Optional[int],
) -> None:
    """Write config.json and ``n_files`` safetensors files (with their index when more than one), and
    the tokenizer with the files transformers reads its settings from (``llama.checkpoints.hf_tokenizer_files``)."""
    layout = layout_of(args)  # this single process: whole shapes
    groups = file_groups(layout, n_files)
    if max_position_embeddings is None:
        max_position_embeddings = trained_context(params, args, tokenizer)
        logger.info("max_position_embeddings: %d (the model's trained context; --max_position_embeddings sets another)",
                    max_position_embeddings)
    with output_folder(out_dir) as out:
        if not isinstance(tokenizer, TiktokenTokenizer):
            shutil.copyfile(tokenizer_path, out / TOKENIZER_FILE)
        write_hf_tokenizer_files(tokenizer, out, max_position_embeddings)
        out_dtype = write_safetensors(ckpt_dir, args, layout, groups, dtype, out)
        config = params_to_config(args, out_dtype, tokenizer.bos_id, tokenizer.eos_id, max_position_embeddings)
        (out / "config.json").write_text(json.dumps(config, indent=2))


def write_safetensors(
    ckpt_dir: str, args: ModelArgs, layout: Dict[str, TensorLayout], groups: List[List[str]], dtype: Optional[torch.dtype], out: Path,
) -> torch.dtype:
    """The tensors in transformers' names as one safetensors file per group of keys (with their index
    when more than one), each file assembled and written in turn; returns the dtype written."""
    names, file_names = hf_names(args.n_layers, tied=False), hf_file_names(len(groups))
    last_keys = {group[-1]: file_name for group, file_name in zip(groups, file_names)}
    weight_map, total_size, tensors, out_dtype = {}, 0, {}, None
    for key, tensor in rank_tensors(ckpt_dir, args, layout, 0, 1):
        tensor = owned(hf_tensor(key, tensor, args), dtype)
        tensors[names[key]], out_dtype = tensor, tensor.dtype
        total_size += tensor.nbytes
        if key in last_keys:  # this file is complete: write it and let its tensors go
            save_file(tensors, out / last_keys[key], metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, last_keys[key]))
            logger.info("wrote %s", out / last_keys[key])
            tensors = {}
    if len(groups) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return out_dtype


def convert(
    ckpt_dir: str,
    out_dir: str,
    format: str,
    shards: int = 1,
    dtype: str = "bfloat16",
    tokenizer_path: Optional[str] = None,
    max_position_embeddings: Optional[int] = None,
) -> None:
    """Convert the checkpoint in ``ckpt_dir`` (either layout) into ``out_dir`` (absent or empty).

    Args:
        format: "meta" or "hf", the layout to write.
        shards: consolidated.NN.pth files for "meta" (any count dividing heads, hidden sizes and
            vocabulary); safetensors files for "hf".
        dtype: "bfloat16", "float16", "float32", or "source" to keep each tensor's dtype.
        tokenizer_path: the source's tokenizer (tokenizer.model or tokenizer.json); None: the one in ``ckpt_dir``.
        max_position_embeddings: written to config.json; None: the context the model was trained for
            (``trained_context``: params.json's max_seq_len where it has one, else the released context
            of Meta's models: Llama 2 4096, Code Llama 16384, Llama 3.0 8192, 3.1 and 3.2 131072).
    """
    if format not in ("meta", "hf"):
        raise ValueError(f"format must be 'meta' or 'hf', got {format!r}")
    if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
        raise ValueError(f"the number of shards must be a positive integer, got {shards!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    params, args = source_model(ckpt_dir)
    tokenizer_path = resolve_tokenizer_path(ckpt_dir, tokenizer_path)
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.n_words != args.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the checkpoint's token embedding has "
            f"{args.vocab_size} rows: this tokenizer is not the checkpoint's"
        )
    if format == "meta":
        to_meta(ckpt_dir, params, args, out_dir, shards, DTYPES[dtype], tokenizer, tokenizer_path)
    else:
        to_hf(ckpt_dir, params, args, out_dir, shards, DTYPES[dtype], tokenizer, tokenizer_path,
              max_position_embeddings)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.convert", description=__doc__.split("\n\n")[0])
    add_flags(parser, "ckpt_dir", ckpt_dir={"required": True, "help": (
        "the source: Meta's params.json + consolidated.NN.pth, or a Hugging Face folder (config.json)")})
    parser.add_argument("--out", required=True, help="output directory; must not exist or be empty")
    parser.add_argument("--format", required=True, choices=["meta", "hf"], help="the layout to write")
    parser.add_argument("--shards", type=int, default=1, help="output files: consolidated.NN.pth (meta) or safetensors (hf)")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="dtype of the written tensors")
    add_flags(parser, "tokenizer_path")
    parser.add_argument("--max_position_embeddings", type=int, default=None,
                        help="written to config.json (hf); default: params.json's max_seq_len, else the model's "
                             "released context (Llama 2 4096, Code Llama 16384, Llama 3.0 8192, 3.1/3.2 131072)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_parser(parser, lambda options: convert(
        options.ckpt_dir, options.out, options.format, options.shards, options.dtype, options.tokenizer_path,
        options.max_position_embeddings,
    ), argv)


if __name__ == "__main__":
    main()
