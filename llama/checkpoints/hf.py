"""Reading Hugging Face transformers' Llama folders: ``config.json`` and ``model*.safetensors``
(or ``pytorch_model*.bin``), next to the tokenizer (``llama.tokenizer``) and, for chat models, a chat
template.

The weights are the same matrices as Meta's under other names, with one difference: Meta rotates
the interleaved pairs (x[2i], x[2i+1]) of each head, transformers rotates the halves (x[i], x[i+d/2]),
so the rows of wq and wk are permuted within each head. The permutation never crosses a head, and
model parallelism splits wq and wk by whole heads, so each rank undoes it on its own slice.

Each tensor is read on its own, and only this rank's slice of it: safetensors' ``get_slice`` copies
just those bytes out of the memory-mapped file. ``HfFolder.rank_tensors`` yields (Meta's key, this rank's
CPU slice) pairs, the same pairs ``llama.checkpoints.loader.MetaFolder`` makes from Meta's shards, so that
placing a tensor on its device (and converting or quantizing it) is one step for both formats.
"""

import dataclasses
import json
import logging
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open

from llama.chat.format import ChatTemplate
from llama.checkpoints.files import load_tensor_dict, read_json_object
from llama.model import ROPE_SCALING_KEYS, ModelArgs, RopeScaling

logger = logging.getLogger(__name__)

CONFIG = "config.json"
SAFETENSORS_INDEX, SAFETENSORS = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN = "pytorch_model.bin.index.json", "pytorch_model.bin"
DEFAULT_ROPE_THETA = 10000.0
TOKENIZER_CONFIG, CHAT_TEMPLATE_FILE = "tokenizer_config.json", "chat_template.jinja"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")  # the ones templates read
META_ROPE_SCALING = RopeScaling()  # the constants of Meta's code, implied by use_scaled_rope

# Meta's key -> transformers' key; the layer keys sit under "layers.{i}." and "model.layers.{i}."
GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Older transformers saved each layer's rotary frequencies; they follow from rope_theta, so unused.
IGNORED_SUFFIX = "rotary_emb.inv_freq"


def is_hf_checkpoint(ckpt_dir: str) -> bool:
    """A folder with ``config.json`` and no Meta ``params.json`` (a folder with both is read as Meta's)."""
    return (Path(ckpt_dir) / CONFIG).is_file() and not (Path(ckpt_dir) / "params.json").is_file()


def hf_names(n_layers: int, tied: bool) -> Dict[str, str]:
    """Meta's key -> transformers' key for every weight. Tied: the output projection is the embedding."""
    names = dict(GLOBAL_NAMES)
    if tied:
        names["output.weight"] = GLOBAL_NAMES["tok_embeddings.weight"]
    for i in range(n_layers):
        names.update({f"layers.{i}.{meta}": f"model.layers.{i}.{hf}" for meta, hf in LAYER_NAMES.items()})
    return names


