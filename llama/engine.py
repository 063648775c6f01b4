"""The decoding engine: a fixed set of slots (the rows of the KV cache) that requests come into and
leave between steps. Every generation in this project runs here: ``Llama.generate``, the text and
chat calls, the streams and the server.

- A request is one or more rows (a prompt repeated ``num_return_sequences`` times), each with the
  request's ``GenerationOptions``; row j of a prompt with a seed draws from seed + j. ``submit``
  queues it; at the start of a step the engine admits waiting requests whose rows all fit the free
  slots ("continuous"), or only when every slot is free ("static": one batch at a time, the policy
  of a server without continuous batching, kept so the gain can be measured).
- A step prefills the admitted prompts in chunks of at most ``prefill_chunk`` tokens a row (while
  other rows decode, at most ``prefill_chunk`` tokens in all), so a long prompt delays the running
  rows by at most one chunk per step; a row whose prompt is complete samples its first token. Then
  every running row decodes one token. A row leaves the moment it ends (stop token, stop string,
  its ``max_gen_len``, the end of the context, or cancelled), freeing its slot for the next step.
- The decode step has static shapes: the first ``width`` slots (a power of two covering every
  busy slot) decode together, idle ones on a position nobody reads, and attend over a power-of-two
  bucket of the cache. With ``compile=True`` the whole step is one compiled graph: the model, the
  sampler of every row with its own settings (``llama.sampling``), and the writes of the step's
  tokens, positions and penalty counts. The host waits once a step, to read the tokens.
- Each row's position lives on the device (``positions``) and on the host (``Row.position``), so a
  step could advance a row by any number of tokens.
- Under torchrun every rank runs an engine. Rank 0 decides each step's admissions and cancellations
  and broadcasts them (``StepPlan``) before the step; the sampled tokens are broadcast from rank 0
  inside the step, so every rank writes the same tokens. In-process callers (``generate`` under
  torchrun) submit the same requests on every rank, in the same order; a server submits on rank 0
  only and the other ranks ``follow``.

Threads: ``submit``, ``Request.cancel``, ``Request.updates`` and the metrics properties may be
called from any thread; ``step``, ``run``, ``follow`` and ``run_until_done`` from the one thread
that owns the model.
"""

import logging
import threading
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch

from llama.model import Transformer
from llama.options import GenerationOptions
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ADMISSIONS = ("continuous", "static")


@dataclass
class RowDelta:
    """What one row of a request produced in one step.

    row: the row's index in its request (prompt i's sample j is row i*n + j).
    text: the text that became final ("" if none: a stop string or a multi-byte character may be
        pending); after the row ends, the rest of its text.
    tokens: the new token ids (those that spell the text, after a stop string; never a stop token).
    logprobs: their log-probabilities (the model's distribution, before any sampling option) when
        the request asked for ``logprobs``, else [].
    top_logprobs: per new token, the ``top_logprobs`` most likely (token id, logprob) pairs, else [].
    finish_reason: None while the row runs, then "stop", "length" or "cancelled".
    """

    row: int
    text: str
    tokens: List[int]
    logprobs: List[float]
    top_logprobs: List[List[Tuple[int, float]]]
    finish_reason: Optional[str]


class Request:
    """One submitted request: its rows and what they generated so far. Made by ``Engine.submit``.

    Read from any thread: ``finish_reasons``, ``done``, ``tokens``, ``logprobs``, ``top_logprobs``,
    ``texts``; ``updates()`` yields each step's ``RowDelta``s as they come (blocking), for a thread
    that does not run the engine; ``cancel()`` ends rows at the next step. ``submitted_at``,
    ``admitted_at`` and ``first_token_at`` are ``time.monotonic()`` readings (None until then).
    """

    id: int
    prompt_tokens: List[List[int]]  # one list per row (each prompt repeated per sample)
    options: GenerationOptions

    @property
    def n_rows(self) -> int:
        """How many rows (slots) the request needs."""

    @property
    def prompt_lens(self) -> List[int]:
        """Each row's prompt length."""

    @property
    def finish_reasons(self) -> List[Optional[str]]:
        """Per row: None while waiting or running, then "stop", "length" or "cancelled"."""

    @property
    def done(self) -> bool:
        """Every row has ended (finished, cancelled, or refused)."""

    @property
    def tokens(self) -> List[List[int]]:
        """Each row's generated tokens so far (after a stop string, those that spell the text)."""

    @property
    def logprobs(self) -> List[List[float]]:
        """Each row's generated tokens' logprobs so far (``logprobs=True``); with ``echo``, once
        done, ``results()`` has the prompt's too."""

    @property
    def top_logprobs(self) -> List[List[List[Tuple[int, float]]]]:
        """Per row, per generated token so far, the k most likely (token id, logprob) pairs."""

    def cancel(self, row: Optional[int] = None) -> None:
        """End ``row`` (None: every row) at the next step, keeping the tokens it has; its finish
        reason becomes "cancelled". A request still waiting for slots leaves the queue. Thread-safe.

        Raises:
            ValueError: ``row`` is not one of the request's rows.
        """

    def updates(self, timeout: Optional[float] = None) -> Iterator[List[RowDelta]]:
        """Each step's deltas (one list per step that changed something), until every row has ended;
        the last list holds each row's final delta with its finish reason. Blocks between steps, for
        a thread other than the engine's. ``timeout``: seconds to wait for one step before raising
        ``TimeoutError``; None waits for ever."""

    def texts(self) -> List[str]:
        """Each row's text (its prompt's too with ``echo``), cut before the first stop string."""

    def results(self):
        """(tokens, logprobs[, top_logprobs]) per row, as ``Llama.generate`` returns them: with
        ``echo`` the prompt's tokens (and logprobs, BOS's 0) come first."""


