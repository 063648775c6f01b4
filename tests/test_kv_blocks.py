"""The KV cache as a pool of blocks: every row's greedy tokens and logprobs are the uncached model's
(the whole sequence recomputed at each step), across block boundaries, in ragged batches, with
chunked prefill, from a cached prefix, and after a preemption; the compiled step's two ways of
reading the pool decode as the eager one; the pool's limits are clear errors. The same for a pool
stored in 8 bits (``kv_cache_dtype``), against the uncached model whose attention reads its keys and
values as such a pool holds them; and what an 8-bit pool holds, takes and answers on the bundled model."""

import contextlib
import copy
import dataclasses
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from conftest import BUNDLED
from llama.engine import Engine
from llama.engine.block_manager import BlockManager
from llama.generation import Llama
from llama.layers.kv_cache import (
    NOT_HELD,
    BlockTables,
    CachePass,
    KVCache,
    block_starts,
    check_storage,
    dequantize,
    quantize,
)
from llama.options import EngineOptions, GenerationOptions

MAX_SEQ_LEN = 64  # four blocks of 16 per row
CACHE_DTYPES = [None, "int8", "float8_e4m3fn"]  # the model's dtype, and the two 8-bit pools
each_cache_dtype = pytest.mark.parametrize("llama", CACHE_DTYPES, indirect=True, ids=lambda dtype: dtype or "float")


@pytest.fixture(scope="module")
def llama(make_llama, request):
    """The engine of every test here; a test parametrized by ``each_cache_dtype`` gets one per pool dtype."""
    return make_llama(max_seq_len=MAX_SEQ_LEN, max_batch_size=4, kv_cache_dtype=getattr(request, "param", None))


