"""The training loss, perplexity scoring, and train.py run end to end on a tiny configuration."""

import importlib.util
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import BUNDLED
from llama import Llama
from llama.layers.lora import LoRA, LoraConfig, LoRALinear, adapters_disabled, apply_lora
from llama.layers.loss import (
    causal_lm_loss,
    chunked_causal_lm_loss,
    chunked_token_logprobs,
    scored_token_count,
    token_logprobs,
)
from llama.layers.quantize import dequantize_int4, int4_groups, pack_int4
from llama.model import ModelArgs, Transformer
from llama.perplexity import document_windows, unigram_log_probs, unigram_loss, window_loss
from llama.training.data import Example, packed_batch
from llama.training.loop import Schedule, clip_grad_norm

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("train", ROOT / "train.py")
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)

TINY_ARGS = dict(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16, max_batch_size=1)


def hand_cross_entropy(logit_rows, targets):
    """Mean of -log softmax(row)[target], written out with math."""
    losses = [math.log(sum(math.exp(z) for z in row)) - row[t] for row, t in zip(logit_rows, targets)]
    return sum(losses) / len(losses)


def test_loss_scores_each_position_against_the_next_label_and_skips_minus_100():
    logits = torch.tensor(
        [[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]], [[0.3, 0.1, -0.2], [1.5, 0.0, 0.0], [9.0, 9.0, 9.0]]]
    )
    labels = torch.tensor([[0, 1, 2], [2, 0, -100]])
    # position t predicts labels[:, t+1]; the last position has nothing to predict; -100 is skipped
    expected = hand_cross_entropy([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [0.3, 0.1, -0.2]], [1, 2, 0])
    assert causal_lm_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert causal_lm_loss(logits, labels, reduction="sum").item() == pytest.approx(3 * expected, rel=1e-6)
    assert scored_token_count(labels) == 3


def test_loss_of_a_right_padded_sequence_equals_the_loss_of_the_sequence_alone():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY_ARGS))
    tokens = torch.randint(0, 64, (1, 10))
    padded = torch.cat([tokens, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    labels = torch.cat([tokens, torch.full((1, 6), -100)], dim=1)
    with torch.no_grad():
        assert causal_lm_loss(model(padded), labels).item() == pytest.approx(
            causal_lm_loss(model(tokens), tokens).item(), rel=1e-5
        )


@pytest.mark.parametrize(
    "logits, labels, error",
    [
        (torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long), "logits must be \\(bsz, seqlen, vocab_size\\)"),
        (torch.zeros(2, 5, 8), torch.zeros(2, 4, dtype=torch.long), "labels must be \\(bsz, seqlen\\) = \\(2, 5\\)"),
    ],
)
def test_loss_rejects_mismatched_shapes(logits, labels, error):
    with pytest.raises(ValueError, match=error):
        causal_lm_loss(logits, labels)


def test_loss_rejects_float_labels_and_unknown_reduction():
    with pytest.raises(TypeError, match="labels must hold integer token ids"):
        causal_lm_loss(torch.zeros(1, 3, 4), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="reduction must be one of"):
        causal_lm_loss(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), reduction="none")


def test_one_process_clips_its_gradients_as_torch_does():
    torch.manual_seed(0)
    weights, grads = [torch.randn(3, 4), torch.randn(5)], [torch.randn(3, 4), torch.randn(5)]
    ours, theirs = ([torch.nn.Parameter(w.clone()) for w in weights] for _ in range(2))
    for parameters in (ours, theirs):
        for parameter, grad in zip(parameters, grads):
            parameter.grad = grad.clone()
    assert torch.equal(clip_grad_norm(ours, 0.5), torch.nn.utils.clip_grad_norm_(theirs, 0.5))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, theirs))


