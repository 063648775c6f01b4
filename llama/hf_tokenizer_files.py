"""The files transformers reads a converted folder's tokenizer and generation settings from, written so
that ``AutoTokenizer`` encodes as this package encodes and ``generate`` starts and stops as it does.

- ``tokenizer.json``: for a sentencepiece model, its BPE pieces and merges (the merge of a piece is
  ranked by the piece's id, as transformers' own conversion ranks it) behind sentencepiece's own
  normalization, a "▁" before every stretch of text and each space as "▁", so that text which begins
  with a space encodes as sentencepiece encodes it (transformers 5's Llama tokenizer would drop that
  space into the leading one); BOS before every text. Llama 3's is ``llama.bpe_files``' with BOS added.
- ``tokenizer_config.json`` and ``special_tokens_map.json``: the BOS, EOS, unknown and pad tokens'
  texts, and the chat template of the tokenizer's format (Meta's: Llama 2's ``[INST]``, Llama 3's
  headers), which this package reads back as that format (``llama.chat_format``).
- ``generation_config.json``: BOS, the stop tokens as EOS (Llama 3's end of text, end of message and end
  of turn), and Meta's sampling defaults (temperature 0.6, top-p 0.9).
"""

import json
import logging
from pathlib import Path
from typing import Dict, List

from llama.bpe_files import write_tokenizer_json
from llama.hf_checkpoint import TOKENIZER_CONFIG
from llama.tokenizer import HF_TOKENIZER_FILE, SentencePieceTokenizer, Tokenizer

logger = logging.getLogger(__name__)

SPECIAL_TOKENS_MAP, GENERATION_CONFIG = "special_tokens_map.json", "generation_config.json"
SPACE = "\u2581"  # sentencepiece's "▁"

# Meta's templates (Llama-2-7b-chat-hf, Meta-Llama-3-8B-Instruct): each renders a dialog as the
# package's chat format for that tokenizer encodes it.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
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
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
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


def keeps_text_as_is(tokenizer: SentencePieceTokenizer) -> bool:
    """Whether the sentencepiece model encodes text without normalizing it (Llama's do), which is all
    that ``tokenizer.json``'s normalizer writes: collapsed spaces or NFKC would tokenize otherwise."""
    probe = "a  b\u00a0c \uff46"
    return tokenizer.decode(tokenizer.encode(probe, bos=False, eos=False)) == probe


def write_sentencepiece_tokenizer_json(tokenizer: SentencePieceTokenizer, path: Path) -> None:
    """``tokenizer.json`` of a sentencepiece BPE model (see the module's docstring)."""
    sp = tokenizer.sp_model
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [i for i in range(sp.get_piece_size()) if sp.IsControl(i) or sp.IsUnknown(i)]
    if not keeps_text_as_is(tokenizer):
        logger.warning("the sentencepiece model normalizes text (spaces or NFKC), which tokenizer.json does not: "
                       "transformers will tokenize some texts otherwise")
    bos = sp.id_to_piece(tokenizer.bos_id)
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
            for i in special
        ],
        "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]},
        "pre_tokenizer": None,
        "post_processor": bos_template(bos, tokenizer.bos_id),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": sp.id_to_piece(sp.unk_id()), "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
            "vocab": vocab, "merges": sentencepiece_merges(vocab),
        },
    }
    path.write_text(json.dumps(data, ensure_ascii=False))


def write_llama3_tokenizer_json(tokenizer: Tokenizer, path: Path) -> None:
    """Llama 3's ``tokenizer.json`` (``llama.bpe_files``), with BOS before every text."""
    write_tokenizer_json(tokenizer.vocabulary, path)
    data = json.loads(path.read_text())
    bos = token_text(tokenizer, tokenizer.bos_id)
    data["post_processor"] = {"type": "Sequence", "processors": [data["post_processor"], bos_template(bos, tokenizer.bos_id)]}
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
        "tokenizer_class": "PreTrainedTokenizerFast", **tokens, "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": max_position_embeddings,
        "chat_template": CHAT_TEMPLATES[tokenizer.chat_format],
    }
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out / SPECIAL_TOKENS_MAP).write_text(json.dumps(tokens, indent=2, ensure_ascii=False))
    stops = tokenizer.stop_tokens
    generation = {
        "bos_token_id": tokenizer.bos_id, "eos_token_id": stops[0] if len(stops) == 1 else stops,
        **({"pad_token_id": tokenizer.pad_id} if tokenizer.pad_id >= 0 else {}),
        "do_sample": True, "temperature": TEMPERATURE, "top_p": TOP_P,
    }
    (out / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2))