def random_prompt(n: int, seed: int, vocab: int = 512):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def through_8_bits(x: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """``x`` (..., head_dim) as an 8-bit pool of ``storage`` holds it, written here apart from the pool's code:
    each vector divided by its absmax over the largest value ``storage`` holds, stored, and multiplied back."""
    scale = x.abs().amax(-1, keepdim=True) / (127 if storage == torch.int8 else 448)
    stored = (x / scale).round() if storage == torch.int8 else (x / scale).to(storage).float()
    return stored * scale


@contextlib.contextmanager
def attention_through_the_pool(model):
    """The uncached model's attention reads its keys and values as ``model``'s pool stores them."""
    storage = model.layers[0].attention.kv_cache.cache_k.dtype
    if storage not in (torch.int8, torch.float8_e4m3fn):
        yield
        return
    attention = F.scaled_dot_product_attention

    def stored(query, key, value, **options):
        return attention(query, through_8_bits(key, storage), through_8_bits(value, storage), **options)

    with mock.patch.object(F, "scaled_dot_product_attention", stored):
        yield


def uncached(model, prompt, n_tokens: int):
    """Greedy tokens and their logprobs from the model without a cache: the whole sequence each step (its
    attention reading keys and values in 8 bits where the model's pool stores them so)."""
    tokens, logprobs = list(prompt), []
    with torch.no_grad(), attention_through_the_pool(model):
        for _ in range(n_tokens):
            scores = torch.log_softmax(model(torch.tensor([tokens], device=model.output.weight.device))[0, -1], dim=-1)
            tokens.append(int(scores.argmax()))
            logprobs.append(float(scores[tokens[-1]]))
    return tokens[len(prompt) :], logprobs


def assert_uncached(model, prompt, tokens, logprobs):
    expected, expected_logprobs = uncached(model, prompt, len(tokens))
    assert tokens == expected
    assert logprobs == pytest.approx(expected_logprobs, abs=1e-4)


GREEDY = dict(temperature=0, stop_tokens=[], logprobs=True)


def compiled(llama, **policies):
    """The options of ``llama``'s engine, compiled: an engine of the same sizes for its model, or a copy."""
    return dataclasses.replace(llama.engine.options, compile=True, **policies)


def run(engine, requests):
    while not all(request.done for request in requests):
        engine.step()


@each_cache_dtype
def test_a_ragged_batch_across_block_boundaries_and_a_prompt_filling_the_context_equal_the_uncached_model(llama):
    prompts = [random_prompt(n, seed) for seed, n in enumerate([3, 17, 40, MAX_SEQ_LEN - 1])]
    tokens, logprobs = llama.generate(prompts, max_gen_len=20, **GREEDY)
    assert [len(t) for t in tokens] == [20, 20, 20, 1]  # the last row fills the context at once
    for prompt, row_tokens, row_logprobs in zip(prompts, tokens, logprobs):
        assert_uncached(llama.model, prompt, row_tokens, row_logprobs)


@pytest.mark.parametrize(
    "llama, attention",
    [(None, "gather"), (None, "flex"), ("int8", "gather"), ("int8", "flex"), ("float8_e4m3fn", "flex")],
    indirect=["llama"],
)
def test_the_compiled_step_gathering_or_reading_the_pool_with_flex_attention_decodes_to_the_end_of_the_context_as_eager(
    llama, attention
):
    """Three rows in four slots (the fourth idle, on the scratch block) across every block boundary up
    to the context's last position; the longest prompt in the first slot, so that the width stays 4.
    The compiled engine has a copy of the model: a pool of its own, not the one ``llama`` caches prefixes in."""
    prompts = [random_prompt(n, 50 + i) for i, n in enumerate([40, 17, 3])]
    eager = llama.generate(prompts, max_gen_len=None, **GREEDY)
    torch._dynamo.reset()  # no graph of an earlier test's engine of the same shapes serves this one
    engine = Engine(copy.deepcopy(llama.model), llama.tokenizer, compiled(llama, compiled_attention=attention))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    request = engine.submit(prompts, GenerationOptions(**GREEDY))
    run(engine, [request])
    assert engine.runner.attention == attention and torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
    assert [len(p) + len(t) for p, t in zip(prompts, request.tokens)] == [MAX_SEQ_LEN] * 3
    assert request.tokens == eager[0]
    assert all(a == pytest.approx(b, abs=1e-4) for a, b in zip(request.logprobs, eager[1]))


def test_the_compiled_flex_attention_step_of_a_bfloat16_model_scores_as_the_float32_model(llama):
    """bfloat16 is the dtype a quantized model computes in on a CPU, where inductor's FlexAttention
    kernel cannot take the next operation fused into it (the runner turns epilogue fusion off). The
    tiny model's near-ties make greedy bfloat16 tokens differ between any two kernels, so each chosen
    token is checked against the float32 model without a cache, on the same sequence: within bfloat16's
    error of its best token, and its logprob as the float32 model gives it."""
    prompts = [random_prompt(n, 60 + i) for i, n in enumerate([20, 5])]
    engine = Engine(copy.deepcopy(llama.model).to(torch.bfloat16), llama.tokenizer, compiled(llama))
    request = engine.submit(prompts, GenerationOptions(max_gen_len=12, **GREEDY))
    run(engine, [request])
    assert engine.runner.attention == "flex"
    for prompt, tokens, logprobs in zip(prompts, request.tokens, request.logprobs):
        with torch.no_grad():
            scores = torch.log_softmax(
                llama.model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1], dim=-1
            )  # (12, vocab)
        chosen = scores.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        assert (scores.max(dim=-1).values - chosen).max() < 0.02
        assert torch.allclose(torch.tensor(logprobs), chosen, atol=0.02)


def test_the_compiled_step_reads_the_pool_with_flex_attention_on_a_cpu_by_default_in_one_graph_per_width(llama):
    runner = Engine(llama.model, llama.tokenizer, compiled(llama)).runner
    assert runner.attention == "flex"
    stored = Engine(copy.deepcopy(llama.model), llama.tokenizer, compiled(llama, kv_cache_dtype="int8"))
    assert stored.runner.attention == "gather"  # FlexAttention would read an 8-bit pool dequantized whole
    assert Engine(llama.model, llama.tokenizer, llama.engine.options).runner.attention == "gather"
    assert {runner.decode_tables(2, kv_len).shape for kv_len in (1, 17, 40, MAX_SEQ_LEN)} == {
        (2, 4)
    }  # every length: one graph
    gather = Engine(llama.model, llama.tokenizer, compiled(llama, compiled_attention="gather")).runner
    assert [gather.decode_tables(2, kv_len).shape[1] for kv_len in (1, 40)] == [
        2,
        4,
    ]  # a bucket of blocks, the whole row
    with pytest.raises(ValueError, match=r"compiled_attention must be one of \('gather', 'flex'\), got 'paged'"):
        compiled(llama, compiled_attention="paged")


