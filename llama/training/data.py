"""Fine-tuning data: JSONL lines to token ids and labels, and the batches of each optimizer step.

Each line is one example, in one of three forms:

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: a dialog (an optional system message, then
  user and assistant alternating, ending with the assistant), tokenized exactly as ``chat_completion``
  sends it for the checkpoint (Llama 2's ``[INST]`` turns, Llama 3's headers, a folder's own chat
  template). Only each assistant reply and the token that ends it (``</s>``, ``<|eot_id|>``, the
  template's end of turn) are learnt.
- ``{"prompt": ..., "completion": ...}``: the prompt with BOS, as ``text_completion`` sends it, then the
  completion and EOS; the completion and EOS are learnt.
- ``{"text": ...}``: BOS, the text, EOS, all learnt.

Labels are aligned with the tokens (``llama.layers.loss``: position t predicts label t+1) and -100 where
nothing is learnt: the prompt, the system text, padding, and every example's first position.

A step takes the next ``batch_size`` examples of a shuffled order (a new permutation each epoch, from
the seed) and splits them over the ranks in order, so that the step's examples, and its loss, do not
depend on the number of processes. A rank's examples are cut into micro-batches, either padded to
their longest or packed (``--pack``) into rows of ``max_seq_len`` whose examples cannot see each other.
"""

import json
import logging
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

from llama.chat.format import ChatFormat
from llama.layers.loss import IGNORE_INDEX
from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


class Example(NamedTuple):
    tokens: List[int]
    labels: List[int]  # the token where it is learnt, else -100; labels[0] is always -100


class Batch(NamedTuple):
    """One forward pass: ``tokens`` and ``labels`` (rows, seqlen); for packed rows also each token's
    ``positions`` in its example, restarting at 0 with each (the model attends within an example only)."""

    tokens: torch.Tensor
    labels: torch.Tensor
    positions: Optional[torch.Tensor] = None

    @property
    def scored_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def learnt(tokens: List[int]) -> List[int]:
    return list(tokens)


def masked(tokens: List[int]) -> List[int]:
    return [IGNORE_INDEX] * len(tokens)


def check_messages(messages, where: str) -> list:
    """A training dialog: roles known, an optional system message, then user and assistant
    alternating, ending with an assistant reply."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {j} must be an object with a string 'content', got {message!r:.80}")
        if message.get("role") not in ROLES:
            raise ValueError(
                f"{where}: message {j} has an unknown role {message.get('role')!r}; roles are {', '.join(ROLES)}"
            )
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    expected = ["user" if j % 2 == 0 else "assistant" for j in range(len(turns))]
    if [m["role"] for m in turns] != expected:
        raise ValueError(
            f"{where}: after an optional system message, user and assistant must alternate starting with user, "
            f"got {[m['role'] for m in messages]}"
        )
    if not turns or turns[-1]["role"] != "assistant":
        raise ValueError(
            f"{where}: the dialog has no assistant reply to learn (it must end with the assistant's message)"
        )
    return messages


def encode_dialog(messages, chat_format: ChatFormat, where: str) -> Tuple[List[int], List[bool]]:
    """A training dialog (``check_messages``) as the tokens ``chat_completion`` sends for it and which of them
    are the assistant's (``ChatFormat.encode_finished``)."""
    messages = check_messages(messages, where)
    if chat_format.is_unsafe(messages):
        raise ValueError(
            f"{where}: a message contains one of the chat format's special tags {chat_format.special_tags}, "
            "which chat_completion refuses"
        )
    return chat_format.encode_finished(messages)


def prompt_completion(tokenizer: Tokenizer, prompt: str, completion: str) -> Example:
    """BOS and the prompt, encoded alone as ``text_completion`` sends it, then the completion encoded apart
    with EOS: the completion and EOS are learnt."""
    prompt_tokens = tokenizer.encode(prompt, bos=True, eos=False)
    completion_tokens = tokenizer.encode(completion, bos=False, eos=True)
    return Example(prompt_tokens + completion_tokens, masked(prompt_tokens) + learnt(completion_tokens))


def encode_example(record: object, tokenizer: Tokenizer, chat_format: ChatFormat, where: str) -> Example:
    """One JSONL record as tokens and labels (the module's docstring); ``where`` names it in errors."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    forms = {"messages": ("messages",), "prompt": ("prompt", "completion"), "text": ("text",)}
    form = next((name for name, keys in forms.items() if set(record) == set(keys)), None)
    if form is None:
        raise ValueError(
            f"{where}: expected the keys messages, or prompt and completion, or text; got {sorted(record)}"
        )
    if form == "messages":
        tokens, assistant = encode_dialog(record["messages"], chat_format, where)
        example = Example(tokens, [token if learn else IGNORE_INDEX for token, learn in zip(tokens, assistant)])
    else:
        for key in forms[form]:
            if not isinstance(record[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        if form == "prompt":
            example = prompt_completion(tokenizer, record["prompt"], record["completion"])
        else:
            tokens = tokenizer.encode(record["text"], bos=True, eos=True)
            example = Example(tokens, learnt(tokens))
    return Example(example.tokens, [IGNORE_INDEX] + example.labels[1:])


def json_records(path: str) -> Iterator[Tuple[str, object]]:
    """Each non-blank line of the JSONL file ``path`` as (where: "PATH, line N", its JSON value)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            text = line.rstrip("\n")  # with its newline, an error at the line's end is said at column 1 of the next
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                column = f"{error.colno}, the end of the line" if error.pos == len(text) else error.colno
                raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg} at column {column})") from None
            yield f"{path}, line {number}", record


