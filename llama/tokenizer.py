"""The sentencepiece tokenizer, with the interface of Meta's reference."""

import logging
import os
from typing import List

from sentencepiece import SentencePieceProcessor

logger = logging.getLogger(__name__)


class Tokenizer:
    """Encodes text to token ids and back with a sentencepiece model (Llama 2's ``tokenizer.model``)."""

    def __init__(self, model_path: str):
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
