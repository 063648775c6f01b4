"""The server's door to the decoding engine (``llama.engine``): HTTP threads submit jobs through it,
and the thread that owns the model runs the engine's loop.

- A job is submitted to the engine as one request (its prompts times n rows, every row with the
  job's own settings). It starts at the engine's next step if its rows fit the free slots, beside
  whatever is decoding there, whatever their settings; else it waits in the engine's queue.
- The queue is bounded: a job that would find ``max_queue`` requests already waiting beyond what
  the free slots take at the next step is refused with 503, which a client can retry.
- Under torchrun rank 0 runs ``Scheduler.run`` (the engine's ``run``: it broadcasts each step's
  admissions and cancellations, and a heartbeat while idle) and every other rank the engine's
  ``follow``, until rank 0 broadcasts the shutdown.
"""

import dataclasses
import logging
import threading
from typing import Optional

import torch

from llama.engine import Engine, Request
from llama.server.protocol import Job, RequestError

logger = logging.getLogger(__name__)


def shutting_down() -> RequestError:
    return RequestError("the server is shutting down", status=503, kind="server_error")


def generation_failed() -> RequestError:
    return RequestError("generation failed on the server (its log has the traceback); the request may be retried", status=500, kind="server_error")


class Scheduler:
    """Rank 0's bounded door to ``engine``: ``submit`` from any thread, ``run`` on the model's.
    ``speculation``: the server's ``speculate``/``speculate_k`` options, given to every request."""

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

    def submit(self, job: Job) -> Request:
        """Queue ``job`` in the engine; its request, whose rows are the job's choices.

        Raises:
            RequestError: 503 if the queue is full or the server is stopping; 400 if the engine
                refuses the prompts or the options.
        """
        with self.submitting:
            if self.stopping.is_set():
                raise shutting_down()
            free_slots = self.engine.max_slots - self.engine.running_slots
            if self.engine.queue_length - free_slots >= self.max_queue:
                raise RequestError(
                    f"the server is busy: every slot is taken and {self.max_queue} request(s) wait (--max_queue); retry later",
                    status=503, kind="server_error",
                )
            try:
                options = dataclasses.replace(job.options, **self.speculation)
                request = self.engine.submit(job.prompt_tokens, options, "prompt" if job.kind == "completion" else "dialog")
            except (ValueError, TypeError) as error:
                raise RequestError(str(error)) from None
        logger.debug("request %s: %d row(s) queued as engine request %d", job.id, job.rows, request.id)
        return request

    def stop(self) -> None:
        """Refuse new jobs (503) and stop the engine after its current step: every request still
        running or waiting ends "cancelled", which the HTTP side answers as a 503 error while the
        process lasts; safe in a signal handler."""
        self.stopping.set()
        self.engine.stop()

    def run(self) -> None:
        """The engine's serving loop, until ``stop``."""
        self.engine.run()
