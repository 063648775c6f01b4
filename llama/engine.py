"""The decoding engine: a fixed set of slots (the rows of the KV cache) that requests come into and
leave between steps. Every generation in this project runs here: ``Llama.generate``, the text and
chat calls, the streams and the server.

- A request is one or more rows (a prompt repeated ``num_return_sequences`` times), each with the
  request's ``GenerationOptions``; row j of a prompt with a seed draws from seed + j. ``submit``
  queues it; at the start of a step the engine admits waiting requests whose rows all fit the free
  slots ("continuous"), or only when every slot is free ("static": one batch at a time, the policy
  of a server without continuous batching, kept so the gain can be measured).
- A step prefills the admitted prompts: while other rows decode, in chunks of at most
  ``prefill_chunk`` tokens in all, so a long prompt delays the running rows by at most one chunk
  per step; into an idle engine, every prompt in one pass (``generate``'s batch). A row whose
  prompt is complete samples its first token, and decodes from the next step on. Then
  every running row decodes one token. A row leaves the moment it ends (stop token, stop string,
  its ``max_gen_len``, the end of the context, or cancelled), freeing its slot for the next step.
- The decode step runs on the first ``width`` slots, covering every decoding row (idle slots among
  them decode on a position nobody reads), and attends over the cache up to the furthest row.
  Compiled, its shapes are static: ``width`` is a power of two and the attended length a
  power-of-two bucket, so rows coming and going compile nothing new after the first few steps
  (at most log2(max_batch_size) + 1 widths; the length is dynamic below the whole cache, which has
  a graph of its own). With ``compile=True`` the whole step is one compiled graph: the model, the
  sampler of every row with its own settings (``llama.sampling``), and the writes of the step's
  tokens, positions and penalty counts. The host waits once a step, to read the tokens. The compiled
  step holds the whole sampler (penalties, sampling, logprobs, ``top_logprobs`` up to the most
  warmed), the rows' settings as tensors, and on a CPU ``torch.cond`` runs the penalties and the
  sampler's sort only when a row needs them: one graph per width and length serves every mix of options, and
  ``warm_up`` compiles them all before the first request (a server's start).
- Each row's position lives on the device (``positions``) and on the host (``Row.position``), so a
  step could advance a row by any number of tokens.
- A row with ``json_schema`` / ``json_object`` follows a grammar (``llama.structured``): it gets a
  matcher when admitted, its allowed next tokens are written into ``allowed`` before each step, the
  sampler takes only those, and each token it takes advances its matcher; the other rows' masks allow
  every token, so they share the batch (and the compiled graph) unchanged.
- Under torchrun every rank runs an engine. Rank 0 decides each step's admissions and cancellations
  and broadcasts them (``StepPlan``) before the step; the sampled tokens are broadcast from rank 0
  inside the step, so every rank writes the same tokens. In-process callers (``generate`` under
  torchrun) submit the same requests on every rank, in the same order; a server submits on rank 0
  only and the other ranks ``follow``.

Threads: ``submit``, ``Request.cancel``, ``Request.updates`` and the metrics properties may be
called from any thread; ``step``, ``run``, ``follow`` and ``run_until_done`` from the one thread
that owns the model.
"""

import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterator, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama.model import Transformer
from llama.options import GenerationOptions, check_batch_size, check_prompts
from llama.parallel import broadcast_from_rank0, model_parallel_world_size
from llama.sampling import RowSettings, apply_penalties, distribution, global_exponentials, sample, seed_key
from llama.speculative import ChunkForward, NgramIndex, attended_slots, exponentials, penalised_per_position, step_keys, verify
from llama.streaming import TextStream, cut_at_stop
from llama.structured import Constraints
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ADMISSIONS = ("continuous", "static")


def power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class RowDelta:
    """What one row of a request produced in one step.

    row: the row's index in its request (prompt i's sample j is row i*n + j).
    text: the text that became final ("" if none: a stop string or a multi-byte character may be
        pending; always "" for a request submitted without ``stream_text``); after the row ends,
        the rest of its text.
    tokens: the new token ids (those that spell the text, after a stop string; never a stop token).
    logprobs: their log-probabilities (the model's distribution, before any sampling option) when
        the request asked for ``logprobs``, else [].
    top_logprobs: per new token, the ``top_logprobs`` most likely (token id, logprob) pairs, else [].
    finish_reason: None while the row runs, then "stop", "length", "cancelled", or "error" (a serving
        loop's step failed).
    """

    row: int
    text: str
    tokens: List[int]
    logprobs: List[float]
    top_logprobs: List[List[Tuple[int, float]]]
    finish_reason: Optional[str]


class Row:
    """One row of a request, on the host: its slot, where it is, what it generated, why it ended."""

    def __init__(self, index: int, prompt: List[int], limit: int, stream: Optional[TextStream]):
        self.index = index
        self.prompt = prompt
        self.limit = limit  # its output ends by this position
        self.stream = stream
        self.slot: Optional[int] = None
        self.prefilled = 0  # prompt tokens in the cache
        self.decoding = False  # its prompt is in the cache and it has a token to decode from
        self.position = len(prompt) - 1  # where its last token sits: the next decode step's input
        self.tokens: List[int] = []  # generated, up to the one that completed a stop string
        self.kept: Optional[int] = None  # after a stop string: how many of them spell the text
        self.logprobs: List[float] = []
        self.top_logprobs: List[List[Tuple[int, float]]] = []
        self.prompt_logprobs: List[float] = [0.0]  # with echo and logprobs; nothing predicts BOS
        self.finish_reason: Optional[str] = None
        self.sent = 0  # tokens already in a delta
        self.closed = False  # its last delta, with its finish reason, is out
        self.lookup: Optional[NgramIndex] = None  # prompt lookup's index of its tokens
        self.speculative_steps = 0  # speculative steps taken: seeds its draws in the next one
        self.accepted = 0  # proposals accepted in all (the benchmarks' acceptance rate)

    @property
    def sequence(self) -> List[int]:
        """Its prompt and its generated tokens (all of them: the row ends at a stop)."""
        return self.prompt + self.tokens

    @property
    def returned(self) -> int:
        """How many generated tokens it returns."""
        return len(self.tokens) if self.kept is None else self.kept


