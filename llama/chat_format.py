"""The Llama 2 chat format: a dialog of messages to the tokens a chat model was trained on.

Every finished (user, assistant) exchange is ``BOS [INST] user [/INST] answer EOS``; the last user
message is ``BOS [INST] user [/INST]``, and the model writes the answer. A leading system message is
folded into the first user message between <<SYS>> tags. Messages that contain the tags themselves
are refused with ``UNSAFE_ERROR``, as Meta's reference does.
"""

from typing import List, Literal, Sequence, Tuple, TypedDict

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
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or msg.get("role") not in ("system", "user", "assistant"):
            raise ValueError(
                f"message {j} must be a dict with 'role' in ('system', 'user', 'assistant') and a str 'content', got {msg!r:.80}"
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


def encode_dialog(tokenizer: Tokenizer, dialog: Sequence[Message]) -> List[int]:
    """The tokens of a dialog in the Llama 2 chat format (see the module's docstring)."""
    check_dialog(dialog)
    if dialog[0]["role"] == "system":
        first_user = {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
        dialog = [first_user] + list(dialog[2:])
    tokens: List[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        tokens += tokenizer.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ", bos=True, eos=True)
    return tokens + tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)


def is_unsafe(dialog: Sequence[Message]) -> bool:
    """Whether a message contains one of the format's special tags."""
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def encode_dialogs(tokenizer: Tokenizer, dialogs: Sequence[Dialog]) -> Tuple[List[List[int]], List[bool]]:
    """Each dialog's tokens, and whether it is refused for containing the special tags."""
    if not isinstance(dialogs, (list, tuple)):
        raise TypeError(f"dialogs must be a list of dialogs, got {type(dialogs).__name__}")
    return [encode_dialog(tokenizer, dialog) for dialog in dialogs], [is_unsafe(dialog) for dialog in dialogs]
