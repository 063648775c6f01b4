"""llama.evaluation.scoring: the log-likelihood of continuations, scored by the engine with shared contexts
computed once, equals a plain forward pass over each whole sequence (lm-eval's hf backend's
computation), at the edges: a context shared by several continuations, one-token continuations, a
pair cut to the context, a batch of one and a full batch, more pairs than slots; is_greedy is true
exactly for greedy text."""

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
def engines(make_llama):
    """batch size -> an engine of that many slots, on the same weights."""
    return {size: make_llama(max_seq_len=MAX_SEQ_LEN, max_batch_size=size).engine for size in (1, 2, 3)}


@pytest.fixture(scope="module")
def scored(make_llama):
    """(model, requests): shared contexts, one-token continuations, a long pair, a greedy continuation."""
    generator = make_llama(max_seq_len=MAX_SEQ_LEN, max_batch_size=3)
    shared = [1, 40, 41, 42, 43]
    greedy, _ = generator.generate([shared], max_gen_len=4, temperature=0, stop_tokens=[])
    requests = [
        (shared, [50, 51, 52]),
        ([1, 7], [9]),
        (shared, [60]),
        ([1, 8, 9, 10], [11, 12]),
        (shared, greedy[0]),
        ([1] + list(range(100, 130)), [200, 201, 202]),
        ([1, 7], [9, 10, 11, 12]),
    ]
    return generator.model, requests


def assert_equal_to_the_reference(model, requests, answers):
    for (context, continuation), (logprob, greedy) in zip(requests, answers, strict=True):
        expected_logprob, expected_greedy = reference(model, context, continuation)
        assert logprob == pytest.approx(expected_logprob, rel=1e-5, abs=1e-5)
        assert greedy == expected_greedy


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihoods_equal_a_plain_forward_pass(engines, scored, batch_size):
    model, requests = scored
    assert_equal_to_the_reference(model, requests, loglikelihoods(engines[batch_size], requests))


def test_greedy_is_true_for_the_models_own_greedy_tokens_only(engines, scored):
    _, requests = scored
    flags = [greedy for _, greedy in loglikelihoods(engines[3], requests)]
    assert flags[4] and sum(flags) == 1


def test_continuations_of_a_shared_context_take_its_whole_blocks_from_the_prefix_cache(make_llama):
    engine = make_llama(max_seq_len=MAX_SEQ_LEN, max_batch_size=3).engine
    context = [1] + list(range(300, 319))  # 20 tokens: a whole block of 16, the rest computed by each row
    requests = [(context, [5, 6]), ([1, 2, 3], [4]), (context, [7]), (context, [8, 9, 10])]
    answers = loglikelihoods(engine, requests)
    assert engine.pool_use()["hit_tokens"] == 2 * 16  # the first of the three computes it, the others take it
    assert_equal_to_the_reference(engine.model, requests, answers)


def test_more_pairs_than_slots_queue_and_are_answered_in_order(engines):
    engine = engines[2]
    requests = [([1] + list(range(10 + i, 14 + 2 * i)), list(range(400 + i, 401 + i + i % 3))) for i in range(7)]
    assert_equal_to_the_reference(engine.model, requests, loglikelihoods(engine, requests))
    assert engine.running_slots == 0 and engine.queue_length == 0


def test_the_engine_scores_each_continuation_token(engines, scored):
    model, _ = scored
    context, continuation = [1, 40, 41], [42, 43, 44]
    ((logprobs, greedy),) = engines[3].score([(context, continuation)])
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([context + continuation[:-1]])), dim=-1)[0, len(context) - 1 :]
    assert logprobs == pytest.approx(expected.gather(1, torch.tensor(continuation)[:, None])[:, 0].tolist(), abs=1e-5)
    assert greedy == (expected.argmax(-1) == torch.tensor(continuation)).tolist()


@pytest.mark.parametrize(
    "pairs, message",
    [
        ([([1], [])], "pair 0 needs a non-empty context and continuation"),
        ([([1], [2]), ([1] * 20, [2] * 6)], f"pair 1 has 26 tokens, more than max_seq_len \\+ 1 = {MAX_SEQ_LEN + 1}"),
        ([([1], [512])], "pair 0 has token id\\(s\\) \\[512\\] outside the vocabulary"),
    ],
)
def test_the_engine_refuses_pairs_it_cannot_score(engines, pairs, message):
    with pytest.raises(ValueError, match=message):
        engines[1].score(pairs)


def test_a_long_pair_loses_its_oldest_context_tokens():
    assert fit_to_context([1, 2, 3, 4, 5], [6, 7], max_seq_len=4) == ([3, 4, 5], [6, 7])
    with pytest.raises(ValueError, match="continuation of 5 tokens does not fit max_seq_len=4"):
        fit_to_context([1], [2, 3, 4, 5, 6], max_seq_len=4)


def test_a_pair_filling_the_context_scores_the_same_beside_a_longer_chunk_of_another_pair(make_llama):
    """A pair of max_seq_len + 1 tokens whose context the prefix cache holds prefills its last 8 tokens
    beside a pair prefilling 12: the pass pads it to 12 tokens, and the padding, past the context, must not
    be written where the pair's own last token is."""
    engine = make_llama(max_seq_len=MAX_SEQ_LEN, max_batch_size=2).engine
    filling = ([1] + list(range(300, 319)), [320, 321, 322, 323, 324])  # 25 tokens: the context and one more
    longer = ([1] + list(range(100, 110)), [111, 112])  # 13 tokens, none cached
    alone = engine.score([filling])
    hits = engine.pool_use()["hit_tokens"]
    ((logprobs, greedy),) = alone
    beside = engine.score([longer, filling])[1]
    assert beside[0] == pytest.approx(logprobs, abs=1e-5) and beside[1] == greedy
    assert engine.pool_use()["hit_tokens"] == hits + 16  # the second time its first block came from the cache
    assert_equal_to_the_reference(engine.model, [filling], loglikelihoods(engine, [filling]))