def test_block_starts_say_where_each_pool_block_sits_in_each_row_and_flex_attention_reads_one_token_per_row(llama):
    tables = torch.tensor([[3, 5, 0, 0], [0, 0, 0, 0], [6, 1, 2, 4]])  # a row of two blocks, an idle slot, a full row
    never = NOT_HELD
    assert block_starts(tables, n_blocks=7, block_size=16).tolist() == [
        [32, never, never, 0, never, 16, never],  # its blocks at 0 and 16, the scratch block after them
        [0, never, never, never, never, never, never],
        [never, 16, 32, never, 48, never, 0],
    ]
    tokens, positions = torch.tensor([[5, 6]]), torch.tensor([[3, 4]])
    cache = BlockTables(tables[:1], block_starts(tables[:1], n_blocks=7, block_size=16))
    with pytest.raises(
        ValueError, match=r"reading the pool in place \(BlockTables.starts given\) takes one token per row, got 2$"
    ):
        llama.model(tokens, positions=positions, cache=cache)


@each_cache_dtype
def test_a_prompt_prefilled_in_chunks_while_a_row_decodes_equals_the_uncached_model(llama):
    engine = Engine(llama.model, llama.tokenizer, dataclasses.replace(llama.engine.options, prefill_chunk=8))
    short, long = random_prompt(5, 10), random_prompt(50, 11)
    first = engine.submit([short], GenerationOptions(max_gen_len=20, **GREEDY))
    engine.step()
    second = engine.submit([long], GenerationOptions(max_gen_len=12, **GREEDY))
    engine.step()
    assert 0 < second.rows[0].prefilled < len(long)  # in chunks: the first row decodes meanwhile
    run(engine, [first, second])
    for prompt, request in [(short, first), (long, second)]:
        assert_uncached(llama.model, prompt, request.tokens[0], request.logprobs[0])


@each_cache_dtype
def test_a_prefix_hit_ending_mid_block_reuses_whole_blocks_only_and_gives_the_uncached_answer(llama):
    engine = Engine(llama.model, llama.tokenizer, llama.engine.options)
    prompt = random_prompt(40, 20)
    first = engine.submit([prompt], GenerationOptions(max_gen_len=10, **GREEDY))
    run(engine, [first])
    # shares 37 tokens with the first prompt: two whole blocks (32 tokens) are reused, the rest computed
    others = [prompt[:37] + random_prompt(8, 21), prompt, prompt + first.tokens[0]]
    requests = [engine.submit([tokens], GenerationOptions(max_gen_len=6, **GREEDY)) for tokens in others]
    run(engine, requests)
    # the same prompt: all but the block of its last token; with the first's output: its generated blocks too
    assert [request.cached_tokens for request in [first] + requests] == [0, 32, 32, 48]
    for tokens, request in zip(others, requests):
        assert_uncached(llama.model, tokens, request.tokens[0], request.logprobs[0])


def test_after_reset_prefix_cache_a_prompt_run_before_finds_nothing_cached_and_the_pool_is_whole(llama):
    engine = Engine(llama.model, llama.tokenizer, llama.engine.options)
    prompt, options = random_prompt(40, 50), GenerationOptions(max_gen_len=4, **GREEDY)
    first = engine.submit([prompt], options)
    run(engine, [first])
    again = engine.submit([prompt], options)
    run(engine, [again])
    available = engine.scheduler.blocks.available
    running = engine.submit([prompt], options)
    engine.step()
    with pytest.raises(ValueError, match="rows are still in the engine: 1 running, 0 preempted, 0 waiting"):
        engine.reset_prefix_cache()
    run(engine, [running])
    engine.reset_prefix_cache()
    assert engine.scheduler.blocks.available == available
    after = engine.submit([prompt], options)
    run(engine, [after])
    assert [request.cached_tokens for request in [first, again, after]] == [0, 32, 0]
    assert after.tokens == first.tokens


