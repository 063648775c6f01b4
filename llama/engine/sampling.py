"""Choosing each row's next token from its last position's logits, every row with its own settings,
as tensor operations over the rows (no Python loop per row, so the decode step compiles with it).

Applied in this order, each a tensor of one value per row:

penalties (``apply_penalties``, on the logits, over the row's own history):
    repetition_penalty r: for each token already in the row (prompt or output), logit <- logit / r if
        logit > 0 else logit * r (CTRL's penalty; r > 1 discourages repeats, 1 is off).
    presence_penalty a, frequency_penalty f (OpenAI's): logit <- logit - a * [count > 0] - f * count,
        count = how often the row generated the token (0 is off; negative values encourage).
    logit_bias: a number added to chosen tokens' logits (OpenAI's, -100 bans, 100 forces).
temperature T: p = softmax(logit / T); T = 0 is greedy (argmax of the penalised logits).
top_k k: keep the k most probable tokens, and those tied with the k-th (0 is off).
min_p m: keep the tokens with p >= m * max(p) (0 is off).
top_p P: keep the most probable tokens until their mass reaches P (1 keeps all).
Dropped tokens get probability 0 and the rest are renormalised before drawing.

The draw is torch's own: ``torch.multinomial(p, 1)`` is ``argmax(p / q)`` with q ~ Exp(1), one q per
token, in the order of the sorted probabilities. A row without a seed takes its q from torch's global
RNG (drawn by the caller, ``global_exponentials``): with the defaults (top_k=0, min_p=0, no
penalties) a lone row samples exactly as Meta's ``sample_top_p``. A seeded row computes its q from
(seed, position, index) with an integer hash (``seeded_exponentials``): its tokens depend on nothing
else, not on the rows beside it nor on the global RNG, and the same arithmetic runs compiled.
"""

from dataclasses import dataclass
from typing import Union

import torch

WORD = 0x7FFFFFFF  # the hash works on 31-bit words, so products of two stay within int64


def mix(x: Union[int, torch.Tensor]) -> Union[int, torch.Tensor]:
    """A 31-bit integer hash (the avalanche of Thomas Mueller's 32-bit hash), the same on Python ints
    and int64 tensors, eager or compiled: x in [0, 2^31) -> [0, 2^31)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & WORD
    x = (((x >> 16) ^ x) * 0x45D9F3B) & WORD
    return (x >> 16) ^ x


def seed_key(seed: int) -> int:
    """A row's seed, any non-negative integer, folded into one 31-bit key."""
    key = mix(seed & WORD)
    seed >>= 31
    while seed:
        key = mix(key ^ (seed & WORD))
        seed >>= 31
    return key


def seeded_exponentials(keys: torch.Tensor, positions: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n) Exp(1) draws, a function of each row's key (``seed_key``), its position and the
    column only. keys, positions: (rows,) int64."""
    row = mix((keys ^ mix(positions & WORD)) & WORD)[:, None]  # (rows, 1)
    column = torch.arange(n, device=keys.device)[None, :]  # (1, n)
    bits = mix((row + mix(column)) & WORD) >> 7  # (rows, n) 24 random bits each
    return -torch.log((bits.float() + 0.5) * (1.0 / (1 << 24)))


def global_exponentials(needs: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n) Exp(1) draws from torch's global RNG for the rows where ``needs`` (a bool list or
    (rows,) tensor on the host) is true, in row order, drawn as ``torch.multinomial`` draws for
    exactly those rows; 1 elsewhere."""
    needs = torch.as_tensor(needs, dtype=torch.bool)
    noise = torch.ones(len(needs), n)
    if needs.any():
        noise[needs] = torch.empty(int(needs.sum()), n).exponential_()
    return noise


