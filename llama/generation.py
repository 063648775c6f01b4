"""Text and chat generation with the API of Meta's reference: ``Llama.build``, ``generate``,
``text_completion`` and ``chat_completion``, on any device and any model-parallel world size.

``Llama`` is a facade: the options live in ``llama.options``, the decoding loop in ``llama.engine``,
the chat format in ``llama.chat.format``, text streaming in ``llama.engine.streaming``, device and process policy in
``llama.distributed`` and checkpoint reading in ``llama.checkpoints.loader``.
"""

import logging
from typing import Dict, List, Optional, Tuple, TypedDict, Union

import torch
from torch.distributed import ProcessGroup

from llama.chat.format import B_SYS, E_SYS, UNSAFE_ERROR, ChatFormat, Dialog, Message, chat_format_for  # noqa: F401 (Meta's import path)
from llama.checkpoints.hf import read_chat_template
from llama.checkpoints.loader import check_draft_vocabulary, load_model, read_model_args
from llama.checkpoints.peft import Adapter, read_adapter
from llama.distributed import (
    fail_together,
    init_distributed,
    job_group,
    quiet_local_ranks,
    resolve_device,
    resolve_dtype,
)
from llama.engine import Engine, Request, engine_options_for
from llama.engine.sampling import sample_top_p  # noqa: F401 (Meta's import path)
from llama.engine.streaming import CompletionStream
from llama.layers.parallel import group_size
from llama.model import Transformer
from llama.options import EngineOptions, GenerationOptions, LoadOptions, check_batch_size, check_prompts
from llama.tokenizer import Tokenizer, resolve_tokenizer_path

logger = logging.getLogger(__name__)

DEFAULT_ENGINE = EngineOptions()


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