class Request:
    """One submitted request: its rows and what they generated so far. Made by ``Engine.submit``.

    Read from any thread: ``finish_reasons``, ``done``, ``tokens``, ``logprobs``, ``top_logprobs``,
    ``texts``; ``updates()`` yields each step's ``RowDelta``s as they come (blocking), for a thread
    that does not run the engine; ``cancel()`` ends rows at the next step. ``submitted_at``,
    ``admitted_at`` and ``first_token_at`` are ``time.monotonic()`` readings (None until then).
    """

    def __init__(self, id: int, prompt_tokens: List[List[int]], options: GenerationOptions, tokenizer: Tokenizer, max_seq_len: int, stream_text: bool):
        self.id = id
        self.prompt_tokens = prompt_tokens  # one list per row
        self.options = options
        self.stream_text = stream_text
        self.tokenizer = tokenizer
        self.stop_tokens = set(tokenizer.stop_tokens if options.stop_tokens is None else options.stop_tokens)
        max_gen_len = max_seq_len if options.max_gen_len is None else options.max_gen_len
        streams = stream_text or bool(options.stop_strings)
        self.rows = [
            Row(i, prompt, min(len(prompt) + max_gen_len, max_seq_len), TextStream(tokenizer, options.stop_strings) if streams else None)
            for i, prompt in enumerate(prompt_tokens)
        ]
        self.lock = threading.Lock()
        self.cancelled: Set[int] = set()  # rows asked to end, taken by the engine at its next step
        self.deltas: "queue.Queue[Optional[List[RowDelta]]]" = queue.Queue()  # None: the end
        self.submitted_at = time.monotonic()
        self.admitted_at: Optional[float] = None
        self.first_token_at: Optional[float] = None

    @property
    def n_rows(self) -> int:
        """How many rows (slots) the request needs."""
        return len(self.rows)

    @property
    def prompt_lens(self) -> List[int]:
        """Each row's prompt length."""
        return [len(row.prompt) for row in self.rows]

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
            texts.append(cut_at_stop(self.tokenizer.decode(prompt + row.tokens), self.options.stop_strings, prompt_chars))
        return texts

    def results(self):
        """(tokens, logprobs[, top_logprobs]) per row, as ``Llama.generate`` returns them: with
        ``echo`` the prompt's tokens (and logprobs, BOS's 0) come first."""
        echo, tokens = self.options.echo, self.tokens
        tokens = [(row.prompt if echo else []) + generated for row, generated in zip(self.rows, tokens)]
        logprobs = None
        if self.options.logprobs:
            logprobs = [(row.prompt_logprobs if echo else []) + generated for row, generated in zip(self.rows, self.logprobs)]
        if not self.options.top_logprobs:
            return tokens, logprobs
        return tokens, logprobs, self.top_logprobs

    # --- the engine's side ------------------------------------------------------------------------

    def record(self, row: Row, token: int, logprob: Optional[float], alternatives: Optional[list]) -> None:
        """Learn the token the row just sampled, at ``row.position + 1``; end the row if it must."""
        with self.lock:
            row.position += 1
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            if token in self.stop_tokens:
                row.finish_reason = "stop"
                return
            row.tokens.append(token)
            if logprob is not None:
                row.logprobs.append(logprob)
            if alternatives is not None:
                row.top_logprobs.append(alternatives)
            if row.stream is not None:
                row.stream.push(token)
                if row.stream.stopped:
                    row.kept, row.finish_reason = row.stream.covering_tokens(), "stop"
                    return
            if row.position + 1 >= row.limit:
                row.finish_reason = "length"

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
                text = "" if row.stream is None or not self.stream_text else (row.stream.close() if ended else row.stream.read())
                end = row.returned
                if text or end > row.sent or ended:
                    deltas.append(RowDelta(
                        row.index, text, row.tokens[row.sent : end], row.logprobs[row.sent : end],
                        row.top_logprobs[row.sent : end], row.finish_reason,
                    ))
                row.sent, row.closed = max(row.sent, end), ended
            ended = all(row.closed for row in self.rows)
        if deltas:
            self.deltas.put(deltas)
        if ended:
            self.deltas.put(None)


@dataclass
class StepPlan:
    """What rank 0 decided for one step, broadcast to every rank before it. ``kind``: "step",
    "heartbeat" (an idle rank 0 is alive) or "shutdown" (followers return). ``admissions``: per
    request admitted, (id, rows' prompts, options, stream_text, the slot of each row);
    ``cancellations``: slots whose rows end; ``withdrawn``: ids of waiting requests cancelled."""

    kind: str
    admissions: List[Tuple[int, List[List[int]], GenerationOptions, bool, List[int]]] = field(default_factory=list)
    cancellations: List[int] = field(default_factory=list)
    withdrawn: List[int] = field(default_factory=list)


@dataclass(frozen=True)
class Features:
    """What the running rows need of a step; an eager step skips what they do not need, the
    compiled one runs all of it (``Engine.compiled_features``)."""

    sampling: bool  # some row samples (else every row takes the argmax)
    penalties: bool  # some row has a penalty or a logit bias
    logprobs: bool  # some row wants logprobs (always, compiled: nearly free there, and one graph fewer)
    alternatives: int  # how many top logprobs to compute (a power of two, 0: none)
    constrained: bool = False  # some row follows a grammar: the step takes a mask of allowed tokens


