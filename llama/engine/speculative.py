"""Speculative decoding: propose k tokens per row cheaply, check them all in one pass of the model,
keep the longest prefix the model agrees with plus one token of its own.

Decoding one token reads every weight once; a pass over k+1 tokens reads them once too and costs
little more. Each step feeds every row's last token and its k proposals at their own positions
(static shapes: k+1 tokens per row), and the (bsz, k+1, vocab) logits say what the model would have
chosen at each. Rows accept different counts; each advances by its own, and the cache entries of
rejected proposals are simply overwritten by the next step (positions say where each row is).

Two proposers (``llama.engine`` runs them, per row):
- prompt lookup (``NgramIndex``): the tokens that followed the latest earlier occurrence of the
  row's last n tokens (n = 3, 2, 1), in its prompt or its output so far. No second model; pays on
  text that repeats its context (code edits, summaries, quoting).
- a draft model: k steps of a smaller model with the same vocabulary, on its own KV cache.

The acceptance rule keeps the output the model's own:
- greedy: a proposal is accepted while it equals the model's argmax, and the argmax after the last
  accepted one is appended (the bonus token when all k are accepted): the tokens of plain greedy
  decoding, exactly.
- sampling: proposal d drawn from q is accepted with probability min(1, p(d)/q(d)); the first
  rejected one is replaced by a draw from max(p - q, 0), renormalised; all accepted, the next token
  is drawn from p (Leviathan et al. 2023, Chen et al. 2023). Each emitted token is distributed as
  plain sampling's. For prompt lookup q is a point mass on the proposed token.
"""

import itertools
import logging
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from llama.engine.requests import Row, Sampled
from llama.engine.runner import Features, Runner, pack, power_of_two_at_least, unpack
from llama.engine.sampling import (
    WORD,
    RowSettings,
    apply_penalties,
    distribution,
    global_exponentials,
    mix,
    sample,
    seeded_exponentials,
)
from llama.layers.kv_cache import BlockTables, attended_tables
from llama.layers.parallel import broadcast_from_rank0

logger = logging.getLogger(__name__)

LOOKUP_NGRAMS = (3, 2, 1)  # the n-gram lengths prompt lookup matches, longest first


class NgramIndex:
    """One row's tokens and, for each n-gram of them, where the tokens after its latest occurrence start.

    Indexing is incremental: each token added is indexed once, so a proposal costs a few dictionary
    look-ups however long the row.
    """

    def __init__(self, tokens: List[int], ngrams=LOOKUP_NGRAMS):
        self.tokens: List[int] = []
        self.ngrams = ngrams
        self.continuations: Dict[Tuple[int, ...], int] = {}  # n-gram -> index of the token after it
        self.indexed = 0  # n-grams ending before this index are in ``continuations``
        self.extend(tokens)

    def extend(self, tokens: List[int]) -> None:
        self.tokens += tokens

    def propose(self, k: int) -> List[int]:
        """The k tokens after the latest earlier occurrence of the longest matching n-gram that ends
        the row, continued periodically where they run into the row's end (a repeating pattern goes on
        repeating); [] when none of its last n-grams occurred before."""
        tokens = self.tokens
        for end in range(self.indexed, len(tokens) - 1):  # only n-grams whose next token is known
            for n in self.ngrams:
                if end + 1 >= n:
                    self.continuations[tuple(tokens[end + 1 - n : end + 1])] = end + 1
        self.indexed = max(self.indexed, len(tokens) - 1)
        for n in self.ngrams:
            start = self.continuations.get(tuple(tokens[-n:])) if len(tokens) >= n else None
            if start is not None:
                period = len(tokens) - start
                proposal: List[int] = []
                for i in range(k):
                    proposal.append(tokens[start + i] if i < period else proposal[i - period])
                return proposal
        return []


