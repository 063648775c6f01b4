"""A request and its rows: what each row holds on the host (its prompt, its blocks, where it is, what it
generated, why it ended), and the deltas a request publishes to whoever waits on it.

Threads: ``Request``'s readers (``tokens``, ``finish_reasons``, ``updates`` ...) and ``cancel`` may be
called from any thread; the engine's side (``record``, ``finish``, ``publish``) from the engine's.
"""

import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, List, NamedTuple, Optional, Protocol, Set, Tuple

from llama.engine.block_manager import BlockTable
from llama.engine.streaming import TextStream, cut_at_stop
from llama.options import GenerationOptions
from llama.tokenizer import Tokenizer

if TYPE_CHECKING:  # a row keeps prompt lookup's index, which speculative decoding builds
    from llama.engine.speculative import NgramIndex


@dataclass
class RowDelta:
    """What one row of a request produced in one step.

    row: the row's index in its request (prompt i's sample j is row i*n + j).
    text: the text that became final ("" if none: a stop string or a multi-byte character may be
        pending; always "" for a request submitted without ``stream_text``); after the row ends,
        the rest of its text.
    tokens: the new token ids (those that spell the text, after a stop string; never a stop token).
    logprobs: their log-probabilities (the model's distribution, or with ``tempered_logprobs`` the one at
        the row's temperature; no other sampling option) when the request asked for ``logprobs``, else [].
    top_logprobs: per new token, the ``top_logprobs`` most likely (token id, logprob) pairs, else [].
    finish_reason: None while the row runs, then "stop", "length", "cancelled", or "error" (a serving
        loop's step failed).
    prompt_logprobs, prompt_top_logprobs: in the row's first delta, when its request scores its prompt
        (``echo`` with ``logprobs`` or ``top_logprobs``), the scores of the prompt's tokens after the first
        (``Row.prompt_logprobs``, ``Row.prompt_top_logprobs``); else None.
    """

    row: int
    text: str
    tokens: List[int]
    logprobs: List[float]
    top_logprobs: List[List[Tuple[int, float]]]
    finish_reason: Optional[str]
    prompt_logprobs: Optional[List[float]] = None
    prompt_top_logprobs: Optional[List[List[Tuple[int, float]]]] = None


SCORING = GenerationOptions(max_gen_len=0, temperature=0.0, stop_tokens=[])  # a scored pair's: it generates nothing


def check_pairs(pairs, max_seq_len: int, vocab_size: int) -> None:
    """Each (context, continuation) pair two non-empty lists of token ids in the vocabulary, at most
    ``max_seq_len + 1`` tokens together (the last is scored, never fed)."""
    if not isinstance(pairs, (list, tuple)):
        raise TypeError(f"pairs must be a list of (context, continuation) token lists, got {type(pairs).__name__}")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, (list, tuple)) for s in pair)):
            raise TypeError(f"pair {i} must be (context, continuation), two lists of token ids, got {pair!r:.80}")
        context, continuation = pair
        if not context or not continuation:
            raise ValueError(
                f"pair {i} needs a non-empty context and continuation, got {len(context)} and "
                f"{len(continuation)} token(s)"
            )
        if len(context) + len(continuation) > max_seq_len + 1:
            raise ValueError(
                f"pair {i} has {len(context) + len(continuation)} tokens, more than max_seq_len + 1 = {max_seq_len + 1}"
            )
        bad = [t for t in (*context, *continuation) if not (type(t) is int and 0 <= t < vocab_size)]  # not a bool
        if bad:
            raise ValueError(f"pair {i} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")


class DeltaSink(Protocol):
    """Where a request's deltas go, a list per step and None at the end: ``queue.Queue`` (the default,
    which ``Request.updates`` reads), or a caller's own (the server's, which wakes its event loop)."""

    def put(self, item: Optional[List[RowDelta]]) -> None: ...


class Sampled(NamedTuple):
    """A token a row sampled, as the device's step reads it back: its id, its logprob (None unless the
    request asked for logprobs) and the most likely (token id, logprob) pairs (None unless it asked)."""

    token: int
    logprob: Optional[float]
    alternatives: Optional[List[Tuple[int, float]]]