def test_after_the_weights_change_and_the_prefix_cache_is_reset_greedy_tokens_are_a_fresh_engines(make_llama):
    trained = make_llama(max_seq_len=MAX_SEQ_LEN, max_batch_size=4)  # its own weights, changed below
    engine, prompt, options = trained.engine, random_prompt(40, 60), GenerationOptions(max_gen_len=8, **GREEDY)
    before = engine.submit([prompt], options)
    run(engine, [before])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a training step, in place
        for parameter in trained.model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator).to(parameter.device))
    engine.reset_prefix_cache()
    after = engine.submit([prompt], options)
    run(engine, [after])
    fresh = Engine(trained.model, trained.tokenizer, engine.options)
    expected = fresh.submit([prompt], options)
    run(fresh, [expected])
    assert after.cached_tokens == 0 and after.tokens == expected.tokens != before.tokens
    assert after.logprobs[0] == pytest.approx(expected.logprobs[0], abs=1e-4)


@each_cache_dtype
def test_rows_preempted_from_a_full_pool_are_recomputed_and_answer_as_alone_with_nothing_streamed_twice(
    make_llama, llama
):
    """A greedy, a seeded and a speculating row in a pool that holds little more than one of them."""
    small = make_llama(  # 4 blocks for 3 rows of 3 blocks
        max_seq_len=MAX_SEQ_LEN,
        max_batch_size=4,
        kv_cache_tokens=64,
        kv_cache_dtype=llama.engine.options.kv_cache_dtype,
    )
    options = [
        GenerationOptions(max_gen_len=30, **GREEDY),
        GenerationOptions(max_gen_len=30, temperature=1.0, seed=3, stop_tokens=[]),
        GenerationOptions(max_gen_len=30, temperature=0, stop_tokens=[], speculate="lookup", speculate_k=3),
    ]
    prompts = [random_prompt(10, 30 + i) for i in range(3)]
    requests = [small.engine.submit([prompt], options[i]) for i, prompt in enumerate(prompts)]
    streamed = [[] for _ in requests]
    while not all(request.done for request in requests):
        small.engine.step()
        for request, tokens in zip(requests, streamed):
            while not request.deltas.empty():
                deltas = request.deltas.get()
                tokens += [token for delta in deltas or [] for token in delta.tokens]
    assert small.engine.preemptions > 0
    for i, (prompt, request) in enumerate(zip(prompts, requests)):
        assert streamed[i] == request.tokens[0] and len(request.tokens[0]) == 30
        (alone,), _ = llama.generate(
            [prompt], **{**dataclasses.asdict(options[i]), "logprobs": False, "speculate": None}
        )
        assert request.tokens[0] == alone
    assert_uncached(small.model, prompts[0], requests[0].tokens[0], requests[0].logprobs[0])


@pytest.mark.parametrize("kv_cache_dtype", CACHE_DTYPES)
def test_a_prompt_larger_than_the_pool_is_refused_and_a_lone_row_ends_where_the_pool_does(make_llama, kv_cache_dtype):
    small = make_llama(max_seq_len=MAX_SEQ_LEN, max_batch_size=2, kv_cache_tokens=32, kv_cache_dtype=kv_cache_dtype)
    with pytest.raises(
        ValueError, match=r"need 3 blocks of 16 tokens, but the KV cache pool holds 2 \(kv_cache_tokens=32\)"
    ):
        small.generate([random_prompt(40, 40)], max_gen_len=4, temperature=0)
    (tokens,), _ = small.generate([random_prompt(10, 41)], max_gen_len=40, temperature=0, stop_tokens=[])
    assert len(tokens) == 32 - 10 + 1  # until the pool has no block for the last token's keys


def test_the_block_manager_counts_references_evicts_the_least_recently_used_and_checks_stored_tokens(monkeypatch):
    manager = BlockManager(n_blocks=5, block_size=2)  # blocks 1..4
    a, _ = manager.allocate([1, 2, 3, 4, 5], 5)  # three blocks
    manager.register(a, [1, 2, 3, 4, 5], written=5)
    b, cached = manager.allocate([1, 2, 3, 4, 9], 5)  # shares two blocks, needs one fresh
    assert cached == 4 and b.blocks[:2] == a.blocks[:2] and manager.available == 0
    assert manager.allocate([7, 7, 7], 3) is None  # nothing taken
    manager.release(b)
    manager.release(a)
    assert manager.available == 4 and manager.used == 0
    c, cached = manager.allocate([1, 2, 6, 6, 6, 6, 6], 7)  # the prefix [1, 2] still cached; [3, 4] evicted first
    assert cached == 2 and manager.allocate([1, 2, 3, 4, 0], 5) is None
    manager.release(c)
    assert BlockManager(5, 2, salt="another adapter").cached_prefix([1, 2, 3]) == []
    monkeypatch.setattr(BlockManager, "key", lambda self, previous, tokens: b"one key for all")
    manager = BlockManager(n_blocks=5, block_size=2)
    d, _ = manager.allocate([1, 2, 3], 3)
    manager.register(d, [1, 2, 3], written=3)
    assert manager.cached_prefix([5, 6, 7]) == []  # a colliding key with other tokens is no hit


