"""Speculative decoding: prompt lookup's proposals, the acceptance rules, and generation with
speculate="lookup" and "draft" against plain decoding: the same greedy tokens and logprobs in ragged
batches (each row accepting its own counts, stopping where plain decoding stops), the same sampling
distribution (chi-square against the model's exact probabilities, computed by a full forward)."""

import functools
import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.checkpoints.writers import save_checkpoint
from llama.cli import check_speculation_flags, compile_line
from llama.engine import Engine, engine_options_for
from llama.engine.speculative import NgramIndex, accept_greedy, accept_sampled
from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama.options import GenerationOptions

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [  # ragged, and repetitive enough for prompt lookup to be accepted now and then
    "import os\nimport sys\nimport os\n",
    "def f(x):\n    return x + 1\n\ndef g(x):\n    return x",
    "class A:",
]


@pytest.fixture(scope="module")
def llama(make_llama) -> Llama:
    return make_llama(max_seq_len=96, max_batch_size=4)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of ``counts`` against ``probs``, cells expecting fewer than 5 pooled into one."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    expected = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = keep.sum() - 1
    return torch.special.gammaincc(dof / 2, statistic / 2).item()  # the chi-square survival function


# --- prompt lookup -------------------------------------------------------------------------------


def test_lookup_proposes_what_followed_the_latest_longest_match():
    assert NgramIndex([5, 1, 2, 7, 1, 2, 8, 9, 1, 2]).propose(3) == [8, 9, 1]  # (1, 2) last seen before 8
    assert NgramIndex([3, 1, 2, 7, 4, 1, 2, 8, 3, 1, 2]).propose(2) == [7, 4]  # the 3-gram (3, 1, 2) wins
    assert NgramIndex([1, 2, 3]).propose(4) == []  # no earlier occurrence


def test_lookup_continues_a_repeating_pattern_past_the_rows_end():
    assert NgramIndex([9, 4, 5, 4, 5]).propose(5) == [4, 5, 4, 5, 4]
    assert NgramIndex([7, 7]).propose(3) == [7, 7, 7]


def test_lookup_indexes_tokens_added_later():
    index = NgramIndex([1, 2, 3])
    assert index.propose(2) == []
    index.extend([4, 2, 3])
    assert index.propose(2) == [4, 2]


# --- the acceptance rules ------------------------------------------------------------------------


def test_greedy_acceptance_keeps_the_prefix_the_model_agrees_with():
    choices = torch.tensor([[4, 5, 6, 7], [4, 5, 6, 7], [4, 5, 6, 7]])
    proposals = torch.tensor([[4, 5, 6], [4, 9, 6], [1, 5, 6]])
    accepted, tokens = accept_greedy(choices, proposals, torch.tensor([3, 3, 3]))
    assert accepted.tolist() == [3, 1, 0]  # all, then the bonus token 7; one; none
    assert tokens.tolist() == choices.tolist()
    accepted, _ = accept_greedy(choices, proposals, torch.tensor([2, 0, 3]))  # a row accepts at most its limit
    assert accepted.tolist() == [2, 0, 0]


@pytest.mark.parametrize("draft", ["point mass", "random"])
def test_sampled_acceptance_emits_the_models_distribution(draft):
    """Every emitted position is distributed as p, whatever q: the first emitted token (accepted or
    replaced) and, given the first was accepted, the second."""
    torch.manual_seed(0)
    bsz, k, vocab = 40000, 2, 6
    p = torch.softmax(2 * torch.randn(k + 1, vocab), dim=-1).expand(bsz, k + 1, vocab)
    if draft == "point mass":
        q, proposals = None, torch.tensor([[1, 2]]).expand(bsz, k)
    else:
        q = torch.softmax(2 * torch.randn(k, vocab), dim=-1)
        proposals = torch.multinomial(q, bsz, replacement=True).T  # (bsz, k), each column from its q
        q = q.expand(bsz, k, vocab)
    limits = torch.full((bsz,), k)
    accepted, tokens = accept_sampled(
        p, proposals, q, limits, torch.rand(bsz, k), lambda probs: torch.multinomial(probs, 1)[:, 0]
    )
    assert chi_square_p_value(torch.bincount(tokens[:, 0], minlength=vocab), p[0, 0]) > 1e-3
    second = tokens[accepted >= 1, 1]
    assert chi_square_p_value(torch.bincount(second, minlength=vocab), p[0, 1]) > 1e-3
    assert 0 < (accepted == k).sum() < bsz  # some rows took the bonus token, not all