@dataclass
class RowSettings:
    """The sampling settings of a set of rows, one value per row (device tensors, (rows,) each but
    ``logit_bias``, (rows, vocab)); the slots of the engine keep one of these for all slots."""

    temperature: torch.Tensor  # float32, 0: greedy
    top_p: torch.Tensor  # float32
    top_k: torch.Tensor  # int64, 0: off
    min_p: torch.Tensor  # float32
    repetition_penalty: torch.Tensor  # float32
    presence_penalty: torch.Tensor  # float32
    frequency_penalty: torch.Tensor  # float32
    logit_bias: torch.Tensor  # float32 (rows, vocab)
    seeded: torch.Tensor  # bool
    seed_key: torch.Tensor  # int64, ``seed_key(seed + j)`` of row j of a prompt
    logprob_scale: torch.Tensor  # float32, what the logits are scaled by for logprobs: 1 / T with tempered_logprobs

    @classmethod
    def empty(cls, rows: int, vocab_size: int, device: torch.device) -> "RowSettings":
        def full(value, dtype):
            return torch.full((rows,), value, dtype=dtype, device=device)

        return cls(
            temperature=full(0.0, torch.float32),
            top_p=full(1.0, torch.float32),
            top_k=full(0, torch.long),
            min_p=full(0.0, torch.float32),
            repetition_penalty=full(1.0, torch.float32),
            presence_penalty=full(0.0, torch.float32),
            frequency_penalty=full(0.0, torch.float32),
            logit_bias=torch.zeros(rows, vocab_size, device=device),
            seeded=full(False, torch.bool),
            seed_key=full(0, torch.long),
            logprob_scale=full(1.0, torch.float32),
        )

    def rows(self, index) -> "RowSettings":
        """The settings of some rows: ``index`` a slice or a (rows,) tensor of row indices."""
        return RowSettings(**{name: value[index] for name, value in vars(self).items()})


def apply_penalties(
    logits: torch.Tensor, settings: RowSettings, seen: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """The penalised logits. logits: (rows, vocab) float32; seen: (rows, vocab) bool, the token is in
    the row's prompt or output; counts: (rows, vocab), how often the row generated it."""
    penalty = settings.repetition_penalty[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    logits = logits - settings.presence_penalty[:, None] * (counts > 0) - settings.frequency_penalty[:, None] * counts
    return logits + settings.logit_bias


def sample(logits: torch.Tensor, settings: RowSettings, positions: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Each row's next token: argmax at temperature 0, else drawn as the module docstring says.
    logits: (rows, vocab) float32, penalised; positions: (rows,) where each row's token will sit (the
    seeded rows' counter); noise: (rows, vocab) the unseeded rows' Exp(1) draws
    (``global_exponentials``). Returns (rows,) int64 token ids."""
    greedy = torch.argmax(logits, dim=-1)
    probs_sort, probs_idx = sorted_distribution(logits, settings)
    exponentials = torch.where(
        settings.seeded[:, None], seeded_exponentials(settings.seed_key, positions, logits.shape[-1]), noise
    )
    choice = torch.argmax(probs_sort / exponentials, dim=-1, keepdim=True)  # torch.multinomial's draw
    sampled = torch.gather(probs_idx, -1, choice)[:, 0]
    return torch.where(settings.temperature > 0, sampled, greedy)


def distribution(logits: torch.Tensor, settings: RowSettings) -> torch.Tensor:
    """The probabilities (rows, vocab), in vocabulary order, that ``sample`` draws each row's token
    from (temperature, top-k, min-p, top-p applied; a greedy row's as at temperature 1). Speculative
    decoding compares them with a draft's. logits: (rows, vocab) float32, penalised."""
    probs_sort, probs_idx = sorted_distribution(logits, settings)
    return torch.zeros_like(probs_sort).scatter(-1, probs_idx, probs_sort)


def sorted_distribution(logits: torch.Tensor, settings: RowSettings):
    """Each row's sampling probabilities sorted in descending order, and their token ids: (rows, vocab) each."""
    temperature = torch.where(settings.temperature > 0, settings.temperature, 1.0)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)  # (rows, vocab)
    vocab = probs.shape[-1]
    kth = probs_sort.gather(1, (settings.top_k.clamp(1, vocab) - 1)[:, None])  # (rows, 1)
    keep = (probs_sort >= torch.where(settings.top_k[:, None] > 0, kth, 0.0)) & (
        probs_sort >= settings.min_p[:, None] * probs_sort[:, :1]
    )
    kept = probs_sort * keep
    filtered = ((settings.top_k > 0) | (settings.min_p > 0))[:, None]  # only these rows renormalise before top-p
    probs_sort = torch.where(filtered, kept / kept.sum(dim=-1, keepdim=True), probs_sort)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort = probs_sort.masked_fill(
        probs_sum - probs_sort > settings.top_p[:, None], 0.0
    )  # mass before it reaches top_p
    return probs_sort / probs_sort.sum(dim=-1, keepdim=True), probs_idx


def sample_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """Meta's nucleus sampling, for code that imports it from ``llama.generation``: keep the most
    probable tokens until their mass reaches ``p``, renormalise, draw from the global RNG.
    probs: (bsz, vocab); returns (bsz, 1) token ids."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1)
    return torch.gather(probs_idx, -1, next_token)