def kept_within(items: list, lengths: List[int], path: str, max_seq_len: int, noun: str = "examples") -> list:
    """The ``items`` of ``path`` whose length (tokens) is at most ``max_seq_len``; the others are dropped and
    said with their count. An empty file, or one whose every item is too long, is an error."""
    if not items:
        raise ValueError(f"{path}: no {noun} (the file is empty)")
    kept = [item for item, length in zip(items, lengths) if length <= max_seq_len]
    if len(kept) < len(items):
        if not kept:
            raise ValueError(
                f"{path}: every one of its {len(items)} {noun} is longer than --max_seq_len {max_seq_len} tokens "
                f"(the longest has {max(lengths)}); raise --max_seq_len"
            )
        logger.warning(
            "%s: dropped %d of %d %s longer than --max_seq_len %d tokens (the longest has %d)",
            *(path, len(items) - len(kept), len(items), noun, max_seq_len, max(lengths)),
        )
    return kept


def read_examples(path: str, tokenizer: Tokenizer, chat_format: ChatFormat, max_seq_len: int) -> List[Example]:
    """Every line of the JSONL file ``path`` as an ``Example``; examples longer than ``max_seq_len``
    tokens are dropped, and said with their count."""
    examples = [encode_example(record, tokenizer, chat_format, where) for where, record in json_records(path)]
    kept = kept_within(examples, [len(example.tokens) for example in examples], path, max_seq_len)
    if not any(label != IGNORE_INDEX for example in kept for label in example.labels):
        raise ValueError(f"{path}: no example has a token to learn")
    return kept


def epoch_order(n_examples: int, epoch: int, seed: int) -> List[int]:
    """The examples' order in ``epoch``: a permutation drawn from ``seed`` and the epoch."""
    return torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def step_indices(n_examples: int, step: int, batch_size: int, seed: int) -> List[int]:
    """The examples of optimizer step ``step``: the next ``batch_size`` of the epochs' orders, one after the other."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n_examples)
        if offset == 0 or not indices:
            order = epoch_order(n_examples, epoch, seed)
        indices.append(order[offset])
    return indices


def rank_share(indices: Sequence[int], rank: int, world_size: int) -> List[int]:
    """Rank ``rank``'s consecutive share of a step's examples."""
    share = len(indices) // world_size
    return list(indices[rank * share : (rank + 1) * share])


def padded_batch(examples: Sequence[Example]) -> Batch:
    """Rows padded on the right to the longest (token 0, label -100)."""
    length = max(len(example.tokens) for example in examples)
    tokens = torch.zeros(len(examples), length, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        tokens[row, : len(example.tokens)] = torch.tensor(example.tokens)
        labels[row, : len(example.labels)] = torch.tensor(example.labels)
    return Batch(tokens, labels)


def packed_batch(examples: Sequence[Example], max_seq_len: int) -> Batch:
    """The examples, in order, packed into rows of ``max_seq_len`` (a new row when the next does not
    fit): positions restart at 0 with each example, and with the padding at a row's end."""
    rows: List[List[Example]] = [[]]
    for example in examples:
        if sum(len(e.tokens) for e in rows[-1]) + len(example.tokens) > max_seq_len:
            rows.append([])
        rows[-1].append(example)
    tokens = torch.zeros(len(rows), max_seq_len, dtype=torch.long)
    labels = torch.full((len(rows), max_seq_len), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(len(rows), max_seq_len, dtype=torch.long)
    for row, packed in enumerate(rows):
        start = 0
        for example in packed:
            end = start + len(example.tokens)
            tokens[row, start:end] = torch.tensor(example.tokens)
            labels[row, start:end] = torch.tensor(example.labels)
            positions[row, start:end] = torch.arange(len(example.tokens))
            start = end
        positions[row, start:] = torch.arange(max_seq_len - start)
    return Batch(tokens, labels, positions)


def micro_batches(examples: Sequence[Example], micro_batch_size: int, pack: bool, max_seq_len: int) -> List[Batch]:
    """A rank's examples of one step as batches of ``micro_batch_size`` examples each."""
    groups = [examples[i : i + micro_batch_size] for i in range(0, len(examples), micro_batch_size)]
    return [packed_batch(group, max_seq_len) if pack else padded_batch(group) for group in groups]


def evaluation_batches(
    examples: Sequence[Example], micro_batch_size: int, pack: bool, max_seq_len: int, rank: int, world_size: int
) -> List[Batch]:
    """Rank ``rank``'s share of the validation micro-batches. Every rank makes the same number of
    forward passes (sharded layers gather their weights in each): a rank short of one scores an
    example with nothing to learn."""
    groups = [examples[i : i + micro_batch_size] for i in range(0, len(examples), micro_batch_size)]
    groups += [[Example([0, 0], masked([0, 0]))]] * (-len(groups) % world_size)
    return [packed_batch(group, max_seq_len) if pack else padded_batch(group) for group in groups[rank::world_size]]