# --- greedy generation: exactly plain decoding -----------------------------------------------------


def generate_both(llama, prompts, speculate="lookup", **options):
    """Greedy text_completion without and with speculation."""
    plain = llama.text_completion(prompts, temperature=0, logprobs=True, **options)
    return plain, llama.text_completion(prompts, temperature=0, logprobs=True, speculate=speculate, **options)


def assert_same(plain, fast):
    for expected, got in zip(plain, fast):
        assert got["generation"] == expected["generation"]
        assert got["tokens"] == expected["tokens"]
        assert got["logprobs"] == pytest.approx(expected["logprobs"], abs=1e-4)


def run_speculation(llama, prompts, **options):
    """The finished request, whose rows count their speculative steps and accepted proposals."""
    return llama.decode(
        [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts],
        "prompt",
        temperature=0,
        logprobs=True,
        **options,
    )


def test_greedy_lookup_returns_plain_greedy_tokens_in_a_ragged_batch(llama):
    plain = llama.generate(
        [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS],
        40,
        temperature=0,
        logprobs=True,
        stop_tokens=[],
    )
    request = run_speculation(llama, PROMPTS, max_gen_len=40, stop_tokens=[], speculate="lookup")
    tokens, logprobs = request.results()
    assert tokens == plain[0]
    for got, expected in zip(logprobs, plain[1]):
        assert got == pytest.approx(expected, abs=1e-4)
    rows = request.rows
    assert (
        len({(row.speculative_steps, row.accepted) for row in rows}) == 3 and max(row.accepted for row in rows) > 0
    )  # ragged
    # 39 tokens after the first: each step gives its accepted proposals and one token (the last step
    # may give more than are left)
    assert (
        all(row.speculative_steps + row.accepted >= 39 for row in rows)
        and sum(row.speculative_steps for row in rows) < 3 * 39
    )


def test_a_speculating_request_and_a_plain_one_share_the_steps(llama):
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:2]]
    alone = [llama.generate([prompt], 20, temperature=0, stop_tokens=[])[0][0] for prompt in prompts]
    fast = llama.engine.submit(
        prompts[:1], GenerationOptions(max_gen_len=20, temperature=0, stop_tokens=[], speculate="lookup")
    )
    plain = llama.engine.submit(prompts[1:], GenerationOptions(max_gen_len=20, temperature=0, stop_tokens=[]))
    while not (fast.done and plain.done):
        llama.engine.step()
    assert [fast.tokens[0], plain.tokens[0]] == alone
    assert plain.rows[0].speculative_steps > 0 and plain.rows[0].accepted == 0  # it took part, accepting nothing


@pytest.mark.parametrize("k", [1, 8])
def test_greedy_lookup_equals_plain_for_each_k(llama, k):
    assert_same(*generate_both(llama, PROMPTS, max_gen_len=16, speculate_k=k, stop_tokens=[]))


def test_greedy_lookup_stops_exactly_where_plain_decoding_stops(llama):
    free = llama.text_completion(PROMPTS, temperature=0, max_gen_len=24, stop_tokens=[])
    (ids,), _ = llama.generate(
        [llama.tokenizer.encode(PROMPTS[1], bos=True, eos=False)], 24, temperature=0, stop_tokens=[]
    )
    stop_token = ids[7]  # ends row 1 at its 8th token, or before
    stop_string = free[0]["generation"][12:15]
    plain, fast = generate_both(llama, PROMPTS, max_gen_len=24, stop_tokens=[stop_token], stop_strings=[stop_string])
    assert_same(plain, fast)
    assert len(fast[1]["tokens"]) <= 7 and stop_string not in fast[0]["generation"]
    for max_gen_len in (0, 1, 5):
        assert_same(*generate_both(llama, PROMPTS, max_gen_len=max_gen_len, stop_tokens=[]))


