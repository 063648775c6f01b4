"""Speculative decoding: propose k tokens per row cheaply, check them all in one pass of the model,
keep the longest prefix the model agrees with plus one token of its own.

Decoding one token reads every weight once; a pass over k+1 tokens reads them once too and costs
little more. Each step feeds every row's last token and its k proposals at their own positions
(static shapes: k+1 tokens per row), and the (bsz, k+1, vocab) logits say what the model would have
chosen at each. Rows accept different counts; each advances by its own, and the cache entries of
rejected proposals are simply overwritten by the next step (positions say where each row is).

Two proposers:
- ``PromptLookup``: the tokens that followed the latest earlier occurrence of the row's last n
  tokens (n = 3, 2, 1), in its prompt or its output so far. No second model; pays on text that
  repeats its context (code edits, summaries, quoting).
- ``DraftProposer``: k steps of a smaller model with the same vocabulary, on its own KV cache.

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
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from llama.decoding import DecodeStep, Decoding, prefill
from llama.model import Transformer
from llama.parallel import broadcast_from_rank0
from llama.sampling import Sampler

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


class Proposer:
    """What the speculative loop asks of a proposer, and what it tells it: ``accepted[row]`` lists
    how many of the row's k proposals each step accepted (for the benchmarks' acceptance rates)."""

    def __init__(self, k: int):
        self.k = k
        self.accepted: List[List[int]] = []

    def start(self, state: Decoding) -> None:
        """A new batch: its prompts are in ``state.tokens``."""
        self.accepted = [[] for _ in state.prompt_lens]

    def extend(self, row: int, tokens: List[int]) -> None:
        """``row`` emitted ``tokens`` this step."""

    def propose(self, state: Decoding, lengths: List[int], live: List[bool]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(bsz, k) proposals for the tokens after each row's ``lengths[row]`` tokens, on the
        device, and the distributions they were drawn from (bsz, k, vocab), None for point masses."""
        raise NotImplementedError


class PromptLookup(Proposer):
    """Proposes each row's next k tokens from its own prompt and output (``NgramIndex``); a row with
    no match proposes its last token k times (any proposal is correct, a useless one is rejected)."""

    def start(self, state: Decoding) -> None:
        super().start(state)
        self.rows = [NgramIndex(tokens[:n]) for tokens, n in zip(state.tokens.tolist(), state.prompt_lens)]

    def extend(self, row: int, tokens: List[int]) -> None:
        self.rows[row].extend(tokens)

    def propose(self, state: Decoding, lengths: List[int], live: List[bool]) -> Tuple[torch.Tensor, None]:
        proposals = [
            (index.propose(self.k) or index.tokens[-1:] * self.k) if alive else [0] * self.k
            for index, alive in zip(self.rows, live)
        ]
        return torch.tensor(proposals, dtype=torch.long, device=state.tokens.device), None


