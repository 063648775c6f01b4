"""OpenAI's HTTP API as this server speaks it: a request body checked field by field into a ``Job``,
and the JSON of the answers (whole, or as streamed chunks).

Nothing here touches the model or the network: ``parse_completion`` / ``parse_chat`` take the
decoded JSON body and the ``Llama`` (for its tokenizer and limits) and either return a ``Job`` or
raise ``RequestError``, which the HTTP layer sends as a 400 with OpenAI's error body naming the field.
"""

import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from llama.chat_format import SPECIAL_TAGS, encode_dialog, is_unsafe
from llama.options import GenerationOptions

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs; used for completions' logprobs too
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error body naming ``param``."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass(frozen=True)
class Sampling:
    """What every row of one decoding batch shares: requests with equal ``Sampling`` can be batched.
    max_tokens is per request (a row that reaches it is cancelled), so it is not part of it."""

    kind: str  # "completion" or "chat": which stream call decodes the batch
    temperature: float
    top_p: float
    n: int  # samples per prompt (the stream's num_return_sequences)
    stop: Tuple[str, ...]
    seed: Optional[int]
    logprobs: bool
    top_logprobs: int

    def options(self, max_gen_len: int) -> GenerationOptions:
        """The options of a stream decoding up to ``max_gen_len`` tokens with these settings."""
        return GenerationOptions(
            max_gen_len, self.temperature, self.top_p, stop_strings=self.stop, num_return_sequences=self.n,
            seed=self.seed, logprobs=self.logprobs, top_logprobs=self.top_logprobs,
        )


@dataclass
class Job:
    """One accepted request: its prompts, its options, and the queue its answer arrives on.

    The decoding thread puts events on ``events``: ("delta", choice, text, tokens), ("finish",
    choice, reason), ("done", usage) or ("error", RequestError); ``tokens`` is a list of (token id,
    logprob, [(id, logprob), ...]) for the choice's new tokens when logprobs were asked, else [].
    The HTTP thread sets ``hung_up`` when the client has gone: its rows are cancelled."""

    kind: str
    model: str
    prompts: list  # strings (completions) or dialogs (chat), as the stream calls take them
    prompt_lens: List[int]
    max_tokens: int
    sampling: Sampling
    stream: bool
    echo: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    events: "queue.Queue" = field(default_factory=queue.Queue)
    hung_up: threading.Event = field(default_factory=threading.Event)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.sampling.n