def test_greedy_lookup_reaches_the_end_of_the_context(make_llama):
    llama = make_llama(max_seq_len=32, max_batch_size=3)
    plain, fast = generate_both(llama, PROMPTS, max_gen_len=None, stop_tokens=[], speculate_k=6)
    assert_same(plain, fast)
    assert len(llama.tokenizer.encode(PROMPTS[2], bos=True, eos=False)) + len(fast[2]["tokens"]) == 32


def test_greedy_lookup_with_repetition_penalty_and_top_logprobs(llama):
    options = dict(max_gen_len=20, stop_tokens=[], repetition_penalty=1.3, top_logprobs=2)
    plain, fast = generate_both(llama, PROMPTS, **options)
    assert_same(plain, fast)
    assert [row["top_logprobs"][3][1][0] for row in fast] == [row["top_logprobs"][3][1][0] for row in plain]


def test_speculative_stream_yields_the_text_of_the_call(llama):
    (expected,) = llama.text_completion(PROMPTS[:1], temperature=0, max_gen_len=12, speculate="lookup")
    stream = llama.text_completion_stream(PROMPTS[:1], temperature=0, max_gen_len=12, speculate="lookup")
    assert "".join(piece for (piece,) in stream) == expected["generation"]
    assert stream.finish_reasons == ["length"] and len(stream.tokens[0]) == 12


# --- a draft model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_draft(make_checkpoint, tokenizer_path):
    """A smaller random model with the same vocabulary."""
    ckpt_dir, _ = make_checkpoint(params={"dim": 32, "n_layers": 1, "n_heads": 4, "multiple_of": 16}, seed=3)
    return ckpt_dir


@pytest.mark.parametrize("draft", ["other model", "int8 self"])
def test_greedy_draft_returns_plain_greedy_tokens(checkpoint, tokenizer_path, other_draft, draft):
    ckpt_dir, _ = checkpoint
    build = (
        dict(draft_ckpt_dir=other_draft)
        if draft == "other model"
        else dict(draft_ckpt_dir=ckpt_dir, draft_quantize="int8")
    )
    llama = Llama.build(ckpt_dir, tokenizer_path, 96, 4, device="cpu", dtype="float32", **build)
    plain, fast = generate_both(llama, PROMPTS, max_gen_len=20, stop_tokens=[], speculate="draft", speculate_k=3)
    assert_same(plain, fast)
    if draft == "other model":  # it rarely agrees: exactness is all there is to check
        return
    request = run_speculation(llama, PROMPTS, max_gen_len=20, stop_tokens=[], speculate="draft", speculate_k=3)
    assert (
        min(row.accepted / row.speculative_steps for row in request.rows) > 2
    )  # the quantized copy nearly always agrees
    (ids,), _ = llama.generate(
        [llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)], 20, temperature=0, stop_tokens=[]
    )
    stops = dict(stop_tokens=[ids[5]], stop_strings=[plain[2]["generation"][6:9]])
    assert_same(*generate_both(llama, PROMPTS, max_gen_len=20, speculate="draft", **stops))


@pytest.mark.parametrize("speculate", ["lookup", "draft"])
def test_greedy_speculation_over_int8_pools_returns_their_plain_greedy_tokens(checkpoint, tokenizer_path, speculate):
    """The model's and the int8 self-draft's pools both stored in int8, in the same block tables."""
    ckpt_dir, _ = checkpoint
    llama = Llama.build(
        ckpt_dir,
        tokenizer_path,
        96,
        4,
        device="cpu",
        dtype="float32",
        kv_cache_dtype="int8",
        draft_ckpt_dir=ckpt_dir,
        draft_quantize="int8",
    )
    assert {model.layers[0].attention.kv_cache.cache_k.dtype for model in (llama.model, llama.engine.draft)} == {
        torch.int8
    }
    plain, fast = generate_both(llama, PROMPTS, max_gen_len=20, stop_tokens=[], speculate=speculate, speculate_k=3)
    assert_same(plain, fast)
    request = run_speculation(llama, PROMPTS, max_gen_len=20, stop_tokens=[], speculate=speculate, speculate_k=3)
    assert max(row.accepted for row in request.rows) > 0


