"""The files transformers reads a converted folder's tokenizer and generation settings from, written so
that ``AutoTokenizer`` encodes as this package encodes and ``generate`` starts and stops as it does.

- ``tokenizer.json``: for a sentencepiece model, its BPE pieces and merges (the merge of a piece is
  ranked by the piece's id, as transformers' own conversion ranks it) behind the normalization the
  model's own settings ask for, read from the model (``NormalizerSpec``): its character map
  (``precompiled_charsmap``, none for ``identity``), spaces at the ends removed and runs of them
  made one (``remove_extra_whitespaces``), a space before every stretch of text
  (``add_dummy_prefix``), each space as "▁" (``escape_whitespaces``), so that text which begins with
  a space encodes as sentencepiece encodes it (transformers 5's Llama tokenizer would drop that space
  into the leading one); decoding drops the first piece's leading space only where sentencepiece
  does. BOS before every text. Llama 3's is ``llama.checkpoints.bpe_files``' with BOS added.
- ``tokenizer_config.json`` and ``special_tokens_map.json``: the BOS, EOS, unknown and pad tokens'
  texts, and the chat template of the tokenizer's format (Meta's: Llama 2's ``[INST]``, Llama 3's
  headers), which this package reads back as that format (``llama.chat.format``).
- ``generation_config.json``: BOS, the stop tokens as EOS (Llama 3's end of text, end of message and end
  of turn), and Meta's sampling defaults (temperature 0.6, top-p 0.9).
"""

import base64
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from llama.checkpoints.bpe_files import write_tokenizer_json
from llama.checkpoints.hf import TOKENIZER_CONFIG
from llama.tokenizer import HF_TOKENIZER_FILE, SentencePieceTokenizer, Tokenizer

logger = logging.getLogger(__name__)

SPECIAL_TOKENS_MAP, GENERATION_CONFIG = "special_tokens_map.json", "generation_config.json"
SPACE = "\u2581"  # sentencepiece's "▁"
# sentencepiece_model.proto's field numbers: ModelProto's specs, NormalizerSpec's character map and flags,
# TrainerSpec's treat_whitespace_as_suffix
TRAINER_SPEC, NORMALIZER_SPEC, DENORMALIZER_SPEC = 2, 3, 5
PRECOMPILED_CHARSMAP, TREAT_WHITESPACE_AS_SUFFIX = 2, 24
NORMALIZER_FLAGS = {"add_dummy_prefix": 3, "remove_extra_whitespaces": 4, "escape_whitespaces": 5}
FIXED_SIZES = {1: 8, 5: 4}  # protobuf's fixed-size wire types: their sizes in bytes

# Meta's templates (Llama-2-7b-chat-hf, Meta-Llama-3-8B-Instruct): each renders a dialog as the
# package's chat format for that tokenizer encodes it.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHAT_TEMPLATES = {"llama2": LLAMA2_CHAT_TEMPLATE, "llama3": LLAMA3_CHAT_TEMPLATE}
TEMPERATURE, TOP_P = 0.6, 0.9  # Meta's defaults, as the examples'


def special_tokens(tokenizer: Tokenizer) -> Dict[str, str]:
    """``{"bos_token": text, "eos_token": ..., "unk_token": ..., "pad_token": ...}``, those the tokenizer has."""
    ids = {"bos_token": tokenizer.bos_id, "eos_token": tokenizer.eos_id, "pad_token": tokenizer.pad_id}
    if isinstance(tokenizer, SentencePieceTokenizer):
        ids["unk_token"] = tokenizer.sp_model.unk_id()
    return {name: token_text(tokenizer, token) for name, token in ids.items() if token >= 0}


def token_text(tokenizer: Tokenizer, token: int) -> str:
    if isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer.sp_model.id_to_piece(token)
    return {token_id: text for text, token_id in tokenizer.special_tokens.items()}[token]


def bos_template(bos: str, bos_id: int) -> dict:
    """tokenizers' post-processor that puts BOS before a text (and before each of a pair)."""
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def sentencepiece_merges(vocab: Dict[str, int]) -> List[List[str]]:
    """The BPE merges of sentencepiece pieces: every split of a piece into two pieces, ordered by the
    id of the piece they make (sentencepiece numbers a BPE model's pieces in merge order), then by the
    ids of the two parts."""
    merges = []
    for piece, piece_id in vocab.items():
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        merges += [(piece_id, vocab[left], vocab[right], left, right) for left, right in splits]
    return [[left, right] for *_, left, right in sorted(merges)]


