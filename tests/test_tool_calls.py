"""Reading tool calls back from what a model wrote (``llama.chat.tool_calls.parse_calls``), and the JSON
Schema a forced call is decoded under."""

import jsonschema
import pytest

from llama.chat.format import Llama2ChatFormat
from llama.chat.tool_calls import call_schema, parse_calls

NAMES = ["weather", "add"]


@pytest.mark.parametrize(
    "text, calls",
    [
        (
            '<|python_tag|>{"type": "function", "name": "weather", "parameters": {"city": "Paris"}}',
            [("weather", {"city": "Paris"})],
        ),  # Meta's
        ('{"name": "add", "arguments": {"a": 1, "b": 2}}', [("add", {"a": 1, "b": 2})]),
        (
            '[{"name": "add", "parameters": {"a": 1}}, {"name": "weather", "parameters": {}}]',
            [("add", {"a": 1}), ("weather", {})],
        ),
        (
            '{"name": "add", "parameters": {"a": 1}}\n{"name": "add", "parameters": {"a": 2}}',
            [("add", {"a": 1}), ("add", {"a": 2})],
        ),
        ('{"name": "delete_everything", "parameters": {}}', None),  # not a function given
        ('The weather is {"name": "weather"}', None),  # words: the answer
        ('{"name": "add", "parameters": [1, 2]}', None),
        ('{"city": "Paris"}', None),
    ],
)
def test_calls_are_read_only_from_an_answer_that_is_nothing_but_calls(text, calls):
    assert parse_calls(text, NAMES) == calls


def test_a_forced_call_schema_takes_exactly_the_calls_of_the_given_tools():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "add",
                "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            },
        },
        {"type": "function", "function": {"name": "weather"}},
    ]
    schema = call_schema(Llama2ChatFormat.__new__(Llama2ChatFormat), tools)
    jsonschema.validate({"name": "add", "parameters": {"a": 1}}, schema)
    jsonschema.validate({"name": "weather", "parameters": {"anything": True}}, schema)
    for wrong in (
        {"name": "add", "parameters": {"a": "1"}},
        {"name": "other", "parameters": {}},
        {"name": "add"},
        {"name": "add", "parameters": {"a": 1}, "x": 1},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)
