"""The decoding side of the server: one thread owns the model, gathers the requests that arrived
together into one batch, decodes it as one stream, and hands each request its deltas.

- Batching: the oldest waiting request and every other waiting request with the same ``Sampling``
  (the options a stream applies to all its rows) go into one batch, up to max_batch_size rows
  (n counts as n rows); the rest wait for the next batch. The batch decodes up to the longest
  ``max_tokens``; a row that reaches its own is cancelled. Greedy rows equal their prompt alone,
  whatever else is in the batch (the decode loop guarantees it).
- Hang-ups: a request whose client has gone has its rows cancelled at the next step.
- Under torchrun, rank 0 runs ``Scheduler.run`` and every other rank ``follow``: before each batch
  rank 0 broadcasts its description, so every rank opens the same stream and enters the same
  collectives; the cancels travel with the stream's per-step broadcast. While idle rank 0
  broadcasts a heartbeat every ``heartbeat_seconds``, so a waiting rank never reaches the process
  group's timeout; on shutdown it broadcasts one last message that ends every follower.
"""

import dataclasses
import logging
import threading
import time
from collections import deque
from typing import Deque, List, Optional

import torch.distributed as dist

from llama.server.protocol import Job, RequestError, Sampling, usage

logger = logging.getLogger(__name__)

HEARTBEAT, SHUTDOWN, BATCH = "heartbeat", "shutdown", "batch"


def open_stream(llama, kind: str, prompts: list, max_gen_len: int, sampling: Sampling):
    """The ``CompletionStream`` of one batch; every rank calls it with the same arguments."""
    call = llama.chat_completion_stream if kind == "chat" else llama.text_completion_stream
    return call(prompts, **dataclasses.asdict(sampling.options(max_gen_len)))


