"""The decoding loop as a server drives it: options checked once, each row's finish reason, tokens and
logprobs while streaming, cancelling a row; and the compiled decode step against the eager one."""

import dataclasses

import pytest
import torch

from llama.generation import Llama
from llama.options import GenerationOptions

PROMPTS = ["import os\n", "def f(x):\n    return x + 1", "class A:"]


@pytest.fixture(scope="module")
def llama(make_llama) -> Llama:
    return make_llama(max_batch_size=4)


def test_options_are_frozen_and_checked_when_made():
    options = GenerationOptions(max_gen_len=4, temperature=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.temperature = 1.0
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        GenerationOptions(top_p=0)
    with pytest.raises(TypeError, match="logprobs must be True or False, got 'yes'"):
        GenerationOptions(logprobs="yes")


def test_stream_tells_each_rows_finish_reason(llama, monkeypatch):
    free = llama.text_completion(PROMPTS[:2], max_gen_len=8, temperature=0, stop_tokens=[], logprobs=True)
    stop_string = free[1]["generation"][2:4]
    stream = llama.text_completion_stream(
        PROMPTS[:2], max_gen_len=8, temperature=0, stop_tokens=[], stop_strings=[stop_string]
    )
    assert stream.finish_reasons == [None, None]
    texts = ["".join(pieces) for pieces in zip(*stream)]
    assert stream.finish_reasons[1] == "stop" and texts[1] == free[1]["generation"][:2]
    assert stream.finish_reasons[0] == ("stop" if stop_string in free[0]["generation"] else "length")

    (tokens,), _ = llama.generate(
        [llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)], 8, temperature=0, stop_tokens=[]
    )
    monkeypatch.setattr(llama.tokenizer, "eos_id", tokens[3])  # the 4th token generated ends the row
    stream = llama.text_completion_stream(PROMPTS[:1], max_gen_len=8, temperature=0)
    list(stream)
    assert stream.finish_reasons == ["stop"] and stream.tokens[0] == tokens[: tokens.index(tokens[3])]


def test_stream_gives_tokens_and_logprobs_as_they_come(llama):
    (expected,) = llama.text_completion(PROMPTS[:1], max_gen_len=6, temperature=0, logprobs=True, top_logprobs=2)
    stream = llama.text_completion_stream(PROMPTS[:1], max_gen_len=6, temperature=0, logprobs=True, top_logprobs=2)
    for step, _ in enumerate(stream):
        if step < 6:
            assert len(stream.tokens[0]) == len(stream.logprobs[0]) == len(stream.top_logprobs[0]) == step + 1
    assert [llama.tokenizer.decode([t]) for t in stream.tokens[0]] == expected["tokens"]
    assert stream.logprobs[0] == pytest.approx(expected["logprobs"], abs=1e-6)
    assert stream.top_logprobs[0][0][0][1] == pytest.approx(expected["top_logprobs"][0][0][1], abs=1e-6)
    assert stream.prompt_lens == [len(llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False))]
    assert stream.finish_reasons == ["length"]


def test_a_cancelled_row_stops_and_the_others_go_on_as_alone(llama):
    alone = llama.text_completion(PROMPTS[1:2], max_gen_len=10, temperature=0, stop_tokens=[])
    stream = llama.text_completion_stream(PROMPTS[:2], max_gen_len=10, temperature=0, stop_tokens=[])
    pieces = []
    for step, step_pieces in enumerate(stream):
        pieces.append(step_pieces)
        if step == 2:
            stream.cancel(0)
    assert stream.finish_reasons == ["cancelled", "length"]
    assert len(stream.tokens[0]) == 3
    assert "".join(p[1] for p in pieces) == alone[0]["generation"]
    with pytest.raises(ValueError, match=r"row must be in \[0, 2\), got 5"):
        stream.cancel(5)


