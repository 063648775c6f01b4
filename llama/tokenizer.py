"""The tokenizers of Llama 2 (sentencepiece) and Llama 3 (byte-level BPE run by tiktoken), with the
interface of Meta's reference; where a checkpoint keeps its tokenizer; how to train a sentencepiece one."""

import io
import logging
import os
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import sentencepiece as spm
import tiktoken
from sentencepiece import SentencePieceProcessor

from llama.checkpoints.bpe_files import USED_SPECIAL_TOKENS, is_tiktoken_file, read_tiktoken_file, read_tokenizer_json

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
# Where a checkpoint folder keeps its tokenizer, in order: Meta's folders and Llama 2's Hugging Face
# folders have tokenizer.model; Llama 3's Hugging Face folders tokenizer.json, and Meta's file in original/.
TOKENIZER_PLACES = (TOKENIZER_FILE, HF_TOKENIZER_FILE, f"original/{TOKENIZER_FILE}")


def resolve_tokenizer_path(ckpt_dir: str, tokenizer_path: Optional[str] = None) -> str:
    """The tokenizer a checkpoint is read with.

    Args:
        ckpt_dir: the checkpoint folder.
        tokenizer_path: the file to use; None looks in ``ckpt_dir`` for each of ``TOKENIZER_PLACES``
            (``tokenizer.model``, ``tokenizer.json``, ``original/tokenizer.model``), then beside it, in
            its parent folder, where Meta's Llama 2 download puts it (``tokenizer.model`` next to
            ``llama-2-7b/``).

    Returns:
        ``tokenizer_path`` if given, else the first tokenizer found.
    """
    if tokenizer_path is not None:
        return tokenizer_path
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    own = [Path(ckpt_dir) / place for place in TOKENIZER_PLACES]
    beside = Path(ckpt_dir).resolve().parent / TOKENIZER_FILE
    for candidate in own + [beside]:
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"no --tokenizer_path given, and none of {', '.join(map(str, own))} or {beside} exists; "
        "pass the checkpoint's tokenizer.model or tokenizer.json with --tokenizer_path (tokenizer_path= in Llama.build)"
    )


def tokenizer_kind(model_path: str) -> str:
    """ "sentencepiece", "tiktoken" or "tokenizer.json", from the file's content (all three are met
    under the name tokenizer.model or beside it)."""
    if os.path.isdir(model_path):
        inside = [str(Path(model_path) / place) for place in TOKENIZER_PLACES if (Path(model_path) / place).is_file()]
        hint = f": pass {inside[0]}" if inside else ""
        raise IsADirectoryError(
            f"tokenizer path {model_path} is a directory; "
            f"a {TOKENIZER_FILE} or {HF_TOKENIZER_FILE} file is expected{hint}"
        )
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"tokenizer model not found: {model_path}")
    with open(model_path, "rb") as file:
        head = file.read(200)
    if head.lstrip().startswith(b"{"):
        return "tokenizer.json"
    return "tiktoken" if is_tiktoken_file(head) else "sentencepiece"