def broadcast_message(message: Optional[tuple]) -> tuple:
    """Rank 0's ``message`` on every rank (followers pass None); nothing to do in one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Scheduler:
    """Rank 0's request queue and decoding loop. HTTP threads ``submit`` jobs; ``run`` (on the
    thread that owns the model) decodes them until ``stop``."""

    def __init__(self, llama, heartbeat_seconds: float = 10.0):
        self.llama = llama
        self.max_rows = llama.model.params.max_batch_size
        self.heartbeat_seconds = heartbeat_seconds
        self.pending: Deque[Job] = deque()
        self.arrived = threading.Condition()
        self.stopping = threading.Event()

    def submit(self, job: Job) -> None:
        if self.stopping.is_set():
            raise RequestError("the server is shutting down", status=503, kind="server_error")
        with self.arrived:
            self.pending.append(job)
            self.arrived.notify()

    def stop(self) -> None:
        """Finish the current step, cancel every row, end the followers; safe in a signal handler."""
        self.stopping.set()

    def run(self) -> None:
        """Decode batches until ``stop``, then tell the followers to end and refuse what waits."""
        last_message = time.monotonic()
        while not self.stopping.is_set():
            batch = self.next_batch(wait_seconds=0.2)
            if batch:
                self.decode(batch)
                last_message = time.monotonic()
            elif time.monotonic() - last_message >= self.heartbeat_seconds:
                broadcast_message((HEARTBEAT,))
                last_message = time.monotonic()
        broadcast_message((SHUTDOWN,))
        with self.arrived:
            for job in self.pending:
                job.events.put(("error", RequestError("the server is shutting down", status=503, kind="server_error")))
            self.pending.clear()

    def next_batch(self, wait_seconds: float) -> List[Job]:
        """The oldest live request and the waiting ones that can share its stream and still fit."""
        with self.arrived:
            self.arrived.wait_for(lambda: self.pending, timeout=wait_seconds)
            self.pending = deque(job for job in self.pending if not job.hung_up.is_set())
            if not self.pending:
                return []
            batch, rows, waiting = [], 0, deque()
            for job in self.pending:
                if job.sampling == self.pending[0].sampling and rows + job.rows <= self.max_rows:
                    batch.append(job)
                    rows += job.rows
                else:
                    waiting.append(job)
            self.pending = waiting
        return batch

    def decode(self, batch: List[Job]) -> None:
        sampling = batch[0].sampling
        prompts = [prompt for job in batch for prompt in job.prompts]
        max_gen_len = max(job.max_tokens for job in batch)
        broadcast_message((BATCH, sampling.kind, prompts, max_gen_len, sampling))
        try:
            stream = open_stream(self.llama, sampling.kind, prompts, max_gen_len, sampling)
        except (ValueError, TypeError) as error:  # every rank raised it (the stream checks its arguments together)
            for job in batch:
                job.events.put(("error", RequestError(str(error))))
            return
        logger.info("decoding %d request(s), %d row(s), up to %d tokens", len(batch), len(prompts) * sampling.n, max_gen_len)
        try:
            BatchProgress(batch, stream, self.stopping).follow()
        except Exception:
            logger.exception("decoding a batch failed")
            for job in batch:
                job.events.put(("error", RequestError("decoding failed; see the server's log", status=500, kind="server_error")))
            if dist.is_initialized() and dist.get_world_size() > 1:
                raise  # the ranks may be out of step: end the job (torchrun stops every rank)


class BatchProgress:
    """One batch's stream, turned into each job's events: row r of the stream is ``owners[r]``, the
    job it belongs to and its choice index there (the jobs' rows follow each other in batch order)."""

    def __init__(self, batch: List[Job], stream, stopping: threading.Event):
        self.batch, self.stream, self.stopping = batch, stream, stopping
        self.owners = [(job, choice) for job in batch for choice in range(job.rows)]
        self.sent_tokens = [0] * len(self.owners)  # tokens already reported per row
        self.reasons: List[Optional[str]] = [None] * len(self.owners)  # the server's reason for a cancel
        self.done = [False] * len(self.owners)

    def follow(self) -> None:
        for pieces in self.stream:
            finish_reasons, tokens = self.stream.finish_reasons, self.stream.tokens  # read once a step: each builds every row's list
            token_details = self.new_tokens(tokens) if self.batch[0].sampling.logprobs else None
            for row, (job, choice) in enumerate(self.owners):
                if self.done[row]:
                    continue
                details = token_details[row] if token_details else []
                if pieces[row] or details:
                    job.events.put(("delta", choice, pieces[row], details))
                self.sent_tokens[row] = len(tokens[row])
                if finish_reasons[row] is not None:
                    self.finish(row, finish_reasons[row])
                else:
                    self.cancel_if_over(row, job, len(tokens[row]))
        for row, finished in enumerate(self.done):  # the stream has ended: so has every row
            if not finished:
                self.finish(row, self.stream.finish_reasons[row] or "length")

    def new_tokens(self, tokens: List[List[int]]) -> List[list]:
        """Per row, (token id, logprob, alternatives) of the tokens not reported yet."""
        logprobs = self.stream.logprobs
        alternatives = self.stream.top_logprobs if self.batch[0].sampling.top_logprobs else [[[]] * len(t) for t in tokens]
        return [
            list(zip(tokens[row][sent:], logprobs[row][sent:], alternatives[row][sent:]))
            for row, sent in enumerate(self.sent_tokens)
        ]

    def cancel_if_over(self, row: int, job: Job, n_tokens: int) -> None:
        """Rows that reached their request's max_tokens, whose client hung up, or the server is stopping."""
        if job.hung_up.is_set():
            reason = "cancelled"
        elif n_tokens >= job.max_tokens:
            reason = "length"
        elif self.stopping.is_set():
            reason = "shutdown"
        else:
            return
        if self.reasons[row] is None:
            self.reasons[row] = reason
            self.stream.cancel(row)
            if reason == "cancelled":
                logger.info("request %s: the client hung up; row cancelled after %d tokens", job.id, n_tokens)

    def finish(self, row: int, stream_reason: str) -> None:
        job, choice = self.owners[row]
        self.done[row] = True
        reason = self.reasons[row] if stream_reason == "cancelled" else stream_reason
        if reason == "shutdown":
            job.events.put(("error", RequestError("the server is shutting down", status=503, kind="server_error")))
        else:
            job.events.put(("finish", choice, reason))
        rows = [r for r, (owner, _) in enumerate(self.owners) if owner is job]
        if all(self.done[r] for r in rows):
            completion_tokens = sum(len(self.stream.tokens[r]) for r in rows)
            job.events.put(("done", usage(sum(job.prompt_lens), completion_tokens)))


def follow(llama) -> None:
    """A follower rank: open and run each batch rank 0 describes, until rank 0 shuts down."""
    while True:
        message = broadcast_message(None)
        if message[0] == SHUTDOWN:
            logger.info("rank %d: the server shut down", dist.get_rank())
            return
        if message[0] == HEARTBEAT:
            continue
        _, kind, prompts, max_gen_len, sampling = message
        try:
            stream = open_stream(llama, kind, prompts, max_gen_len, sampling)
        except Exception as error:  # raised on every rank together (fail_together): rank 0 answers the client
            logger.info("rank %d: batch refused: %s", dist.get_rank(), error)
            continue
        for _ in stream:
            pass
