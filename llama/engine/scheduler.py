"""Who runs in each step, on the host: the slots (the most rows decoded at once) and the rows in them,
the queue of waiting requests and of preempted rows, and rank 0's plan of each step. The scheduler alone
moves rows and records what they sample; the engine's device state and grammars follow (``Moves``).

A step is planned on rank 0 (``plan``) and applied on every rank (``apply``), in phases:
- ends: rows asked to end (cancelled: running, preempted, or every row of a waiting request), whose
  blocks go back to the pool (``llama.engine.block_manager``), and a row that alone outgrows the pool
  ("length");
- preemptions: each decoding row gets the blocks of the positions it writes this step (k + 1 of them
  in a speculative step). When the pool has none, the newest running row is preempted: it gives its
  blocks back and waits at the front of the queue, to be prefilled again later, its prompt and what it
  generated, and to go on where it was;
- admissions, when nothing was preempted: the preempted rows first, then the waiting requests, oldest
  first, while their rows fit the free slots and the pool holds the blocks of their prefill (a
  request's rows are admitted together; a request of more rows than there are slots, in order, as
  slots free; "static" admission admits only into an empty batch), and while the adapter a request
  computes with, if any, has an index among the device's (``llama.engine.adapters``: its own, or one it
  loads). A new row takes the blocks of the longest cached prefix of its prompt (computed with its adapter)
  and computes the rest; a request that would compute again a full block a row admitted in the same step
  computes waits a step, and takes it from the cache then;
- tables: each slot's blocks, where they changed.

Then the step runs (``prefill_batch``: which prompts, and how much of each), and each row records what
it sampled (``postprocess``). Rank 0 alone keeps the block manager: the plan (``StepPlan``, broadcast
under torchrun) carries each changed slot's blocks to every rank.
"""

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Set, Tuple

from llama.engine.adapters import Adapters
from llama.engine.block_manager import BlockManager
from llama.engine.requests import Request, Row, Sampled
from llama.options import GenerationOptions

logger = logging.getLogger(__name__)

ADMISSIONS = ("continuous", "static")


@dataclass
class StepPlan:
    """What rank 0 decided for one step, broadcast to every rank before it; its phases in the order a
    step applies them. ``kind``: "step", "heartbeat" (an idle rank 0 is alive) or "shutdown" (followers
    return).

    - ``ends``: the rows that end, (request id, row index, finish reason);
    - ``preemptions``: the slots whose rows give their blocks back and wait at the queue's front;
    - ``admissions``: the rows that take a slot, (request id, row index, slot, prompt tokens found in the
      prefix cache): the preempted rows first, then the new requests' rows; ``arrivals``: those new
      requests, (id, prompts, options, stream_text), which a rank that was not given them (a server's
      follower) makes;
    - ``tables``: each slot's blocks, where they changed;
    - ``adapter_loads``: the adapters that the admitted rows compute with and that take a device index (index ->
      name; None: the index empties, its adapter leaving; ``llama.engine.adapters``);
      ``adapter_registrations``: the adapters loaded since the last step, (name, folder), which every rank
      registers before the step's admissions; ``adapter_removals``: those unloaded that no request names any more.
    """

    kind: str
    ends: List[Tuple[int, int, str]] = field(default_factory=list)
    preemptions: List[int] = field(default_factory=list)
    admissions: List[Tuple[int, int, int, int]] = field(default_factory=list)
    arrivals: List[Tuple[int, List[List[int]], GenerationOptions, bool]] = field(default_factory=list)
    tables: Dict[int, List[int]] = field(default_factory=dict)
    adapter_loads: Dict[int, Optional[str]] = field(default_factory=dict)
    adapter_registrations: List[Tuple[str, str]] = field(default_factory=list)
    adapter_removals: List[str] = field(default_factory=list)


def arrival(request: Request) -> Tuple[int, List[List[int]], GenerationOptions, bool]:
    """What a rank that was not given ``request`` makes it from (``StepPlan.arrivals``)."""
    return request.id, request.prompt_tokens, request.options, request.stream_text


