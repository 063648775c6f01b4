"""Choosing the next token from the last position's logits: repetition penalty, temperature, top-k,
min-p and top-p (nucleus) sampling, or greedy; drawn from torch's global RNG or one seeded
``torch.Generator`` per row.

With the defaults (top_k=0, min_p=0, repetition_penalty=1, no generators) this is exactly Meta's
sampling: ``softmax(logits / temperature)`` then ``sample_top_p``, or argmax at temperature 0.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class Sampler:
    """How one batch picks its next tokens. Applied in this order:

    repetition_penalty r: for each token already in the row (prompt or output), logit <- logit / r
        if logit > 0 else logit * r (CTRL's penalty; r > 1 discourages repeats, 1 is off).
    temperature T: p = softmax(logit / T); T = 0 is greedy (argmax, after the penalty).
    top_k k: keep the k largest logits, drop the rest (0 is off).
    min_p m: keep the tokens with p >= m * max(p) (0 is off).
    top_p P: keep the most probable tokens until their mass reaches P (1 keeps all).
    Dropped tokens get probability 0 and the rest are renormalised before drawing. The values are
    checked by ``llama.decoding.GenerationOptions``.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    generators: Optional[List[torch.Generator]] = None  # one per row; None draws from the global RNG

    def __call__(self, logits: torch.Tensor, previous_tokens: torch.Tensor, sampling: Optional[List[bool]] = None) -> torch.Tensor:
        """logits: (bsz, vocab) of the last position; previous_tokens: (bsz, n) ids already in each row,
        -1 where none (read only by the repetition penalty);
        sampling: per row, whether its token is used: only their generators draw, so a row's samples
        do not depend on the other rows of its batch. Returns (bsz,) token ids."""
        logits = self.penalised(logits, previous_tokens)
        if self.temperature == 0:
            return torch.argmax(logits, dim=-1)
        return sample_top_p(self.truncated_probs(logits), self.top_p, self.row_generators(sampling)).reshape(-1)

    def penalised(self, logits: torch.Tensor, previous_tokens: torch.Tensor) -> torch.Tensor:
        """The logits after the repetition penalty (unchanged when it is off)."""
        if self.repetition_penalty == 1.0:
            return logits
        return apply_repetition_penalty(logits, previous_tokens, self.repetition_penalty)

    def truncated_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """softmax(logits / temperature) after top-k and min-p; top-p is left to the caller."""
        logits = logits / self.temperature
        if self.top_k:
            logits = keep_top_k(logits, self.top_k)
        if self.min_p:
            logits = keep_min_p(logits, self.min_p)
        return torch.softmax(logits, dim=-1)

    def distribution(self, logits: torch.Tensor, previous_tokens: torch.Tensor) -> torch.Tensor:
        """The probabilities (n, vocab), in vocabulary order, that ``__call__`` draws from at a
        temperature above 0: every option applied, top-p included. Speculative decoding compares
        them with a draft's. logits: (n, vocab); previous_tokens: (n, m) as for ``__call__``."""
        return keep_top_p(self.truncated_probs(self.penalised(logits, previous_tokens)), self.top_p)

    def row_generators(self, sampling: Optional[List[bool]]) -> Optional[List[Optional[torch.Generator]]]:
        """The rows' generators, None for the rows that draw nothing (``sampling`` False)."""
        if self.generators is None or sampling is None:
            return self.generators
        return [g if used else None for g, used in zip(self.generators, sampling)]

    def draw(self, probs: torch.Tensor, sampling: Optional[List[bool]] = None) -> torch.Tensor:
        """One token per row from ``probs`` (bsz, vocab), each row from its own generator: (bsz,)."""
        return draw(probs, self.row_generators(sampling)).reshape(-1)

    def uniform(self, bsz: int, n: int, device: torch.device, sampling: Optional[List[bool]] = None) -> torch.Tensor:
        """(bsz, n) uniform numbers in [0, 1), each row from its own generator (0 for rows that draw nothing)."""
        generators = self.row_generators(sampling)
        if generators is None:
            return torch.rand(bsz, n, device=device)
        return torch.stack([
            torch.rand(n, generator=g, device=device) if g is not None else torch.zeros(n, device=device) for g in generators
        ])


def apply_repetition_penalty(logits: torch.Tensor, previous_tokens: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive logits and multiply negative ones by ``penalty`` for every token in
    ``previous_tokens`` (bsz, n), once however often it occurred; -1 entries (padding) are skipped."""
    seen = torch.zeros(logits.shape[0], logits.shape[1] + 1, dtype=torch.bool, device=logits.device)
    seen = seen.scatter(1, previous_tokens + 1, True)[:, 1:]  # padding lands in the dropped column 0
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """-inf for all but the k largest logits of each row (ties with the k-th largest are kept)."""
    kth_largest = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def keep_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """-inf for the tokens whose probability is below ``min_p`` times the row's largest probability."""
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, float("-inf"))


def sample_top_p(probs: torch.Tensor, p: float, generators: Optional[List[Optional[torch.Generator]]] = None) -> torch.Tensor:
    """Nucleus sampling: keep the most probable tokens until their mass reaches ``p``, renormalise,
    sample. probs: (bsz, vocab); returns (bsz, 1) token ids. ``generators``: one per row, else the
    global RNG; a row whose generator is None draws nothing and gets its most probable token."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > p] = 0.0  # mass before this token already reaches p
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return torch.gather(probs_idx, -1, draw(probs_sort, generators))


def keep_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """``sample_top_p``'s distribution in vocabulary order: the most probable tokens until their mass
    reaches ``p``, renormalised; 0 for the rest. probs: (bsz, vocab)."""
    if p >= 1.0:
        return probs
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    dropped = torch.cumsum(probs_sort, dim=-1) - probs_sort > p  # mass before this token already reaches p
    kept = probs.masked_fill(torch.zeros_like(dropped).scatter(-1, probs_idx, dropped), 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def draw(probs: torch.Tensor, generators: Optional[List[Optional[torch.Generator]]] = None) -> torch.Tensor:
    """One index per row of ``probs`` (bsz, n), (bsz, 1); ``generators`` as for ``sample_top_p``."""
    if generators is None:
        return torch.multinomial(probs, num_samples=1)
    return torch.stack([
        torch.multinomial(row, 1, generator=g) if g is not None else torch.zeros(1, dtype=torch.long, device=row.device)
        for row, g in zip(probs, generators)
    ])
