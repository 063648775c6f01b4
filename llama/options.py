"""The options of loading a model, of the engine and of a generation call, each one frozen value checked
once, and the checks of prompts: what ``Llama.build`` hands to the loader and the engine, and what
``Llama``'s calls, the streams and the server hand to the decoding engine (``llama.engine``).

A field that a command takes as a flag declares the flag here, once (``flag``): its help text in the
field's metadata, its default the field's; ``llama.cli.add_flags`` builds every command's parser from it.
"""

import os
from dataclasses import MISSING, dataclass, field
from typing import Dict, Optional, Sequence, Union

import torch

from llama.layers.kv_cache import DEFAULT_BLOCK_SIZE, KV_CACHE_DTYPES
from llama.layers.quantize import Quantization, parse_quantize

SPECULATE_CHOICES = (None, "lookup", "draft")
ADMISSIONS = ("continuous", "static")
ATTENTIONS = ("gather", "flex")  # how a cached pass reads the KV cache pool: a gathered copy, or FlexAttention in place
MAX_SPECULATE_K = 16


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def flag(default=MISSING, help: str = "", name: Optional[str] = None):
    """A field that commands take as the flag ``--<field>`` (``name``: another flag, e.g. ``--no_prefix_cache``
    for a field that is True by default), described by ``help``; ``default``: the field's and the flag's."""
    return field(default=default, metadata={"help": help, "flag": name})


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
    top_logprobs: k > 0 also returns, per generated token, the k most likely tokens and logprobs (with
        ``echo``, per prompt token too: the prompt's first has none, nothing predicts it).
    tempered_logprobs: logprobs and top_logprobs of log_softmax(logits / temperature) (0: of logits), as RL scores them.
    echo: also return the prompt (and its logprobs and alternatives, scored by its prefill; BOS's logprob is 0:
        nothing predicts it).
    speculate: "lookup" (prompt lookup) or "draft" (the draft model given to ``Llama.build``):
        speculative decoding (``llama.engine.speculative``), the same greedy tokens and the same sampling
        distribution, faster where proposals are accepted; None decodes one token per step.
    speculate_k: tokens proposed (and verified in one pass) per row per step.
    json_schema: a JSON Schema (a dict): each row's text is compact JSON that follows it, decoded
        under the grammar's token mask (``llama.engine.structured``), and ends by itself (a stop token).
    json_object: each row's text is a compact JSON object (any keys and values).
    adapter: the name of a LoRA adapter the model serves (``Llama.build(adapters={name: folder})``) that the
        rows compute with (``llama.engine.adapters``); None: the base model.
    """

    max_gen_len: Optional[int] = flag(
        None, "the most tokens generated for each prompt; default: up to the end of the context"
    )
    temperature: float = flag(0.6, "sampling temperature; 0 is greedy")
    top_p: float = flag(
        0.9, "nucleus sampling: sample among the most probable tokens whose probabilities add up to top_p"
    )
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
    tempered_logprobs: bool = False
    echo: bool = False
    speculate: Optional[str] = flag(
        None,
        "speculative decoding: lookup (n-grams of the prompt and output) or draft "
        "(needs --draft_ckpt_dir); same output, faster when proposals are accepted",
    )
    speculate_k: int = flag(4, "tokens proposed and verified per step with --speculate")
    json_schema: Optional[dict] = None
    json_object: bool = False
    adapter: Optional[str] = None

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
        if not isinstance(self.stop_strings, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop_strings
        ):
            raise TypeError(f"stop_strings must be a list of non-empty strings, got {self.stop_strings!r:.80}")
        if not is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {self.num_return_sequences!r}")
        if self.seed is not None and not (is_int(self.seed) and self.seed >= 0):
            raise ValueError(f"seed must be a non-negative integer or None (the global RNG), got {self.seed!r}")
        for name in ("logprobs", "tempered_logprobs", "echo", "json_object"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not is_int(self.top_logprobs) or self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be a non-negative integer, got {self.top_logprobs!r}")
        if self.speculate not in SPECULATE_CHOICES:
            raise ValueError(f"speculate must be one of {SPECULATE_CHOICES}, got {self.speculate!r}")
        if not is_int(self.speculate_k) or not 1 <= self.speculate_k <= MAX_SPECULATE_K:
            raise ValueError(f"speculate_k must be an integer in [1, {MAX_SPECULATE_K}], got {self.speculate_k!r}")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise TypeError(f"json_schema must be a JSON Schema as a dict, got {self.json_schema!r:.80}")
        if self.json_schema is not None and self.json_object:
            raise ValueError(
                "give json_schema or json_object=True, not both (a schema of {'type': 'object'} is json_object)"
            )
        if self.adapter is not None and not (isinstance(self.adapter, str) and self.adapter):
            raise TypeError(f"adapter must name a loaded adapter, or be None (the base), got {self.adapter!r:.80}")
        if self.constrained and self.speculate:
            raise ValueError(
                "speculate cannot be combined with json_schema or json_object: the proposals are not constrained"
            )

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
            raise ValueError(
                f"stop_tokens must be a list of token ids in [0, {vocab_size}), got {self.stop_tokens!r:.80}"
            )
        if not all(0 <= t < vocab_size for t in self.logit_bias):
            raise ValueError(
                f"logit_bias keys must be token ids in [0, {vocab_size}), got {sorted(self.logit_bias)[:5]!r}"
            )
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
    kv_cache_dtype: "int8" or "float8_e4m3fn" stores the pool's keys and values in 8 bits with a scale per
        token and head (``llama.layers.kv_cache``): a quarter of a float32 pool's bytes, about half of a
        bfloat16 one's, at a small accuracy cost; None: the model's dtype (float32 on a CPU for a bfloat16
        or float16 model, ``llama.layers.kv_cache.cache_dtype``).
    compile: run the decode step (model, sampler and writes) as one ``torch.compile`` graph (a CUDA
        graph on CUDA).
    compiled_attention: how the compiled step reads the rows' blocks: "gather" copies them for
        scaled_dot_product_attention, "flex" has FlexAttention read them in the pool; None: the device's
        default, and the gather for an 8-bit pool (``llama.engine.runner.default_compiled_attention``).
    prefix_cache: a row reuses the cached blocks of a prompt prefix an earlier row computed.
    admission: "continuous" (rows join free slots between steps) or "static" (only an empty batch).
    prefill_chunk: the most prompt tokens prefilled per step while rows decode.
    heartbeat_seconds: under torchrun, how often an idle rank 0 tells the others it is alive.
    max_loras: the most LoRA adapters served per request that are on the device at once, for the rows of one
        step (``llama.engine.adapters``); rows of another adapter wait until one of them is unused.
    max_lora_rank: the largest rank of an adapter served per request. The device holds max_loras x
        max_lora_rank rank columns beside each adaptable linear when the model serves adapters.
    """

    max_batch_size: int = flag(8, "the most rows (prompts, dialogs, samples) decoded together: the engine's slots")
    max_seq_len: int = flag(512, "the context length in tokens: prompt and generation together")
    kv_cache_tokens: Optional[int] = flag(
        None, "the KV cache pool's size in tokens, shared by the rows in blocks; default: max_batch_size x max_seq_len"
    )
    kv_block_size: Optional[int] = None
    kv_cache_dtype: Optional[str] = flag(
        None,
        "int8 or float8_e4m3fn: the KV cache's keys and values in 8 bits with a scale per token and head, "
        "a quarter of a float32 cache's bytes; default: the model's dtype (float32 on a CPU for a half-precision "
        "model)",
    )
    compile: bool = flag(
        False, "run the decode step under torch.compile (a CUDA graph on CUDA); the first generation compiles it"
    )
    compiled_attention: Optional[str] = None
    prefix_cache: bool = flag(
        True,
        "compute every prompt in full instead of reusing the cached blocks of a prefix an earlier request computed",
        name="--no_prefix_cache",
    )
    admission: str = flag(
        "continuous",
        "continuous (a request starts at the next step in free slots) or static (only "
        "into an empty batch, as a server without continuous batching; kept to measure "
        "the difference)",
    )
    prefill_chunk: int = flag(
        256,
        "the most prompt tokens prefilled in one step while other rows decode: a long "
        "prompt delays them by one chunk's time per step",
    )
    heartbeat_seconds: float = flag(
        10.0,
        "under torchrun, how often an idle rank 0 tells the others it is alive (well "
        "below the process group's 30-minute timeout)",
    )
    max_loras: int = flag(
        8, "the most LoRA adapters on the device at once, for one step's rows; rows of others wait for one to be unused"
    )
    max_lora_rank: int = flag(64, "the largest rank of a LoRA adapter served per request")

    def __post_init__(self):
        required = ("max_batch_size", "max_seq_len", "prefill_chunk", "max_loras", "max_lora_rank")
        for name in (*required, "kv_cache_tokens", "kv_block_size"):
            value = getattr(self, name)
            if (value is not None or name in required) and not (is_int(value) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("compile", "prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {tuple(KV_CACHE_DTYPES)} or None (the model's dtype), "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.compiled_attention not in (None, *ATTENTIONS):
            raise ValueError(f"compiled_attention must be one of {ATTENTIONS}, got {self.compiled_attention!r}")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {self.admission!r}")
        seconds = self.heartbeat_seconds
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds < 600:
            raise ValueError(
                f"heartbeat_seconds must be a number in (0, 600), well below the process group's "
                f"timeout; got {seconds!r}"
            )

    @property
    def block_size(self) -> int:
        """Tokens per block of the pool."""
        return self.kv_block_size or min(DEFAULT_BLOCK_SIZE, self.max_seq_len)

    @property
    def kv_cache_storage(self) -> Optional[torch.dtype]:
        """``kv_cache_dtype`` as a torch dtype; None: the pool stores the dtype attention computes in."""
        return KV_CACHE_DTYPES.get(self.kv_cache_dtype)

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


@dataclass(frozen=True)
class LoadOptions:
    """What loading a model needs, checked once: the checkpoint and its tokenizer, where and in what dtype it
    computes, how its weights are stored, an adapter merged into them, a draft for speculative decoding, and
    the processes it is split over. ``Llama.from_options`` loads it; ``Llama.build`` takes the same names.

    ckpt_dir: folder with ``params.json`` and ``consolidated.NN.pth`` shards (any number of them, whatever
        the number of processes), or a Hugging Face transformers Llama folder (``config.json`` with
        ``*.safetensors`` or ``pytorch_model*.bin``).
    tokenizer_path: ``tokenizer.model`` (Llama 2's sentencepiece or Llama 3's tiktoken file) or a Hugging
        Face ``tokenizer.json``; None: the folder's own (``llama.tokenizer.resolve_tokenizer_path``).
    device: "cpu", "cuda", "mps", ... or a torch.device; None picks this rank's GPU, else MPS, else CPU.
    dtype: "float32", "bfloat16", "float16" or a torch.dtype; None picks per device
        (``llama.distributed.resolve_dtype``).
    quantize: "int8" stores every linear weight as int8 with one scale per output row: a quarter of
        float32's bytes to read per token, the fastest decoding on a CPU, at a small accuracy cost. "int4"
        (groups of 64 input features) or "int4-g32" / "-g64" / "-g128" / "-g256": grouped 4-bit, an eighth
        of float32's bytes, for a model that must fit. Each weight is quantized on the CPU as it is read
        (``llama.layers.quantize``). None keeps the checkpoint's weights.
    adapter_dir: a LoRA adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``, as
        ``python -m llama.finetune`` writes it), merged into the weights as they are read, before
        ``quantize``: decoding costs what the model alone costs.
    adapters: LoRA adapters in peft's format served per request, by name (``{name: folder}``): kept beside
        the weights, a request's ``adapter`` names the one its rows compute with (``llama.engine.adapters``).
    draft_ckpt_dir: a smaller checkpoint with the same vocabulary, for ``speculate="draft"``
        (``llama.engine.speculative``); ``ckpt_dir`` itself with ``draft_quantize`` for a quantized copy of
        the model as its own draft. Split over the processes like the model, with the same cache sizes.
    draft_quantize: ``quantize`` for the draft. A quantized draft computes in the dtype its kernels are
        fastest in (bfloat16 on an AVX2 CPU, as ``dtype=None`` would pick), whatever ``dtype``; an
        unquantized one in the model's dtype.
    backend: torch.distributed backend under torchrun; None: $LLAMA_DIST_BACKEND, else NCCL on CUDA and
        gloo elsewhere.
    seed: seeds torch's random generators. Under model parallelism rank 0's draws choose every rank's
        tokens, so the ranks return the same tokens whatever their seeds.
    model_parallel_size: must equal the number of processes if given (Meta's argument).
    quiet_ranks: send stdout to /dev/null on local ranks > 0 (``llama.distributed.quiet_local_ranks``), as
        Meta's build does, so scripts that print on every rank print once; False keeps it.
    time_threads: on a CPU, once the model is loaded, time its decode step at torch's thread count and each
        half of it down to 1 and keep the fastest (``llama.layers.cpu_threads.choose_threads``; not where
        ``OMP_NUM_THREADS`` says how many, nor under torchrun): what the commands ask for when given no
        ``--threads``. False keeps the process's count.
    """

    ckpt_dir: str = flag(
        help="the checkpoint folder: Meta's params.json + consolidated.NN.pth, or a Hugging Face folder"
    )
    tokenizer_path: Optional[str] = flag(
        None,
        "the tokenizer: a sentencepiece or tiktoken tokenizer.model, or a "
        "Hugging Face tokenizer.json; default: the one in the checkpoint "
        "folder, else beside it",
    )
    device: Union[str, torch.device, None] = flag(
        None, "cpu, cuda or mps; default: this rank's GPU if there is one, else MPS, else the CPU"
    )
    dtype: Union[str, torch.dtype, None] = flag(
        None,
        "float32, bfloat16 or float16; default: bfloat16 on CUDA "
        "(float16 where unsupported), float16 on MPS, float32 on a CPU "
        "(with quantized weights, bfloat16 on a CPU with AVX2 or "
        "AVX-512)",
    )
    quantize: Optional[str] = flag(None, "int8, int4, or int4-g32/-g64/-g128/-g256 weights; default: not quantized")
    adapter_dir: Optional[str] = flag(
        None,
        "a LoRA adapter in peft's format (adapter_config.json, "
        "adapter_model.safetensors, as python -m llama.finetune writes it), merged "
        "into the weights as they load",
    )
    draft_ckpt_dir: Optional[str] = flag(
        None,
        "a smaller checkpoint with the same vocabulary, for --speculate draft; "
        "--ckpt_dir itself with --draft_quantize for a quantized self-draft",
    )
    draft_quantize: Optional[str] = flag(None, "int8, int4, ... weights for the draft (as --quantize)")
    backend: Optional[str] = None
    seed: int = 1
    model_parallel_size: Optional[int] = None
    quiet_ranks: bool = True
    time_threads: bool = False
    adapters: Optional[Dict[str, str]] = None

    def __post_init__(self):
        for name in ("ckpt_dir", "tokenizer_path", "adapter_dir", "draft_ckpt_dir"):
            value = getattr(self, name)
            if (value is not None or name == "ckpt_dir") and not isinstance(value, (str, os.PathLike)):
                raise TypeError(f"{name} must be a path, got {value!r:.80}")
        if self.adapters is not None and not (
            isinstance(self.adapters, dict)
            and all(
                isinstance(name, str) and name and isinstance(folder, (str, os.PathLike))
                for name, folder in self.adapters.items()
            )
        ):
            raise TypeError(f"adapters must map names to adapter folders, got {self.adapters!r:.80}")
        parse_quantize(self.quantize)  # raises for a value it cannot read
        parse_quantize(self.draft_quantize)
        if self.draft_quantize is not None and self.draft_ckpt_dir is None:
            raise ValueError(
                f"draft_quantize={self.draft_quantize!r} needs draft_ckpt_dir: pass draft_ckpt_dir=ckpt_dir for a "
                "quantized copy of the model as its own draft"
            )
        for name in ("quiet_ranks", "time_threads"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not is_int(self.seed):
            raise TypeError(f"seed must be an integer, got {self.seed!r}")
        size = self.model_parallel_size
        if size is not None and not (is_int(size) and size >= 1):
            raise ValueError(f"model_parallel_size must be a positive integer or None, got {size!r}")

    @property
    def quantization(self) -> Optional[Quantization]:
        """``quantize`` parsed (``llama.layers.quantize.parse_quantize``)."""
        return parse_quantize(self.quantize)

    @property
    def draft_quantization(self) -> Optional[Quantization]:
        return parse_quantize(self.draft_quantize)


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


def check_batch_size(
    n_prompts: int, num_return_sequences: int, max_batch_size: int, what: str = "prompt_tokens"
) -> None:
    """Every prompt's ``num_return_sequences`` rows must fit the cache's ``max_batch_size`` rows."""
    if n_prompts * num_return_sequences > max_batch_size:
        samples = f" x num_return_sequences={num_return_sequences}" if num_return_sequences > 1 else ""
        plural = "dialogs" if what == "dialog" else "prompts"
        raise ValueError(f"{n_prompts} {plural}{samples} exceed max_batch_size={max_batch_size}")