@dataclass
class Moves:
    """What the scheduler changed, for the device's slots and the grammars to follow (``Engine.sync``)."""

    vacated: List[int] = field(default_factory=list)  # slots a row left (it ended or was preempted)
    ended: List[Row] = field(default_factory=list)
    admitted: List[Row] = field(default_factory=list)  # new rows that took a slot
    resumed: List[Row] = field(default_factory=list)  # preempted rows that took a slot again
    tables: Dict[int, List[int]] = field(default_factory=dict)  # held slots' blocks, where they changed
    taken: List[Tuple[Row, int, List[int]]] = field(default_factory=list)  # (a row that sampled, its slot, its tokens)
    touched: Set[Request] = field(default_factory=set)  # requests with news to publish
    adapter_loads: Dict[int, Optional[str]] = field(default_factory=dict)  # device indices that changed adapter


class Scheduler:
    """The slots, the queues and the block manager; ``plan`` decides a step on rank 0, ``apply`` moves
    the rows as a plan says on every rank, ``postprocess`` records what they sampled.

    Args:
        max_slots: the most rows decoded at once (``max_batch_size``).
        max_seq_len: a row's most positions.
        blocks: the pool's block manager (used on rank 0 only).
        admission: "continuous" or "static".
        adapters: the adapters served per request, or None.
    """

    def __init__(
        self,
        max_slots: int,
        max_seq_len: int,
        blocks: BlockManager,
        admission: str = "continuous",
        adapters: Optional[Adapters] = None,
    ):
        if admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {admission!r}")
        self.max_slots, self.max_seq_len, self.blocks, self.admission = max_slots, max_seq_len, blocks, admission
        self.adapters = adapters
        self.running: List[Row] = []  # the rows holding a slot (``Row.slot``), in the order they were admitted
        self.waiting: Deque[Request] = deque()
        self.preempted: Deque[Row] = deque()  # rows that gave their blocks back, first to resume first
        self.arrived = threading.Condition()  # guards ``waiting``; notified by each submission
        self.preemptions = 0  # rows preempted since the start

    # --- what it holds ----------------------------------------------------------------------------

    @property
    def decoding(self) -> List[Row]:
        """The running rows whose prefill is in the cache, oldest first."""
        return [row for row in self.running if row.decoding]

    @property
    def prefilling(self) -> List[Row]:
        """The running rows whose prefill is not all in the cache yet, oldest first."""
        return [row for row in self.running if not row.decoding]

    @property
    def has_work(self) -> bool:
        """Rows waiting, running or preempted, or adapters arriving or leaving: a step has something to do."""
        adapters_change = self.adapters is not None and self.adapters.updates
        return bool(self.waiting or self.running or self.preempted or adapters_change)

    def held(self) -> Dict[int, Row]:
        """Each held slot's row."""
        return {row.slot: row for row in self.running}

    def requests(self, waiting: bool = False) -> Set[Request]:
        """Every request holding a slot or a preempted row; with ``waiting``, the waiting ones too."""
        held = {row.request for row in self.running} | {row.request for row in self.preempted}
        with self.arrived:
            return held | set(self.waiting) if waiting else held

    def check_pool(self, prompt_tokens: List[List[int]], n: int, what: str, kv_cache_tokens: int) -> None:
        """The rows admitted at once must fit the KV cache pool together: every row of a request that fits
        the slots; the longest prompt's row of a larger one, whose rows are admitted as slots and blocks free."""
        if n * len(prompt_tokens) > self.max_slots:
            prompt_tokens, n = [max(prompt_tokens, key=len)], 1
        blocks = n * sum(self.blocks.blocks_for(len(tokens)) for tokens in prompt_tokens)
        if blocks > self.blocks.capacity:
            raise ValueError(
                f"{what}: {n * len(prompt_tokens)} row(s) of {sum(len(t) for t in prompt_tokens) * n} prompt tokens "
                f"in all need {blocks} blocks of {self.blocks.block_size} tokens, but the KV cache pool holds "
                f"{self.blocks.capacity} (kv_cache_tokens={kv_cache_tokens})"
            )

    # --- rank 0's plan ----------------------------------------------------------------------------

    def plan(self) -> StepPlan:
        """Rank 0's decisions for this step: the rows that end, the blocks the decoding rows write into
        (preempting when the pool has none), the admissions."""
        plan = StepPlan("step")
        with self.arrived:
            cancelled = self.plan_cancellations(plan)
            self.plan_growth(plan, set(cancelled))
            if self.adapters is not None:  # adapters loaded and unloaded since the last step
                in_use = {request.options.adapter for request in self.requests(waiting=True)}
                updates = self.adapters.plan_updates(in_use, plan.adapter_loads)
                plan.adapter_registrations, plan.adapter_removals = updates
            held = {row.slot for row in self.running} - cancelled
            free = [slot for slot in range(self.max_slots) if slot not in held]
            if not plan.preemptions and (self.admission == "continuous" or len(free) == self.max_slots):
                self.plan_admissions(plan, free)
        return plan

    def plan_cancellations(self, plan: StepPlan) -> Set[int]:
        """The cancelled rows end: running ones (their blocks go back now, for this step's admissions),
        preempted ones, and a waiting request's waiting rows when all of them are. Returns the running ones' slots."""
        slots = set()
        for row in self.running:
            if row.index in row.request.cancelled:
                plan.ends.append((row.request.id, row.index, "cancelled"))
                self.release(row)
                slots.add(row.slot)
        for row in self.preempted:
            if row.index in row.request.cancelled:
                plan.ends.append((row.request.id, row.index, "cancelled"))
        for request in self.waiting:
            rows = request.waiting_rows
            if rows and all(row.index in request.cancelled for row in rows):
                plan.ends += [(request.id, row.index, "cancelled") for row in rows]
        return slots

    def plan_growth(self, plan: StepPlan, gone: Set[int]) -> None:
        """Blocks for every position the decoding rows write this step, oldest row first; when the pool
        has none, the newest running row gives its blocks back (``preemptions``), or, alone, the row
        ends. ``gone``: the slots whose rows leave."""
        decoding = [row for row in self.decoding if row.slot not in gone]
        k = max((row.options.speculate_k for row in decoding if row.options.speculate), default=0)
        for row in decoding:
            if row.slot in gone:
                continue
            had = len(row.table.blocks)
            while not self.blocks.grow(row.table, min(row.position + 1 + k, self.max_seq_len)):
                victims = [other for other in self.running if other.slot not in gone]
                if victims == [row]:
                    plan.ends.append((row.request.id, row.index, "length"))
                    gone.add(row.slot)
                    break
                victim = victims[-1]
                self.release(victim)
                plan.preemptions.append(victim.slot)
                gone.add(victim.slot)
                if victim is row:
                    break
            else:
                if len(row.table.blocks) != had:  # a new block every block_size steps: the table is written then only
                    plan.tables[row.slot] = list(row.table.blocks)

    def plan_admissions(self, plan: StepPlan, free: List[int]) -> None:
        """The preempted rows, then the waiting requests, each while a slot and the pool's blocks for
        its prefill are there; first come, first served: nothing overtakes the oldest."""
        ending = {(request_id, index) for request_id, index, _ in plan.ends}
        claimed: Set[int] = set()  # the adapter indices the rows admitted so far compute with
        for row in self.preempted:
            if (row.request.id, row.index) in ending:
                continue
            if not free or not self.claim_adapter(row.request, plan, claimed):
                return
            cached = self.allocate(row, free[0], plan)
            if cached is None:
                return
            plan.admissions.append((row.request.id, row.index, free.pop(0), cached))
        computing: Set[bytes] = set()  # the keys of the full blocks the rows admitted so far compute in this step
        for request in self.waiting:
            rows = request.waiting_rows
            if not request.rows:  # nothing to admit: it ends at once
                plan.arrivals.append(arrival(request))
                continue
            if not rows or (request.id, rows[0].index) in ending or self.shares_computing(rows[: len(free)], computing):
                continue  # withdrawn, or waits a step
            together = request.n_rows <= self.max_slots  # else its rows go in as slots and blocks free
            if (together and len(rows) > len(free)) or not self.claim_adapter(request, plan, claimed):
                return
            admissions = self.allocate_rows(rows, free, plan, together)
            if not admissions:
                return
            free = free[len(admissions) :]
            admitted = rows[: len(admissions)]
            computing.update(key for row in admitted for key in self.computed_keys(row))
            plan.admissions += admissions
            if request.admitted == 0:  # its first rows: the other ranks make the request now
                plan.arrivals.append(arrival(request))
            if len(admitted) < len(rows):  # the rest waits for slots, and nothing overtakes it
                return

    def allocate_rows(
        self, rows: List[Row], free: List[int], plan: StepPlan, together: bool
    ) -> List[Tuple[int, int, int, int]]:
        """The admissions of ``rows`` into the ``free`` slots, in order, while the pool gives their blocks
        (``together``: all of them or none, what the first took going back)."""
        admissions = []
        for row, slot in zip(rows, free):
            cached = self.allocate(row, slot, plan)
            if cached is None:
                if together:
                    for taken, its_slot in zip(rows, free):
                        self.blocks.release(taken.table)
                        plan.tables.pop(its_slot, None)
                    return []
                break
            admissions.append((row.request.id, row.index, slot, cached))
        return admissions

    def shares_computing(self, rows: List[Row], computing: Set[bytes]) -> bool:
        """Whether one of a request's waiting ``rows`` would compute again a full block a row admitted in this
        step computes (continuous admission): it waits a step, and takes the block from the prefix cache then (a
        context shared by several continuations, a system prompt shared by requests that came together)."""
        if self.admission != "continuous" or not computing:
            return False
        return any(key in computing for row in rows for key in self.computed_keys(row))

    def claim_adapter(self, request: Request, plan: StepPlan, claimed: Set[int]) -> bool:
        """Whether the adapter ``request`` computes with, if any, has a device index for this step (its own, or
        one the plan loads it into: ``Adapters.claim``); False: the request waits."""
        if request.options.adapter is None:
            return True
        return self.adapters.claim(request.options.adapter, plan.adapter_loads, claimed) is not None

    def adapter_identity(self, row: Row) -> Optional[str]:
        """The identity of the adapter the row computes with (None: the weights alone): part of its prefix keys."""
        return None if row.options.adapter is None else self.adapters.identity(row.options.adapter)

    def computed_keys(self, row: Row) -> List[bytes]:
        return self.blocks.computed_keys(row.cacheable, self.blocks.root_for(self.adapter_identity(row)))

    def allocate(self, row: Row, slot: int, plan: StepPlan) -> Optional[int]:
        """The row's blocks for its prefill (its cached prefix taken, short of the tokens it scores, whose
        logits it computes), into ``plan``. Returns its prefill's tokens found in the prefix cache, or None if
        the pool cannot give the blocks."""
        taken = self.blocks.allocate(row.cacheable, len(row.target), self.adapter_identity(row))
        if taken is None:
            return None
        row.table, cached = taken
        plan.tables[slot] = list(row.table.blocks)
        return cached

    def release(self, row: Row) -> None:
        """Rank 0: the row's written full blocks join the prefix cache, and all its blocks go back."""
        self.blocks.register(row.table, row.sequence, row.written)
        self.blocks.release(row.table)

    def register_written(self) -> None:
        """Rank 0: the full blocks the running rows wrote join the prefix cache."""
        for row in self.running:
            self.blocks.register(row.table, row.sequence, row.written)

    # --- every rank, as the plan says -------------------------------------------------------------

    def named(self, plan: StepPlan) -> Set[Request]:
        """The waiting requests ``plan`` admits or ends: the step takes them out of the queue."""
        ids = {request_id for request_id, *_ in plan.ends + plan.arrivals}
        with self.arrived:
            return {request for request in self.waiting if request.id in ids}

    def apply(self, plan: StepPlan) -> Moves:
        """The rows move as ``plan`` says, phase by phase: the ended rows leave their slots or queues, the
        preempted ones go to the queue's front, the admitted ones take their slots. Run on every rank."""
        moves = Moves()
        with self.arrived:
            known = {request.id: request for request in self.requests(waiting=True)}
        if plan.adapter_registrations:
            self.adapters.arrive(plan.adapter_registrations)
        for request_id, index, reason in plan.ends:
            row = known[request_id].rows[index]
            if reason == "length":
                logger.warning(
                    "request %d: a row outgrew the KV cache pool alone (%d blocks of %d tokens): it ends",
                    request_id,
                    self.blocks.capacity,
                    self.blocks.block_size,
                )
            self.end(row, reason, moves)
        held = self.held()
        for slot in plan.preemptions:
            self.preempt(held[slot], moves)
        for request_id, *_ in plan.arrivals:
            known[request_id].admitted_at = time.monotonic()
            moves.touched.add(known[request_id])
        if plan.adapter_loads:
            self.adapters.assign(plan.adapter_loads)
            moves.adapter_loads = plan.adapter_loads
        if plan.adapter_removals:
            self.adapters.leave(plan.adapter_removals)
        for request_id, index, slot, cached in plan.admissions:
            self.place(known[request_id].rows[index], slot, cached, moves)
        with self.arrived:  # a request leaves the queue once none of its rows waits
            self.waiting = deque(request for request in self.waiting if request.waiting_rows)
        held = self.held()
        moves.tables = {slot: blocks for slot, blocks in plan.tables.items() if slot in held}
        return moves

    def place(self, row: Row, slot: int, cached: int, moves: Moves) -> None:
        """The row takes ``slot`` with ``cached`` tokens of its prefill in the prefix cache: a preempted
        row resumes (the first of the queue), a new one starts; a new row with no room to generate ends
        at once (unless its prompt is to be scored)."""
        request = row.request
        if row in self.preempted:
            first = self.preempted.popleft()
            if first is not row:
                raise RuntimeError(
                    f"rank 0 resumes request {request.id} row {row.index}, this rank's queue has "
                    f"request {first.request.id} row {first.index} first"
                )
            moves.resumed.append(row)
        else:
            request.admitted = row.index + 1
            if len(row.prompt) >= row.limit and row.scored_from is None:
                request.finish(row, "length")
                self.blocks.release(row.table)
                moves.touched.add(request)
                return
            row.cached = cached
            moves.admitted.append(row)
        row.slot, row.prefilled = slot, cached
        self.running.append(row)
        if self.adapters is not None:
            self.adapters.attach(row.options.adapter)

    def vacate(self, row: Row, moves: Moves) -> None:
        """The row leaves its slot and gives its blocks back (rank 0's written full ones join the prefix cache)."""
        self.release(row)
        moves.vacated.append(row.slot)
        self.running.remove(row)
        row.slot = None
        if self.adapters is not None:
            self.adapters.detach(row.options.adapter)

    def end(self, row: Row, reason: Optional[str] = None, moves: Optional[Moves] = None) -> Moves:
        """The row ends (``reason``: why, if it does not know yet): it leaves its slot, or the queue of
        preempted rows."""
        moves = Moves() if moves is None else moves
        if reason is not None:
            row.request.finish(row, reason)
        if row.slot is not None:
            self.vacate(row, moves)
        elif row in self.preempted:
            self.preempted.remove(row)
        moves.ended.append(row)
        moves.touched.add(row.request)
        return moves

    def preempt(self, row: Row, moves: Moves) -> None:
        """The row leaves its slot for the front of the queue; when it resumes, its prefill is its
        prompt and what it generated but the last token, the next decode step's input."""
        logger.info("a row is preempted at position %d: the KV cache pool is full", row.position)
        self.preemptions += 1
        self.vacate(row, moves)
        if row.tokens:
            row.target = row.sequence[: row.position]
        else:  # scored again from the start
            row.prompt_logprobs, row.prompt_greedy, row.prompt_top_logprobs = [], [], []
        row.prefilled = 0
        self.preempted.appendleft(row)

    # --- the step ---------------------------------------------------------------------------------

    def prefill_batch(self, chunk: int) -> List[Tuple[Row, int]]:
        """The next chunk of the oldest admitted rows' prefills, (row, tokens) each: while rows decode,
        at most ``chunk`` tokens in all (each row's padded to the longest), so that a long prompt delays
        them by at most one chunk a step; into an idle engine, every prompt whole, in one pass."""
        busy = bool(self.decoding)  # else no one waits: one pass
        batch: List[Tuple[Row, int]] = []
        width = 0
        for row in self.prefilling:
            n = len(row.target) - row.prefilled
            if busy:
                n = min(n, chunk)
                if batch and (len(batch) + 1) * max(width, n) > chunk:
                    break
            batch.append((row, n))
            width = max(width, n)
        return batch

    def prefilled(self, batch: List[Tuple[Row, int]]) -> List[int]:
        """After a prefill pass: each row's prefill advanced by its chunk. Returns the indices, in
        ``batch``, of the rows whose prefill is complete."""
        complete = []
        for i, (row, n) in enumerate(batch):
            row.prefilled += n
            if row.prefilled == len(row.target):
                complete.append(i)
        return complete

    def postprocess(self, sampled: List[Tuple[Row, List[Sampled]]]) -> Moves:
        """After a pass: each row records the tokens it sampled, in order, until it ends
        (``Request.record``); a row that ended leaves its slot."""
        moves = Moves()
        for row, tokens in sampled:
            slot, taken = row.slot, []
            for token in tokens:
                taken.append(token.token)
                if row.request.record(row, token):
                    break
            moves.taken.append((row, slot, taken))
            moves.touched.add(row.request)
            if row.finish_reason is not None:
                self.end(row, moves=moves)
        return moves
