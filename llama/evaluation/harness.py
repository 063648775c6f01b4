"""lm-evaluation-harness's model interface for a ``Llama``: ``LlamaLM``, an ``lm_eval.api.model.LM``.

It reads text as lm-eval's ``hf`` backend reads it on the same checkpoint converted to a Hugging Face
folder, so that the same weights give the same numbers:

- text to tokens as transformers' Llama tokenizer does: BOS first unless the text begins with BOS's
  text or the caller says otherwise, and special tokens' texts ("<s>", "</s>", "<|eot_id|>") read as
  those tokens (``Tokenizer.encode_with_special_tokens``);
- a (context, continuation) pair split as lm-eval's ``TemplateLM`` splits it (the context's trailing
  spaces move to the continuation, the whole encoded once and cut at the context's length, BOS alone
  for an empty context), and cut to the context as the ``hf`` backend cuts it;
- documents for perplexity in lm-eval's rolling windows of ``max_seq_len`` tokens;
- generation stops at the ``until`` strings (the text cut before the first) or EOS, after at most
  ``max_gen_toks`` tokens, from a context left-truncated to leave room for them.

Log-likelihoods and generations both run on the decoding engine: pairs are scored by
``llama.evaluation.scoring`` (a context shared by several continuations computed once, for its whole
blocks), generation requests all submitted at once so that the engine's slots stay full while rows
finish at different lengths. Under torchrun every rank runs the same
requests (the model is split across them) and gets the same answers.
"""

import copy
import logging
from typing import Dict, List, Optional, Tuple

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from llama.chat.format import Dialog
from llama.evaluation.scoring import loglikelihoods
from llama.generation import Llama
from llama.tokenizer import SentencePieceTokenizer, Tokenizer

logger = logging.getLogger(__name__)

MAX_GEN_TOKS = 256  # lm-eval's default for a task that does not say


def transformers_text(tokenizer: Tokenizer, tokens: List[int]) -> str:
    """The tokens' text as transformers' Llama tokenizers decode it, special tokens skipped. For
    sentencepiece that differs from ``Tokenizer.decode`` in text that is not valid UTF-8: a run of
    byte pieces that does not decode becomes one U+FFFD per byte, its ASCII bytes included."""
    if not isinstance(tokenizer, SentencePieceTokenizer):
        specials = set(tokenizer.special_tokens.values())
        return tokenizer.decode([t for t in tokens if t not in specials])
    sp = tokenizer.sp_model
    parts, run = [], b""
    for token in tokens:
        if sp.IsByte(token):
            run += tokenizer.token_bytes(token)
            continue
        parts.append(byte_run_text(run))
        run = b""
        if not (sp.IsControl(token) or sp.IsUnknown(token)):
            parts.append(sp.id_to_piece(token).replace("\u2581", " "))
    text = "".join(parts) + byte_run_text(run)
    return text[1:] if text.startswith(" ") else text  # the dummy space sentencepiece prepends


def byte_run_text(run: bytes) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


def sampling_options(gen_kwargs: dict) -> Tuple[List[str], int, dict]:
    """A task's ``generation_kwargs`` as (until strings, max_gen_toks, ``GenerationOptions`` fields).

    ``do_sample`` false (or absent with temperature 0) decodes greedily; sampling keeps transformers'
    defaults for what the task leaves out (temperature 1, top_p 1, no top_k).

    Raises:
        ValueError: a key this model does not implement, or sampling at temperature 0.
    """
    kwargs = normalize_gen_kwargs(copy.deepcopy(gen_kwargs), MAX_GEN_TOKS)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen_toks = kwargs.pop("max_gen_toks")
    do_sample = kwargs.pop("do_sample", None)
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    options = {
        name: kwargs.pop(name) for name in ("top_p", "top_k", "min_p", "repetition_penalty", "seed") if name in kwargs
    }
    if kwargs:
        raise ValueError(
            f"generation_kwargs {sorted(kwargs)} are not supported; supported: until, max_gen_toks, do_sample, "
            "temperature, top_p, top_k, min_p, repetition_penalty, seed"
        )
    if not do_sample:
        return until, max_gen_toks, {"temperature": 0.0, "top_p": 1.0}
    if temperature == 0:
        raise ValueError(
            "generation_kwargs: do_sample is true but temperature is 0; set a temperature > 0, "
            "or do_sample: false for greedy decoding"
        )
    return until, max_gen_toks, {"temperature": temperature, "top_p": 1.0, **options}


