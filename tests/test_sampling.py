"""Each sampling option changes the next-token distribution the way its formula says, off by default."""

import math

import pytest
import torch

from conftest import SMALL_PARAMS, to_transformers
from llama.engine.sampling import RowSettings, apply_penalties, sample
from llama.generation import Llama

PROMPTS = ["import os\n", "def f(x):\n    return x + 1", "class A:"]


@pytest.fixture(scope="module")
def llama(make_llama) -> Llama:
    return make_llama(max_seq_len=96, max_batch_size=6)


def encode(llama, text):
    return llama.tokenizer.encode(text, bos=True, eos=False)


def settings(rows: int = 1, vocab: int = 6, **values) -> RowSettings:
    """Every row with the same ``values`` (e.g. temperature=1.0), the rest off; seeded with seed 0."""
    row_settings = RowSettings.empty(rows, vocab, torch.device("cpu"))
    row_settings.seeded[:] = True
    for name, value in values.items():
        getattr(row_settings, name)[:] = value
    return row_settings


def draws(row_settings: RowSettings, logits: torch.Tensor, n: int = 2000) -> set:
    """The set of tokens sampled from one row of logits at n positions of a seeded row."""
    rows = settings(
        n, logits.shape[-1], **{name: value[0] for name, value in vars(row_settings).items() if name != "logit_bias"}
    )
    tokens = sample(logits[None].expand(n, -1), rows, torch.arange(n), torch.ones(n, logits.shape[-1]))
    return set(tokens.tolist())


def penalised(logits: torch.Tensor, seen_tokens, generated_tokens=(), **values) -> torch.Tensor:
    """apply_penalties on one row: ``seen_tokens`` in its prompt or output, ``generated_tokens`` generated."""
    vocab = logits.shape[-1]
    seen = torch.zeros(1, vocab, dtype=torch.bool)
    seen[0, list(seen_tokens)] = True
    counts = torch.zeros(1, vocab, dtype=torch.int32)
    for token in generated_tokens:
        counts[0, token] += 1
    return apply_penalties(logits[None], settings(1, vocab, **values), seen, counts)[0]


def test_default_options_sample_exactly_as_metas_algorithm(llama):
    """Meta's loop, written out with no KV cache: softmax(logits / T), top-p, one multinomial per step."""
    prompt = encode(llama, PROMPTS[1])
    torch.manual_seed(11)
    (ours,), _ = llama.generate([prompt], max_gen_len=16, temperature=0.8, top_p=0.9)
    torch.manual_seed(11)
    tokens = list(prompt)
    for _ in range(len(ours)):
        probs = torch.softmax(llama.model.forward(torch.tensor([tokens]))[0, -1] / 0.8, dim=-1)
        probs_sort, probs_idx = torch.sort(probs[None], dim=-1, descending=True)
        probs_sort[torch.cumsum(probs_sort, dim=-1) - probs_sort > 0.9] = 0.0
        probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
        tokens.append(int(probs_idx[0, torch.multinomial(probs_sort, 1)[0, 0]]))
    assert ours == tokens[len(prompt) :]


def test_top_k_1_equals_greedy(llama):
    greedy = llama.text_completion(PROMPTS, temperature=0, max_gen_len=24)
    top_1 = llama.text_completion(PROMPTS, temperature=1.5, top_p=1.0, top_k=1, max_gen_len=24)
    assert top_1 == greedy


def test_top_k_keeps_exactly_the_k_most_likely_tokens():
    logits = torch.tensor([0.1, 2.0, -1.0, 1.5, 0.7, 3.0])
    assert draws(settings(temperature=1.0, top_p=1.0, top_k=3), logits) == {1, 3, 5}


def test_min_p_keeps_exactly_the_tokens_within_min_p_of_the_most_likely():
    probs = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08])
    logits = probs.log()
    # min_p=0.35: threshold 0.35 * 0.40 = 0.14 keeps p >= 0.14
    assert draws(settings(temperature=1.0, top_p=1.0, min_p=0.35), logits) == {0, 1, 2}


def test_min_p_applies_to_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0])
    # at T=0.5, p ~ softmax([4, 2, 0]) = [0.867, 0.117, 0.016]: min_p=0.1 keeps p >= 0.0867, i.e. tokens 0 and 1
    assert draws(settings(temperature=0.5, top_p=1.0, min_p=0.1), logits) == {0, 1}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    assert penalised(logits, seen_tokens=[0, 1], repetition_penalty=2.0).tolist() == [1.0, -2.0, 0.5, 3.0]


def test_repetition_penalty_lowers_a_repeated_tokens_probability_by_the_formula():
    logits = torch.tensor([1.0, 0.0, 0.5])
    penalties = penalised(logits, seen_tokens=[0], repetition_penalty=2.0)
    # by hand: token 0's logit 1.0 -> 0.5, so p0 = e^0.5 / (e^0.5 + e^0 + e^0.5)
    expected = math.exp(0.5) / (math.exp(0.5) + 1 + math.exp(0.5))
    assert torch.softmax(penalties, -1)[0].item() == pytest.approx(expected, rel=1e-6)
    assert torch.softmax(penalties, -1)[0] < torch.softmax(logits, -1)[0]


def test_presence_and_frequency_penalties_subtract_as_openai_defines_them():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # token 1 generated three times, token 2 once, token 3 only in the prompt (seen, never generated)
    out = penalised(
        logits, seen_tokens=[1, 2, 3], generated_tokens=[1, 2, 1, 1], presence_penalty=0.5, frequency_penalty=0.25
    )
    # by hand: logit - 0.5 * [count > 0] - 0.25 * count
    assert out.tolist() == pytest.approx([1.0, 2.0 - 0.5 - 0.75, 3.0 - 0.5 - 0.25, 4.0])