class Engine:
    """The slots of one model and the loop that fills and decodes them. See the module docstring.

    Args:
        model: the model; its cache has ``params.max_batch_size`` rows (the slots) of
            ``params.max_seq_len`` positions.
        tokenizer: for EOS, stop strings and the text of each row; None for an engine whose requests
            all give ``stop_tokens`` and ask for no text (benchmarks).
        compile: run the decode step (model, sampler and writes) as one ``torch.compile`` graph (on
            CUDA, replayed as CUDA graphs).
        admission: "continuous" (admit into free slots between steps) or "static" (admit only into
            an empty batch).
        prefill_chunk: most prompt tokens prefilled per step while rows decode.
        heartbeat_seconds: under torchrun, how often an idle rank 0 tells the others it is alive.
        draft: a smaller model with the same vocabulary and cache sizes, for requests with
            ``speculate="draft"``; its cache rows are the same slots.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Optional[Tokenizer],
        compile: bool = False,
        admission: str = "continuous",
        prefill_chunk: int = 256,
        heartbeat_seconds: float = 10.0,
        draft: Optional[Transformer] = None,
    ):
        if admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {admission!r}")
        if not isinstance(prefill_chunk, int) or isinstance(prefill_chunk, bool) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        self.model, self.tokenizer = model, tokenizer
        self.admission, self.prefill_chunk, self.heartbeat_seconds = admission, prefill_chunk, heartbeat_seconds
        params = model.params
        self.device = device = model.output.weight.device
        slots, vocab = params.max_batch_size, params.vocab_size
        # the slots' state on the device: each row's last token and its position (the next decode
        # step's input), what it has seen (prompt and output) and how often it generated each token
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.seen = torch.zeros(slots, vocab, dtype=torch.bool, device=device)
        self.counts = torch.zeros(slots, vocab, dtype=torch.int32, device=device)
        self.settings = RowSettings.empty(slots, vocab, device)
        self.constraints = Constraints(tokenizer, vocab)  # the grammars of rows with json_schema / json_object
        self.allowed = torch.ones(slots, vocab, dtype=torch.bool, device=device)  # the tokens each row's grammar allows next
        # on the host
        self.slots: List[Optional[Row]] = [None] * slots
        self.owners: Dict[int, Request] = {}  # slot -> its row's request
        self.prefilling: List[Row] = []  # admitted rows whose prompt is not all in the cache, oldest first
        self.waiting: Deque[Request] = deque()
        self.in_step: Set[Request] = set()  # the requests a step took from the queue, while it runs
        self.arrived = threading.Condition()
        self.ids = itertools.count()
        self.stopping = threading.Event()
        self.distributed = model_parallel_world_size() > 1
        self.compiled = None
        self.compile_seconds: Optional[float] = None  # the first compiled step, compilation included
        self.warmed_alternatives = 0  # top logprobs every compiled step computes (``warm_up``)
        self.draft = draft
        self.verify_forward = ChunkForward(model, compile)  # speculative steps: k+1 tokens per row
        self.draft_forward = ChunkForward(draft, compile, "draft's step") if draft is not None else None
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else None
            # under torchrun the tokens are broadcast between choosing and writing them
            self.compiled = torch.compile(self.forward_and_choose if self.distributed else self.decode_step, mode=mode, dynamic=False)

    # --- any thread -------------------------------------------------------------------------------

    def submit(self, prompt_tokens: List[List[int]], options: GenerationOptions, what: str = "prompt_tokens", stream_text: bool = True) -> Request:
        """Queue a request: each prompt ``options.num_return_sequences`` times, one row each, in
        prompt order. Checked here (prompts fit the context and the vocabulary, rows fit
        ``max_batch_size``, options fit the vocabulary); ``what`` names the prompts in errors
        ("prompt_tokens", "prompt", "dialog"). ``stream_text``: assemble each row's text as it comes
        (``RowDelta.text``); without it only stop strings need it. Thread-safe; wakes ``run``.

        Returns:
            The ``Request``, waiting for slots.

        Raises:
            ValueError, TypeError: a prompt or an option the model cannot take, or the engine is
                shutting down.
        """
        params = self.model.params
        if not isinstance(options, GenerationOptions):
            raise TypeError(f"options must be a GenerationOptions, got {type(options).__name__}")
        options.check_vocabulary(params.vocab_size)
        options.check_draft(self.draft is not None)
        self.constraints.check(options.json_schema, options.json_object)
        check_prompts(prompt_tokens, params.max_seq_len, params.vocab_size, what)
        check_batch_size(len(prompt_tokens), options.num_return_sequences, params.max_batch_size, what)
        if self.stopping.is_set():
            raise ValueError("the engine is shutting down: it takes no new requests")
        rows = [list(tokens) for tokens in prompt_tokens for _ in range(options.num_return_sequences)]
        with self.arrived:
            request = Request(next(self.ids), rows, options, self.tokenizer, params.max_seq_len, stream_text)
            self.waiting.append(request)
            self.arrived.notify()
        return request

    @property
    def max_slots(self) -> int:
        """The number of slots: the cache's ``max_batch_size``."""
        return len(self.slots)

    @property
    def queue_length(self) -> int:
        """Requests waiting for slots."""
        return len(self.waiting)

    @property
    def running_slots(self) -> int:
        """Slots holding a row (prefilling or decoding)."""
        return sum(row is not None for row in self.slots)

    def stop(self) -> None:
        """Ask ``run`` to return after the current step: every request, running or waiting, is
        cancelled (finish reason "cancelled"), and followers are told to shut down. Safe in a signal
        handler."""
        self.stopping.set()

    # --- the thread that owns the model -----------------------------------------------------------

    def step(self) -> bool:
        """One step: admit, prefill one chunk, decode one token per running row, publish each
        request's deltas. Under torchrun rank 0 broadcasts the step's plan first and the other ranks
        run it. Returns whether there was anything to do."""
        plan = self.plan() if not self.distributed or dist.get_rank() == 0 else receive_plan()
        return self.execute(plan)

    def run_until_done(self, request: Request) -> Iterator[List[RowDelta]]:
        """Run steps until ``request`` is done, yielding its deltas after each step that changed it
        (the streams' and ``generate``'s loop, on the caller's thread)."""
        while True:
            self.step()
            while True:
                try:
                    deltas = request.deltas.get_nowait()
                except queue.Empty:
                    break
                if deltas is None:
                    return
                yield deltas

    def run(self) -> None:
        """Rank 0's serving loop: steps while there is work; idle, waits for ``submit`` (no
        spinning) and under torchrun broadcasts a heartbeat every ``heartbeat_seconds``; returns
        after ``stop``, having cancelled every request and told the followers."""
        last_broadcast = time.monotonic()
        while not self.stopping.is_set():
            if self.waiting or self.running_slots:
                try:
                    self.step()
                except Exception:
                    if self.distributed:  # the other ranks' state is unknown: stop them all
                        raise
                    logger.exception("a step failed: its requests end with finish reason 'error', serving goes on")
                    self.fail_step()
                last_broadcast = time.monotonic()
                continue
            with self.arrived:
                self.arrived.wait_for(lambda: self.waiting, timeout=min(0.5, self.heartbeat_seconds))
            if self.distributed and time.monotonic() - last_broadcast >= self.heartbeat_seconds:
                broadcast_plan(StepPlan("heartbeat"))
                last_broadcast = time.monotonic()
        with self.arrived:
            for request in list(self.waiting) + list(self.owners.values()):
                request.cancel()
        self.step()  # cancels what runs, withdraws what waits
        if self.distributed:
            broadcast_plan(StepPlan("shutdown"))

    def fail_step(self) -> None:
        """After a step raised: every request it held (running, or taken from the queue) ends with
        finish reason "error" and frees its slots; the requests still waiting are untouched."""
        for request in set(self.owners.values()) | self.in_step:
            for row in request.rows:
                if row.slot is not None:
                    self.end(request, row, "error")
                elif row.finish_reason is None:
                    request.finish(row, "error")
            request.publish()
        self.in_step = set()

    def follow(self) -> None:
        """A rank > 0's serving loop: runs each step rank 0 plans, until rank 0 shuts down. It waits
        in the broadcast, which rank 0's heartbeats keep from timing out."""
        while True:
            plan = receive_plan()
            if plan.kind == "shutdown":
                logger.info("rank %d: rank 0 shut down", dist.get_rank())
                return
            self.execute(plan)

    # --- a step -----------------------------------------------------------------------------------

    def plan(self) -> StepPlan:
        """Rank 0's decisions for this step (broadcast under torchrun): the rows cancelled, the
        waiting requests withdrawn, and the requests admitted, oldest first, while their rows fit
        the free slots (with "static" admission, only into an empty batch)."""
        plan = StepPlan("step")
        with self.arrived:
            for slot, row in enumerate(self.slots):
                if row is not None and row.index in self.owners[slot].cancelled:
                    plan.cancellations.append(slot)
            for request in self.waiting:
                if len(request.cancelled) == request.n_rows:
                    plan.withdrawn.append(request.id)
            free = [slot for slot, row in enumerate(self.slots) if row is None or slot in plan.cancellations]
            if self.admission == "continuous" or len(free) == self.max_slots:
                for request in self.waiting:
                    if request.id in plan.withdrawn:
                        continue
                    if request.n_rows > len(free):
                        break  # first come, first served: nothing overtakes the oldest request
                    slots, free = free[: request.n_rows], free[request.n_rows :]
                    plan.admissions.append((request.id, request.prompt_tokens, request.options, request.stream_text, slots))
        if self.distributed:
            broadcast_plan(plan)
        return plan

    def execute(self, plan: StepPlan) -> bool:
        """Run one step as ``plan`` says; publish what changed. Returns whether anything ran."""
        if plan.kind != "step":
            return False
        touched: Set[Request] = set()
        with self.arrived:
            waiting = {request.id: request for request in self.waiting}
            taken = set(plan.withdrawn) | {admission[0] for admission in plan.admissions}
            self.waiting = deque(request for request in self.waiting if request.id not in taken)
            self.in_step = {waiting[request_id] for request_id in taken if request_id in waiting}
        for request_id in plan.withdrawn:
            if request_id in waiting:
                for row in waiting[request_id].rows:
                    waiting[request_id].finish(row, "cancelled")
                touched.add(waiting[request_id])
        for slot in plan.cancellations:
            request = self.owners[slot]
            self.end(request, self.slots[slot], "cancelled")
            touched.add(request)
        for request_id, prompts, options, stream_text, slots in plan.admissions:
            request = waiting.get(request_id) or Request(request_id, prompts, options, self.tokenizer, self.model.params.max_seq_len, stream_text)
            self.admit(request, slots)
            touched.add(request)
        decoding = [row for row in self.slots if row is not None and row.decoding]
        with torch.no_grad():  # not inference_mode: torch.compile cannot take inference tensors as inputs
            self.prefill(touched)
            if decoding:
                self.decode(decoding, touched)
        for request in touched:
            request.publish()
        self.in_step = set()
        return bool(touched)

    def admit(self, request: Request, slots: List[int]) -> None:
        """Give each row of ``request`` its slot and the slot its settings; a row with no room to
        generate ends at once (unless its prompt is to be scored)."""
        request.admitted_at = time.monotonic()
        options = request.options
        scored = options.echo and options.logprobs
        index = torch.tensor(slots, device=self.device)
        n = options.num_return_sequences
        values = dict(
            temperature=options.temperature, top_p=options.top_p, top_k=options.top_k, min_p=options.min_p,
            repetition_penalty=options.repetition_penalty, presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty, seeded=options.seed is not None,
        )
        for name, value in values.items():
            getattr(self.settings, name)[index] = value
        if options.seed is not None:  # row i*n + j draws from seed + j
            keys = [seed_key(options.seed + row.index % n) for row in request.rows]
            self.settings.seed_key[index] = torch.tensor(keys, device=self.device)
        self.settings.logit_bias[index] = 0.0
        if options.logit_bias:
            ids = torch.tensor(list(options.logit_bias), device=self.device)
            self.settings.logit_bias[index[:, None], ids] = torch.tensor(list(options.logit_bias.values()), device=self.device)
        self.seen[index] = False
        self.counts[index] = 0
        self.positions[index] = 0
        for row, slot in zip(request.rows, slots):
            self.seen[slot, torch.tensor(row.prompt, device=self.device)] = True
            if len(row.prompt) >= row.limit and not scored:
                request.finish(row, "length")
                continue
            row.slot = slot
            self.slots[slot], self.owners[slot] = row, request
            self.constraints.start(slot, options.json_schema, options.json_object)
            self.prefilling.append(row)

    def end(self, request: Request, row: Row, reason: Optional[str] = None) -> None:
        """Free the row's slot; ``reason``: why it ends, if the row does not know yet."""
        if reason is not None:
            request.finish(row, reason)
        if row in self.prefilling:
            self.prefilling.remove(row)
        if self.constraints.end(row.slot):
            self.allowed[row.slot] = True
        self.slots[row.slot] = None
        del self.owners[row.slot]
        row.slot, row.decoding = None, False

    def prefill(self, touched: Set[Request]) -> None:
        """Put the next chunk of the oldest admitted prompts into their slots, in one forward pass
        (right-padded: a padding entry lands at a position the row overwrites before reading it);
        the rows whose prompt is complete sample their first token."""
        busy = any(row is not None and row.decoding for row in self.slots)  # else no one waits: one pass
        batch: List[Tuple[Row, int]] = []  # (row, its chunk's length)
        width = 0
        for row in self.prefilling:
            n = len(row.prompt) - row.prefilled
            if busy:
                n = min(n, self.prefill_chunk)
                if batch and (len(batch) + 1) * max(width, n) > self.prefill_chunk:
                    break
            batch.append((row, n))
            width = max(width, n)
        if not batch:
            return
        max_seq_len = self.model.params.max_seq_len
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for i, (row, n) in enumerate(batch):
            tokens[i, :n] = torch.tensor(row.prompt[row.prefilled : row.prefilled + n])
        starts = torch.tensor([row.prefilled for row, _ in batch])
        positions = (starts[:, None] + torch.arange(width)).clamp(max=max_seq_len - 1).to(self.device)
        slots = torch.tensor([row.slot for row, _ in batch], device=self.device)
        ends = torch.tensor([n - 1 for _, n in batch], device=self.device)
        kv_len = max(row.prefilled + n for row, n in batch)
        scored = [i for i, (row, _) in enumerate(batch) if self.owners[row.slot].options.echo and self.owners[row.slot].options.logprobs]
        tokens = tokens.to(self.device)
        if scored:  # every position's logits: position j predicts the prompt's token j + 1
            logits = self.model.forward_at(tokens, positions, kv_len=kv_len, slots=slots)
            self.score_prompts(batch, scored, logits)
            last = logits[torch.arange(len(batch), device=self.device), ends]
        else:
            last = self.model.forward_at(tokens, positions, logits_at=ends, kv_len=kv_len, slots=slots)[:, 0]
        if self.draft is not None:  # the draft's cache holds the prompts too
            self.draft.forward_at(tokens, positions, logits_at=ends, kv_len=kv_len, slots=slots)
        for row, n in batch:
            row.prefilled += n
        self.positions[slots] = (starts + ends.cpu() + 1).clamp(max=max_seq_len - 1).to(self.device)  # where an idle decode may write
        complete = [i for i, (row, _) in enumerate(batch) if row.prefilled == len(row.prompt)]
        for i in complete:
            row = batch[i][0]
            self.prefilling.remove(row)
            if len(row.prompt) >= row.limit:  # scored only: nothing to generate
                request = self.owners[row.slot]
                self.end(request, row, "length")
                touched.add(request)
        complete = [i for i in complete if batch[i][0].slot is not None]
        if complete:
            self.first_tokens([batch[i][0] for i in complete], last[complete], touched)

    def score_prompts(self, batch: List[Tuple[Row, int]], scored: List[int], logits: torch.Tensor) -> None:
        """Each scored row's prompt logprobs of the chunk: logits (rows, chunk, vocab)."""
        for i in scored:
            row, n = batch[i]
            targets = row.prompt[row.prefilled + 1 : row.prefilled + n + 1]  # the last chunk predicts one fewer
            logprobs = torch.log_softmax(logits[i, : len(targets)], dim=-1)
            row.prompt_logprobs += logprobs.gather(1, torch.tensor(targets, device=self.device)[:, None])[:, 0].tolist()

    def first_tokens(self, rows: List[Row], logits: torch.Tensor, touched: Set[Request]) -> None:
        """Sample each row's first token from its prompt's last logits (rows, vocab), eagerly; write
        it as the slot's next input; the rows decode from the next step on."""
        slots = torch.tensor([row.slot for row in rows], device=self.device)
        features = self.features(rows)
        settings = self.settings.rows(slots)
        positions = torch.tensor([len(row.prompt) for row in rows], device=self.device)
        noise = self.noise(rows, features)
        self.fill_allowed(rows)
        allowed = self.allowed[slots] if features.constrained else None
        chosen = broadcast_from_rank0(choose(logits, settings, self.seen[slots], self.counts[slots], positions, noise, features, allowed))
        self.write(slots, chosen, torch.ones_like(chosen, dtype=torch.bool))
        self.positions[slots] = positions
        self.record(rows, pack(logits, chosen, features).tolist(), features, touched)
        for row in rows:
            row.decoding = row.slot is not None

    def decode(self, rows: List[Row], touched: Set[Request]) -> None:
        """One token for each decoding row: the decode step over the first ``width`` slots, which
        cover them (compiled: a power of two of them, and a power-of-two bucket of the cache). When
        a row speculates, a speculative step instead (``speculate``)."""
        options = [self.owners[row.slot].options for row in rows]
        if any(o.speculate for o in options) and not any(o.constrained for o in options):  # a grammar's row takes one token a step
            return self.speculate(rows, touched)
        params = self.model.params
        width = max(row.slot for row in rows) + 1
        if self.compiled is not None:
            width = min(power_of_two_at_least(width), self.max_slots)
        live = torch.zeros(width, dtype=torch.bool)
        live[[row.slot for row in rows]] = True
        kv_len = max(row.position for row in rows) + 1  # no position reaches it
        # compiled: a power-of-two bucket of the cache, one graph for many lengths
        kv_slots = torch.empty(kv_len, 0) if self.compiled is None else attended_slots(kv_len, params.max_seq_len)
        features = self.features(rows) if self.compiled is None else self.compiled_features(rows)
        noise = self.noise([self.slots[slot] if live[slot] else None for slot in range(width)], features)
        self.fill_allowed(rows)
        live = live.to(self.device)
        if self.compiled is None:
            message = self.decode_step(width, kv_slots, live, noise, features)
        else:
            start = time.perf_counter()
            message = self.compiled_step(width, kv_slots, live, noise, features)
            if self.compile_seconds is None:
                self.compile_seconds = time.perf_counter() - start
                logger.info("compiled the decode step in %.1f s", self.compile_seconds)
        values = message.tolist()  # the step's one wait on the device
        self.record(rows, [values[row.slot] for row in rows], features, touched)

    def compiled_step(self, width: int, kv_slots: torch.Tensor, live: torch.Tensor, noise: torch.Tensor, features: Features) -> torch.Tensor:
        """``decode_step`` compiled; under torchrun the tokens are broadcast between the compiled
        choice and the writes."""
        if not self.distributed:
            return self.compiled(width, kv_slots, live, noise, features)
        logits, chosen = self.compiled(width, kv_slots, noise, features)
        return self.commit(width, logits, chosen, live, features)

    def compiled_features(self, rows: List[Row]) -> Features:
        """The compiled step's features: all of them, the rows' settings choosing in the graph (``choose``),
        so one graph serves every mix of options; more top logprobs than warmed compile a graph of their own."""
        alternatives = max(self.features(rows).alternatives, self.warmed_alternatives)
        return Features(sampling=True, penalties=True, logprobs=True, alternatives=alternatives, constrained=True)

    def compiled_widths(self) -> List[int]:
        """The widths a compiled step runs on: the powers of two below the slots, and all the slots."""
        return sorted({min(1 << i, self.max_slots) for i in range(self.max_slots.bit_length() + 1)})

    def warm_up(self, max_top_logprobs: int = 0, speculate_k: Optional[int] = None) -> float:
        """Compile every graph the compiled steps can need, so that no request waits for a compile:
        each width (``compiled_widths``) on a bucket of the cache and on the whole cache, the decode
        step with up to ``max_top_logprobs`` alternatives and, with ``speculate_k``, the passes of
        speculative decoding with that many proposals (the model's over k + 1 tokens, the draft's over
        2 and 1). Run on idle slots (the cache positions they write are overwritten before they are
        read); draws nothing from the global RNG. Under torchrun every rank calls it, at the same
        point. Returns the seconds it took (0 when not compiled)."""
        if self.compiled is None:
            return 0.0
        params, widths, start = self.model.params, self.compiled_widths(), time.perf_counter()
        k = min(power_of_two_at_least(max_top_logprobs), params.vocab_size) if max_top_logprobs else 0
        self.warmed_alternatives = max(self.warmed_alternatives, k)
        features = Features(sampling=True, penalties=True, logprobs=True, alternatives=self.warmed_alternatives, constrained=True)
        lengths = sorted({attended_slots(1, params.max_seq_len).shape[0], params.max_seq_len})
        chunks = [] if speculate_k is None else [(self.verify_forward, speculate_k + 1)]
        if speculate_k is not None and self.draft_forward is not None:
            chunks += [(self.draft_forward, 2), (self.draft_forward, 1)]
        graphs = len(widths) * len(lengths) * max(1, len(chunks))  # the most of one function's graphs
        if torch._dynamo.config.recompile_limit < graphs:  # past the limit torch would run it eagerly
            torch._dynamo.config.recompile_limit = graphs
        calls = 3 if self.device.type == "cuda" else 1  # CUDA graphs are recorded on a later call than the compile
        with torch.no_grad():
            for width, kv_len, _ in itertools.product(widths, lengths, range(calls)):
                live = torch.zeros(width, dtype=torch.bool, device=self.device)
                noise = torch.ones(width, params.vocab_size, device=self.device)
                self.compiled_step(width, attended_slots(kv_len, params.max_seq_len), live, noise, features).tolist()
                for forward, n in chunks:  # tokens 0 at position 0
                    tokens, positions = (torch.zeros(width, n, dtype=torch.long, device=self.device) for _ in range(2))
                    forward(tokens, positions, kv_len).sum().item()
        seconds = time.perf_counter() - start
        self.compile_seconds = seconds if self.compile_seconds is None else self.compile_seconds
        passes = "the decode step" + (f" and speculative decoding's passes (k={speculate_k})" if chunks else "")
        logger.info("compiled %s for widths %s x cache lengths %s in %.1f s", passes, widths, lengths, seconds)
        return seconds

    def fill_allowed(self, rows: List[Row]) -> None:
        """Each constrained row's next allowed tokens into ``allowed`` (the other rows': all)."""
        masks = self.constraints.allowed([row.slot for row in rows], self.device)
        if masks is not None:
            slots, allowed = masks
            self.allowed[slots] = allowed

    def decode_step(self, width: int, kv_slots: torch.Tensor, live: torch.Tensor, noise: torch.Tensor, features: Features) -> torch.Tensor:
        """The whole decode step, compiled as one graph with ``compile``: the model on every slot's
        last token, each row's choice, the writes. ``kv_slots``: an empty (kv_len, 0) tensor, whose
        length the compiler may treat as dynamic (an int argument it would specialise on)."""
        logits, chosen = self.forward_and_choose(width, kv_slots, noise, features)
        return self.commit(width, logits, chosen, live, features)

    def forward_and_choose(self, width: int, kv_slots: torch.Tensor, noise: torch.Tensor, features: Features):
        """(logits (width, vocab), chosen tokens (width,)) of the first ``width`` slots, among the
        tokens their grammars allow (``allowed``) when a row has one."""
        tokens, positions = self.tokens[:width], self.positions[:width]
        logits = self.model.forward_at(tokens[:, None], positions[:, None], kv_len=kv_slots.shape[0])[:, 0]
        rows = slice(0, width)
        allowed = self.allowed[rows] if features.constrained else None
        chosen = choose(logits, self.settings.rows(rows), self.seen[rows], self.counts[rows], positions + 1, noise, features, allowed)
        return logits, chosen

    def commit(self, width: int, logits: torch.Tensor, chosen: torch.Tensor, live: torch.Tensor, features: Features) -> torch.Tensor:
        """Rank 0's tokens (broadcast under torchrun) become the live rows' next inputs, one position
        further; the rest keep theirs. Returns the step's message (``pack``)."""
        chosen = broadcast_from_rank0(chosen)
        tokens = torch.where(live, chosen, self.tokens[:width])
        self.write(torch.arange(width, device=chosen.device), tokens, live)
        self.positions[:width] += live
        return pack(logits, tokens, features)

    def write(self, slots: torch.Tensor, tokens: torch.Tensor, live: torch.Tensor) -> None:
        """The slots' new tokens: their next input, seen, counted (only where ``live``)."""
        self.tokens[slots] = tokens
        self.seen[slots, tokens] = self.seen[slots, tokens] | live
        self.counts[slots, tokens] = self.counts[slots, tokens] + live.int()

    def features(self, rows: List[Row]) -> Features:
        options = [self.owners[row.slot].options for row in rows]
        k = max((o.top_logprobs for o in options), default=0)
        return Features(
            sampling=any(o.temperature > 0 for o in options),
            penalties=any(o.repetition_penalty != 1 or o.presence_penalty or o.frequency_penalty or o.logit_bias for o in options),
            logprobs=self.compiled is not None or any(o.logprobs or o.top_logprobs for o in options),
            alternatives=min(power_of_two_at_least(k), self.model.params.vocab_size) if k else 0,
            constrained=any(o.constrained for o in options),
        )

    def noise(self, rows: List[Optional[Row]], features: Features) -> torch.Tensor:
        """(len(rows), vocab) Exp(1) draws of torch's global RNG for the sampling rows without a seed
        (None: a slot that does not decode), as ``torch.multinomial`` would draw them."""
        vocab = self.model.params.vocab_size
        if not features.sampling:
            return torch.ones(len(rows), 1, device=self.device)
        needs = []
        for row in rows:
            options = None if row is None else self.owners[row.slot].options
            needs.append(options is not None and options.temperature > 0 and options.seed is None)
        if not any(needs):  # nothing to copy from the host
            return torch.ones(len(rows), vocab, device=self.device)
        return global_exponentials(needs, vocab).to(self.device)

    def record(self, rows: List[Row], values: List[List[float]], features: Features, touched: Set[Request]) -> None:
        """Each row learns its token (``pack``'s columns), and ends if it must."""
        for row, value in zip(rows, values):
            self.record_token(row, value, features, touched)

    def record_token(self, row: Row, value: List[float], features: Features, touched: Set[Request]) -> bool:
        """The row learns one token (``pack``'s columns), and ends if it must; True if it ended."""
        k = features.alternatives
        token, *rest = value
        request = self.owners[row.slot]
        options = request.options
        logprob = rest[0] if options.logprobs else None
        alternatives = None
        if options.top_logprobs:
            ids, logprobs = rest[1 : 1 + k], rest[1 + k :]
            alternatives = [(int(i), lp) for i, lp in zip(ids[: options.top_logprobs], logprobs[: options.top_logprobs])]
        self.constraints.advance(row.slot, int(token))
        request.record(row, int(token), logprob, alternatives)
        touched.add(request)
        if row.finish_reason is None:
            return False
        self.end(request, row)
        return True

    # --- speculative decoding (``llama.speculative``) ----------------------------------------------

    def speculate(self, rows: List[Row], touched: Set[Request]) -> None:
        """One speculative step for the decoding rows: each speculating row's k proposals (prompt
        lookup or the draft) are verified with its last token in one pass over the first ``width``
        slots at their own positions, and each row emits its accepted proposals and one token of
        the model's, stopping exactly where decoding one token per step would. A row that does not
        speculate accepts nothing and takes the token ``sample`` chooses, as in a plain step."""
        params = self.model.params
        width = max(row.slot for row in rows) + 1
        if self.compiled is not None:  # as the decode step: a power of two of slots
            width = min(power_of_two_at_least(width), self.max_slots)
        options = {row.slot: self.owners[row.slot].options for row in rows}
        k = max(o.speculate_k for o in options.values() if o.speculate)
        limits, steps = torch.zeros(width, dtype=torch.long), torch.zeros(width, dtype=torch.long)
        needs = [False] * width  # the rows that draw from the global RNG
        for row in rows:
            o = options[row.slot]
            limits[row.slot] = o.speculate_k if o.speculate else 0
            steps[row.slot], row.speculative_steps = row.speculative_steps, row.speculative_steps + 1
            needs[row.slot] = o.temperature > 0 and o.seed is None
        limits, steps = limits.to(self.device), steps.to(self.device)
        features, settings, last = self.features(rows), self.settings.rows(slice(0, width)), self.positions[:width]
        proposals, draft_probs = self.propose(rows, width, k, settings, steps, needs, features)  # (width, k)
        positions = (last[:, None] + torch.arange(k + 1, device=self.device)).clamp(max=params.max_seq_len - 1)  # (width, k+1)
        chunk = torch.cat([self.tokens[:width, None], proposals], dim=1)
        logits = self.verify_forward(chunk, positions, kv_len=max(row.position for row in rows) + k + 1)  # (width, k+1, vocab)
        penalised = penalised_per_position(logits, settings, self.seen[:width], self.counts[:width], proposals) if features.penalties else logits
        uniforms = noise = None
        if features.sampling:
            uniforms = torch.exp(-exponentials(settings, step_keys(settings, steps, 0), last, needs, k))
            noise = exponentials(settings, step_keys(settings, steps, 1), last, needs, params.vocab_size)
        accepted, chosen = verify(penalised, proposals, draft_probs, limits, settings, uniforms, noise, features.sampling)
        if features.sampling:  # a row that does not speculate draws as in a plain step
            plain = sample(penalised[:, 0], settings, last + 1, global_exponentials(needs, params.vocab_size).to(self.device))
            chosen[:, 0] = torch.where(limits > 0, chosen[:, 0], plain)
        chosen = broadcast_from_rank0(torch.cat([chosen, accepted[:, None]], dim=1))
        accepted, chosen = chosen[:, -1], chosen[:, :-1]
        packed = torch.stack([pack(logits[:, i], chosen[:, i], features) for i in range(k + 1)], dim=1)  # (width, k+1, columns)
        values = torch.cat([accepted.double()[:, None], packed.flatten(1)], dim=1).tolist()  # the step's one wait
        self.record_speculation(rows, values, k + 1, features, touched)

    def record_speculation(self, rows: List[Row], values: List[List[float]], n: int, features: Features, touched: Set[Request]) -> None:
        """Each row learns its accepted proposals and the token after them, one by one, until it ends;
        the slots' last tokens, positions, seen tokens and counts follow. values: per slot, the
        accepted count, then ``pack``'s columns for each of the n verified positions."""
        slots, tokens, lasts = [], [], []
        for row in rows:
            slot, (accepted, *columns) = row.slot, values[row.slot]
            row.accepted += int(accepted)
            size = len(columns) // n
            for i in range(int(accepted) + 1):
                value = columns[i * size : (i + 1) * size]
                slots.append(slot)
                tokens.append(int(value[0]))
                if self.record_token(row, value, features, touched):
                    break
            lasts.append((slot, tokens[-1], row.position))
        slots, tokens = torch.tensor(slots, device=self.device), torch.tensor(tokens, device=self.device)
        self.seen[slots, tokens] = True
        self.counts.index_put_((slots, tokens), torch.ones_like(tokens, dtype=self.counts.dtype), accumulate=True)
        index, last_tokens, positions = (torch.tensor(column, device=self.device) for column in zip(*lasts))
        self.tokens[index], self.positions[index] = last_tokens, positions

    def propose(
        self, rows: List[Row], width: int, k: int, settings: RowSettings, steps: torch.Tensor, needs: List[bool], features: Features
    ):
        """(width, k) proposals for the first ``width`` slots (0 where none) and, when a draft row
        samples, the distributions q they were drawn from (width, k, vocab): a point mass for the
        prompt lookup rows."""
        proposals = torch.zeros(width, k, dtype=torch.long)
        drafting = torch.zeros(width, dtype=torch.bool)
        for row in rows:
            speculate = self.owners[row.slot].options.speculate
            drafting[row.slot] = speculate == "draft"
            if speculate == "lookup":
                sequence = row.sequence
                if row.lookup is None:
                    row.lookup = NgramIndex(sequence)
                row.lookup.extend(sequence[len(row.lookup.tokens) :])
                proposals[row.slot] = torch.tensor(row.lookup.propose(k) or sequence[-1:] * k)
        proposals = proposals.to(self.device)
        if not drafting.any():
            return proposals, None
        drafted, draft_probs = self.draft_proposals(rows, width, k, settings, steps, needs, features)
        drafting = drafting.to(self.device)
        proposals = torch.where(drafting[:, None], drafted, proposals)
        if draft_probs is not None:
            point_masses = F.one_hot(proposals, self.model.params.vocab_size).to(draft_probs.dtype)
            draft_probs = torch.where(drafting[:, None, None], draft_probs, point_masses)
        return proposals, draft_probs

    def draft_proposals(
        self, rows: List[Row], width: int, k: int, settings: RowSettings, steps: torch.Tensor, needs: List[bool], features: Features
    ):
        """k steps of the draft over the first ``width`` slots: argmax for greedy rows, else a draw
        from the draft's distribution under the row's settings. The draft's cache holds a row's
        tokens up to the one before its last: the first step feeds the last two (the previous
        step's last proposal may have been accepted without being fed), then one proposal a step.
        Under torchrun every rank continues with rank 0's draws."""
        max_seq_len, vocab = self.model.params.max_seq_len, self.model.params.vocab_size
        last = self.positions[:width]
        previous = torch.zeros(width, dtype=torch.long)
        decoding = torch.zeros(width, dtype=torch.long)  # idle slots write twice where an idle step may write
        for row in rows:
            previous[row.slot], decoding[row.slot] = row.sequence[-2], 1
        tokens = torch.stack([previous.to(self.device), self.tokens[:width]], dim=1)  # (width, 2)
        positions = torch.stack([last - decoding.to(self.device), last], dim=1)
        max_position = max(row.position for row in rows)
        logits = self.draft_forward(tokens, positions, kv_len=max_position + 1)[:, -1]
        proposals, draft_probs = [], []
        for i in range(k):
            if i > 0:
                position = (last + i).clamp(max=max_seq_len - 1)
                logits = self.draft_forward(proposals[-1][:, None], position[:, None], kv_len=max_position + i + 1)[:, 0]
            if features.penalties:
                logits = apply_penalties(logits, settings, self.seen[:width], self.counts[:width])
            proposal = logits.argmax(dim=-1)
            if features.sampling:
                draft_probs.append(distribution(logits, settings))
                drawn = torch.argmax(draft_probs[-1] / exponentials(settings, step_keys(settings, steps, 2 + i), last, needs, vocab), dim=-1)
                proposal = torch.where(settings.temperature > 0, drawn, proposal)
            proposals.append(broadcast_from_rank0(proposal))
        return torch.stack(proposals, dim=1), torch.stack(draft_probs, dim=1) if draft_probs else None


