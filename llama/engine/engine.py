"""The decoding engine: slots (the most rows decoded at once) that requests come into and leave between
steps, over a KV cache pool of blocks the rows share. Every generation in this project runs here:
``Llama.generate``, the text and chat calls, the streams and the server; and every scoring of
continuations (``score``: lm-evaluation-harness's log-likelihoods). A step is three calls, as
nano-vllm's: the scheduler plans and moves the rows, the runner runs the model, and the rows record
what they sampled. Its rooms:

- ``llama.engine.requests``: a request is one or more rows (a prompt repeated
  ``num_return_sequences`` times), each with the request's ``GenerationOptions``; row j of a prompt
  with a seed draws from seed + j.
- ``llama.engine.scheduler``: ``submit`` queues a request; at the start of a step rank 0 plans, in
  phases: the rows that end (cancelled), the blocks each decoding row writes into (preempting the
  newest rows when the pool is full), and the admissions, while rows fit the free slots and the pool
  (a request's rows together; a request of more rows than slots, as slots free) ("continuous"), or only
  when every slot is free ("static": one batch at a time, the policy of a
  server without continuous batching, kept so the gain can be measured). The scheduler alone moves
  rows between the queues and the slots and records their tokens; the device's slots and the
  grammars follow what it moved (``sync``).
- ``llama.engine.block_manager``: the pool's blocks, and the prefix cache: a new row takes the blocks
  of the longest prefix of its prompt an earlier row computed.
- ``llama.engine.runner``: a step prefills the admitted rows (while other rows decode, in chunks of at
  most ``prefill_chunk`` tokens in all, so a long prompt delays the running rows by at most one
  chunk per step; into an idle engine, every prompt in one pass: ``generate``'s batch). A row whose
  prompt is complete samples its first token, and decodes from the next step on. Then every running
  row decodes one token (or speculates: ``llama.engine.speculative``). Every sampled token reaches the
  host one way (``record``); a row leaves the moment it ends (stop token, stop string, its
  ``max_gen_len``, the end of the context, or cancelled), freeing its slot and blocks.
- A request may name a LoRA adapter the engine serves (``llama.engine.adapters``): its rows compute with it
  beside rows of other adapters and of none, in the same steps; the plan loads an adapter onto the device
  when a row needs it, and the device follows (``sync``).
- A row with ``json_schema`` / ``json_object`` follows a grammar (``llama.engine.structured``): it gets a
  matcher when admitted (kept while it waits preempted), its allowed next tokens go to the runner
  before each step, and each token it takes advances its matcher.
- Each row's position lives on the device (``Runner.positions``) and on the host (``Row.position``),
  so a step could advance a row by any number of tokens.
- Under torchrun every rank runs an engine. Rank 0 plans each step and broadcasts the plan
  (``StepPlan``: the ends, preemptions, admissions and every changed block table) before the step;
  every rank applies it; the sampled tokens are broadcast from rank 0 inside the step, so every rank
  writes the same tokens into the same blocks (its heads of them). In-process callers (``generate``
  under torchrun) submit the same requests on every rank, in the same order; a server submits on
  rank 0 only and the other ranks ``follow``, making each new request from the plan.

Threads: ``submit``, ``Request.cancel``, ``Request.updates`` and the metrics properties may be
called from any thread; ``step``, ``run``, ``follow`` and ``run_until_done`` from the one thread
that owns the model.
"""

import itertools
import logging
import queue
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from llama.checkpoints.peft import Adapter
from llama.engine.adapters import Adapters, check_adapter, served_adapters
from llama.engine.block_manager import BlockManager
from llama.engine.requests import DeltaSink, Request, Row, RowDelta, Sampled, check_pairs  # noqa: F401 (public names)
from llama.engine.runner import Runner
from llama.engine.scheduler import Moves, Scheduler, StepPlan
from llama.engine.speculative import Speculator
from llama.engine.structured import Constraints
from llama.layers.kv_cache import cache_dtype, check_storage, pool_bytes
from llama.layers.parallel import group_rank, group_size
from llama.model import Transformer
from llama.options import EngineOptions, GenerationOptions, check_prompts
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def engine_options_for(model: Transformer, **options) -> EngineOptions:
    """``EngineOptions`` of ``model``'s own rows and context (``model.params``' ``max_batch_size`` and
    ``max_seq_len``), and ``options`` (the pool's size, compile, admission, ...)."""
    return EngineOptions(
        **{"max_batch_size": model.params.max_batch_size, "max_seq_len": model.params.max_seq_len, **options}
    )


