"""OpenAI's HTTP API as this server speaks it: a checked request body (``llama.server.schemas``)
mapped to a ``Job`` (the engine's ``GenerationOptions``), and the JSON of the answers (whole, or as
streamed chunks).

Nothing here touches the network: ``parse_completion`` / ``parse_chat`` take the body and the
``Llama`` (for its tokenizer and limits) and either return a ``Job`` or raise ``RequestError``,
which the HTTP layer sends with OpenAI's error body naming the field.
"""

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from llama.chat.tool_calls import PYTHON_TAG, Call, call_schema, encode_tool_dialog, parse_calls
from llama.options import GenerationOptions
from llama.server.schemas import ChatRequest, CompletionRequest, SamplingFields, short

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error body naming ``param``."""

    def __init__(
        self,
        message: str,
        param: Optional[str] = None,
        status: int = 400,
        kind: str = "invalid_request_error",
        code: Optional[str] = None,
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


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
    tool_names: Tuple[str, ...] = ()  # chat: the functions whose calls are read from the answer
    forced_call: bool = False  # tool_choice "required" or a named function: the answer is a call
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
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        }


def parse_completion(body: CompletionRequest, llama, model: str) -> Job:
    """POST /v1/completions: ``prompt`` (a string, a list of strings, a list of token ids or a list
    of such lists: token ids are the prompt as given, no BOS added) and the sampling fields."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts, prompt_tokens = [prompt], llama.encode_prompts([prompt])
    elif not prompt or (isinstance(prompt[0], list) and not all(prompt)):
        raise RequestError(f"'prompt' must not be empty, got {short(prompt)}", "prompt")
    elif isinstance(prompt[0], str):
        prompts, prompt_tokens = prompt, llama.encode_prompts(prompt)
    else:
        prompt_tokens = [prompt] if isinstance(prompt[0], int) else prompt
        vocab_size = llama.model.params.vocab_size
        if any(not 0 <= token < vocab_size for tokens in prompt_tokens for token in tokens):
            raise RequestError(f"'prompt' has token ids outside the vocabulary [0, {vocab_size})", "prompt")
        prompts = [llama.tokenizer.decode(tokens) for tokens in prompt_tokens]
    echo = bool(body.echo)
    return make_job(
        body, llama, model, "completion", prompts, prompt_tokens, body.logprobs, echo, DEFAULT_COMPLETION_TOKENS
    )


def parse_chat(body: ChatRequest, llama, model: str) -> Job:
    """POST /v1/chat/completions: ``messages`` in the model's chat format, the ``tools`` it may call
    (``llama.chat.tool_calls``) and the sampling fields."""
    dialog = [parse_message(i, message) for i, message in enumerate(body.messages)]
    if body.top_logprobs is not None and not body.logprobs:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None  # None: no logprobs at all
    tools, choice = parse_tools(body)
    try:
        if tools or any(message["role"] == "tool" or message.get("tool_calls") for message in dialog):
            prompt_tokens = encode_tool_dialog(
                llama.chat_format, with_function_names(dialog), tools if choice != "none" else []
            )
        else:
            prompt_tokens = llama.encode_dialog(dialog)
    except ValueError as error:
        raise RequestError(str(error), "messages") from None
    if llama.chat_format.is_unsafe(dialog):  # Meta's chat_completion refuses these too
        raise RequestError(
            f"the special tags {llama.chat_format.special_tags[:8]} are not allowed in a message", "messages"
        )
    called = [tool for tool in tools if choice == "required" or choice == tool["function"]["name"]]
    schema = call_schema(llama.chat_format, called) if called else None
    job = make_job(body, llama, model, "chat", [dialog], [prompt_tokens], logprobs, False, None, schema)
    job.tool_names = tuple(tool["function"]["name"] for tool in tools) if choice != "none" else ()
    job.forced_call = bool(called)
    return job


def parse_tools(body: ChatRequest) -> Tuple[List[dict], str]:
    """``tools`` (as OpenAI's dicts) and ``tool_choice`` as "none", "auto", "required" or a function's
    name (default: "auto" with tools, else "none")."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    names = [tool["function"]["name"] for tool in tools]
    if len(set(names)) < len(names):
        raise RequestError(f"'tools' names a function twice: {names}", "tools")
    choice = body.tool_choice if body.tool_choice is not None else "auto" if tools else "none"
    if not isinstance(choice, str):
        choice = choice.function.name
        if choice not in names:
            raise RequestError(
                f"'tool_choice' names the function {choice!r}, which is not in 'tools' {names}", "tool_choice"
            )
    if choice != "none" and not tools:
        raise RequestError(f"'tool_choice' {choice!r} needs 'tools'", "tool_choice")
    if body.parallel_tool_calls and choice not in ("none", "auto"):
        raise RequestError(
            "'parallel_tool_calls' with a forced call is not supported: a forced answer is one call",
            "parallel_tool_calls",
        )
    return tools, choice


def with_function_names(dialog: List[dict]) -> List[dict]:
    """The dialog with each tool message's function name (from the call it answers)."""
    names = {call.id: call.name for message in dialog for call in message.get("tool_calls") or ()}
    return [
        {**message, "name": names.get(message.get("tool_call_id"))} if message["role"] == "tool" else message
        for message in dialog
    ]