def test_a_draft_with_another_vocabulary_is_refused(checkpoint, tokenizer_path, tmp_path):
    ckpt_dir, _ = checkpoint
    args = ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=300)
    save_checkpoint(str(tmp_path), {"dim": 32, "n_layers": 1, "n_heads": 4}, Transformer(args).state_dict())
    with pytest.raises(
        ValueError,
        match=rf"draft checkpoint {tmp_path} has a vocabulary of 300 tokens "
        rf".*consolidated.00.pth.* {tokenizer_path} has 512",
    ):
        Llama.build(ckpt_dir, tokenizer_path, 32, 1, device="cpu", draft_ckpt_dir=str(tmp_path))


def test_speculation_options_are_checked(llama):
    with pytest.raises(ValueError, match=r"speculate must be one of \(None, 'lookup', 'draft'\), got 'ngram'"):
        GenerationOptions(speculate="ngram")
    with pytest.raises(ValueError, match=r"speculate_k must be an integer in \[1, 16\], got 0"):
        GenerationOptions(speculate="lookup", speculate_k=0)
    with pytest.raises(ValueError, match="speculate='draft' needs a draft model: build with .*draft_ckpt_dir"):
        llama.text_completion(PROMPTS, speculate="draft")


def test_draft_quantize_without_a_draft_is_refused(checkpoint, tokenizer_path):
    with pytest.raises(ValueError, match="draft_quantize='int8' needs draft_ckpt_dir"):
        Llama.build(checkpoint[0], tokenizer_path, 32, 1, device="cpu", draft_quantize="int8")


# --- sampling: the model's distribution ------------------------------------------------------------

VOCAB = 16


def tiny_model(seed: int, max_batch_size: int, sharpness: float = 40.0) -> Transformer:
    """A random model of 16 tokens; ``sharpness`` scales its logits (40: far from uniform)."""
    torch.manual_seed(seed)
    model = Transformer(
        ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=VOCAB, max_batch_size=max_batch_size, max_seq_len=8)
    )
    with torch.no_grad():
        model.output.weight.mul_(sharpness)
    return model


def exact_sequence_probs(model: Transformer, prompt, n: int, temperature: float) -> torch.Tensor:
    """The probability of each of the VOCAB**n continuations of ``prompt``, by full forwards (no cache)."""
    continuations = torch.tensor(list(itertools.product(range(VOCAB), repeat=n)))  # (VOCAB**n, n)
    sequences = torch.cat([torch.tensor(prompt).expand(len(continuations), len(prompt)), continuations], dim=1)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(sequences)[:, len(prompt) - 1 : -1] / temperature, dim=-1)
    return logprobs.gather(-1, continuations[..., None])[..., 0].sum(-1).exp()


@pytest.mark.parametrize("speculate", [None, "lookup", "draft"])
def test_speculative_sampling_follows_the_models_distribution(speculate):
    rows, n, temperature = 3000, 3, 0.9
    prompt = [3, 5, 3]  # lookup proposes 5, 3, ... after the last 3
    model, draft = tiny_model(0, rows), tiny_model(7, rows, sharpness=4.0)  # a useless draft, accepted now and then
    engine = Engine(model, None, engine_options_for(model), draft)
    options = GenerationOptions(
        temperature=temperature,
        top_p=1.0,
        max_gen_len=n,
        stop_tokens=[],
        num_return_sequences=rows,
        speculate=speculate,
        speculate_k=2,
    )
    torch.manual_seed(1)
    request = engine.submit([prompt], options, stream_text=False)
    while not request.done:
        engine.step()
    tokens = request.tokens
    index = torch.tensor(tokens) @ (VOCAB ** torch.arange(n - 1, -1, -1))  # each continuation's number
    counts = torch.bincount(index, minlength=VOCAB**n)
    assert chi_square_p_value(counts, exact_sequence_probs(model, prompt, n, temperature)) > 1e-3
    if speculate is not None:  # some proposals accepted, not all
        assert 0 < sum(row.accepted for row in request.rows) < 2 * sum(row.speculative_steps for row in request.rows)


def test_seeded_speculative_sampling_is_reproducible_and_row_independent(llama):
    options = dict(temperature=0.8, max_gen_len=16, stop_tokens=[], seed=7, speculate="lookup")
    batch = llama.text_completion(PROMPTS, **options)
    assert llama.text_completion(PROMPTS, **options) == batch
    assert llama.text_completion(PROMPTS[1:2], **options) == batch[1:2]