class Row:
    """One row of a request, on the host: its slot, where it is, what it generated, why it ended. What
    follows from these (its options, whether it decodes, the tokens it returns) is derived, not kept."""

    def __init__(self, request: "Request", index: int, prompt: List[int], limit: int, stream: Optional[TextStream]):
        self.request = request
        self.index = index
        self.prompt = prompt
        self.limit = limit  # its output ends by this position
        self.stream = stream
        self.slot: Optional[int] = None  # the slot it holds (``Scheduler`` alone sets it)
        self.table = BlockTable()  # its blocks of the KV cache pool (rank 0's, under torchrun)
        # the tokens its prefill puts in the cache: the prompt; all but the last of a scored pair's
        # (``Request.scoring``) or, after a preemption, of what it generated
        self.target = prompt
        self.cached = 0  # prompt tokens found in the prefix cache at admission
        self.prefilled = 0  # target tokens in the cache
        self.position = len(prompt) - 1  # where its last token sits: the next decode step's input
        self.tokens: List[int] = []  # generated, up to the one that completed a stop string
        self.logprobs: List[float] = []
        self.top_logprobs: List[List[Tuple[int, float]]] = []
        options = request.options
        scores = options.echo and (options.logprobs or options.top_logprobs)
        self.scored_from = 1 if scores else None  # the first prompt token its prefill scores
        self.prompt_logprobs: List[float] = []  # those of prompt[scored_from:]
        self.prompt_greedy: List[bool] = []  # whether each of them is the model's most likely token
        self.prompt_top_logprobs: List[List[Tuple[int, float]]] = []  # with top_logprobs: the likeliest there
        self.finish_reason: Optional[str] = None
        self.stopped_by: Optional[Sampled] = None  # the stop token that ended it (never in ``tokens``)
        self.sent = 0  # tokens already in a delta
        self.closed = False  # its last delta, with its finish reason, is out
        self.lookup: Optional["NgramIndex"] = None  # prompt lookup's index of its tokens
        self.speculative_steps = 0  # speculative steps taken: seeds its draws in the next one
        self.accepted = 0  # proposals accepted in all (the benchmarks' acceptance rate)

    @property
    def options(self) -> GenerationOptions:
        return self.request.options

    @property
    def decoding(self) -> bool:
        """It holds a slot and its prefill is in the cache: it has a token to decode from."""
        return self.slot is not None and self.prefilled >= len(self.target)

    @property
    def sequence(self) -> List[int]:
        """Its prompt and its generated tokens (all of them: the row ends at a stop)."""
        return self.prompt + self.tokens

    @property
    def cacheable(self) -> List[int]:
        """The leading tokens whose keys and values it may take from the prefix cache: its target's, but
        those before the first token it scores only (their logits are not computed again)."""
        if self.scored_from is None or self.tokens:
            return self.target
        return self.prompt[: self.scored_from]

    @property
    def written(self) -> int:
        """Positions whose keys and values are in the cache: below the next input's."""
        return self.position if self.decoding else self.prefilled

    @property
    def returned(self) -> int:
        """How many generated tokens it returns: after a stop string, those that spell the text."""
        return self.stream.kept if self.stream is not None and self.stream.stopped else len(self.tokens)


