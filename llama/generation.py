"""Text and chat generation with the API of Meta's reference: ``Llama.build``, ``generate``,
``text_completion`` and ``chat_completion``, on any device and any model-parallel world size.

``Llama`` is a facade: the options live in ``llama.options``, the decoding loop in ``llama.engine``,
the chat format in ``llama.chat.format``, text streaming in ``llama.engine.streaming``, device and process policy in
``llama.distributed`` and checkpoint reading in ``llama.checkpoints.loader``.
"""

import logging
from typing import List, Optional, Tuple, TypedDict, Union

import torch

from llama.chat.format import B_SYS, E_SYS, UNSAFE_ERROR, ChatFormat, Dialog, Message, chat_format_for  # noqa: F401 (Meta's import path)
from llama.checkpoints.peft import read_adapter
from llama.checkpoints.loader import check_draft_vocabulary, load_model, read_model_args
from llama.checkpoints.hf import read_chat_template
from llama.distributed import (
    fail_together,
    init_distributed,
    job_group,
    quiet_local_ranks,
    resolve_device,
    resolve_dtype,
)
from llama.engine import Engine, Request
from llama.model import Transformer
from llama.options import GenerationOptions, check_batch_size, check_prompts
from llama.layers.parallel import group_size
from llama.layers.quantize import parse_quantize
from llama.engine.sampling import sample_top_p  # noqa: F401 (Meta's import path)
from llama.engine.streaming import CompletionStream
from llama.tokenizer import Tokenizer, resolve_tokenizer_path

logger = logging.getLogger(__name__)


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


def positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


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
    ) -> "Llama":
        """Load a checkpoint, in Meta's layout or a Hugging Face folder, and its tokenizer.

        Args:
            ckpt_dir: folder with ``params.json`` and ``consolidated.NN.pth`` shards (any number of them,
                whatever the number of processes), or a Hugging Face transformers Llama folder
                (``config.json`` with ``*.safetensors`` or ``pytorch_model*.bin``).
            tokenizer_path: ``tokenizer.model`` (Llama 2's sentencepiece or Llama 3's tiktoken file) or a
                Hugging Face ``tokenizer.json``; None: the folder's own (``resolve_tokenizer_path``).
            max_seq_len: longest prompt + generation (a row's most positions).
            max_batch_size: most sequences decoded together (per ``generate`` call).
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
                must fit. Each weight is quantized on the CPU as it is read (``llama.layers.quantize``).
                None keeps the checkpoint's weights.
            compile: run the decode step (the model, every row's sampling, the step's writes) as one
                ``torch.compile`` graph (a CUDA graph on CUDA): the first generation compiles it
                (seconds to a minute), later ones run faster.
            quiet_ranks: send stdout to /dev/null on local ranks > 0 (``quiet_local_ranks``), as
                Meta's build does, so scripts that print on every rank print once; False keeps it.
            draft_ckpt_dir: a smaller checkpoint with the same vocabulary, for
                ``speculate="draft"`` (``llama.engine.speculative``); ``ckpt_dir`` itself with
                ``draft_quantize`` for a quantized copy of the model as its own draft. Split over the
                processes like the model, with the same cache sizes.
            draft_quantize: ``quantize`` for the draft. A quantized draft computes in the dtype its
                kernels are fastest in (bfloat16 on an AVX2 CPU, as ``dtype=None`` would pick),
                whatever ``dtype``; an unquantized one in the model's dtype.
            adapter_dir: a LoRA adapter in peft's format (``adapter_config.json``,
                ``adapter_model.safetensors``, as ``python -m llama.finetune`` writes it), merged into
                the weights as they are read, before ``quantize``: decoding costs what the model alone
                costs. ``Llama.adapter_id`` then names it (a hash of its files), ``Llama.adapter_dir`` its folder.
            kv_cache_tokens: the KV cache pool's size in tokens, shared by the rows in blocks of 16
                (``llama.engine.block_manager``); None: ``max_batch_size * max_seq_len``, the memory
                of a contiguous cache, on every device. Smaller pools hold fewer tokens at once: when
                the running rows fill it, the newest gives its blocks back and is recomputed later.
            prefix_cache: a row reuses the cached keys and values of a prompt prefix an earlier row
                computed (whole blocks); False computes every prompt in full.
            time_threads: on a CPU, once the model is loaded, time its decode step at torch's thread
                count and each half of it down to 1 and keep the fastest
                (``llama.layers.cpu_threads.choose_threads``; not where ``OMP_NUM_THREADS`` says how
                many, nor under torchrun): what the commands do when given no ``--threads``. False
                keeps the process's count.

        Returns:
            A ``Llama`` holding the model and tokenizer.
        """
        device = resolve_device(device)
        init_distributed(device, backend)
        if quiet_ranks:
            quiet_local_ranks()
        with fail_together():  # each rank reads its own files: if one fails, all do
            positive_int(max_seq_len, "max_seq_len")
            positive_int(max_batch_size, "max_batch_size")
            if kv_cache_tokens is not None:
                positive_int(kv_cache_tokens, "kv_cache_tokens")
            if not isinstance(prefix_cache, bool):
                raise TypeError(f"prefix_cache must be True or False, got {prefix_cache!r}")
            if not isinstance(compile, bool):
                raise TypeError(f"compile must be True or False, got {compile!r}")
            quantization = parse_quantize(quantize)
            if draft_quantize is not None and draft_ckpt_dir is None:
                raise ValueError(
                    f"draft_quantize={draft_quantize!r} needs draft_ckpt_dir: pass draft_ckpt_dir=ckpt_dir for a "
                    "quantized copy of the model as its own draft"
                )
            dtype = resolve_dtype(dtype, device, quantization)
            group = job_group()  # every process of a torchrun job splits the model; None: one process
            world_size = group_size(group)
            if model_parallel_size is not None and model_parallel_size != world_size:
                raise ValueError(
                    f"model_parallel_size={model_parallel_size} but this job has {world_size} process(es); "
                    "leave it None to use every process (any number of processes can load any checkpoint)"
                )
            torch.manual_seed(seed)
            tokenizer_path = resolve_tokenizer_path(ckpt_dir, tokenizer_path)
            tokenizer = Tokenizer(tokenizer_path)
            args = read_model_args(ckpt_dir, tokenizer, tokenizer_path, max_seq_len, max_batch_size, kv_cache_tokens)
            chat_format = chat_format_for(tokenizer, read_chat_template(ckpt_dir))
            adapter = read_adapter(adapter_dir, args) if adapter_dir is not None else None
            # quantized tensor by tensor
            model = load_model(ckpt_dir, args, device, dtype, quantization, adapter, group, time_threads=time_threads)
            logger.info("loaded %s on %s in %s", ckpt_dir, device, dtype)
            draft = None
            if draft_ckpt_dir is not None:
                draft_quantization = parse_quantize(draft_quantize)
                draft_dtype = resolve_dtype(None, device, draft_quantization) if draft_quantization else dtype
                check_draft_vocabulary(draft_ckpt_dir, tokenizer, tokenizer_path)
                draft_args = read_model_args(draft_ckpt_dir, tokenizer, tokenizer_path, max_seq_len, max_batch_size, kv_cache_tokens)
                draft = load_model(draft_ckpt_dir, draft_args, device, draft_dtype, draft_quantization, group=group)
                logger.info("loaded the draft %s on %s in %s", draft_ckpt_dir, device, draft_dtype)
        return Llama(model, tokenizer, compile, chat_format, draft, adapter.identity if adapter else None, prefix_cache,
                     cache_salt=f"{ckpt_dir} {quantize} {adapter.identity if adapter else None}",
                     adapter_dir=adapter_dir)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, compile: bool = False, chat_format: Optional[ChatFormat] = None,
                 draft: Optional[Transformer] = None, adapter_id: Optional[str] = None, prefix_cache: bool = True,
                 cache_salt: str = "", adapter_dir: Optional[str] = None):
        self.model = model
        self.tokenizer = tokenizer
        # what the weights hold besides the checkpoint: the sha256 of the merged adapter's files, or None.
        # Two models of one checkpoint compute alike (and may share cached keys and values) only if it is equal.
        self.adapter_id = adapter_id
        self.adapter_dir = adapter_dir  # the folder it was read from, as given: what a command says it loaded
        self.chat_format = chat_format or chat_format_for(tokenizer)  # how dialogs become tokens
        # every call below decodes here; cache_salt names the weights in the prefix cache's keys
        self.engine = Engine(model, tokenizer, compile, draft=draft, prefix_cache=prefix_cache, cache_salt=cache_salt)

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (with quantized weights too: the embedding is never quantized)."""
        return self.model.tok_embeddings.weight.dtype

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype, in which cached attention computes: ``dtype``, except float32 for a
        half-precision model on a CPU (``llama.checkpoints.loader.kv_cache_dtype``)."""
        return self.model.layers[0].attention.cache_k.dtype

    def start(self, prompt_tokens: List[List[int]], what: str, streams: bool = False, **options) -> Request:
        """Check a request and its ``GenerationOptions`` on every rank and submit it to the engine:
        each prompt ``num_return_sequences`` times. ``what`` names the prompts in errors
        ("prompt_tokens", "prompt", "dialog"); ``streams``: assemble each row's text as it comes."""
        params = self.model.params
        with fail_together(same_on_every_rank=(prompt_tokens, options)):  # ranks must agree before the first collective
            options = GenerationOptions(**options)
            if streams and options.echo:
                raise ValueError("echo is not supported when streaming: the stream yields generated text only")
            options.check_vocabulary(params.vocab_size)
            check_prompts(prompt_tokens, params.max_seq_len, params.vocab_size, what)
            check_batch_size(len(prompt_tokens), options.num_return_sequences, params.max_batch_size, what)
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
                num_return_sequences, seed, top_logprobs.

        Returns:
            (tokens, logprobs): per row the generated tokens, up to and excluding the first stop
            token, and their logprobs (None unless ``logprobs``); with ``top_logprobs``, a third list
            of (token id, logprob) pairs per token. After a stop string a row's tokens end with the
            one holding the text's last character before it.
        """
        options = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, echo=echo, **options)
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
        options = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, echo=echo, **options)
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
            results.append({"generation": {"role": "assistant", "content": content}, **self.token_details(i, *generated)})
        return results

    def text_completion_stream(
        self, prompts: List[str], temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None, **options
    ) -> CompletionStream:
        """``text_completion`` as it is generated: yields, after each decoding step, one string per row (n per prompt, as ``text_completion``) holding the text that
        became final, "" for none. A row's strings, joined, equal its "generation". Text that may
        still turn into a stop string, or the first bytes of a multi-byte character, wait. The
        stream also tells each row's tokens, logprobs and finish reason as they come
        (``CompletionStream``). Arguments are checked here, before the first step.

        Args: as ``text_completion``, less echo.
        """
        options = dict(max_gen_len=max_gen_len, temperature=temperature, top_p=top_p, **options)
        return self.start_stream(self.encode_prompts(prompts), "prompt", **options)

    def chat_completion_stream(
        self, dialogs: List[Dialog], temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None, **options
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

    def start_stream(self, prompt_tokens: List[List[int]], what: str, unsafe: Optional[List[bool]] = None, **options) -> CompletionStream:
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
