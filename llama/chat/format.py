"""Chat formats: a dialog of messages to the tokens a chat model was trained on. The format follows
the tokenizer (``chat_format_for``):

- Llama 2 (sentencepiece): every finished (user, assistant) exchange is ``BOS [INST] user [/INST]
  answer EOS``; the last user message is ``BOS [INST] user [/INST]``, and the model writes the answer.
  A leading system message is folded into the first user message between <<SYS>> tags. Messages that
  contain the tags themselves are refused with ``UNSAFE_ERROR``, as Meta's reference does.
- Llama 3 (byte-level BPE), Meta's ``ChatFormat``: BOS, then per message ``<|start_header_id|>role
  <|end_header_id|>\n\n content <|eot_id|>`` (the header's parts are special tokens, the content
  stripped), then an open assistant header. Special tokens are ids only, so no message can fake one.
- A Hugging Face folder's own ``chat_template`` when it is neither (TinyLlama-Chat, Zephyr-style
  fine-tunes): rendered with jinja2 as transformers' ``apply_chat_template`` renders it, and read with
  the special tokens' texts standing for them, as transformers reads it. A message containing a special
  token's text is refused, since the rendered text could not tell it from the template's own.
"""

import json
from datetime import datetime
from typing import Dict, List, Literal, Optional, Sequence, Tuple, TypedDict

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."


def check_dialog(dialog: Sequence[Message]) -> None:
    """A non-empty list of {"role", "content"} messages: an optional system message, then user and
    assistant alternating, ending with the user."""
    if not isinstance(dialog, (list, tuple)) or not dialog:
        raise ValueError(f"a dialog must be a non-empty list of messages, got {dialog!r:.80}")
    for j, msg in enumerate(dialog):
        if (
            not isinstance(msg, dict)
            or not isinstance(msg.get("content"), str)
            or msg.get("role") not in ("system", "user", "assistant")
        ):
            raise ValueError(
                f"message {j} must be a dict with 'role' in ('system', 'user', 'assistant') and a str 'content', "
                f"got {msg!r:.80}"
            )
    if dialog[0]["role"] == "system" and len(dialog) < 2:
        raise ValueError("a dialog with a system message needs a user message after it")
    roles = [msg["role"] for msg in dialog[1:]] if dialog[0]["role"] == "system" else [msg["role"] for msg in dialog]
    expected = ["user" if j % 2 == 0 else "assistant" for j in range(len(roles))]
    if roles != expected:
        raise ValueError(
            "model only supports 'system', 'user' and 'assistant' roles, starting with 'system', then 'user' and "
            f"alternating (u/a/u/a/u...); got {roles}"
        )
    if roles[-1] != "user":
        raise ValueError(f"the last message must be from the user, got {roles[-1]!r}")


def is_unsafe(dialog: Sequence[Message], tags: Sequence[str] = SPECIAL_TAGS) -> bool:
    """Whether a message contains one of ``tags`` (by default the Llama 2 format's)."""
    return any(tag in msg["content"] for tag in tags for msg in dialog)


class ChatFormat:
    """How one model's dialogs become tokens: ``encode_dialog``, and the ``special_tags`` a message
    may not contain (``is_unsafe``)."""

    special_tags: List[str] = []

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_dialog(self, dialog: Sequence[Message]) -> List[int]:
        """The dialog's tokens, ending where the assistant's answer begins."""
        check_dialog(dialog)
        return self.encode_checked(dialog)

    def encode_checked(self, dialog: Sequence[Message]) -> List[int]:
        raise NotImplementedError

    def encode_finished(self, dialog: Sequence[Message]) -> Tuple[List[int], List[bool]]:
        """A finished dialog (ending with the assistant's reply) as the tokens a model learns it from,
        and which of them are the assistant's: each reply and the token that ends it. A reply's tokens
        follow the exact tokens ``encode_dialog`` sends before it."""
        raise NotImplementedError

    def render(self, dialog: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The dialog as text, special tokens written as their texts, as transformers'
        ``apply_chat_template`` renders it: ending with the assistant's header if
        ``add_generation_prompt``, else right after the last message's content (transformers'
        ``continue_final_message``), for a reply that goes on from there. What evaluation harnesses
        read; ``Tokenizer.encode_with_special_tokens`` reads it back."""
        raise NotImplementedError

    def is_unsafe(self, dialog: Sequence[Message]) -> bool:
        """Whether a message contains one of the format's special tags."""
        return is_unsafe(dialog, self.special_tags)

    def encode_dialogs(self, dialogs: Sequence[Dialog]) -> Tuple[List[List[int]], List[bool]]:
        """Each dialog's tokens, and whether it is refused for containing the special tags."""
        if not isinstance(dialogs, (list, tuple)):
            raise TypeError(f"dialogs must be a list of dialogs, got {type(dialogs).__name__}")
        return [self.encode_dialog(dialog) for dialog in dialogs], [self.is_unsafe(dialog) for dialog in dialogs]