def rotary_to_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of wq/wk from Meta's interleaved pairs to transformers' halves, within each head.

    Row 2i+j of a head (pair i, j = 0 real / 1 imaginary) becomes row j*head_dim/2 + i.
    """
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_from_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``rotary_to_hf``: row j*head_dim/2 + i of a head goes back to row 2i+j."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_heads(key: str, args: ModelArgs) -> int:
    """How many heads' rows of ``key`` (a weight's key, or its module's: ``layers.0.attention.wq``)
    differ between Meta's and transformers' order: wq's and wk's, else none (0)."""
    module = key.removesuffix(".weight")
    if module.endswith("attention.wq"):
        return args.n_heads
    if module.endswith("attention.wk"):
        return args.n_kv_heads
    return 0


def to_hf_order(key: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """``key``'s whole ``tensor`` (or a tensor with its rows, as a LoRA B) in transformers' row order."""
    heads = rotary_heads(key, args)
    return rotary_to_hf(tensor, heads) if heads else tensor


def to_meta_order(key: str, tensor: torch.Tensor, args: ModelArgs, world_size: int = 1) -> torch.Tensor:
    """``key``'s ``tensor`` from transformers' row order back to Meta's; a rank's slice of ``world_size``
    holds whole heads, so it is undone on the slice alone."""
    heads = rotary_heads(key, args) // world_size
    return rotary_from_hf(tensor, heads) if heads else tensor


# ---- config.json <-> Meta's params ----------------------------------------------------------------


def read_config(ckpt_dir: str) -> dict:
    return read_json_object(Path(ckpt_dir) / CONFIG)


def rope_settings(config: dict, source: str) -> dict:
    """``rope_theta`` and, for rope_type "llama3", Meta's params.json keys of the scaling
    (``use_scaled_rope`` and ``ROPE_SCALING_KEYS``, each only when it differs from Meta's constant).

    transformers 5 keeps everything under ``rope_parameters``; 4 kept rope_theta at the top level and
    the scaling under ``rope_scaling`` (whose type older files name "type"). Other scalings (linear,
    dynamic, yarn, longrope, ...) change the angles differently and are not implemented here.
    """
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for key, value in (("rope_parameters", parameters), ("rope_scaling", scaling)):
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {key} must be an object, found {value!r}")
    kinds = {
        key: value.get("rope_type", value.get("type", "default"))
        for key, value in (("rope_parameters", parameters), ("rope_scaling", scaling))
    }
    for key, kind in kinds.items():
        if kind not in ("default", "llama3"):
            raise ValueError(
                f"{source}: {key} has rope_type {kind!r}, which is not supported; only 'default' and 'llama3' are"
            )
    params = {"rope_theta": float(parameters.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA)))}
    llama3 = (
        parameters if kinds["rope_parameters"] == "llama3" else scaling if kinds["rope_scaling"] == "llama3" else None
    )
    if llama3 is not None:
        key = "rope_parameters" if llama3 is parameters else "rope_scaling"
        missing = [name for name in ROPE_SCALING_KEYS.values() if name not in llama3]
        if missing:
            raise ValueError(f"{source}: {key} of rope_type 'llama3' lacks {missing}")
        params["use_scaled_rope"] = True
        for meta_key, name in ROPE_SCALING_KEYS.items():
            if llama3[name] != getattr(META_ROPE_SCALING, name):
                params[meta_key] = llama3[name]
    return params


def check_supported(config: dict, source: str) -> None:
    """Every setting of transformers' Llama that this model does not compute is an error naming it."""
    expected = {
        "model_type": ("llama",),
        "hidden_act": ("silu", "swish"),
        "attention_bias": (False,),
        "mlp_bias": (False,),
    }
    for key, values in expected.items():
        if config.get(key, values[0]) not in values:
            needed = " or ".join(repr(value) for value in values)
            raise ValueError(f"{source}: {key} = {config[key]!r} is not supported; this model needs {key} = {needed}")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{source}: {key} must be a positive integer, found {value!r}")
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    if config.get("head_dim") not in (None, head_dim):
        raise ValueError(
            f"{source}: head_dim = {config['head_dim']!r} is not supported; this model needs "
            f"hidden_size / num_attention_heads = {head_dim}"
        )


def meta_ffn_params(dim: int, hidden_dim: int) -> dict:
    """``multiple_of`` (and ``ffn_dim_multiplier`` if needed) that make Meta's rule give ``hidden_dim``.

    Meta's params.json has no key for the feed-forward size: it is 2/3 of 4*dim, scaled by
    ffn_dim_multiplier, rounded up to a multiple of multiple_of. Any size can be written that way;
    this picks the largest power-of-two multiple_of (Meta uses 256) and the shortest multiplier.
    """
    rule_dim = int(2 * (4 * dim) / 3)
    for multiple_of in (2**k for k in range(12, -1, -1)):
        if hidden_dim % multiple_of:
            continue
        # aim for the middle of the multipliers that work, so that float rounding cannot fall short
        candidates = [None] + [round((hidden_dim + 0.5) / rule_dim, digits) for digits in range(1, 13)]
        for multiplier in candidates:
            params = {"multiple_of": multiple_of, "ffn_dim_multiplier": multiplier}
            if ModelArgs(dim=dim, n_heads=1, **params).ffn_hidden_dim == hidden_dim:
                return {key: value for key, value in params.items() if value is not None}
    raise ValueError(f"no multiple_of / ffn_dim_multiplier gives a feed-forward size of {hidden_dim} for dim = {dim}")


def config_to_params(config: dict, source: str) -> dict:
    """Meta's params.json keys for a transformers Llama ``config``; unsupported settings are errors.

    rope_theta is kept only when it differs from 10000, as in Meta's files (Llama 2's own ModelArgs
    has no such field; Code Llama's and Llama 3's have); llama3 rope scaling is ``use_scaled_rope``.
    """
    check_supported(config, source)
    params = {
        "dim": config["hidden_size"],
        "n_layers": config["num_hidden_layers"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "vocab_size": config["vocab_size"],
        **meta_ffn_params(config["hidden_size"], config["intermediate_size"]),
        "norm_eps": config.get("rms_norm_eps", 1e-6),  # transformers' default
    }
    rope = rope_settings(config, source)
    if rope["rope_theta"] == DEFAULT_ROPE_THETA:
        del rope["rope_theta"]
    return {**params, **rope}


def params_to_config(
    args: ModelArgs, dtype: torch.dtype, bos_id: int, eos_id: int, max_position_embeddings: int
) -> dict:
    """transformers' ``config.json`` for a LlamaForCausalLM with Meta's hyper-parameters ``args``.

    rope_theta (and llama3 rope scaling) is written both where transformers 5 reads it
    (rope_parameters) and where 4 did (rope_theta, rope_scaling).
    """
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": args.rope_theta, **dataclasses.asdict(args.rope_scaling)}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": rope,
        **({"rope_scaling": rope} if args.rope_scaling is not None else {}),
        "max_position_embeddings": max_position_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def read_chat_template(ckpt_dir: str) -> Optional[ChatTemplate]:
    """The folder's chat template, if it has one: ``chat_template.jinja`` (transformers 5 saves it
    there), else the ``chat_template`` of ``tokenizer_config.json`` (a string, or a list of named
    templates of which the "default" one), with the special tokens' texts and the ``legacy`` flag of
    tokenizer_config.json."""
    folder = Path(ckpt_dir)
    config = read_json_object(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, dict):  # saved as an AddedToken
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    legacy = config.get("legacy", False)  # transformers 5's default for Llama tokenizers
    if not isinstance(legacy, bool):
        raise ValueError(f"{folder / TOKENIZER_CONFIG}: legacy must be true or false, found {legacy!r}")
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return ChatTemplate(
            source=(folder / CHAT_TEMPLATE_FILE).read_text(),
            path=str(folder / CHAT_TEMPLATE_FILE),
            tokens=tokens,
            legacy=legacy,
        )
    source = config.get("chat_template")
    if isinstance(source, list):
        source = next(
            (entry.get("template") for entry in source if isinstance(entry, dict) and entry.get("name") == "default"),
            None,
        )
    if source is None:
        return None
    if not isinstance(source, str):
        raise ValueError(
            f"{folder / TOKENIZER_CONFIG}: chat_template must be a string "
            "or a list of named templates with a 'default' one"
        )
    return ChatTemplate(source=source, path=str(folder / TOKENIZER_CONFIG), tokens=tokens, legacy=legacy)


def is_tied(ckpt_dir: str) -> bool:
    return bool(read_config(ckpt_dir).get("tie_word_embeddings", False))


# ---- weight files -----------------------------------------------------------------------------------


def weight_map(ckpt_dir: str) -> Dict[str, Path]:
    """transformers' key -> the file holding it: safetensors first, else pytorch_model*.bin.

    A sharded folder lists its files in an index; a file named there but absent is an error.
    """
    folder = Path(ckpt_dir)
    for index_name, single_name in ((SAFETENSORS_INDEX, SAFETENSORS), (BIN_INDEX, BIN)):
        if (folder / index_name).is_file():
            return read_index(folder / index_name)
        if (folder / single_name).is_file():
            return {key: folder / single_name for key in open_weights(folder / single_name).keys()}
    raise FileNotFoundError(
        f"no weights in {ckpt_dir}: expected {SAFETENSORS_INDEX}, {SAFETENSORS}, {BIN_INDEX} or {BIN}"
    )


def read_index(path: Path) -> Dict[str, Path]:
    try:
        files = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path} must be JSON with a 'weight_map' object: {error!r}") from None
    mapping = {key: path.parent / name for key, name in files.items()}
    for file in sorted(set(mapping.values())):
        if not file.is_file():
            raise FileNotFoundError(f"{file.name}, named in {path}, is not in {path.parent}")
    return mapping


def open_weights(path: Path):
    """A memory-mapped view of one weight file: safetensors' handle, or the .bin file's dict."""
    if path.suffix == ".safetensors":
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except SafetensorError as error:
            raise ValueError(f"cannot read safetensors file {path}: {error}") from None
    return load_tensor_dict(path, "weight file")


class WeightFiles:
    """The tensors of a folder by transformers' key, each file opened once and read slice by slice."""

    def __init__(self, ckpt_dir: str):
        self.files = weight_map(ckpt_dir)
        self.opened = {}

    def tensor(self, key: str):
        """A lazy tensor: safetensors' slice (nothing read until indexed) or a memory-mapped tensor."""
        path = self.files[key]
        if path not in self.opened:
            self.opened[path] = open_weights(path)
        handle = self.opened[path]
        return handle[key] if isinstance(handle, dict) else handle.get_slice(key)

    def shape(self, key: str) -> Tuple[int, ...]:
        lazy = self.tensor(key)
        return tuple(lazy.shape if isinstance(lazy, torch.Tensor) else lazy.get_shape())

    def read(self, key: str, expected_shape: Tuple[int, ...], dim: Optional[int], begin: int, end: int) -> torch.Tensor:
        """Rows or columns [begin, end) of ``key`` along ``dim`` (all of it for None), checked to be
        ``expected_shape`` in full."""
        shape = self.shape(key)
        if shape != tuple(expected_shape):
            raise ValueError(
                f"{self.files[key]}: {key} has shape {shape}, expected {tuple(expected_shape)} from {CONFIG}"
            )
        index = [slice(None)] * len(shape)
        if dim is not None:
            index[dim] = slice(begin, end)
        return self.tensor(key)[tuple(index)]


def check_keys(files: WeightFiles, names: Dict[str, str], ckpt_dir: str) -> None:
    """Every needed key present, nothing unknown (a tied lm_head may be stored; it is not used)."""
    missing = sorted(set(names.values()) - set(files.files))
    if missing:
        raise ValueError(f"{ckpt_dir}: missing weight(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    allowed = set(names.values()) | {GLOBAL_NAMES["output.weight"]}
    unexpected = sorted(k for k in files.files if k not in allowed and not k.endswith(IGNORED_SUFFIX))
    if unexpected:
        raise ValueError(f"{ckpt_dir}: unexpected weight(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")


class HfFolder:
    """A Hugging Face transformers folder read as Meta's checkpoint: the same questions as
    ``llama.checkpoints.loader.MetaFolder`` answers for Meta's, from config.json and the weight files."""

    def __init__(self, ckpt_dir: str):
        self.ckpt_dir = ckpt_dir
        self.params_path = Path(ckpt_dir) / CONFIG  # where the hyper-parameters come from

    def params(self) -> dict:
        """``config.json`` as Meta's params.json keys."""
        return config_to_params(read_config(self.ckpt_dir), str(self.params_path))

    def embedding_rows(self, params: dict) -> Tuple[int, Path]:
        """Rows of the token embedding, from the file's header, and the folder read for them."""
        files = WeightFiles(self.ckpt_dir)
        key = GLOBAL_NAMES["tok_embeddings.weight"]
        if key not in files.files:
            raise ValueError(f"{self.ckpt_dir}: missing weight {key!r}")
        return files.shape(key)[0], Path(self.ckpt_dir)

    def rank_tensors(
        self, args: ModelArgs, layout: Dict[str, Tuple[torch.Size, Optional[int]]], rank: int, world_size: int
    ) -> Iterator[Tuple[str, torch.Tensor]]:
        """(Meta's key, rank ``rank`` of ``world_size``'s slice on the CPU) for every key of ``layout``
        (``llama.checkpoints.loader.TensorLayout``: the whole shape and the split dimension, None if
        replicated), one tensor read at a time, with wq/wk's rows back in Meta's order."""
        names = hf_names(args.n_layers, is_tied(self.ckpt_dir))
        files = WeightFiles(self.ckpt_dir)
        check_keys(files, names, self.ckpt_dir)
        for key, (full_shape, dim) in layout.items():
            size = full_shape[dim] // world_size if dim is not None else 0
            tensor = files.read(names[key], full_shape, dim, rank * size, (rank + 1) * size)
            yield key, to_meta_order(key, tensor, args, world_size)
