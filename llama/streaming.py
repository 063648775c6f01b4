"""Turning one row's generated tokens into text as they arrive, and ending it at a stop string.

Sentencepiece pieces cannot be decoded one at a time: decoding drops the spaces ("▁") that begin
the text, and byte-fallback pieces spell one character over several tokens. So the new text of a
token is what decoding a short window of recent tokens adds to decoding the same window without
it, both behind an anchor piece that takes the dropped space (except at the very start, where the
whole text drops it too); a window that ends in U+FFFD (an unfinished character) waits for the
next token.
"""

from typing import List, Sequence

from llama.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    """The text of one row's generated tokens. ``push`` each token, ``read`` what became final since
    the last read, ``close`` at the end for the rest. Joined, the reads equal
    ``cut_at_stop(tokenizer.decode(tokens), stop_strings)``."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = list(stop_strings)
        self.tokens: List[int] = []
        self.anchor = tokenizer.encode("a", bos=False, eos=False)[-1:]
        self.text = ""  # the decoded text so far, cut before the first stop string
        self.window_start = 0  # tokens[window_start:decoded_end] decode to the end of self.text
        self.decoded_end = 0
        self.released = 0  # characters of self.text already returned by read()
        self.stopped = False  # a stop string appeared: the text is final
        self.closed = False

    def push(self, token: int) -> None:
        if self.stopped:  # the text ended at a stop string; tokens after it are not part of it
            return
        self.tokens.append(token)
        window = self.decode(len(self.tokens))
        if window.endswith(REPLACEMENT_CHAR):  # an unfinished multi-byte character
            return
        self.add_text(window)

    def decode(self, end: int) -> str:
        """The text of tokens[window_start:end], behind the anchor unless the window starts the text."""
        anchor = self.anchor if self.window_start > 0 else []
        return self.tokenizer.decode(anchor + self.tokens[self.window_start : end])

    def add_text(self, window: str) -> None:
        before = self.decode(self.decoded_end)
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop_strings), default=0) + 1)
        self.text += window[len(before) :]
        self.window_start, self.decoded_end = self.decoded_end, len(self.tokens)
        stop_at = first_stop(self.text, self.stop_strings, search_from)
        if stop_at is not None:
            self.text = self.text[:stop_at]
            self.stopped = True

    def read(self) -> str:
        """The text that became final since the last read: complete characters, and not a tail that
        may still grow into a stop string."""
        end = len(self.text) if self.stopped or self.closed else len(self.text) - self.stop_prefix_len()
        new = self.text[self.released : max(end, self.released)]
        self.released += len(new)
        return new

    def close(self) -> str:
        """No more tokens: decode what was waiting for one, and return all that was not read yet."""
        if not self.stopped and self.decoded_end < len(self.tokens):
            self.add_text(self.decode(len(self.tokens)))
        self.closed = True
        return self.read()

    def stop_prefix_len(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string."""
        for n in range(min(len(self.text), max((len(s) for s in self.stop_strings), default=1) - 1), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop_strings):
                return n
        return 0


def first_stop(text: str, stop_strings: Sequence[str], start: int = 0):
    """Index of the earliest stop string in ``text[start:]`` (as an index into text), or None."""
    found = [i for i in (text.find(s, start) for s in stop_strings) if i >= 0]
    return min(found) if found else None


def cut_at_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> str:
    """``text`` up to, not including, the earliest stop string at or after ``start``."""
    stop_at = first_stop(text, stop_strings, start)
    return text if stop_at is None else text[:stop_at]
