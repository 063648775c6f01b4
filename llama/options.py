"""The options of a generation call and of the engine, each checked once, and the checks of prompts:
what ``Llama``'s calls, the streams and the server hand to the decoding engine (``llama.engine``)."""

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence


SPECULATE_CHOICES = (None, "lookup", "draft")
ADMISSIONS = ("continuous", "static")
ATTENTIONS = ("gather", "flex")  # how a cached pass reads the KV cache pool: a gathered copy, or FlexAttention in place
DEFAULT_BLOCK_SIZE = 16
MAX_SPECULATE_K = 16


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationOptions:
    """Every option of ``Llama.generate`` and the text and chat calls, checked once, here.

    The defaults give Meta's behaviour: nucleus sampling at temperature 0.6 and top_p 0.9, stopping
    at EOS. ``llama.engine.sampling`` explains the sampling options (temperature, top_p, top_k, min_p,
    repetition_penalty, presence_penalty, frequency_penalty, logit_bias); the rest:

    max_gen_len: most new tokens per row (also capped by max_seq_len); None: up to max_seq_len.
    stop_tokens: token ids that end a row, not returned; None means the tokenizer's (Llama 2: EOS; Llama 3:
        end of text, end of turn, end of message), [] never stops early.
    stop_strings: texts that end a row; the text is cut before the first one.
    num_return_sequences: n rows per prompt, prompt i's at [i*n, (i+1)*n).
    seed: row i*n + j draws from the counter-based generator of seed + j (its tokens do not depend on
        the other rows decoded beside it); None: torch's global RNG.
    logprobs: also return each returned token's log-probability.
    top_logprobs: k > 0 also returns, per generated token, the k most likely tokens and logprobs.
    echo: also return the prompt (and its logprobs; BOS gets 0: nothing predicts it).
    speculate: "lookup" (prompt lookup) or "draft" (the draft model given to ``Llama.build``):
        speculative decoding (``llama.engine.speculative``), the same greedy tokens and the same sampling
        distribution, faster where proposals are accepted; None decodes one token per step.
    speculate_k: tokens proposed (and verified in one pass) per row per step.
    json_schema: a JSON Schema (a dict): each row's text is compact JSON that follows it, decoded
        under the grammar's token mask (``llama.engine.structured``), and ends by itself (a stop token).
    json_object: each row's text is a compact JSON object (any keys and values).
    """

    max_gen_len: Optional[int] = None
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Dict[int, float] = field(default_factory=dict)
    stop_tokens: Optional[Sequence[int]] = None
    stop_strings: Sequence[str] = ()
    num_return_sequences: int = 1
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    speculate: Optional[str] = None
    speculate_k: int = 4
    json_schema: Optional[dict] = None
    json_object: bool = False

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2] (0 is off), got {value!r}")
        if not isinstance(self.logit_bias, dict) or not all(
            is_int(t) and isinstance(b, (int, float)) and not isinstance(b, bool) and -100 <= b <= 100
            for t, b in self.logit_bias.items()
        ):
            raise ValueError(f"logit_bias must map token ids to numbers in [-100, 100], got {self.logit_bias!r:.80}")
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
        for name in ("logprobs", "echo", "json_object"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not is_int(self.top_logprobs) or self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be a non-negative integer, got {self.top_logprobs!r}")
        if self.top_logprobs and self.echo:
            raise ValueError("top_logprobs covers generated tokens only; it cannot be combined with echo=True")
        if self.speculate not in SPECULATE_CHOICES:
            raise ValueError(f"speculate must be one of {SPECULATE_CHOICES}, got {self.speculate!r}")
        if not is_int(self.speculate_k) or not 1 <= self.speculate_k <= MAX_SPECULATE_K:
            raise ValueError(f"speculate_k must be an integer in [1, {MAX_SPECULATE_K}], got {self.speculate_k!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise TypeError(f"json_schema must be a JSON Schema as a dict, got {self.json_schema!r:.80}")
        if self.json_schema is not None and self.json_object:
            raise ValueError("give json_schema or json_object=True, not both (a schema of {'type': 'object'} is json_object)")
        if self.constrained and self.speculate:
            raise ValueError("speculate cannot be combined with json_schema or json_object: the proposals are not constrained")

    @property
    def constrained(self) -> bool:
        """Whether the rows follow a grammar (``json_schema`` or ``json_object``)."""
        return self.json_schema is not None or self.json_object

    def check_draft(self, has_draft: bool) -> None:
        """``speculate="draft"`` needs a model built with a draft."""
        if self.speculate == "draft" and not has_draft:
            raise ValueError(
                "speculate='draft' needs a draft model: build with Llama.build(..., draft_ckpt_dir=...) "
                "(--draft_ckpt_dir), or use speculate='lookup', which needs none"
            )

    def check_vocabulary(self, vocab_size: int) -> None:
        """The checks that need the model's vocabulary size."""
        if self.stop_tokens is not None and not all(0 <= t < vocab_size for t in self.stop_tokens):
            raise ValueError(f"stop_tokens must be a list of token ids in [0, {vocab_size}), got {self.stop_tokens!r:.80}")
        if not all(0 <= t < vocab_size for t in self.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {sorted(self.logit_bias)[:5]!r}")
        if self.top_logprobs > vocab_size:
            raise ValueError(f"top_logprobs must be an integer in [0, {vocab_size}], got {self.top_logprobs!r}")


@dataclass(frozen=True)
class EngineOptions:
    """The engine's sizes and policies, checked once: how many rows decode together, how long a row may
    grow, the KV cache pool they share in blocks, and how a step runs.

    max_batch_size: the most rows (prompts, dialogs, samples) decoded together: the engine's slots.
    max_seq_len: the longest row, prompt and generation together.
    kv_cache_tokens: the pool's size in tokens, shared by the rows in blocks; None: ``max_batch_size *
        max_seq_len`` (a contiguous cache's memory). When the running rows fill a smaller pool, the
        newest gives its blocks back and is computed again later.
    kv_block_size: tokens per block of the pool; None: 16, or ``max_seq_len`` if shorter.
    compile: run the decode step (model, sampler and writes) as one ``torch.compile`` graph (a CUDA
        graph on CUDA).
    compiled_attention: how the compiled step reads the rows' blocks: "gather" copies them for
        scaled_dot_product_attention, "flex" has FlexAttention read them in the pool; None: the device's
        default (``llama.engine.runner.default_compiled_attention``).
    prefix_cache: a row reuses the cached blocks of a prompt prefix an earlier row computed.
    admission: "continuous" (rows join free slots between steps) or "static" (only an empty batch).
    prefill_chunk: the most prompt tokens prefilled per step while rows decode.
    heartbeat_seconds: under torchrun, how often an idle rank 0 tells the others it is alive.
    """

    max_batch_size: int = 8
    max_seq_len: int = 512
    kv_cache_tokens: Optional[int] = None
    kv_block_size: Optional[int] = None
    compile: bool = False
    compiled_attention: Optional[str] = None
    prefix_cache: bool = True
    admission: str = "continuous"
    prefill_chunk: int = 256
    heartbeat_seconds: float = 10.0

    def __post_init__(self):
        for name in ("max_batch_size", "max_seq_len", "kv_cache_tokens", "kv_block_size", "prefill_chunk"):
            value = getattr(self, name)
            if (value is not None or name in ("max_batch_size", "max_seq_len", "prefill_chunk")) and not (
                is_int(value) and value >= 1
            ):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("compile", "prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.compiled_attention not in (None, *ATTENTIONS):
            raise ValueError(f"compiled_attention must be one of {ATTENTIONS} or None, got {self.compiled_attention!r}")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {self.admission!r}")
        seconds = self.heartbeat_seconds
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds < 600:
            raise ValueError(f"heartbeat_seconds must be a number in (0, 600), well below the process group's "
                             f"timeout; got {seconds!r}")

    @property
    def block_size(self) -> int:
        """Tokens per block of the pool."""
        return self.kv_block_size or min(DEFAULT_BLOCK_SIZE, self.max_seq_len)

    @property
    def blocks_per_row(self) -> int:
        """The most blocks one row holds: its block table's length."""
        return -(-self.max_seq_len // self.block_size)

    @property
    def pool_tokens(self) -> int:
        """The pool's tokens: ``kv_cache_tokens``, or every row's whole context, in whole blocks."""
        tokens = self.kv_cache_tokens or self.max_batch_size * self.blocks_per_row * self.block_size
        return -(-tokens // self.block_size) * self.block_size

    @property
    def kv_cache_blocks(self) -> int:
        """The pool's blocks: ``pool_tokens`` in blocks, and the scratch block (block 0), which positions
        nobody reads are written to."""
        return self.pool_tokens // self.block_size + 1


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