def test_greedy_with_repetition_penalty_matches_transformers(llama, checkpoint):
    hf = to_transformers(checkpoint[1], SMALL_PARAMS, llama.tokenizer.n_words)
    prompt = encode(llama, PROMPTS[1])
    (ours,), _ = llama.generate([prompt], max_gen_len=24, temperature=0, repetition_penalty=1.5, stop_tokens=[])
    theirs = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=24,
        do_sample=False,
        repetition_penalty=1.5,
        eos_token_id=None,
        pad_token_id=2,
    )
    assert ours == theirs[0, len(prompt) :].tolist()
    (plain,), _ = llama.generate([prompt], max_gen_len=24, temperature=0, stop_tokens=[])
    assert plain != ours  # the penalty changed the greedy path


def test_n_samples_differ_and_each_is_reproducible_with_its_seed(llama):
    samples = llama.text_completion(PROMPTS[:2], temperature=1.0, max_gen_len=16, num_return_sequences=3, seed=40)
    assert len(samples) == 6
    for i, prompt in enumerate(PROMPTS[:2]):
        mine = [s["generation"] for s in samples[3 * i : 3 * i + 3]]
        assert len(set(mine)) == 3
        for j, text in enumerate(mine):  # sample j is the single sample with seed 40 + j
            (alone,) = llama.text_completion([prompt], temperature=1.0, max_gen_len=16, seed=40 + j)
            assert alone["generation"] == text


def test_seed_leaves_the_global_rng_alone(llama):
    state = torch.get_rng_state()
    llama.text_completion(PROMPTS, temperature=1.0, max_gen_len=8, seed=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_stop_tokens_end_each_row_before_the_stop_token(llama):
    prompts = [encode(llama, p) for p in PROMPTS]
    free, _ = llama.generate(prompts, max_gen_len=20, temperature=0, stop_tokens=[])
    stop = free[0][5]
    stopped, _ = llama.generate(prompts, max_gen_len=20, temperature=0, stop_tokens=[stop, 7])
    for row, out in zip(free, stopped):
        ends = [j for j, t in enumerate(row) if t in (stop, 7)]
        assert out == row[: ends[0] if ends else len(row)]


def test_after_a_stop_string_tokens_and_logprobs_end_with_the_last_token_of_the_text_before_it(llama):
    prompt = encode(llama, PROMPTS[0])
    (free,), _ = llama.generate([prompt], max_gen_len=30, temperature=1.0, seed=2, stop_tokens=[])
    text = llama.tokenizer.decode(free)
    stop = text[12:14]
    before = text[: text.index(stop)]
    (tokens,), (logprobs,) = llama.generate(
        [prompt], max_gen_len=30, temperature=1.0, seed=2, stop_tokens=[], stop_strings=[stop], logprobs=True
    )
    assert tokens == free[: len(tokens)] and len(logprobs) == len(tokens)
    assert llama.tokenizer.decode(tokens).startswith(before)
    assert bool(tokens) == bool(before)  # no token at all when the text starts with the stop string
    assert not tokens or len(llama.tokenizer.decode(tokens[:-1])) < len(before)


def test_a_stop_string_at_a_token_boundary_leaves_exactly_the_tokens_of_the_generation(llama):
    prompt = encode(llama, PROMPTS[0])
    (free,), _ = llama.generate([prompt], max_gen_len=30, temperature=1.0, seed=2, stop_tokens=[])
    text, boundary = llama.tokenizer.decode(free), len(llama.tokenizer.decode(free[:8]))
    stop = text[boundary : boundary + 2]
    if text.index(stop) != boundary:
        pytest.skip("the stop string occurs earlier in this random text")
    (result,) = llama.text_completion(
        [llama.tokenizer.decode(prompt)],
        max_gen_len=30,
        temperature=1.0,
        seed=2,
        stop_tokens=[],
        stop_strings=[stop],
        logprobs=True,
    )
    assert result["generation"] == text[:boundary]
    assert len(result["tokens"]) == len(result["logprobs"]) == 8


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(top_k=-1), "top_k must be a non-negative integer"),
        (dict(top_k=2.5), "top_k must be a non-negative integer"),
        (dict(min_p=1.0), r"min_p must be in \[0, 1\)"),
        (dict(repetition_penalty=0), "repetition_penalty must be > 0"),
        (dict(stop_tokens=[512]), r"stop_tokens must be a list of token ids in \[0, 512\)"),
        (dict(stop_tokens=2), "stop_tokens must be a list of token ids"),
        (dict(stop_strings="\n"), "stop_strings must be a list of non-empty strings"),
        (dict(stop_strings=[""]), "stop_strings must be a list of non-empty strings"),
        (dict(num_return_sequences=0), "num_return_sequences must be a positive integer"),
        (dict(num_return_sequences=4), r"2 prompts x num_return_sequences=4 exceed max_batch_size=6"),
        (dict(seed=-1), "seed must be a non-negative integer or None"),
        (dict(seed="1"), "seed must be a non-negative integer or None"),
        (dict(top_logprobs=513), r"top_logprobs must be an integer in \[0, 512\]"),
    ],
)
def test_bad_option_is_a_clear_error(llama, option, message):
    with pytest.raises((ValueError, TypeError), match=message):
        llama.generate([encode(llama, p) for p in PROMPTS[:2]], max_gen_len=4, **option)
