"""The sentencepiece tokenizer, with the interface of Meta's reference."""

import logging
import os
from pathlib import Path
from typing import List, Optional

from sentencepiece import SentencePieceProcessor

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.model"


def resolve_tokenizer_path(ckpt_dir: str, tokenizer_path: Optional[str] = None) -> str:
    """``tokenizer_path`` if given, else the checkpoint folder's own ``tokenizer.model``.

    Meta's downloads put ``tokenizer.model`` beside the checkpoint folders rather than in them; when
    the folder has none, the error names the one beside it if there is one.
    """
    if tokenizer_path is not None:
        return tokenizer_path
    if not Path(ckpt_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {ckpt_dir}")
    own = Path(ckpt_dir) / TOKENIZER_FILE
    if own.is_file():
        return str(own)
    beside = Path(ckpt_dir).resolve().parent / TOKENIZER_FILE
    hint = f" (there is one beside it: {beside})" if beside.is_file() else ""
    raise FileNotFoundError(
        f"no tokenizer_path given and {ckpt_dir} has no {TOKENIZER_FILE}{hint}; "
        "pass the checkpoint's sentencepiece model as tokenizer_path"
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
