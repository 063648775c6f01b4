"""Rewrite a checkpoint in Meta's layout into another number of shards.

    python -m llama.reshard --ckpt_dir llama-2-13b/ --out llama-2-13b-mp1/ --shards 1

Any process count can load any checkpoint (``llama.checkpoints.loader`` reshards at load), but a checkpoint
saved with as many shards as processes loads fastest: each rank memory-maps one file. The output
holds ``consolidated.00.pth`` ... in Meta's layout, every tensor in its original dtype, the source's
``rope.freqs``, and copies of ``params.json`` and the tokenizer. The token embedding is split as Meta's
code for the model splits it: Llama 2's on the features, Llama 3's on the vocabulary (as the source's
shards are, or, from one shard, when the tokenizer is Llama 3's). Target shards are written one at a time,
each assembled from memory-mapped sources, so the tool needs memory for one target shard, not the model.
"""

import argparse
import logging
import shutil
from itertools import chain
from pathlib import Path
from typing import List, Optional

from llama.checkpoints.hf import HfFolder
from llama.checkpoints.loader import (
    EMBEDDING_KEY,
    IGNORED_KEYS,
    VOCABULARY_DIM,
    check_shard,
    checkpoint_folder,
    checkpoint_vocab_size,
    layout_of,
    load_shard,
    meta_layout,
    rank_slices,
    shard_paths,
    split_dims,
)
from llama.checkpoints.writers import meta_shard_path, write_meta_shard
from llama.cli import add_flags, run_parser
from llama.layers.parallel import check_world_size
from llama.model import ModelArgs
from llama.tokenizer import TOKENIZER_FILE, resolve_tokenizer_path, tokenizer_kind

logger = logging.getLogger(__name__)


def reshard(ckpt_dir: str, out_dir: str, n_shards: int, tokenizer_path: Optional[str] = None) -> None:
    """Write the checkpoint in ``ckpt_dir`` to ``out_dir`` (absent or empty) as ``n_shards`` shards.

    Args:
        ckpt_dir: a checkpoint in Meta's layout (a Hugging Face folder is refused, naming ``llama.convert``).
        out_dir: the output folder, absent or empty.
        n_shards: the number of ``consolidated.NN.pth`` files to write.
        tokenizer_path: the tokenizer to copy into ``out_dir``; None: ``tokenizer.model`` in or beside
            ``ckpt_dir`` if there is one (without one, the output has none, and a warning says so).
    """
    if not isinstance(n_shards, int) or isinstance(n_shards, bool) or n_shards < 1:
        raise ValueError(f"the number of shards must be a positive integer, got {n_shards!r}")
    folder = checkpoint_folder(ckpt_dir)
    if isinstance(folder, HfFolder):
        raise ValueError(
            f"{ckpt_dir} is a Hugging Face folder (config.json); reshard rewrites Meta's layout. Convert it instead: "
            f"python -m llama.convert --ckpt_dir {ckpt_dir} --out {out_dir} --format meta --shards {n_shards}"
        )
    params = folder.params()
    paths = shard_paths(ckpt_dir)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {out_dir} already exists and is not an empty directory")

    vocab_size = checkpoint_vocab_size(paths, params.get("dim", ModelArgs.dim))
    args = ModelArgs.from_dict({**params, "vocab_size": vocab_size}, source=str(folder.params_path))
    check_world_size(args.split_sizes, n_shards)
    layout = layout_of(args)  # from params.json, in this single process
    for path in paths:  # every source shard checked before anything is written (memory-mapped: headers only)
        check_shard(path, load_shard(path), layout, len(paths))
    first = load_shard(paths[0])
    extras = {key: first[key] for key in IGNORED_KEYS if key in first}  # rope.freqs, kept as Meta ships it

    tokenizer = tokenizer_to_copy(ckpt_dir, tokenizer_path)
    out_layout = meta_layout(layout, splits_vocabulary(paths, first, layout, tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(ckpt_dir) / "params.json", out / "params.json")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)
        logger.info("copied %s", tokenizer)
    for shard in range(n_shards):  # one shard assembled at a time, from memory-mapped views in the source's dtypes
        path = meta_shard_path(out, shard)
        write_meta_shard(path, chain(rank_slices(paths, out_layout, shard, n_shards), extras.items()))
        logger.info("wrote %s (%d of %d)", path, shard + 1, n_shards)


def tokenizer_to_copy(ckpt_dir: str, tokenizer_path: Optional[str]) -> Optional[str]:
    """The tokenizer file reshard copies: the one given (which must exist), else the one
    ``resolve_tokenizer_path`` finds, else None, with a warning."""
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"--tokenizer_path {tokenizer_path} is not a file")
    try:
        return resolve_tokenizer_path(ckpt_dir, tokenizer_path)
    except FileNotFoundError as missing:
        logger.warning("the output will have no %s: %s", TOKENIZER_FILE, missing)
        return None


def splits_vocabulary(paths: List[Path], first: dict, layout: dict, tokenizer: Optional[str]) -> bool:
    """Whether Meta's code for this model splits the embedding on the vocabulary (Llama 3's does): as
    the source's shards do, or, for one source shard, when its ``tokenizer`` is Llama 3's."""
    if len(paths) > 1:
        return split_dims(paths[0], first, layout, len(paths))[EMBEDDING_KEY] == VOCABULARY_DIM
    if tokenizer is None:
        logger.info("no tokenizer: the embedding is split as Llama 2's code splits it")
        return False
    return tokenizer_kind(tokenizer) != "sentencepiece"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llama.reshard", description=__doc__.split("\n\n")[0])
    add_flags(
        parser,
        "ckpt_dir",
        ckpt_dir={"required": True, "help": "the checkpoint folder: params.json and consolidated.NN.pth"},
    )
    parser.add_argument("--out", required=True, help="output directory; must not exist or be empty")
    parser.add_argument("--shards", required=True, type=int, help="number of shards to write")
    parser.add_argument(
        "--tokenizer_path", default=None, help="tokenizer.model to copy; default: the one in or beside --ckpt_dir"
    )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_parser(
        parser, lambda options: reshard(options.ckpt_dir, options.out, options.shards, options.tokenizer_path), argv
    )


if __name__ == "__main__":
    main()