def parse_message(i: int, message) -> dict:
    """messages[i] as the chat format takes it: OpenAI's ``developer`` role is the system role, and
    content given as a list of ``{"type": "text", "text": ...}`` parts is their texts joined by
    newlines (as vLLM joins them); a part of another type (an image, audio, a file) is refused."""
    content = message.content
    if isinstance(content, list):
        content = "\n".join(text_part(i, j, part) for j, part in enumerate(content))
    if message.tool_calls and message.role == "assistant":
        return {
            "role": "assistant",
            "content": content or "",
            "tool_calls": [parse_call(i, call) for call in message.tool_calls],
        }
    if not isinstance(content, str):
        raise RequestError(f"messages[{i}] must have a string 'content' or a list of text parts", f"messages[{i}]")
    if (message.tool_calls is not None) or (message.tool_call_id is not None) != (message.role == "tool"):
        raise RequestError(
            f"messages[{i}]: 'tool_calls' belong to an assistant message, and 'tool_call_id' to every tool "
            "message only",
            f"messages[{i}]",
        )
    role = message.role
    parsed = {"role": "system" if role == "developer" else role, "content": content}
    return parsed if role != "tool" else {**parsed, "tool_call_id": message.tool_call_id}


def parse_call(i: int, call) -> Call:
    """A call in an assistant's message sent back: its arguments, a JSON string, as an object."""
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise RequestError(
            f"messages[{i}]: the arguments of call {call.id!r} must be a JSON object in a string, "
            f"got {short(call.function.arguments)}",
            f"messages[{i}]",
        )
    return Call(call.id, call.function.name, arguments)


def text_part(i: int, j: int, part) -> str:
    """The text of part j of messages[i]'s content."""
    if part.type != "text":
        raise RequestError(
            f"messages[{i}].content[{j}] has type {part.type!r}; this model reads only 'text' parts", f"messages[{i}]"
        )
    if part.text is None:
        raise RequestError(f"messages[{i}].content[{j}] must have a string 'text'", f"messages[{i}]")
    return part.text


def make_job(
    body: SamplingFields,
    llama,
    model,
    kind,
    prompts,
    prompt_tokens,
    logprobs,
    echo,
    default_max_tokens,
    forced_call_schema=None,
) -> Job:
    """The fields both endpoints share, checked against the model's limits; ``forced_call_schema``:
    the JSON Schema of a forced tool call, which the answer follows."""
    params = llama.model.params
    n = body.n or 1
    max_tokens = parse_max_tokens(
        body, kind, max(map(len, prompt_tokens)), params.max_seq_len, default_max_tokens, echo
    )
    if body.stream_options is not None and not body.stream:
        raise RequestError("'stream_options' needs 'stream': true", "stream_options")
    json_schema, json_object = answer_format(body, llama, forced_call_schema)
    try:  # what the declared checks miss is refused in the generation options' own words
        options = GenerationOptions(
            max_gen_len=max_tokens,
            num_return_sequences=n,
            stop_strings=parse_stop(body.stop),
            seed=body.seed,
            logprobs=logprobs is not None,
            top_logprobs=logprobs or 0,
            echo=echo,  # with logprobs, the prompt's tokens are scored too
            temperature=default(body.temperature, 1.0),
            top_p=default(body.top_p, 1.0),
            top_k=0 if body.top_k in (None, -1) else body.top_k,  # vLLM's: 0 or -1 keeps every token
            min_p=default(body.min_p, 0.0),
            repetition_penalty=default(body.repetition_penalty, 1.0),
            presence_penalty=default(body.presence_penalty, 0.0),
            frequency_penalty=default(body.frequency_penalty, 0.0),
            logit_bias=parse_logit_bias(body.logit_bias, params.vocab_size),
            json_schema=json_schema,
            json_object=json_object,
        )
    except (ValueError, TypeError) as error:
        raise RequestError(str(error)) from None
    return Job(
        kind=kind,
        model=model,
        prompts=prompts,
        prompt_tokens=prompt_tokens,
        options=options,
        stream=bool(body.stream),
        echo=echo,
        include_usage=body.stream_options is not None and body.stream_options.include_usage,
    )


