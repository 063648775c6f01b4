"""The server's door to the decoding engine (``llama.engine``): the HTTP side's event loop submits
jobs through it, and the thread that owns the model runs the engine's loop.

- A job is submitted to the engine as one request (its prompts times n rows, every row with the
  job's own settings). It starts at the engine's next step if its rows fit the free slots, beside
  whatever is decoding there, whatever their settings; else it waits in the engine's queue. A job of
  more rows than slots has its rows admitted as slots free, in order; its answer is complete when its
  last row ends.
- The queue is bounded in rows: a job whose rows, with the rows already waiting, would leave more than
  ``max_queue`` rows waiting beyond what the free slots take at the next step is refused with 503, which
  a client can retry; one of more rows than the slots and the queue together, with 400.
- A job's deltas reach its coroutine through ``LoopDeltas``: the engine's thread appends each step's
  deltas and wakes the event loop (a stream after each step, a whole answer at its end); it never
  waits on the loop.
- Under torchrun rank 0 runs ``Scheduler.run`` (the engine's ``run``: it broadcasts each step's
  admissions and cancellations, and a heartbeat while idle) and every other rank the engine's
  ``follow``, until rank 0 broadcasts the shutdown.
"""

import asyncio
import dataclasses
import logging
import threading
from collections import deque
from typing import Deque, Optional

import torch

from llama.engine import Engine, Request
from llama.server.protocol import Job, RequestError

logger = logging.getLogger(__name__)


def shutting_down() -> RequestError:
    return RequestError("the server is shutting down", status=503, kind="server_error")


def generation_failed() -> RequestError:
    return RequestError(
        "generation failed on the server (its log has the traceback); the request may be retried",
        status=500,
        kind="server_error",
    )


class Scheduler:
    """Rank 0's bounded door to ``engine``: ``submit`` from any thread, ``run`` on the model's.
    ``speculation``: the server's ``speculate``/``speculate_k`` options, given to every request without a grammar."""

    def __init__(self, engine: Engine, max_queue: int, speculation: Optional[dict] = None):
        self.engine, self.max_queue, self.speculation = engine, max_queue, speculation or {}
        self.submitting = threading.Lock()  # the bound is checked and the job queued as one act
        self.stopping = threading.Event()

    @property
    def slots(self) -> int:
        return self.engine.max_slots

    def queue_length(self) -> int:
        return self.engine.queue_length

    def running_slots(self) -> int:
        return self.engine.running_slots

    def compiled_graphs(self) -> int:
        """Graphs torch.compile made in this process (the count its own tests read)."""
        return torch._dynamo.utils.counters["stats"]["unique_graphs"]

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Request:
        """Queue ``job`` in the engine; its request, whose rows are the job's choices, and whose
        ``deltas`` are read by a coroutine on ``loop`` (``LoopDeltas``).

        Raises:
            RequestError: 503 if the queue is full or the server is stopping; 400 if the job has more rows
                than the slots and the queue hold, or the engine refuses the prompts or the options.
        """
        self.check_rows(job)
        with self.submitting:
            if self.stopping.is_set():
                raise shutting_down()
            free_slots = self.engine.max_slots - self.engine.running_slots
            if self.engine.queued_rows + job.rows - free_slots > self.max_queue:
                raise RequestError(
                    f"the server is busy: its {job.rows} row(s) would wait beyond the {self.max_queue} rows the "
                    "queue holds (--max_queue) while every slot is taken; retry later",
                    status=503,
                    kind="server_error",
                )
            speculation = {} if job.options.constrained else self.speculation  # a grammar's rows decode a token a step
            options = dataclasses.replace(job.options, **speculation)
            what, deltas = "prompt" if job.kind == "completion" else "dialog", LoopDeltas(loop, every_step=job.stream)
            try:
                request = self.engine.submit(job.prompt_tokens, options, what, deltas=deltas)
            except (ValueError, TypeError) as error:
                raise RequestError(str(error)) from None
        logger.debug("request %s: %d row(s) queued as engine request %d", job.id, job.rows, request.id)
        return request

    def check_rows(self, job: Job) -> None:
        """A job's rows (prompts x n) must fit the slots and the queue together, else no wait would help."""
        most = self.engine.max_slots + self.max_queue
        if job.rows > most:
            n = job.options.num_return_sequences
            raise RequestError(
                f"{len(job.prompt_tokens)} prompt(s) x n={n} are {job.rows} rows, more than the server holds at "
                f"once: {self.engine.max_slots} slots (--max_batch_size) and {self.max_queue} waiting rows "
                "(--max_queue)",
                "n" if n > 1 else "prompt",
            )

    def refuse(self) -> None:
        """Refuse new jobs (503) from now on; what runs goes on. Safe in a signal handler."""
        self.stopping.set()

    def stop(self) -> None:
        """Refuse new jobs (503) and stop the engine after its current step: every request still
        running or waiting ends "cancelled", which the HTTP side answers as a 503 error while the
        process lasts; safe in a signal handler."""
        self.stopping.set()
        self.engine.stop()

    def run(self) -> None:
        """The engine's serving loop, until ``stop``."""
        self.engine.run()


class LoopDeltas:
    """A request's queue of step deltas (``Request.deltas``) whose reader is a coroutine on ``loop``.
    ``put`` (the engine's thread) appends, and wakes the reader through the loop after each step
    (``every_step``: a stream) or only at the end (a whole answer: the engine's steps cost the loop
    nothing meanwhile); ``get_all`` awaits and takes what came. Once the loop is closed (the HTTP
    side has shut down) nobody reads, and nothing is woken."""

    def __init__(self, loop: asyncio.AbstractEventLoop, every_step: bool):
        self.loop, self.every_step = loop, every_step
        self.items: Deque = deque()
        self.ready = asyncio.Event()

    def put(self, item) -> None:
        self.items.append(item)
        if self.every_step or item is None:
            try:
                self.loop.call_soon_threadsafe(self.ready.set)
            except RuntimeError:  # the loop is closed
                pass

    async def get_all(self, timeout: Optional[float] = None) -> list:
        """Every item that came (a list of deltas per step, None at the end), waiting up to
        ``timeout`` seconds (None: for ever) for one; [] if none came."""
        if not self.items:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except asyncio.TimeoutError:
                return []
        self.ready.clear()
        taken = []
        while self.items:
            taken.append(self.items.popleft())
        return taken
