"""Turning generated tokens into text as they arrive: one row's ``TextStream``, ended at a stop
string, and the ``CompletionStream`` of a whole batch that ``Llama``'s ``*_stream`` calls return.

Sentencepiece pieces cannot be decoded one at a time: decoding drops the spaces ("▁") that begin
the text, and byte-fallback pieces spell one character over several tokens. So the new text of a
token is what decoding a short window of recent tokens adds to decoding the same window without
it, both behind an anchor piece that takes the dropped space (except at the very start, where the
whole text drops it too); a window that ends in U+FFFD (an unfinished character) waits for the
next token.
"""

import time
from typing import TYPE_CHECKING, Iterator, List, Optional, Sequence, Tuple

from llama.chat_format import UNSAFE_ERROR
from llama.tokenizer import Tokenizer

if TYPE_CHECKING:
    from llama.decoding import Decoding

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
    """A batch's text as it is generated. Iterating yields, after each decoding step and once more at
    the end, one string per row: the text that became final since the previous yield. While it runs:
    each row's ``tokens``, ``logprobs`` and ``top_logprobs`` so far, ``finish_reasons`` (None while a
    row generates, then "stop", "length" or "cancelled"), ``cancel(row)``, and ``timing()``."""

    def __init__(self, steps: Iterator[int], state: "Decoding", refused: Optional[List[bool]] = None):
        self.steps = steps
        self.state = state
        self.refused = refused or [False] * len(state.streams)  # rows answered with UNSAFE_ERROR instead
        self.started = self.first_step_done = self.finished = None  # time.perf_counter() readings

    def __iter__(self) -> Iterator[List[str]]:
        for step, pieces in enumerate(self.pieces()):
            yield [(UNSAFE_ERROR if step == 0 else "") if refused else piece for piece, refused in zip(pieces, self.refused)]

    def pieces(self) -> Iterator[List[str]]:
        self.started = time.perf_counter()
        for step in self.steps:
            if step == 0:  # the prefill and each row's first token
                self.first_step_done = time.perf_counter()
            # a row that has finished releases what it held back: its text is complete from that step on
            yield [stream.read() if reason is None else stream.close() for stream, reason in zip(self.state.streams, self.state.finish_reasons)]
        self.finished = time.perf_counter()
        yield [stream.close() for stream in self.state.streams]

    def cancel(self, row: int) -> None:
        """Stop generating ``row`` from the next step on (a client that went away); it finishes as
        "cancelled" with the tokens it has. Under model parallelism rank 0's cancellations count."""
        self.state.cancel(row)

    def timing(self) -> str:
        """Prompt tokens/s (the first step: the prefill and each row's first token), the tokens generated
        (as ``max_gen_len`` counts them), and decode tokens/s (every token after each row's first), up
        to now if the iteration was stopped early."""
        now = time.perf_counter()
        first_step_done = self.first_step_done or now
        prompt_seconds, decode_seconds = first_step_done - (self.started or now), (self.finished or now) - first_step_done
        n_prompt, n_generated = self.n_prompt_tokens, sum(len(tokens) for tokens in self.tokens)
        n_decoded = sum(max(len(tokens) - 1, 0) for tokens in self.tokens)
        first = "the first of each row" if len(self.tokens) > 1 else "the first"
        return (
            f"prompt: {n_prompt} tokens in {prompt_seconds:.3f} s ({n_prompt / max(prompt_seconds, 1e-9):.1f} tokens/s), "
            f"generated: {n_generated} tokens, {first} with the prompt, then "
            f"decode: {n_decoded} tokens in {decode_seconds:.3f} s ({n_decoded / max(decode_seconds, 1e-9):.1f} tokens/s)"
        )

    @property
    def finish_reasons(self) -> List[Optional[str]]:
        return list(self.state.finish_reasons)

    @property
    def prompt_lens(self) -> List[int]:
        return list(self.state.prompt_lens)

    @property
    def n_prompt_tokens(self) -> int:
        return sum(self.state.prompt_lens)

    @property
    def tokens(self) -> List[List[int]]:
        """Each row's generated tokens so far (after a stop string, those that spell the text)."""
        return [self.state.tokens_so_far(row) for row in range(len(self.state.prompt_lens))]

    @property
    def logprobs(self) -> List[List[float]]:
        """Each row's generated tokens' logprobs so far; needs ``logprobs=True``."""
        if self.state.token_logprobs is None:
            raise ValueError("logprobs were not asked for: pass logprobs=True to the *_stream call")
        rows = self.state.token_logprobs.tolist()
        return [row[self.state.prompt_lens[i] : self.state.prompt_lens[i] + len(tokens)] for i, (row, tokens) in enumerate(zip(rows, self.tokens))]

    @property
    def top_logprobs(self) -> List[List[List[Tuple[int, float]]]]:
        """Per row, per generated token so far, the k most likely (token id, logprob) pairs; needs
        ``top_logprobs=k``."""
        if self.state.top_ids is None:
            raise ValueError("top_logprobs were not asked for: pass top_logprobs=k to the *_stream call")
        ids, lps = self.state.top_ids.tolist(), self.state.top_logprobs.tolist()
        return [
            [list(zip(i, lp)) for i, lp in zip(ids[row][start : start + len(tokens)], lps[row][start : start + len(tokens)])]
            for row, (start, tokens) in enumerate(zip(self.state.prompt_lens, self.tokens))
        ]
