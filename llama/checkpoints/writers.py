"""A fine-tuned model written as a checkpoint in its source's layout (``OUT/checkpoint``), which
``Llama.build`` and the examples load alone: Meta's ``params.json`` + ``consolidated.00.pth``, or a
Hugging Face folder's ``config.json`` + ``model.safetensors``, each with the source's tokenizer files
(and, for a folder, its tokenizer and generation settings and chat template)."""

import json
import shutil
from pathlib import Path
from typing import Dict, Iterable, Tuple

import torch
from safetensors.torch import save_file

from llama.checkpoints import hf
from llama.checkpoints.loader import checkpoint_folder, save_checkpoint
from llama.checkpoints.hf import HfFolder, hf_names, to_hf_order
from llama.model import ModelArgs

# files of a Hugging Face folder that are not weights: tokenization, generation, the chat template
HF_SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "chat_template.jinja")


def write_checkpoint(out_dir: Path, ckpt_dir: str, tokenizer_path: str, args: ModelArgs,
                     tensors: Iterable[Tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
    """Write ``tensors`` (Meta's keys, whole tensors) in ``dtype`` as a checkpoint in ``ckpt_dir``'s
    layout, into ``out_dir`` (replaced if it exists, as a resumed run's): written beside it, then renamed."""
    final, out_dir = out_dir, out_dir.with_name(out_dir.name + ".partial")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    state: Dict[str, torch.Tensor] = {key: tensor.to(dtype).contiguous() for key, tensor in tensors}
    source = checkpoint_folder(ckpt_dir)
    if isinstance(source, HfFolder):
        names = hf_names(args.n_layers, tied=False)
        save_file({names[key]: to_hf_order(key, tensor, args).contiguous() for key, tensor in state.items()},
                  str(out_dir / hf.SAFETENSORS), metadata={"format": "pt"})
        config = {**hf.read_config(ckpt_dir), "tie_word_embeddings": False,
                  "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch.")}
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