@dataclass
class StepPlan:
    """What rank 0 decided for one step, broadcast to every rank before it: the requests admitted
    (id, rows' prompts, options, the slot of each row) and the rows cancelled (slots). ``kind`` is
    "step", "heartbeat" (an idle rank 0 is alive) or "shutdown" (followers return)."""

    kind: str
    admissions: List[Tuple[int, List[List[int]], GenerationOptions, List[int]]]
    cancellations: List[int]


class Engine:
    """The slots of one model and the loop that fills and decodes them. See the module docstring.

    Args:
        model: the model; its cache has ``params.max_batch_size`` rows (the slots) of
            ``params.max_seq_len`` positions.
        tokenizer: for stop strings and the text of each row.
        compile: run the decode step (model, sampler and writes) as one ``torch.compile`` graph.
        admission: "continuous" (admit into free slots between steps) or "static" (admit only into
            an empty batch).
        prefill_chunk: most prompt tokens a row prefills per step (and in all, while rows decode).
        heartbeat_seconds: under torchrun, how often an idle rank 0 tells the others it is alive.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        compile: bool = False,
        admission: str = "continuous",
        prefill_chunk: int = 256,
        heartbeat_seconds: float = 10.0,
    ):
        ...

    # --- any thread -------------------------------------------------------------------------------

    def submit(self, prompt_tokens: List[List[int]], options: GenerationOptions, what: str = "prompt_tokens") -> Request:
        """Queue a request: each prompt ``options.num_return_sequences`` times, one row each, in
        prompt order. Checked here (prompts fit the context and the vocabulary, rows fit
        ``max_batch_size``, options fit the vocabulary); ``what`` names the prompts in errors
        ("prompt_tokens", "prompt", "dialog"). Thread-safe; wakes ``run``.

        Returns:
            The ``Request``, waiting for slots.

        Raises:
            ValueError, TypeError: a prompt or an option the model cannot take, or the engine is
                shutting down.
        """

    @property
    def max_slots(self) -> int:
        """The number of slots: the cache's ``max_batch_size``."""

    @property
    def queue_length(self) -> int:
        """Requests waiting for slots."""

    @property
    def running_slots(self) -> int:
        """Slots holding a row (prefilling or decoding)."""

    def stop(self) -> None:
        """Ask ``run`` to return after the current step: every request, running or waiting, is
        cancelled (finish reason "cancelled"), and followers are told to shut down. Safe in a signal
        handler."""

    # --- the thread that owns the model -----------------------------------------------------------

    def step(self) -> bool:
        """One step: admit, prefill one chunk, decode one token per running row, publish each
        request's deltas. Under torchrun rank 0 broadcasts the step's plan first. Returns whether
        there was anything to do."""

    def run_until_done(self, request: Request) -> Iterator[List[RowDelta]]:
        """Run steps until ``request`` is done, yielding its deltas after each step that changed it
        (the streams' and ``generate``'s loop, on the caller's thread)."""

    def run(self) -> None:
        """Rank 0's serving loop: steps while there is work; idle, waits for ``submit`` (no
        spinning) and under torchrun broadcasts a heartbeat every ``heartbeat_seconds``; returns
        after ``stop``, having told the followers."""

    def follow(self) -> None:
        """A rank > 0's serving loop: runs each step rank 0 plans, until rank 0 shuts down. It waits
        in the broadcast, which rank 0's heartbeats keep from timing out."""
