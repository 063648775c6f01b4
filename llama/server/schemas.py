"""OpenAI's request bodies as this server takes them, declared as pydantic models: FastAPI checks each
body against them (and shows them at ``/docs``), and ``request_error`` turns the first failed check
into the one-line 400 that names the field. A field the server does not implement is refused
(``extra="forbid"``), and no value is coerced (``strict``: "4" is not a number, true not an integer).

The checks that need the model (the context length, the vocabulary, the slots) are in
``llama.server.protocol``, which maps a checked body to the engine's ``GenerationOptions``.
"""

from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat's top_logprobs; used for completions' logprobs too
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def number(description: str, **bounds) -> Any:
    return Field(None, description=description, allow_inf_nan=False, **bounds)


NonEmptyText = Annotated[str, Field(min_length=1)]


class StreamOptions(Body):
    include_usage: bool = Field(False, description="a last chunk with the usage")


class JSONSchemaFormat(Body):
    name: str = Field(..., pattern=NAME_PATTERN, description="the schema's name: letters, digits, _ and -, up to 64")
    description: Optional[str] = None
    schema_: Dict[str, Any] = Field(
        ..., alias="schema", description="a JSON Schema (draft 2020-12) the answer must follow"
    )
    strict: Optional[bool] = Field(
        None, description="accepted for OpenAI's clients: the answer always follows the schema"
    )


class TextFormat(Body):
    type: Literal["text"]


class JSONObjectFormat(Body):
    type: Literal["json_object"]


class JSONSchemaResponseFormat(Body):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[Union[TextFormat, JSONObjectFormat, JSONSchemaResponseFormat], Field(discriminator="type")]


class SamplingFields(Body):
    """The fields both endpoints take."""

    model: Optional[str] = Field(
        None, description="the served model's id (GET /v1/models); optional: this server serves one model"
    )
    max_tokens: Optional[int] = Field(None, ge=1, description="an integer >= 1: the most tokens to generate")
    temperature: Optional[float] = number("a number >= 0 (0 is greedy)", ge=0)
    top_p: Optional[float] = number("a number in (0, 1]", gt=0, le=1)
    n: Optional[int] = Field(None, ge=1, description="an integer >= 1: choices per prompt")
    stop: Optional[Union[NonEmptyText, Annotated[List[NonEmptyText], Field(max_length=4)]]] = Field(
        None, description="a non-empty string or a list of up to 4 of them"
    )
    seed: Optional[int] = Field(None, ge=0, description="an integer >= 0: the same seed, the same samples")
    stream: Optional[bool] = Field(None, description="true or false: server-sent events")
    stream_options: Optional[StreamOptions] = Field(
        None, description="{'include_usage': true or false}, with 'stream': true"
    )
    user: Optional[str] = Field(None, description="a string (an id of the end user)")
    response_format: Optional[ResponseFormat] = Field(
        None,
        description=(
            "{'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'name', 'schema'}}"
        ),
    )
    presence_penalty: Optional[float] = number("a number in [-2, 2] (0 is off)", ge=-2, le=2)
    frequency_penalty: Optional[float] = number("a number in [-2, 2] (0 is off)", ge=-2, le=2)
    logit_bias: Optional[Dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]]] = Field(
        None, description="an object from token ids to biases in [-100, 100]"
    )
    top_k: Optional[int] = Field(None, ge=-1, description="an integer >= -1 (vLLM's: 0 or -1 keeps every token)")
    min_p: Optional[float] = number("a number in [0, 1) (0 is off)", ge=0, lt=1)
    repetition_penalty: Optional[float] = number("a number > 0 (1 is off)", gt=0)


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Union[str, List[str], List[int], List[List[int]]] = Field(
        ..., description="a string, a list of strings, a list of token ids, or a list of lists of token ids"
    )
    max_tokens: Optional[int] = Field(
        None, ge=0, description="an integer >= 0: the most tokens to generate (0, with 'echo': the prompt alone)"
    )
    logprobs: Optional[int] = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description=f"an integer in [0, {MAX_TOP_LOGPROBS}]: the likeliest tokens' logprobs per token",
    )
    echo: Optional[bool] = Field(
        None, description="true or false: the prompt before the text (with 'logprobs', its tokens scored)"
    )


