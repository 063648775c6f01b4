"""The causal language-modelling loss: predict each token from the ones before it.

Conventions are those of most training code: ``labels`` are aligned with the input tokens (often
the very same tensor) and shifted inside the loss, so the logits at position t are scored against
the label at position t+1; a label of ``IGNORE_INDEX`` (-100) is skipped, which masks padding and
prompt positions.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")


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
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be (bsz, seqlen) = {tuple(logits.shape[:2])} to match logits, got shape {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must hold integer token ids (int64 or int32), got {labels.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    # the labels move one place left (the last position has nothing to predict), not the logits: no
    # copy of the largest tensor of a training step
    shifted_labels = F.pad(labels[:, 1:].long(), (0, 1), value=IGNORE_INDEX).reshape(-1)  # (bsz * seqlen,)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted_labels, ignore_index=IGNORE_INDEX, reduction=reduction)


def scored_token_count(labels: torch.Tensor) -> int:
    """How many labels ``causal_lm_loss`` scores: those after the first position that are not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
