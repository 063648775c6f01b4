"""Weight-only quantization: the packed int4 matmul is the matmul with the dequantized weight, the
groups are as close to the weight as 4 bits allow, loading quantizes tensor by tensor so no
full-precision linear weight reaches the device, and bad settings are errors naming what works."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from conftest import ROOT, SMALL_PARAMS, quantize_linears
from llama.checkpoints import placement
from llama.checkpoints.loader import load_model
from llama.generation import Llama
from llama.layers.quantize import (
    INT4_GROUP_SIZES,
    Quantization,
    check_activation_dtype,
    check_int4_shapes,
    int4_groups,
    linear,
    parse_quantize,
    quantize_linear_weight,
    training_cpu_dtype,
)
from llama.model import ModelArgs
from test_speed_paths import greedy_alone, small_model


def dequantized_by_hand(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """W[n, k] = (q[n, k] - 8) * scale[k // group_size, n] + zero[k // group_size, n], element by element."""
    out_features, in_features = q.shape
    groups = torch.arange(in_features) // group_size  # (in,)
    scale = scales_and_zeros[groups, :, 0].T.float()  # (out, in)
    zero = scales_and_zeros[groups, :, 1].T.float()
    return (q.float() - 8) * scale + zero


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
def test_int4_groups_are_within_half_a_step_of_the_weight(group_size):
    weight = torch.randn(32, 512)
    q, scales_and_zeros = int4_groups(weight, group_size)
    assert q.min() >= 0 and q.max() <= 15 and scales_and_zeros.shape == (512 // group_size, 32, 2)
    step = scales_and_zeros[torch.arange(512) // group_size, :, 0].T  # (out, in)
    assert ((dequantized_by_hand(q, scales_and_zeros, group_size) - weight).abs() <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_int4_packed_matmul_equals_the_matmul_with_the_dequantized_weight(group_size, dtype, tolerance):
    weight, x = torch.randn(48, 512), torch.randn(3, 5, 512).to(dtype)
    packed, scales_and_zeros = quantize_linear_weight(weight, Quantization(4, group_size), "cpu")
    scales_and_zeros = scales_and_zeros.to(dtype)
    q, _ = int4_groups(weight, group_size)
    expected = x.float() @ dequantized_by_hand(q, scales_and_zeros, group_size).T  # (3, 5, 48)
    got = linear(x, packed, scales_and_zeros)
    assert got.shape == (3, 5, 48) and got.dtype == dtype
    assert torch.allclose(got.float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


UNPACK_CHECK = """
import torch
from llama.layers.quantize import pack_int4, unpack_int4
for shape in [(64, 128), (576, 192), (4096, 192), (128, 64)]:
    q = torch.randint(0, 16, shape, dtype=torch.int32)
    assert torch.equal(unpack_int4(pack_int4(q, "cpu"), shape[1]), q.to(torch.uint8)), shape
print(torch.backends.cpu.get_cpu_capability())
"""


@pytest.mark.parametrize("capability", [None, "avx2", "default"])
def test_the_cpu_kernels_int4_packing_is_unpacked_to_the_values_packed(capability):
    """The packing differs with the vector instructions torch's kernels use (ATEN_CPU_CAPABILITY picks
    them, None: this CPU's best): each is read back."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability} if capability else os.environ
    done = subprocess.run([sys.executable, "-c", UNPACK_CHECK], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert capability is None or done.stdout.strip() == capability.upper()


@pytest.mark.parametrize(
    "out_features", [128, 48]
)  # 48: rows the packing's blocks do not divide, dequantized by the kernel
@pytest.mark.parametrize(
    "requires_grad", [True, False]
)  # False: a block's first product, on an input that needs no gradient
def test_training_beside_int4_weights_multiplies_and_differentiates_by_the_dequantized_weight(
    out_features, requires_grad
):
    """Training (gradients on) multiplies by the dequantized int4 weight in float32: the product and the
    input's gradient are those of the weight ``int4_groups`` stands for, by hand."""
    weight = torch.randn(out_features, 256)
    packed, scales_and_zeros = quantize_linear_weight(weight, Quantization(4, 64), "cpu")
    q, _ = int4_groups(weight, 64)
    dense = dequantized_by_hand(q, scales_and_zeros, 64)
    x = torch.randn(2, 40, 256, requires_grad=requires_grad)
    y = linear(x, packed, scales_and_zeros)
    assert torch.allclose(y, x @ dense.T, atol=1e-4)
    if requires_grad:
        grad = torch.randn_like(y)
        y.backward(grad)
        assert torch.allclose(x.grad, grad @ dense, atol=1e-4)


def test_training_beside_int4_weights_computes_in_float32_on_a_cpu_without_bfloat16_instructions(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert training_cpu_dtype() == torch.float32
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert training_cpu_dtype() == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert training_cpu_dtype() == torch.float32


@pytest.mark.parametrize("capability, warned", [("AVX2", True), ("AVX512", False)])
def test_int4_on_a_cpu_whose_kernel_cannot_outpace_int8_is_said_at_load(
    make_checkpoint, monkeypatch, caplog, capability, warned
):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    ckpt_dir, _ = make_checkpoint(params={**SMALL_PARAMS, "multiple_of": 64})  # a hidden size of whole groups
    args = ModelArgs.from_dict(
        {**SMALL_PARAMS, "multiple_of": 64, "vocab_size": 512, "max_seq_len": 32, "max_batch_size": 1}
    )
    with caplog.at_level("WARNING", logger="llama.checkpoints.loader"):
        load_model(ckpt_dir, args, torch.device("cpu"), torch.bfloat16, Quantization(4, 32))
    assert ("int4 weights decode about as fast as int8 on this CPU (torch's AVX2 int4 kernel" in caplog.text) == warned


def test_int4_model_decodes_like_the_model_holding_the_dequantized_weights():
    quantized = quantize_linears(small_model(64, 1), Quantization(4, 32))
    dequantized = small_model(64, 1)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if getattr(module, "scales", None) is not None:
                q, scales_and_zeros = int4_groups(dequantized.get_submodule(name).weight, 32)
                dequantized.get_submodule(name).weight.copy_(dequantized_by_hand(q, scales_and_zeros, 32))
    prompt = torch.randint(3, 512, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    assert greedy_alone(quantized, prompt, 10) == greedy_alone(dequantized, prompt, 10)


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, None),
        ("int8", Quantization(8)),
        ("int4", Quantization(4, 64)),
        ("int4-g32", Quantization(4, 32)),
        ("int4-g256", Quantization(4, 256)),
    ],
)
def test_quantize_values(value, expected):
    assert parse_quantize(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("int3", r"quantize must be None, 'int8', 'int4' or 'int4-gN' with N one of 32, 64, 128, 256, got 'int3'"),
        ("int4-g48", r"the int4 group size must be one of \(32, 64, 128, 256\), got 48"),
        (8, r"quantize must be None, 'int8'.*got 8"),
    ],
)
def test_bad_quantize_values_name_the_ones_that_work(value, message):
    with pytest.raises(ValueError, match=message):
        parse_quantize(value)


def test_group_size_not_dividing_a_layer_names_the_layer_and_a_group_size_that_works(make_checkpoint, tokenizer_path):
    ckpt_dir, _ = make_checkpoint()  # the feed-forward's hidden size is 224 = 7 * 32
    message = (
        r"quantize='int4-g64' cannot hold .*layers.0.feed_forward.w2: its 224 input features "
        r"are not a multiple of the group size 64.*quantize='int4-g32' would work"
    )
    with pytest.raises(ValueError, match=message):
        Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", quantize="int4-g64")


def test_a_group_may_not_straddle_two_ranks_of_a_row_parallel_layer():
    # w2 of a 2048-wide feed-forward over 8 ranks: each rank holds 256 input features
    shapes = {"w2": (4096, 2048 // 8)}
    check_int4_shapes(shapes, Quantization(4, 256), world_size=8)
    with pytest.raises(
        ValueError, match=r"split over 16 ranks: w2: its 128 input features .* group size 256.*'int4-g128' would work"
    ):
        check_int4_shapes({"w2": (4096, 2048 // 16)}, Quantization(4, 256), world_size=16)


@pytest.mark.parametrize(
    "quantize, dtype, device, message",
    [
        ("int4", torch.float16, "cuda", r"quantize='int4-g64' on CUDA computes in bfloat16 only"),
        ("int4", torch.float32, "cuda", r"quantize='int4-g64' on CUDA computes in bfloat16 only"),
        ("int8", torch.float32, "cuda", r"quantize='int8' on CUDA computes in bfloat16 or float16"),
        ("int4", torch.float16, "mps", r"packed for 'cpu' and 'cuda' only, not 'mps': use quantize='int8'"),
    ],
)
def test_activation_dtypes_no_kernel_takes_are_errors(quantize, dtype, device, message):
    with pytest.raises(ValueError, match=message):
        check_activation_dtype(parse_quantize(quantize), torch.device(device), dtype)


@pytest.mark.parametrize("quantize", ["int8", "int4-g32"])
def test_loading_places_only_quantized_linear_weights_on_the_device(
    make_checkpoint, tokenizer_path, monkeypatch, quantize
):
    ckpt_dir, state = make_checkpoint()
    placed = []
    monkeypatch.setattr(placement, "to_device", lambda tensor, device: placed.append(tensor) or tensor.to(device))
    llama = Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", dtype="bfloat16", quantize=quantize)
    linear_weights = [
        key for key in state if key.endswith("weight") and state[key].dim() == 2 and "embeddings" not in key
    ]
    float_matrices = [t for t in placed if t.is_floating_point() and t.dim() == 2]
    assert len(float_matrices) == 1  # the token embedding, never a linear weight
    quantized_bytes = sum(t.nbytes for t in placed if not t.is_floating_point())
    assert quantized_bytes == sum(state[key].numel() for key in linear_weights) // (1 if quantize == "int8" else 2)
    assert llama.model.layers[1].attention.wqkv.weight.dtype == (torch.int8 if quantize == "int8" else torch.uint8)


def test_build_with_int4_generates_as_the_bfloat16_model_quantized_after_loading(make_checkpoint, tokenizer_path):
    ckpt_dir, _ = make_checkpoint()
    quantized = Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", dtype="bfloat16", quantize="int4-g32")
    by_hand = Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", dtype="bfloat16")
    quantize_linears(by_hand.model, Quantization(4, 32))
    prompts = [[1, 5, 9, 200], [1, 7]]
    assert quantized.generate(prompts, 12, temperature=0) == by_hand.generate(prompts, 12, temperature=0)


def test_under_tensor_parallelism_each_rank_quantizes_its_own_slice(make_checkpoint, fake_world):
    params = {**SMALL_PARAMS, "ffn_dim_multiplier": None}  # hidden 192: 96 input features of w2 per rank
    ckpt_dir, state = make_checkpoint(n_shards=1, params=params)
    fake_world(2)
    args = ModelArgs.from_dict({**params, "vocab_size": 512, "max_seq_len": 16, "max_batch_size": 1})
    model = load_model(ckpt_dir, args, torch.device("cpu"), torch.bfloat16, Quantization(4, 32), group=dist.group.WORLD)
    w2 = model.layers[0].feed_forward.w2  # row-parallel: rank 0 holds input features 0 .. 95
    packed, scales_and_zeros = quantize_linear_weight(
        state["layers.0.feed_forward.w2.weight"][:, :96], Quantization(4, 32), "cpu"
    )
    assert torch.equal(w2.weight, packed) and torch.equal(w2.scales, scales_and_zeros.bfloat16())
    # fused column-parallel: rank 0 holds rows 0 .. 31 of wq (heads 0-3), 0 .. 15 of wk and of wv (kv heads 0-1)
    wqkv = model.layers[0].attention.wqkv
    own_rows = torch.cat(
        [state[f"layers.0.attention.{name}.weight"][:rows] for name, rows in (("wq", 32), ("wk", 16), ("wv", 16))]
    )
    packed, scales_and_zeros = quantize_linear_weight(own_rows, Quantization(4, 32), "cpu")
    assert torch.equal(wqkv.weight, packed) and torch.equal(wqkv.scales, scales_and_zeros.bfloat16())


@pytest.mark.parametrize("quantize", ["int8", "int4-g32"])
def test_each_part_of_a_quantized_fused_layer_is_the_matmul_with_its_own_dequantized_weight(make_checkpoint, quantize):
    ckpt_dir, state = make_checkpoint(dtype=torch.float32)
    args = ModelArgs.from_dict({**SMALL_PARAMS, "vocab_size": 512, "max_seq_len": 16, "max_batch_size": 1})
    model = load_model(ckpt_dir, args, torch.device("cpu"), torch.float32, parse_quantize(quantize))
    x = torch.randn(2, 3, SMALL_PARAMS["dim"], generator=torch.Generator().manual_seed(6))
    for layer, names in (("attention.wqkv", ("wq", "wk", "wv")), ("feed_forward.w13", ("w1", "w3"))):
        parts = model.layers[1].get_submodule(layer)(x)
        for name, got in zip(names, parts):
            weight = state[f"layers.1.{layer.partition('.')[0]}.{name}.weight"]  # quantized alone, as if not fused
            if quantize == "int8":
                q, scales = quantize_linear_weight(weight, Quantization(8), "cpu")
                dequantized = q.float() * scales[:, None]
            else:
                dequantized = dequantized_by_hand(*int4_groups(weight, 32), 32)
            assert torch.allclose(got, x @ dequantized.T, rtol=1e-4, atol=1e-4), (layer, name)


def test_int4_groups_that_would_straddle_two_ranks_are_an_error(make_checkpoint, fake_world):
    ckpt_dir, _ = make_checkpoint(n_shards=2)  # hidden 224: 112 input features of w2 per rank
    fake_world(2)
    args = ModelArgs.from_dict({**SMALL_PARAMS, "vocab_size": 512, "max_seq_len": 16, "max_batch_size": 1})
    message = (
        r"split over 2 ranks: layers.0.feed_forward.w2: its 112 input features "
        r"are not a multiple of the group size 32.*use quantize='int8'"
    )
    with pytest.raises(ValueError, match=message):
        load_model(ckpt_dir, args, torch.device("cpu"), torch.bfloat16, Quantization(4, 32), group=dist.group.WORLD)