def choose(
    logits: torch.Tensor, settings: RowSettings, seen: torch.Tensor, counts: torch.Tensor, positions: torch.Tensor,
    noise: torch.Tensor, features: Features, allowed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Each row's next token (rows,) from its logits (rows, vocab), with its own settings; only
    among the ``allowed`` tokens (rows, vocab) bool, if given (a grammar's mask)."""
    if allowed is not None:
        logits = torch.where(allowed, logits, float("-inf"))
    # Compiled, one graph serves every mix of rows (neutral penalties change nothing, a greedy row takes
    # its argmax); on a CPU torch.cond runs each part only when a row needs it (the sampler's sort costs
    # more than a small model's step there), while a CUDA graph, which cannot branch, runs both
    conditional = torch.compiler.is_compiling() and logits.device.type != "cuda"
    if features.penalties and conditional:
        penalised = (settings.repetition_penalty != 1) | (settings.presence_penalty != 0) | (settings.frequency_penalty != 0)
        penalised = penalised.any() | (settings.logit_bias != 0).any()
        logits = torch.cond(penalised, lambda: apply_penalties(logits, settings, seen, counts), lambda: logits.clone())
    elif features.penalties:
        logits = apply_penalties(logits, settings, seen, counts)
    if not features.sampling:
        return torch.argmax(logits, dim=-1)
    if conditional:
        return torch.cond((settings.temperature > 0).any(), lambda: sample(logits, settings, positions, noise), lambda: torch.argmax(logits, dim=-1))
    return sample(logits, settings, positions, noise)


def pack(logits: torch.Tensor, tokens: torch.Tensor, features: Features) -> torch.Tensor:
    """The step's message to the host, one float64 row per slot, read in one wait: the token, then
    with ``features.logprobs`` its logprob (of the model's own distribution, before any sampling
    option) and the ids and logprobs of the ``features.alternatives`` most likely tokens."""
    columns = [tokens.double()[:, None]]
    if features.logprobs:
        normaliser = torch.logsumexp(logits, dim=-1, keepdim=True)  # (rows, 1)
        columns.append((logits.gather(1, tokens[:, None]) - normaliser).double())
        if features.alternatives:
            top = logits.topk(features.alternatives, dim=-1)
            columns += [top.indices.double(), (top.values - normaliser).double()]
    return torch.cat(columns, dim=1)


def broadcast_plan(plan: StepPlan) -> None:
    dist.broadcast_object_list([plan], src=0)


def receive_plan() -> StepPlan:
    box = [None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