class LlamaLM(TemplateLM):
    """A ``Llama`` as lm-eval's ``LM`` (see the module's docstring).

    Args:
        generator: the loaded model and tokenizer (``Llama.build``); its ``max_seq_len`` is the
            context lm-eval sees (``max_length``) and its ``max_batch_size`` the most rows scored or
            generated together (the engine's slots).
    """

    def __init__(self, generator: Llama):
        super().__init__()
        self.generator = generator
        self.tokenizer_ = generator.tokenizer
        template = getattr(generator.chat_format, "template", None)
        self.legacy = bool(template and template["legacy"])  # transformers 5's default: False
        bos = [
            text
            for text in self.tokenizer_.special_token_texts()
            if self.tokenizer_.encode_with_special_tokens(text) == [self.prefix_token_id]
        ]
        self.bos_text = bos[0] if bos else None  # as a chat template writes it: "<s>", "<|begin_of_text|>"

    # --- tokens ---------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_.bos_id

    @property
    def max_length(self) -> int:
        return self.generator.model.params.max_seq_len

    @property
    def device(self):
        return self.generator.device

    def tok_encode(
        self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len: Optional[int] = None, **kwargs
    ) -> List[int]:
        """The text's tokens as transformers' Llama tokenizer gives them: BOS first if
        ``add_special_tokens`` (None: unless the text begins with BOS's text); the last
        ``left_truncate_len`` only, if given."""
        if add_special_tokens is None:
            add_special_tokens = not (self.bos_text and string.startswith(self.bos_text))
        tokens = [self.prefix_token_id] * add_special_tokens + self.tokenizer_.encode_with_special_tokens(
            string, self.legacy
        )
        return tokens[-left_truncate_len:] if left_truncate_len else tokens

    def tok_decode(self, tokens: List[int]) -> str:
        return transformers_text(self.tokenizer_, tokens)

    # --- log-likelihoods ------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """(logprob, is_greedy) per ((context, continuation) strings, context tokens, continuation tokens)."""
        pairs = [(context, continuation) for _, context, continuation in requests]
        answers = loglikelihoods(self.generator.engine, pairs)
        for (strings, _, _), answer in zip(requests, answers):
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Each document's log-likelihood, BOS as its first context, in lm-eval's rolling windows."""
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            tokens = self.tok_encode(string)
            for context, continuation in map(
                make_disjoint_window, get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, 1)
            ):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --- generation -----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Each (context, generation_kwargs) request's continuation, cut before its first ``until``
        string; all submitted to the engine before it runs."""
        started, stops = [], []
        for context, gen_kwargs in (request.args for request in requests):
            until, max_gen_toks, options = sampling_options(gen_kwargs)
            if max_gen_toks >= self.max_length:
                raise ValueError(
                    f"max_gen_toks={max_gen_toks} leaves no room for a context in max_seq_len={self.max_length}"
                )
            prompt = self.tok_encode(context, left_truncate_len=self.max_length - max_gen_toks)
            stops.append([s for s in until if s])
            started.append(
                self.generator.start([prompt], "prompt", max_gen_len=max_gen_toks, stop_strings=stops[-1], **options)
            )
        texts = []
        for request, until, (context, gen_kwargs) in tqdm(
            zip(started, stops, (r.args for r in requests)), total=len(started), disable=disable_tqdm
        ):
            for _ in self.generator.engine.run_until_done(request):
                pass
            texts.append(postprocess_generated_text(self.tok_decode(request.tokens[0]), until, None))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), texts[-1])
        return texts

    # --- chat -----------------------------------------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer_).__name__

    def chat_template(self, chat_template=False) -> Optional[str]:
        """The source of the chat template applied (the folder's own, or the tokenizer's format's name)."""
        if not chat_template:
            return None
        template = getattr(self.generator.chat_format, "template", None)
        return template["source"] if template else type(self.generator.chat_format).__name__

    def apply_chat_template(self, chat_history: Dialog, add_generation_prompt: bool = True) -> str:
        """The few-shot dialog as text in the model's chat format (``ChatFormat.render``): ending
        with the assistant's header if ``add_generation_prompt``, else inside the last (assistant)
        message, which the continuation goes on."""
        return self.generator.chat_format.render(chat_history, add_generation_prompt)

    def get_model_info(self) -> Dict[str, object]:
        """What lm-eval records of the model in results_*.json."""
        model = self.generator.model
        return {
            "model_num_parameters": sum(p.numel() for p in model.parameters()),
            "model_dtype": str(self.generator.dtype),
        }
