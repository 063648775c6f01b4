"""The float32 CPU kernel chosen per weight shape by timing (``llama.layers.cpu_kernels``): the choice
follows the timings, is made once per shape in a process, and oneDNN's kernel computes what
``F.linear`` computes, in eager and compiled code, with autograd falling back to ``F.linear``."""

import pytest
import torch
import torch.nn.functional as F

from conftest import SMALL_PARAMS, quantize_linears, random_state
from llama.layers import cpu_kernels
from llama.layers.cpu_kernels import choose_float32_kernels
from llama.layers.quantize import Quantization, linear
from llama.model import ModelArgs, Transformer

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def small_model(max_seq_len: int = 32, max_batch_size: int = 2) -> Transformer:
    args = ModelArgs.from_dict(
        {**SMALL_PARAMS, "vocab_size": 512, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size}
    )
    model = Transformer(args)
    model.load_state_dict(random_state(args))
    return model


@pytest.fixture
def fresh_choices(monkeypatch, tmp_path):
    """An empty record of choices, in the process and on the machine (the test's own cache folder),
    so that this test measures (or fakes) its own."""
    monkeypatch.setattr(cpu_kernels, "_chosen", {})
    monkeypatch.setenv("LLAMA_CACHE_DIR", str(tmp_path))


def test_each_shape_takes_the_kernel_its_timings_favour_and_is_timed_once(fresh_choices, monkeypatch):
    model = small_model()
    output_shape = tuple(model.output.weight.shape)
    timed = []

    def fake_seconds(layers, x, onednn):  # oneDNN faster only for the output projection's shape
        shape = tuple(layers[0].weight.shape)
        timed.append(shape)
        return (0.5 if shape == output_shape else 2.0) if onednn else 1.0

    monkeypatch.setattr(cpu_kernels, "_pass_seconds", fake_seconds)
    choices = choose_float32_kernels(model)
    shapes = {tuple(m.weight.shape) for m in model.modules() if hasattr(m, "onednn")}
    assert set(choices) == shapes and choices[output_shape] and sum(choices.values()) == 1
    assert (
        model.output.onednn and not model.layers[0].attention.wqkv.onednn and not model.layers[1].feed_forward.w2.onednn
    )
    assert len(timed) == len(shapes) * 2 * cpu_kernels.ROUNDS

    again = small_model()  # a second model of the same shapes in this process: the same choice, no timing
    monkeypatch.setattr(cpu_kernels, "_pass_seconds", lambda *args: pytest.fail("timed twice"))
    assert choose_float32_kernels(again) == choices and again.output.onednn

    monkeypatch.setattr(cpu_kernels, "_chosen", {})  # a later process on the machine reads the choice timed first
    later = small_model()
    assert choose_float32_kernels(later) == choices and later.output.onednn


def test_a_tie_keeps_torchs_default(fresh_choices, monkeypatch):
    model = small_model()
    monkeypatch.setattr(cpu_kernels, "_pass_seconds", lambda layers, x, onednn: 0.97 if onednn else 1.0)
    assert not any(choose_float32_kernels(model).values())


def test_quantized_and_half_precision_layers_are_not_timed(fresh_choices):
    model = quantize_linears(small_model().to(torch.bfloat16), Quantization(8))
    assert choose_float32_kernels(model) == {}
    assert choose_float32_kernels(small_model().to(torch.bfloat16)) == {}


def test_onednn_logits_equal_blas_logits_and_autograd_falls_back():
    model = small_model()
    tokens = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        blas = model(tokens)
        for module in model.modules():
            if hasattr(module, "onednn"):
                module.onednn = True
        onednn = model(tokens)
    assert torch.allclose(onednn, blas, atol=1e-4)
    loss = model(tokens).logsumexp(-1).mean()  # gradients flow: F.linear under autograd
    loss.backward()
    assert model.output.weight.grad is not None and torch.allclose(model(tokens).detach(), blas, atol=1e-4)


def test_the_onednn_flag_runs_onednns_kernel_within_float32_rounding_of_f_linear():
    weight = torch.randn(96, 64)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ours = linear(x, weight, None, onednn=True)
    assert torch.equal(ours, torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""))
    assert torch.allclose(ours, F.linear(x, weight), atol=1e-5)


def test_a_compiled_step_on_onednn_layers_gives_the_eager_tokens_and_logprobs_to_the_end_of_the_context(make_llama):
    """A full batch of two, one row decoding to the context's last position, every layer on oneDNN:
    the compiled step (the kernel as a custom op) against the eager engine on the same weights."""
    from dataclasses import replace

    from llama.engine import Engine

    llama = make_llama(max_seq_len=16, max_batch_size=2, compile=True)
    for module in llama.model.modules():
        if hasattr(module, "onednn"):
            module.onednn = True
    prompts = [[1, 17, 300], [1, 250, 7, 99, 42]]
    options = dict(max_gen_len=13, temperature=0, logprobs=True, stop_tokens=[])
    compiled_tokens, compiled_logprobs = llama.generate(prompts, **options)
    llama.engine = Engine(llama.model, llama.tokenizer, replace(llama.engine.options, compile=False))
    eager_tokens, eager_logprobs = llama.generate(prompts, **options)
    assert [len(tokens) for tokens in eager_tokens] == [13, 11]  # row 0 reaches position 15, the last
    assert compiled_tokens == eager_tokens
    for ours, theirs in zip(compiled_logprobs, eager_logprobs):
        assert torch.allclose(torch.tensor(ours), torch.tensor(theirs), atol=1e-5)


def test_a_timed_model_converted_afterwards_computes_as_torchs_default():
    model = small_model()
    tokens = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(2))
    for module in model.modules():
        if hasattr(module, "onednn"):
            module.onednn = True
    half = model.to(torch.bfloat16)
    with torch.no_grad():
        logits = half(tokens)
        for module in half.modules():
            if hasattr(module, "onednn"):
                module.onednn = False
        assert torch.equal(logits, half(tokens))