def read_varint(data: bytes, at: int) -> Tuple[int, int]:
    """The protobuf varint at ``data[at:]`` and the offset after it."""
    value, shift = 0, 0
    while True:
        byte = data[at]
        value, shift, at = value | (byte & 0x7F) << shift, shift + 7, at + 1
        if byte < 0x80:
            return value, at


def protobuf_fields(data: bytes) -> Dict[int, list]:
    """A serialized protobuf message's fields: number -> its values in order, varints as ints, the rest
    as bytes. Enough to read a sentencepiece model's settings without the protobuf package, which this
    package does not need otherwise."""
    fields: Dict[int, list] = {}
    at = 0
    while at < len(data):
        key, at = read_varint(data, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, at = read_varint(data, at)
        elif wire_type in FIXED_SIZES or wire_type == 2:
            size, at = read_varint(data, at) if wire_type == 2 else (FIXED_SIZES[wire_type], at)
            value, at = data[at : at + size], at + size
        else:
            raise ValueError(
                f"sentencepiece model: field {number} has protobuf wire type {wire_type}, "
                "which a sentencepiece model does not use"
            )
        fields.setdefault(number, []).append(value)
    return fields


@dataclass(frozen=True)
class NormalizerSpec:
    """What a sentencepiece model does to text before its pieces are found and to pieces when they are
    decoded: sentencepiece_model.proto's NormalizerSpec (its defaults where the model leaves a field
    out), with TrainerSpec's treat_whitespace_as_suffix and the denormalizer's character map."""

    precompiled_charsmap: bytes = b""  # empty for normalization_rule_name "identity"
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    treat_whitespace_as_suffix: bool = False
    denormalizer_charsmap: bytes = b""

    @classmethod
    def of(cls, tokenizer: SentencePieceTokenizer) -> "NormalizerSpec":
        model = protobuf_fields(tokenizer.sp_model.serialized_model_proto())

        def message(fields: Dict[int, list], number: int) -> Dict[int, list]:
            return protobuf_fields(fields[number][-1]) if number in fields else {}

        specs = (NORMALIZER_SPEC, TRAINER_SPEC, DENORMALIZER_SPEC)
        normalizer, trainer, denormalizer = (message(model, number) for number in specs)
        flags = {
            name: bool(normalizer[number][-1]) for name, number in NORMALIZER_FLAGS.items() if number in normalizer
        }
        return cls(
            precompiled_charsmap=normalizer.get(PRECOMPILED_CHARSMAP, [b""])[-1],
            **flags,
            treat_whitespace_as_suffix=bool(trainer.get(TREAT_WHITESPACE_AS_SUFFIX, [0])[-1]),
            denormalizer_charsmap=denormalizer.get(PRECOMPILED_CHARSMAP, [b""])[-1],
        )

    def unwritable(self) -> List[str]:
        """The settings tokenizer.json cannot hold."""
        settings = (
            (
                "treat_whitespace_as_suffix (spaces end pieces instead of starting them)",
                self.treat_whitespace_as_suffix,
            ),
            ("a denormalizer (a character map applied to decoded text)", bool(self.denormalizer_charsmap)),
        )
        return [setting for setting, present in settings if present]


def replace(pattern: dict, content: str) -> dict:
    return {"type": "Replace", "pattern": pattern, "content": content}


def sentencepiece_normalizer(spec: NormalizerSpec) -> dict:
    """tokenizers' normalizer doing what sentencepiece's does, in its order."""
    steps = []
    if spec.precompiled_charsmap:
        charsmap = base64.b64encode(spec.precompiled_charsmap).decode()
        steps.append({"type": "Precompiled", "precompiled_charsmap": charsmap})
    if spec.remove_extra_whitespaces:  # spaces only: sentencepiece keeps newlines and tabs
        steps += [replace({"Regex": r"\A +| +\z"}, ""), replace({"Regex": " {2,}"}, " ")]
    if spec.add_dummy_prefix:  # Prepend leaves an empty text empty, as sentencepiece does
        steps.append({"type": "Prepend", "prepend": " "})
    if spec.escape_whitespaces:
        steps.append(replace({"String": " "}, SPACE))
    return {"type": "Sequence", "normalizers": steps}


def sentencepiece_decoder(spec: NormalizerSpec) -> dict:
    """tokenizers' decoder doing what sentencepiece's does: byte pieces as bytes, the first piece's
    leading "▁" dropped where the model adds one or removes spaces at the start, and "▁" as a space.

    The "▁" is dropped from the fused text before "▁" becomes a space: a space that is a byte piece, or
    that the model does not escape, stays, as in sentencepiece. Where the model removes spaces,
    sentencepiece drops the "▁" of each leading piece that is only "▁", which no encoded text begins
    with; tokenizer.json drops one."""
    steps = [{"type": "ByteFallback"}, {"type": "Fuse"}]
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        # after Fuse: the start of the text, not of each piece
        steps.append({"type": "Strip", "content": SPACE, "start": 1, "stop": 0})
    steps.append({"type": "Replace", "pattern": {"String": SPACE}, "content": " "})
    return {"type": "Sequence", "decoders": steps}


def write_sentencepiece_tokenizer_json(tokenizer: SentencePieceTokenizer, path: Path) -> None:
    """``tokenizer.json`` of a sentencepiece BPE model (see the module's docstring)."""
    sp = tokenizer.sp_model
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [i for i in range(sp.get_piece_size()) if sp.IsControl(i) or sp.IsUnknown(i)]
    spec = NormalizerSpec.of(tokenizer)
    for setting in spec.unwritable():
        logger.warning(
            "%s: the sentencepiece model's %s cannot be written in tokenizer.json: transformers will "
            "encode or decode some texts otherwise than sentencepiece",
            path,
            setting,
        )
    bos = sp.id_to_piece(tokenizer.bos_id)
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": sp.id_to_piece(i),
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i in special
        ],
        "normalizer": sentencepiece_normalizer(spec),
        "pre_tokenizer": None,
        "post_processor": bos_template(bos, tokenizer.bos_id),
        "decoder": sentencepiece_decoder(spec),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": sp.id_to_piece(sp.unk_id()),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": sentencepiece_merges(vocab),
        },
    }
    path.write_text(json.dumps(data, ensure_ascii=False))


