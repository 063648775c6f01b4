"""Structured output (``json_schema`` / ``json_object``): on the bundled model, which never writes JSON by
itself, every answer parses and validates against its schema (checked with the jsonschema package),
greedy or sampled, and rows with and without a grammar share a batch."""

import json
import random
import re

import jsonschema
import pytest
import torch

from conftest import BUNDLED
from llama import Llama
from llama.engine.structured import Constraints
from llama.options import GenerationOptions
from llama.tokenizer import Tokenizer

PROMPTS = ["import os\n", "def main():\n", "class Stack:\n"]
SCHEMAS = [  # bounded strings, numbers and arrays: the answer ends within the token budget
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": -5, "maximum": 5}},
            "required": ["ok"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 2,
    },
]


@pytest.fixture(scope="module")
def llama():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Llama.build(str(BUNDLED), str(BUNDLED / "tokenizer.model"), 256, 6, device="cpu", dtype="float32")
    torch.set_num_threads(threads)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "array"])
def test_every_answer_follows_the_schema_greedy_and_sampled(llama, schema):
    greedy = llama.text_completion(PROMPTS, temperature=0, max_gen_len=160, json_schema=schema)
    sampled = llama.text_completion(
        PROMPTS[:1], temperature=1.0, top_p=1.0, max_gen_len=160, json_schema=schema, num_return_sequences=6, seed=5
    )
    for answer in greedy + sampled:
        jsonschema.validate(json.loads(answer["generation"]), schema)
        assert not re.search(
            r"\s", re.sub(r'"(\\.|[^"\\])*"', '""', answer["generation"])
        )  # compact: no whitespace outside strings
    assert len({answer["generation"] for answer in sampled}) > 1


def test_json_object_answers_are_objects_and_chat_takes_a_schema(llama):
    dialog = [{"role": "user", "content": "hi"}]
    answer = llama.chat_completion([dialog], temperature=0, max_gen_len=120, json_object=True)[0]["generation"][
        "content"
    ]
    assert isinstance(json.loads(answer), dict)  # any object: its strings are unbounded, this one ends
    answer = llama.chat_completion([dialog], temperature=0, max_gen_len=160, json_schema=SCHEMAS[0])[0]["generation"][
        "content"
    ]
    jsonschema.validate(json.loads(answer), SCHEMAS[0])


def test_constrained_and_free_rows_share_a_batch_and_the_free_ones_decode_as_alone(llama):
    free = GenerationOptions(max_gen_len=30, temperature=0)
    alone = llama.text_completion(PROMPTS[1:], temperature=0, max_gen_len=30)
    engine = llama.engine
    constrained = engine.submit(
        llama.encode_prompts(PROMPTS[:1]), GenerationOptions(max_gen_len=160, temperature=0, json_schema=SCHEMAS[0])
    )
    unconstrained = engine.submit(llama.encode_prompts(PROMPTS[1:]), free)
    steps = 0
    while not (constrained.done and unconstrained.done):
        engine.step()
        steps += 1
    assert unconstrained.texts() == [answer["generation"] for answer in alone]
    jsonschema.validate(json.loads(constrained.texts()[0]), SCHEMAS[0])
    assert constrained.finish_reasons == ["stop"]


def test_a_schema_the_grammar_cannot_express_is_refused_naming_the_part(llama):
    with pytest.raises(ValueError, match=r"at #/properties/a/not cannot be used: Unimplemented keys: \[\"not\"\]"):
        llama.text_completion(["x"], json_schema={"type": "object", "properties": {"a": {"not": {"type": "string"}}}})
    with pytest.raises(ValueError, match="json_schema or json_object=True, not both"):
        llama.text_completion(["x"], json_schema={"type": "object"}, json_object=True)
    with pytest.raises(ValueError, match="speculate cannot be combined"):
        llama.text_completion(["x"], json_object=True, speculate="lookup")


def test_a_llama3_vocabulary_spells_valid_json_under_the_mask(llama3_tokenizer):
    """Llama 3's byte-level BPE with its 256 special tokens: a random walk over the allowed tokens
    spells JSON that validates, never a special token but the stop token that ends it."""
    tokenizer = Tokenizer(llama3_tokenizer[0])
    constraints = Constraints(tokenizer, tokenizer.n_words)
    rng, stops = random.Random(0), set(tokenizer.stop_tokens)
    for _walk in range(4):
        constraints.end(0)
        constraints.start(0, SCHEMAS[0], False)
        tokens = []
        while True:
            allowed = constraints.allowed([0])[1][0].nonzero()[:, 0].tolist()
            token = rng.choice(allowed)
            constraints.advance(0, token)
            if token in stops:
                break
            tokens.append(token)
            assert len(tokens) < 500
        assert all(token < tokenizer.n_words - 256 for token in tokens)  # no special token spells text
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMAS[0])