class Tokenizer:
    """Encodes text to token ids and back, with Meta's interface: ``n_words``, ``bos_id``, ``eos_id``,
    ``pad_id``, ``encode(s, bos, eos)``, ``decode(t)``; ``stop_tokens`` end a reply.

    ``Tokenizer(path)`` reads the file's content and becomes the matching kind: a sentencepiece model
    (Llama 2, ``SentencePieceTokenizer``) or byte-level BPE (Llama 3, ``TiktokenTokenizer``, from
    Meta's tiktoken ``tokenizer.model`` or Hugging Face's ``tokenizer.json``).
    """

    chat_format = "llama2"  # the chat format of the models trained with this kind: "llama2" or "llama3"

    def __new__(cls, model_path: Optional[str] = None):  # None: unpickling a subclass, which needs no choice
        if cls is Tokenizer:
            cls = SentencePieceTokenizer if tokenizer_kind(model_path) == "sentencepiece" else TiktokenTokenizer
        return super().__new__(cls)

    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def stop_tokens(self) -> List[int]:
        """The tokens that end a generated reply (not returned with it)."""
        return [self.eos_id]

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of ``s``, with BOS prepended and/or EOS appended."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        t = self.encode_text(s)
        return [self.bos_id] * bos + t + [self.eos_id] * eos

    def encode_text(self, s: str) -> List[int]:
        raise NotImplementedError

    def decode(self, t: List[int]) -> str:
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        """A token's own UTF-8 bytes (part of a character for some), leading space included."""
        raise NotImplementedError

    def special_token_texts(self) -> List[str]:
        """The texts that Hugging Face's tokenizers read as special tokens (``encode_with_special_tokens``)."""
        raise NotImplementedError

    def encode_with_special_tokens(self, text: str, legacy: bool = False) -> List[int]:
        """Token ids of ``text`` in which the special tokens' texts stand for those tokens, as Hugging
        Face's tokenizers read a rendered chat template (``encode`` reads them as plain text).
        ``legacy``: tokenizer_config.json's flag of transformers' Llama tokenizers (sentencepiece only)."""
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """Llama 2's sentencepiece ``tokenizer.model``."""

    def __init__(self, model_path: str):
        tokenizer_kind(model_path)  # the file exists and is not a folder
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(str(model_path))
        except (OSError, RuntimeError) as error:
            raise ValueError(
                f"{model_path} is neither a sentencepiece model nor a tiktoken BPE file: {error}"
            ) from None
        logger.info("loaded sentencepiece model from %s", model_path)

        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1 for Llama's tokenizer: it has no pad piece
        if self.sp_model.vocab_size() != self.sp_model.get_piece_size():
            raise ValueError(f"{model_path}: vocab_size differs from piece size")
        # the control pieces (<s>, </s>) and the unknown piece (<unk>) by their texts: found once, a scan of
        # every piece, which every encode_with_special_tokens call (each of an evaluation's requests) reads
        self.special_pieces: Dict[str, int] = {
            self.sp_model.id_to_piece(i): i
            for i in range(self.n_words)
            if self.sp_model.IsControl(i) or self.sp_model.IsUnknown(i)
        }

    def encode_text(self, s: str) -> List[int]:
        return self.sp_model.encode(s)

    def decode(self, t: List[int]) -> str:
        return self.sp_model.decode(t)

    def token_bytes(self, token: int) -> bytes:
        """A byte-fallback piece ("<0x0A>") is its one byte; "▁" is the space it stands for."""
        if self.sp_model.IsByte(token):
            return bytes([int(self.sp_model.id_to_piece(token)[3:5], 16)])
        return self.sp_model.id_to_piece(token).replace("\u2581", " ").encode("utf-8")

    def special_token_texts(self) -> List[str]:
        """The control pieces (<s>, </s>) and the unknown piece (<unk>)."""
        return list(self.special_pieces)

    def encode_with_special_tokens(self, text: str, legacy: bool = False) -> List[int]:
        """Each stretch between special tokens is encoded on its own: with sentencepiece's leading space
        if ``legacy`` (transformers' legacy Llama tokenizers), else only at the start of ``text``
        (``legacy=False``, transformers 5's default), and never before a stretch that begins with a space
        (transformers' Metaspace step). Without the leading space a stretch is encoded behind the unknown
        piece's text, whose pieces are then dropped, as transformers' own sentencepiece code does."""
        specials = self.special_pieces
        pattern = "(" + "|".join(re.escape(piece) for piece in sorted(specials, key=len, reverse=True)) + ")"
        unk = self.sp_model.id_to_piece(self.sp_model.unk_id())
        tokens = []
        for i, part in enumerate(re.split(pattern, text)):
            if i % 2:
                tokens.append(specials[part])
            elif part and (legacy or i == 0) and not part.startswith(" "):  # a space is the leading space already
                tokens += self.sp_model.encode(part)
            elif part:
                tokens += self.sp_model.encode(unk + part)[len(self.sp_model.encode(unk)) :]
        return tokens


# tiktoken handles at most ~400k characters a call, and runs of at most ~25k characters all spaces
# or all not spaces (openai/tiktoken#195): longer text is cut, as Meta's tokenizer cuts it.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000


