"""Tool (function) calls in a chat: the functions described in the model's own tool format, the calls
and their results in the dialog, the JSON Schema a forced call follows, and the calls read back from
what the model wrote.

The format follows the chat format (``llama.chat.format``):

- Llama 3.1+ (Meta's ``llama-models``, JSON based tool calling): the system message starts with
  ``Environment: ipython`` and the knowledge and today's dates; a user message before the first one
  lists the functions in JSON and asks for calls in JSON. The model answers
  ``<|python_tag|>{"type": "function", "name": ..., "parameters": {...}}`` and ends with
  ``<|eom_id|>``; a call sent back is that JSON ending with ``<|eom_id|>``; a function's result is a
  message of the ``ipython`` role.
- A folder's chat template that renders ``tools`` (Hugging Face's convention): rendered with the
  tools, the calls (arguments as objects) and the ``tool`` messages, as ``apply_chat_template``.
- Any other format (Llama 2, templates without tools), this project's JSON convention: the system
  message lists the functions in JSON (``JSON_CONVENTION``) and asks for ``{"name": ...,
  "parameters": {...}}`` alone as the answer; a call sent back is that JSON as the assistant's
  message, and the results of the calls are the next user message, one line per call:
  ``<name> returned: <content>``.
"""

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Dict, List, Optional, Sequence, Tuple

from llama.chat.format import ChatFormat, Llama3ChatFormat, TemplateChatFormat

TOOLS_INSTRUCTION = (  # Meta's JsonCustomToolGenerator (llama-models, llama3 prompt templates)
    "Answer the user's question by making use of the following functions if needed.\n"
    "If none of the function can be used, please say so.\n"
    "Here is a list of functions in JSON format:\n{tools}\n\n"
    "Return function calls in JSON format."
)
JSON_CONVENTION = (
    "You can call these functions, described in JSON:\n{tools}\n\n"
    'To call one, answer with only a JSON object {{"name": the function\'s name, '
    '"parameters": an object of its arguments}}, '
    "and nothing else. Otherwise answer in words."
)
PYTHON_TAG = "<|python_tag|>"


@dataclass
class Call:
    """One call of a function: its id (``call_...``), name and arguments."""

    id: str
    name: str
    arguments: Dict[str, Any]


def describe(tools: Sequence[dict]) -> str:
    """The functions as JSON, one object per tool (OpenAI's ``{"type": "function", "function": ...}``)."""
    return "\n".join(json.dumps(tool, indent=4, ensure_ascii=False) for tool in tools)


def meta_call(call: Call) -> str:
    return json.dumps({"type": "function", "name": call.name, "parameters": call.arguments}, ensure_ascii=False)


def convention_call(calls: Sequence[Call]) -> str:
    objects = [{"name": call.name, "parameters": call.arguments} for call in calls]
    return json.dumps(objects[0] if len(objects) == 1 else objects, ensure_ascii=False)


def encode_tool_dialog(chat_format: ChatFormat, messages: List[dict], tools: Sequence[dict]) -> List[int]:
    """The tokens of a dialog with tool calls and results, the ``tools`` described (none: only the
    calls and results of earlier turns are written), ending where the assistant's answer begins.
    ``messages``: {"role", "content"} with, for an assistant's calls, "tool_calls" (``Call``s), and for
    a "tool" message its function's "name".

    Raises:
        ValueError: the dialog's roles are out of order.
    """
    check_tool_dialog(messages)
    if isinstance(chat_format, Llama3ChatFormat):
        return encode_llama3(chat_format, messages, tools)
    if isinstance(chat_format, TemplateChatFormat) and chat_format.renders_tools:
        return chat_format.encode_with_tools(template_messages(messages), list(tools) or None)
    return chat_format.encode_dialog(convention_dialog(messages, tools))


def check_tool_dialog(messages: List[dict]) -> None:
    """A tool message answers a call of the assistant's message before it; the dialog ends with the
    user or with results."""
    pending = set()
    for i, message in enumerate(messages):
        if message["role"] not in ("system", "user", "assistant", "tool"):
            raise ValueError(
                f"messages[{i}] has the role {message['role']!r}; "
                "a dialog with tools takes 'system', 'user', 'assistant' and 'tool'"
            )
        if message["role"] == "tool":
            if message.get("tool_call_id") not in pending:
                raise ValueError(
                    f"messages[{i}] is a tool result whose tool_call_id {message.get('tool_call_id')!r} "
                    "is no call of the assistant's message before it"
                )
        else:
            pending = {call.id for call in message.get("tool_calls") or ()}
    if messages[-1]["role"] not in ("user", "tool"):
        raise ValueError(f"the last message must be from the user or a tool, got {messages[-1]['role']!r}")


