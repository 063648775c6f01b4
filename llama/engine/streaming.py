"""Turning generated tokens into text as they arrive: one row's ``TextStream``, ended at a stop
string, and the ``CompletionStream`` of a whole request that ``Llama``'s ``*_stream`` calls return.

Sentencepiece pieces cannot be decoded one at a time: decoding drops the spaces ("▁") that begin
the text, and byte-fallback pieces spell one character over several tokens. So the new text of a
token is what decoding a short window of recent tokens adds to decoding the same window without
it, both behind an anchor piece that takes the dropped space (except at the very start, where the
whole text drops it too); a window that ends in U+FFFD (an unfinished character) waits for the
next token.
"""

import time
from typing import Iterator, List, Optional, Sequence, Tuple

from llama.chat.format import UNSAFE_ERROR
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
        self.kept = 0  # once stopped: how many tokens spell the text (``covering_tokens``)
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
            self.kept = self.covering_tokens()

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

    def covering_tokens(self) -> int:
        """How many of the tokens it takes to spell the text: after a stop string, the tokens up to the
        one holding the text's last character (that token may also hold the stop string's start)."""
        n = len(self.tokens)
        while n > 0 and len(self.tokenizer.decode(self.tokens[: n - 1])) >= len(self.text):
            n -= 1
        return n

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


class CompletionStream:
    """A request's text as it is generated. Iterating yields, after each decoding step that changed
    a row, one string per row: the text that became final since the previous yield (a row's last
    piece comes with the step that ends it); then once more at the end, empty strings. While it runs:
    each row's ``tokens``, ``logprobs`` and ``top_logprobs`` so far, ``finish_reasons`` (None while a
    row generates, then "stop", "length" or "cancelled"), ``cancel(row)``, and ``timing()``. Closing
    the iteration early cancels the rows still running.

    ``request`` is the engine's ``Request`` (``llama.engine``) and ``steps`` the iterator of its
    per-step deltas that runs the engine (``Engine.run_until_done``)."""

    def __init__(self, request, steps: Iterator[list], refused: Optional[List[bool]] = None):
        self.request = request
        self.steps = steps
        self.refused = refused or [False] * request.n_rows  # rows answered with UNSAFE_ERROR instead
        self.started = self.first_step_done = self.finished = None  # time.perf_counter() readings

    def __iter__(self) -> Iterator[List[str]]:
        for step, pieces in enumerate(self.pieces()):
            yield [
                (UNSAFE_ERROR if step == 0 else "") if refused else piece
                for piece, refused in zip(pieces, self.refused)
            ]

    def pieces(self) -> Iterator[List[str]]:
        self.started = time.perf_counter()
        try:
            for deltas in self.steps:
                if self.first_step_done is None:  # the prefill and each row's first token
                    self.first_step_done = time.perf_counter()
                pieces = [""] * self.request.n_rows
                for delta in deltas:
                    pieces[delta.row] += delta.text
                yield pieces
            yield [""] * self.request.n_rows  # the end: every row's text is complete
        finally:
            self.finished = time.perf_counter()
            if not self.request.done:  # the caller stopped iterating: free the rows' slots
                self.request.cancel()

    def cancel(self, row: int) -> None:
        """Stop generating ``row`` from the next step on (a client that went away); it finishes as
        "cancelled" with the tokens it has. Under model parallelism rank 0's cancellations count."""
        self.request.cancel(row)

    def timing(self) -> str:
        """Prompt tokens/s (the first step: the prefill and each row's first token), the tokens generated
        (as ``max_gen_len`` counts them), and decode tokens/s (every token after each row's first), up
        to now if the iteration was stopped early."""
        now = time.perf_counter()
        first_step_done = self.first_step_done or now
        prompt_seconds, decode_seconds = (
            first_step_done - (self.started or now),
            (self.finished or now) - first_step_done,
        )
        n_prompt, n_generated = self.n_prompt_tokens, sum(len(tokens) for tokens in self.tokens)
        n_decoded = sum(max(len(tokens) - 1, 0) for tokens in self.tokens)
        first = "the first of each row" if len(self.tokens) > 1 else "the first"
        return (
            f"prompt: {n_prompt} tokens in {prompt_seconds:.3f} s "
            f"({n_prompt / max(prompt_seconds, 1e-9):.1f} tokens/s), "
            f"generated: {n_generated} tokens, {first} with the prompt, then "
            f"decode: {n_decoded} tokens in {decode_seconds:.3f} s "
            f"({n_decoded / max(decode_seconds, 1e-9):.1f} tokens/s)"
        )

    @property
    def finish_reasons(self) -> List[Optional[str]]:
        return self.request.finish_reasons

    @property
    def prompt_lens(self) -> List[int]:
        return self.request.prompt_lens

    @property
    def n_prompt_tokens(self) -> int:
        return sum(self.request.prompt_lens)

    @property
    def tokens(self) -> List[List[int]]:
        """Each row's generated tokens so far (after a stop string, those that spell the text)."""
        return self.request.tokens

    @property
    def logprobs(self) -> List[List[float]]:
        """Each row's generated tokens' logprobs so far; needs ``logprobs=True``."""
        if not self.request.options.logprobs:
            raise ValueError("logprobs were not asked for: pass logprobs=True to the *_stream call")
        return self.request.logprobs

    @property
    def top_logprobs(self) -> List[List[List[Tuple[int, float]]]]:
        """Per row, per generated token so far, the k most likely (token id, logprob) pairs; needs
        ``top_logprobs=k``."""
        if not self.request.options.top_logprobs:
            raise ValueError("top_logprobs were not asked for: pass top_logprobs=k to the *_stream call")
        return self.request.top_logprobs
