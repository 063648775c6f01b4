"""Text and chat generation with the API of Meta's reference: ``Llama.build``, ``generate``,
``text_completion`` and ``chat_completion``, on any device and any model-parallel world size."""

import logging
import time
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Iterator, List, Literal, Optional, Sequence, Tuple, TypedDict, Union

import torch
import torch.nn.functional as F

from llama.checkpoint import checkpoint_vocab_size, load_model, read_params, shard_paths
from llama.distributed import default_device, fail_together, init_distributed, local_rank
from llama.model import ModelArgs, Transformer
from llama.parallel import broadcast_from_rank0, model_parallel_world_size
from llama.quantize import Quantization, check_activation_dtype, parse_quantize, quantized_cpu_dtype
from llama.sampling import Sampler, sample_top_p  # noqa: F401  (sample_top_p: Meta's import path)
from llama.streaming import TextStream, cut_at_stop
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PAD = -1  # marks the not-yet-generated positions of the right-padded token grid


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """None: this rank's GPU, else MPS, else CPU. A bare "cuda" means this rank's GPU."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be e.g. 'cpu', 'cuda', 'cuda:1' or 'mps', got {device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank() % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but MPS is not available on this machine")
    return device


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device, quantization: Optional[Quantization] = None) -> torch.dtype:
    """None picks per device: bf16 on CUDA where supported (else fp16), fp16 on MPS, and fp32 on CPU,
    where single-token (decode) matmuls measure no faster in bf16 and fp32 is exact; with quantized
    weights, the CPU's default is ``quantized_cpu_dtype()`` (``llama.quantize``)."""
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif device.type == "mps":
            dtype = torch.float16
        else:
            dtype = quantized_cpu_dtype() if quantization else torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        dtype = DTYPES[dtype]
    if not (isinstance(dtype, torch.dtype) and dtype in DTYPES.values()):
        raise ValueError(f"dtype must be one of {list(DTYPES)} (or the torch.dtype), got {dtype!r}")
    if quantization:
        check_activation_dtype(quantization, device, dtype)
    return dtype


def positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        backend: Optional[str] = None,
        quantize: Optional[str] = None,
    ) -> "Llama":
        """Load a checkpoint in Meta's layout and its tokenizer.

        Args:
            ckpt_dir: folder with ``params.json`` and ``consolidated.NN.pth`` shards (any number of them,
                whatever the number of processes).
            tokenizer_path: the sentencepiece ``tokenizer.model``.
            max_seq_len: longest prompt + generation; sizes the KV cache.
            max_batch_size: most sequences per ``generate`` call; sizes the KV cache.
            model_parallel_size: must equal the number of processes if given (Meta's argument).
            seed: seeds torch's random generators. Under model parallelism rank 0's draws choose every
                rank's tokens, so the ranks return the same tokens whatever their seeds.
            device: "cpu", "cuda", "mps", ...; None picks this rank's GPU, else MPS, else CPU.
            dtype: "float32", "bfloat16", "float16" or a torch.dtype; None picks per device.
            backend: torch.distributed backend under torchrun; None: $LLAMA_DIST_BACKEND, else NCCL
                on CUDA and gloo elsewhere.
            quantize: "int8" stores every linear weight as int8 with one scale per output row: a
                quarter of float32's bytes to read per token, the fastest decoding on a CPU, at a
                small accuracy cost. "int4" (groups of 64 input features) or "int4-g32" / "-g64" /
                "-g128" / "-g256": grouped 4-bit, an eighth of float32's bytes, for a model that
                must fit. Each weight is quantized on the CPU as it is read (``llama.quantize``).
                None keeps the checkpoint's weights.

        Returns:
            A ``Llama`` holding the model and tokenizer.
        """
        device = resolve_device(device)
        init_distributed(device, backend)
        with fail_together():  # each rank reads its own files: if one fails, all do
            positive_int(max_seq_len, "max_seq_len")
            positive_int(max_batch_size, "max_batch_size")
            quantization = parse_quantize(quantize)
            dtype = resolve_dtype(dtype, device, quantization)
            world_size = model_parallel_world_size()
            if model_parallel_size is not None and model_parallel_size != world_size:
                raise ValueError(
                    f"model_parallel_size={model_parallel_size} but this job has {world_size} process(es); "
                    "leave it None to use every process (any number of processes can load any checkpoint)"
                )
            torch.manual_seed(seed)

            params = read_params(ckpt_dir)
            tokenizer = Tokenizer(tokenizer_path)
            paths = shard_paths(ckpt_dir)
            rows = checkpoint_vocab_size(paths)
            if rows != tokenizer.n_words:
                raise ValueError(
                    f"tokenizer {tokenizer_path} has {tokenizer.n_words} tokens but the checkpoint's "
                    f"tok_embeddings.weight has {rows} rows ({paths[0]}): this tokenizer is not the checkpoint's"
                )
            vocab_size = params.get("vocab_size", -1)
            if vocab_size not in (-1, tokenizer.n_words):
                raise ValueError(
                    f"{Path(ckpt_dir) / 'params.json'} says vocab_size={vocab_size} but the tokenizer has {tokenizer.n_words} tokens"
                )
            args = ModelArgs.from_dict(
                {**params, "vocab_size": tokenizer.n_words, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size},
                source=str(Path(ckpt_dir) / "params.json"),
            )
            model = load_model(ckpt_dir, args, device, dtype, quantization)  # quantized tensor by tensor
            logger.info("loaded %s on %s in %s", ckpt_dir, device, dtype)
        return Llama(model, tokenizer)

    def __init__(self, model: Transformer, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    def check_generate_args(self, prompt_tokens, max_gen_len, temperature, top_p) -> None:
        params = self.model.params
        if not isinstance(prompt_tokens, (list, tuple)):
            raise TypeError(f"prompt_tokens must be a list of lists of token ids, got {type(prompt_tokens).__name__}")
        if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool) or max_gen_len < 0:
            raise ValueError(f"max_gen_len must be a non-negative integer, got {max_gen_len!r}")
        if not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        for i, tokens in enumerate(prompt_tokens):
            if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise TypeError(f"prompt_tokens[{i}] must be a list of int token ids, got {tokens!r:.80}")
            if not tokens:
                raise ValueError(f"prompt_tokens[{i}] is empty: a prompt needs at least one token (BOS)")
            if len(tokens) > params.max_seq_len:
                raise ValueError(f"prompt_tokens[{i}] has {len(tokens)} tokens, more than max_seq_len={params.max_seq_len}")
            bad = [t for t in tokens if not 0 <= t < params.vocab_size]
            if bad:
                raise ValueError(f"prompt_tokens[{i}] has token id(s) {bad[:5]} outside the vocabulary [0, {params.vocab_size})")

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        stop_tokens: Optional[Sequence[int]] = None,
        stop_strings: Sequence[str] = (),
        num_return_sequences: int = 1,
        seed: Optional[int] = None,
        top_logprobs: int = 0,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt, all in one batch.

        Prompts are right-padded into one (bsz, total_len) grid and prefilled in one pass, whatever
        their lengths; then each row decodes from its own prompt's end (Meta's reference instead feeds
        the longer prompts one token per step from the shortest prompt's end). Prompts are never
        overwritten, greedy results equal Meta's, and a row's tokens equal those of its prompt alone.
        Sampled rows of a ragged batch follow the same distribution as Meta's, not the same draws.

        Args:
            prompt_tokens: one list of token ids per prompt.
            max_gen_len: most new tokens per prompt (also capped by max_seq_len).
            temperature: softmax temperature; 0 is greedy (argmax).
            top_p: nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p.
            logprobs: also return each returned token's log-probability.
            echo: also return the prompt (and its logprobs). The first token's logprob is 0: nothing
                predicts BOS.
            top_k, min_p, repetition_penalty: more sampling filters, off by default (see ``Sampler``).
            stop_tokens: token ids that end a row, not returned; None means [EOS].
            stop_strings: texts that end a row; its tokens end with the one completing the text
                (``text_completion`` cuts the text before it).
            num_return_sequences: n independent samples per prompt: n rows per prompt, prompt i's
                at [i*n, (i+1)*n).
            seed: sample j of each prompt draws from a torch.Generator seeded with seed + j, leaving
                the global RNG alone; None draws from the global RNG (seeded by ``build``).
            top_logprobs: k > 0 also returns, per generated token, the k most likely tokens at its
                position as (token id, logprob) pairs, most likely first.

        Returns:
            (tokens, logprobs): per prompt the generated tokens, up to and excluding the first stop
            token, and their logprobs (None unless ``logprobs``); with ``top_logprobs``, a third list.
        """
        every_argument = (prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, top_k, min_p,
                          repetition_penalty, stop_tokens, stop_strings, num_return_sequences, seed, top_logprobs)
        with fail_together(same_on_every_rank=every_argument):  # ranks must agree before the first collective
            self.check_generate_args(prompt_tokens, max_gen_len, temperature, top_p)
            state = self.start_decoding(
                prompt_tokens, max_gen_len, Sampler(temperature, top_p, top_k, min_p, repetition_penalty), logprobs,
                stop_tokens, stop_strings, num_return_sequences, seed, top_logprobs, echo=echo,
            )
        for _ in self.decode_steps(state):
            pass
        return state.results(echo)

    def start_decoding(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        sampler: Sampler,
        logprobs: bool = False,
        stop_tokens: Optional[Sequence[int]] = None,
        stop_strings: Sequence[str] = (),
        num_return_sequences: int = 1,
        seed: Optional[int] = None,
        top_logprobs: int = 0,
        streams: bool = False,
        echo: bool = False,
    ) -> "Decoding":
        """The right-padded grid of a batch about to be decoded by ``decode_steps``: each prompt
        ``num_return_sequences`` times, room for max_gen_len more tokens (capped by max_seq_len).
        ``streams``: keep a ``TextStream`` of each row's text (always kept when there are stop strings)."""
        params = self.model.params
        check_decoding_options(stop_tokens, stop_strings, num_return_sequences, seed, top_logprobs, echo, params.vocab_size)
        if len(prompt_tokens) * num_return_sequences > params.max_batch_size:
            samples = f" x num_return_sequences={num_return_sequences}" if num_return_sequences > 1 else ""
            raise ValueError(f"{len(prompt_tokens)} prompts{samples} exceed max_batch_size={params.max_batch_size}")
        prompt_tokens = [list(t) for t in prompt_tokens for _ in range(num_return_sequences)]
        if seed is not None:  # row i*n + j draws from its own generator seeded with seed + j
            sampler = replace(sampler, generators=[
                torch.Generator(device=self.device).manual_seed(seed + i % num_return_sequences) for i in range(len(prompt_tokens))
            ])
        bsz = len(prompt_tokens)
        max_prompt_len = max((len(t) for t in prompt_tokens), default=0)
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)
        tokens = torch.full((bsz, total_len), PAD, dtype=torch.long, device=self.device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
        prompt_lens = torch.tensor([len(t) for t in prompt_tokens], dtype=torch.long, device=self.device)
        return Decoding(
            tokens=tokens,
            prompt_lens=prompt_lens,
            ends=prompt_lens + max_gen_len,
            stopped=torch.zeros(bsz, dtype=torch.bool, device=self.device),
            sampler=sampler,
            stop_tokens=torch.tensor([self.tokenizer.eos_id] if stop_tokens is None else list(stop_tokens), dtype=torch.long, device=self.device),
            token_logprobs=torch.zeros(bsz, total_len, dtype=torch.float, device=self.device) if logprobs else None,
            top_ids=torch.zeros(bsz, total_len, top_logprobs, dtype=torch.long, device=self.device),
            top_logprobs=torch.zeros(bsz, total_len, top_logprobs, dtype=torch.float, device=self.device),
            streams=[TextStream(self.tokenizer, stop_strings) for _ in range(bsz)] if streams or stop_strings else None,
        )

    @torch.inference_mode()
    def decode_steps(self, state: "Decoding") -> Iterator[int]:
        """The decoding loop: one pass prefills every prompt, however ragged the batch, then each row
        decodes one token per step at its own position, and the loop yields after each step. Rows end
        at a stop token, a stop string or their length; the loop ends when every row has.

        A short prompt's padding sits after it, so causal attention never lets a prompt token see the
        padding, and each padding entry of the KV cache is overwritten by the row's own token before
        anything reads it: each row continues exactly as it would alone. The loop waits on the device
        once per step, to learn whether any row is still generating.
        """
        tokens, token_logprobs, bsz = state.tokens, state.token_logprobs, state.tokens.shape[0]
        if bsz == 0:
            return
        total_len = tokens.shape[1]
        prompt_lens = state.prompt_lens.tolist()
        shared_start = prompt_lens[0] if len(set(prompt_lens)) == 1 else None  # equal prompts share positions
        rows = torch.arange(bsz, device=tokens.device)
        limits = state.ends.clamp(max=total_len)  # (bsz,) each row generates up to here
        cur_pos = state.prompt_lens.clone()  # (bsz,) where each row writes its next token
        live = cur_pos < limits
        generating = bool(live.any())
        if not generating and token_logprobs is None:
            return
        prompts = tokens[:, : max(prompt_lens)].clamp(min=0)  # PAD -> any valid id (see above)
        if token_logprobs is None:  # the vocabulary projection only where the next token is predicted
            last = self.model.forward(prompts, 0, logits_at=cur_pos - 1)[:, 0]  # (bsz, vocab)
        else:  # every position's logits: the prompt is scored too (logits at i-1 predict token i)
            logits = self.model.forward(prompts, 0)
            token_logprobs[:, 1 : prompts.shape[1]] = -F.cross_entropy(
                logits[:, :-1].transpose(1, 2), tokens[:, 1 : prompts.shape[1]], reduction="none", ignore_index=PAD
            )
            last = logits[rows, cur_pos - 1]

        step = 0
        while generating:
            pos = cur_pos.clamp(max=total_len - 1)  # rows that have ended idle on a valid position
            # the grid holds each row's tokens so far and PAD after them: the sampler's "previous tokens"
            next_token = broadcast_from_rank0(state.sampler(last, tokens, live))  # every rank continues with rank 0's choice
            written = torch.where(live, next_token, tokens[rows, pos])
            tokens[rows, pos] = written
            if token_logprobs is not None:
                token_logprobs[rows, pos] = torch.where(live, -F.cross_entropy(last, next_token, reduction="none"), token_logprobs[rows, pos])
            if state.top_ids.shape[-1]:
                alternatives = torch.log_softmax(last.float(), dim=-1).topk(state.top_ids.shape[-1], dim=-1)
                state.top_logprobs[rows, pos] = torch.where(live[:, None], alternatives.values, state.top_logprobs[rows, pos])
                state.top_ids[rows, pos] = torch.where(live[:, None], alternatives.indices, state.top_ids[rows, pos])
            state.record(pos, written, live)
            yield step
            cur_pos = cur_pos + 1
            live &= ~state.stopped & (cur_pos < limits)
            generating = bool(live.any())
            if generating:  # each row's new token at its own position; shared positions take Meta's int path
                start_pos = pos if shared_start is None else shared_start + step
                last = self.model.forward(written.clamp(min=0)[:, None], start_pos)[:, -1]
            step += 1

    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        **options,
    ) -> List[CompletionPrediction]:
        """Complete each text prompt (BOS is prepended).

        Args:
            prompts: the texts to continue.
            temperature, top_p, logprobs, echo: as for ``generate``.
            max_gen_len: most new tokens; None allows up to max_seq_len - 1.
            options: ``generate``'s top_k, min_p, repetition_penalty, stop_tokens, stop_strings,
                num_return_sequences, seed, top_logprobs.

        Returns:
            One dict per prompt (per sample: prompt i's n at [i*n, (i+1)*n)): {"generation": text},
            cut before the first stop string, plus "tokens" (each token's text) and "logprobs" when
            ``logprobs``, and "top_logprobs" (per token, (text, logprob) pairs) when asked.
        """
        prompt_tokens = self.encode_prompts(prompts)
        generated = self.generate(prompt_tokens, self.default_gen_len(max_gen_len), temperature, top_p, logprobs, echo, **options)
        n, stop_strings = options.get("num_return_sequences", 1), options.get("stop_strings", ())
        results: List[CompletionPrediction] = []
        for i, tokens in enumerate(generated[0]):
            prompt_chars = len(self.tokenizer.decode(prompt_tokens[i // n])) if echo else 0
            text = cut_at_stop(self.tokenizer.decode(tokens), stop_strings, prompt_chars)
            results.append({"generation": text, **self.token_details(i, *generated)})
        return results

    def text_completion_stream(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        **options,
    ) -> "CompletionStream":
        """``text_completion`` as it is generated: yields, after each decoding step and once more at
        the end, one string per row (n per prompt, as ``text_completion``) holding the text that
        became final, "" for none. A row's strings, joined, equal its "generation". Text that may
        still turn into a stop string, or the first bytes of a multi-byte character, wait.

        Args: as ``text_completion``, less logprobs, echo and top_logprobs.
        """
        prompt_tokens = self.encode_prompts(prompts)
        return self.stream(prompt_tokens, self.default_gen_len(max_gen_len), temperature, top_p, **options)

    def stream(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        stop_tokens: Optional[Sequence[int]] = None,
        stop_strings: Sequence[str] = (),
        num_return_sequences: int = 1,
        seed: Optional[int] = None,
    ) -> "CompletionStream":
        """``generate`` as text, per step: see ``text_completion_stream``. The arguments are checked
        here, before the first step."""
        every_argument = (prompt_tokens, max_gen_len, temperature, top_p, top_k, min_p, repetition_penalty,
                          stop_tokens, stop_strings, num_return_sequences, seed)
        with fail_together(same_on_every_rank=every_argument):  # ranks must agree before the first collective
            self.check_generate_args(prompt_tokens, max_gen_len, temperature, top_p)
            state = self.start_decoding(
                prompt_tokens, max_gen_len, Sampler(temperature, top_p, top_k, min_p, repetition_penalty), False,
                stop_tokens, stop_strings, num_return_sequences, seed, streams=True,
            )
        return CompletionStream(self.decode_steps(state), state)

    def encode_prompts(self, prompts: List[str]) -> List[List[int]]:
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {prompts!r:.80}")
        return [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]

    def default_gen_len(self, max_gen_len: Optional[int]) -> int:
        return self.model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len

    def token_details(self, i: int, tokens, logprobs=None, top_logprobs=None) -> dict:
        """Row i's optional per-token fields: "tokens" (each token's text) when logprobs or the
        alternatives were asked for, "logprobs" and "top_logprobs" when they were."""
        details = {}
        if logprobs is not None or top_logprobs is not None:
            details["tokens"] = [self.tokenizer.decode([x]) for x in tokens[i]]
        if logprobs is not None:
            details["logprobs"] = logprobs[i]
        if top_logprobs is not None:
            details["top_logprobs"] = [[(self.tokenizer.decode([t]), lp) for t, lp in alts] for alts in top_logprobs[i]]
        return details

    def encode_dialog(self, dialog: Sequence[Message]) -> List[int]:
        """Tokens of a dialog in the Llama 2 chat format: every finished (user, assistant) exchange is
        ``BOS [INST] user [/INST] answer EOS``; the last user message is ``BOS [INST] user [/INST]``.
        A leading system message is folded into the first user message between <<SYS>> tags."""
        if not isinstance(dialog, (list, tuple)) or not dialog:
            raise ValueError(f"a dialog must be a non-empty list of messages, got {dialog!r:.80}")
        for j, msg in enumerate(dialog):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or msg.get("role") not in ("system", "user", "assistant"):
                raise ValueError(
                    f"message {j} must be a dict with 'role' in ('system', 'user', 'assistant') and a str 'content', got {msg!r:.80}"
                )
        if dialog[0]["role"] == "system":
            if len(dialog) < 2:
                raise ValueError("a dialog with a system message needs a user message after it")
            dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}] + list(dialog[2:])
        roles = [msg["role"] for msg in dialog]
        expected = ["user" if j % 2 == 0 else "assistant" for j in range(len(dialog))]
        if roles != expected:
            raise ValueError(f"model only supports 'system', 'user' and 'assistant' roles, starting with 'system', then 'user' and alternating (u/a/u/a/u...); got {roles}")
        if roles[-1] != "user":
            raise ValueError(f"the last message must be from the user, got {roles[-1]!r}")
        dialog_tokens: List[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            dialog_tokens += self.tokenizer.encode(
                f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ", bos=True, eos=True
            )
        dialog_tokens += self.tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
        return dialog_tokens

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        **options,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant, in the Llama 2 chat format.

        Args:
            dialogs: lists of {"role", "content"} messages: an optional system message, then user and
                assistant alternating, ending with the user.
            temperature, top_p, max_gen_len, logprobs, options: as for ``text_completion``.

        Returns:
            One dict per dialog (per sample, as ``text_completion``): {"generation": {"role":
            "assistant", "content": text}}, plus "tokens" and "logprobs" when ``logprobs``, and
            "top_logprobs" when asked. A dialog whose messages contain the special tags gets
            UNSAFE_ERROR as its content.
        """
        prompt_tokens, unsafe = self.encode_dialogs(dialogs)
        generated = self.generate(prompt_tokens, self.default_gen_len(max_gen_len), temperature, top_p, logprobs, **options)
        n, stop_strings = options.get("num_return_sequences", 1), options.get("stop_strings", ())
        results: List[ChatPrediction] = []
        for i, tokens in enumerate(generated[0]):
            content = UNSAFE_ERROR if unsafe[i // n] else cut_at_stop(self.tokenizer.decode(tokens), stop_strings)
            results.append({"generation": {"role": "assistant", "content": content}, **self.token_details(i, *generated)})
        return results

    def chat_completion_stream(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        **options,
    ) -> "CompletionStream":
        """``chat_completion`` as it is generated, one string per row per step, like
        ``text_completion_stream``: joined, a row's strings equal its answer's "content"."""
        prompt_tokens, unsafe = self.encode_dialogs(dialogs)
        stream = self.stream(prompt_tokens, self.default_gen_len(max_gen_len), temperature, top_p, **options)
        n = options.get("num_return_sequences", 1)
        stream.refused = [unsafe[i // n] for i in range(len(prompt_tokens) * n)]
        return stream

    def encode_dialogs(self, dialogs: List[Dialog]) -> Tuple[List[List[int]], List[bool]]:
        """Each dialog's tokens, and whether it contains the chat format's special tags."""
        if not isinstance(dialogs, (list, tuple)):
            raise TypeError(f"dialogs must be a list of dialogs, got {type(dialogs).__name__}")
        prompt_tokens = [self.encode_dialog(dialog) for dialog in dialogs]
        unsafe = [any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog) for dialog in dialogs]
        return prompt_tokens, unsafe


class CompletionStream:
    """Iterating yields, after each decoding step and once more at the end, one string per row: the
    text that became final since the previous yield. ``tokens``: each row's output tokens so far;
    ``timing()``: the prompt and decoding speeds of the iteration."""

    def __init__(self, steps: Iterator[int], state: "Decoding"):
        self.steps = steps
        self.state = state
        self.refused = [False] * len(state.streams)  # rows answered with UNSAFE_ERROR instead
        self.started = self.first_step_done = self.finished = None  # time.perf_counter() readings

    def __iter__(self) -> Iterator[List[str]]:
        for step, pieces in enumerate(self.pieces()):
            yield [(UNSAFE_ERROR if step == 0 else "") if refused else piece for piece, refused in zip(pieces, self.refused)]

    def pieces(self) -> Iterator[List[str]]:
        self.started = time.perf_counter()
        for step in self.steps:
            if step == 0:  # the prefill and each row's first token
                self.first_step_done = time.perf_counter()
            yield [stream.read() for stream in self.state.streams]
        self.finished = time.perf_counter()
        yield [stream.close() for stream in self.state.streams]

    def timing(self) -> str:
        """Prompt tokens/s (the first step: the prefill and each row's first token) and decode
        tokens/s (the rest), up to now if the iteration was stopped early."""
        now = time.perf_counter()
        first_step_done = self.first_step_done or now
        prompt_seconds, decode_seconds = first_step_done - (self.started or now), (self.finished or now) - first_step_done
        n_prompt, n_decoded = self.n_prompt_tokens, sum(max(len(tokens) - 1, 0) for tokens in self.tokens)
        return (
            f"prompt: {n_prompt} tokens in {prompt_seconds:.3f} s ({n_prompt / max(prompt_seconds, 1e-9):.1f} tokens/s), "
            f"decode: {n_decoded} tokens in {decode_seconds:.3f} s ({n_decoded / max(decode_seconds, 1e-9):.1f} tokens/s)"
        )

    @property
    def tokens(self) -> List[List[int]]:
        return [stream.tokens for stream in self.state.streams]

    @property
    def n_prompt_tokens(self) -> int:
        return int(self.state.prompt_lens.sum())


@dataclass
class Decoding:
    """A batch being decoded: the right-padded grid of prompt and generated tokens, and what the
    decoding loop learns about each row."""

    tokens: torch.Tensor  # (bsz, total_len): prompt, then generated tokens; PAD where none yet
    prompt_lens: torch.Tensor  # (bsz,)
    ends: torch.Tensor  # (bsz,): each row's output ends before this position
    stopped: torch.Tensor  # (bsz,): the row generated a stop token or completed a stop string
    sampler: Sampler
    stop_tokens: torch.Tensor  # (n_stop,)
    token_logprobs: Optional[torch.Tensor]  # (bsz, total_len): log p(token | tokens before it); None if not asked
    top_ids: torch.Tensor  # (bsz, total_len, top_logprobs): the most likely tokens at each generated position
    top_logprobs: torch.Tensor  # (bsz, total_len, top_logprobs): their logprobs
    streams: Optional[List[TextStream]]  # each row's text, when streaming or stopping at strings

    def record(self, positions: torch.Tensor, written: torch.Tensor, generated: torch.Tensor) -> None:
        """Note the stops among the tokens ``written`` (bsz,) at ``positions`` (bsz,); ``generated``:
        (bsz,) the rows that generated theirs."""
        in_output = generated & ~self.stopped & (positions < self.ends)
        hit_stop_token = generated & torch.isin(written, self.stop_tokens)
        self.ends = torch.where(in_output & hit_stop_token, positions, self.ends)
        self.stopped |= hit_stop_token
        if self.streams is None:
            return
        for row in (in_output & ~hit_stop_token).nonzero().flatten().tolist():
            stream = self.streams[row]
            stream.push(int(written[row]))
            if stream.stopped:  # the row's output ends with the token that completed the stop string
                self.stopped[row] = True
                self.ends[row] = positions[row] + 1

    def results(self, echo: bool):
        """(tokens, logprobs[, top_logprobs]) per row, as ``Llama.generate`` returns them."""
        out_tokens, out_logprobs, out_top = [], [], []
        ends, prompt_lens = self.ends.tolist(), self.prompt_lens.tolist()
        top_ids, top_logprobs = self.top_ids.tolist(), self.top_logprobs.tolist()
        for i, row in enumerate(self.tokens.tolist()):
            start = 0 if echo else prompt_lens[i]
            out_tokens.append(row[start : ends[i]])
            if self.token_logprobs is not None:
                out_logprobs.append(self.token_logprobs[i, start : ends[i]].tolist())
            out_top.append([list(zip(ids, lps)) for ids, lps in zip(top_ids[i][start : ends[i]], top_logprobs[i][start : ends[i]])])
        logprobs = out_logprobs if self.token_logprobs is not None else None
        return (out_tokens, logprobs, out_top) if self.top_ids.shape[-1] else (out_tokens, logprobs)


def check_decoding_options(stop_tokens, stop_strings, num_return_sequences, seed, top_logprobs, echo, vocab_size: int) -> None:
    if stop_tokens is not None and (
        not isinstance(stop_tokens, (list, tuple))
        or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in stop_tokens)
    ):
        raise ValueError(f"stop_tokens must be a list of token ids in [0, {vocab_size}), got {stop_tokens!r:.80}")
    if not isinstance(stop_strings, (list, tuple)) or not all(isinstance(s, str) and s for s in stop_strings):
        raise TypeError(f"stop_strings must be a list of non-empty strings, got {stop_strings!r:.80}")
    positive_int(num_return_sequences, "num_return_sequences")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None (the global RNG), got {seed!r}")
    if not isinstance(top_logprobs, int) or isinstance(top_logprobs, bool) or not 0 <= top_logprobs <= vocab_size:
        raise ValueError(f"top_logprobs must be an integer in [0, {vocab_size}], got {top_logprobs!r}")
    if top_logprobs and echo:
        raise ValueError("top_logprobs covers generated tokens only; it cannot be combined with echo=True")
