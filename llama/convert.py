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
import json
import logging
from typing import List, Optional, Tuple

import torch

from llama.checkpoints.hf import params_to_config
from llama.checkpoints.loader import CheckpointFolder, checkpoint_folder, layout_of, meta_layout
from llama.checkpoints.writers import (
    file_groups,
    meta_shard_path,
    output_folder,
    write_hf_tokenizer,
    write_hf_weights,
    write_meta_shard,
    write_meta_tokenizer,
)
from llama.cli import add_flags, run_parser
from llama.layers.parallel import check_world_size
from llama.model import ModelArgs
from llama.tokenizer import TiktokenTokenizer, Tokenizer, resolve_tokenizer_path

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "source": None}


def source_model(ckpt_dir: str) -> Tuple[dict, ModelArgs]:
    """The source's params (Meta's keys) and its full hyper-parameters, vocabulary size included."""
    folder = checkpoint_folder(ckpt_dir)
    params = folder.params()
    rows, _ = folder.embedding_rows(params)
    return params, ModelArgs.from_dict({**params, "vocab_size": rows}, source=str(folder.params_path))


def to_meta(
    source: CheckpointFolder,
    params: dict,
    args: ModelArgs,
    out_dir: str,
    n_shards: int,
    dtype: Optional[torch.dtype],
    tokenizer: Tokenizer,
    tokenizer_path: str,
) -> None:
    """Write ``n_shards`` consolidated.NN.pth files: shard s is what rank s of n_shards loads in Meta's
    code for the model (Llama 3's splits the embedding on the vocabulary)."""
    check_world_size(args.split_sizes, n_shards)
    layout = meta_layout(layout_of(args), tokenizer.chat_format == "llama3")  # this single process: whole shapes
    with output_folder(out_dir) as out:
        write_meta_tokenizer(out, tokenizer, tokenizer_path)
        (out / "params.json").write_text(json.dumps(params, indent=2))
        for shard in range(n_shards):
            path = meta_shard_path(out, shard)
            write_meta_shard(path, source.rank_tensors(args, layout, shard, n_shards), dtype)
            logger.info("wrote %s (%d of %d)", path, shard + 1, n_shards)


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
    source: CheckpointFolder,
    params: dict,
    args: ModelArgs,
    out_dir: str,
    n_files: int,
    dtype: Optional[torch.dtype],
    tokenizer: Tokenizer,
    tokenizer_path: str,
    max_position_embeddings: Optional[int],
) -> None:
    """Write config.json and ``n_files`` safetensors files (with their index when more than one), and
    the tokenizer with the files transformers reads its settings from (``llama.checkpoints.hf_tokenizer_files``)."""
    layout = layout_of(args)  # this single process: whole shapes
    groups = file_groups(layout, n_files)
    if max_position_embeddings is None:
        max_position_embeddings = trained_context(params, args, tokenizer)
        logger.info(
            "max_position_embeddings: %d (the model's trained context; --max_position_embeddings sets another)",
            max_position_embeddings,
        )
    with output_folder(out_dir) as out:
        write_hf_tokenizer(out, tokenizer, tokenizer_path, max_position_embeddings)
        out_dtype = write_hf_weights(out, source.rank_tensors(args, layout, 0, 1), args, groups, dtype)
        config = params_to_config(args, out_dtype, tokenizer.bos_id, tokenizer.eos_id, max_position_embeddings)
        (out / "config.json").write_text(json.dumps(config, indent=2))


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
        to_meta(checkpoint_folder(ckpt_dir), params, args, out_dir, shards, DTYPES[dtype], tokenizer, tokenizer_path)
    else:
        to_hf(
            checkpoint_folder(ckpt_dir),
            params,
            args,
            out_dir,
            shards,
            DTYPES[dtype],
            tokenizer,
            tokenizer_path,
            max_position_embeddings,
        )


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.convert", description=__doc__.split("\n\n")[0])
    add_flags(
        parser,
        "ckpt_dir",
        ckpt_dir={
            "required": True,
            "help": ("the source: Meta's params.json + consolidated.NN.pth, or a Hugging Face folder (config.json)"),
        },
    )
    parser.add_argument("--out", required=True, help="output directory; must not exist or be empty")
    parser.add_argument("--format", required=True, choices=["meta", "hf"], help="the layout to write")
    parser.add_argument(
        "--shards", type=int, default=1, help="output files: consolidated.NN.pth (meta) or safetensors (hf)"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES), help="dtype of the written tensors")
    add_flags(parser, "tokenizer_path")
    parser.add_argument(
        "--max_position_embeddings",
        type=int,
        default=None,
        help="written to config.json (hf); default: params.json's max_seq_len, else the model's "
        "released context (Llama 2 4096, Code Llama 16384, Llama 3.0 8192, 3.1/3.2 131072)",
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_parser(
        parser,
        lambda options: convert(
            options.ckpt_dir,
            options.out,
            options.format,
            options.shards,
            options.dtype,
            options.tokenizer_path,
            options.max_position_embeddings,
        ),
        argv,
    )


if __name__ == "__main__":
    main()