def fold_system(dialog: Sequence[Message]) -> List[Message]:
    """Llama 2's dialog with a leading system message folded into the first user message between
    <<SYS>> tags, as Meta's reference sends it."""
    if not dialog or dialog[0]["role"] != "system":
        return list(dialog)
    first_user = dialog[1]["content"] if len(dialog) > 1 else ""
    return [{"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + first_user}] + list(dialog[2:])


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class Llama2ChatFormat(ChatFormat):
    """``[INST]`` turns, the system message between <<SYS>> tags (see the module's docstring)."""

    special_tags = SPECIAL_TAGS

    @staticmethod
    def prompt_text(user: str) -> str:
        return f"{B_INST} {user.strip()} {E_INST}"

    @staticmethod
    def answer_text(answer: str) -> str:
        return f" {answer.strip()} "

    def encode_turn(self, user: str, answer: Optional[str] = None) -> List[int]:
        """``BOS [INST] user [/INST]``, then ``answer EOS`` when the answer is given."""
        if answer is None:
            return self.tokenizer.encode(self.prompt_text(user), bos=True, eos=False)
        return self.tokenizer.encode(self.prompt_text(user) + self.answer_text(answer), bos=True, eos=True)

    def encode_checked(self, dialog: Sequence[Message]) -> List[int]:
        dialog = fold_system(dialog)
        tokens: List[int] = []
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            tokens += self.encode_turn(prompt["content"], answer["content"])
        return tokens + self.encode_turn(dialog[-1]["content"])

    def encode_finished(self, dialog: Sequence[Message]) -> Tuple[List[int], List[bool]]:
        tokens: List[int] = []
        assistant: List[bool] = []
        dialog = fold_system(dialog)
        for prompt, answer in zip(dialog[::2], dialog[1::2]):
            turn = self.encode_turn(prompt["content"], answer["content"])
            shared = shared_prefix(self.encode_turn(prompt["content"]), turn)
            tokens += turn
            assistant += [False] * shared + [True] * (len(turn) - shared)
        return tokens, assistant

    def render(self, dialog: Sequence[Message], add_generation_prompt: bool = True) -> str:
        bos, eos = (self.tokenizer.sp_model.id_to_piece(i) for i in (self.tokenizer.bos_id, self.tokenizer.eos_id))
        dialog = fold_system(dialog)
        text = ""
        for message in dialog:
            if message["role"] == "user":
                text += bos + self.prompt_text(message["content"])
            else:
                text += self.answer_text(message["content"]) + eos
        if not add_generation_prompt and dialog[-1]["role"] == "assistant":
            text = text[: -len(f" {eos}")]
        return text


class Llama3ChatFormat(ChatFormat):
    """Meta's Llama 3 ``ChatFormat``: headers and end-of-turn tokens (see the module's docstring)."""

    def encode_header(self, role: str) -> List[int]:
        special = self.tokenizer.special_tokens
        role_tokens = self.tokenizer.encode(role, bos=False, eos=False)
        return [
            special["<|start_header_id|>"],
            *role_tokens,
            special["<|end_header_id|>"],
            *self.tokenizer.encode("\n\n", bos=False, eos=False),
        ]

    def encode_message(self, message: Message) -> List[int]:
        content = self.tokenizer.encode(message["content"].strip(), bos=False, eos=False)
        return self.encode_header(message["role"]) + content + [self.tokenizer.special_tokens["<|eot_id|>"]]

    def encode_checked(self, dialog: Sequence[Message]) -> List[int]:
        tokens = [self.tokenizer.bos_id]
        for message in dialog:
            tokens += self.encode_message(message)
        return tokens + self.encode_header("assistant")  # the model writes the answer

    def encode_finished(self, dialog: Sequence[Message]) -> Tuple[List[int], List[bool]]:
        tokens, assistant = [self.tokenizer.bos_id], [False]
        for message in dialog:
            encoded = self.encode_message(message)  # an assistant's content and <|eot_id|> after its header are its own
            theirs = len(encoded) - len(self.encode_header("assistant")) if message["role"] == "assistant" else 0
            tokens += encoded
            assistant += [False] * (len(encoded) - theirs) + [True] * theirs
        return tokens, assistant

    def render(self, dialog: Sequence[Message], add_generation_prompt: bool = True) -> str:
        def header(role: str) -> str:
            return f"<|start_header_id|>{role}<|end_header_id|>\n\n"

        text = "<|begin_of_text|>" + "".join(header(m["role"]) + m["content"].strip() + "<|eot_id|>" for m in dialog)
        if add_generation_prompt:
            return text + header("assistant")
        return text[: -len("<|eot_id|>")]


class ChatTemplate(TypedDict):
    """A Hugging Face folder's chat template: the jinja source, the file it came from, the texts of its
    special tokens that templates read (bos_token, eos_token, ...), and tokenizer_config.json's
    ``legacy`` flag (``Tokenizer.encode_with_special_tokens``)."""

    source: str
    path: str
    tokens: Dict[str, str]
    legacy: bool


def raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """jinja's ``tojson`` as transformers defines it: plain JSON, non-ASCII text kept, no HTML escapes."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(template: ChatTemplate) -> jinja2.Template:
    """The template in the environment transformers renders chat templates in: a sandbox that trims
    block lines, loop controls, a ``tojson`` that keeps non-ASCII text, ``raise_exception`` and
    ``strftime_now``."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(template["source"])
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ValueError(f"{template['path']}: the chat_template is not valid jinja: {error}") from None


class TemplateChatFormat(ChatFormat):
    """A folder's own jinja ``chat_template`` (see the module's docstring)."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate):
        super().__init__(tokenizer)
        self.template = template
        self.compiled = compile_template(template)
        self.special_tags = sorted(tokenizer.special_token_texts())

    def render_finished(self, dialog: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The template's own text of the dialog: with the prompt of the assistant's answer, or (not
        ``add_generation_prompt``) a finished dialog with the template's end of every turn, to train on."""
        messages = [{"role": msg["role"], "content": msg["content"]} for msg in dialog]
        try:
            return self.compiled.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.template["tokens"],
            )
        except jinja2.exceptions.TemplateError as error:
            raise ValueError(f"{self.template['path']}: the chat_template refused the dialog: {error}") from None

    def render(self, dialog: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The dialog as text, as ``apply_chat_template``: with the prompt of the assistant's answer, or
        (not ``add_generation_prompt``) ending inside the last message, for a reply that continues it."""
        text = self.render_finished(dialog, add_generation_prompt)
        if add_generation_prompt:
            return text
        final = dialog[-1]["content"]  # transformers' continue_final_message: cut after it
        final = final if final in text else final.strip()
        if final not in text:
            raise ValueError(
                f"{self.template['path']}: the chat_template does not write the last message's content as given, "
                "so a reply cannot continue it"
            )
        return text[: text.rindex(final) + len(final)]

    def encode_checked(self, dialog: Sequence[Message]) -> List[int]:
        return self.tokenizer.encode_with_special_tokens(self.render(dialog), self.template["legacy"])

    def encode_finished(self, dialog: Sequence[Message]) -> Tuple[List[int], List[bool]]:
        """The finished dialog rendered and tokenized as transformers does; the assistant's, each reply
        from where the template's prompt for it ends (the tokens ``encode_dialog`` sends) to where the
        template ends the reply (its end-of-turn text included)."""

        def encode(text: str) -> List[int]:
            return self.tokenizer.encode_with_special_tokens(text, self.template["legacy"])

        tokens = encode(self.render_finished(dialog, add_generation_prompt=False))
        assistant = [False] * len(tokens)
        for i, message in enumerate(dialog):
            if message["role"] == "assistant":
                start = shared_prefix(encode(self.render(dialog[:i])), tokens)
                end = shared_prefix(encode(self.render_finished(dialog[: i + 1], add_generation_prompt=False)), tokens)
                assistant[start:end] = [True] * (end - start)
        return tokens, assistant

    @property
    def renders_tools(self) -> bool:
        """Whether the template writes function definitions (it reads the ``tools`` variable)."""
        return "tools" in self.template["source"]

    def encode_with_tools(self, messages: List[dict], tools: Optional[List[dict]]) -> List[int]:
        """Messages with tool calls and results (Hugging Face's form) and the ``tools``, rendered and read
        as ``encode_checked`` does."""
        try:
            text = self.compiled.render(
                messages=messages, tools=tools, documents=None, add_generation_prompt=True, **self.template["tokens"]
            )
        except jinja2.exceptions.TemplateError as error:
            raise ValueError(f"{self.template['path']}: the chat_template refused the dialog: {error}") from None
        return self.tokenizer.encode_with_special_tokens(text, self.template["legacy"])


# A template that writes these is the tokenizer's own format, which the formats above encode exactly.
FORMAT_MARKERS = {"llama2": B_INST, "llama3": "<|start_header_id|>"}
FORMATS = {"llama2": Llama2ChatFormat, "llama3": Llama3ChatFormat}


def chat_format_for(tokenizer: Tokenizer, template: Optional[ChatTemplate] = None) -> ChatFormat:
    """The tokenizer's format (Llama 2's or Llama 3's), or ``template`` when it writes neither."""
    if template is None or FORMAT_MARKERS[tokenizer.chat_format] in template["source"]:
        return FORMATS[tokenizer.chat_format](tokenizer)
    return TemplateChatFormat(tokenizer, template)
