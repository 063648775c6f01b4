"""Decoding a batch: the options of a generation call, the state of the rows being decoded, the
model's one-token decode step (eager or compiled), and the loop that prefills every prompt in one
pass and then decodes one token per row per step.

The loop keeps the batch's bookkeeping on the host (where each row is, which rows still generate,
why a row ended) and its tensors on the device (the token grid, logprobs). It waits on the device
once per step, to read the tokens it just sampled: the host needs them for stop tokens, stop
strings and streaming anyway, and knowing them it derives everything else without another wait.
"""

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F

from llama.model import Transformer
from llama.parallel import broadcast_from_rank0
from llama.sampling import Sampler
from llama.streaming import TextStream, cut_at_stop
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PAD = -1  # marks the not-yet-generated positions of the right-padded token grid


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationOptions:
    """Every option of ``Llama.generate`` and the text and chat calls, checked once, here.

    The defaults give Meta's behaviour: nucleus sampling at temperature 0.6 and top_p 0.9, stopping
    at EOS. ``Sampler`` explains the sampling options; the rest:

    max_gen_len: most new tokens per row (also capped by max_seq_len); None: up to max_seq_len.
    stop_tokens: token ids that end a row, not returned; None means [EOS], [] never stops early.
    stop_strings: texts that end a row; the text is cut before the first one.
    num_return_sequences: n rows per prompt, prompt i's at [i*n, (i+1)*n).
    seed: row i*n + j samples from a torch.Generator seeded with seed + j; None: the global RNG.
    logprobs: also return each returned token's log-probability.
    top_logprobs: k > 0 also returns, per generated token, the k most likely tokens and logprobs.
    echo: also return the prompt (and its logprobs; BOS gets 0: nothing predicts it).
    """

    max_gen_len: Optional[int] = None
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop_tokens: Optional[Sequence[int]] = None
    stop_strings: Sequence[str] = ()
    num_return_sequences: int = 1
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False

    def __post_init__(self):
        if self.max_gen_len is not None and not (is_int(self.max_gen_len) and self.max_gen_len >= 0):
            raise ValueError(f"max_gen_len must be a non-negative integer, got {self.max_gen_len!r}")
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer (0 is off), got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1) (0 is off), got {self.min_p!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1.0 is off), got {self.repetition_penalty!r}")
        if self.stop_tokens is not None and (
            not isinstance(self.stop_tokens, (list, tuple)) or not all(is_int(t) for t in self.stop_tokens)
        ):
            raise ValueError(f"stop_tokens must be a list of token ids, got {self.stop_tokens!r:.80}")
        if not isinstance(self.stop_strings, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop_strings):
            raise TypeError(f"stop_strings must be a list of non-empty strings, got {self.stop_strings!r:.80}")
        if not is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}")
        if self.seed is not None and not (is_int(self.seed) and self.seed >= 0):
            raise ValueError(f"seed must be a non-negative integer or None (the global RNG), got {self.seed!r}")
        for name in ("logprobs", "echo"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not is_int(self.top_logprobs) or self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be a non-negative integer, got {self.top_logprobs!r}")
        if self.top_logprobs and self.echo:
            raise ValueError("top_logprobs covers generated tokens only; it cannot be combined with echo=True")

    def check_vocabulary(self, vocab_size: int) -> None:
        """The checks that need the model's vocabulary size."""
        if self.stop_tokens is not None and not all(0 <= t < vocab_size for t in self.stop_tokens):
            raise ValueError(f"stop_tokens must be a list of token ids in [0, {vocab_size}), got {self.stop_tokens!r:.80}")
        if self.top_logprobs > vocab_size:
            raise ValueError(f"top_logprobs must be an integer in [0, {vocab_size}], got {self.top_logprobs!r}")


def check_prompts(prompt_tokens, max_seq_len: int, vocab_size: int, what: str = "prompt_tokens") -> None:
    """Each prompt a non-empty list of token ids in the vocabulary that fits the context. ``what``
    names the prompts in errors: "prompt_tokens" (prompt_tokens[i]), "prompt" or "dialog" (dialog i)."""
    if not isinstance(prompt_tokens, (list, tuple)):
        raise TypeError(f"prompt_tokens must be a list of lists of token ids, got {type(prompt_tokens).__name__}")
    for i, tokens in enumerate(prompt_tokens):
        name = f"prompt_tokens[{i}]" if what == "prompt_tokens" else f"{what} {i}"
        if not isinstance(tokens, (list, tuple)) or not all(is_int(t) for t in tokens):
            raise TypeError(f"{name} must be a list of int token ids, got {tokens!r:.80}")
        if not tokens:
            raise ValueError(f"{name} is empty: a prompt needs at least one token (BOS)")
        if len(tokens) > max_seq_len:
            raise ValueError(f"{name} has {len(tokens)} tokens, more than max_seq_len={max_seq_len}")
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")


def check_batch_size(n_prompts: int, num_return_sequences: int, max_batch_size: int, what: str = "prompt_tokens") -> None:
    """Every prompt's ``num_return_sequences`` rows must fit the cache's ``max_batch_size`` rows."""
    if n_prompts * num_return_sequences > max_batch_size:
        samples = f" x num_return_sequences={num_return_sequences}" if num_return_sequences > 1 else ""
        plural = "dialogs" if what == "dialog" else "prompts"
        raise ValueError(f"{n_prompts} {plural}{samples} exceed max_batch_size={max_batch_size}")


class DecodeStep:
    """The model's decode step: one token per row, each at its own position, to the (bsz, vocab)
    float32 logits of each row's next token. It attends over the first ``kv_len`` cache entries, a
    bound the loop knows on the host (no position reaches it).

    Compiled, a few graphs serve every step: a batch is padded to a power of two rows (the padding
    rows write only their own, unused cache rows), and the attended length is rounded up to a power
    of two and marked dynamic, so one graph per padded batch size serves every length shorter than
    the cache, and a CUDA graph is recorded per length bucket. Attending over the whole cache gets a
    graph of its own: a prefix of the cache rows is a contiguous tensor exactly when it is the whole
    length, and the compiler specialises on that. New prompts, positions and contents compile nothing; a
    batch does at most twice its work and attends over at most twice the keys it needs. On CUDA,
    ``mode="reduce-overhead"`` replays CUDA graphs: one launch per step instead of hundreds of small
    kernels.
    """

    def __init__(self, model: Transformer, compile: bool = False):
        self.model = model
        self.compiled = None
        self.compile_seconds: Optional[float] = None  # the first compiled call, compilation included
        if compile:
            mode = "reduce-overhead" if model.output.weight.device.type == "cuda" else None
            self.compiled = torch.compile(self.step, mode=mode, dynamic=False)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, kv_slots: torch.Tensor) -> torch.Tensor:
        """The step attending over ``len(kv_slots)`` cache entries: the length of an empty (kv_len, 0)
        tensor, which the compiler can treat as dynamic (an int argument it would specialise on)."""
        return self.model.forward_at(tokens[:, None], positions[:, None], kv_len=kv_slots.shape[0])[:, 0]

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """tokens, positions: (bsz,)."""
        if self.compiled is None:
            return self.model.forward_at(tokens[:, None], positions[:, None], kv_len=kv_len)[:, 0]
        params = self.model.params
        bsz = tokens.shape[0]
        padding = min(1 << (bsz - 1).bit_length(), params.max_batch_size) - bsz
        tokens, positions = F.pad(tokens, (0, padding)), F.pad(positions, (0, padding))
        kv_slots = torch.empty(min(max(16, 1 << (kv_len - 1).bit_length()), params.max_seq_len), 0)
        if 1 < kv_slots.shape[0] < params.max_seq_len:  # see the class docstring: the whole cache has its own graph
            torch._dynamo.mark_dynamic(kv_slots, 0)
        if self.compile_seconds is not None:
            return self.compiled(tokens, positions, kv_slots)[:bsz]
        start = time.perf_counter()
        logits = self.compiled(tokens, positions, kv_slots)[:bsz]
        self.compile_seconds = time.perf_counter() - start
        logger.info("compiled the decode step in %.1f s", self.compile_seconds)
        return logits