def parse_completion(body: dict, llama, model: str) -> Job:
    """POST /v1/completions: ``prompt`` (a string or a list of strings) and the sampling fields."""
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("'prompt' is required: a string or a list of strings", "prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError(f"'prompt' must be a string or a non-empty list of strings, got {short(prompt)}", "prompt")
    check_known_fields(body, COMPLETION_FIELDS)
    logprobs = optional_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    echo = optional_bool(body, "echo", False)
    if echo and logprobs is not None:
        raise RequestError("'echo' with 'logprobs' is not supported: the prompt's tokens are not scored", "echo")
    prompt_lens = [len(llama.tokenizer.encode(p, bos=True, eos=False)) for p in prompts]
    return make_job(body, llama, model, "completion", prompts, prompt_lens, logprobs, echo, DEFAULT_COMPLETION_TOKENS)


def parse_chat(body: dict, llama, model: str) -> Job:
    """POST /v1/chat/completions: ``messages`` in the Llama 2 chat format and the sampling fields."""
    messages = body.get("messages")
    if messages is None:
        raise RequestError("'messages' is required: a list of {'role', 'content'} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"'messages' must be a non-empty list of messages, got {short(messages)}", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'content', got {short(message)}", f"messages[{i}]")
    dialog = [{"role": m.get("role"), "content": m["content"]} for m in messages]
    check_known_fields(body, CHAT_FIELDS)
    wants_logprobs = optional_bool(body, "logprobs", False)
    top_logprobs = optional_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not wants_logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    logprobs = (top_logprobs or 0) if wants_logprobs else None  # None: no logprobs at all
    try:
        prompt_tokens = encode_dialog(llama.tokenizer, dialog)
    except ValueError as error:
        raise RequestError(str(error), "messages") from None
    if is_unsafe(dialog):  # Meta's chat_completion refuses these too
        raise RequestError(f"the special tags {SPECIAL_TAGS} are not allowed in a message", "messages")
    return make_job(body, llama, model, "chat", [dialog], [len(prompt_tokens)], logprobs, False, None)


COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "user"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


def check_known_fields(body: dict, known: set) -> None:
    """A field this server does not implement is refused rather than ignored."""
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unsupported field(s) {unknown}; this server takes {sorted(known)}", unknown[0])


def make_job(body, llama, model, kind, prompts, prompt_lens, logprobs, echo, default_max_tokens) -> Job:
    """The fields both endpoints share, checked against the model's limits."""
    params = llama.model.params
    n = optional_int(body, "n", 1, params.max_batch_size) or 1
    if len(prompts) * n > params.max_batch_size:
        raise RequestError(f"{len(prompts)} prompts x n={n} exceed the server's max_batch_size={params.max_batch_size}", "n")
    max_tokens = parse_max_tokens(body, kind, max(prompt_lens), params.max_seq_len, default_max_tokens)
    temperature = optional_number(body, "temperature", 1.0)
    if temperature < 0:
        raise RequestError(f"'temperature' must be >= 0 (0 is greedy), got {temperature}", "temperature")
    top_p = optional_number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise RequestError(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    sampling = Sampling(
        kind=kind, temperature=temperature, top_p=top_p, n=n, stop=parse_stop(body.get("stop")),
        seed=optional_int(body, "seed", 0, None), logprobs=logprobs is not None, top_logprobs=logprobs or 0,
    )
    stream = optional_bool(body, "stream", False)
    stream_options = body.get("stream_options") or {}
    if stream_options and (not stream or not isinstance(stream_options, dict) or set(stream_options) != {"include_usage"}
                           or not isinstance(stream_options["include_usage"], bool)):
        raise RequestError("'stream_options' must be {'include_usage': true or false}, with 'stream': true", "stream_options")
    try:  # what the field checks above may have missed, in the generation options' own words
        sampling.options(max_tokens)
    except (ValueError, TypeError) as error:
        raise RequestError(str(error)) from None
    return Job(
        kind=kind, model=model, prompts=prompts, prompt_lens=prompt_lens,
        max_tokens=max_tokens, sampling=sampling,
        stream=stream, echo=echo, include_usage=stream_options.get("include_usage", False),
    )


def parse_max_tokens(body: dict, kind: str, prompt_len: int, max_seq_len: int, default: Optional[int]) -> int:
    """``max_tokens`` (chat: or ``max_completion_tokens``), which must fit in the context after the
    longest prompt; if absent, ``default`` where it fits (None: the rest of the context)."""
    room = max_seq_len - prompt_len
    if room < 1:
        field = "prompt" if kind == "completion" else "messages"
        raise RequestError(f"the prompt has {prompt_len} tokens; the context holds {max_seq_len} with room for one more", field)
    max_tokens = optional_int(body, "max_tokens", 1, None)
    if max_tokens is None and kind == "chat":
        max_tokens = optional_int(body, "max_completion_tokens", 1, None)
    if max_tokens is None:
        return room if default is None else min(default, room)
    if max_tokens > room:
        raise RequestError(f"max_tokens={max_tokens} does not fit: the prompt has {prompt_len} tokens and the context {max_seq_len}; at most {room}", "max_tokens")
    return max_tokens


def parse_stop(stop) -> Tuple[str, ...]:
    """``stop``: null, a string, or a list of up to 4 non-empty strings (OpenAI's limit)."""
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"'stop' must be a non-empty string or a list of up to 4 of them, got {short(stop)}", "stop")
    return tuple(stops)


def optional_int(body: dict, name: str, low: int, high: Optional[int]) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise RequestError(f"'{name}' must be an integer {bounds}, got {short(value)}", name)
    return value


def optional_number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise RequestError(f"'{name}' must be a number, got {short(value)}", name)
    return float(value)


def optional_bool(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {short(value)}", name)
    return value


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# The answers. A "choice" is one row: prompt i's sample j is choice i * n + j, as OpenAI numbers them.

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: List[Tuple[int, float, list]], token_bytes, text_start: int) -> dict:
    """Completions' logprobs object for ``tokens``; ``token_bytes(id)`` is a token's UTF-8 bytes, and
    the first token starts at character ``text_start`` of the choice's text."""

    def piece(token: int) -> str:
        return token_bytes(token).decode("utf-8", errors="replace")

    offsets, offset = [], text_start
    for token, _, _ in tokens:
        offsets.append(offset)
        offset += len(piece(token))
    return {
        "tokens": [piece(t) for t, _, _ in tokens],
        "token_logprobs": [lp for _, lp, _ in tokens],
        "top_logprobs": [{piece(a): alp for a, alp in alternatives} for _, _, alternatives in tokens],
        "text_offset": offsets,
    }


def chat_logprobs(tokens: List[Tuple[int, float, list]], token_bytes) -> dict:
    """Chat's logprobs object: per token its text, logprob, UTF-8 bytes (part of a character, for
    a byte-fallback token) and top alternatives."""

    def entry(token: int, logprob: float) -> dict:
        data = token_bytes(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]} for t, lp, alts in tokens]}


def whole_answer(job: Job, texts: Dict[int, str], reasons: Dict[int, str], tokens: Dict[int, list], token_bytes, counts: dict) -> dict:
    """The non-streamed answer, from each choice's joined text, finish reason and tokens."""
    choices = []
    for index in range(job.rows):
        logprobs = None
        if job.sampling.logprobs:
            logprobs = chat_logprobs(tokens[index], token_bytes) if job.kind == "chat" else completion_logprobs(tokens[index], token_bytes, 0)
        choice = {"index": index, "logprobs": logprobs, "finish_reason": reasons[index]}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": texts[index]}
        else:
            choice["text"] = (job.prompts[index // job.sampling.n] if job.echo else "") + texts[index]
        choices.append(choice)
    return {**header(job, chunk=False), "choices": choices, "usage": counts}


def header(job: Job, chunk: bool) -> dict:
    if job.kind == "chat":
        return {"id": f"chatcmpl-{job.id}", "object": "chat.completion.chunk" if chunk else "chat.completion", "created": job.created, "model": job.model}
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": job.model}


def delta_chunk(job: Job, index: int, text: str, logprobs: Optional[dict], finish_reason: Optional[str] = None, first: bool = False) -> dict:
    """One streamed chunk for one choice: new text (chat: the role in the first), or its finish reason."""
    if job.kind == "chat":
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**header(job, chunk=True), "choices": [choice]}


def usage_chunk(job: Job, counts: dict) -> dict:
    return {**header(job, chunk=True), "choices": [], "usage": counts}