def test_the_block_managers_reset_frees_every_cached_block_and_waits_for_rows_to_give_theirs_back():
    manager = BlockManager(n_blocks=5, block_size=2)  # blocks 1..4
    a, _ = manager.allocate([1, 2, 3, 4, 5], 5)
    manager.register(a, [1, 2, 3, 4, 5], written=5)
    with pytest.raises(ValueError, match=r"3 block\(s\) are held by rows"):
        manager.reset_prefix_cache()
    keyed = a.blocks[:2]
    manager.release(a)
    assert manager.cached_prefix([1, 2, 3, 4, 5]) == keyed
    manager.reset_prefix_cache()
    assert manager.available == 4 and manager.cached_prefix([1, 2, 3, 4, 5]) == []
    b, cached = manager.allocate([1, 2, 3, 4, 5, 6, 7], 7)
    assert cached == 0 and sorted(b.blocks) == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def bundled_float():
    return Llama.build(str(BUNDLED), max_seq_len=128, max_batch_size=3, device="cpu", dtype="float32")


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "float8_e4m3fn"])
def test_the_bundled_models_greedy_tokens_from_an_8_bit_pool_are_the_float_pools_on_the_readmes_prompts(
    bundled_float, kv_cache_dtype, example_script
):
    """The README's first command, example_text_completion.py, completes these prompts on the bundled model."""
    prompts = [
        bundled_float.tokenizer.encode(p, bos=True, eos=False)
        for p in example_script("example_text_completion.py").CODE_PROMPTS
    ]
    stored = Llama.build(
        str(BUNDLED), max_seq_len=128, max_batch_size=3, device="cpu", dtype="float32", kv_cache_dtype=kv_cache_dtype
    )
    assert stored.kv_cache_dtype == getattr(torch, kv_cache_dtype) and bundled_float.kv_cache_dtype == torch.float32
    expected, _ = bundled_float.generate(prompts, max_gen_len=32, temperature=0, stop_tokens=[])
    tokens, _ = stored.generate(prompts, max_gen_len=32, temperature=0, stop_tokens=[])
    assert tokens == expected


@pytest.mark.parametrize("storage", [torch.int8, torch.float8_e4m3fn])
def test_an_8_bit_pool_takes_a_byte_per_value_and_a_scale_per_token_and_head_under_0_3_of_float32(storage):
    """At head_dim 64 (Llama 2 7B's is 128): (64 + 4) / 256 = 0.27 of a float32 pool with float32 scales on a
    CPU, (64 + 2) / 128 = 0.52 of a bfloat16 pool with bfloat16 scales, where attention computes in bfloat16."""
    heads, head_dim, blocks, block_size = 4, 64, 9, 16
    for dtype, ratio in ((torch.float32, 0.3), (torch.bfloat16, 0.53)):
        stored, full = (KVCache(heads, head_dim, blocks, block_size, dtype, s) for s in (storage, None))
        assert stored.nbytes == 2 * heads * blocks * block_size * (head_dim + dtype.itemsize)
        assert full.nbytes == 2 * heads * blocks * block_size * head_dim * dtype.itemsize
        assert stored.nbytes <= ratio * full.nbytes