def setup_pool(model: Transformer, options: EngineOptions) -> None:
    """Set up ``model``'s KV cache pool of ``options``' blocks (``cache_dtype``: float32 for a half-precision
    model on a CPU; ``kv_cache_dtype``: stored in 8 bits with their scales) and say what it takes: allocated and
    zeroed, so resident, beside the weights."""
    if options.max_seq_len > model.params.max_seq_len:
        raise ValueError(
            f"max_seq_len={options.max_seq_len} is longer than the model's rotary table "
            f"({model.params.max_seq_len} positions): load the model with this max_seq_len"
        )
    weight = model.tok_embeddings.weight
    dtype, storage = cache_dtype(weight.dtype, weight.device), options.kv_cache_storage
    if storage is not None:
        check_storage(storage, weight.device)
    model.setup_cache(options.kv_cache_blocks, options.block_size, dtype, storage)
    why = (
        f" (the model computes in {weight.dtype}: attention on a CPU is faster in float32)"
        if dtype != weight.dtype
        else ""
    )
    stored = f"{storage} with a scale per token and head in {dtype}" if storage is not None else f"{dtype}{why}"
    logger.info(
        "KV cache pool: %d tokens in blocks of %d, in %s, %.1f MiB",
        options.pool_tokens,
        options.block_size,
        stored,
        pool_bytes(model) / 2**20,
    )


