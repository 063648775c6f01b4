"""The fast paths give the tokens of the reference path: logits for chosen positions only, a ragged
batch prefilled in one pass with per-row positions, and int8 weight-only matmuls."""

import pytest
import torch

from conftest import SMALL_PARAMS, quantize_linears, random_state, to_transformers
from llama.layers.quantize import Quantization, linear, quantize_weight, quantized_cpu_dtype
from llama.model import ModelArgs, Transformer


def small_model(max_seq_len: int, max_batch_size: int, dtype=torch.float32) -> Transformer:
    args = ModelArgs.from_dict(
        {**SMALL_PARAMS, "vocab_size": 512, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size}
    )
    model = Transformer(args)
    model.load_state_dict(random_state(args))
    model.to(dtype)  # the cache too: Meta's forward(tokens, start_pos) attends in the model's dtype
    return model


def greedy_alone(model: Transformer, prompt: list, n_tokens: int) -> list:
    """Meta's path for one prompt: prefill at start_pos 0, then one token per step."""
    logits = model(torch.tensor([prompt]), 0)
    out = [int(logits[0, -1].argmax())]
    for pos in range(len(prompt), len(prompt) + n_tokens - 1):
        out.append(int(model(torch.tensor([[out[-1]]]), pos)[0, -1].argmax()))
    return out


def test_logits_at_gives_transformers_logits_of_the_chosen_positions_only():
    model = small_model(64, 2)
    hf = to_transformers({k: v for k, v in model.state_dict().items() if "cache" not in k}, SMALL_PARAMS, 512)
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(tokens).logits
    last = model(tokens, 0, logits_at=-1)
    chosen = model(tokens, 0, logits_at=torch.tensor([5, 19]))
    assert last.shape == (2, 1, 512) and chosen.shape == (2, 1, 512)
    assert torch.allclose(last[:, 0], theirs[:, -1], atol=1e-4)
    assert torch.allclose(chosen[:, 0], theirs[[0, 1], [5, 19]], atol=1e-4)


def test_forward_without_logits_at_still_returns_every_position():
    model = small_model(64, 1)
    assert model(torch.zeros(1, 7, dtype=torch.long), 0).shape == (1, 7, 512)


def test_ragged_batch_prefilled_in_one_pass_continues_each_prompt_exactly_as_alone():
    model = small_model(520, 2)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (8, 500)]
    n_tokens = 6
    alone = [greedy_alone(model, p, n_tokens) for p in prompts]

    lengths = torch.tensor([len(p) for p in prompts])
    grid = torch.zeros(2, int(lengths.max()), dtype=torch.long)  # right-padded with token 0
    for row, p in enumerate(prompts):
        grid[row, : len(p)] = torch.tensor(p)
    logits = model(grid, 0, logits_at=lengths - 1)  # the one prefill pass, both rows
    batched = [logits[:, 0].argmax(-1)]
    for step in range(n_tokens - 1):  # each row decodes at its own position
        logits = model(batched[-1][:, None], lengths + step)
        batched.append(logits[:, 0].argmax(-1))
    assert torch.stack(batched, dim=1).tolist() == alone


def test_quantized_weight_is_within_half_a_step_of_the_original():
    weight = torch.randn(16, 32)
    q, scales = quantize_weight(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert ((q.float() * scales[:, None] - weight).abs() <= scales[:, None] / 2 + 1e-7).all()


def test_int8_matmul_equals_the_matmul_with_the_dequantized_weight():
    weight, x = torch.randn(48, 64), torch.randn(3, 5, 64).bfloat16()
    q, scales = quantize_weight(weight)
    expected = x.float() @ (q.float() * scales.bfloat16().float()[:, None]).T
    assert torch.allclose(linear(x, q, scales.bfloat16()).float(), expected, rtol=2e-2, atol=2e-2)


def test_int8_model_decodes_like_the_bfloat16_model_holding_the_dequantized_weights():
    quantized = quantize_linears(small_model(64, 1, torch.bfloat16), Quantization(8))
    dequantized = small_model(64, 1, torch.bfloat16)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if getattr(module, "scales", None) is not None:
                target = dequantized.get_submodule(name)
                target.weight.copy_(module.weight.float() * module.scales.float()[:, None])
    prompt = torch.randint(3, 512, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    assert greedy_alone(quantized, prompt, 10) == greedy_alone(dequantized, prompt, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_takes_the_embedding_dtype_after_int8_quantization(dtype):
    model = quantize_linears(small_model(16, 1, dtype), Quantization(8))
    model.setup_cache(3, 16)
    assert model.layers[0].attention.kv_cache.cache_k.dtype == dtype


def test_a_bfloat16_model_on_a_cpu_caches_and_attends_in_float32(make_checkpoint, tokenizer_path):
    from llama.generation import Llama

    ckpt_dir, state = make_checkpoint()
    llama = Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", dtype="bfloat16")
    assert llama.model.layers[0].attention.kv_cache.cache_k.dtype == torch.float32
    assert llama.model.layers[0].attention.wqkv.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(7))
    hf = to_transformers({k: v.float() for k, v in state.items()}, SMALL_PARAMS, 512)
    with torch.no_grad():
        theirs = hf(tokens).logits
    cached = llama.model(tokens, 0)  # through the float32 cache
    assert cached.dtype == torch.float32
    assert (cached - theirs).abs().max() <= 0.05 * theirs.abs().max()  # bfloat16 weights and activations


def test_build_with_int8_quantizes_every_linear_and_computes_in_the_cpus_quantized_dtype(
    make_checkpoint, tokenizer_path
):
    from llama.generation import Llama

    ckpt_dir, _ = make_checkpoint()
    quantized = Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", quantize="int8")
    assert quantized.model.layers[1].feed_forward.w2.weight.dtype == torch.int8
    assert quantized.model.output.weight.dtype == torch.int8
    assert quantized.model.tok_embeddings.weight.dtype == quantized_cpu_dtype()  # bfloat16 on x86
    by_hand = Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", dtype=quantized_cpu_dtype())
    quantize_linears(by_hand.model, Quantization(8))
    prompts = [[1, 5, 9, 200], [1, 7]]
    assert quantized.generate(prompts, 12, temperature=0) == by_hand.generate(prompts, 12, temperature=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"quantize": "int3"},
            r"quantize must be None, 'int8', 'int4' or 'int4-gN' with N one of 32, 64, 128, 256, got 'int3'",
        ),
        (
            {"quantize": "int4-g64"},
            r"layers.0.feed_forward.w2: its 224 input features are not a multiple of the group size 64",
        ),
    ],
)
def test_bad_quantize_arguments(make_checkpoint, tokenizer_path, kwargs, message):
    from llama.generation import Llama

    ckpt_dir, _ = make_checkpoint()
    with pytest.raises(ValueError, match=message):
        Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", **kwargs)
