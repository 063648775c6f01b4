"""Scores: each generated token's most likely alternatives with their logprobs, and prompt scoring."""

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_PARAMS, to_transformers
from llama.generation import Llama

PROMPTS = ["import os\n", "def f(x):\n    return x + 1"]


@pytest.fixture(scope="module")
def llama(make_llama) -> Llama:
    return make_llama(max_seq_len=64, max_batch_size=2)


def encode(llama, text):
    return llama.tokenizer.encode(text, bos=True, eos=False)


def test_top_logprobs_are_the_top_k_of_log_softmax_of_a_full_forward(llama):
    prompts = [encode(llama, p) for p in PROMPTS]
    tokens, logprobs, alternatives = llama.generate(
        prompts, max_gen_len=10, temperature=1.0, seed=0, logprobs=True, top_logprobs=5
    )
    for prompt, gen, lps, alts in zip(prompts, tokens, logprobs, alternatives):
        expected = F.log_softmax(llama.model.forward(torch.tensor([prompt + gen]))[0], dim=-1)
        assert len(alts) == len(gen)
        for j, (token, lp, pairs) in enumerate(zip(gen, lps, alts)):
            top = expected[len(prompt) - 1 + j].topk(5)
            assert [t for t, _ in pairs] == top.indices.tolist()
            assert [v for _, v in pairs] == pytest.approx(top.values.tolist(), abs=1e-4)
            if token in top.indices.tolist():  # the chosen token's logprob is its entry
                assert dict(pairs)[token] == pytest.approx(lp, abs=1e-5)


def test_top_logprobs_match_transformers_output_logits(llama, checkpoint):
    hf = to_transformers(checkpoint[1], SMALL_PARAMS, llama.tokenizer.n_words)
    prompt = encode(llama, PROMPTS[1])
    (gen,), _, (alts,) = llama.generate([prompt], max_gen_len=8, temperature=0, stop_tokens=[], top_logprobs=3)
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=2,
        output_logits=True,
        return_dict_in_generate=True,
    )
    assert gen == out.sequences[0, len(prompt) :].tolist()
    for pairs, logits in zip(alts, out.logits):
        top = F.log_softmax(logits[0].float(), dim=-1).topk(3)
        assert [t for t, _ in pairs] == top.indices.tolist()
        assert [v for _, v in pairs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_text_completion_reports_alternatives_as_text(llama):
    (result,) = llama.text_completion(PROMPTS[:1], temperature=0, max_gen_len=4, stop_tokens=[], top_logprobs=2)
    assert len(result["top_logprobs"]) == len(result["tokens"]) == 4
    first_text, first_logprob = result["top_logprobs"][0][0]
    assert first_text == result["tokens"][0]  # greedy picks the most likely alternative
    assert first_logprob <= 0


def test_scoring_ragged_texts_without_generating(llama):
    texts = ["for i in range(10): print(i)", "x = 1"]
    results = llama.text_completion(texts, max_gen_len=0, logprobs=True, echo=True)
    for text, result in zip(texts, results):
        prompt = encode(llama, text)
        expected = F.log_softmax(llama.model.forward(torch.tensor([prompt]))[0], dim=-1)
        assert result["generation"] == text
        assert result["logprobs"][0] == 0.0  # nothing predicts BOS
        assert result["logprobs"][1:] == pytest.approx(
            [expected[j - 1, prompt[j]].item() for j in range(1, len(prompt))], abs=1e-4
        )
