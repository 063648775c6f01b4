"""Llama 3's byte-level BPE vocabulary in its two files: Meta's ``tokenizer.model`` (tiktoken's format)
and Hugging Face's ``tokenizer.json``. Reading either gives the same ``BpeVocabulary``; writing either
from it gives a file the other layout's loader reads back with the same token ids.

A tiktoken file holds one ``base64(token bytes) rank`` line per base token; the rank is both the
token's id and its merge priority (lower merges first). Meta's code adds 256 special tokens numbered
from the number of base tokens, and splits text with a fixed regular expression before merging.

``tokenizer.json`` says the same with other words: ``model.vocab`` maps each base token, its bytes
spelled with GPT-2's byte-to-character table, to its id; ``model.merges`` lists the pairs in priority
order (for Llama 3 the priority of a merge is the id of the token it makes, so ranks = ids); the
split pattern sits in the pre-tokenizer, and the special tokens in ``added_tokens``.
"""

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Dict, List, NamedTuple, Tuple

from llama.checkpoints.files import read_json_object

# Meta's split pattern (llama3 and llama-models' tokenizer.py): contractions, words with one leading
# non-letter, numbers of up to three digits, punctuation runs, newlines, other whitespace.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
N_SPECIAL_TOKENS = 256
# The Llama 3.1 list (llama-models); Llama 3.0 named ids +4, +5, +8 and +10 reserved, the rest alike.
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model called a tool and waits for its answer
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_SPECIAL_TOKENS = NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(N_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
]
# The special tokens the tokenizer and the chat format use; a vocabulary must have them at Meta's ids.
USED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
]
TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?")


class BpeVocabulary(NamedTuple):
    ranks: Dict[bytes, int]  # base token -> its id and merge priority
    pattern: str  # the regular expression that splits text before merging
    special_tokens: Dict[str, int]  # text -> id, every id above the base tokens'


def is_tiktoken_file(data: bytes) -> bool:
    """Whether ``data`` begins like a tiktoken BPE file (a base64 token, a space, a rank)."""
    return TIKTOKEN_LINE.fullmatch(data[:200].split(b"\n", 1)[0]) is not None


def llama3_special_tokens(n_base_tokens: int) -> Dict[str, int]:
    """Meta's 256 special tokens, numbered from the number of base tokens."""
    return {token: n_base_tokens + i for i, token in enumerate(LLAMA3_SPECIAL_TOKENS)}


def read_tiktoken_file(path: Path) -> BpeVocabulary:
    """Meta's Llama 3 ``tokenizer.model``: the base tokens, Meta's pattern and Meta's special tokens."""
    ranks = {}
    for number, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected two fields")
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error):
            raise ValueError(f"{path}, line {number}: expected 'base64(token) rank', found {line[:60]!r}") from None
    check_ranks(ranks, path)
    return BpeVocabulary(ranks, LLAMA3_PATTERN, llama3_special_tokens(len(ranks)))


def check_ranks(ranks: Dict[bytes, int], path: Path) -> None:
    """Ranks are the ids 0 .. n-1, each once, and every single byte is a token (BPE starts from bytes)."""
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: the {len(ranks)} base tokens' ranks must be 0 .. {len(ranks) - 1}, each once")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: byte(s) {missing[:8]} are not tokens; a byte-level BPE vocabulary has all 256")


def write_tiktoken_file(vocabulary: BpeVocabulary, path: Path) -> None:
    """Meta's ``tokenizer.model`` for ``vocabulary``, which must use Meta's pattern and special tokens
    at Meta's ids (their names are not stored: Meta's code numbers them itself)."""
    expected = llama3_special_tokens(len(vocabulary.ranks))
    if vocabulary.pattern != LLAMA3_PATTERN:
        raise ValueError(
            f"cannot write {path}: Meta's tokenizer.model implies Meta's split pattern, "
            f"and this vocabulary splits with {vocabulary.pattern!r:.80}"
        )
    moved = [t for t in USED_SPECIAL_TOKENS if vocabulary.special_tokens.get(t) != expected[t]]
    if moved or len(vocabulary.special_tokens) != N_SPECIAL_TOKENS:
        raise ValueError(
            f"cannot write {path}: Meta's tokenizer.model implies {N_SPECIAL_TOKENS} special tokens "
            f"from id {len(vocabulary.ranks)} in Meta's order; this vocabulary has {len(vocabulary.special_tokens)}"
            + (f" and {moved} elsewhere" if moved else "")
        )
    lines = [
        base64.b64encode(token) + b" " + str(rank).encode()
        for token, rank in sorted(vocabulary.ranks.items(), key=lambda item: item[1])
    ]
    Path(path).write_bytes(b"\n".join(lines) + b"\n")


