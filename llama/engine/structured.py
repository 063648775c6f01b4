"""Structured output: rows whose tokens must spell JSON that follows a schema (``json_schema``) or any
JSON object (``json_object``), decoded under a mask of the tokens the grammar allows next.

The grammar library is llguidance: it refuses the JSON Schema keywords it does not implement (rather
than ignoring them), builds a row's matcher in well under a millisecond with no compilation step,
and bounds the work of building a grammar and of each mask by fuel (``LIMITS``), which is the time
limit. ``bench/structured.py`` measures it beside xgrammar on this project's vocabularies.

- ``Vocabulary`` is built once per tokenizer (``vocabulary_for``): every token's bytes, the special
  tokens (which never spell text), and the stop tokens, which end a row once its JSON is complete.
- ``Constraints`` is the engine's part: each schema becomes a grammar once (cached), each constrained
  row gets a matcher when admitted (``start``), a step asks for the rows' masks (``allowed``), and
  each token a row takes advances its matcher (``advance``). Rows without a constraint are allowed
  every token, so constrained and unconstrained rows share a batch.

The JSON is compact (no whitespace between tokens of JSON), as ``json.dumps(separators=(",", ":"))``.
"""

import functools
import json
import logging
import re
import weakref
from typing import Dict, Hashable, Iterator, List, Optional, Sequence, Tuple

import llguidance
import torch

from llama.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

LIMITS = (
    llguidance.LLParserLimits()
)  # llguidance's defaults: ~20 ms to build a grammar's lexer, ~15 ms per mask at most
COMPACT = {"whitespace_flexible": False}  # no whitespace between JSON tokens
ANY_OBJECT = {"type": "object"}  # json_object: any JSON object
CACHED_SCHEMAS = 256


class Vocabulary:
    """A tokenizer's vocabulary as llguidance reads it (``lltokenizer``), for ``vocab_size`` ids (a
    model's embedding may have more rows than the tokenizer has tokens: those never spell text)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        specials = set(special_ids(tokenizer)) | set(range(tokenizer.n_words, vocab_size))
        tokens = [b"" if i in specials else tokenizer.token_bytes(i) for i in range(vocab_size)]
        wrapper = llguidance.TokenizerWrapper(TokenizerFunctions(tokenizer, tokens, sorted(specials)))
        self.lltokenizer = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=list(tokenizer.stop_tokens))
        self.vocab_size = vocab_size
        self.grammar = functools.lru_cache(maxsize=CACHED_SCHEMAS)(self.compile)

    def compile(self, schema_text: str) -> llguidance.LLMatcher:
        """A fresh matcher of the grammar of ``schema_text`` (a JSON Schema, serialized), to copy for each row.

        Raises:
            ValueError: the schema is invalid or uses what the grammar cannot express, naming the part.
        """
        schema = json.loads(schema_text)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text, defaults=COMPACT)
        except ValueError as error:
            raise ValueError(f"the schema{where(schema, str(error))} cannot be used: {error}") from None
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0, limits=LIMITS)
        if matcher.is_error():
            error = matcher.get_error()
            raise ValueError(f"the schema{where(schema, error)} cannot be used: {error}")
        return matcher


class TokenizerFunctions:
    """What llguidance's ``TokenizerWrapper`` reads of a tokenizer."""

    def __init__(self, tokenizer: Tokenizer, tokens: List[bytes], special_token_ids: List[int]):
        self.tokenizer, self.tokens, self.special_token_ids = tokenizer, tokens, special_token_ids
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id

    def __call__(self, text) -> List[int]:
        return self.tokenizer.encode_text(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)


def special_ids(tokenizer: Tokenizer) -> List[int]:
    """The ids of the special tokens (BOS, EOS, Llama 3's headers...): they never spell JSON."""
    ids = {tokenizer.bos_id, tokenizer.eos_id, *tokenizer.stop_tokens}
    for text in tokenizer.special_token_texts():
        ids.update(tokenizer.encode_with_special_tokens(text))
    return [i for i in ids if i >= 0]


VOCABULARIES: "weakref.WeakKeyDictionary[Tokenizer, Dict[int, Vocabulary]]" = weakref.WeakKeyDictionary()


