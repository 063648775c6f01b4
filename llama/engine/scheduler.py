"""Who runs in each step, on the host: the slots (the most rows decoded at once) and the rows in them,
the queue of waiting requests and of preempted rows, and rank 0's plan of each step.

The plan (``StepPlan``, broadcast under torchrun so that every rank runs the same step):
- cancellations: rows asked to end; their blocks go back to the pool (``llama.engine.block_manager``);
- growth: each decoding row gets the blocks of the positions it writes this step (k + 1 of them in a
  speculative step). When the pool has none, the newest running row is preempted: it gives its blocks
  back and waits at the front of the queue, to be prefilled again later, its prompt and what it
  generated, and to go on where it was; a row that alone outgrows the pool ends ("length");
- admissions, when nothing was preempted: the preempted rows first, then the waiting requests, oldest
  first, while their rows fit the free slots and the pool holds the blocks of their prefill (a
  request's rows are admitted together; "static" admission admits only into an empty batch). A new
  row takes the blocks of the longest cached prefix of its prompt and computes the rest.

Rank 0 alone keeps the block manager: the plan carries each changed slot's blocks to every rank.
"""

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional, Set, Tuple

from llama.engine.block_manager import BlockManager
from llama.engine.requests import Request, Row, Sampled
from llama.options import GenerationOptions

ADMISSIONS = ("continuous", "static")


@dataclass
class StepPlan:
    """What rank 0 decided for one step, broadcast to every rank before it. ``kind``: "step",
    "heartbeat" (an idle rank 0 is alive) or "shutdown" (followers return). ``admissions``: per
    request admitted, (id, rows' prompts, options, stream_text, the slot of each row);
    ``cancellations``: slots whose rows end; ``withdrawn``: ids of waiting requests cancelled;
    ``preemptions``: slots whose rows give their blocks back and wait at the queue's front;
    ``resumptions``: preempted rows admitted again, (request id, row index, slot); ``exhausted``:
    slots whose row alone outgrew the pool (it ends, "length"); ``dropped``: preempted rows
    cancelled, (request id, row index); ``tables``: each slot's blocks, where they changed;
    ``cached``: per admitted slot, its prompt tokens found in the prefix cache."""

    kind: str
    admissions: List[Tuple[int, List[List[int]], GenerationOptions, bool, List[int]]] = field(default_factory=list)
    cancellations: List[int] = field(default_factory=list)
    withdrawn: List[int] = field(default_factory=list)
    preemptions: List[int] = field(default_factory=list)
    resumptions: List[Tuple[int, int, int]] = field(default_factory=list)
    exhausted: List[int] = field(default_factory=list)
    dropped: List[Tuple[int, int]] = field(default_factory=list)
    tables: Dict[int, List[int]] = field(default_factory=dict)
    cached: Dict[int, int] = field(default_factory=dict)


@dataclass
class Moves:
    """What the scheduler changed in rows' places, for the device's slots and the grammars to follow
    (``Engine.sync``)."""

    vacated: List[int] = field(default_factory=list)  # slots a row left (it ended or was preempted)
    ended: List[Row] = field(default_factory=list)  # rows that ended
    taken: List[Tuple[Row, int, List[int]]] = field(default_factory=list)  # per row that sampled: its slot, its tokens
    touched: Set[Request] = field(default_factory=set)  # requests with news to publish