def answer_format(body: SamplingFields, llama, forced_call_schema: Optional[dict]) -> Tuple[Optional[dict], bool]:
    """The options' (json_schema, json_object): ``response_format``'s, or the forced tool call's schema, whose
    grammar is built here (off the event loop)."""
    json_schema, json_object = parse_response_format(body, llama)
    if forced_call_schema is None:
        return json_schema, json_object
    if json_schema is not None or json_object:
        raise RequestError(
            "'response_format' JSON cannot be combined with a forced tool call: the answer is the call",
            "response_format",
        )
    try:
        llama.engine.check_grammar(forced_call_schema)
    except ValueError as error:
        raise RequestError(f"tools: a function's parameters: {error}", "tools") from None
    return forced_call_schema, False


def parse_response_format(body: SamplingFields, llama) -> Tuple[Optional[dict], bool]:
    """``response_format`` as the options' (json_schema, json_object), the schema's grammar built
    (and cached for the engine) here, off the event loop."""
    response_format = body.response_format
    if response_format is None or response_format.type == "text":
        return None, False
    json_schema = response_format.json_schema.schema_ if response_format.type == "json_schema" else None
    try:
        llama.engine.check_grammar(json_schema, json_schema is None)
    except ValueError as error:
        raise RequestError(
            f"response_format.json_schema.schema: {error}" if json_schema is not None else str(error), "response_format"
        ) from None
    return json_schema, json_schema is None


def default(value: Optional[float], otherwise: float) -> float:
    return otherwise if value is None else float(value)


def parse_logit_bias(logit_bias: Optional[Dict[str, float]], vocab_size: int) -> Dict[int, float]:
    """``logit_bias``: an object from token ids (JSON keys, so strings of digits) to a bias in
    [-100, 100] added to that token's logit before sampling (OpenAI's definition)."""
    biases = {}
    for key, bias in (logit_bias or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab_size):
            raise RequestError(f"'logit_bias' key {key!r} is not a token id in [0, {vocab_size})", "logit_bias")
        biases[int(key)] = float(bias)
    return biases


def parse_max_tokens(
    body: SamplingFields, kind: str, prompt_len: int, max_seq_len: int, default: Optional[int], echo: bool
) -> int:
    """``max_tokens`` (chat: or ``max_completion_tokens``), which must fit in the context after the
    longest prompt; if absent, ``default`` where it fits (None: the rest of the context). 0, with
    ``echo`` only (as vLLM takes it): the prompt alone, scored with ``logprobs``, which may fill the context."""
    max_tokens = body.max_tokens
    if max_tokens is None and kind == "chat":
        max_tokens = body.max_completion_tokens
    if max_tokens == 0 and not echo:
        raise RequestError(
            "max_tokens=0 returns nothing without 'echo': true (the prompt alone, scored with 'logprobs'); "
            "give an integer >= 1, or echo",
            "max_tokens",
        )
    room = max_seq_len - prompt_len
    if room < 1 and not (max_tokens == 0 and room == 0):
        field = "prompt" if kind == "completion" else "messages"
        raise RequestError(
            f"the prompt has {prompt_len} tokens; the context holds {max_seq_len} with room for one more "
            "(or, with max_tokens=0 and echo, the prompt alone)",
            field,
        )
    if max_tokens is None:
        return room if default is None else min(default, room)
    if max_tokens > room:
        raise RequestError(
            f"max_tokens={max_tokens} does not fit: the prompt has {prompt_len} tokens and the context "
            f"{max_seq_len}; at most {room}",
            "max_tokens",
        )
    return max_tokens


def parse_stop(stop) -> Tuple[str, ...]:
    """``stop``: null, a string, or a list of strings (checked by the schema)."""
    return () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop)


# The answers. A "choice" is one row: prompt i's sample j is choice i * n + j, as OpenAI numbers them.
# A row's tokens arrive as (token id, logprob, [(id, logprob), ...] alternatives) triples: its new
# tokens, and with echo and logprobs first its prompt's, whose first token has neither (None, None).


