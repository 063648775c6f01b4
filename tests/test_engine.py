"""The decoding engine: rows admitted between steps into free slots, each with its own settings, leave
the moment they end; every row gives what its prompt gives alone. Compiled, the whole step is one
graph that rows coming and going do not recompile."""

import functools
from dataclasses import replace

import pytest
import torch

from llama.engine import Engine
from llama.generation import Llama
from llama.options import GenerationOptions

PROMPTS = ["import os\n", "def f(x):\n    return x + 1", "class A:", "for i in range(10):"]


@pytest.fixture(scope="module")
def llama(make_llama) -> Llama:
    return make_llama(max_seq_len=64, max_batch_size=4)


def encode(llama: Llama, text: str):
    return llama.tokenizer.encode(text, bos=True, eos=False)


def alone(llama: Llama, text: str, **options):
    """The row's tokens when its prompt is decoded by itself."""
    (tokens,), _ = llama.generate([encode(llama, text)], **options)
    return tokens


def run(engine: Engine, requests) -> None:
    while not all(request.done for request in requests):
        engine.step()


GREEDY = dict(max_gen_len=16, temperature=0, stop_tokens=[])
SEEDED = dict(max_gen_len=16, temperature=1.0, top_p=0.95, seed=7, stop_tokens=[])


@pytest.mark.parametrize("options", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_request_admitted_mid_decode_and_the_running_one_each_give_their_alone_result(llama, options):
    engine = llama.engine
    first = engine.submit([encode(llama, PROMPTS[1])], GenerationOptions(**options))
    for _ in range(5):
        engine.step()
    assert len(first.tokens[0]) == 5 and engine.running_slots == 1
    second = engine.submit([encode(llama, PROMPTS[0])], GenerationOptions(**options))
    engine.step()
    assert engine.running_slots == 2  # admitted while the first decodes
    run(engine, [first, second])
    assert first.tokens[0] == alone(llama, PROMPTS[1], **options)
    assert second.tokens[0] == alone(llama, PROMPTS[0], **options)
    assert engine.running_slots == 0


MIXED = [
    dict(temperature=0),
    dict(temperature=0.8, top_p=0.9, top_k=20, seed=1),
    dict(temperature=0, repetition_penalty=1.3),
    dict(temperature=1.2, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3, seed=2),
]


def test_rows_with_different_settings_in_one_batch_each_equal_their_setting_alone(llama):
    requests = [
        llama.engine.submit([encode(llama, prompt)], GenerationOptions(max_gen_len=12, stop_tokens=[], **options))
        for prompt, options in zip(PROMPTS, MIXED)
    ]
    run(llama.engine, requests)
    for request, prompt, options in zip(requests, PROMPTS, MIXED):
        assert request.tokens[0] == alone(llama, prompt, max_gen_len=12, stop_tokens=[], **options)


def test_more_requests_than_slots_reuse_the_slots_as_rows_end(llama):
    engine = llama.engine
    lengths = [3, 9, 5, 2, 7, 4, 6]
    requests = [
        engine.submit([encode(llama, PROMPTS[i % 4])], GenerationOptions(max_gen_len=n, temperature=0, stop_tokens=[]))
        for i, n in enumerate(lengths)
    ]
    most_running = 0
    while not all(request.done for request in requests):
        engine.step()
        most_running = max(most_running, engine.running_slots)
    assert most_running == engine.max_slots == 4
    for i, (request, n) in enumerate(zip(requests, lengths)):
        assert request.tokens[0] == alone(llama, PROMPTS[i % 4], max_gen_len=n, temperature=0, stop_tokens=[])
        assert request.finish_reasons == ["length"]


def test_cancelling_a_row_frees_its_slot_for_a_waiting_request(llama):
    engine = llama.engine
    options = GenerationOptions(max_gen_len=40, temperature=0, stop_tokens=[])
    running = [engine.submit([encode(llama, PROMPTS[i])], options) for i in range(4)]
    waiting = engine.submit(
        [encode(llama, PROMPTS[0])], GenerationOptions(max_gen_len=6, temperature=0, stop_tokens=[])
    )
    engine.step()
    engine.step()
    assert engine.queue_length == 1 and engine.running_slots == 4
    running[2].cancel()
    engine.step()
    assert running[2].finish_reasons == ["cancelled"] and len(running[2].tokens[0]) == 2
    assert engine.queue_length == 0 and engine.running_slots == 4  # the waiting request took the slot
    run(engine, [waiting])
    assert waiting.tokens[0] == alone(llama, PROMPTS[0], max_gen_len=6, temperature=0, stop_tokens=[])
    for request in running:
        request.cancel()
    run(engine, running)
    assert engine.running_slots == 0


def test_static_admission_waits_for_an_empty_batch(llama):
    engine = Engine(llama.model, llama.tokenizer, replace(llama.engine.options, admission="static"))
    first = engine.submit([encode(llama, PROMPTS[1])], GenerationOptions(max_gen_len=6, temperature=0, stop_tokens=[]))
    engine.step()
    second = engine.submit([encode(llama, PROMPTS[0])], GenerationOptions(max_gen_len=3, temperature=0, stop_tokens=[]))
    while not first.done:
        engine.step()
        assert second.admitted_at is None or first.done
    run(engine, [second])
    assert second.tokens[0] == alone(llama, PROMPTS[0], max_gen_len=3, temperature=0, stop_tokens=[])


def test_penalties_and_logit_bias_follow_the_hand_computation(llama):
    """Greedy decoding with no KV cache, applying OpenAI's penalties and the bias by hand each step."""
    prompt = encode(llama, PROMPTS[1])
    bias = {prompt[-1]: 1.5, 5: -100.0}
    options = dict(presence_penalty=0.6, frequency_penalty=0.4, logit_bias=bias)
    (ours,), _ = llama.generate([prompt], max_gen_len=12, temperature=0, stop_tokens=[], **options)
    tokens, generated = list(prompt), []
    for _ in range(12):
        logits = llama.model.forward(torch.tensor([tokens]))[0, -1].tolist()
        for token in set(generated):
            logits[token] -= 0.6 + 0.4 * generated.count(token)
        for token, value in bias.items():
            logits[token] += value
        generated.append(max(range(len(logits)), key=logits.__getitem__))
        tokens.append(generated[-1])
    assert ours == generated
    assert ours != alone(
        llama, PROMPTS[1], max_gen_len=12, temperature=0, stop_tokens=[]
    )  # the options changed the path


def test_a_logit_bias_of_integers_forces_and_bans_tokens_as_floats_do(llama):
    """OpenAI's examples write the bias as integers ({"50256": -100}): +100 forces a token at every step."""
    prompt = encode(llama, PROMPTS[1])
    (forced,), _ = llama.generate([prompt], max_gen_len=5, temperature=0, stop_tokens=[], logit_bias={7: 100})
    assert forced == [7] * 5
    greedy = alone(llama, PROMPTS[1], max_gen_len=5, temperature=0, stop_tokens=[])
    (banned,), _ = llama.generate([prompt], max_gen_len=5, temperature=0, stop_tokens=[], logit_bias={greedy[0]: -100})
    assert banned[0] != greedy[0]


def test_a_seeded_row_does_not_depend_on_its_company(llama):
    options = GenerationOptions(max_gen_len=10, temperature=1.0, top_p=1.0, seed=11, stop_tokens=[])
    lone = llama.engine.submit([encode(llama, PROMPTS[2])], options)
    run(llama.engine, [lone])
    torch.manual_seed(0)
    company = [
        llama.engine.submit(
            [encode(llama, PROMPTS[i])], GenerationOptions(max_gen_len=10, temperature=1.0, stop_tokens=[])
        )
        for i in (0, 1)
    ]
    crowded = llama.engine.submit([encode(llama, PROMPTS[2])], options)
    run(llama.engine, company + [crowded])
    assert crowded.tokens == lone.tokens


def test_updates_deliver_each_rows_tokens_text_and_finish_reason_to_another_thread(llama):
    import threading

    engine = Engine(llama.model, llama.tokenizer, llama.engine.options)
    request = engine.submit(
        [encode(llama, PROMPTS[0])],
        GenerationOptions(max_gen_len=8, temperature=0, stop_tokens=[], logprobs=True, num_return_sequences=2),
    )
    seen = []
    reader = threading.Thread(
        target=lambda: seen.extend(delta for step in request.updates(timeout=60) for delta in step)
    )
    reader.start()
    run(engine, [request])
    reader.join(timeout=60)
    expected = alone(llama, PROMPTS[0], max_gen_len=8, temperature=0, stop_tokens=[])
    for row in (0, 1):
        mine = [delta for delta in seen if delta.row == row]
        assert sum((delta.tokens for delta in mine), []) == expected
        assert len(sum((delta.logprobs for delta in mine), [])) == 8
        assert "".join(delta.text for delta in mine) == llama.tokenizer.decode(expected)
        assert mine[-1].finish_reason == "length" and all(delta.finish_reason is None for delta in mine[:-1])


def test_an_engine_following_the_pickled_plans_of_another_gives_its_tokens(make_llama):
    """A server's follower in one process: a second engine on the same model, given no request of its own,
    runs each step as the first plans it, the plan pickled as the broadcast sends it: through admissions
    mid-decode, a cancellation and preemptions in a pool that holds little more than one row, its rows end
    with the planner's tokens and finish reasons."""
    import pickle

    small = make_llama(max_seq_len=64, max_batch_size=4, kv_cache_tokens=64)  # 4 blocks for 3 rows of 3 blocks
    leader, follower = (Engine(small.model, small.tokenizer, small.engine.options) for _ in range(2))
    options = GenerationOptions(max_gen_len=30, temperature=0, stop_tokens=[])
    requests, followed, steps = [leader.submit([encode(small, PROMPTS[0])], options)], {}, 0
    while not all(request.done for request in requests):
        if steps == 2:
            requests += [leader.submit([encode(small, prompt)], options) for prompt in PROMPTS[1:]]
        if steps == 6:
            requests[3].cancel()
        plan = leader.scheduler.plan()
        leader.execute(plan)
        follower.execute(pickle.loads(pickle.dumps(plan)))
        followed.update({request.id: request for request in follower.scheduler.requests()})
        steps += 1
    assert leader.preemptions == follower.preemptions > 0 and follower.running_slots == 0
    assert [request.finish_reasons for request in requests] == [["length"]] * 3 + [["cancelled"]]
    for request in requests:
        assert followed[request.id].tokens == request.tokens
        assert followed[request.id].finish_reasons == request.finish_reasons


def test_a_request_of_more_rows_than_slots_takes_them_as_they_free_and_a_follower_keeps_up(make_llama):
    """10 prompts x n=2 on 4 slots, beside a request that came first: the rows go in, in order, as slots
    free (never more than the slots), each row gives its prompt's alone tokens, and the request is done
    when its last row ends; a second big request cancelled while partly admitted ends every row, the
    waiting ones too. A follower given the pickled plans (a server's other ranks) ends with the same rows."""
    import pickle

    small = make_llama(max_seq_len=64, max_batch_size=4)
    leader, follower = (Engine(small.model, small.tokenizer, small.engine.options) for _ in range(2))
    options = GenerationOptions(max_gen_len=5, temperature=0, stop_tokens=[], num_return_sequences=2)
    prompts = [encode(small, PROMPTS[i % 4] + "x" * (i // 4)) for i in range(10)]
    first = leader.submit([prompts[0]], replace(options, max_gen_len=9, num_return_sequences=1))
    big = leader.submit(prompts, options)
    cancelled = leader.submit(prompts[:6], replace(options, max_gen_len=20))
    followed, steps, most_running = {}, 0, 0
    while not all(request.done for request in (first, big, cancelled)):
        if cancelled.admitted and not cancelled.cancelled:  # partly admitted: the rest waits
            cancelled.cancel()
        plan = leader.scheduler.plan()
        leader.execute(plan)
        follower.execute(pickle.loads(pickle.dumps(plan)))
        followed.update({request.id: request for request in follower.scheduler.requests()})
        most_running, steps = max(most_running, leader.running_slots), steps + 1
    assert most_running == 4 and leader.running_slots == follower.running_slots == 0
    assert big.finish_reasons == ["length"] * 20 and cancelled.finish_reasons == ["cancelled"] * 12
    assert 0 < cancelled.admitted < cancelled.n_rows  # some of its rows never took a slot
    expected = small.generate(prompts[:4], max_gen_len=5, temperature=0, stop_tokens=[])[0]
    expected += small.generate(prompts[4:8], max_gen_len=5, temperature=0, stop_tokens=[])[0]
    expected += small.generate(prompts[8:], max_gen_len=5, temperature=0, stop_tokens=[])[0]
    assert big.tokens == [tokens for tokens in expected for _ in range(2)]
    for request in (first, big, cancelled):
        assert followed[request.id].tokens == request.tokens
        assert followed[request.id].finish_reasons == request.finish_reasons


def test_the_python_api_keeps_metas_batch_limit_where_the_engine_queues_the_rows(llama):
    """``generate`` decodes its prompts as one batch, as Meta's does: more than ``max_batch_size`` is an
    error there (``llama.options.check_batch_size``), though the engine would admit them as slots free."""
    prompts = [encode(llama, prompt) for prompt in PROMPTS] + [encode(llama, PROMPTS[0])]
    with pytest.raises(ValueError, match="5 prompts exceed max_batch_size=4"):
        llama.generate(prompts, max_gen_len=4, temperature=0)
    request = llama.engine.submit(prompts, GenerationOptions(max_gen_len=4, temperature=0, stop_tokens=[]))
    run(llama.engine, [request])
    assert (
        request.tokens[4] == request.tokens[0] == alone(llama, PROMPTS[0], max_gen_len=4, temperature=0, stop_tokens=[])
    )


def full_logprobs(model, prompt, tokens, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature) of the model's plain forward over the whole sequence, at the
    positions that predict ``tokens``: (len(tokens), vocab), on the CPU."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens], device=model.output.weight.device))[0].float().cpu()
    return torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)


def assert_full_logprobs(model, prompt, request, temperature: float) -> None:
    """The request's logprobs and top logprobs are those of ``full_logprobs`` at ``temperature``."""
    tokens, k = request.tokens[0], request.options.top_logprobs
    expected = full_logprobs(model, prompt, tokens, temperature)
    assert request.logprobs[0] == pytest.approx(
        expected.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist(), abs=1e-4
    )
    top = expected.topk(k, dim=-1)
    assert [[i for i, _ in pairs] for pairs in request.top_logprobs[0]] == top.indices.tolist()
    for pairs, values in zip(request.top_logprobs[0], top.values.tolist()):
        assert [value for _, value in pairs] == pytest.approx(values, abs=1e-4)


TEMPERED = dict(max_gen_len=10, stop_tokens=[], logprobs=True, top_logprobs=3, seed=5)
# (prompt, options, the temperature of the logprobs): the same seeded row with and without tempered_logprobs,
# a greedy one (the model's own) and a sampled one whose penalties, top_k and top_p change no logprob
TEMPERED_ROWS = [
    (PROMPTS[1], dict(temperature=0.7, tempered_logprobs=True), 0.7),
    (PROMPTS[1], dict(temperature=0.7), 1.0),
    (PROMPTS[2], dict(temperature=0, tempered_logprobs=True, repetition_penalty=1.3), 1.0),
    (PROMPTS[3], dict(temperature=1.3, tempered_logprobs=True, top_k=20, presence_penalty=0.5), 1.3),
]


def tempered_requests(llama: Llama, engine: Engine):
    """The ``TEMPERED_ROWS``, in one batch, run to their end."""
    requests = [
        engine.submit([encode(llama, prompt)], GenerationOptions(**TEMPERED, **options))
        for prompt, options, _ in TEMPERED_ROWS
    ]
    run(engine, requests)
    return requests


def test_tempered_logprobs_are_the_full_forwards_at_the_rows_temperature_beside_untempered_rows(llama):
    requests = tempered_requests(llama, llama.engine)
    for request, (prompt, _, temperature) in zip(requests, TEMPERED_ROWS):
        assert_full_logprobs(llama.model, encode(llama, prompt), request, temperature)
    tempered, untempered = requests[:2]
    assert tempered.tokens == untempered.tokens and tempered.logprobs != untempered.logprobs  # the same draws


@pytest.mark.parametrize(
    "options", [dict(temperature=0), dict(temperature=0.7, seed=3, tempered_logprobs=True)], ids=["greedy", "tempered"]
)
def test_a_row_ended_by_a_stop_token_reports_it_with_its_logprob_and_one_ended_by_its_length_none(llama, options):
    engine, prompt = llama.engine, encode(llama, PROMPTS[0])
    free = engine.submit([prompt], GenerationOptions(max_gen_len=12, stop_tokens=[], logprobs=True, **options))
    run(engine, [free])
    tokens = free.tokens[0]
    end = tokens.index(tokens[6])  # the stop token's first place: where the row ends
    stopped = engine.submit(
        [prompt], GenerationOptions(max_gen_len=12, stop_tokens=[tokens[6]], logprobs=True, **options)
    )
    run(engine, [stopped])
    assert stopped.finish_reasons == ["stop"] and stopped.tokens == [tokens[:end]]
    ((token, logprob),) = stopped.stopped_by
    expected = full_logprobs(llama.model, prompt, tokens[: end + 1], options["temperature"] or 1.0)[-1, token]
    assert token == tokens[6] and logprob == pytest.approx(float(expected), abs=1e-4)
    assert free.finish_reasons == ["length"] and free.stopped_by == [None]


def test_bad_engine_arguments_are_clear_errors(llama):
    with pytest.raises(ValueError, match="admission must be one of"):
        replace(llama.engine.options, admission="greedy")
    with pytest.raises(TypeError, match="options must be a GenerationOptions"):
        llama.engine.submit([[1, 2]], {"temperature": 0})


# --- compiled ------------------------------------------------------------------------------------


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_after_warm_up_no_mix_of_options_or_rows_coming_and_going_compiles_and_tokens_equal_eager(
    llama, make_llama, monkeypatch
):
    """Traced by dynamo's eager backend: the graphs inductor would compile, counted the same, in a
    fraction of the time (test_decoding compares inductor's code with the eager engine)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    compiled = make_llama(max_seq_len=64, max_batch_size=4, compile=True)

    def workload(engine: Engine, prompts):
        """Four requests (greedy; sampled from the global generator; penalised; sampled with a seed,
        penalised, with top logprobs) arriving while others decode and leaving at different steps:
        every width, alone and mixed."""
        torch.manual_seed(0)
        requests = []
        for i, prompt in enumerate(prompts):
            extra = [{}, dict(seed=None), {}, dict(logprobs=True, top_logprobs=3)][i]
            options = GenerationOptions(max_gen_len=4 + 3 * i, stop_tokens=[], **{**MIXED[i], **extra})
            requests.append(engine.submit([encode(llama, prompt)], options))
            engine.step()
        run(engine, requests)
        return [request.tokens[0] for request in requests]

    compiled.engine.warm_up(max_top_logprobs=3)
    graphs = unique_graphs()
    other = [PROMPTS[3] + PROMPTS[0], PROMPTS[2], PROMPTS[1][:5], PROMPTS[0]]
    fast = workload(compiled.engine, other)
    assert unique_graphs() == graphs
    eager = workload(llama.engine, other)
    assert fast == eager


def test_the_compiled_step_gives_tempered_logprobs_beside_untempered_rows_in_the_warmed_graphs(
    llama, make_llama, monkeypatch
):
    """Traced by dynamo's eager backend, as above: each row's logprob scale is one more tensor of the graph."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    compiled = make_llama(max_seq_len=64, max_batch_size=4, compile=True)
    compiled.engine.warm_up(max_top_logprobs=3)
    graphs = unique_graphs()
    requests = tempered_requests(llama, compiled.engine)
    assert unique_graphs() == graphs
    for request, (prompt, _, temperature) in zip(requests, TEMPERED_ROWS):
        assert_full_logprobs(compiled.model, encode(llama, prompt), request, temperature)


def test_a_failed_step_ends_its_requests_with_error_and_the_serving_loop_goes_on(llama, monkeypatch):
    import threading

    engine = Engine(llama.model, llama.tokenizer, llama.engine.options)
    real_decode, failures = engine.decode, []

    def decode_failing_once(rows, touched):
        if not failures:
            failures.append(len(rows))
            raise RuntimeError("a kernel failed")
        return real_decode(rows, touched)

    monkeypatch.setattr(engine, "decode", decode_failing_once)
    serving = threading.Thread(target=engine.run)
    serving.start()
    try:
        failed = engine.submit([encode(llama, PROMPTS[0])], GenerationOptions(**GREEDY, num_return_sequences=2))
        assert sum(len(step) for step in failed.updates(timeout=60)) >= 2  # each row's end is delivered
        assert failed.finish_reasons == ["error", "error"] and engine.running_slots == 0
        after = engine.submit([encode(llama, PROMPTS[1])], GenerationOptions(**GREEDY))
        list(after.updates(timeout=60))
        assert after.finish_reasons == ["length"] and after.tokens[0] == alone(llama, PROMPTS[1], **GREEDY)
    finally:
        engine.stop()
        serving.join(timeout=60)
    assert failures == [2] and not serving.is_alive()