@pytest.mark.parametrize("speculate", ["lookup", "draft"])
def test_speculative_sampling_returns_tempered_logprobs_of_the_full_forward_for_accepted_tokens_too(speculate):
    temperature, prompt = 0.7, [3, 5, 3]
    model, draft = tiny_model(0, 8), tiny_model(7, 8, sharpness=4.0)
    engine = Engine(model, None, engine_options_for(model), draft)
    options = GenerationOptions(
        temperature=temperature,
        max_gen_len=5,
        stop_tokens=[],
        num_return_sequences=8,
        seed=2,
        logprobs=True,
        tempered_logprobs=True,
        speculate=speculate,
        speculate_k=2,
    )
    request = engine.submit([prompt], options, stream_text=False)
    while not request.done:
        engine.step()
    assert sum(row.accepted for row in request.rows) > 0
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens for tokens in request.tokens]))[:, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(-1, torch.tensor(request.tokens)[..., None])
    torch.testing.assert_close(torch.tensor(request.logprobs), expected[..., 0], atol=1e-4, rtol=0)


# --- compiled ----------------------------------------------------------------------------------


def test_compiled_speculative_decoding_equals_eager(make_llama, llama):
    compiled = make_llama(max_seq_len=96, max_batch_size=4, compile=True)
    options = dict(temperature=0, max_gen_len=20, stop_tokens=[], logprobs=True, speculate="lookup", speculate_k=3)
    assert_same(
        llama.text_completion(PROMPTS, **{**options, "speculate": None}), compiled.text_completion(PROMPTS, **options)
    )
    assert re.fullmatch(
        r"Compiled the verification pass in \d+\.\d s \(on first use, counted above\)", compile_line(compiled.engine)
    )


def test_after_warm_up_speculative_decoding_adds_no_graph(make_llama, checkpoint, monkeypatch):
    """Lookup and an int8 draft, greedy and sampled, batches of two and of one to the context's last
    position, after ``warm_up(speculate_k=3)``. Traced by dynamo's eager backend: the graphs are the
    ones inductor would compile, counted the same, in a fraction of the time."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    ckpt_dir, _ = checkpoint
    fast = make_llama(max_seq_len=32, max_batch_size=2, compile=True, draft_ckpt_dir=ckpt_dir, draft_quantize="int8")
    fast.engine.warm_up(speculate_k=3)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    prompt = fast.tokenizer.encode(PROMPTS[2], bos=True, eos=False)
    for speculate, sampling in itertools.product(
        ["lookup", "draft"], [dict(temperature=0), dict(temperature=0.8, seed=1)]
    ):
        options = dict(stop_tokens=[], speculate=speculate, speculate_k=3, **sampling)
        fast.text_completion(PROMPTS[:2], max_gen_len=8, **options)
        (tokens,), _ = fast.generate([prompt], max_gen_len=32, **options)
        assert len(prompt) + len(tokens) == 32
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


# --- the examples' flags -------------------------------------------------------------------------


def test_the_example_with_speculate_lookup_prints_the_plain_greedy_text(checkpoint, tokenizer_path):
    ckpt_dir, _ = checkpoint
    command = [
        sys.executable,
        "example_text_completion.py",
        "--ckpt_dir",
        ckpt_dir,
        "--tokenizer_path",
        tokenizer_path,
        "--max_gen_len",
        "12",
        "--temperature",
        "0",
        "--prompts",
        PROMPTS[1],
        "--device",
        "cpu",
    ]
    plain, fast = (
        subprocess.run(command + extra, cwd=ROOT, capture_output=True, text=True, timeout=120)
        for extra in ([], ["--speculate", "lookup"])
    )
    assert fast.returncode == 0, fast.stderr
    assert fast.stdout.split("> ", 1)[1].split("=====")[0] == plain.stdout.split("> ", 1)[1].split("=====")[0]


def test_speculation_flags_are_checked_before_loading():
    with pytest.raises(ValueError, match="speculate must be one of"):
        check_speculation_flags("ngrams", 4, None)
    with pytest.raises(ValueError, match="speculate='draft' needs a draft model"):
        check_speculation_flags("draft", 4, None)
    with pytest.raises(ValueError, match="--draft_ckpt_dir is used by --speculate draft only, got --speculate lookup"):
        check_speculation_flags("lookup", 4, "draft/")