class DraftProposer(Proposer):
    """Proposes each row's next k tokens with k decode steps of a draft model, on its own KV cache,
    at the rows' own positions: argmax when greedy, else drawn from the draft's distribution q under
    the same sampling options (returned, for the acceptance rule).

    The draft's cache holds a row's tokens up to the one before its last: each proposal feeds the
    last two tokens (the previous step's last proposal may have been accepted without ever being fed
    to the draft), then one proposal per step. Under model parallelism the draft is split like the
    model, and every rank continues with rank 0's draws.
    """

    def __init__(self, draft_step: DecodeStep, k: int):
        super().__init__(k)
        self.step = draft_step

    def start(self, state: Decoding) -> None:
        """Prefill the draft's cache with every prompt."""
        super().start(state)
        model = self.step.model
        bsz, max_prompt_len = state.tokens.shape[0], max(state.prompt_lens)
        positions = torch.arange(max_prompt_len, device=state.tokens.device).expand(bsz, max_prompt_len)
        prompt_lens = torch.tensor(state.prompt_lens, device=state.tokens.device)
        model.forward_at(state.tokens[:, :max_prompt_len].clamp(min=0), positions, logits_at=prompt_lens - 1, kv_len=max_prompt_len)

    def propose(self, state: Decoding, lengths: List[int], live: List[bool]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        grid, sampler, max_seq_len = state.tokens, state.sampler, self.step.model.params.max_seq_len
        rows = torch.arange(grid.shape[0], device=grid.device)
        starts = torch.tensor(lengths, device=grid.device) - 2  # (bsz,) every row has a prompt and one token
        positions = starts[:, None] + torch.arange(2, device=grid.device)  # (bsz, 2)
        logits = self.step.chunk(grid[rows[:, None], positions], positions, kv_len=max(lengths))[:, -1]
        proposals, draft_probs = [], []
        for i in range(self.k):
            if i > 0:
                position = (starts + i + 1).clamp(max=max_seq_len - 1)
                logits = self.step(proposals[-1], position, kv_len=min(max(lengths) + i, max_seq_len))
            if sampler.temperature == 0:
                proposal = sampler.penalised(logits, grid).argmax(dim=-1)
            else:
                draft_probs.append(sampler.distribution(logits, grid))
                proposal = sampler.draw(draft_probs[-1], live)
            proposals.append(broadcast_from_rank0(proposal))
        return torch.stack(proposals, dim=1), torch.stack(draft_probs, dim=1) if draft_probs else None


def accept_greedy(choices: torch.Tensor, proposals: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification.

    Args:
        choices: (bsz, k+1) the model's argmax at each verified position (position i predicts the
            token after proposal i; position 0 the token after the row's last one).
        proposals: (bsz, k) the proposed tokens.

    Returns:
        (accepted, tokens): (bsz,) how many proposals each row accepts (the longest prefix equal to
        the model's choices), and (bsz, k+1) tokens of which each row emits the first accepted + 1:
        the accepted proposals and the model's own next token.
    """
    k = proposals.shape[1]
    accepted = (proposals == choices[:, :k]).long().cumprod(dim=1).sum(dim=1)
    return accepted, choices


def accept_sampled(
    probs: torch.Tensor,
    proposals: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    uniforms: torch.Tensor,
    draw: Callable[[torch.Tensor], torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sampled verification: the rejection rule that makes the emitted tokens distributed as the model's.

    Args:
        probs: (bsz, k+1, vocab) p, the model's sampling distribution at each verified position.
        proposals: (bsz, k) the proposed tokens.
        draft_probs: (bsz, k, vocab) q, the distributions the proposals were drawn from; None for a
            point mass on each proposal (prompt lookup).
        uniforms: (bsz, k) uniform numbers in [0, 1), one per proposal.
        draw: one token per row from (bsz, vocab) probabilities, (bsz,).

    Returns:
        (accepted, tokens) as ``accept_greedy``: proposal i is accepted with probability
        min(1, p(d)/q(d)) while all before it were; the token after the accepted ones is drawn from
        max(p - q, 0) renormalised at the first rejected position, or from p when all were accepted.
    """
    bsz, k = proposals.shape
    p_proposed = probs[:, :k].gather(-1, proposals[..., None])[..., 0]  # (bsz, k)
    if draft_probs is None:  # q(d) = 1: accept with probability p(d); the residual is p without d
        q_proposed = torch.ones_like(p_proposed)
        residual = probs[:, :k].scatter(-1, proposals[..., None], 0.0)
    else:
        q_proposed = draft_probs.gather(-1, proposals[..., None])[..., 0]
        residual = (probs[:, :k] - draft_probs).clamp(min=0)
    accepted = (uniforms * q_proposed < p_proposed).long().cumprod(dim=1).sum(dim=1)  # u < p/q, without dividing
    residual = torch.cat([residual, probs[:, k:]], dim=1)  # (bsz, k+1, vocab): all accepted, p itself
    rows = torch.arange(bsz, device=probs.device)
    chosen, fallback = residual[rows, accepted], probs[rows, accepted]  # (bsz, vocab)
    mass = chosen.sum(dim=-1, keepdim=True)
    chosen = torch.where(mass > 0, chosen / mass.clamp(min=torch.finfo(mass.dtype).tiny), fallback)  # p == q: never rejected
    tokens = F.pad(proposals, (0, 1)).scatter(1, accepted[:, None], draw(chosen)[:, None])
    return accepted, tokens


def previous_tokens(grid: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
    """What the repetition penalty sees at each verified position: the row's tokens and the proposals
    before that position. grid: (bsz, n), PAD after each row's tokens; returns (bsz * (k+1), n + k)."""
    bsz, k = proposals.shape
    before = torch.arange(k, device=grid.device) < torch.arange(k + 1, device=grid.device)[:, None]  # (k+1, k)
    seen = torch.where(before, proposals[:, None, :], -1)  # (bsz, k+1, k)
    return torch.cat([grid[:, None].expand(bsz, k + 1, grid.shape[1]), seen], dim=-1).flatten(0, 1)


def verify(
    logits: torch.Tensor, proposals: torch.Tensor, draft_probs: Optional[torch.Tensor], sampler: Sampler, grid: torch.Tensor, live: List[bool]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each row's accepted count and tokens (``accept_greedy``, ``accept_sampled``) from the model's
    logits (bsz, k+1, vocab) at the row's last token and its k proposals; ``grid`` holds each row's
    tokens so far (for the repetition penalty); only ``live`` rows draw from their generators."""
    bsz, n, vocab = logits.shape
    seen = previous_tokens(grid, proposals) if sampler.repetition_penalty != 1.0 else grid  # read only with a penalty
    if sampler.temperature == 0:
        return accept_greedy(sampler.penalised(logits.flatten(0, 1), seen).argmax(dim=-1).view(bsz, n), proposals)
    probs = sampler.distribution(logits.flatten(0, 1), seen).view(bsz, n, vocab)
    uniforms = sampler.uniform(bsz, n - 1, logits.device, live)
    return accept_sampled(probs, proposals, draft_probs, uniforms, lambda p: sampler.draw(p, live))


@torch.no_grad()  # not inference_mode: torch.compile cannot take inference tensors as inputs
def speculative_steps(model: Transformer, verify_step: DecodeStep, state: Decoding, proposer: Proposer) -> Iterator[int]:
    """The decoding loop of ``llama.decoding.decode_steps``, k+1 tokens a step: after the prefill
    (whose logits give each row's first token), each step verifies every row's last token and its k
    proposals (``proposer``: ``PromptLookup`` or ``DraftProposer``) in one pass at the row's own
    positions, and emits 1 to k+1 tokens per row, stopping a row exactly where plain decoding would
    (stop token, stop string, max_gen_len, cancel). Yields the step's index after each step.
    """
    tokens, bsz, k = state.tokens, state.tokens.shape[0], proposer.k
    if bsz == 0 or (not any(state.live) and state.token_logprobs is None):
        return
    device, max_seq_len = tokens.device, model.params.max_seq_len
    rows = torch.arange(bsz, device=device)
    lengths = list(state.prompt_lens)  # each row's tokens so far; its last one is not in the cache yet
    logits = prefill(model, state)[:, None]  # (bsz, 1, vocab): a step of no proposals
    proposer.start(state)
    proposals, draft_probs = torch.empty(bsz, 0, dtype=torch.long, device=device), None
    for step in itertools.count():
        live = state.live
        if not any(live):
            return
        cancel_flags = state.cancel_flags(device)
        if step > 0:
            proposals, draft_probs = proposer.propose(state, lengths, live)  # (bsz, k)
            starts = torch.tensor(lengths, device=device) - 1
            positions = (starts[:, None] + torch.arange(k + 1, device=device)).clamp(max=max_seq_len - 1)  # (bsz, k+1)
            chunk = torch.cat([tokens[rows, starts][:, None], proposals], dim=1)
            logits = verify_step.chunk(chunk, positions, kv_len=min(max(lengths) + k, max_seq_len))
        accepted, chosen = verify(logits, proposals, draft_probs, state.sampler, tokens, live)
        message = broadcast_from_rank0(torch.cat([chosen, accepted[:, None], cancel_flags[:, None]], dim=1))  # (bsz, n+2)
        record_step(state, logits, message, lengths, live, proposer)  # the step's one wait on the device
        yield step


def record_step(state: Decoding, logits: torch.Tensor, message: torch.Tensor, lengths: List[int], live: List[bool], proposer: Proposer) -> None:
    """Take each live row's emitted tokens up to where it ends, write them into the grid with their
    logprobs (from the model's ``logits``, (bsz, n, vocab)), and advance ``lengths``.

    message: (bsz, n+2) rank 0's tokens, accepted count and cancel flag per row."""
    taken_rows, taken_positions, taken_indices = [], [], []
    for row, (*chosen, accepted, cancel) in enumerate(message.tolist()):
        if not live[row]:
            continue
        if cancel:
            state.record_token(row, lengths[row], 0, cancel=True)
            continue
        taken = []
        for token in chosen[: accepted + 1]:
            taken.append(token)
            if state.record_token(row, lengths[row] + len(taken) - 1, token):
                break
        taken_rows += [row] * len(taken)
        taken_positions += range(lengths[row], lengths[row] + len(taken))
        taken_indices += range(len(taken))
        proposer.extend(row, taken)
        if len(chosen) > 1:  # not the prefill's step, which proposes nothing
            proposer.accepted[row].append(accepted)
        lengths[row] += len(taken)
    if not taken_rows:
        return
    device = message.device
    rows, positions, indices = (torch.tensor(x, device=device) for x in (taken_rows, taken_positions, taken_indices))
    written, scored = message[rows, indices], logits[rows, indices]  # (n_taken,), (n_taken, vocab)
    state.tokens[rows, positions] = written
    if state.token_logprobs is not None:
        state.token_logprobs[rows, positions] = -F.cross_entropy(scored, written, reduction="none")
    if state.top_ids is not None:
        alternatives = torch.log_softmax(scored, dim=-1).topk(state.top_ids.shape[-1], dim=-1)
        state.top_logprobs[rows, positions], state.top_ids[rows, positions] = alternatives.values, alternatives.indices