def token_triples(job: Job, delta) -> List[Tuple[int, Optional[float], Optional[list]]]:
    """The tokens of an engine ``RowDelta`` with their logprobs and alternatives: its new tokens, after
    its prompt's scored tokens when the delta carries them (a choice's first, with echo and logprobs)."""
    alternatives = delta.top_logprobs or [[] for _ in delta.tokens]
    triples = list(zip(delta.tokens, delta.logprobs, alternatives))
    if delta.prompt_logprobs is None:
        return triples
    prompt = job.prompt_tokens[delta.row // job.options.num_return_sequences]
    prompt_alternatives = delta.prompt_top_logprobs or [[] for _ in delta.prompt_logprobs]
    scored = list(zip(prompt[1:], delta.prompt_logprobs, prompt_alternatives))
    return [(prompt[0], None, None)] + scored + triples  # nothing predicts the first token


def piece(token_bytes, token: int) -> str:
    """A token's text as the logprobs objects spell it (a byte of a character that spans tokens: U+FFFD)."""
    return token_bytes(token).decode("utf-8", errors="replace")


def completion_logprobs(
    tokens: List[Tuple[int, Optional[float], Optional[list]]], token_bytes, text_start: int
) -> dict:
    """Completions' logprobs object for ``tokens``, as OpenAI's legacy API and vLLM write it: each token's
    text, logprob and ``top_logprobs``, the likeliest tokens with the token itself (so up to logprobs + 1
    of them), null where nothing predicts it; and ``text_offset``, where each token's text starts, the
    first at ``text_start``, each after the texts before it. ``token_bytes(id)``: a token's UTF-8 bytes."""
    offsets, offset = [], text_start
    for token, _, _ in tokens:
        offsets.append(offset)
        offset += len(piece(token_bytes, token))
    top_logprobs = [
        None
        if alternatives is None
        else {piece(token_bytes, a): alp for a, alp in alternatives} | {piece(token_bytes, token): logprob}
        for token, logprob, alternatives in tokens
    ]
    return {
        "tokens": [piece(token_bytes, t) for t, _, _ in tokens],
        "token_logprobs": [lp for _, lp, _ in tokens],
        "top_logprobs": top_logprobs,
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
    return (
        chat_logprobs(tokens, token_bytes)
        if job.kind == "chat"
        else completion_logprobs(tokens, token_bytes, text_start)
    )


def whole_answer(
    job: Job, texts: Dict[int, str], reasons: Dict[int, str], tokens: Dict[int, list], token_bytes, counts: dict
) -> dict:
    """The non-streamed answer, from each choice's joined text, finish reason and tokens."""
    choices = []
    for index in range(job.rows):
        choice = {
            "index": index,
            "logprobs": logprobs_object(job, tokens[index], token_bytes, 0),
            "finish_reason": reasons[index],
        }
        if job.kind == "chat":
            calls = tool_calls(job, texts[index], reasons[index])
            choice["message"] = {"role": "assistant", "content": texts[index] if calls is None else None}
            if calls is not None:
                choice["message"]["tool_calls"], choice["finish_reason"] = calls, "tool_calls"
        else:
            choice["text"] = echoed_prompt(job, index) + texts[index]
        choices.append(choice)
    return {**header(job, chunk=False), "choices": choices, "usage": counts}


def tool_calls(job: Job, text: str, finish_reason: Optional[str]) -> Optional[List[dict]]:
    """The answer's calls as OpenAI writes them (``arguments`` a JSON string), if the model called
    functions of ``job.tool_names`` and nothing else; None: the text is the answer."""
    if not job.tool_names or finish_reason != "stop":
        return None
    calls = parse_calls(text, job.tool_names)
    if calls is None:
        return None
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
        }
        for name, arguments in calls
    ]


def may_be_a_call(job: Job, text: str) -> bool:
    """Whether a streamed answer that starts with ``text`` may still turn out to be calls (held back)."""
    if not job.tool_names:
        return False
    start = text.lstrip()
    return (
        job.forced_call
        or start == ""
        or start.startswith(("{", "["))
        or PYTHON_TAG.startswith(start[: len(PYTHON_TAG)])
    )


def tool_calls_chunk(job: Job, index: int, calls: List[dict]) -> dict:
    """A streamed chunk with the choice's calls, each with its ``index`` as OpenAI streams them."""
    delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
    return {
        **header(job, chunk=True),
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}],
    }


def echoed_prompt(job: Job, index: int) -> str:
    """What choice ``index``'s text starts with: its prompt with ``echo``, else nothing."""
    return job.prompts[index // job.options.num_return_sequences] if job.echo else ""


def header(job: Job, chunk: bool) -> dict:
    if job.kind == "chat":
        return {
            "id": f"chatcmpl-{job.id}",
            "object": "chat.completion.chunk" if chunk else "chat.completion",
            "created": job.created,
            "model": job.model,
        }
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": job.model}


def delta_chunk(
    job: Job, index: int, text: str, logprobs: Optional[dict], finish_reason: Optional[str] = None, first: bool = False
) -> dict:
    """One streamed chunk for one choice: new text (chat: the role in the first), or its finish reason."""
    if job.kind == "chat":
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text or first else {})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**header(job, chunk=True), "choices": [choice]}


def usage_chunk(job: Job, counts: dict) -> dict:
    return {**header(job, chunk=True), "choices": [], "usage": counts}