class Decoding:
    """A batch being decoded: the right-padded grid of prompt and generated tokens on the device,
    and on the host what the loop learns about each row: where it ends and why.

    Rows end at a stop token (not returned), at a stop string, at ``max_gen_len`` or the end of the
    grid, or when cancelled. ``finish_reasons[row]`` is None while the row generates, then "stop",
    "length" or "cancelled".
    """

    def __init__(
        self,
        prompt_tokens: List[List[int]],
        options: GenerationOptions,
        tokenizer: Tokenizer,
        max_seq_len: int,
        device: torch.device,
        streams: bool = False,
    ):
        """``prompt_tokens``: one list per row (each prompt already repeated per sample). ``streams``:
        keep a ``TextStream`` of each row's text (always kept when there are stop strings)."""
        self.options = options
        self.prompt_lens = [len(t) for t in prompt_tokens]
        bsz, max_prompt_len = len(prompt_tokens), max(self.prompt_lens, default=0)
        max_gen_len = max_seq_len if options.max_gen_len is None else options.max_gen_len
        self.total_len = min(max_seq_len, max_prompt_len + max_gen_len)
        self.limits = [min(n + max_gen_len, self.total_len) for n in self.prompt_lens]  # each row's output ends by here
        self.ends = list(self.limits)  # where each row's output ends, once known
        self.text_ends = list(self.limits)  # after a stop string: after the token that completed it
        self.finish_reasons: List[Optional[str]] = ["length" if n >= limit else None for n, limit in zip(self.prompt_lens, self.limits)]
        self.cancel_requests = set()  # rows to cancel at the next step (rank 0's decision)
        self.stop_tokens = {tokenizer.eos_id} if options.stop_tokens is None else set(options.stop_tokens)
        self.tokenizer = tokenizer

        self.tokens = torch.full((bsz, self.total_len), PAD, dtype=torch.long)
        for row, tokens in enumerate(prompt_tokens):
            self.tokens[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        self.tokens = self.tokens.to(device)
        self.token_logprobs = torch.zeros(bsz, self.total_len, device=device) if options.logprobs else None
        k = options.top_logprobs
        self.top_ids = torch.zeros(bsz, self.total_len, k, dtype=torch.long, device=device) if k else None
        self.top_logprobs = torch.zeros(bsz, self.total_len, k, device=device) if k else None
        self.streams = [TextStream(tokenizer, options.stop_strings) for _ in range(bsz)] if streams or options.stop_strings else None

        generators = None
        if options.seed is not None:  # row i*n + j draws from its own generator seeded with seed + j
            n = options.num_return_sequences
            generators = [torch.Generator(device=device).manual_seed(options.seed + row % n) for row in range(bsz)]
        self.sampler = Sampler(options.temperature, options.top_p, options.top_k, options.min_p, options.repetition_penalty, generators)

    @property
    def live(self) -> List[bool]:
        """Per row: still generating."""
        return [reason is None for reason in self.finish_reasons]

    def cancel(self, row: int) -> None:
        """Stop decoding ``row`` from the next step on; its output keeps the tokens it has."""
        if not 0 <= row < len(self.finish_reasons):
            raise ValueError(f"row must be in [0, {len(self.finish_reasons)}), got {row!r}")
        self.cancel_requests.add(row)

    def cancel_flags(self, device: torch.device) -> torch.Tensor:
        """(bsz,) 1 for the rows to cancel now; taken from the requests, which it clears."""
        flags = torch.zeros(len(self.finish_reasons), dtype=torch.long)
        flags[sorted(self.cancel_requests)] = 1
        self.cancel_requests.clear()
        return flags.to(device)

    def record(self, step: int, tokens: List[int], cancelled: List[int]) -> None:
        """Learn from the tokens the rows just wrote, each at ``prompt_len + step``."""
        for row, (token, cancel) in enumerate(zip(tokens, cancelled)):
            if self.finish_reasons[row] is not None:
                continue
            position = self.prompt_lens[row] + step
            if cancel:
                self.finish(row, "cancelled", position)
            elif token in self.stop_tokens:
                self.finish(row, "stop", position)
            elif self.streams is not None and self.push(row, token):
                self.finish(row, "stop", self.prompt_lens[row] + self.streams[row].covering_tokens(), position + 1)
            elif position + 1 >= self.limits[row]:
                self.finish(row, "length", position + 1)

    def push(self, row: int, token: int) -> bool:
        """Add the token to the row's text; True if that completed a stop string."""
        self.streams[row].push(token)
        return self.streams[row].stopped

    def finish(self, row: int, reason: str, end: int, text_end: Optional[int] = None) -> None:
        self.finish_reasons[row], self.ends[row] = reason, end
        self.text_ends[row] = end if text_end is None else text_end

    def tokens_so_far(self, row: int) -> List[int]:
        """The row's generated tokens known to the host so far (needs streams)."""
        return self.streams[row].tokens[: self.ends[row] - self.prompt_lens[row]]

    def output_range(self, row: int) -> range:
        """The positions of the row's output so far: its prompt too with ``echo``."""
        start = 0 if self.options.echo else self.prompt_lens[row]
        return range(start, self.ends[row])

    def texts(self) -> List[str]:
        """Each row's output (its prompt too with echo) as text, cut before the first stop string in
        the generated part."""
        texts = []
        for row, tokens in enumerate(self.tokens.tolist()):
            start, prompt_len = self.output_range(row).start, self.prompt_lens[row]
            prompt_chars = len(self.tokenizer.decode(tokens[:prompt_len])) if self.options.echo else 0
            text = self.tokenizer.decode(tokens[start : self.text_ends[row]])
            texts.append(cut_at_stop(text, self.options.stop_strings, prompt_chars))
        return texts

    def results(self):
        """(tokens, logprobs[, top_logprobs]) per row, as ``Llama.generate`` returns them."""
        spans = [self.output_range(row) for row in range(len(self.prompt_lens))]
        tokens = [row[span.start : span.stop] for row, span in zip(self.tokens.tolist(), spans)]
        logprobs = None
        if self.token_logprobs is not None:
            logprobs = [row[span.start : span.stop] for row, span in zip(self.token_logprobs.tolist(), spans)]
        if self.top_ids is None:
            return tokens, logprobs
        top = [
            [list(zip(ids, lps)) for ids, lps in zip(row_ids[span.start : span.stop], row_lps[span.start : span.stop])]
            for row_ids, row_lps, span in zip(self.top_ids.tolist(), self.top_logprobs.tolist(), spans)
        ]
        return tokens, logprobs, top


@torch.no_grad()  # not inference_mode: torch.compile cannot take inference tensors as inputs
def decode_steps(model: Transformer, decode_step: DecodeStep, state: Decoding) -> Iterator[int]:
    """The decoding loop: one pass prefills every prompt, however ragged the batch, then each row
    decodes one token per step at its own position, and the loop yields the step's index after
    each. It ends when every row has ended.

    A short prompt's padding sits after it, so causal attention never lets a prompt token see the
    padding, and each padding entry of the KV cache is overwritten by the row's own token before
    anything reads it: each row continues exactly as it would alone. Under model parallelism every
    rank continues with rank 0's sampled tokens and cancellations, broadcast together each step.
    """
    tokens, token_logprobs, bsz = state.tokens, state.token_logprobs, state.tokens.shape[0]
    if bsz == 0 or (not any(state.live) and token_logprobs is None):
        return
    device, total_len, max_prompt_len = tokens.device, state.total_len, max(state.prompt_lens)
    rows = torch.arange(bsz, device=device)
    prompt_lens = torch.tensor(state.prompt_lens, device=device)
    prompts = tokens[:, :max_prompt_len].clamp(min=0)  # PAD -> any valid id (see above)
    positions = torch.arange(max_prompt_len, device=device).expand(bsz, max_prompt_len)
    if token_logprobs is None:  # the vocabulary projection only where the next token is predicted
        last = model.forward_at(prompts, positions, logits_at=prompt_lens - 1, kv_len=max_prompt_len)[:, 0]  # (bsz, vocab)
    else:  # every position's logits: the prompt is scored too (logits at i-1 predict token i)
        logits = model.forward_at(prompts, positions, kv_len=max_prompt_len)
        token_logprobs[:, 1:max_prompt_len] = -F.cross_entropy(
            logits[:, :-1].transpose(1, 2), tokens[:, 1:max_prompt_len], reduction="none", ignore_index=PAD
        )
        last = logits[rows, prompt_lens - 1]

    for step in itertools.count():
        live = state.live
        if not any(live):
            return
        # copied to the device before this step's compute is queued, so the copies wait for nothing
        live_mask, cancel_flags = torch.tensor(live, device=device), state.cancel_flags(device)
        if step > 0:  # each row's token from the last step, at its own position, predicts the next (PAD: ended rows)
            last = decode_step(written.clamp(min=0), position, kv_len=min(max_prompt_len + step, total_len))
        position = (prompt_lens + step).clamp(max=total_len - 1)  # (bsz,) rows that have ended idle on a valid one
        # the grid holds each row's tokens so far and PAD after them: the sampler's "previous tokens"
        sampled = state.sampler(last, tokens, live)
        message = broadcast_from_rank0(torch.stack([sampled, cancel_flags]))  # (2, bsz): rank 0's choices
        writes = live_mask & (message[1] == 0)  # (bsz,) the rows whose token counts
        written = torch.where(writes, message[0], tokens[rows, position])
        tokens[rows, position] = written
        if token_logprobs is not None:
            scored = -F.cross_entropy(last, written, reduction="none")
            token_logprobs[rows, position] = torch.where(writes, scored, token_logprobs[rows, position])
        if state.top_ids is not None:
            alternatives = torch.log_softmax(last, dim=-1).topk(state.top_ids.shape[-1], dim=-1)
            state.top_logprobs[rows, position] = torch.where(writes[:, None], alternatives.values, state.top_logprobs[rows, position])
            state.top_ids[rows, position] = torch.where(writes[:, None], alternatives.indices, state.top_ids[rows, position])
        state.record(step, *message.tolist())  # the step's one wait on the device
        yield step