@pytest.mark.parametrize("storage", [torch.int8, torch.float8_e4m3fn])
def test_a_decode_step_reads_an_8_bit_pool_alike_row_by_row_and_all_rows_at_once(storage):
    """A CPU's eager step reads each row's blocks in turn, a GPU's (and the compiled step) every row at once:
    both give the attention of the dequantized keys and values, rows of different lengths and held blocks."""
    heads, n_heads, head_dim, block_size = 2, 4, 8, 4
    pool = KVCache(heads, head_dim, 9, block_size, torch.float32, storage)
    tables = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 0]])  # each row's blocks, then scratch
    lengths = torch.tensor([11, 6, 12])
    positions = torch.arange(12).expand(3, 12)
    generator = torch.Generator().manual_seed(0)
    xk, xv = (torch.randn(3, 12, heads, head_dim, generator=generator) for _ in range(2))
    pool.update(CachePass.of(BlockTables(tables, lengths=lengths), positions, pool), xk, xv)
    assert not pool.scale_k[:, 5, 2:].any()  # row 1's padding, positions 6 and 7, went to the scratch block
    xq = torch.randn(3, n_heads, 1, head_dim, generator=generator)
    where = CachePass.of(BlockTables(tables), (lengths - 1)[:, None], pool)
    rows = pool.attend_stored(xq, where)
    every_row = pool.attend_rows(xq, where.gather, where.mask)
    keys, values = pool.gather(where)
    expected = F.scaled_dot_product_attention(xq, keys, values, attn_mask=where.mask, enable_gqa=True)
    torch.testing.assert_close(rows, every_row, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=1e-4)


def test_an_int8_built_llamas_pool_holds_its_tokens_with_their_scales(bundled_float):
    """Every layer's pool: (blocks of the rows' contexts + the scratch block) x 16 tokens x (6 heads of
    32 values + their float32 scales), keys and values; the engine reports it for /metrics."""
    stored = Llama.build(str(BUNDLED), max_seq_len=128, max_batch_size=3, device="cpu", kv_cache_dtype="int8")
    tokens = (1 + 3 * 128 // 16) * 16
    assert stored.engine.kv_cache_bytes == 4 * tokens * 2 * 6 * (32 + 4)  # 4 layers
    assert bundled_float.engine.kv_cache_bytes == 4 * tokens * 2 * 6 * 32 * 4
    assert stored.engine.pool_use()["bytes"] == stored.engine.kv_cache_bytes


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_quantization_is_within_half_a_step_absmax_over_254_of_each_value(scale_dtype):
    """Vectors of every magnitude and a zero one; the scale rounded to bfloat16 before the values are divided
    by it keeps the bound but for the rounding of the dequantized value itself to bfloat16."""
    x = torch.randn(64, 3, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-4, 4, 64)[:, None, None]
    x[0, 0] = 0
    stored, scale = quantize(x, torch.int8, scale_dtype)
    assert stored.dtype == torch.int8 and scale.dtype == scale_dtype and scale.shape == (64, 3, 1)
    absmax = x.abs().amax(-1, keepdim=True)
    rounding = 0 if scale_dtype == torch.float32 else absmax * 2**-8  # bfloat16's half step of the largest value
    error = (dequantize(stored, scale).float() - x).abs()
    assert (error <= absmax / 254 * (1 + 1e-6) + rounding).all()
    assert (stored[0, 0] == 0).all() and (dequantize(stored, scale)[0, 0] == 0).all()


def test_float8_quantization_keeps_each_value_to_3_bits_of_mantissa():
    """e4m3: within 1/16 of each value, or of 2^-10 x the scale below the normal range."""
    x = torch.randn(64, 3, 64, generator=torch.Generator().manual_seed(1)) * torch.logspace(-4, 4, 64)[:, None, None]
    stored, scale = quantize(x, torch.float8_e4m3fn, torch.float32)
    error = (dequantize(stored, scale) - x).abs()
    assert (error <= torch.maximum(x.abs() / 16, scale * 2**-10) * (1 + 1e-6)).all()


def test_an_unknown_kv_cache_dtype_and_a_device_without_float8_are_one_line_naming_what_would_work():
    with pytest.raises(
        ValueError,
        match=r"kv_cache_dtype must be one of \('int8', 'float8_e4m3fn'\) or None \(the model's dtype\), "
        "got 'int4'$",
    ):
        EngineOptions(kv_cache_dtype="int4")
    check_storage(torch.float8_e4m3fn, torch.device("cpu"))  # this torch copies and casts float8 on a CPU
    with mock.patch.object(
        torch.Tensor, "to", side_effect=RuntimeError("\"copy_\" not implemented for 'Float8_e4m3fn'")
    ):
        with pytest.raises(
            ValueError,
            match=r"^kv_cache_dtype float8_e4m3fn needs a device where torch writes, indexes and casts "
            r"torch.float8_e4m3fn, which it does not on cpu \(\"copy_\" not implemented for 'Float8_e4m3fn'\): "
            "use kv_cache_dtype int8, or the default$",
        ):
            check_storage(torch.float8_e4m3fn, torch.device("cpu"))