# --- compiled ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(make_llama) -> Llama:
    """One compiled model for the module: compiling costs seconds."""
    return make_llama(max_batch_size=4, compile=True)


def unique_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_greedy_tokens_and_logprobs_equal_eager_and_compile_once(llama, compiled):
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    eager = llama.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    fast = compiled.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    assert compiled.engine.compile_seconds is not None
    assert fast[0] == eager[0]
    assert all(a == pytest.approx(b, abs=1e-4) for a, b in zip(fast[1], eager[1]))

    graphs = (
        unique_graphs()
    )  # new prompt lengths, positions and contents, 3 or 4 rows (padded to 4): nothing new to compile
    for other in ([prompts[2] + prompts[0], prompts[1][:3], prompts[0]], prompts + [prompts[1][:2]]):
        assert (
            compiled.generate(other, max_gen_len=20, temperature=0)[0]
            == llama.generate(other, max_gen_len=20, temperature=0)[0]
        )
    assert unique_graphs() == graphs


@pytest.mark.parametrize("bsz", [1, 2, 3, 4])
def test_compiled_ragged_batch_decodes_to_the_end_of_the_context_as_eager(llama, compiled, bsz):
    """The last buckets attend over the whole cache: every batch size reaches the context's last position."""
    prompts = [llama.tokenizer.encode(PROMPTS[row % 3], bos=True, eos=False)[: 2 + 3 * row] for row in range(bsz)]
    eager = llama.generate(prompts, max_gen_len=None, temperature=0, stop_tokens=[], logprobs=True)
    fast = compiled.generate(prompts, max_gen_len=None, temperature=0, stop_tokens=[], logprobs=True)
    assert [len(p) + len(t) for p, t in zip(prompts, fast[0])] == [llama.model.params.max_seq_len] * bsz
    assert fast[0] == eager[0]
    assert all(a == pytest.approx(b, abs=1e-4) for a, b in zip(fast[1], eager[1]))


def test_compiled_sampling_penalties_streaming_and_stop_strings_equal_eager(llama, compiled):
    options = dict(
        max_gen_len=16,
        temperature=0.8,
        top_p=0.95,
        seed=3,
        num_return_sequences=2,
        stop_strings=["\n"],
        repetition_penalty=1.3,
    )
    assert compiled.text_completion(PROMPTS[:2], **options) == llama.text_completion(PROMPTS[:2], **options)
    streamed = ["".join(pieces) for pieces in zip(*compiled.text_completion_stream(PROMPTS[:2], **options))]
    assert streamed == [r["generation"] for r in llama.text_completion(PROMPTS[:2], **options)]


def test_a_later_run_loads_the_compiled_steps_from_the_compilers_cache(compiled):
    """Every graph of the compiled decode step is one inductor's cache can store (no ``torch.cond``, which
    it cannot): a later run, here a fresh trace after ``torch._dynamo.reset()``, loads greedy and sampling
    steps instead of compiling them again."""
    options = [dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=1, repetition_penalty=1.2)]
    first = [compiled.text_completion(PROMPTS[:2], max_gen_len=4, **o) for o in options]
    counters = torch._dynamo.utils.counters["inductor"]
    torch._dynamo.reset()
    bypassed, hits = counters["fxgraph_cache_bypass"], counters["fxgraph_cache_hit"]
    assert [compiled.text_completion(PROMPTS[:2], max_gen_len=4, **o) for o in options] == first
    assert counters["fxgraph_cache_bypass"] == bypassed
    assert counters["fxgraph_cache_hit"] >= hits + 2


def test_compiled_scoring_gives_the_eager_loss(llama):
    from llama.perplexity import window_loss

    windows = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    eager = window_loss(llama.model, windows, batch_size=2)
    graphs = unique_graphs()
    compiled = window_loss(llama.model, windows, batch_size=2, compile=True)
    assert unique_graphs() > graphs
    assert compiled["loss"] == pytest.approx(eager["loss"], abs=1e-5)
