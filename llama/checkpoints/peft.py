"""LoRA adapters on disk, in peft's format, so that every tool that reads peft's files reads ours:

- ``adapter_config.json``: ``peft_type`` "LORA", ``r``, ``lora_alpha``, ``lora_dropout``,
  ``target_modules`` (transformers' names: q_proj, ..., down_proj), ``task_type`` "CAUSAL_LM".
- ``adapter_model.safetensors``: ``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``
  (rank, in_features) and ``...lora_B.weight`` (out_features, rank), transformers' key names.

The adapters are those of transformers' model of the checkpoint, so the q and k adapters are in its
row order: Meta's interleaved rotary pairs become halves (``llama.checkpoints.hf.to_hf_order``), which
permutes the rows of B and leaves A alone (P (B A) = (P B) A). ``read_adapter`` undoes it.

A model built with an adapter (``Llama.build(adapter_dir=...)``) merges it into the weights as they are
read, before any quantization or split over ranks (``merge_adapter``): decoding costs nothing more.
"""

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llama.checkpoints.files import read_json_object
from llama.checkpoints.hf import to_hf_order, to_meta_order
from llama.layers.lora import TARGETS, LoraConfig
from llama.model import ModelArgs

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model.model.layers."
KEY_PATTERN = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.lora_([AB])\.weight")
PEFT_NAMES = {peft: meta for meta, (_, peft) in TARGETS.items()}  # self_attn.q_proj -> wq
META_MODULES = {
    "wq": "attention.wq",
    "wk": "attention.wk",
    "wv": "attention.wv",
    "wo": "attention.wo",
    "w1": "feed_forward.w1",
    "w2": "feed_forward.w2",
    "w3": "feed_forward.w3",
}
# settings of peft's LoRA this project does not compute: each must be absent or one of its plain values
PLAIN_SETTINGS = {
    "use_dora": (False,),
    "use_rslora": (False,),
    "fan_in_fan_out": (False,),
    "bias": ("none",),
    "modules_to_save": (None, []),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
}


def write_adapter(
    out_dir: str,
    state: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
    config: LoraConfig,
    args: ModelArgs,
    base_model: str,
) -> None:
    """Write ``state`` (Meta's module name, e.g. ``layers.0.attention.wq`` -> (A, B), full tensors)
    as peft's two files in ``out_dir``."""
    tensors = {}
    for module, (lora_a, lora_b) in state.items():
        layer, name = module.split(".")[1], module.rpartition(".")[2]
        key = f"{PEFT_PREFIX}{layer}.{TARGETS[name][1]}"
        tensors[f"{key}.lora_A.weight"] = lora_a.detach().float().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = to_hf_order(module, lora_b.detach().float().cpu(), args).contiguous()
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(TARGETS[name][1].rpartition(".")[2] for name in config.targets),
        "inference_mode": True,
        "init_lora_weights": True,
        **{key: values[0] for key, values in PLAIN_SETTINGS.items()},
    }
    out = Path(out_dir)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2))


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter read from its folder: its settings, (A, B) per Meta module name in Meta's row
    order, and ``identity``, a hash of its two files (two adapters compute alike only if it is equal)."""

    path: str
    config: LoraConfig
    tensors: Dict[str, Tuple[torch.Tensor, torch.Tensor]]
    identity: str

    def delta(self, module: str) -> torch.Tensor:
        """The change ``scale * B A`` (out_features, in_features) to the weight of ``module``, float32."""
        lora_a, lora_b = self.tensors[module]
        return self.config.scale * (lora_b.float() @ lora_a.float())


def read_adapter(adapter_dir: str, args: ModelArgs) -> Adapter:
    """Read and check a peft LoRA adapter for the model ``args`` describes.

    Args:
        adapter_dir: the folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        args: the base model's hyper-parameters (layers, heads, sizes).

    Returns:
        The ``Adapter``.
    """
    folder = Path(adapter_dir)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"adapter {adapter_dir}: {path.name} not found "
                f"(an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})"
            )
    peft_config = read_json_object(config_path)
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"{config_path}: peft_type must be 'LORA', got {peft_config.get('peft_type')!r}")
    for key, plain in PLAIN_SETTINGS.items():
        if peft_config.get(key, plain[0]) not in plain:
            raise ValueError(f"{config_path}: {key}={peft_config[key]!r} is not supported (only {plain[0]!r})")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from None
    pairs: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY_PATTERN.fullmatch(key)
        if not match or match.group(2) not in PEFT_NAMES or int(match.group(1)) >= args.n_layers:
            raise ValueError(
                f"{weights_path}: unexpected key {key!r}; expected {PEFT_PREFIX}<layer below {args.n_layers}>."
                f"<{'|'.join(PEFT_NAMES)}>.lora_<A|B>.weight"
            )
        name = PEFT_NAMES[match.group(2)]
        pairs.setdefault(f"layers.{match.group(1)}.{META_MODULES[name]}", {})[match.group(3)] = tensor
    config = LoraConfig(
        rank=peft_config.get("r", 8),
        alpha=float(peft_config.get("lora_alpha", 8)),
        dropout=float(peft_config.get("lora_dropout", 0.0)),
        targets=tuple(sorted({module.rpartition(".")[2] for module in pairs}, key=list(TARGETS).index)) or ("wq",),
    )
    checked = {module: check_pair(module, parts, config.rank, args, weights_path) for module, parts in pairs.items()}
    digest = hashlib.sha256(config_path.read_bytes() + weights_path.read_bytes()).hexdigest()
    return Adapter(str(folder), config, checked, digest)


def check_pair(
    module: str, parts: Dict[str, torch.Tensor], rank: int, args: ModelArgs, path: Path
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of ``module`` in Meta's row order, checked against the model's shapes."""
    name = module.rpartition(".")[2]
    out_features = {
        "wk": args.n_kv_heads * args.head_dim,
        "wv": args.n_kv_heads * args.head_dim,
        "w1": args.ffn_hidden_dim,
        "w3": args.ffn_hidden_dim,
    }.get(name, args.dim)
    in_features = args.ffn_hidden_dim if name == "w2" else args.dim
    expected = {"A": (rank, in_features), "B": (out_features, rank)}
    for part, shape in expected.items():
        if part not in parts:
            raise ValueError(f"{path}: lora_{part} of {module} is missing")
        if tuple(parts[part].shape) != shape:
            raise ValueError(
                f"{path}: lora_{part} of {module} has shape {tuple(parts[part].shape)}, expected {shape} (r={rank})"
            )
    return parts["A"], to_meta_order(module, parts["B"], args)


def merge_adapter(
    tensors: Iterable[Tuple[str, torch.Tensor]],
    adapter: Adapter,
    split_dims: Dict[str, object],
    rank: int,
    world_size: int,
) -> Iterator[Tuple[str, torch.Tensor]]:
    """``tensors`` (Meta's key, this rank's slice) with each adapted weight plus its ``delta`` (its
    slice of it, on the dimension ``split_dims[key]`` the layer splits), in float32."""
    for key, tensor in tensors:
        module = key.removesuffix(".weight")
        if module in adapter.tensors:
            delta = adapter.delta(module)
            dim = split_dims[key]
            tensor = tensor.float() + (delta if dim is None else delta.chunk(world_size, dim=dim)[rank])
        yield key, tensor