def load_draft(
    load: LoadOptions,
    engine: EngineOptions,
    tokenizer: Tokenizer,
    tokenizer_path: str,
    device: torch.device,
    dtype: torch.dtype,
    group: Optional[ProcessGroup],
) -> Transformer:
    """``load``'s draft, with the model's vocabulary and cache sizes: quantized, in the dtype its kernels are
    fastest in (``resolve_dtype``'s pick for quantized weights); else in the model's ``dtype``."""
    quantization = load.draft_quantization
    draft_dtype = resolve_dtype(None, device, quantization) if quantization else dtype
    check_draft_vocabulary(load.draft_ckpt_dir, tokenizer, tokenizer_path)
    args = read_model_args(load.draft_ckpt_dir, tokenizer, tokenizer_path, engine)
    draft = load_model(load.draft_ckpt_dir, args, device, draft_dtype, quantization, group=group)
    logger.info("loaded the draft %s on %s in %s", load.draft_ckpt_dir, device, draft_dtype)
    return draft


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: Optional[str] = None,
        max_seq_len: int = 512,
        max_batch_size: int = 8,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        backend: Optional[str] = None,
        quantize: Optional[str] = None,
        compile: bool = False,
        quiet_ranks: bool = True,
        draft_ckpt_dir: Optional[str] = None,
        draft_quantize: Optional[str] = None,
        adapter_dir: Optional[str] = None,
        kv_cache_tokens: Optional[int] = None,
        prefix_cache: bool = True,
        time_threads: bool = False,
        kv_cache_dtype: Optional[str] = None,
        adapters: Optional[Dict[str, str]] = None,
        max_loras: int = 8,
        max_lora_rank: int = 64,
    ) -> "Llama":
        """Load a checkpoint, in Meta's layout or a Hugging Face folder, and its tokenizer (Meta's call):
        ``from_options`` with the arguments as one ``LoadOptions`` and one ``EngineOptions``.

        Args:
            ckpt_dir, tokenizer_path, model_parallel_size, seed, device, dtype, backend, quantize,
                quiet_ranks, draft_ckpt_dir, draft_quantize, adapter_dir, time_threads, adapters: what loading
                needs (``llama.options.LoadOptions`` describes each); ``adapters={name: folder}``: LoRA adapters
                served per request, chosen by a call's ``adapter=name``.
            max_seq_len, max_batch_size, compile, kv_cache_tokens, prefix_cache, kv_cache_dtype, max_loras,
                max_lora_rank: the engine's sizes and policies (``llama.options.EngineOptions`` describes each).

        Returns:
            A ``Llama`` holding the model and tokenizer.
        """
        load = LoadOptions(
            ckpt_dir,
            tokenizer_path,
            device,
            dtype,
            quantize,
            adapter_dir,
            draft_ckpt_dir,
            draft_quantize,
            backend,
            seed,
            model_parallel_size,
            quiet_ranks,
            time_threads,
            adapters,
        )
        engine = EngineOptions(
            max_batch_size,
            max_seq_len,
            kv_cache_tokens,
            compile=compile,
            prefix_cache=prefix_cache,
            kv_cache_dtype=kv_cache_dtype,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
        )
        return Llama.from_options(load, engine)

    @classmethod
    def from_options(cls, load: LoadOptions, engine: EngineOptions = DEFAULT_ENGINE) -> "Llama":
        """Load ``load``'s checkpoint with its tokenizer and chat format (and its adapter, and its draft), with
        a KV cache pool of ``engine``'s sizes, and decode on an engine of ``engine``'s policies. Under torchrun,
        every process loads its part of each weight; if one fails, every one raises.

        Returns:
            A ``Llama`` holding the model and tokenizer.
        """
        device = resolve_device(load.device)
        init_distributed(device, load.backend)
        if load.quiet_ranks:
            quiet_local_ranks()
        with fail_together():  # each rank reads its own files: if one fails, all do
            dtype = resolve_dtype(load.dtype, device, load.quantization)
            group = job_group()  # every process of a torchrun job splits the model; None: one process
            world_size = group_size(group)
            if load.model_parallel_size is not None and load.model_parallel_size != world_size:
                raise ValueError(
                    f"model_parallel_size={load.model_parallel_size} but this job has {world_size} process(es); "
                    "leave it None to use every process (any number of processes can load any checkpoint)"
                )
            torch.manual_seed(load.seed)
            tokenizer_path = resolve_tokenizer_path(load.ckpt_dir, load.tokenizer_path)
            tokenizer = Tokenizer(tokenizer_path)
            args = read_model_args(load.ckpt_dir, tokenizer, tokenizer_path, engine)
            chat_format = chat_format_for(tokenizer, read_chat_template(load.ckpt_dir))
            adapter = read_adapter(load.adapter_dir, args) if load.adapter_dir is not None else None
            served = {name: read_adapter(folder, args) for name, folder in (load.adapters or {}).items()}
            model = load_model(
                load.ckpt_dir, args, device, dtype, load.quantization, adapter, group, time_threads=load.time_threads
            )  # quantized as read
            logger.info("loaded %s on %s in %s", load.ckpt_dir, device, dtype)
            draft = (
                load_draft(load, engine, tokenizer, tokenizer_path, device, dtype, group)
                if load.draft_ckpt_dir
                else None
            )
        adapter_id = adapter.identity if adapter else None
        return cls(
            model,
            tokenizer,
            engine,
            chat_format,
            draft,
            adapter_id,
            adapter_dir=load.adapter_dir,
            cache_salt=f"{load.ckpt_dir} {load.quantize} {adapter_id}",
            adapters=served if load.adapters is not None else None,
        )

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        engine_options: Optional[EngineOptions] = None,
        chat_format: Optional[ChatFormat] = None,
        draft: Optional[Transformer] = None,
        adapter_id: Optional[str] = None,
        cache_salt: str = "",
        adapter_dir: Optional[str] = None,
        adapters: Optional[Dict[str, Adapter]] = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        # what the weights hold besides the checkpoint: the sha256 of the merged adapter's files, or None.
        # Two models of one checkpoint compute alike (and may share cached keys and values) only if it is equal.
        self.adapter_id = adapter_id
        self.adapter_dir = adapter_dir  # the folder it was read from, as given: what a command says it loaded
        self.chat_format = chat_format or chat_format_for(tokenizer)  # how dialogs become tokens
        # every call below decodes here (engine_options None: the sizes of the model's pool, the default policies);
        # cache_salt names the weights in the prefix cache's keys
        options = engine_options or engine_options_for(model)
        self.engine = Engine(model, tokenizer, options, draft, cache_salt, adapters)

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (with quantized weights too: the embedding is never quantized)."""
        return self.model.tok_embeddings.weight.dtype

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The dtype the KV cache stores: ``dtype``, except float32 for a half-precision model on a CPU
        (``llama.layers.kv_cache.cache_dtype``), or the 8 bits of ``kv_cache_dtype="int8"`` or
        ``"float8_e4m3fn"``."""
        return self.model.layers[0].attention.kv_cache.cache_k.dtype

    def load_adapter(self, name: str, folder: str) -> None:
        """Serve the LoRA adapter in ``folder`` (peft's files) as ``name`` beside the others, chosen by a call's
        ``adapter=name`` (a model built with ``adapters=``, ``{}`` for none yet). Under torchrun, on every rank.

        Raises:
            ValueError, OSError: the name is taken, or the adapter cannot be served (its files, shapes, targets,
                or a rank over ``max_lora_rank``).
        """
        self.engine.load_adapter(name, folder)

    def unload_adapter(self, name: str) -> None:
        """Serve the adapter ``name`` no more, once the requests computing with it end (a stream still open
        runs to its end here). Under torchrun, on every rank.

        Raises:
            ValueError: no adapter of that name is served.
        """
        gone = self.engine.unload_adapter(name)
        while not gone.is_set():
            self.engine.step()

    def start(self, prompt_tokens: List[List[int]], what: str, streams: bool = False, **options) -> Request:
        """Check a request and its ``GenerationOptions`` on every rank and submit it to the engine:
        each prompt ``num_return_sequences`` times. ``what`` names the prompts in errors
        ("prompt_tokens", "prompt", "dialog"); ``streams``: assemble each row's text as it comes."""
        vocab_size, sizes = self.model.params.vocab_size, self.engine.options
        with fail_together(same_on_every_rank=(prompt_tokens, options)):  # ranks must agree before the first collective
            options = GenerationOptions(**options)
            if streams and options.echo:
                raise ValueError("echo is not supported when streaming: the stream yields generated text only")
            options.check_vocabulary(vocab_size)
            check_prompts(prompt_tokens, sizes.max_seq_len, vocab_size, what)
            check_batch_size(len(prompt_tokens), options.num_return_sequences, sizes.max_batch_size, what)
        return self.engine.submit(prompt_tokens, options, what, stream_text=streams)

    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        **options,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt, all in one batch.

        The prompts are prefilled together, whatever their lengths, into the engine's slots; then each
        row decodes from its own prompt's end (Meta's reference instead feeds the longer prompts one
        token per step from the shortest prompt's end). Prompts are never overwritten, greedy results
        equal Meta's, and a row's tokens equal those of its prompt alone. Sampled rows of a ragged
        batch follow the same distribution as Meta's, not the same draws.

        Args:
            prompt_tokens: one list of token ids per prompt.
            max_gen_len: most new tokens per prompt (also capped by max_seq_len).
            temperature, top_p: Meta's sampling: softmax temperature (0 is greedy) and nucleus mass.
            logprobs: also return each returned token's log-probability.
            echo: also return the prompt (and its logprobs). The first token's logprob is 0.
            options: the rest of ``GenerationOptions``: top_k, min_p, repetition_penalty,
                presence_penalty, frequency_penalty, logit_bias, stop_tokens, stop_strings,
                num_return_sequences, seed, top_logprobs, adapter (the name of an adapter given to
                ``Llama.build(adapters=...)`` the rows compute with; None: the base).

        Returns:
            (tokens, logprobs): per row the generated tokens, up to and excluding the first stop
            token, and their logprobs (None unless ``logprobs``); with ``top_logprobs``, a third list
            of (token id, logprob) pairs per token. After a stop string a row's tokens end with the
            one holding the text's last character before it.
        """
        options = dict(
            max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, echo=echo, **options
        )
        return self.decode(prompt_tokens, "prompt_tokens", **options).results()

    def decode(self, prompt_tokens: List[List[int]], what: str, **options) -> Request:
        """Decode the request to its end; the finished ``Request``."""
        request = self.start(prompt_tokens, what, **options)
        for _ in self.engine.run_until_done(request):
            pass
        return request

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
            options: the rest of ``GenerationOptions``, as for ``generate``.

        Returns:
            One dict per prompt (per sample: prompt i's n at [i*n, (i+1)*n)): {"generation": text},
            cut before the first stop string, plus "tokens" (each token's text) and "logprobs" when
            ``logprobs``, and "top_logprobs" (per token, (text, logprob) pairs) when asked.
        """
        options = dict(
            max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, echo=echo, **options
        )
        request = self.decode(self.encode_prompts(prompts), "prompt", **options)
        generated = request.results()
        return [{"generation": text, **self.token_details(i, *generated)} for i, text in enumerate(request.texts())]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        **options,
    ) -> List[ChatPrediction]:
        """Answer each dialog as the assistant, in the model's chat format (``llama.chat.format``: Llama
        2's, Llama 3's, or the folder's chat template); the answer ends at a stop token of the tokenizer.

        Args:
            dialogs: lists of {"role", "content"} messages: an optional system message, then user and
                assistant alternating, ending with the user.
            temperature, top_p, max_gen_len, logprobs, options: as for ``text_completion``.

        Returns:
            One dict per dialog (per sample, as ``text_completion``): {"generation": {"role":
            "assistant", "content": text}}, plus "tokens" and "logprobs" when ``logprobs``, and
            "top_logprobs" when asked. A dialog whose messages contain the format's special tags
            (Llama 2's [INST] and <<SYS>> tags, a chat template's special tokens) gets UNSAFE_ERROR as
            its content.
        """
        options = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, **options)
        prompt_tokens, unsafe = self.chat_format.encode_dialogs(dialogs)
        request = self.decode(prompt_tokens, "dialog", **options)
        generated = request.results()
        results: List[ChatPrediction] = []
        for i, text in enumerate(request.texts()):
            content = UNSAFE_ERROR if unsafe[i // request.options.num_return_sequences] else text
            results.append(
                {"generation": {"role": "assistant", "content": content}, **self.token_details(i, *generated)}
            )
        return results

    def text_completion_stream(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        **options,
    ) -> CompletionStream:
        """``text_completion`` as it is generated: yields, after each decoding step, one string per row
        (n per prompt, as ``text_completion``) holding the text that became final, "" for none. A row's
        strings, joined, equal its "generation". Text that may still turn into a stop string, or the first
        bytes of a multi-byte character, wait. The stream also tells each row's tokens, logprobs and finish
        reason as they come (``CompletionStream``). Arguments are checked here, before the first step.

        Args: as ``text_completion``, less echo.
        """
        options = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, **options)
        return self.start_stream(self.encode_prompts(prompts), "prompt", **options)

    def chat_completion_stream(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        **options,
    ) -> CompletionStream:
        """``chat_completion`` as it is generated, one string per row per step, like
        ``text_completion_stream``: joined, a row's strings equal its answer's "content"."""
        options = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, **options)
        prompt_tokens, unsafe = self.chat_format.encode_dialogs(dialogs)
        return self.start_stream(prompt_tokens, "dialog", unsafe, **options)

    def stream(
        self, prompt_tokens: List[List[int]], max_gen_len: int, temperature: float = 0.6, top_p: float = 0.9, **options
    ) -> CompletionStream:
        """``generate`` as text, per step: see ``text_completion_stream``."""
        options = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, **options)
        return self.start_stream(prompt_tokens, "prompt_tokens", **options)

    def start_stream(
        self, prompt_tokens: List[List[int]], what: str, unsafe: Optional[List[bool]] = None, **options
    ) -> CompletionStream:
        """A stream of the batch; ``unsafe``: per prompt, answered with UNSAFE_ERROR instead."""
        request = self.start(prompt_tokens, what, streams=True, **options)
        n = request.options.num_return_sequences
        refused = [unsafe[row // n] for row in range(request.n_rows)] if unsafe else None
        return CompletionStream(request, self.engine.run_until_done(request), refused)

    def encode_dialog(self, dialog: Dialog) -> List[int]:
        """The dialog's tokens in the model's chat format (``self.chat_format``)."""
        return self.chat_format.encode_dialog(dialog)

    def encode_prompts(self, prompts: List[str]) -> List[List[int]]:
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of strings, got {prompts!r:.80}")
        return [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]

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
