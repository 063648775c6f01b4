"""The log-likelihood of continuations given contexts: what evaluation harnesses ask of a model, scored
with the model's KV cache so that a context shared by several continuations (the choices of a
multiple-choice question) is computed once.

A request is a (context, continuation) pair of token lists. Its answer is (the sum of the
continuation tokens' log-probabilities, whether each continuation token is the model's most likely
one): lm-evaluation-harness's ``(logprob, is_greedy)``. A pair longer than ``max_seq_len + 1`` tokens
loses its oldest context tokens, as lm-evaluation-harness's ``hf`` backend truncates it.

Requests are grouped by context. A batch takes up to ``max_batch_size`` contexts, longest first, one
per cache row (slot, laid out in the KV cache pool's blocks as a contiguous cache would be): one pass writes them into the cache and gives the distribution of each first
continuation token; then each round feeds, for every context of the batch, one of its continuations
(less its last token) at the positions after the context, overwriting the previous round's, and reads
the distributions of the remaining continuation tokens. Every pass asks the vocabulary projection
only for the positions it scores. A chunk shorter than its batch's longest is padded with copies of
its own last token at its own last position, entries identical to that one, so padding never writes
anything a row could read.
"""

from typing import Dict, List, Sequence, Tuple

import torch

from llama.layers.kv_cache import BlockTables, attended_tables, contiguous_tables
from llama.model import Transformer

TokenPair = Tuple[List[int], List[int]]


def fit_to_context(context: Sequence[int], continuation: Sequence[int], max_seq_len: int) -> TokenPair:
    """The pair with its oldest context tokens dropped so that context + continuation holds at most
    ``max_seq_len + 1`` tokens (the last token is scored, never fed), as the ``hf`` backend does.

    Raises:
        ValueError: the context or continuation is empty, or the continuation alone does not fit.
    """
    if not context or not continuation:
        raise ValueError(f"a request needs a non-empty context and continuation, got {len(context)} and {len(continuation)} token(s)")
    if len(continuation) > max_seq_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_seq_len={max_seq_len}")
    whole = (list(context) + list(continuation))[-(max_seq_len + 1) :]
    return whole[: -len(continuation)], list(continuation)


def padded_chunks(chunks: Sequence[Sequence[int]], starts: Sequence[int], device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tokens, positions), each (len(chunks), longest chunk): chunk b at positions starts[b]...,
    padded with its last token at its last position."""
    width = max(len(chunk) for chunk in chunks)
    tokens = torch.tensor([list(chunk) + [chunk[-1]] * (width - len(chunk)) for chunk in chunks])
    positions = torch.tensor([list(range(start, start + len(chunk))) + [start + len(chunk) - 1] * (width - len(chunk)) for chunk, start in zip(chunks, starts)])
    return tokens.to(device), positions.to(device)


def scored_logits(model: Transformer, chunks: Sequence[Sequence[int]], starts: Sequence[int], slots: Sequence[int], last_only: bool) -> torch.Tensor:
    """Write each chunk into its slot's cache at positions starts[b]... and return float32 log-softmax
    logits: (rows, vocab) of each chunk's last token if ``last_only``, else (rows, width, vocab)."""
    device = model.output.weight.device
    tokens, positions = padded_chunks(chunks, starts, device)
    kv_len = max(start + len(chunk) for chunk, start in zip(chunks, starts))
    block_size = model.layers[0].attention.kv_cache.block_size
    blocks_per_row = -(-model.params.max_seq_len // block_size)
    tables = contiguous_tables(max(slots) + 1, blocks_per_row, device)[torch.tensor(list(slots), device=device)]
    logits_at = torch.tensor([len(chunk) - 1 for chunk in chunks], device=device) if last_only else None
    cache = BlockTables(attended_tables(tables, kv_len, block_size))
    logits = model(tokens, positions=positions, cache=cache, logits_at=logits_at)
    logits = torch.log_softmax(logits, dim=-1)
    return logits[:, 0] if last_only else logits


def continuation_scores(first: torch.Tensor, rest: torch.Tensor, continuation: Sequence[int]) -> Tuple[float, bool]:
    """(logprob, is_greedy) of a continuation from its first token's log-probabilities (vocab,) and
    those of the others (>= len(continuation) - 1, vocab)."""
    logprobs = torch.cat([first[None], rest[: len(continuation) - 1]])  # (len(continuation), vocab)
    targets = torch.tensor(continuation, device=logprobs.device)
    total = logprobs.gather(1, targets[:, None]).sum()
    greedy = bool((logprobs.argmax(dim=-1) == targets).all())
    return float(total), greedy


@torch.no_grad()
def loglikelihoods(model: Transformer, requests: Sequence[TokenPair], batch_size: int) -> List[Tuple[float, bool]]:
    """(logprob, is_greedy) of each (context, continuation) request, in order (see the module's docstring).

    Args:
        model: the model; its cache pool's blocks are written (call it while no generation runs, and
            make the engine forget its cached prefixes after: ``Engine.forget_cached_prefixes``).
        requests: (context tokens, continuation tokens) pairs, both non-empty.
        batch_size: contexts per pass, at most the cache's ``max_batch_size``.

    Returns:
        One (sum of the continuation's log-probabilities, every continuation token the argmax) per request.
    """
    params = model.params
    if not 1 <= batch_size <= params.max_batch_size:
        raise ValueError(f"batch_size must be in [1, max_batch_size={params.max_batch_size}], got {batch_size}")
    fitted = [fit_to_context(context, continuation, params.max_seq_len) for context, continuation in requests]
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for index, (context, _) in enumerate(fitted):
        groups.setdefault(tuple(context), []).append(index)
    contexts = sorted(groups, key=len, reverse=True)
    results: List[Tuple[float, bool]] = [(0.0, False)] * len(fitted)
    for begin in range(0, len(contexts), batch_size):
        batch = contexts[begin : begin + batch_size]
        first = scored_logits(model, batch, [0] * len(batch), range(len(batch)), last_only=True)  # (len(batch), vocab)
        members = [groups[context] for context in batch]
        for round_ in range(max(len(m) for m in members)):
            rows = [(slot, m[round_]) for slot, m in enumerate(members) if round_ < len(m)]
            longer = [(slot, index) for slot, index in rows if len(fitted[index][1]) > 1]
            rest = {}
            if longer:
                chunks = [fitted[index][1][:-1] for _, index in longer]
                starts = [len(batch[slot]) for slot, _ in longer]
                logits = scored_logits(model, chunks, starts, [slot for slot, _ in longer], last_only=False)
                rest = {index: logits[i] for i, (_, index) in enumerate(longer)}
            for slot, index in rows:
                empty = first.new_empty(0, first.shape[-1])
                results[index] = continuation_scores(first[slot], rest.get(index, empty), fitted[index][1])
    return results