def write_llama3_tokenizer_json(tokenizer: Tokenizer, path: Path) -> None:
    """Llama 3's ``tokenizer.json`` (``llama.checkpoints.bpe_files``), with BOS before every text."""
    write_tokenizer_json(tokenizer.vocabulary, path)
    data = json.loads(path.read_text())
    bos = token_text(tokenizer, tokenizer.bos_id)
    data["post_processor"] = {
        "type": "Sequence",
        "processors": [data["post_processor"], bos_template(bos, tokenizer.bos_id)],
    }
    path.write_text(json.dumps(data, ensure_ascii=False))


def write_hf_tokenizer_files(tokenizer: Tokenizer, out: Path, max_position_embeddings: int) -> None:
    """``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and
    ``generation_config.json`` in ``out`` for ``tokenizer`` (see the module's docstring).

    Args:
        tokenizer: the checkpoint's tokenizer.
        out: the converted folder.
        max_position_embeddings: the context written to config.json: the tokenizer's model_max_length.
    """
    if isinstance(tokenizer, SentencePieceTokenizer):
        write_sentencepiece_tokenizer_json(tokenizer, out / HF_TOKENIZER_FILE)
    else:
        write_llama3_tokenizer_json(tokenizer, out / HF_TOKENIZER_FILE)
    tokens = special_tokens(tokenizer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_position_embeddings,
        "chat_template": CHAT_TEMPLATES[tokenizer.chat_format],
    }
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / SPECIAL_TOKENS_MAP).write_text(json.dumps(tokens, indent=2, ensure_ascii=False))
    stops = tokenizer.stop_tokens
    generation = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": stops[0] if len(stops) == 1 else stops,
        **({"pad_token_id": tokenizer.pad_id} if tokenizer.pad_id >= 0 else {}),
        "do_sample": True,
        "temperature": TEMPERATURE,
        "top_p": TOP_P,
    }
    (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2))