class Scheduler:
    """The slots, the queues and the block manager; ``plan`` decides a step, the other methods move
    rows between slots and queues as a plan says (on every rank).

    Args:
        max_slots: the most rows decoded at once (``max_batch_size``).
        max_seq_len: a row's most positions.
        blocks: the pool's block manager (used on rank 0 only).
        admission: "continuous" or "static".
    """

    def __init__(self, max_slots: int, max_seq_len: int, blocks: BlockManager, admission: str = "continuous"):
        if admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {admission!r}")
        self.max_slots, self.max_seq_len, self.blocks, self.admission = max_slots, max_seq_len, blocks, admission
        self.running: List[Row] = []  # the rows holding a slot (``Row.slot``), in the order they were admitted
        self.waiting: Deque[Request] = deque()
        self.preempted: Deque[Row] = deque()  # rows that gave their blocks back, first to resume first
        self.arrived = threading.Condition()  # guards ``waiting``; notified by each submission
        self.preemptions = 0  # rows preempted since the start

    @property
    def decoding(self) -> List[Row]:
        """The running rows whose prefill is in the cache, oldest first."""
        return [row for row in self.running if row.decoding]

    @property
    def prefilling(self) -> List[Row]:
        """The running rows whose prefill is not all in the cache yet, oldest first."""
        return [row for row in self.running if not row.decoding]

    def held(self) -> Dict[int, Row]:
        """Each held slot's row."""
        return {row.slot: row for row in self.running}

    def check_pool(self, prompt_tokens: List[List[int]], n: int, what: str, kv_cache_tokens: int) -> None:
        """The request's rows' prompts must fit the KV cache pool together: they are admitted at once."""
        blocks = n * sum(self.blocks.blocks_for(len(tokens)) for tokens in prompt_tokens)
        if blocks > self.blocks.capacity:
            raise ValueError(
                f"{what}: {n * len(prompt_tokens)} row(s) of {sum(len(t) for t in prompt_tokens) * n} prompt tokens in all need {blocks} blocks "
                f"of {self.blocks.block_size} tokens, but the KV cache pool holds {self.blocks.capacity} (kv_cache_tokens={kv_cache_tokens})"
            )

    # --- rank 0's plan ----------------------------------------------------------------------------

    def plan(self) -> StepPlan:
        """Rank 0's decisions for this step: the rows cancelled, the waiting requests withdrawn, the
        blocks the decoding rows write into (preempting when the pool has none), the admissions."""
        plan = StepPlan("step")
        with self.arrived:
            for row in self.running:
                if row.index in row.request.cancelled:
                    plan.cancellations.append(row.slot)
                    self.release(row)
            for request in self.waiting:
                if len(request.cancelled) == request.n_rows:
                    plan.withdrawn.append(request.id)
            plan.dropped = [(row.request.id, row.index) for row in self.preempted if row.index in row.request.cancelled]
            self.plan_growth(plan)
            held = {row.slot for row in self.running} - set(plan.cancellations)
            free = [slot for slot in range(self.max_slots) if slot not in held]
            if not plan.preemptions and (self.admission == "continuous" or len(free) == self.max_slots):
                self.plan_admissions(plan, free)
        return plan

    def plan_growth(self, plan: StepPlan) -> None:
        """Blocks for every position the decoding rows write this step, oldest row first; when the pool
        has none, the newest running row gives its blocks back (``preemptions``), or, alone, the row
        ends (``exhausted``)."""
        gone = set(plan.cancellations)
        decoding = [row for row in self.decoding if row.slot not in gone]
        k = max((row.options.speculate_k for row in decoding if row.options.speculate), default=0)
        for row in decoding:
            if row.slot in gone:
                continue
            had = len(row.table.blocks)
            while not self.blocks.grow(row.table, min(row.position + 1 + k, self.max_seq_len)):
                victims = [other for other in self.running if other.slot not in gone]
                if victims == [row]:
                    plan.exhausted.append(row.slot)
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
        for row in self.preempted:
            if (row.request.id, row.index) in plan.dropped:
                continue
            if not free or not self.allocate(row, free[0], plan):
                return
            plan.resumptions.append((row.request.id, row.index, free.pop(0)))
        for request in self.waiting:
            if request.id in plan.withdrawn:
                continue
            if request.n_rows > len(free):
                return
            slots = free[: request.n_rows]
            if not all(self.allocate(row, slot, plan) for row, slot in zip(request.rows, slots)):
                for row, slot in zip(request.rows, slots):
                    self.blocks.release(row.table)
                    plan.tables.pop(slot, None)
                return
            free = free[request.n_rows :]
            plan.admissions.append((request.id, request.prompt_tokens, request.options, request.stream_text, slots))

    def allocate(self, row: Row, slot: int, plan: StepPlan) -> bool:
        """The row's blocks for its prefill (its cached prefix taken: none for a prompt to be scored,
        which needs every position's logits), into ``plan``; False if the pool cannot give them."""
        scored = row.options.echo and row.options.logprobs and not row.tokens
        taken = self.blocks.allocate([] if scored else row.target, len(row.target))
        if taken is None:
            return False
        row.table, plan.cached[slot] = taken
        plan.tables[slot] = list(row.table.blocks)
        return True

    def release(self, row: Row) -> None:
        """Rank 0: the row's written full blocks join the prefix cache, and all its blocks go back."""
        self.blocks.register(row.table, row.sequence, row.written)
        self.blocks.release(row.table)

    def register_written(self) -> None:
        """Rank 0: the full blocks the running rows wrote join the prefix cache."""
        for row in self.running:
            self.blocks.register(row.table, row.sequence, row.written)

    # --- every rank, as the plan says -------------------------------------------------------------

    def take(self, taken: set) -> Dict[int, Request]:
        """The waiting requests whose ids are in ``taken`` (admitted or withdrawn), out of the queue."""
        with self.arrived:
            waiting = {request.id: request for request in self.waiting if request.id in taken}
            self.waiting = deque(request for request in self.waiting if request.id not in taken)
        return waiting

    def take_slot(self, row: Row, slot: int) -> None:
        row.slot = slot
        self.running.append(row)

    def vacate(self, row: Row, moves: Moves) -> None:
        """The row leaves its slot and gives its blocks back (rank 0's written full ones join the prefix cache)."""
        self.release(row)
        moves.vacated.append(row.slot)
        self.running.remove(row)
        row.slot = None

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

    def preempt(self, row: Row) -> Moves:
        """The row leaves its slot for the front of the queue; when it resumes, its prefill is its
        prompt and what it generated but the last token, the next decode step's input."""
        self.preemptions += 1
        moves = Moves()
        self.vacate(row, moves)
        if row.tokens:
            row.target = row.sequence[: row.position]
        else:
            row.prompt_logprobs = [0.0]  # scored again from the start
        row.prefilled = 0
        self.preempted.appendleft(row)
        return moves

    def resume(self, request_id: int, index: int) -> Row:
        """The first preempted row, which the plan names."""
        row = self.preempted.popleft()
        if (row.request.id, row.index) != (request_id, index):
            raise RuntimeError(f"rank 0 resumes request {request_id} row {index}, this rank's queue has request "
                               f"{row.request.id} row {row.index}")
        return row

    def drop(self, dropped: List[Tuple[int, int]]) -> List[Row]:
        """The preempted rows ``dropped`` names."""
        return [row for row in self.preempted if (row.request.id, row.index) in dropped]

    def requests(self) -> set:
        """Every request holding a slot or a preempted row."""
        return {row.request for row in self.running} | {row.request for row in self.preempted}
