"""OpenAI's HTTP API as this server speaks it: a request body checked field by field into a ``Job``,
and the JSON of the answers (whole, or as streamed chunks).

Nothing here touches the model or the network: ``parse_completion`` / ``parse_chat`` take the
decoded JSON body and the ``Llama`` (for its tokenizer and limits) and either return a ``Job`` or
raise ``RequestError``, which the HTTP layer sends as a 400 with OpenAI's error body naming the field.
"""

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

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


@dataclass
class Job:
    """One accepted request, as the engine takes it (``prompt_tokens``, ``options``: every row of it
    decodes with these settings, beside rows of other requests with theirs) and as the answer needs
    it. Choice i * n + j of the answer is prompt i's sample j: the engine's row of the same index."""

    kind: str  # "completion" or "chat"
    model: str
    prompts: list  # strings (completions, for echo) or the one dialog (chat)
    prompt_tokens: List[List[int]]  # one list per prompt
    options: GenerationOptions  # max_gen_len is the request's max_tokens
    stream: bool
    echo: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    accepted: float = field(default_factory=time.monotonic)  # for the time to its first token

    @property
    def rows(self) -> int:
        return len(self.prompt_tokens) * self.options.num_return_sequences

    def usage(self, completion_tokens: int, cached_tokens: int) -> dict:
        """OpenAI's usage: each prompt counted once, whatever its number of samples; ``cached_tokens``
        of them were found in the prefix cache."""
        prompt_tokens = sum(len(tokens) for tokens in self.prompt_tokens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens}}


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
    return make_job(body, llama, model, "completion", prompts, llama.encode_prompts(prompts), logprobs, echo, DEFAULT_COMPLETION_TOKENS)


def parse_chat(body: dict, llama, model: str) -> Job:
    """POST /v1/chat/completions: ``messages`` in the model's chat format and the sampling fields."""
    messages = body.get("messages")
    if messages is None:
        raise RequestError("'messages' is required: a list of {'role', 'content'} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"'messages' must be a non-empty list of messages, got {short(messages)}", "messages")
    dialog = [parse_message(i, message) for i, message in enumerate(messages)]
    check_known_fields(body, CHAT_FIELDS)
    wants_logprobs = optional_bool(body, "logprobs", False)
    top_logprobs = optional_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top_logprobs is not None and not wants_logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    logprobs = (top_logprobs or 0) if wants_logprobs else None  # None: no logprobs at all
    try:
        prompt_tokens = llama.encode_dialog(dialog)
    except ValueError as error:
        raise RequestError(str(error), "messages") from None
    if llama.chat_format.is_unsafe(dialog):  # Meta's chat_completion refuses these too
        raise RequestError(f"the special tags {llama.chat_format.special_tags[:8]} are not allowed in a message", "messages")
    return make_job(body, llama, model, "chat", [dialog], [prompt_tokens], logprobs, False, None)


def parse_message(i: int, message) -> dict:
    """messages[i] as the chat format takes it: OpenAI's ``developer`` role is the system role, and
    content given as a list of ``{"type": "text", "text": ...}`` parts is their texts joined by
    newlines (as vLLM joins them); a part of another type (an image, audio, a file) is refused."""
    if not isinstance(message, dict):
        raise RequestError(f"messages[{i}] must be an object with 'role' and 'content', got {short(message)}", f"messages[{i}]")
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(text_part(i, j, part) for j, part in enumerate(content))
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}] must have a string 'content' or a list of text parts, got {short(message)}", f"messages[{i}]")
    role = message.get("role")
    return {"role": "system" if role == "developer" else role, "content": content}


def text_part(i: int, j: int, part) -> str:
    """The text of part j of messages[i]'s content."""
    if not isinstance(part, dict) or "type" not in part:
        raise RequestError(f"messages[{i}].content[{j}] must be an object {{'type': 'text', 'text': ...}}, got {short(part)}", f"messages[{i}]")
    if part["type"] != "text":
        raise RequestError(
            f"messages[{i}].content[{j}] has type {part['type']!r}; this model reads only 'text' parts", f"messages[{i}]"
        )
    if not isinstance(part.get("text"), str):
        raise RequestError(f"messages[{i}].content[{j}] must have a string 'text', got {short(part)}", f"messages[{i}]")
    return part["text"]


def parse_response_format(response_format) -> None:
    """``response_format``: only ``{"type": "text"}`` (plain text, what the model writes anyway);
    JSON modes would need constrained decoding, which this server does not do."""
    if response_format is None or response_format == {"type": "text"}:
        return
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    what = f"type {kind!r}" if kind is not None else short(response_format)
    raise RequestError(f"response_format {what} is not supported; this server writes plain text: {{'type': 'text'}}", "response_format")


