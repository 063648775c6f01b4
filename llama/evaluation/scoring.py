"""The log-likelihood of continuations given contexts: what evaluation harnesses ask of a model, scored
by the engine (``Engine.score``), where a context shared by several continuations (the choices of a
multiple-choice question) is computed once, for its whole blocks, and taken from the prefix cache by
the others.

A request is a (context, continuation) pair of token lists. Its answer is (the sum of the
continuation tokens' log-probabilities, whether each continuation token is the model's most likely
one): lm-evaluation-harness's ``(logprob, is_greedy)``. A pair longer than ``max_seq_len + 1`` tokens
loses its oldest context tokens, as lm-evaluation-harness's ``hf`` backend truncates it.

The pairs go to the engine grouped by context, the groups of the longest pairs first: the rows of a
prefill pass are of like lengths (little padding), and a context's continuations follow it closely,
while its blocks are still cached.
"""

from typing import Dict, List, Sequence, Tuple

from llama.engine import Engine

TokenPair = Tuple[List[int], List[int]]


def fit_to_context(context: Sequence[int], continuation: Sequence[int], max_seq_len: int) -> TokenPair:
    """The pair with its oldest context tokens dropped so that context + continuation holds at most
    ``max_seq_len + 1`` tokens (the last token is scored, never fed), as the ``hf`` backend does.

    Raises:
        ValueError: the context or continuation is empty, or the continuation alone does not fit.
    """
    if not context or not continuation:
        raise ValueError(
            f"a request needs a non-empty context and continuation, got {len(context)} and {len(continuation)} token(s)"
        )
    if len(continuation) > max_seq_len:
        raise ValueError(f"a continuation of {len(continuation)} tokens does not fit max_seq_len={max_seq_len}")
    whole = (list(context) + list(continuation))[-(max_seq_len + 1) :]
    return whole[: -len(continuation)], list(continuation)


def grouped_order(pairs: Sequence[TokenPair]) -> List[int]:
    """The pairs' indices grouped by context, the group holding the longest pair first, each group's
    longest pair first."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for index, (context, _) in enumerate(pairs):
        groups.setdefault(tuple(context), []).append(index)
    length = [len(context) + len(continuation) for context, continuation in pairs]
    members = [sorted(indices, key=lambda i: -length[i]) for indices in groups.values()]
    members.sort(key=lambda indices: -length[indices[0]])
    return [index for indices in members for index in indices]


def loglikelihoods(engine: Engine, requests: Sequence[TokenPair]) -> List[Tuple[float, bool]]:
    """(logprob, is_greedy) of each (context, continuation) request, in order (see the module's docstring).

    Args:
        engine: the model's engine; the pairs queue for its slots beside any other request.
        requests: (context tokens, continuation tokens) pairs, both non-empty.

    Returns:
        One (sum of the continuation's log-probabilities, every continuation token the argmax) per request.
    """
    max_seq_len = engine.model.params.max_seq_len
    fitted = [fit_to_context(context, continuation, max_seq_len) for context, continuation in requests]
    order = grouped_order(fitted)
    scores = engine.score([fitted[index] for index in order])
    results: List[Tuple[float, bool]] = [(0.0, False)] * len(fitted)
    for index, (logprobs, greedy) in zip(order, scores):
        results[index] = (sum(logprobs), all(greedy))
    return results