# ---- tokenizer.json ----------------------------------------------------------------------------------


def byte_to_char() -> Dict[int, str]:
    """GPT-2's table: printable bytes stand for themselves, the other 68 for the characters 256 onwards,
    so every token's bytes are a string of visible characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def token_text(token: bytes, table: Dict[int, str]) -> str:
    return "".join(table[b] for b in token)


def read_tokenizer_json(path: Path) -> BpeVocabulary:
    """A Hugging Face ``tokenizer.json`` of byte-level BPE in Llama 3's form (a regex split, then the
    byte-level step, no normalizer), whose merges follow the ids: ranks = ids."""
    data = read_json_object(Path(path))
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{path}: model.type must be 'BPE' with a 'vocab' object, found {str(model.get('type'))!r}")
    if data.get("normalizer") is not None:
        raise ValueError(
            f"{path}: a normalizer ({data['normalizer'].get('type')}) is not supported; "
            "byte-level BPE as Llama 3's has none"
        )
    pattern = byte_level_pattern(data.get("pre_tokenizer"), path)
    chars = {char: byte for byte, char in byte_to_char().items()}
    added = {entry["content"]: entry["id"] for entry in data.get("added_tokens") or []}
    try:
        ranks = {
            bytes(chars[c] for c in text): token_id for text, token_id in model["vocab"].items() if text not in added
        }
    except KeyError as error:
        raise ValueError(
            f"{path}: vocabulary entry with character {error} is not byte-level BPE (GPT-2's byte characters)"
        ) from None
    check_ranks(ranks, path)
    check_merge_order(model.get("merges") or [], model["vocab"], path)
    clashes = sorted(t for t, token_id in added.items() if token_id < len(ranks))
    if clashes:
        raise ValueError(
            f"{path}: added token(s) {clashes[:5]} take ids of base tokens; special tokens must come after them"
        )
    return BpeVocabulary(ranks, pattern, added)


def byte_level_pattern(pre_tokenizer, path: Path) -> str:
    """The split regex of a ``Sequence[Split(regex, isolated), ByteLevel(no prefix space, no regex)]``."""
    steps = (
        pre_tokenizer.get("pretokenizers")
        if isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "Sequence"
        else None
    )
    if (
        not isinstance(steps, list)
        or len(steps) != 2
        or steps[0].get("type") != "Split"
        or not isinstance(steps[0].get("pattern"), dict)
        or "Regex" not in steps[0]["pattern"]
        or steps[0].get("behavior") != "Isolated"
        or steps[0].get("invert")
        or steps[1].get("type") != "ByteLevel"
        or steps[1].get("add_prefix_space")
        or steps[1].get("use_regex")
    ):
        raise ValueError(
            f"{path}: pre_tokenizer {json.dumps(pre_tokenizer)[:120]} is not supported; Llama 3's is a Sequence of a "
            "Split on a regex (behavior Isolated) and a ByteLevel step without prefix space or regex"
        )
    return steps[0]["pattern"]["Regex"]


def check_merge_order(merges: list, vocab: Dict[str, int], path: Path) -> None:
    """Each merge makes a token of the vocabulary, and in the order of their ids, so that merging by
    the ids (as tiktoken does) merges in the file's order."""
    previous = -1
    for number, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made = vocab.get(left + right)
        if made is None or made < previous:
            found = "is not a token" if made is None else f"has id {made}, after a merge that made id {previous}"
            raise ValueError(
                f"{path}: merge {number} ({left!r}, {right!r}) {found}; "
                "merges must follow the ids (ranks = ids), as in Llama 3's"
            )
        previous = made


def merges_of(ranks: Dict[bytes, int]) -> List[Tuple[bytes, bytes]]:
    """Every pair of tokens that joins into a token, in the order of the joined token's rank (then of
    the parts' ranks): the merge list under which BPE merges as tiktoken does by ranks."""
    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, ranks[left], ranks[right], left, right) for left, right in pairs]
    return [(left, right) for *_, left, right in sorted(merges)]


def write_tokenizer_json(vocabulary: BpeVocabulary, path: Path) -> None:
    """Hugging Face's ``tokenizer.json`` for ``vocabulary``: byte-level BPE, the split pattern, the
    special tokens as added tokens."""
    table = byte_to_char()
    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": token_id,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for text, token_id in sorted(vocabulary.special_tokens.items(), key=lambda item: item[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": vocabulary.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {
                token_text(token, table): rank
                for token, rank in sorted(vocabulary.ranks.items(), key=lambda item: item[1])
            },
            "merges": [
                [token_text(left, table), token_text(right, table)] for left, right in merges_of(vocabulary.ranks)
            ],
        },
    }
    Path(path).write_text(json.dumps(data, ensure_ascii=False))