class Engine:
    """The slots of one model and the loop that fills and decodes them. See the module docstring.

    Args:
        model: the model; the engine sets up its KV cache pool, of ``options``' blocks.
        tokenizer: for EOS, stop strings and the text of each row; None for an engine whose requests
            all give ``stop_tokens`` and ask for no text (benchmarks).
        options: the slots (``max_batch_size``) of at most ``max_seq_len`` positions each, the pool's
            blocks, and how a step runs (compile, compiled_attention, prefix_cache, admission,
            prefill_chunk, heartbeat_seconds): ``llama.options.EngineOptions``; None: the model's own rows
            and context (``engine_options_for``).
        draft: a smaller model with the same vocabulary and cache sizes, for requests with
            ``speculate="draft"``; its pool's blocks are the model's, in the same block tables.
        cache_salt: what names the weights (and an adapter merged into them) in the prefix cache's keys.
        adapters: LoRA adapters served per request, by name (``GenerationOptions.adapter``): the model's
            adaptable linears get layers that hold ``options.max_loras`` of them; None: no adapters.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Optional[Tokenizer],
        options: Optional[EngineOptions] = None,
        draft: Optional[Transformer] = None,
        cache_salt: str = "",
        adapters: Optional[Dict[str, Adapter]] = None,
    ):
        options = engine_options_for(model) if options is None else options
        if not isinstance(options, EngineOptions):
            raise TypeError(f"options must be an EngineOptions, got {type(options).__name__}")
        for pooled in [model] + ([draft] if draft is not None else []):  # the draft's pool: the same blocks
            setup_pool(pooled, options)
        self.adapters = Adapters(model, options, adapters) if adapters is not None else None
        blocks = BlockManager(options.kv_cache_blocks, options.block_size, cache_salt, options.prefix_cache)  # rank 0's
        self.scheduler = Scheduler(
            options.max_batch_size, options.max_seq_len, blocks, options.admission, self.adapters
        )
        self.runner = Runner(model, options, draft, self.adapters)
        self.speculator = Speculator(self.runner, options.compile)
        self.constraints = Constraints(tokenizer, model.params.vocab_size)  # grammars of json_schema/json_object rows
        self.model, self.draft, self.tokenizer, self.options = model, draft, tokenizer, options
        self.in_step: Set[Request] = set()  # the requests a step took from the queue, while it runs
        self.ids = itertools.count()
        self.stopping = threading.Event()
        self.distributed = group_size(model.group) > 1  # the ranks that split the model run every step together

    # --- any thread -------------------------------------------------------------------------------

    def submit(
        self,
        prompt_tokens: List[List[int]],
        options: GenerationOptions,
        what: str = "prompt_tokens",
        stream_text: bool = True,
        deltas: Optional[DeltaSink] = None,
    ) -> Request:
        """Queue a request: each prompt ``options.num_return_sequences`` times, one row each, in
        prompt order; a request of more rows than the slots (``max_batch_size``) has its rows admitted
        in order as slots free, and is done when its last row ends. Checked here (prompts fit the
        context, the vocabulary and the KV cache pool, options fit the vocabulary); ``what`` names the prompts in
        errors ("prompt_tokens", "prompt", "dialog"). ``stream_text``: assemble each row's text as it
        comes (``RowDelta.text``); without it only stop strings need it. ``deltas``: where the
        request's deltas go (``Request.deltas``), in place before a step can admit it; None: a queue
        that ``Request.updates`` reads. Thread-safe; wakes ``run``.

        Returns:
            The ``Request``, waiting for slots.

        Raises:
            ValueError, TypeError: a prompt or an option the model cannot take, or the engine is
                shutting down.
        """
        vocab_size, sizes = self.model.params.vocab_size, self.options
        if not isinstance(options, GenerationOptions):
            raise TypeError(f"options must be a GenerationOptions, got {type(options).__name__}")
        options.check_vocabulary(vocab_size)
        options.check_draft(self.draft is not None)
        check_adapter(self.adapters, options.adapter)
        self.constraints.check(options.json_schema, options.json_object)
        check_prompts(prompt_tokens, sizes.max_seq_len, vocab_size, what)
        self.scheduler.check_pool(prompt_tokens, options.num_return_sequences, what, self.kv_cache_tokens)
        if self.stopping.is_set():
            raise ValueError("the engine is shutting down: it takes no new requests")
        rows = [list(tokens) for tokens in prompt_tokens for _ in range(options.num_return_sequences)]
        with self.scheduler.arrived:
            request = Request(next(self.ids), rows, options, self.tokenizer, sizes.max_seq_len, stream_text, deltas)
            self.scheduler.waiting.append(request)
            self.scheduler.arrived.notify()
        return request

    def score(self, pairs: Sequence[Tuple[List[int], List[int]]]) -> List[Tuple[List[float], List[bool]]]:
        """Score each (context, continuation) pair of token lists: per continuation token, its logprob
        after the tokens before it and whether it is the model's most likely token there; in the pairs'
        order. A pair is one row (``Request.scoring``), fed all but its last token, that queues for a
        slot as a generation does and ends after its prefill. Pairs sharing a context share the cached
        blocks of it (``Scheduler.shares_computing``). Runs steps on the thread that owns the model
        until every pair is scored; under torchrun every rank scores the same pairs.

        Raises:
            ValueError, TypeError: a pair with an empty side, more than ``max_seq_len + 1`` tokens, a
                token outside the vocabulary, or more than the KV cache pool holds.
        """
        params = self.model.params
        check_pairs(pairs, params.max_seq_len, params.vocab_size)
        for i, (context, continuation) in enumerate(pairs):
            self.scheduler.check_pool([[*context, *continuation][:-1]], 1, f"pair {i}", self.kv_cache_tokens)
        if self.stopping.is_set():
            raise ValueError("the engine is shutting down: it scores nothing")
        with self.scheduler.arrived:
            requests = [Request.scoring(next(self.ids), context, continuation) for context, continuation in pairs]
            self.scheduler.waiting.extend(requests)
        for request in requests:
            while not request.done:
                self.step()
        rows = [request.rows[0] for request in requests]
        for i, row in enumerate(rows):
            if row.finish_reason != "length":
                raise RuntimeError(f"pair {i} was not scored: its row ended with finish reason {row.finish_reason!r}")
        return [(row.prompt_logprobs, row.prompt_greedy) for row in rows]

    def load_adapter(self, name: str, folder: str) -> None:
        """Serve the LoRA adapter in ``folder`` as ``name`` from the next step on; a request may name it at once
        (``llama.engine.adapters.Adapters.load``). Any thread; under torchrun, rank 0's (the plan carries it).

        Raises:
            ValueError, OSError: the engine serves no adapters, the name is taken, or the adapter cannot be served.
        """
        served_adapters(self.adapters).load(name, folder)
        self.wake()

    def unload_adapter(self, name: str) -> threading.Event:
        """Serve the adapter ``name`` no more: new requests may not name it, and it leaves once the requests
        computing with it end. Returns an event set then (a step sets it). Any thread; rank 0's under torchrun.

        Raises:
            ValueError: the engine serves no adapter of that name (``UnknownAdapter``) or none at all.
        """
        gone = served_adapters(self.adapters).unload(name)
        self.wake()
        return gone

    def wake(self) -> None:
        """``run`` looks for work now."""
        with self.scheduler.arrived:
            self.scheduler.arrived.notify()

    @property
    def kv_cache_tokens(self) -> int:
        """The pool's size in tokens as asked for (``EngineOptions.kv_cache_tokens``), else every row's context."""
        return self.options.kv_cache_tokens or self.options.pool_tokens

    def check_grammar(self, json_schema: Optional[dict], json_object: bool = False) -> None:
        """Build (or find cached) the grammar of ``json_schema`` (or, with ``json_object``, of any JSON
        object), as ``submit`` would: a caller checks a schema, and pays for its grammar, before submitting.

        Raises:
            ValueError: the engine has no tokenizer, or the schema cannot be used (naming the part).
        """
        self.constraints.check(json_schema, json_object)

    @property
    def max_slots(self) -> int:
        """The number of slots: ``max_batch_size``."""
        return self.scheduler.max_slots

    @property
    def queue_length(self) -> int:
        """Requests waiting for slots (a request larger than the slots, until its last row is admitted)."""
        return len(self.scheduler.waiting)

    @property
    def queued_rows(self) -> int:
        """Rows waiting for slots."""
        with self.scheduler.arrived:
            return sum(len(request.waiting_rows) for request in self.scheduler.waiting)

    @property
    def running_slots(self) -> int:
        """Slots holding a row (prefilling or decoding)."""
        return len(self.scheduler.running)

    @property
    def preemptions(self) -> int:
        """Rows preempted since the start."""
        return self.scheduler.preemptions

    def compile_times(self) -> List[Tuple[str, Optional[float]]]:
        """Each compiled pass's name and its first use's seconds, compilation included (None before it): the
        decode step's, and speculative decoding's verification pass and the draft's step."""
        speculator = self.speculator
        steps = [speculator.verify_forward] + ([speculator.draft_forward] if speculator.draft_forward else [])
        return [("the decode step", self.runner.compile_seconds)] + [
            (f"the {s.name}", s.compile_seconds) for s in steps
        ]

    @property
    def compile_seconds(self) -> Optional[float]:
        """The first compiled decode step's time, compilation included (None before it)."""
        return self.runner.compile_seconds

    @property
    def kv_cache_bytes(self) -> int:
        """This process's bytes of the KV cache pool, the draft's included, 8-bit pools' scales included."""
        return sum(pool_bytes(model) for model in (self.model, self.draft) if model is not None)

    def pool_use(self) -> dict:
        """The KV cache pool's bytes (``kv_cache_bytes``) and blocks, those held now, the prompt tokens looked up
        in the prefix cache and found there, and the preemptions, since the start (rank 0's)."""
        blocks = self.scheduler.blocks
        return dict(
            bytes=self.kv_cache_bytes,
            blocks=blocks.capacity,
            used_blocks=blocks.used,
            queried_tokens=blocks.queried_tokens,
            hit_tokens=blocks.hit_tokens,
            preemptions=self.preemptions,
        )

    def reset_prefix_cache(self) -> None:
        """Forget every block of the prefix cache: after the model's weights changed (a training step), the
        keys and values computed before are stale. Between steps, with no row in the engine. Under torchrun
        call it on every rank: each checks its own rows; the blocks are rank 0's, and nothing is sent.

        Raises:
            ValueError: rows are still in the engine (running, preempted or waiting).
        """
        scheduler = self.scheduler
        waiting = self.queued_rows
        if scheduler.running or scheduler.preempted or waiting:
            raise ValueError(
                f"reset_prefix_cache needs an engine without rows, but rows are still in the engine: "
                f"{len(scheduler.running)} running, {len(scheduler.preempted)} preempted, {waiting} waiting; "
                "step until their requests are done (or cancel them) first"
            )
        scheduler.blocks.reset_prefix_cache()

    def warm_up(self, max_top_logprobs: int = 0, speculate_k: Optional[int] = None) -> float:
        """Compile every graph the compiled steps can need, so that no request waits for a compile: the
        decode step's (``Runner.warm_up``) with up to ``max_top_logprobs`` alternatives and, with
        ``speculate_k``, speculative decoding's passes with that many proposals (``Speculator.warm_up``).
        Returns the seconds it took (0 when not compiled)."""
        runner = self.runner
        if runner.compiled is None:
            return 0.0
        start, widths, lengths = time.perf_counter(), runner.compiled_widths(), runner.warmed_lengths()
        # the most of one function's: two sampler variants, three speculative passes, for each bucket of adapters
        graphs = len(widths) * len(lengths) * 3 * (self.adapters.buckets if self.adapters is not None else 1)
        if torch._dynamo.config.recompile_limit < graphs:  # past the limit torch would run it eagerly
            torch._dynamo.config.recompile_limit = graphs
        with torch.no_grad():
            runner.warm_up(max_top_logprobs)
            if speculate_k is not None:
                self.speculator.warm_up(widths, lengths, speculate_k)
        seconds = time.perf_counter() - start
        runner.compile_seconds = seconds if runner.compile_seconds is None else runner.compile_seconds
        passes = "the decode step" + (
            f" and speculative decoding's passes (k={speculate_k})" if speculate_k is not None else ""
        )
        logger.info("compiled %s for widths %s x cache lengths %s in %.1f s", passes, widths, lengths, seconds)
        return seconds

    def stop(self) -> None:
        """Ask ``run`` to return after the current step: every request, running or waiting, is
        cancelled (finish reason "cancelled"), and followers are told to shut down. Safe in a signal
        handler."""
        self.stopping.set()

    # --- the thread that owns the model -----------------------------------------------------------

    def step(self) -> bool:
        """One step: plan, prefill one chunk, decode one token per running row, publish each
        request's deltas. Under torchrun rank 0 broadcasts the step's plan first and the other ranks
        run it. Returns whether there was anything to do."""
        if self.distributed and group_rank(self.model.group) != 0:
            return self.execute(receive_plan(self.model.group))
        plan = self.scheduler.plan()
        if self.distributed:
            broadcast_plan(plan, self.model.group)
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
        scheduler = self.scheduler
        last_broadcast = time.monotonic()
        while not self.stopping.is_set():
            if scheduler.has_work:
                try:
                    self.step()
                except Exception:
                    if self.distributed:  # the other ranks' state is unknown: stop them all
                        raise
                    logger.exception("a step failed: its requests end with finish reason 'error', serving goes on")
                    self.fail_step()
                last_broadcast = time.monotonic()
                continue
            with scheduler.arrived:
                scheduler.arrived.wait_for(lambda: scheduler.has_work, timeout=min(0.5, self.options.heartbeat_seconds))
            if self.distributed and time.monotonic() - last_broadcast >= self.options.heartbeat_seconds:
                broadcast_plan(StepPlan("heartbeat"), self.model.group)
                last_broadcast = time.monotonic()
        with scheduler.arrived:
            for request in set(scheduler.waiting) | scheduler.requests():
                request.cancel()
        self.step()  # cancels what runs and what was preempted, withdraws what waits
        if self.distributed:
            broadcast_plan(StepPlan("shutdown"), self.model.group)

    def fail_step(self) -> None:
        """After a step raised: every request it held (running, preempted, or taken from the queue)
        ends with finish reason "error" and frees its slots and blocks; the requests still waiting
        are untouched."""
        for request in self.scheduler.requests() | self.in_step:
            for row in request.rows:
                if row.slot is not None or row.finish_reason is None:
                    self.end(row, "error", set())
            request.publish()
        self.in_step = set()

    def follow(self) -> None:
        """A rank > 0's serving loop: runs each step rank 0 plans, until rank 0 shuts down. It waits
        in the broadcast, which rank 0's heartbeats keep from timing out."""
        while True:
            plan = receive_plan(self.model.group)
            if plan.kind == "shutdown":
                logger.info("rank %d: rank 0 shut down", group_rank(self.model.group))
                return
            self.execute(plan)

    # --- a step -----------------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> bool:
        """Run one step as ``plan`` says, in three calls: the rows move (``Scheduler.apply``: ends,
        preemptions, admissions) and the device's slots and the grammars follow; the model runs (a chunk
        of prefill, then a token for each decoding row); each row records what it sampled (``record``).
        Then every request with news publishes it. Returns whether anything ran."""
        if plan.kind != "step":
            return False
        self.arrive(plan.arrivals)
        self.in_step = self.scheduler.named(plan)
        touched: Set[Request] = set()
        self.sync(self.scheduler.apply(plan), touched)
        decoding = self.scheduler.decoding
        with torch.no_grad():  # not inference_mode: torch.compile cannot take inference tensors as inputs
            self.prefill(touched)
            if decoding:
                self.decode(decoding, touched)
        self.scheduler.register_written()
        for request in touched:
            request.publish()
        self.in_step = set()
        return bool(touched)

    def arrive(self, arrivals: List[Tuple[int, List[List[int]], GenerationOptions, bool]]) -> None:
        """The new requests a plan admits that this rank was not given (a server's followers), made
        from rank 0's and queued."""
        given = {request.id for request in self.scheduler.requests(waiting=True)}
        for request_id, prompts, options, stream_text in arrivals:
            if request_id not in given:
                request = Request(request_id, prompts, options, self.tokenizer, self.options.max_seq_len, stream_text)
                with self.scheduler.arrived:
                    self.scheduler.waiting.append(request)

    def sync(self, moves: Moves, touched: Set[Request]) -> None:
        """The device's slots and the grammars follow what the scheduler changed: the slots rows left are
        freed, the rows that took one get its settings and their blocks, a grammar starts with its row,
        advances with its tokens and ends with it."""
        for slot in moves.vacated:
            self.runner.free(slot)
        if moves.adapter_loads:
            self.adapters.write(moves.adapter_loads)
        for request, rows in itertools.groupby(moves.resumed + moves.admitted, key=lambda row: row.request):
            rows = list(rows)
            index = 0 if request.options.adapter is None else self.adapters.index_of(request.options.adapter)
            self.runner.set_rows(request.options, [row.slot for row in rows], rows, index)
        for slot, blocks in moves.tables.items():
            self.runner.set_table(slot, blocks)
        for row in moves.admitted:
            self.constraints.start(row, row.options.json_schema, row.options.json_object)
        for row, _, tokens in moves.taken:
            for token in tokens:
                self.constraints.advance(row, token)
        for row in moves.ended:
            self.constraints.end(row)
        touched |= moves.touched

    def end(self, row: Row, reason: Optional[str], touched: Set[Request]) -> None:
        """The row ends (``reason``: why, if it does not know yet), freeing its slot and its blocks."""
        self.sync(self.scheduler.end(row, reason), touched)

    def prefill(self, touched: Set[Request]) -> None:
        """The next chunk of the oldest admitted rows' prefills, in one pass (``Scheduler.prefill_batch``);
        the rows whose prompt is complete sample their first token (a resumed row decodes on from its last)."""
        batch = self.scheduler.prefill_batch(self.options.prefill_chunk)
        if not batch:
            return
        last = self.runner.prefill(batch)
        first = []
        for i in self.scheduler.prefilled(batch):
            row = batch[i][0]
            if row.tokens:  # resumed after a preemption
                self.runner.resume(row)
            elif len(row.prompt) >= row.limit:  # scored only: nothing to generate
                self.end(row, "length", touched)
            else:
                first.append(i)
        if first:
            rows = [batch[i][0] for i in first]
            self.fill_allowed(rows)
            tokens = self.runner.first_tokens(rows, last[first])
            self.record([(row, [token]) for row, token in zip(rows, tokens)], touched)

    def decode(self, rows: List[Row], touched: Set[Request]) -> None:
        """One token for each decoding row, or a speculative step when a row speculates (and none
        follows a grammar, which takes one token a step)."""
        if any(row.options.speculate for row in rows) and not any(row.options.constrained for row in rows):
            self.speculator.advance(self.record(list(zip(rows, self.speculator.speculate(rows))), touched))
            return
        self.fill_allowed(rows)
        self.record([(row, [token]) for row, token in zip(rows, self.runner.decode(rows))], touched)

    def fill_allowed(self, rows: List[Row]) -> None:
        """Each constrained row's next allowed tokens into the runner's mask (the others allow all)."""
        masks = self.constraints.allowed(rows)
        if masks is not None:
            indices, allowed = masks
            self.runner.set_allowed([rows[i].slot for i in indices], allowed)

    def record(
        self, sampled: List[Tuple[Row, List[Sampled]]], touched: Set[Request]
    ) -> List[Tuple[Row, int, List[int]]]:
        """The one way a sampled token reaches the host: each row records its tokens in order until it
        ends (``Scheduler.postprocess``), its grammar follows, and a row that ended leaves its slot.
        Returns what each row took: (the row, its slot, its tokens)."""
        moves = self.scheduler.postprocess(sampled)
        self.sync(moves, touched)
        return moves.taken


def broadcast_plan(plan: StepPlan, group: ProcessGroup) -> None:
    dist.broadcast_object_list([plan], src=dist.get_global_rank(group, 0), group=group)


def receive_plan(group: ProcessGroup) -> StepPlan:
    box = [None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]