def text_pieces(s: str) -> Iterator[str]:
    """``s`` in pieces of at most MAX_ENCODE_CHARS, cut inside any longer run of spaces or non-spaces."""
    for begin in range(0, len(s), MAX_ENCODE_CHARS):
        chunk, start, run = s[begin : begin + MAX_ENCODE_CHARS], 0, 0
        for i, char in enumerate(chunk):
            run = run + 1 if i > 0 and char.isspace() == chunk[i - 1].isspace() else 1
            if run > MAX_RUN_CHARS:
                yield chunk[start:i]
                start, run = i, 1
        yield chunk[start:]


class TiktokenTokenizer(Tokenizer):
    """Llama 3's byte-level BPE, run by tiktoken: Meta's tiktoken ``tokenizer.model`` or a Hugging Face
    ``tokenizer.json`` (``llama.checkpoints.bpe_files``). Special tokens are ids only: text that spells one, like
    "<|eot_id|>" in a user's message, is encoded as plain text, so no prompt can fake a turn."""

    chat_format = "llama3"

    def __init__(self, model_path: str):
        kind = tokenizer_kind(model_path)
        self.vocabulary = (
            read_tokenizer_json(Path(model_path)) if kind == "tokenizer.json" else read_tiktoken_file(Path(model_path))
        )
        missing = [t for t in USED_SPECIAL_TOKENS if t not in self.vocabulary.special_tokens]
        if missing:
            raise ValueError(f"{model_path}: special token(s) {missing} missing; Llama 3's tokenizer has them")
        self.special_tokens: Dict[str, int] = self.vocabulary.special_tokens
        self.model = tiktoken.Encoding(
            name=Path(model_path).name,
            pat_str=self.vocabulary.pattern,
            mergeable_ranks=self.vocabulary.ranks,
            special_tokens=self.special_tokens,
        )
        logger.info("loaded %s from %s", "tokenizer.json" if kind == "tokenizer.json" else "tiktoken model", model_path)

        self.n_words: int = self.model.n_vocab
        self.bos_id: int = self.special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self.special_tokens["<|end_of_text|>"]
        self.pad_id: int = self.special_tokens.get("<|finetune_right_pad_id|>", -1)

    @property
    def stop_tokens(self) -> List[int]:
        """End of text, end of turn, and end of message (a tool call waiting for its result)."""
        return [self.eos_id, self.special_tokens["<|eom_id|>"], self.special_tokens["<|eot_id|>"]]

    def encode_text(self, s: str) -> List[int]:
        return [
            t
            for piece in text_pieces(s)
            for t in self.model.encode(piece, allowed_special=set(), disallowed_special=())
        ]

    def decode(self, t: List[int]) -> str:
        return self.model.decode(list(t))

    def token_bytes(self, token: int) -> bytes:
        return self.model.decode_single_token_bytes(token)

    def special_token_texts(self) -> List[str]:
        return list(self.special_tokens)

    def encode_with_special_tokens(self, text: str, legacy: bool = False) -> List[int]:
        return self.model.encode(
            text, allowed_special="all"
        )  # byte-level BPE adds no leading space: legacy changes nothing


def train_tokenizer(lines: Sequence[str], vocab_size: int, keep_whitespace: bool = True, **options) -> bytes:
    """A BPE sentencepiece model (serialized) trained on ``lines``, with Llama's special ids (unk 0,
    BOS 1, EOS 2, no pad) and byte fallback, as ``train.py`` and the tests make them.

    ``keep_whitespace`` is for code, which needs its whitespace: no normalization, no collapsing of
    spaces, runs of spaces may be pieces (indentation), and no dummy space is prepended, so a line's
    first word is the same piece at the start of a prompt and after a newline. False keeps
    sentencepiece's defaults, as Llama's own tokenizer does. ``options``: other settings of sentencepiece's
    trainer, over those (Llama 2's own: ``keep_whitespace`` with ``add_dummy_prefix=True``).
    """
    model = io.BytesIO()
    whitespace = dict(
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        add_dummy_prefix=False,
        split_digits=True,
    )
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,  # one thread: the same pieces on every machine
        minloglevel=2,
        **{**(whitespace if keep_whitespace else {}), **options},
    )
    return model.getvalue()
