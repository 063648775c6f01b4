"""The causal language-modelling loss: predict each token from the ones before it.

Conventions are those of most training code: ``labels`` are aligned with the input tokens (often
the very same tensor) and shifted inside the loss, so the logits at position t are scored against
the label at position t+1; a label of ``IGNORE_INDEX`` (-100) is skipped, which masks padding and
prompt positions.

``causal_lm_loss`` scores logits already computed. Training uses ``chunked_causal_lm_loss`` instead,
which takes the last hidden states and the output weight and never holds the logits of the whole
batch: at Llama 3's vocabulary of 128,256 the float32 logits of 8,192 tokens alone are 4.2 GB, and
their log-softmax and gradient as much again.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from llama.layers.quantize import dequantized_weight, linear, out_features, unpacks_on_cpu

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")
# float32 logits the chunked loss holds at once, 256 MiB: 523 tokens a chunk at a vocabulary of
# 128,256, the whole batch of a small model (16,384 tokens at 4,096)
CHUNK_LOGITS = 1 << 26


def check_labels(labels: torch.Tensor, shape: Tuple[int, ...], of: str) -> None:
    """``labels`` must be integer token ids of ``shape`` (bsz, seqlen), that of ``of``."""
    if labels.shape != shape:
        raise ValueError(
            f"labels must be (bsz, seqlen) = {tuple(shape)} to match {of}, got shape {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must hold integer token ids (int64 or int32), got {labels.dtype}")


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """(bsz, seqlen) -> (bsz * seqlen,): each position's label is the next token's, the last -100.
    The labels move one place left, not the logits: no copy of the largest tensor of a training step."""
    return F.pad(labels[:, 1:].long(), (0, 1), value=IGNORE_INDEX).reshape(-1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``labels[:, 1:]`` under ``logits[:, :-1]``, skipping labels equal to -100.

    Args:
        logits: (bsz, seqlen, vocab_size), as returned by ``Transformer.forward``.
        labels: (bsz, seqlen) integer token ids aligned with the model's input tokens.
        reduction: "mean" (nats per scored token; NaN if every label is -100) or "sum" (total nats,
            to be divided by ``scored_token_count`` after summing over batches).

    Returns:
        A scalar tensor, differentiable with respect to ``logits``.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (bsz, seqlen, vocab_size), got shape {tuple(logits.shape)}")
    check_labels(labels, logits.shape[:2], "logits")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        shifted_labels(labels),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def scored_token_count(labels: torch.Tensor) -> int:
    """How many labels ``causal_lm_loss`` scores: those after the first position that are not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def linear_cross_entropy(
    rows: torch.Tensor,
    weight: torch.Tensor,
    scales: Optional[torch.Tensor],
    targets: torch.Tensor,
    chunk_tokens: int,
    wants_rows: bool,
    wants_weight: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The summed cross-entropy of ``targets`` (rows,) under ``rows W^T`` (rows, dim), chunk by chunk,
    and where asked its gradients, in float32 until the backward scales them: (rows, dim) and
    (vocab_size, dim). The gradient of the loss with respect to the logits is softmax(logits) less one
    at the target; its products with the weight and the rows run in the compute dtype."""
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    grad_rows = torch.empty(rows.shape, dtype=torch.float32, device=rows.device) if wants_rows else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants_weight else None
    # the weight the rows' gradient multiplies by, in the product's dtype, made at the first chunk; an int4
    # weight that a CPU unpacks is made first, and multiplies the chunks too (``Int4Matmul``'s reason)
    unpacked = unpacks_on_cpu(weight, scales, rows.shape[-1])
    dense = dequantized_weight(weight, scales, rows.shape[-1], rows.dtype) if unpacked else None
    for start in range(0, rows.shape[0], chunk_tokens):
        chunk, target = (
            rows[start : start + chunk_tokens],
            targets[start : start + chunk_tokens],
        )  # (chunk, dim), (chunk,)
        product = (
            linear(chunk, weight, scales) if dense is None else chunk @ dense.T
        )  # (chunk, vocab_size), in the compute dtype
        compute_dtype = product.dtype
        logits = product.float()
        del product
        # the softmax in place of the logits, and then its gradient: one (chunk, vocab_size) float32 tensor
        logits -= logits.amax(-1, keepdim=True)
        target_logits = logits.gather(1, target[:, None])  # (chunk, 1)
        sums = logits.exp_().sum(-1, keepdim=True)  # (chunk, 1)
        total += (sums.log() - target_logits).sum()
        if wants_rows or wants_weight:
            logits /= sums
            logits[torch.arange(target.shape[0], device=logits.device), target] -= 1  # d loss / d logits
            logits = logits.to(compute_dtype)  # (the float32 tensor is freed where the compute dtype is another)
            if wants_rows:
                if dense is None:
                    dense = dequantized_weight(weight, scales, rows.shape[-1], compute_dtype)  # (vocab_size, dim)
                grad_rows[start : start + chunk_tokens] = logits @ dense
            if wants_weight:
                grad_weight += logits.T @ chunk.to(compute_dtype)
        del logits  # before the next chunk's product: one chunk's logits alive at a time
    return total, grad_rows, grad_weight


class LinearCrossEntropy(torch.autograd.Function):
    """``linear_cross_entropy`` with its gradients computed in the forward pass and kept, (rows, dim)
    for the rows and (vocab_size, dim) for a weight that trains; the backward scales them by the
    loss's gradient and returns them in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, rows, weight, scales, targets, chunk_tokens):
        wants_rows, wants_weight = ctx.needs_input_grad[:2]
        total, grad_rows, grad_weight = linear_cross_entropy(
            rows, weight, scales, targets, chunk_tokens, wants_rows, wants_weight
        )
        ctx.save_for_backward(
            grad_rows, grad_weight
        )  # saved, not kept on ctx: freed by the backward, not with the loss
        ctx.rows_dtype, ctx.weight_dtype = rows.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_rows, grad_weight = ctx.saved_tensors
        grad_rows = None if grad_rows is None else (grad_rows * grad_total).to(ctx.rows_dtype)
        grad_weight = None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_rows, grad_weight, None, None, None


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scales: Optional[torch.Tensor] = None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """``causal_lm_loss(logits, labels, "sum")`` of ``logits = hidden W^T`` in float32, computed over
    ``chunk_tokens`` scored positions at a time: each chunk's logits, its loss and its gradients are
    computed in the forward pass, and only the gradients are kept (scored tokens x dim for ``hidden``,
    vocab_size x dim for ``weight`` where it trains), never the logits. The positions whose label is
    -100 are left out before any product.

    The product is ``llama.layers.quantize.linear``'s, as the output layer computes it: in autocast's dtype
    under autocast, and for an int8 or int4 ``weight`` (``scales`` given) by the same kernel. The
    gradient of ``hidden`` multiplies by the weight in that dtype (``dequantized_weight``: a quantized
    one dequantized), made once per call and held for its duration (vocab_size x dim). A quantized
    weight gets no gradient.

    Args:
        hidden: (bsz, seqlen, dim), the model's normed last hidden states.
        weight: (vocab_size, dim), the output projection (int8, or int4 packed, with ``scales``).
        labels: (bsz, seqlen) integer token ids aligned with the model's input tokens.
        scales: a quantized weight's scales, as ``llama.layers.quantize.linear`` takes them; None: a float weight.
        chunk_tokens: scored positions per chunk; None: as many as hold ``CHUNK_LOGITS`` float32 logits.

    Returns:
        The summed loss, a float32 scalar, differentiable with respect to ``hidden`` and ``weight``.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (bsz, seqlen, dim), got shape {tuple(hidden.shape)}")
    check_labels(labels, hidden.shape[:2], "hidden")
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_LOGITS // out_features(weight, scales))
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    targets = shifted_labels(labels)  # (bsz * seqlen,)
    scored = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (scored,)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(
        0, scored
    )  # (scored, dim); autograd scatters its gradient back
    targets = targets.index_select(0, scored)
    if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(rows, weight, scales, targets, chunk_tokens)
    return linear_cross_entropy(rows, weight, scales, targets, chunk_tokens, False, False)[0]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Each label's log-probability under the logits before it, at ``temperature``: (bsz, seqlen), entry
    [b, t] = log softmax(logits[b, t-1] / temperature)[labels[b, t]], and 0 where the label is -100 and
    at t = 0 (nothing predicts it). Summed over a completion's labels: the sequence's log-probability
    (preference tuning); token by token: a policy's (reinforcement learning)."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be (bsz, seqlen, vocab_size), got shape {tuple(logits.shape)}")
    check_labels(labels, logits.shape[:2], "logits")
    targets = shifted_labels(labels)  # (bsz * seqlen,): position t scores label t+1
    scored = targets != IGNORE_INDEX
    logprobs = torch.log_softmax(logits.reshape(-1, logits.shape[-1]).float() / temperature, dim=-1)
    chosen = logprobs.gather(1, targets.clamp(min=0)[:, None])[:, 0] * scored
    return F.pad(chosen.view(labels.shape)[:, :-1], (1, 0))


def linear_token_logprobs(
    rows: torch.Tensor,
    weight: torch.Tensor,
    scales: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    chunk_tokens: int,
    wants_rows: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The log-probability of each of ``targets`` (rows,) under ``softmax(rows W^T / temperature)``, chunk by
    chunk, and where asked the gradient of each with respect to its own row, (rows, dim) in float32:
    (onehot(target) - softmax) W / temperature. A backward then only scales each row's by its upstream
    gradient: the logits are never kept."""
    logprobs = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
    grad_rows = torch.empty(rows.shape, dtype=torch.float32, device=rows.device) if wants_rows else None
    unpacked = unpacks_on_cpu(weight, scales, rows.shape[-1])
    dense = dequantized_weight(weight, scales, rows.shape[-1], rows.dtype) if unpacked else None
    for start in range(0, rows.shape[0], chunk_tokens):
        chunk, target = rows[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        product = linear(chunk, weight, scales) if dense is None else chunk @ dense.T  # (chunk, vocab_size)
        compute_dtype = product.dtype
        logits = product.float() / temperature
        del product
        logits = torch.log_softmax(logits, dim=-1)  # (the float32 logits are freed)
        logprobs[start : start + chunk_tokens] = logits.gather(1, target[:, None])[:, 0]
        if wants_rows:
            logits = -logits.exp_()  # -softmax, in place
            logits[torch.arange(target.shape[0], device=logits.device), target] += 1
            if dense is None:
                dense = dequantized_weight(weight, scales, rows.shape[-1], compute_dtype)  # (vocab_size, dim)
            grad_rows[start : start + chunk_tokens] = (logits.to(compute_dtype) @ dense).float() / temperature
        del logits
    return logprobs, grad_rows


class LinearTokenLogprobs(torch.autograd.Function):
    """``linear_token_logprobs`` with each row's gradient computed in the forward pass and kept
    (rows, dim); the backward scales each by its log-probability's gradient. For a frozen output
    weight (adapters, a reference model): a trained one goes through the logits' autograd."""

    @staticmethod
    def forward(ctx, rows, weight, scales, targets, temperature, chunk_tokens):
        logprobs, grad_rows = linear_token_logprobs(rows, weight, scales, targets, temperature, chunk_tokens, True)
        ctx.save_for_backward(grad_rows)
        ctx.rows_dtype = rows.dtype
        return logprobs

    @staticmethod
    def backward(ctx, grad_logprobs):
        (grad_rows,) = ctx.saved_tensors
        return (grad_rows * grad_logprobs[:, None]).to(ctx.rows_dtype), None, None, None, None, None


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    scales: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """``token_logprobs`` of ``logits = hidden W^T``, computed over ``chunk_tokens`` scored positions at a
    time from the last hidden states, without the logits of the whole batch (``chunked_causal_lm_loss``'s
    reason), differentiable with respect to ``hidden``; a ``weight`` that trains goes through each chunk's
    logits (their autograd keeps them).

    Args:
        hidden: (bsz, seqlen, dim), the model's normed last hidden states.
        weight: (vocab_size, dim), the output projection (int8, or int4 packed, with ``scales``).
        labels: (bsz, seqlen) integer token ids aligned with the model's input tokens, -100 where not scored.
        temperature: the logits are divided by it (a policy sampled at that temperature).
        chunk_tokens: scored positions per chunk; None: as many as hold ``CHUNK_LOGITS`` float32 logits.

    Returns:
        (bsz, seqlen) float32: entry [b, t] the log-probability of ``labels[b, t]``, 0 where not scored.
    """
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (bsz, seqlen, dim), got shape {tuple(hidden.shape)}")
    check_labels(labels, hidden.shape[:2], "hidden")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if chunk_tokens is None:
        chunk_tokens = max(1, CHUNK_LOGITS // out_features(weight, scales))
    targets = shifted_labels(labels)  # (bsz * seqlen,)
    scored = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (scored,)
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, scored)  # (scored, dim)
    targets = targets.index_select(0, scored)
    if torch.is_grad_enabled() and weight.requires_grad:
        chunks = [
            torch.log_softmax(linear(rows[i : i + chunk_tokens], weight, scales).float() / temperature, dim=-1).gather(
                1, targets[i : i + chunk_tokens, None]
            )[:, 0]
            for i in range(0, rows.shape[0], chunk_tokens)
        ]
        chosen = torch.cat(chunks) if chunks else rows.new_zeros(0, dtype=torch.float32)
    elif torch.is_grad_enabled() and rows.requires_grad:
        chosen = LinearTokenLogprobs.apply(rows, weight, scales, targets, temperature, chunk_tokens)
    else:
        chosen = linear_token_logprobs(rows, weight, scales, targets, temperature, chunk_tokens, False)[0]
    flat = torch.zeros(labels.numel(), dtype=torch.float32, device=hidden.device).index_put((scored,), chosen)
    return F.pad(flat.view(labels.shape)[:, :-1], (1, 0))