def encode_llama3(chat_format: Llama3ChatFormat, messages: List[dict], tools: Sequence[dict]) -> List[int]:
    """Meta's Llama 3.1 layout (see the module's docstring)."""
    special = chat_format.tokenizer.special_tokens
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    rest = messages[1:] if messages[0]["role"] == "system" else messages
    dates = f"Cutting Knowledge Date: December 2023\nToday Date: {datetime.now().strftime('%d %B %Y')}"
    dialog = [{"role": "system", "content": f"Environment: ipython\n\n{dates}\n\n{system}"}]
    if tools:
        dialog.append({"role": "user", "content": TOOLS_INSTRUCTION.format(tools=describe(tools))})
    tokens = [chat_format.tokenizer.bos_id]
    for message in dialog + rest:
        if message.get("tool_calls"):
            text = (message["content"] or "") + "".join(meta_call(call) for call in message["tool_calls"])
            tokens += (
                chat_format.encode_header("assistant")
                + chat_format.tokenizer.encode(text, bos=False, eos=False)
                + [special["<|eom_id|>"]]
            )
        else:
            role = "ipython" if message["role"] == "tool" else message["role"]
            tokens += chat_format.encode_message({"role": role, "content": message["content"]})
    return tokens + chat_format.encode_header("assistant")


def template_messages(messages: List[dict]) -> List[dict]:
    """The messages as Hugging Face's chat templates read them: calls with their arguments as objects."""
    rendered = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in message["tool_calls"]
            ]
        rendered.append(message)
    return rendered


def convention_dialog(messages: List[dict], tools: Sequence[dict]) -> List[dict]:
    """The dialog in this project's JSON convention, in the roles every chat format takes."""
    dialog = []
    system = [messages[0]["content"]] if messages[0]["role"] == "system" else []
    if tools:
        system.append(JSON_CONVENTION.format(tools=describe(tools)))
    if system:
        dialog.append({"role": "system", "content": "\n\n".join(system)})
    for message in messages[1:] if messages[0]["role"] == "system" else messages:
        if message.get("tool_calls"):
            dialog.append({"role": "assistant", "content": convention_call(message["tool_calls"])})
        elif message["role"] == "tool":
            line = f"{message['name']} returned: {message['content']}"
            if dialog[-1]["role"] == "user":
                dialog[-1] = {"role": "user", "content": dialog[-1]["content"] + "\n" + line}
            else:
                dialog.append({"role": "user", "content": line})
        else:
            dialog.append({"role": message["role"], "content": message["content"]})
    return dialog


def call_schema(chat_format: ChatFormat, tools: Sequence[dict]) -> dict:
    """The JSON Schema of a call of one of ``tools`` in the format's own call JSON: what a forced
    call (tool_choice "required" or a named function) is decoded under."""
    meta = isinstance(chat_format, Llama3ChatFormat)
    calls = []
    for tool in tools:
        function = tool["function"]
        properties = {
            "name": {"const": function["name"]},
            "parameters": function.get("parameters") or {"type": "object"},
        }
        if meta:
            properties = {"type": {"const": "function"}, **properties}
        calls.append(
            {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}
        )
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def parse_calls(text: str, names: Sequence[str]) -> Optional[List[Tuple[str, Dict[str, Any]]]]:
    """The calls ``text`` makes, as (name, arguments) pairs, if it is nothing but calls of the functions
    ``names`` in JSON (Meta's ``{"type": "function", "name", "parameters"}``, or ``{"name",
    "parameters"}`` / ``"arguments"``; one object, a list, or one per line, after an optional
    ``<|python_tag|>``); else None: the text is the answer."""
    text = text.strip()
    if text.startswith(PYTHON_TAG):
        text = text[len(PYTHON_TAG) :].strip()
    try:
        objects = json.loads(text)
    except json.JSONDecodeError:
        try:
            objects = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return None
    objects = objects if isinstance(objects, list) else [objects]
    calls = []
    for obj in objects:
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return None
        arguments = obj.get("parameters", obj.get("arguments", {}))
        if not isinstance(arguments, dict):
            return None
        calls.append((obj["name"], arguments))
    return calls or None