def accepted_prefix(ok: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """How many proposals each row accepts: the leading run of ``ok`` (bsz, k), at most ``limits`` (bsz,)."""
    allowed = torch.arange(ok.shape[1], device=ok.device) < limits[:, None]
    return (ok & allowed).long().cumprod(dim=1).sum(dim=1)


def accept_greedy(
    choices: torch.Tensor, proposals: torch.Tensor, limits: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification.

    Args:
        choices: (bsz, k+1) the model's argmax at each verified position (position i predicts the
            token after proposal i; position 0 the token after the row's last one).
        proposals: (bsz, k) the proposed tokens.
        limits: (bsz,) how many proposals each row may accept (0: a row that does not speculate).

    Returns:
        (accepted, tokens): (bsz,) how many proposals each row accepts (the longest prefix equal to
        the model's choices), and (bsz, k+1) tokens of which each row emits the first accepted + 1:
        the accepted proposals and the model's own next token.
    """
    return accepted_prefix(proposals == choices[:, :-1], limits), choices


def accept_sampled(
    probs: torch.Tensor,
    proposals: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    limits: torch.Tensor,
    uniforms: torch.Tensor,
    draw: Callable[[torch.Tensor], torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sampled verification: the rejection rule that makes the emitted tokens distributed as the model's.

    Args:
        probs: (bsz, k+1, vocab) p, the model's sampling distribution at each verified position.
        proposals: (bsz, k) the proposed tokens.
        draft_probs: (bsz, k, vocab) q, the distributions the proposals were drawn from; None for a
            point mass on each proposal (prompt lookup).
        limits: (bsz,) how many proposals each row may accept.
        uniforms: (bsz, k) uniform numbers in [0, 1), one per proposal.
        draw: one token per row from (bsz, vocab) probabilities, (bsz,).

    Returns:
        (accepted, tokens) as ``accept_greedy``: proposal i is accepted with probability
        min(1, p(d)/q(d)) while all before it were; the token after the accepted ones is drawn from
        max(p - q, 0) renormalised at the first rejected position, or from p when the row accepted
        all it may.
    """
    bsz, k = proposals.shape
    p_proposed = probs[:, :k].gather(-1, proposals[..., None])[..., 0]  # (bsz, k)
    if draft_probs is None:  # q(d) = 1: accept with probability p(d); the residual is p without d
        q_proposed = torch.ones_like(p_proposed)
        residual = probs[:, :k].scatter(-1, proposals[..., None], 0.0)
    else:
        q_proposed = draft_probs.gather(-1, proposals[..., None])[..., 0]
        residual = (probs[:, :k] - draft_probs).clamp(min=0)
    accepted = accepted_prefix(uniforms * q_proposed < p_proposed, limits)  # u < p/q, without dividing
    rows = torch.arange(bsz, device=probs.device)
    model = probs[rows, accepted]  # (bsz, vocab)
    rejected = residual[rows, accepted.clamp(max=k - 1)] if k else model
    mass = rejected.sum(dim=-1, keepdim=True)
    rejected = torch.where(
        mass > 0, rejected / mass.clamp(min=torch.finfo(mass.dtype).tiny), model
    )  # p == q: never rejected
    chosen = torch.where((accepted < limits)[:, None], rejected, model)
    tokens = F.pad(proposals, (0, 1)).scatter(1, accepted[:, None], draw(chosen)[:, None])
    return accepted, tokens


def history_per_position(
    seen: torch.Tensor, counts: torch.Tensor, proposals: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """What the penalties see at each verified position: the row's history and the proposals before
    the position. seen (bsz, vocab) bool, counts (bsz, vocab); returns (bsz * (k+1), vocab) each."""
    proposed = F.one_hot(proposals, seen.shape[-1]).to(counts.dtype).cumsum(dim=1)  # (bsz, k, vocab)
    before = torch.cat([torch.zeros_like(proposed[:, :1]), proposed], dim=1)  # (bsz, k+1, vocab)
    return (seen[:, None] | (before > 0)).flatten(0, 1), (counts[:, None] + before).flatten(0, 1)


def step_keys(settings: RowSettings, steps: torch.Tensor, purpose: int) -> torch.Tensor:
    """A seeded row's key for one speculative step's draws of one ``purpose`` (acceptance, the
    token after, the draft's i-th proposal): a function of the row's seed, how many speculative
    steps it took before (so a position revisited after a rejection draws afresh), and the purpose."""
    return mix((settings.seed_key ^ mix((steps * 64 + purpose) & WORD)) & WORD)


def exponentials(
    settings: RowSettings, keys: torch.Tensor, positions: torch.Tensor, needs: List[bool], n: int
) -> torch.Tensor:
    """(rows, n) Exp(1) draws: a seeded row's from its ``keys`` and ``positions``, the others' from
    torch's global RNG (``needs``: the rows that draw)."""
    noise = global_exponentials(needs, n).to(keys.device)
    return torch.where(settings.seeded[:, None], seeded_exponentials(keys, positions, n), noise)


def penalised_per_position(
    logits: torch.Tensor, settings: RowSettings, seen: torch.Tensor, counts: torch.Tensor, proposals: torch.Tensor
) -> torch.Tensor:
    """The penalised logits (bsz, k+1, vocab) of every verified position."""
    bsz, n, vocab = logits.shape
    seen_n, counts_n = history_per_position(seen, counts, proposals)
    index = torch.arange(bsz, device=logits.device).repeat_interleave(n)
    return apply_penalties(logits.flatten(0, 1), settings.rows(index), seen_n, counts_n).view(bsz, n, vocab)


def verify(
    logits: torch.Tensor,
    proposals: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    limits: torch.Tensor,
    settings: RowSettings,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    sampling: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's accepted count and tokens from the model's (penalised) logits (bsz, k+1, vocab) at
    its last token and its k proposals: greedy rows by ``accept_greedy``, sampling rows (when
    ``sampling``) by ``accept_sampled`` with ``uniforms`` (bsz, k) and the draw ``argmax(p / noise)``
    (noise: (bsz, vocab) Exp(1), torch.multinomial's draw)."""
    bsz, n, vocab = logits.shape
    accepted, tokens = accept_greedy(logits.argmax(dim=-1), proposals, limits)
    if not sampling:
        return accepted, tokens
    index = torch.arange(bsz, device=logits.device).repeat_interleave(n)
    probs = distribution(logits.flatten(0, 1), settings.rows(index)).view(bsz, n, vocab)
    sampled_accepted, sampled_tokens = accept_sampled(
        probs, proposals, draft_probs, limits, uniforms, lambda p: torch.argmax(p / noise, dim=-1)
    )
    sampled = settings.temperature > 0
    return torch.where(sampled, sampled_accepted, accepted), torch.where(sampled[:, None], sampled_tokens, tokens)


class ChunkForward:
    """The model's cached forward over (width, n) tokens at their positions, attending over a
    power-of-two bucket of the cache: a verification pass (n = k+1) or a draft's step. With
    ``compile``, one graph per width and n serves every length (``attended_tables``)."""

    def __init__(self, model, compile: bool = False, name: str = "verification pass"):
        self.model = model
        self.name = name
        self.compiled = None
        self.compile_seconds: Optional[float] = None  # the first compiled pass, compilation included
        if compile:
            mode = "reduce-overhead" if model.output.weight.device.type == "cuda" else None
            self.compiled = torch.compile(self.forward, mode=mode, dynamic=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, positions=positions, cache=BlockTables(tables))

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, block_table: torch.Tensor, kv_len: int
    ) -> torch.Tensor:
        """Logits (width, n, vocab); ``block_table``: the rows' blocks (width, blocks_per_row);
        ``kv_len``: more than every position."""
        block_size = self.model.layers[0].attention.kv_cache.cache_k.shape[2]
        tables = attended_tables(block_table, kv_len, block_size, bucketed=self.compiled is not None)
        if self.compiled is None:
            return self.forward(tokens, positions, tables)
        start = time.perf_counter()
        logits = self.compiled(tokens, positions, tables)
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - start
            logger.info("compiled the %s in %.1f s", self.name, self.compile_seconds)
        return logits


class Speculator:
    """Speculative decoding's steps on the runner's slots: each speculating row's k proposals (prompt
    lookup or the draft) verified in one pass of the model, and the slots advanced by what the rows
    accepted. The draft's cache is filled by the runner's prefill, in the same block tables.

    Args:
        runner: the slots' state on the device, and the model (and the draft).
        compile: compile the verification pass and the draft's step (``ChunkForward``).
    """

    def __init__(self, runner: Runner, compile: bool = False):
        self.runner = runner
        self.verify_forward = ChunkForward(runner.model, compile)  # k+1 tokens per row
        self.draft_forward = ChunkForward(runner.draft, compile, "draft's step") if runner.draft is not None else None

    def warm_up(self, widths: List[int], lengths: List[int], speculate_k: int) -> None:
        """Compile the passes for ``speculate_k`` proposals (the model's over k + 1 tokens, the draft's
        over 2 and 1) for each width and attended length, on idle slots (tokens 0 at position 0, in
        their scratch block)."""
        chunks = [(self.verify_forward, speculate_k + 1)]
        if self.draft_forward is not None:
            chunks += [(self.draft_forward, 2), (self.draft_forward, 1)]
        for width, kv_len, _ in itertools.product(widths, lengths, range(self.runner.graph_calls())):
            for forward, n in chunks:
                tokens, positions = (
                    torch.zeros(width, n, dtype=torch.long, device=self.runner.device) for _ in range(2)
                )
                with self.runner.adapters_for(slice(0, width), [], compiled=True):
                    forward(tokens, positions, self.runner.block_tables[:width], kv_len).sum().item()

    def step_settings(self, rows: List[Row], width: int):
        """The step's k (the most proposals a row asks for) and, per slot of the first ``width``: how many
        proposals it verifies (0: it does not speculate), its speculative steps so far (they seed its
        draws), and whether it draws from the global RNG. Counts the step in each row."""
        k = max(row.options.speculate_k for row in rows if row.options.speculate)
        limits, steps = torch.zeros(width, dtype=torch.long), torch.zeros(width, dtype=torch.long)
        needs = [False] * width
        for row in rows:
            o = row.options
            limits[row.slot] = o.speculate_k if o.speculate else 0
            steps[row.slot], row.speculative_steps = row.speculative_steps, row.speculative_steps + 1
            needs[row.slot] = o.temperature > 0 and o.seed is None
        return k, limits.to(self.runner.device), steps.to(self.runner.device), needs

    def speculate(self, rows: List[Row]) -> List[List[Sampled]]:
        """One speculative step for the decoding rows: each speculating row's k proposals (prompt
        lookup or the draft) are verified with its last token in one pass over the first ``width``
        slots at their own positions. A row that does not speculate accepts nothing and takes the
        token ``sample`` chooses, as in a plain step. Returns each row's accepted proposals and one
        token of the model's, which it records one by one, stopping exactly where decoding one token
        per step would; then ``advance`` the slots by what the rows took."""
        params = self.runner.model.params
        width = max(row.slot for row in rows) + 1
        if self.runner.compiled is not None:  # as the decode step: a power of two of slots
            width = min(power_of_two_at_least(width), self.runner.max_slots)
        k, limits, steps, needs = self.step_settings(rows, width)
        features, settings, last = (
            self.runner.features(rows),
            self.runner.settings.rows(slice(0, width)),
            self.runner.positions[:width],
        )
        proposals, draft_probs = self.propose(rows, width, k, settings, steps, needs, features)  # (width, k)
        positions = (last[:, None] + torch.arange(k + 1, device=self.runner.device)).clamp(
            max=params.max_seq_len - 1
        )  # (width, k+1)
        chunk = torch.cat([self.runner.tokens[:width, None], proposals], dim=1)
        with self.runner.adapters_for(slice(0, width), rows, compiled=self.verify_forward.compiled is not None):
            logits = self.verify_forward(
                chunk, positions, self.runner.block_tables[:width], kv_len=max(row.position for row in rows) + k + 1
            )  # (width, k+1, vocab)
        penalised = (
            penalised_per_position(logits, settings, self.runner.seen[:width], self.runner.counts[:width], proposals)
            if features.penalties
            else logits
        )
        uniforms = noise = None
        if features.sampling:
            uniforms = torch.exp(-exponentials(settings, step_keys(settings, steps, 0), last, needs, k))
            noise = exponentials(settings, step_keys(settings, steps, 1), last, needs, params.vocab_size)
        accepted, chosen = verify(
            penalised, proposals, draft_probs, limits, settings, uniforms, noise, features.sampling
        )
        if features.sampling:  # a row that does not speculate draws as in a plain step
            plain = sample(
                penalised[:, 0],
                settings,
                last + 1,
                global_exponentials(needs, params.vocab_size).to(self.runner.device),
            )
            chosen[:, 0] = torch.where(limits > 0, chosen[:, 0], plain)
        chosen = broadcast_from_rank0(torch.cat([chosen, accepted[:, None]], dim=1), self.runner.group)
        accepted, chosen = chosen[:, -1], chosen[:, :-1]
        packed = torch.stack(
            [pack(logits[:, i], chosen[:, i], features, settings.logprob_scale) for i in range(k + 1)], dim=1
        )  # (width, k+1, columns)
        values = torch.cat([accepted.double()[:, None], packed.flatten(1)], dim=1).tolist()  # the step's one wait
        sampled = []
        for row in rows:  # per slot: the accepted count, then ``pack``'s columns for each verified position
            accepted, *columns = values[row.slot]
            size = len(columns) // (k + 1)
            row.accepted += int(accepted)
            emitted = [columns[i * size : (i + 1) * size] for i in range(int(accepted) + 1)]
            sampled.append([unpack(value, features, row.options) for value in emitted])
        return sampled

    def advance(self, taken: List[Tuple[Row, int, List[int]]]) -> None:
        """After a speculative step, from what each row took (the row, its slot, the tokens it recorded):
        the tokens are seen and counted, and the last becomes the slot's next input, at the row's position."""
        emitted = [(slot, token) for _, slot, tokens in taken for token in tokens]
        lasts = [(slot, tokens[-1], row.position) for row, slot, tokens in taken]
        slots, tokens = (torch.tensor(column, device=self.runner.device) for column in zip(*emitted))
        self.runner.seen[slots, tokens] = True
        self.runner.counts.index_put_(
            (slots, tokens), torch.ones_like(tokens, dtype=self.runner.counts.dtype), accumulate=True
        )
        index, last_tokens, positions = (torch.tensor(column, device=self.runner.device) for column in zip(*lasts))
        self.runner.tokens[index], self.runner.positions[index] = last_tokens, positions

    def propose(
        self,
        rows: List[Row],
        width: int,
        k: int,
        settings: RowSettings,
        steps: torch.Tensor,
        needs: List[bool],
        features: Features,
    ):
        """(width, k) proposals for the first ``width`` slots (0 where none) and, when a draft row
        samples, the distributions q they were drawn from (width, k, vocab): a point mass for the
        prompt lookup rows."""
        proposals = torch.zeros(width, k, dtype=torch.long)
        drafting = torch.zeros(width, dtype=torch.bool)
        for row in rows:
            speculate = row.options.speculate
            drafting[row.slot] = speculate == "draft"
            if speculate == "lookup":
                sequence = row.sequence
                if row.lookup is None:
                    row.lookup = NgramIndex(sequence)
                row.lookup.extend(sequence[len(row.lookup.tokens) :])
                proposals[row.slot] = torch.tensor(row.lookup.propose(k) or sequence[-1:] * k)
        proposals = proposals.to(self.runner.device)
        if not drafting.any():
            return proposals, None
        drafted, draft_probs = self.draft_proposals(rows, width, k, settings, steps, needs, features)
        drafting = drafting.to(self.runner.device)
        proposals = torch.where(drafting[:, None], drafted, proposals)
        if draft_probs is not None:
            point_masses = F.one_hot(proposals, self.runner.model.params.vocab_size).to(draft_probs.dtype)
            draft_probs = torch.where(drafting[:, None, None], draft_probs, point_masses)
        return proposals, draft_probs

    def draft_proposals(
        self,
        rows: List[Row],
        width: int,
        k: int,
        settings: RowSettings,
        steps: torch.Tensor,
        needs: List[bool],
        features: Features,
    ):
        """k steps of the draft over the first ``width`` slots: argmax for greedy rows, else a draw
        from the draft's distribution under the row's settings. The draft's cache holds a row's
        tokens up to the one before its last: the first step feeds the last two (the previous
        step's last proposal may have been accepted without being fed), then one proposal a step.
        Under torchrun every rank continues with rank 0's draws."""
        max_seq_len, vocab = self.runner.model.params.max_seq_len, self.runner.model.params.vocab_size
        last = self.runner.positions[:width]
        previous = torch.zeros(width, dtype=torch.long)
        decoding = torch.zeros(width, dtype=torch.long)  # idle slots write twice where an idle step may write
        for row in rows:
            previous[row.slot], decoding[row.slot] = row.sequence[-2], 1
        tokens = torch.stack([previous.to(self.runner.device), self.runner.tokens[:width]], dim=1)  # (width, 2)
        positions = torch.stack([last - decoding.to(self.runner.device), last], dim=1)
        max_position = max(row.position for row in rows)
        tables = self.runner.block_tables[:width]
        logits = self.draft_forward(tokens, positions, tables, kv_len=max_position + 1)[:, -1]
        proposals, draft_probs = [], []
        for i in range(k):
            if i > 0:
                position = (last + i).clamp(max=max_seq_len - 1)
                logits = self.draft_forward(
                    proposals[-1][:, None], position[:, None], tables, kv_len=max_position + i + 1
                )[:, 0]
            if features.penalties:
                logits = apply_penalties(logits, settings, self.runner.seen[:width], self.runner.counts[:width])
            proposal = logits.argmax(dim=-1)
            if features.sampling:
                draft_probs.append(distribution(logits, settings))
                drawn = torch.argmax(
                    draft_probs[-1] / exponentials(settings, step_keys(settings, steps, 2 + i), last, needs, vocab),
                    dim=-1,
                )
                proposal = torch.where(settings.temperature > 0, drawn, proposal)
            proposals.append(broadcast_from_rank0(proposal, self.runner.group))
        return torch.stack(proposals, dim=1), torch.stack(draft_probs, dim=1) if draft_probs else None