def vocabulary_for(tokenizer: Tokenizer, vocab_size: int) -> Vocabulary:
    """The tokenizer's ``Vocabulary``, built on first use."""
    sizes = VOCABULARIES.setdefault(tokenizer, {})
    if vocab_size not in sizes:
        sizes[vocab_size] = Vocabulary(tokenizer, vocab_size)
    return sizes[vocab_size]


def schema_of(json_schema: Optional[dict], json_object: bool) -> Optional[str]:
    """The serialized schema a row follows (the key of its grammar), or None if it is free."""
    if json_schema is not None:
        return json.dumps(json_schema)  # its keys in their order: the order the answer writes properties in
    return json.dumps(ANY_OBJECT) if json_object else None


def where(schema, error: str) -> str:
    """ " at <JSON pointer>" of the first place in ``schema`` that ``error`` names (a keyword or a
    value it quotes), or "" if none is found."""
    names = re.findall(r'"([^"]+)"', error) + re.findall(r": (\S+)$", error)
    for name in names:
        for pointer, node in walk(schema, ""):
            if isinstance(node, dict) and (name in node or name in map(str, node.values())):
                key = name if name in node else next(k for k, v in node.items() if str(v) == name)
                return f" at {pointer}/{key}"
    return ""


def walk(node, pointer: str) -> Iterator[Tuple[str, object]]:
    yield pointer or "#", node
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from walk(child, f"{pointer or '#'}/{key}")


class Constraints:
    """The constrained rows of an engine: a matcher per row, kept while the row waits preempted (see
    the module docstring). A row is any hashable key (the engine's ``Row``)."""

    def __init__(self, tokenizer: Optional[Tokenizer], vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.matchers: Dict[Hashable, llguidance.LLMatcher] = {}  # row -> its matcher
        self.executor = llguidance.LLExecutor()  # computes several rows' masks at once

    def check(self, json_schema: Optional[dict], json_object: bool) -> None:
        """Build (or find cached) the grammar of a request's schema.

        Raises:
            ValueError: no tokenizer, or the schema cannot be used (naming the part).
        """
        schema = schema_of(json_schema, json_object)
        if schema is None:
            return
        if self.tokenizer is None:
            raise ValueError("json_schema and json_object need an engine with a tokenizer")
        vocabulary_for(self.tokenizer, self.vocab_size).grammar(schema)

    def start(self, row: Hashable, json_schema: Optional[dict], json_object: bool) -> None:
        """The newly admitted ``row`` follows the schema (or nothing, if None)."""
        schema = schema_of(json_schema, json_object)
        if schema is not None:
            self.matchers[row] = vocabulary_for(self.tokenizer, self.vocab_size).grammar(schema).deep_copy()

    def end(self, row: Hashable) -> None:
        """The row ended."""
        self.matchers.pop(row, None)

    def allowed(self, rows: Sequence[Hashable]) -> Optional[Tuple[List[int], torch.Tensor]]:
        """(the indices of the constrained ones among ``rows``, the tokens each may take next (n,
        vocab) bool); None if none is constrained. A matcher that failed (it should not) allows only
        the stop tokens, which end its row."""
        constrained = [i for i, row in enumerate(rows) if row in self.matchers]
        if not constrained:
            return None
        import llguidance.torch as llguidance_torch  # here: its import compiles a kernel (2 s, 200 MB a process)

        bitmask = llguidance_torch.allocate_token_bitmask(len(constrained), self.vocab_size)  # (n, words) int32
        matchers = [(self.matchers[rows[index]], i) for i, index in enumerate(constrained)]
        llguidance_torch.fill_next_token_bitmask_par(
            self.executor, matchers, bitmask
        )  # the rows in parallel, the GIL released
        failed = []
        for matcher, i in matchers:
            if matcher.is_error():
                logger.warning("a row's grammar failed (%s); the row stops", matcher.get_error())
                failed.append(i)
        bits = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask[:, :, None] >> bits) & 1).bool().flatten(1)[:, : self.vocab_size]  # (n, vocab)
        for i in failed:
            allowed[i] = False
            allowed[i, list(self.tokenizer.stop_tokens)] = True
        return constrained, allowed

    def advance(self, row: Hashable, token: int) -> None:
        """The row took ``token``."""
        matcher = self.matchers.get(row)
        if matcher is not None and not matcher.is_stopped():
            matcher.consume_token(token)
