"""llama.evaluation.scoring: the log-likelihood of continuations, scored through the KV cache with shared contexts
computed once, equals a plain forward pass over each whole sequence (lm-eval's hf backend's
computation), at the edges: a context shared by several continuations, one-token continuations, a
pair cut to the context, a batch of one and a full batch; is_greedy is true exactly for greedy text."""

import pytest
import torch

from llama.evaluation.scoring import fit_to_context, loglikelihoods

MAX_SEQ_LEN = 24


def reference(model, context, continuation):
    """(logprob, is_greedy) from one forward pass without the cache over the pair, cut as the hf backend cuts it."""
    whole = (context + continuation)[-(MAX_SEQ_LEN + 1) :]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]])), dim=-1)[0, -len(continuation) :]
    targets = torch.tensor(continuation)
    return logprobs.gather(1, targets[:, None]).sum().item(), bool((logprobs.argmax(-1) == targets).all())


@pytest.fixture(scope="module")
def scored(make_llama):
    """(model, requests): shared contexts, one-token continuations, a long pair, a greedy continuation."""
    generator = make_llama(max_seq_len=MAX_SEQ_LEN, max_batch_size=3)
    shared = [1, 40, 41, 42, 43]
    greedy, _ = generator.generate([shared], max_gen_len=4, temperature=0, stop_tokens=[])
    requests = [
        (shared, [50, 51, 52]), ([1, 7], [9]), (shared, [60]), ([1, 8, 9, 10], [11, 12]),
        (shared, greedy[0]), ([1] + list(range(100, 130)), [200, 201, 202]), ([1, 7], [9, 10, 11, 12]),
    ]
    return generator.model, requests


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihoods_equal_a_plain_forward_pass(scored, batch_size):
    model, requests = scored
    answers = loglikelihoods(model, requests, batch_size)
    for (context, continuation), (logprob, greedy) in zip(requests, answers):
        expected_logprob, expected_greedy = reference(model, context, continuation)
        assert logprob == pytest.approx(expected_logprob, rel=1e-5, abs=1e-5)
        assert greedy == expected_greedy


def test_greedy_is_true_for_the_models_own_greedy_tokens_only(scored):
    model, requests = scored
    flags = [greedy for _, greedy in loglikelihoods(model, requests, 3)]
    assert flags[4] and sum(flags) == 1


def test_a_long_pair_loses_its_oldest_context_tokens():
    assert fit_to_context([1, 2, 3, 4, 5], [6, 7], max_seq_len=4) == ([3, 4, 5], [6, 7])
    with pytest.raises(ValueError, match="continuation of 5 tokens does not fit max_seq_len=4"):
        fit_to_context([1], [2, 3, 4, 5, 6], max_seq_len=4)
