"""The sentencepiece tokenizer, with the interface of Meta's reference, and how to train one."""

import io
import logging
import os
from pathlib import Path
from typing import List, Optional, Sequence

import sentencepiece as spm
from sentencepiece import SentencePieceProcessor

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"


def resolve_tokenizer_path(ckpt_dir: str, tokenizer_path: Optional[str] = None) -> str:
    """The tokenizer a checkpoint is read with.

    Args:
        ckpt_dir: the checkpoint folder.
        tokenizer_path: the file to use; None looks for ``tokenizer.model`` in ``ckpt_dir``, then beside
            it, in its parent folder, where Meta's download puts it (``tokenizer.model`` next to
            ``llama-2-7b/``).

    Returns:
        ``tokenizer_path`` if given, else the first ``tokenizer.model`` found.
    """
    if tokenizer_path is not None:
        return tokenizer_path
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    own = Path(ckpt_dir) / TOKENIZER_FILE
    beside = Path(ckpt_dir).resolve().parent / TOKENIZER_FILE
    for candidate in (own, beside):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"no --tokenizer_path given, and neither {own} nor {beside} exists; "
        "pass the checkpoint's sentencepiece model with --tokenizer_path (tokenizer_path= in Llama.build)"
    )


class Tokenizer:
    """Encodes text to token ids and back with a sentencepiece model (Llama 2's ``tokenizer.model``)."""

    def __init__(self, model_path: str):
        if os.path.isdir(model_path):
            inside = os.path.join(model_path, TOKENIZER_FILE)
            hint = f": pass {inside}" if os.path.isfile(inside) else ""
            raise IsADirectoryError(f"tokenizer path {model_path} is a directory; a sentencepiece {TOKENIZER_FILE} file is expected{hint}")
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"tokenizer model not found: {model_path}")
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(str(model_path))
        except (OSError, RuntimeError) as error:
            raise ValueError(f"{model_path} is not a sentencepiece model: {error}") from None
        logger.info("loaded sentencepiece model from %s", model_path)

        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1 for Llama's tokenizer: it has no pad piece
        if self.sp_model.vocab_size() != self.sp_model.get_piece_size():
            raise ValueError(f"{model_path}: vocab_size differs from piece size")

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        """Token ids of ``s``, with BOS prepended and/or EOS appended."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(s).__name__}")
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: List[int]) -> str:
        return self.sp_model.decode(t)


def train_tokenizer(lines: Sequence[str], vocab_size: int, keep_whitespace: bool = True) -> bytes:
    """A BPE sentencepiece model (serialized) trained on ``lines``, with Llama's special ids (unk 0,
    BOS 1, EOS 2, no pad) and byte fallback, as ``train.py`` and the tests make them.

    ``keep_whitespace`` is for code, which needs its whitespace: no normalization, no collapsing of
    spaces, runs of spaces may be pieces (indentation), and no dummy space is prepended, so a line's
    first word is the same piece at the start of a prompt and after a newline. False keeps
    sentencepiece's defaults, as Llama's own tokenizer does.
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
        **(whitespace if keep_whitespace else {}),
    )
    return model.getvalue()