def test_one_optimizer_step_lowers_the_loss_on_a_tiny_batch():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY_ARGS))
    tokens = torch.randint(0, 64, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = causal_lm_loss(model(tokens), tokens)
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = causal_lm_loss(model(tokens), tokens)
    assert after.item() < before.item() - 0.05


def loss_and_gradients(loss_of, hidden, weight):
    """``loss_of(hidden, weight)`` and its gradients with respect to those of the two that train."""
    loss = loss_of(hidden, weight)
    wanted = [t for t in (hidden, weight) if t.requires_grad]
    return [loss, *torch.autograd.grad(loss, wanted)]


def masked_labels(bsz: int, seqlen: int, vocab_size: int) -> torch.Tensor:
    """Random labels; row 1 has nothing to learn, row 2 a prompt of three tokens."""
    labels = torch.randint(0, vocab_size, (bsz, seqlen))
    labels[1] = -100
    labels[2, :3] = -100
    return labels


@pytest.mark.parametrize("weight_trains", [True, False], ids=["full", "frozen weight"])
@pytest.mark.parametrize(
    "chunk_tokens", [1, 5, 7, None], ids=lambda n: f"chunk {n}"
)  # 12 scored tokens: neither 5 nor 7 divides them
def test_chunked_loss_and_its_gradients_equal_cross_entropy_over_the_whole_logits(chunk_tokens, weight_trains):
    torch.manual_seed(0)
    hidden = torch.randn(3, 8, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=weight_trains)
    labels = masked_labels(3, 8, 40)
    assert scored_token_count(labels) == 12
    chunked = loss_and_gradients(
        lambda h, w: chunked_causal_lm_loss(h, w, labels, chunk_tokens=chunk_tokens), hidden, weight
    )
    reference = loss_and_gradients(lambda h, w: causal_lm_loss(h @ w.T, labels, reduction="sum"), hidden, weight)
    assert len(chunked) == len(reference) == (3 if weight_trains else 2)
    for ours, theirs in zip(chunked, reference):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert chunked[1][1].abs().max() == 0  # the row with nothing to learn gets no gradient


def test_chunked_loss_of_a_batch_with_nothing_to_learn_is_zero_without_gradient():
    hidden, weight = torch.randn(2, 4, 8, requires_grad=True), torch.randn(16, 8, requires_grad=True)
    loss = chunked_causal_lm_loss(hidden, weight, torch.full((2, 4), -100))
    loss.backward()
    assert loss.item() == 0 and hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_chunked_loss_under_bfloat16_autocast_equals_cross_entropy_over_the_autocast_logits():
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 8, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    labels = masked_labels(3, 8, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = loss_and_gradients(lambda h, w: chunked_causal_lm_loss(h, w, labels, chunk_tokens=5), hidden, weight)
        reference = loss_and_gradients(
            lambda h, w: causal_lm_loss(F.linear(h, w).float(), labels, reduction="sum"), hidden, weight
        )
    assert chunked[0].item() == pytest.approx(reference[0].item(), rel=1e-5)  # the same bfloat16 logits, in float32
    for ours, theirs in zip(chunked[1:], reference[1:]):  # bfloat16 products: within their rounding
        assert ours.dtype == torch.float32 and (ours - theirs).abs().max() < 0.01 * theirs.abs().max()


def test_chunked_loss_of_an_int4_weight_equals_cross_entropy_under_the_weight_it_stands_for():
    torch.manual_seed(0)
    hidden, labels = torch.randn(3, 8, 64, requires_grad=True), masked_labels(3, 8, 48)
    q, scales = int4_groups(torch.randn(48, 64), group_size=32)
    chunked = loss_and_gradients(
        lambda h, w: chunked_causal_lm_loss(h, w, labels, scales, chunk_tokens=5), hidden, pack_int4(q, "cpu")
    )
    reference = loss_and_gradients(
        lambda h, w: causal_lm_loss(h @ w.T, labels, reduction="sum"), hidden, dequantize_int4(q, scales)
    )
    for ours, theirs in zip(chunked, reference):
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def hand_token_logprobs(logits, labels, temperature):
    """Each scored label's log-probability, one position at a time."""
    out = torch.zeros(labels.shape)
    for b, t in itertools.product(range(labels.shape[0]), range(1, labels.shape[1])):
        if labels[b, t] != -100:
            out[b, t] = torch.log_softmax(logits[b, t - 1].double() / temperature, dim=-1)[labels[b, t]].float()
    return out


@pytest.mark.parametrize("weight_trains", [True, False], ids=["full", "frozen weight"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_and_their_gradients_equal_log_softmax_of_the_tempered_logits(temperature, weight_trains):
    torch.manual_seed(0)
    hidden = torch.randn(3, 8, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=weight_trains)
    labels = masked_labels(3, 8, 40)
    upstream = torch.randn(3, 8)  # a loss that weighs each token differently (a policy gradient's)
    expected = hand_token_logprobs((hidden @ weight.T).detach(), labels, temperature)
    assert torch.allclose(token_logprobs(hidden @ weight.T, labels, temperature), expected, atol=1e-5)
    chunked = loss_and_gradients(
        lambda h, w: (chunked_token_logprobs(h, w, labels, temperature=temperature, chunk_tokens=5) * upstream).sum(),
        hidden,
        weight,
    )
    reference = loss_and_gradients(
        lambda h, w: (token_logprobs(h @ w.T, labels, temperature) * upstream).sum(), hidden, weight
    )
    for ours, theirs in zip(chunked, reference):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(
            chunked_token_logprobs(hidden, weight, labels, temperature=temperature), expected, atol=1e-5
        )


def test_the_models_token_logprobs_equal_its_logits_and_an_adapter_turns_off_for_the_reference():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY_ARGS))
    tokens, labels = torch.randint(0, 64, (3, 16)), masked_labels(3, 16, 64)
    base = model.forward_logprobs(tokens, labels, temperature=0.5).detach()
    assert torch.allclose(base, hand_token_logprobs(model(tokens).detach(), labels, 0.5), atol=1e-5)
    apply_lora(model, LoraConfig(rank=4))
    for module in model.modules():
        if isinstance(module, LoRA):
            torch.nn.init.normal_(module.lora_B.weight)  # a trained adapter
    adapted = model.forward_logprobs(tokens, labels, temperature=0.5).detach()
    assert (adapted - base).abs().max() > 1e-2
    with adapters_disabled(model):
        assert torch.equal(model.forward_logprobs(tokens, labels, temperature=0.5), base)
    assert torch.equal(model.forward_logprobs(tokens, labels, temperature=0.5), adapted)


def peak_allocated_bytes(step) -> int:
    """The most bytes ``step()`` holds allocated at once, beyond what existed before (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    allocations = sorted(
        (event.start_ns(), event.nbytes())
        for event in profiler.profiler.kineto_results.events()
        if event.name() == "[memory]"
    )
    return max(itertools.accumulate(nbytes for _, nbytes in allocations))


def test_chunked_loss_holds_one_chunk_of_logits_not_the_batchs():
    hidden, weight = torch.randn(1, 1024, 16, requires_grad=True), torch.randn(4096, 16, requires_grad=True)
    labels = torch.randint(0, 4096, (1, 1024))
    logits_bytes, chunk_bytes = (
        1024 * 4096 * 4,
        64 * 4096 * 4,
    )  # float32: 16 MiB for the batch, 1 MiB for a chunk of 64 tokens
    whole = peak_allocated_bytes(lambda: causal_lm_loss(hidden @ weight.T, labels, reduction="sum").backward())
    chunked = peak_allocated_bytes(lambda: chunked_causal_lm_loss(hidden, weight, labels, chunk_tokens=64).backward())
    assert (
        whole > 2 * logits_bytes and chunked < 2 * chunk_bytes
    )  # beside one chunk: the weight's gradient (0.25 MiB), and such


def test_the_gradients_the_chunked_loss_keeps_are_freed_by_its_backward_not_with_the_loss():
    hidden, weight = torch.randn(2, 9, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    loss = chunked_causal_lm_loss(hidden, weight, torch.randint(0, 50, (2, 9)), chunk_tokens=4)
    assert [tuple(t.shape) for t in loss.grad_fn.saved_tensors] == [
        (16, 16),
        (50, 16),
    ]  # the scored rows', the weight's
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _ = loss.grad_fn.saved_tensors  # the training loop holds the loss until the next micro-batch


def test_the_models_training_loss_and_gradients_equal_cross_entropy_over_its_logits_padded_and_packed():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY_ARGS))
    tokens, labels = torch.randint(0, 64, (3, 16)), masked_labels(3, 16, 64)
    packed = packed_batch(
        [Example(row[:n].tolist(), row[:n].tolist()) for row, n in zip(tokens, (5, 9, 7))], max_seq_len=16
    )
    for arguments, logits_of in [
        ((tokens, labels), lambda: model(tokens)),
        (packed, lambda: model(packed.tokens, positions=packed.positions)),
    ]:
        chunked = model.forward_loss(*arguments)
        ours = torch.autograd.grad(chunked, list(model.parameters()))
        reference = causal_lm_loss(logits_of(), arguments[1], reduction="sum")
        theirs = torch.autograd.grad(reference, list(model.parameters()))
        assert chunked.item() == pytest.approx(reference.item(), rel=1e-6)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(ours, theirs))


def test_an_output_layer_with_an_adapter_beside_it_trains_through_its_logits():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY_ARGS))
    model.output = LoRALinear(model.output, {"output": LoRA(32, 64, LoraConfig())})
    tokens, labels = torch.randint(0, 64, (3, 16)), masked_labels(3, 16, 64)
    loss = model.forward_loss(tokens, labels)
    ours = torch.autograd.grad(loss, list(model.parameters()))
    reference = causal_lm_loss(model(tokens), labels, reduction="sum")
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert all(torch.allclose(a, b) for a, b in zip(ours, torch.autograd.grad(reference, list(model.parameters()))))
    assert model.output.adapters["output"].lora_B.weight.requires_grad and ours[-1].abs().max() > 0


def test_document_windows_score_every_token_after_the_first_exactly_once():
    windows = document_windows(list(range(10)), max_seq_len=4)
    assert windows == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert sorted(t for w in windows for t in w[1:]) == list(range(1, 10))
    assert document_windows([5, 6], max_seq_len=4) == [[5, 6]]


def test_window_loss_of_documents_batched_together_equals_each_scored_alone():
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY_ARGS))
    documents = [torch.randint(0, 64, (n,)).tolist() for n in (12, 5, 9)]
    result = window_loss(model, documents, batch_size=3)
    with torch.no_grad():  # reference: one document at a time, log-softmax by hand
        nll = []
        for doc in documents:
            log_probs = model(torch.tensor([doc]))[0].log_softmax(-1)
            nll += [-log_probs[t, doc[t + 1]].item() for t in range(len(doc) - 1)]
    assert result["tokens"] == len(nll) == 11 + 4 + 8
    assert result["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


def test_window_loss_holds_one_chunk_of_logits_at_a_time_not_the_batchs(monkeypatch):
    import llama.layers.loss

    monkeypatch.setattr(llama.layers.loss, "CHUNK_LOGITS", 16 * 4096)  # chunks of 16 tokens at a vocabulary of 4,096
    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(dim=16, n_layers=1, n_heads=2, vocab_size=4096, multiple_of=16, max_seq_len=128, max_batch_size=1)
    )
    windows = torch.randint(0, 4096, (2, 128)).tolist()
    logits_bytes = 2 * 128 * 4096 * 4  # float32: 4 MiB for the batch, 0.25 MiB for a chunk
    assert peak_allocated_bytes(lambda: window_loss(model, windows, batch_size=2)) < logits_bytes / 4


def test_unigram_loss_uses_add_one_smoothed_training_frequencies():
    log_probs = unigram_log_probs(torch.tensor([0, 0, 0, 1]), vocab_size=3)  # counts+1: 4, 2, 1 of 7
    result = unigram_loss(log_probs, [[9, 0, 2]])  # the first token of a window is context only
    assert result["loss"] == pytest.approx(-(math.log(4 / 7) + math.log(1 / 7)) / 2)
    assert result["tokens"] == 2


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_to_the_minimum():
    schedule = Schedule(lr=1.0, max_steps=110, warmup_steps=10, kind="cosine", min_lr=0.1)
    lr = [schedule(step) for step in range(110)]
    assert lr[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert lr[10] == pytest.approx(1.0)
    assert lr[10 + 50] == pytest.approx(0.55, abs=0.01)  # halfway through the cosine: the mean of max and min
    assert lr[-1] == pytest.approx(0.1)


def test_heldout_files_are_a_small_disjoint_part_of_the_library():
    training, heldout = train.split_files(heldout_percent=5)
    assert not set(training) & set(heldout)
    assert 0.02 < len(heldout) / (len(training) + len(heldout)) < 0.10
    assert all(p.suffix == ".py" and "test" not in p.relative_to(train.STDLIB).parts for p in training + heldout)


TINY_RUN = [
    "--max_train_files",
    "10",
    "--vocab_size",
    "512",
    "--dim",
    "32",
    "--n_layers",
    "1",
    "--n_heads",
    "2",
    "--seq_len",
    "32",
    "--batch_size",
    "4",
    "--steps",
    "3",
    "--eval_windows",
    "2",
]  # the default warmup fits 3 steps


def run_train(out_dir, *extra):
    return subprocess.run(
        [sys.executable, "train.py", "--out_dir", str(out_dir), *TINY_RUN, *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tiny-run")
    return out_dir, run_train(out_dir)


def test_training_script_logs_the_loss_and_writes_metas_layout(tiny_run):
    out_dir, result = tiny_run
    assert result.returncode == 0, result.stderr
    assert "step 1/3  loss " in result.stderr and "step 3/3  loss " in result.stderr
    assert "unigram baseline" in result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    state = torch.load(out_dir / "consolidated.00.pth", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    params = json.loads((out_dir / "params.json").read_text())
    assert (params["vocab_size"], params["max_seq_len"]) == (512, 32)  # max_seq_len: the --seq_len it trained on


def test_training_script_output_loads_and_generates(tiny_run):
    out_dir, _ = tiny_run
    generator = Llama.build(
        str(out_dir), str(out_dir / "tokenizer.model"), max_seq_len=32, max_batch_size=1, device="cpu"
    )
    assert generator.tokenizer.bos_id == 1 and generator.tokenizer.eos_id == 2
    result = generator.text_completion(["import "], temperature=0.0, max_gen_len=4)
    assert isinstance(result[0]["generation"], str)


def test_training_is_deterministic_given_the_seed(tiny_run, tmp_path):
    out_dir, _ = tiny_run
    assert run_train(tmp_path).returncode == 0
    first = torch.load(out_dir / "consolidated.00.pth", weights_only=True)
    second = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert (out_dir / "tokenizer.model").read_bytes() == (tmp_path / "tokenizer.model").read_bytes()


def test_training_script_rejects_bad_arguments_with_a_message(tmp_path):
    result = run_train(tmp_path, "--warmup_steps", "5")
    assert result.returncode == 2
    assert "--warmup_steps must be in [0, --steps), got 5 with --steps 3" in result.stderr


def test_training_script_never_overwrites_the_bundled_model_by_default_and_describes_every_flag():
    assert Path(train.parse_args([]).out_dir).resolve() != BUNDLED.resolve()
    undescribed = [action.dest for action in train.build_parser()._actions if not action.help]
    assert undescribed == []