class Request:
    """One submitted request: its rows and what they generated so far. Made by ``Engine.submit``.

    Read from any thread: ``finish_reasons``, ``done``, ``tokens``, ``logprobs``, ``top_logprobs``,
    ``stopped_by``, ``texts``; ``updates()`` yields each step's ``RowDelta``s as they come (blocking), for a
    thread that does not run the engine; ``cancel()`` ends rows at the next step. ``submitted_at``,
    ``admitted_at`` and ``first_token_at`` are ``time.monotonic()`` readings (None until then).
    """

    def __init__(
        self,
        id: int,
        prompt_tokens: List[List[int]],
        options: GenerationOptions,
        tokenizer: Tokenizer,
        max_seq_len: int,
        stream_text: bool,
        deltas: Optional[DeltaSink] = None,
    ):
        self.id = id
        self.prompt_tokens = prompt_tokens  # one list per row
        self.options = options
        self.stream_text = stream_text
        self.tokenizer = tokenizer
        self.stop_tokens = set(tokenizer.stop_tokens if options.stop_tokens is None else options.stop_tokens)
        max_gen_len = max_seq_len if options.max_gen_len is None else options.max_gen_len
        streams = stream_text or bool(options.stop_strings)
        self.rows = [
            Row(
                self,
                i,
                prompt,
                min(len(prompt) + max_gen_len, max_seq_len),
                TextStream(tokenizer, options.stop_strings) if streams else None,
            )
            for i, prompt in enumerate(prompt_tokens)
        ]
        self.lock = threading.Lock()
        self.admitted = 0  # its rows [0, admitted) took a slot (the scheduler admits them in order)
        self.cancelled: Set[int] = set()  # rows asked to end, taken by the engine at its next step
        self.deltas: DeltaSink = queue.Queue() if deltas is None else deltas  # a list per step, None: the end
        self.submitted_at = time.monotonic()
        self.admitted_at: Optional[float] = None
        self.first_token_at: Optional[float] = None

    @classmethod
    def scoring(cls, id: int, context: List[int], continuation: List[int]) -> "Request":
        """A request that scores ``continuation`` after ``context`` (``Engine.score``): one row, whose prefill
        feeds every token but the last, scores each continuation token (``Row.prompt_logprobs``,
        ``Row.prompt_greedy``), and ends ("length")."""
        prompt = list(context) + list(continuation)
        request = cls(id, [prompt], SCORING, None, len(prompt), stream_text=False)
        row = request.rows[0]
        row.target, row.scored_from = prompt[:-1], len(context)
        return request

    @property
    def n_rows(self) -> int:
        """How many rows (slots) the request needs."""
        return len(self.rows)

    @property
    def waiting_rows(self) -> List[Row]:
        """Its rows that wait for a slot: not admitted yet, not ended."""
        return [row for row in self.rows[self.admitted :] if row.finish_reason is None]

    @property
    def prompt_lens(self) -> List[int]:
        """Each row's prompt length."""
        return [len(row.prompt) for row in self.rows]

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens found in the prefix cache when first admitted (not computed), each prompt
        counted once (its first row's), as OpenAI's usage counts prompt tokens."""
        return sum(row.cached for row in self.rows[:: self.options.num_return_sequences])

    @property
    def finish_reasons(self) -> List[Optional[str]]:
        """Per row: None while waiting or running, then "stop", "length", "cancelled" or "error"."""
        with self.lock:
            return [row.finish_reason for row in self.rows]

    @property
    def done(self) -> bool:
        """Every row has ended (finished or cancelled)."""
        return all(reason is not None for reason in self.finish_reasons)

    @property
    def tokens(self) -> List[List[int]]:
        """Each row's generated tokens so far (after a stop string, those that spell the text)."""
        with self.lock:
            return [row.tokens[: row.returned] for row in self.rows]

    @property
    def logprobs(self) -> List[List[float]]:
        """Each row's generated tokens' logprobs so far (needs ``logprobs=True``)."""
        with self.lock:
            return [row.logprobs[: row.returned] for row in self.rows]

    @property
    def top_logprobs(self) -> List[List[List[Tuple[int, float]]]]:
        """Per row, per generated token so far, the k most likely (token id, logprob) pairs (needs
        ``top_logprobs=k``)."""
        with self.lock:
            return [row.top_logprobs[: row.returned] for row in self.rows]

    @property
    def stopped_by(self) -> List[Optional[Tuple[int, Optional[float]]]]:
        """Per row: (the stop token that ended it, its logprob or None without ``logprobs``), or None when no
        stop token ended it (it runs, or ended on a stop string, its length, a cancel). The stop token is never
        among ``tokens``; a policy-gradient step learns it too."""
        with self.lock:
            stops = [row.stopped_by for row in self.rows]
        return [None if stop is None else (stop.token, stop.logprob) for stop in stops]

    def cancel(self, row: Optional[int] = None) -> None:
        """End ``row`` (None: every row) at the next step, keeping the tokens it has; its finish
        reason becomes "cancelled". Thread-safe. Under torchrun rank 0's cancellations count.

        Raises:
            ValueError: ``row`` is not one of the request's rows.
        """
        if row is not None and not (isinstance(row, int) and 0 <= row < self.n_rows):
            raise ValueError(f"row must be in [0, {self.n_rows}), got {row!r}")
        with self.lock:
            self.cancelled.update(range(self.n_rows) if row is None else [row])

    def updates(self, timeout: Optional[float] = None) -> Iterator[List[RowDelta]]:
        """Each step's deltas (one list per step that changed something), until every row has ended;
        the last list holds each row's final delta with its finish reason. Blocks between steps, for
        a thread other than the engine's. ``timeout``: seconds to wait for one step before raising
        ``TimeoutError``; None waits for ever."""
        while True:
            try:
                deltas = self.deltas.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no step in {timeout} s") from None
            if deltas is None:
                return
            yield deltas

    def texts(self) -> List[str]:
        """Each row's text (its prompt's too with ``echo``), cut before the first stop string."""
        texts = []
        for row in self.rows:
            prompt = row.prompt if self.options.echo else []
            prompt_chars = len(self.tokenizer.decode(prompt)) if prompt else 0
            texts.append(
                cut_at_stop(self.tokenizer.decode(prompt + row.tokens), self.options.stop_strings, prompt_chars)
            )
        return texts

    def results(self):
        """(tokens, logprobs[, top_logprobs]) per row, as ``Llama.generate`` returns them: with
        ``echo`` the prompt's tokens (and logprobs, BOS's 0, and alternatives, none for BOS) come first."""
        echo, tokens = self.options.echo, self.tokens
        tokens = [(row.prompt if echo else []) + generated for row, generated in zip(self.rows, tokens)]
        logprobs = None
        if self.options.logprobs:
            prompts = [[0.0] + row.prompt_logprobs if echo else [] for row in self.rows]  # nothing predicts BOS: 0
            logprobs = [prompt + generated for prompt, generated in zip(prompts, self.logprobs)]
        if not self.options.top_logprobs:
            return tokens, logprobs
        prompts = [[[]] + row.prompt_top_logprobs if echo else [] for row in self.rows]
        return tokens, logprobs, [prompt + generated for prompt, generated in zip(prompts, self.top_logprobs)]

    # --- the engine's side ------------------------------------------------------------------------

    def record(self, row: Row, sampled: Sampled) -> bool:
        """The row learns a token it sampled, at ``row.position + 1``, and ends if it must (a stop token,
        a stop string, its limit). Returns whether it ended."""
        with self.lock:
            row.position += 1
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if sampled.token in self.stop_tokens:
                row.finish_reason, row.stopped_by = "stop", sampled
                return True
            row.tokens.append(sampled.token)
            if sampled.logprob is not None:
                row.logprobs.append(sampled.logprob)
            if sampled.alternatives is not None:
                row.top_logprobs.append(sampled.alternatives)
            if row.stream is not None:
                row.stream.push(sampled.token)
                if row.stream.stopped:
                    row.finish_reason = "stop"
                    return True
            if row.position + 1 >= row.limit:
                row.finish_reason = "length"
            return row.finish_reason is not None

    def finish(self, row: Row, reason: str) -> None:
        with self.lock:
            row.finish_reason = reason

    def publish(self) -> None:
        """Put the rows' news since the last call on ``deltas``, and the end once every row ended."""
        deltas = []
        with self.lock:
            for row in self.rows:
                if row.closed:
                    continue
                ended = row.finish_reason is not None
                text = (
                    ""
                    if row.stream is None or not self.stream_text
                    else (row.stream.close() if ended else row.stream.read())
                )
                end = row.returned
                if text or end > row.sent or ended:
                    # a row's first delta comes once its prefill is done: its prompt's scores are complete
                    first = row.sent == 0 and row.scored_from is not None
                    deltas.append(
                        RowDelta(
                            row.index,
                            text,
                            row.tokens[row.sent : end],
                            row.logprobs[row.sent : end],
                            row.top_logprobs[row.sent : end],
                            row.finish_reason,
                            list(row.prompt_logprobs) if first else None,
                            list(row.prompt_top_logprobs) if first and self.options.top_logprobs else None,
                        )
                    )
                row.sent, row.closed = max(row.sent, end), ended
            ended = all(row.closed for row in self.rows)
        if deltas:
            self.deltas.put(deltas)
        if ended:
            self.deltas.put(None)