class ContentPart(BaseModel):
    """A part of a message's content; only "text" parts are read (checked in protocol)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: Optional[str] = None


class FunctionCall(Body):
    name: str
    arguments: str = Field(..., description="the arguments as a JSON string")


class ToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Body):
    role: str = Field(..., description="system (or developer), user, assistant or tool")
    content: Optional[Union[str, List[ContentPart]]] = Field(None, description="a string or a list of text parts")
    tool_calls: Optional[List[ToolCall]] = Field(None, description="an assistant message's calls")
    tool_call_id: Optional[str] = Field(None, description="a tool message's call")
    name: Optional[str] = Field(None, description="a tool message's function")
    refusal: None = None  # what OpenAI's client sends back with an assistant message: null only
    function_call: None = None
    audio: None = None
    annotations: Optional[List[Any]] = None


class FunctionDefinition(Body):
    name: str = Field(..., pattern=NAME_PATTERN)
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = Field(None, description="a JSON Schema of the arguments (an object)")
    strict: Optional[bool] = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: FunctionName


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[List[ChatMessage], Field(min_length=1)] = Field(
        ..., description="a non-empty list of {'role', 'content'} messages"
    )
    logprobs: Optional[bool] = Field(None, description="true or false: each token's logprob")
    top_logprobs: Optional[int] = Field(
        None, ge=0, le=MAX_TOP_LOGPROBS, description=f"an integer in [0, {MAX_TOP_LOGPROBS}], with 'logprobs': true"
    )
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="an integer >= 1: max_tokens' newer name")
    tools: Optional[List[Tool]] = Field(None, description="the functions the model may call")
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = Field(
        None, description="'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )
    parallel_tool_calls: Optional[bool] = Field(None, description="true or false: more than one call per answer")


class LoadAdapterRequest(Body):
    """POST /v1/load_lora_adapter (vLLM's route and fields)."""

    lora_name: NonEmptyText = Field(..., description="a non-empty string: the model id requests name it by")
    lora_path: NonEmptyText = Field(..., description="a non-empty string: the adapter's folder, on the server")


class UnloadAdapterRequest(Body):
    """POST /v1/unload_lora_adapter (vLLM's route and fields)."""

    lora_name: NonEmptyText = Field(..., description="a non-empty string: the adapter's model id")
    lora_int_id: Optional[int] = Field(None, description="an integer, accepted for vLLM's clients and not used")


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def error_param(loc) -> str:
    """The field an error's location names: "max_tokens", or "messages[2]" for a message."""
    if len(loc) >= 2 and loc[0] == "messages" and isinstance(loc[1], int):
        return f"messages[{loc[1]}]"
    return str(loc[0])


def error_message(error: dict, body, model) -> str:
    """One line for pydantic's ``error`` (its ``loc`` inside the body): the field and what it must be."""
    loc, kind = error["loc"], error["type"]
    param = error_param(loc)
    if kind == "extra_forbidden" and len(loc) == 1:
        return f"unsupported field {param!r}; this server takes {sorted(model.model_fields)}"
    if kind == "extra_forbidden":
        return f"{param}: unsupported field {'.'.join(map(str, loc[1:]))!r}"
    field = model.model_fields.get(param)
    if field is not None and field.description:
        got = "it is missing" if kind == "missing" else f"got {short(body.get(param))}"
        return f"'{param}' must be {field.description}; {got}"
    where = ".".join(map(str, loc[1:]))
    return f"{param}{'.' + where if where else ''}: {error['msg']}, got {short(error.get('input'))}"