COMMON_FIELDS = {
    "model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "user", "response_format",
    "presence_penalty", "frequency_penalty", "logit_bias", "top_k", "min_p", "repetition_penalty",
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


def check_known_fields(body: dict, known: set) -> None:
    """A field this server does not implement is refused rather than ignored."""
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unsupported field(s) {unknown}; this server takes {sorted(known)}", unknown[0])


def make_job(body, llama, model, kind, prompts, prompt_tokens, logprobs, echo, default_max_tokens) -> Job:
    """The fields both endpoints share, checked against the model's limits."""
    params = llama.model.params
    n = optional_int(body, "n", 1, params.max_batch_size) or 1
    if len(prompts) * n > params.max_batch_size:
        raise RequestError(f"{len(prompts)} prompts x n={n} exceed the server's max_batch_size={params.max_batch_size}", "n")
    max_tokens = parse_max_tokens(body, kind, max(map(len, prompt_tokens)), params.max_seq_len, default_max_tokens)
    parse_response_format(body.get("response_format"))
    if not isinstance(body.get("user", ""), str):
        raise RequestError(f"'user' must be a string (an id of the end user), got {short(body['user'])}", "user")
    stream = optional_bool(body, "stream", False)
    stream_options = body.get("stream_options") or {}
    if stream_options and (not stream or not isinstance(stream_options, dict) or set(stream_options) != {"include_usage"}
                           or not isinstance(stream_options["include_usage"], bool)):
        raise RequestError("'stream_options' must be {'include_usage': true or false}, with 'stream': true", "stream_options")
    try:  # what the field checks below miss is refused in the generation options' own words
        options = GenerationOptions(
            max_gen_len=max_tokens, num_return_sequences=n, stop_strings=parse_stop(body.get("stop")),
            seed=optional_int(body, "seed", 0, None), logprobs=logprobs is not None, top_logprobs=logprobs or 0,
            temperature=checked_number(body, "temperature", 1.0, lambda t: t >= 0, ">= 0 (0 is greedy)"),
            top_p=checked_number(body, "top_p", 1.0, lambda p: 0 < p <= 1, "in (0, 1]"),
            top_k=parse_top_k(body),
            min_p=checked_number(body, "min_p", 0.0, lambda m: 0 <= m < 1, "in [0, 1) (0 is off)"),
            repetition_penalty=checked_number(body, "repetition_penalty", 1.0, lambda r: r > 0, "> 0 (1 is off)"),
            presence_penalty=checked_number(body, "presence_penalty", 0.0, lambda a: -2 <= a <= 2, "in [-2, 2] (0 is off)"),
            frequency_penalty=checked_number(body, "frequency_penalty", 0.0, lambda a: -2 <= a <= 2, "in [-2, 2] (0 is off)"),
            logit_bias=parse_logit_bias(body.get("logit_bias"), params.vocab_size),
        )
    except (ValueError, TypeError) as error:
        raise RequestError(str(error)) from None
    return Job(
        kind=kind, model=model, prompts=prompts, prompt_tokens=prompt_tokens, options=options,
        stream=stream, echo=echo, include_usage=stream_options.get("include_usage", False),
    )


def parse_top_k(body: dict) -> int:
    """``top_k`` as vLLM takes it: a positive k keeps the k likeliest tokens; 0 or -1 keeps all."""
    top_k = optional_int(body, "top_k", -1, None)
    return 0 if top_k in (None, -1) else top_k


def parse_logit_bias(logit_bias, vocab_size: int) -> Dict[int, float]:
    """``logit_bias``: an object from token ids (JSON keys, so strings of digits) to a bias in
    [-100, 100] added to that token's logit before sampling (OpenAI's definition)."""
    if logit_bias is None:
        return {}
    if not isinstance(logit_bias, dict):
        raise RequestError(f"'logit_bias' must be an object from token ids to biases, got {short(logit_bias)}", "logit_bias")
    biases = {}
    for key, bias in logit_bias.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise RequestError(f"'logit_bias' key {key!r} is not a token id in [0, {vocab_size})", "logit_bias")
        if not is_number(bias) or not -100 <= bias <= 100:
            raise RequestError(f"'logit_bias' of token {key} must be a number in [-100, 100], got {short(bias)}", "logit_bias")
        biases[int(key)] = float(bias)
    return biases


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


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def checked_number(body: dict, name: str, default: float, allowed: Callable[[float], bool], expected: str) -> float:
    """``body[name]`` (``default`` if absent or null), a number for which ``allowed`` holds."""
    value = body.get(name)
    if value is None:
        return default
    if not is_number(value) or not allowed(value):
        raise RequestError(f"'{name}' must be a number {expected}, got {short(value)}", name)
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
# A row's new tokens arrive as (token id, logprob, [(id, logprob), ...] alternatives) triples.

def token_triples(delta) -> List[Tuple[int, float, list]]:
    """The new tokens of an engine ``RowDelta`` with their logprobs and alternatives."""
    alternatives = delta.top_logprobs or [[] for _ in delta.tokens]
    return list(zip(delta.tokens, delta.logprobs, alternatives))


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


def logprobs_object(job: Job, tokens: List[Tuple[int, float, list]], token_bytes, text_start: int) -> Optional[dict]:
    """The logprobs of a choice's ``tokens`` in the endpoint's shape; None if not asked for."""
    if not job.options.logprobs:
        return None
    return chat_logprobs(tokens, token_bytes) if job.kind == "chat" else completion_logprobs(tokens, token_bytes, text_start)


def whole_answer(job: Job, texts: Dict[int, str], reasons: Dict[int, str], tokens: Dict[int, list], token_bytes, counts: dict) -> dict:
    """The non-streamed answer, from each choice's joined text, finish reason and tokens."""
    choices = []
    for index in range(job.rows):
        choice = {"index": index, "logprobs": logprobs_object(job, tokens[index], token_bytes, 0), "finish_reason": reasons[index]}
        if job.kind == "chat":
            choice["message"] = {"role": "assistant", "content": texts[index]}
        else:
            choice["text"] = echoed_prompt(job, index) + texts[index]
        choices.append(choice)
    return {**header(job, chunk=False), "choices": choices, "usage": counts}


def echoed_prompt(job: Job, index: int) -> str:
    """What choice ``index``'s text starts with: its prompt with ``echo``, else nothing."""
    return job.prompts[index // job.options.num_return_sequences] if job.echo else ""


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
