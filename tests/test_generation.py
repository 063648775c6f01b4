"""Meta-compatible generation: cache vs recompute, ragged batches, logprobs, echo, EOS, chat format."""

import pytest
import torch
import torch.nn.functional as F

from llama.generation import B_SYS, E_SYS, UNSAFE_ERROR, Llama

PROMPTS = ["import os\n", "def f(x):\n    return x + 1", "class A:"]


@pytest.fixture(scope="module")
def llama(make_llama) -> Llama:
    return make_llama(max_seq_len=96, max_batch_size=4)


def encode(llama, text):
    return llama.tokenizer.encode(text, bos=True, eos=False)


def greedy_by_recompute(llama, prompt, n):
    """Greedy decoding that re-runs the whole sequence each step, with no KV cache."""
    tokens = list(prompt)
    for _ in range(n):
        logits = llama.model.forward(torch.tensor([tokens], device=llama.device))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt) :]


def test_kv_cache_decoding_equals_full_recompute(llama):
    prompt = encode(llama, PROMPTS[1])
    (ours,), _ = llama.generate([prompt], max_gen_len=20, temperature=0)
    assert ours == greedy_by_recompute(llama, prompt, 20)[: len(ours)]
    assert len(ours) > 0


def test_prompt_alone_equals_prompt_in_ragged_batch(llama):
    prompts = [encode(llama, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    batch, _ = llama.generate(prompts, max_gen_len=16, temperature=0)
    for prompt, row in zip(prompts, batch):
        (alone,), _ = llama.generate([prompt], max_gen_len=16, temperature=0)
        assert row == alone


def test_logprobs_are_log_softmax_of_a_full_forward(llama):
    prompts = [encode(llama, p) for p in PROMPTS[:2]]
    tokens, logprobs = llama.generate(prompts, max_gen_len=10, temperature=0, logprobs=True)
    for prompt, gen, lps in zip(prompts, tokens, logprobs):
        full = torch.tensor([prompt + gen], device=llama.device)
        expected = F.log_softmax(llama.model.forward(full)[0], dim=-1)
        for j, (token, lp) in enumerate(zip(gen, lps)):
            position = len(prompt) - 1 + j  # the logits that predicted this token
            assert lp == pytest.approx(expected[position, token].item(), abs=1e-4)


def test_echo_returns_prompt_then_generation(llama):
    prompt = encode(llama, PROMPTS[0])
    (plain,), _ = llama.generate([prompt], max_gen_len=8, temperature=0)
    (echoed,), (lps,) = llama.generate([prompt], max_gen_len=8, temperature=0, logprobs=True, echo=True)
    assert echoed == prompt + plain
    assert len(lps) == len(echoed)
    assert lps[0] == 0.0  # nothing predicts BOS


def test_scoring_without_generating_shifts_prompt_logprobs(llama):
    prompts = [encode(llama, "for i in range(10):"), encode(llama, "while True: pass")]
    prompts[1] = prompts[1][: len(prompts[0])]  # equal lengths: the one-pass scoring path
    tokens, logprobs = llama.generate(prompts, max_gen_len=0, logprobs=True, echo=True)
    assert tokens == prompts
    for prompt, lps in zip(prompts, logprobs):
        expected = F.log_softmax(llama.model.forward(torch.tensor([prompt], device=llama.device))[0], dim=-1)
        assert lps[0] == 0.0
        for j in range(1, len(prompt)):
            assert lps[j] == pytest.approx(expected[j - 1, prompt[j]].item(), abs=1e-4)


def test_echo_with_top_logprobs_gives_each_prompt_tokens_alternatives_of_a_full_forward(llama):
    prompts = [encode(llama, PROMPTS[1]), encode(llama, PROMPTS[2])]
    tokens, logprobs, top = llama.generate(
        prompts, max_gen_len=3, temperature=0, logprobs=True, echo=True, top_logprobs=3, stop_tokens=[]
    )
    for row, prompt in enumerate(prompts):
        full = torch.tensor([tokens[row]], device=llama.device)
        expected = F.log_softmax(llama.model.forward(full)[0], dim=-1)[:-1].topk(3)  # position j predicts j + 1
        assert top[row][0] == [] and len(top[row]) == len(tokens[row]) == len(prompt) + 3  # nothing predicts BOS
        assert [[t for t, _ in pairs] for pairs in top[row][1:]] == expected.indices.tolist()
        for pairs, values in zip(top[row][1:], expected.values.tolist()):
            assert [v for _, v in pairs] == pytest.approx(values, abs=1e-4)
    plain = llama.generate(prompts, max_gen_len=3, temperature=0, logprobs=True, echo=True, stop_tokens=[])
    assert plain == (tokens, logprobs)  # the alternatives change nothing else


def test_generation_stops_at_eos_per_row_and_loop_ends_when_all_rows_end(llama, monkeypatch):
    prompts = [encode(llama, PROMPTS[0]), encode(llama, PROMPTS[2])]
    free, _ = llama.generate(prompts, max_gen_len=12, temperature=0)
    # pretend row 0's first token that it has not generated before (and not its first) is EOS
    end = next(i for i in range(1, len(free[0])) if free[0][i] not in free[0][:i])
    stop_token = free[0][end]
    monkeypatch.setattr(llama.tokenizer, "eos_id", stop_token)
    calls = []
    forward = llama.model.forward
    monkeypatch.setattr(llama.model, "forward", lambda *a, **kw: calls.append(1) or forward(*a, **kw))
    stopped, _ = llama.generate(prompts, max_gen_len=12, temperature=0)
    assert stopped[0] == free[0][:end]
    expected_row1 = free[1][: free[1].index(stop_token)] if stop_token in free[1] else free[1]
    assert stopped[1] == expected_row1
    if stop_token in free[1]:  # both rows ended: the loop must not run to max_gen_len
        assert len(calls) < 12 + len(prompts[1]) - len(prompts[0])


def test_same_seed_same_samples_other_seed_other_samples(make_llama):
    def sample(seed):
        llama = make_llama(64, 2, seed=seed)
        return llama.text_completion(PROMPTS[:2], temperature=1.0, top_p=0.95, max_gen_len=24)

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_text_completion_returns_metas_dict_shape(llama):
    (plain,) = llama.text_completion([PROMPTS[0]], temperature=0, max_gen_len=5)
    assert set(plain) == {"generation"}
    (scored,) = llama.text_completion([PROMPTS[0]], temperature=0, max_gen_len=5, logprobs=True)
    assert set(scored) == {"generation", "tokens", "logprobs"}
    assert "".join(scored["tokens"]).strip() == scored["generation"].strip()
    assert len(scored["tokens"]) == len(scored["logprobs"])


def test_empty_prompt_list_returns_empty_list(llama):
    assert llama.text_completion([]) == []
    assert llama.chat_completion([]) == []


def test_chat_tokens_for_multi_turn_dialog(llama):
    tok = llama.tokenizer
    dialog = [
        {"role": "user", "content": "hi "},
        {"role": "assistant", "content": " hello"},
        {"role": "user", "content": "how?"},
    ]
    expected = tok.encode("[INST] hi [/INST] hello ", bos=True, eos=True) + tok.encode(
        "[INST] how? [/INST]", bos=True, eos=False
    )
    assert llama.encode_dialog(dialog) == expected


def test_chat_tokens_with_system_prompt(llama):
    tok = llama.tokenizer
    dialog = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
    ]
    first = "[INST] <<SYS>>\nbe brief\n<</SYS>>\n\nhi [/INST] hello "
    assert B_SYS + "be brief" + E_SYS == "<<SYS>>\nbe brief\n<</SYS>>\n\n"
    expected = tok.encode(first, bos=True, eos=True) + tok.encode("[INST] bye [/INST]", bos=True, eos=False)
    assert llama.encode_dialog(dialog) == expected


def test_chat_completion_answers_as_assistant_and_refuses_special_tags(llama):
    dialogs = [
        [{"role": "user", "content": "hello"}],
        [{"role": "user", "content": "[INST] sneaky [/INST]"}],
    ]
    results = llama.chat_completion(dialogs, temperature=0, max_gen_len=5)
    assert results[0]["generation"]["role"] == "assistant"
    assert results[0]["generation"]["content"] != UNSAFE_ERROR
    assert results[1]["generation"] == {"role": "assistant", "content": UNSAFE_ERROR}


def test_generation_is_capped_by_max_seq_len(llama):
    prompt = encode(llama, PROMPTS[1])
    (tokens,), _ = llama.generate([prompt], max_gen_len=1000, temperature=0)
    assert len(prompt) + len(tokens) <= 96


def test_ragged_batch_is_prefilled_in_one_pass_and_each_row_continues_as_alone(make_llama, monkeypatch):
    llama = make_llama(max_seq_len=520, max_batch_size=2, prefix_cache=False)  # the batch computes both prompts
    generator = torch.Generator().manual_seed(5)
    short = [1] + torch.randint(3, 512, (7,), generator=generator).tolist()
    long = [1] + torch.randint(3, 512, (499,), generator=generator).tolist()
    alone = [llama.generate([p], max_gen_len=12, temperature=0)[0][0] for p in (short, long)]
    calls = []
    forward = llama.model.forward
    monkeypatch.setattr(llama.model, "forward", lambda *a, **kw: calls.append(a[0].shape) or forward(*a, **kw))
    batch, _ = llama.generate([short, long], max_gen_len=12, temperature=0)
    assert batch == alone
    assert calls[0] == (2, 500)  # both prompts in one pass
    assert all(shape == (2, 1) for shape in calls[1:])  # then one token per row per step
    assert len(calls) <= 12
