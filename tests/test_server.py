"""python -m llama.server, as a client sees it: a real server on 127.0.0.1 serving the bundled model,
driven by the official openai client, its answers compared with the Python API's on the same model.

Every server runs in its own process group, is waited on with timeouts, and is killed at teardown.
"""

import http.client
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

from conftest import BUNDLED, SMALL_PARAMS
from llama import Llama
from server_worker import PG_TIMEOUT_SECONDS

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
MAX_SEQ_LEN, MAX_BATCH_SIZE = 512, 4  # room for two tools described in JSON
MAX_QUEUE = 64  # the server's default --max_queue, in rows
SERVER_ARGS = [
    "--max_seq_len",
    str(MAX_SEQ_LEN),
    "--max_batch_size",
    str(MAX_BATCH_SIZE),
    "--port",
    "0",
    "--dtype",
    "float32",
    "--device",
    "cpu",
]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the server and this process share the machine: on 2 busy cores, torch's
# thread pools contending with each other make a step 10x slower than one thread each
START_TIMEOUT = 60  # seconds for a server to load and listen
PROMPTS = ["import os\n", 'def remove_non_ascii(s: str) -> str:\n    """', "class Stack:\n    def __init__(self):\n"]
DIALOG = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "How do I read a file?"}]


class Server:
    """A server process: its port (read from its log), its log, and a clean stop."""

    def __init__(
        self, command, log_path: Path, env=None, name: str = "tiny-stdlib", start_timeout: float = START_TIMEOUT
    ):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **ONE_THREAD, **(env or {})},
            )
        self.port = self.wait_for_log(f"serving {name} on http://127.0.0.1:", start_timeout)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float) -> str:
        """The rest of the first log line containing ``text``, waiting for it up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if text in line:
                    return line.split(text, 1)[1].strip()
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} in the server's log within {timeout} s:\n{self.log()}")

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def kill(self) -> None:
        """SIGTERM the whole process group, SIGKILL whatever is left after 20 s."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = Server(
        [sys.executable, "-m", "llama.server", "--api_key", API_KEY] + SERVER_ARGS,
        tmp_path_factory.mktemp("server") / "log",
    )
    yield running
    running.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key=API_KEY, timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def llama():
    """The bundled model in this process, the reference for the server's answers (on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Llama.build(
        str(BUNDLED), str(BUNDLED / "tokenizer.model"), MAX_SEQ_LEN, MAX_BATCH_SIZE, device="cpu", dtype="float32"
    )
    torch.set_num_threads(threads)


def raw_request(server, method: str, path: str, body: bytes = b"", headers=None, key: str = API_KEY) -> tuple:
    """(status, parsed JSON body) of one request sent by hand (for what the openai client won't send)."""
    status, _, data = raw_answer(server, method, path, body, headers, key)
    return status, json.loads(data)


def raw_answer(server, method: str, path: str, body: bytes = b"", headers=None, key: str = API_KEY) -> tuple:
    """(status, headers, body bytes) of one request sent by hand."""
    connection = http.client.HTTPConnection("127.0.0.1", int(server.port), timeout=30)
    json_body = {"Content-Type": "application/json"} if method == "POST" else {}
    connection.request(
        method, path, body=body, headers={"Authorization": f"Bearer {key}", **json_body, **(headers or {})}
    )
    response = connection.getresponse()
    answer = response.status, response.headers, response.read()  # headers: case-insensitive
    connection.close()
    return answer


def open_stream(server, body: dict, key: str = API_KEY) -> http.client.HTTPResponse:
    """A streamed completion whose first chunk has come: the request holds a slot until the stream
    ends or ``close()`` hangs up. (With "Connection: close" the response owns the socket.)"""
    connection = http.client.HTTPConnection("127.0.0.1", int(server.port), timeout=60)
    body = {"temperature": 0, **body, "stream": True}
    connection.request(
        "POST",
        "/v1/completions",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200, response.read()
    response.first_line = response.readline()
    assert response.first_line.startswith(b"data: {")
    return response


def stream_text(response: http.client.HTTPResponse) -> str:
    """A one-choice completion stream's whole text, its first chunk included."""
    text = ""
    for line in [response.first_line, *response]:
        if line.startswith(b"data: {"):
            text += "".join(choice["text"] for choice in json.loads(line[6:])["choices"])
    response.close()
    return text


def metrics(server) -> dict:
    """GET /metrics as {sample name with labels: value}, the text format checked line by line."""
    status, headers, data = raw_answer(server, "GET", "/metrics", key="")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in data.decode().splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP llama_", "# TYPE llama_")), line
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def test_health_and_models(server, client):
    assert raw_request(server, "GET", "/health", headers={"Authorization": ""}) == (200, {"status": "ok"})
    assert [model.id for model in client.models.list().data] == ["tiny-stdlib"]
    status, listed = raw_request(server, "GET", "/v1/models")
    assert status == 200 and listed["data"] == [
        {
            "id": "tiny-stdlib",
            "object": "model",
            "created": 0,
            "owned_by": "llama",
            "max_model_len": MAX_SEQ_LEN,
            "dtype": "float32",
            "quantization": None,
            "kv_cache_dtype": "float32",
            "adapter": None,
        }
    ]


def test_the_openapi_page_declares_the_request_bodies(server):
    status, headers, page = raw_answer(server, "GET", "/docs", key="")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    status, spec = raw_request(server, "GET", "/openapi.json", key="")
    schemas = spec["components"]["schemas"]
    assert {"CompletionRequest", "ChatRequest"} <= set(schemas) and "response_format" in schemas["ChatRequest"][
        "properties"
    ]
    assert set(spec["paths"]) >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"}


def test_greedy_completions_equal_text_completion(client, llama):
    answer = client.completions.create(model="tiny-stdlib", prompt=PROMPTS, max_tokens=24, temperature=0)
    expected = llama.text_completion(PROMPTS, temperature=0, max_gen_len=24)
    assert [choice.text for choice in answer.choices] == [e["generation"] for e in expected]
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    prompt_tokens = sum(len(llama.tokenizer.encode(p, bos=True, eos=False)) for p in PROMPTS)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, 3 * 24)
    assert [choice.finish_reason for choice in answer.choices] == ["length"] * 3


def test_greedy_chat_equals_chat_completion(client, llama):
    answer = client.chat.completions.create(model="tiny-stdlib", messages=DIALOG, max_tokens=20, temperature=0)
    expected = llama.chat_completion([DIALOG], temperature=0, max_gen_len=20)[0]["generation"]
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected["content"]
    assert answer.usage.prompt_tokens == len(llama.encode_dialog(DIALOG))


def test_stop_string_ends_the_text_before_it(client, llama):
    answer = client.completions.create(
        model="tiny-stdlib", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=["sys"]
    )
    expected = llama.text_completion(PROMPTS[:1], temperature=0, max_gen_len=24, stop_strings=["sys"])[0]["generation"]
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (expected, "stop")
    assert answer.choices[0].text == "import "  # the greedy answer is "import sys\nimport sys..."


def test_echo_prepends_the_prompt(client):
    plain = client.completions.create(model="tiny-stdlib", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    echoed = client.completions.create(model="tiny-stdlib", prompt=PROMPTS[1], max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPTS[1] + plain.choices[0].text


def test_streamed_completion_deltas_join_to_the_whole(client):
    whole = client.completions.create(model="tiny-stdlib", prompt=PROMPTS, max_tokens=30, temperature=0)
    texts, reasons = ["", "", ""], [None] * 3
    for chunk in client.completions.create(
        model="tiny-stdlib", prompt=PROMPTS, max_tokens=30, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [choice.text for choice in whole.choices]
    assert reasons == ["length"] * 3


def test_streamed_chat_deltas_join_to_the_whole_and_count_usage(client):
    whole = client.chat.completions.create(model="tiny-stdlib", messages=DIALOG, max_tokens=25, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny-stdlib",
            messages=DIALOG,
            max_tokens=25,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert usage.total_tokens == whole.usage.total_tokens
    # the same dialog again: every full block but the one of its last prompt token comes from the prefix cache
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1) // 16 * 16 > 0


def test_stream_ends_with_done(server):
    connection = http.client.HTTPConnection("127.0.0.1", int(server.port), timeout=30)
    body = json.dumps({"prompt": "x", "max_tokens": 3, "stream": True})
    connection.request(
        "POST",
        "/v1/completions",
        body=body,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.getheader("Content-Type").startswith("text/event-stream")
    events = [e for e in response.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_completion_logprobs_are_the_python_apis(client, llama):
    answer = client.completions.create(model="tiny-stdlib", prompt=PROMPTS[0], max_tokens=10, temperature=0, logprobs=3)
    expected = llama.text_completion(PROMPTS[:1], temperature=0, max_gen_len=10, logprobs=True, top_logprobs=3)[0]
    logprobs = answer.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx(expected["logprobs"], abs=1e-5)
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(10)]
    for token, logprob, alternatives in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(alternatives) == 3
        assert max(alternatives.values()) == pytest.approx(logprob, abs=1e-5)  # greedy: the token is the likeliest
        assert max(alternatives, key=alternatives.get) == token


def test_chat_logprobs_with_top_logprobs(client, llama):
    answer = client.chat.completions.create(
        model="tiny-stdlib", messages=DIALOG, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2
    )
    expected = llama.chat_completion([DIALOG], temperature=0, max_gen_len=8, logprobs=True)[0]
    content = answer.choices[0].logprobs.content
    assert [entry.logprob for entry in content] == pytest.approx(expected["logprobs"], abs=1e-5)
    assert b"".join(bytes(entry.bytes) for entry in content).decode() == answer.choices[0].message.content
    assert all(
        len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        for entry in content
    )


def test_streamed_logprobs_equal_the_whole(client):
    whole = client.completions.create(model="tiny-stdlib", prompt=PROMPTS[2], max_tokens=12, temperature=0, logprobs=1)
    streamed = []
    for chunk in client.completions.create(
        model="tiny-stdlib", prompt=PROMPTS[2], max_tokens=12, temperature=0, logprobs=1, stream=True
    ):
        if chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == whole.choices[0].logprobs.token_logprobs


def test_echoed_prompt_logprobs_are_the_python_apis_and_its_alternatives_a_plain_forwards(client, llama):
    """``echo`` with ``logprobs``: OpenAI's legacy logprobs object over the prompt and the answer (the first
    token null: nothing predicts it), whole and streamed alike; with ``max_tokens`` 0 the prompt alone."""
    prompt = llama.tokenizer.encode(PROMPTS[1], bos=True, eos=False)
    answer = client.completions.create(
        model="tiny-stdlib", prompt=PROMPTS[1], max_tokens=4, temperature=0, echo=True, logprobs=3
    )
    expected = llama.text_completion(PROMPTS[1:2], temperature=0, max_gen_len=4, logprobs=True, echo=True)[0]
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(prompt) + 4 and answer.choices[0].text == expected["generation"]  # echoed
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(expected["logprobs"][1:], abs=1e-5)
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    with torch.no_grad():
        forward = torch.log_softmax(llama.model(torch.tensor([prompt]))[0], dim=-1)  # position j predicts j + 1
    for j, token in enumerate(prompt[1:], 1):
        top = forward[j - 1].topk(3)
        alternatives = logprobs.top_logprobs[j]  # the 3 likeliest and the token itself, as OpenAI and vLLM give them
        want = {piece(llama, i): v for i, v in zip(top.indices.tolist(), top.values.tolist())}
        want[piece(llama, token)] = forward[j - 1, token].item()
        assert alternatives == pytest.approx(want, abs=1e-5)
    streamed = [
        chunk.choices[0].logprobs
        for chunk in client.completions.create(
            model="tiny-stdlib", prompt=PROMPTS[1], max_tokens=4, temperature=0, echo=True, logprobs=3, stream=True
        )
        if chunk.choices[0].logprobs
    ]
    for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [value for chunk in streamed for value in getattr(chunk, field)] == getattr(logprobs, field)
    scored = client.completions.create(model="tiny-stdlib", prompt=PROMPTS[1], max_tokens=0, echo=True, logprobs=3)
    choice = scored.choices[0]
    assert (choice.text, choice.finish_reason, scored.usage.completion_tokens) == (PROMPTS[1], "length", 0)
    assert choice.logprobs.token_logprobs == pytest.approx(logprobs.token_logprobs[: len(prompt)], abs=1e-6)


def piece(llama, token: int) -> str:
    return llama.tokenizer.token_bytes(token).decode("utf-8", errors="replace")


def test_a_request_of_more_prompts_than_slots_answers_every_choice_as_each_prompt_alone(client, llama):
    """3 x max_batch_size prompts in one request: their rows go in as slots free; every choice in order
    equals its prompt's greedy completion, whole, and streamed with each chunk's index."""
    prompts = [f"{PROMPTS[i % 3]}{'x' * (i // 3)}" for i in range(3 * MAX_BATCH_SIZE)]
    expected = []
    for start in range(0, len(prompts), MAX_BATCH_SIZE):
        batch = llama.text_completion(prompts[start : start + MAX_BATCH_SIZE], temperature=0, max_gen_len=8)
        expected += [result["generation"] for result in batch]
    answer = client.completions.create(model="tiny-stdlib", prompt=prompts, max_tokens=8, temperature=0)
    assert [choice.index for choice in answer.choices] == list(range(len(prompts)))
    assert [choice.text for choice in answer.choices] == expected
    texts, reasons = [""] * len(prompts), [None] * len(prompts)
    for chunk in client.completions.create(
        model="tiny-stdlib", prompt=prompts, max_tokens=8, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == expected and None not in reasons


def test_a_request_whose_rows_would_wait_beyond_max_queue_gets_503(server):
    """--max_queue counts rows: while every slot decodes, a request of max_queue + 1 rows is refused with
    the busy error; once the slots free, its rows fit the slots and the queue and it is answered."""
    running = open_stream(server, {"prompt": ["x"] * MAX_BATCH_SIZE, "max_tokens": 300, "logit_bias": {"2": -100}})
    wait_until(lambda: metrics(server)["llama_running_slots"] == MAX_BATCH_SIZE)
    body = json.dumps({"prompt": "x", "n": MAX_QUEUE + 1, "max_tokens": 1}).encode()
    status, answer = raw_request(server, "POST", "/v1/completions", body)
    assert status == 503 and answer["error"]["type"] == "server_error" and "--max_queue" in answer["error"]["message"]
    running.close()
    wait_until(lambda: metrics(server)["llama_running_slots"] == 0)
    status, answer = raw_request(server, "POST", "/v1/completions", body)
    assert status == 200 and len(answer["choices"]) == MAX_QUEUE + 1


def test_n_seeded_samples_equal_the_python_apis(client, llama):
    answer = client.completions.create(
        model="tiny-stdlib", prompt=PROMPTS[1], max_tokens=16, temperature=1.0, top_p=1.0, n=3, seed=7
    )
    expected = llama.text_completion(
        PROMPTS[1:2], temperature=1.0, top_p=1.0, max_gen_len=16, num_return_sequences=3, seed=7
    )
    assert [choice.text for choice in answer.choices] == [e["generation"] for e in expected]
    assert len({choice.text for choice in answer.choices}) > 1  # three samples, not one repeated


BAD_REQUESTS = [  # (path, body, the field the error names)
    ("/v1/completions", {"max_tokens": 4}, "prompt"),
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "4"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": MAX_BATCH_SIZE + MAX_QUEUE + 1}, "n"),  # more than slots and queue
    ("/v1/completions", {"prompt": ["x", "y"], "n": (MAX_BATCH_SIZE + MAX_QUEUE) // 2 + 1}, "n"),
    ("/v1/completions", {"prompt": ["x"] * (MAX_BATCH_SIZE + MAX_QUEUE + 1)}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0, "logprobs": 1}, "max_tokens"),  # 0 needs echo
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x " * MAX_SEQ_LEN}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_SEQ_LEN}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 2.5}, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": "0"}, "presence_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"4096": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"13": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": [13]}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, "top_k"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "user": 5}, "user"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "xml"}},
        "response_format",
    ),
    (
        "/v1/completions",
        {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        "response_format",
    ),
    (
        "/v1/completions",
        {
            "prompt": "x",
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
        },
        "response_format",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0]",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0]"),
    ("/v1/chat/completions", {"max_tokens": 4}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        "messages",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "[INST] hi [/INST]"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
        "tool_choice",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "a b"}}]},
        "tools",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": "1"}]},
        "messages",
    ),
]


@pytest.mark.parametrize(
    "path, body, param",
    BAD_REQUESTS,
    ids=[f"{p.split('/')[-1]}-{param}-{i}" for i, (p, _, param) in enumerate(BAD_REQUESTS)],
)
def test_bad_request_gets_400_naming_the_field(server, path, body, param):
    status, answer = raw_request(server, "POST", path, json.dumps({"model": "tiny-stdlib", **body}).encode())
    assert status == 400
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["message"]


def test_another_model_or_an_unknown_route_gets_404(server):
    status, answer = raw_request(server, "POST", "/v1/completions", b'{"model": "llama-2-70b", "prompt": "x"}')
    assert (status, answer["error"]["param"]) == (404, "model") and "tiny-stdlib" in answer["error"]["message"]
    status, answer = raw_request(server, "POST", "/v1/embeddings", b'{"input": "x"}')
    assert status == 404 and "/v1/chat/completions" in answer["error"]["message"]


def test_malformed_json_gets_400(server):
    status, answer = raw_request(server, "POST", "/v1/completions", b'{"prompt": "x",')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]


def test_body_over_the_limit_is_refused_with_413_before_it_is_sent(server):
    connection = socket.create_connection(("127.0.0.1", int(server.port)), timeout=30)
    connection.sendall(  # the headers announce 2 MiB; the body never comes, the answer does
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {2 << 20}\r\n\r\n".encode()
    )
    response = b""
    while chunk := connection.recv(4096):
        response += chunk
    connection.close()
    head, body = response.split(b"\r\n\r\n", 1)
    limit = (1 << 20) + MAX_BATCH_SIZE * MAX_SEQ_LEN * len("4095, ")  # 1 MiB, and a batch of whole-context ids
    assert head.startswith(b"HTTP/1.1 413") and f"limit is {limit}" in json.loads(body)["error"]["message"]


def test_the_body_limit_follows_the_context_a_batch_of_whole_context_token_ids_fits(server, llama):
    from llama.model import ModelArgs
    from llama.server.app import body_limit

    prompts = [[4095] * MAX_SEQ_LEN] * MAX_BATCH_SIZE  # the largest id, at every position of every slot
    body = json.dumps({"prompt": prompts, "max_tokens": 0, "echo": True}).encode()
    status, answer = raw_request(server, "POST", "/v1/completions", body)
    assert (
        status == 200 and [choice["text"] for choice in answer["choices"]] == [llama.tokenizer.decode(prompts[0])] * 4
    )
    llama3_8b = ModelArgs(max_seq_len=131072, max_batch_size=8, vocab_size=128256)
    whole = {"prompt": [[128255] * 131072] * 8, "max_tokens": 0, "echo": True, "logprobs": 1}
    assert len(json.dumps(whole)) + 1000 <= body_limit(llama3_8b)


def test_a_body_not_sent_as_json_gets_415(server):
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": ""}):
        status, answer = raw_request(server, "POST", "/v1/completions", b'{"prompt": "x"}', headers)
        assert status == 415 and "Content-Type: application/json" in answer["error"]["message"]


def test_a_chunked_body_is_read(server):
    connection = http.client.HTTPConnection("127.0.0.1", int(server.port), timeout=30)
    parts = iter([b'{"prompt": "import os\\n", ', b'"max_tokens": 3, "temperature": 0}'])
    connection.request(
        "POST",
        "/v1/completions",
        body=parts,
        encode_chunked=True,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read())["usage"]["completion_tokens"] == 3
    connection.close()


def test_model_may_be_left_out_and_means_the_served_one(server, llama):
    status, answer = raw_request(
        server, "POST", "/v1/completions", b'{"prompt": "import os\\n", "max_tokens": 6, "temperature": 0}'
    )
    assert (status, answer["model"]) == (200, "tiny-stdlib")
    assert (
        answer["choices"][0]["text"]
        == llama.text_completion(["import os\n"], temperature=0, max_gen_len=6)[0]["generation"]
    )


def test_prompts_as_token_ids_are_decoded_from_as_given(client, llama):
    """OpenAI's token-id prompts: a list of ids, or a list of such lists (no BOS is added)."""
    ids = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS[:2]]
    expected = [llama.tokenizer.decode(tokens) for tokens in llama.generate(ids, max_gen_len=8, temperature=0)[0]]
    one = client.completions.create(model="tiny-stdlib", prompt=ids[0], max_tokens=8, temperature=0)
    both = client.completions.create(model="tiny-stdlib", prompt=ids, max_tokens=8, temperature=0)
    assert [one.choices[0].text] + [choice.text for choice in both.choices] == expected[:1] + expected
    assert both.usage.prompt_tokens == sum(map(len, ids))


def test_a_bad_port_or_one_in_use_is_refused_before_the_model_loads(server, monkeypatch):
    from llama.server.__main__ import main

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(Llama, "from_options", load)
    with pytest.raises(
        ValueError, match=r"^--port must be an integer in \[0, 65535\] \(0 picks a free one\), got 99999$"
    ):
        main(["--port", "99999", "--traceback"])
    with pytest.raises(ValueError, match=f"^--port {server.port}: 127.0.0.1:{server.port} is already in use"):
        main(["--port", str(server.port), "--traceback"])


def test_openai_client_sees_bad_request_error(client):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny-stdlib", prompt="x", top_p=2.0)


def test_missing_or_wrong_api_key_gets_401(server):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        status, answer = raw_request(server, "POST", "/v1/completions", b'{"prompt": "x"}', headers)
        assert status == 401 and answer["error"]["type"] == "authentication_error"


def test_a_refused_request_closes_its_connection_so_its_unread_body_is_not_read_as_a_request(server):
    connection = http.client.HTTPConnection("127.0.0.1", int(server.port), timeout=30)
    connection.request("POST", "/v1/completions", body=b'{"prompt": "x"}', headers={"Authorization": "Bearer wrong"})
    response = connection.getresponse()
    response.read()
    assert (response.status, response.getheader("Connection")) == (401, "close")
    connection.close()


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def test_json_schema_answers_validate_on_both_routes_whole_or_streamed(client, llama):
    expected = llama.chat_completion([DIALOG], temperature=0, max_gen_len=90, json_schema=PERSON)[0]["generation"][
        "content"
    ]
    chat = client.chat.completions.create(
        model="tiny-stdlib", messages=DIALOG, max_tokens=90, temperature=0, response_format=PERSON_FORMAT
    )
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (expected, "stop")
    jsonschema.validate(json.loads(expected), PERSON)
    streamed = client.chat.completions.create(
        model="tiny-stdlib", messages=DIALOG, max_tokens=90, temperature=0, response_format=PERSON_FORMAT, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == expected
    sampled = client.completions.create(
        model="tiny-stdlib",
        prompt=PROMPTS[0],
        max_tokens=90,
        temperature=1.0,
        n=3,
        seed=2,
        extra_body={"response_format": PERSON_FORMAT},
    )
    for choice in sampled.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), PERSON)


def test_json_object_answer_is_an_object_and_a_bad_schema_names_its_part(server, client):
    answer = client.chat.completions.create(
        model="tiny-stdlib",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=90,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    bad = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"not": {}}}}},
    }
    status, answer = raw_request(
        server, "POST", "/v1/chat/completions", json.dumps({"messages": DIALOG, "response_format": bad}).encode()
    )
    assert (status, answer["error"]["param"]) == (400, "response_format")
    assert "#/properties/a/not" in answer["error"]["message"] and "Unimplemented" in answer["error"]["message"]


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 99},
                "b": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
QUESTION = [{"role": "user", "content": "Is it warm in Paris?"}]


def test_forced_tool_calls_are_valid_calls_of_their_tool(client):
    """The bundled model never saw tools; "required" and a named function still give valid calls
    (greedy and sampled), with finish reason "tool_calls"."""
    tools = {"weather": WEATHER, "add": ADD}
    answers = [
        client.chat.completions.create(
            model="tiny-stdlib",
            messages=QUESTION,
            tools=[WEATHER, ADD],
            tool_choice="required",
            max_tokens=60,
            temperature=0,
        )
    ]
    answers.append(
        client.chat.completions.create(
            model="tiny-stdlib",
            messages=QUESTION,
            tools=[WEATHER, ADD],
            max_tokens=60,
            temperature=1.0,
            n=3,
            seed=4,
            tool_choice={"type": "function", "function": {"name": "weather"}},
        )
    )
    choices = [choice for answer in answers for choice in answer.choices]
    for choice in choices:
        (call,) = choice.message.tool_calls
        assert (choice.finish_reason, choice.message.content, call.type) == ("tool_calls", None, "function")
        jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name]["function"]["parameters"])
    assert [call.function.name for choice in choices[1:] for call in choice.message.tool_calls] == ["weather"] * 3
    assert len({choice.message.tool_calls[0].id for choice in choices}) == 4


def test_a_streamed_call_comes_as_delta_tool_calls_and_its_result_goes_back_as_a_tool_message(client, llama):
    chunks = list(
        client.chat.completions.create(
            model="tiny-stdlib",
            messages=QUESTION,
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    (call,) = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or ()]
    assert (call.index, call.function.name, chunks[-1].choices[0].finish_reason) == (0, "weather", "tool_calls")
    whole = client.chat.completions.create(
        model="tiny-stdlib", messages=QUESTION, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0
    )
    assert whole.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    messages = QUESTION + [
        whole.choices[0].message,
        {"role": "tool", "tool_call_id": whole.choices[0].message.tool_calls[0].id, "content": "22 C"},
    ]
    answer = client.chat.completions.create(
        model="tiny-stdlib", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=8, temperature=0
    )
    arguments = json.loads(call.function.arguments)
    # the documented JSON convention of a format without tool calls (Llama 2's); "none": no functions described
    convention = [
        QUESTION[0],
        {"role": "assistant", "content": json.dumps({"name": "weather", "parameters": arguments})},
        {"role": "user", "content": "weather returned: 22 C"},
    ]
    assert (
        answer.usage.prompt_tokens == len(llama.encode_dialog(convention))
        and answer.choices[0].finish_reason == "length"
    )


def test_auto_reads_calls_only_from_an_answer_that_is_one(client):
    answer = client.chat.completions.create(
        model="tiny-stdlib", messages=QUESTION, tools=[WEATHER], max_tokens=12, temperature=0
    )
    assert (
        answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    )  # this model answers in words


def test_concurrent_clients_get_their_own_greedy_answers(client, llama):
    prompts = PROMPTS + ["import sys\n", "def main():\n", "x = 1\n", "for i in range(10):\n", "try:\n"]
    answers = [None] * len(prompts)

    def ask(i):
        answers[i] = (
            client.completions.create(model="tiny-stdlib", prompt=prompts[i], max_tokens=12 + i, temperature=0)
            .choices[0]
            .text
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == [
        llama.text_completion([p], temperature=0, max_gen_len=12 + i)[0]["generation"] for i, p in enumerate(prompts)
    ]


def test_requests_with_different_settings_share_the_batch_and_get_their_alone_answers(server, llama):
    """A greedy row and a seeded sampled row with penalties decode side by side (both hold a slot at
    once, /metrics shows), each giving what it gives alone."""
    no_eos = {llama.tokenizer.eos_id: -100.0}
    greedy = {"prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0, "logit_bias": no_eos}
    sampled = {
        "prompt": PROMPTS[2],
        "max_tokens": 40,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 40,
        "presence_penalty": 0.5,
        "seed": 3,
    }
    streams = [open_stream(server, greedy), open_stream(server, sampled)]
    assert metrics(server)["llama_running_slots"] == 2
    texts = [stream_text(stream) for stream in streams]
    assert texts == [
        llama.text_completion([body.pop("prompt")], max_gen_len=body.pop("max_tokens"), **body)[0]["generation"]
        for body in (greedy, sampled)
    ]


def test_a_short_request_finishes_while_a_long_one_runs(server, client):
    long = open_stream(server, {"prompt": PROMPTS[1], "max_tokens": 100, "logit_bias": {"2": -100}})
    short = client.completions.create(
        model="tiny-stdlib", prompt="x", max_tokens=4, temperature=0, logit_bias={"2": -100}
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 4
    assert metrics(server)["llama_running_slots"] == 1  # the long one still decodes
    long.close()


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_client_hanging_up_frees_its_slot(server, client, stream):
    hang_ups = server.log().count("the client hung up")
    connection = socket.create_connection(("127.0.0.1", int(server.port)), timeout=30)
    body = json.dumps(
        {"prompt": "import os\n", "max_tokens": 120, "temperature": 0, "stream": stream, "logit_bias": {"2": -100}}
    ).encode()
    connection.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + API_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    if stream:
        received = b""
        while b"data: " not in received:  # the headers, then the first chunk
            received += connection.recv(4096)
    else:
        wait_until(lambda: metrics(server)["llama_running_slots"] == 1)
    connection.close()
    wait_until(lambda: server.log().count("the client hung up") > hang_ups)
    tokens_decoded = int(server.log().rsplit("the client hung up; rows cancelled after", 1)[1].split()[0])
    assert tokens_decoded < 120
    wait_until(lambda: metrics(server)["llama_running_slots"] == 0)
    after = client.completions.create(model="tiny-stdlib", prompt="x", max_tokens=2, temperature=0)
    assert after.choices[0].finish_reason == "length"


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_metrics_count_requests_tokens_and_time_to_first_token(server, client):
    before = metrics(server)
    answer = client.completions.create(model="tiny-stdlib", prompt=PROMPTS[0], max_tokens=5, temperature=0)
    raw_request(server, "POST", "/v1/completions", b'{"prompt": "x", "top_p": 7}')
    after = metrics(server)
    # labels in prometheus_client's order
    requests = 'llama_requests_total{code="%d",endpoint="/v1/completions",method="POST"}'
    assert after[requests % 200] - before.get(requests % 200, 0) == 1
    assert after[requests % 400] - before.get(requests % 400, 0) == 1
    assert (
        after["llama_generation_tokens_total"] - before["llama_generation_tokens_total"]
        == answer.usage.completion_tokens
        == 5
    )
    assert after["llama_prompt_tokens_total"] - before["llama_prompt_tokens_total"] == answer.usage.prompt_tokens
    assert (after["llama_slots"], after["llama_queue_length"], after["llama_running_slots"]) == (MAX_BATCH_SIZE, 0, 0)
    ttft = "llama_time_to_first_token_seconds"
    assert after[f"{ttft}_count"] - before[f"{ttft}_count"] == 1
    buckets = [value for name, value in after.items() if name.startswith(f"{ttft}_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == after[f"{ttft}_count"]
    assert 0 < after[f"{ttft}_sum"] - before[f"{ttft}_sum"] < 30


def test_a_repeated_prompt_reports_its_cached_tokens_and_metrics_the_pool_and_hit_rate(server, client):
    prompt = PROMPTS[1] * 4
    first, second = (
        client.completions.create(model="tiny-stdlib", prompt=prompt, max_tokens=2, temperature=0) for _ in range(2)
    )
    n = second.usage.prompt_tokens
    assert (
        second.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    )  # whole blocks, its last token computed
    assert second.choices[0].text == first.choices[0].text
    pool = metrics(server)
    assert pool["llama_prefix_cache_hit_tokens_total"] >= second.usage.prompt_tokens_details.cached_tokens
    assert 0 < pool["llama_prefix_cache_hit_rate"] <= 1 and pool["llama_kv_cache_blocks_used"] == 0
    # the blocks and the scratch block, 16 tokens each: the bundled model's 4 layers x 6 heads x 32 float32 values,
    # keys and values
    assert pool["llama_kv_cache_bytes"] == (pool["llama_kv_cache_blocks"] + 1) * 16 * 4 * 2 * 6 * 32 * 4


def test_what_common_clients_send_is_accepted(client, llama):
    """The fields OpenAI clients and front-ends send by default, at values that change nothing: a
    developer message is the system message, text parts are joined by newlines."""
    messages = [
        {"role": "developer", "content": "Answer in Python."},
        {"role": "user", "content": [{"type": "text", "text": "How do I"}, {"type": "text", "text": "read a file?"}]},
    ]
    answer = client.chat.completions.create(
        model="tiny-stdlib",
        messages=messages,
        max_tokens=12,
        temperature=0,
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        response_format={"type": "text"},
        user="someone",
        extra_body={"top_k": -1, "min_p": 0, "repetition_penalty": 1},  # vLLM's "off"
    )
    dialog = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "How do I\nread a file?"}]
    assert (
        answer.choices[0].message.content
        == llama.chat_completion([dialog], temperature=0, max_gen_len=12)[0]["generation"]["content"]
    )


def test_penalties_bias_and_vllm_sampling_fields_reach_the_sampler(client, llama):
    """Each setting changes the answer as the Python API's same setting does (which the sampler's own
    tests check against OpenAI's and vLLM's definitions); a -100 bias removes the greedy token."""
    plain = client.completions.create(model="tiny-stdlib", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    first = llama.tokenizer.encode(plain.choices[0].text, bos=False, eos=False)[0]
    settings = [
        {"temperature": 0, "logit_bias": {first: -100.0}},
        {"temperature": 0, "presence_penalty": 1.5, "frequency_penalty": 2.0},
        {"temperature": 1.0, "top_p": 1.0, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3, "seed": 11},
    ]
    for options in settings:
        vllm_fields = {k: options[k] for k in ("top_k", "min_p", "repetition_penalty") if k in options}
        openai_fields = {k: v for k, v in options.items() if k not in vllm_fields}
        if "logit_bias" in openai_fields:
            openai_fields["logit_bias"] = {str(k): v for k, v in openai_fields["logit_bias"].items()}
        answer = client.completions.create(
            model="tiny-stdlib", prompt=PROMPTS[0], max_tokens=12, extra_body=vllm_fields, **openai_fields
        )
        expected = llama.text_completion([PROMPTS[0]], max_gen_len=12, **options)[0]["generation"]
        assert answer.choices[0].text == expected, options
        assert answer.choices[0].text != plain.choices[0].text, options
    biased = client.completions.create(
        model="tiny-stdlib", prompt=PROMPTS[0], max_tokens=12, temperature=0, logit_bias={str(first): -100}
    )
    assert first not in llama.tokenizer.encode(biased.choices[0].text, bos=False, eos=False)


def write_adapter_for(ckpt_dir: str, out: Path) -> str:
    """A random LoRA adapter of rank 2 on every wq of the checkpoint, written as peft's files in ``out``;
    the sha256 of its files."""
    from llama.checkpoints.peft import read_adapter, write_adapter
    from llama.convert import source_model
    from llama.layers.lora import LoraConfig

    args = source_model(ckpt_dir)[1]
    generator = torch.Generator().manual_seed(0)
    state = {
        f"layers.{i}.attention.wq": (
            0.01 * torch.randn(2, args.dim, generator=generator),
            0.01 * torch.randn(args.dim, 2, generator=generator),
        )
        for i in range(args.n_layers)
    }
    out.mkdir()
    write_adapter(str(out), state, LoraConfig(rank=2, alpha=4.0, targets=("wq",)), args, ckpt_dir)
    return read_adapter(str(out), args).identity


def test_a_server_without_max_seq_len_serves_the_checkpoints_context_and_says_what_it_loaded(
    make_checkpoint, tokenizer_path, tmp_path
):
    """The context params.json states (768 tokens, more than 512): a prompt of 600 tokens is answered, and
    no more than 768 tokens. The log and /v1/models say what was loaded besides the checkpoint: the
    adapter, the quantization and the KV cache's dtype; the official client reads the model list."""
    ckpt_dir, _ = make_checkpoint(params={**SMALL_PARAMS, "max_seq_len": 768})
    adapter = tmp_path / "adapter"
    sha256 = write_adapter_for(ckpt_dir, adapter)
    name = Path(ckpt_dir).name
    command = [
        sys.executable,
        "-m",
        "llama.server",
        "--ckpt_dir",
        ckpt_dir,
        "--tokenizer_path",
        tokenizer_path,
        "--adapter_dir",
        str(adapter),
        "--quantize",
        "int8",
        "--max_batch_size",
        "2",
        "--port",
        "0",
        "--device",
        "cpu",
    ]
    server = Server(command, tmp_path / "log", name=name)
    try:
        log = server.log()
        context = f"the checkpoint's context is 768 ({Path(ckpt_dir) / 'params.json'}'s max_seq_len)"
        assert f"max_seq_len 768: {context}; 2 row(s) of KV cache (" in log
        assert re.search(
            re.escape(
                f"Loaded {ckpt_dir} with the adapter {adapter} (tokenizer: {tokenizer_path}) on cpu with 1 thread(s) "
            )
            + r"\(torch\.bfloat16 activations, int8 weights, torch\.float32 KV cache of \d+\.\d MiB\) in",
            log,
        )
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=60, max_retries=0)
        [model] = client.models.list().data
        assert model.id == name and model.model_extra == {
            "max_model_len": 768,
            "dtype": "bfloat16",
            "quantization": "int8",
            "kv_cache_dtype": "float32",
            "adapter": {"name": "adapter", "sha256": sha256},
        }
        prompt = [3 + i % 500 for i in range(600)]
        answer = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
        assert answer.usage.prompt_tokens == 600 and answer.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.BadRequestError, match="the prompt has 760 tokens and the context 768"):
            client.completions.create(model=name, prompt=[3 + i % 500 for i in range(760)], max_tokens=16)
    finally:
        server.kill()


def test_the_default_context_is_the_checkpoints_at_least_512_and_at_most_the_pool(
    make_checkpoint, make_hf_checkpoint, tokenizer_path, tmp_path
):
    from llama.server.context import default_context

    def context(ckpt_dir: str, kv_cache_tokens=None) -> tuple:
        return default_context(ckpt_dir, tokenizer_path, 8, kv_cache_tokens, torch.device("cpu"), "float32", None)

    stated, _ = make_checkpoint(params={**SMALL_PARAMS, "max_seq_len": 768})
    why = f"the checkpoint's context is 768 ({Path(stated) / 'params.json'}'s max_seq_len)"
    tokens, said = context(stated)
    assert tokens == 768 and said.startswith(f"{why}; 8 row(s) of KV cache (3.0 MiB) fit in 50% of what ")
    assert context(stated, kv_cache_tokens=600) == (600, f"{why}, more than the pool's --kv_cache_tokens 600")
    assert context(stated, kv_cache_tokens=1000) == (768, why)
    short, _ = make_checkpoint(params={**SMALL_PARAMS, "max_seq_len": 256})
    tokens, said = context(short)
    assert tokens == 512 and said.startswith(
        f"the checkpoint's context is 256 ({Path(short) / 'params.json'}'s "
        "max_seq_len), raised to 512, the least this server defaults to; "
    )
    unstated, _ = make_checkpoint()  # Llama 2's tokenizer and rope_theta: released with 4096
    tokens, said = context(unstated)
    assert tokens == 4096
    assert said.startswith(f"the checkpoint's context is 4096 ({Path(unstated) / 'params.json'} states none: ")
    hf = make_hf_checkpoint(max_position_embeddings=1024)
    tokens, said = context(hf)
    assert tokens == 1024
    assert said.startswith(f"the checkpoint's context is 1024 ({Path(hf) / 'config.json'}'s max_position_embeddings); ")

    config = json.loads((Path(hf) / "config.json").read_text())
    shutil.copytree(hf, tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": "4k"}))
    expected = f"{tmp_path / 'hf' / 'config.json'}: max_position_embeddings must be a positive integer, got '4k'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        context(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="kv_cache_tokens must be a positive integer, got 0"):
        context(stated, kv_cache_tokens=0)


def test_the_default_context_is_capped_so_that_the_kv_cache_fits_in_half_the_memory_the_weights_leave(
    make_checkpoint, tokenizer_path, monkeypatch
):
    from llama.convert import source_model
    from llama.server import context as chosen

    ckpt_dir, _ = make_checkpoint(params={**SMALL_PARAMS, "max_seq_len": 768})
    weights, token_bytes = chosen.model_bytes(source_model(ckpt_dir)[1], torch.device("cpu"), torch.float32, None)
    assert token_bytes == 2 * 2 * 4 * 8 * 4  # keys and values, of 2 layers, of 4 heads of 8 features, in float32
    for rows_of, expected in ((800, 768), (700, 688), (300, 512)):  # 688: whole blocks of 16; 512: the least
        free = weights + 2 * 8 * rows_of * token_bytes  # twice what 8 rows of that length take
        monkeypatch.setattr(chosen, "available_memory", lambda device, free=free: (free, "of memory available"))
        tokens, said = chosen.default_context(ckpt_dir, tokenizer_path, 8, None, torch.device("cpu"), "float32", None)
        assert tokens == expected, rows_of
        if expected < 768:
            assert said.endswith(
                f"but 8 row(s) of KV cache (3.0 MiB) would take more than 50% of what {chosen.gib(weights)} of weights "
                f"leave of the {chosen.gib(free)} of memory available (never under 512); --max_seq_len, "
                "--kv_cache_tokens or a smaller --max_batch_size choose another"
            )
    # an int8 pool, 8 values of a byte and a float32 scale per head: 8 rows of 768 fit where float32's 300 did
    stored_token_bytes = chosen.model_bytes(
        source_model(ckpt_dir)[1], torch.device("cpu"), torch.float32, None, torch.int8
    )[1]
    assert stored_token_bytes == 2 * 2 * 4 * (8 + 4)
    free = weights + 2 * 8 * 300 * token_bytes
    monkeypatch.setattr(chosen, "available_memory", lambda device: (free, "of memory available"))
    tokens, _ = chosen.default_context(
        ckpt_dir, tokenizer_path, 8, None, torch.device("cpu"), "float32", None, kv_cache_dtype="int8"
    )
    assert tokens == 768


@pytest.mark.parametrize("quantize, dtype", [(None, "float32"), ("int8", "bfloat16"), ("int4-g32", "bfloat16")])
def test_the_memory_a_context_is_chosen_by_is_what_the_loaded_model_takes(
    make_checkpoint, tokenizer_path, quantize, dtype
):
    from llama.convert import source_model
    from llama.layers.quantize import parse_quantize
    from llama.server.context import model_bytes

    ckpt_dir, _ = make_checkpoint()
    llama = Llama.build(ckpt_dir, tokenizer_path, 64, 2, device="cpu", dtype=dtype, quantize=quantize)
    args = source_model(ckpt_dir)[1]
    weights, token_bytes = model_bytes(args, torch.device("cpu"), llama.dtype, parse_quantize(quantize))
    parameters = llama.model.parameters()
    assert weights == sum(parameter.numel() * parameter.element_size() for parameter in parameters)  # scales aside
    caches = [buffer for name, buffer in llama.model.named_buffers() if name.endswith(("cache_k", "cache_v"))]
    pool = llama.engine.options.kv_cache_blocks * llama.engine.options.block_size
    assert token_bytes * pool == sum(buffer.numel() * buffer.element_size() for buffer in caches)
    stored = Llama.build(
        ckpt_dir, tokenizer_path, 64, 2, device="cpu", dtype=dtype, quantize=quantize, kv_cache_dtype="int8"
    )
    _, stored_token_bytes = model_bytes(args, torch.device("cpu"), llama.dtype, parse_quantize(quantize), torch.int8)
    assert stored_token_bytes * pool == stored.engine.kv_cache_bytes  # the scales included


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """One slot, no queue, a served name, the key from the environment, one allowed web origin, prompt
    lookup for every request."""
    command = [
        sys.executable,
        "-m",
        "llama.server",
        "--served_model_name",
        "tiny",
        "--allowed_origins",
        ORIGIN,
        "--speculate",
        "lookup",
        "--max_queue",
        "0",
        "--max_batch_size",
        "1",
        "--max_seq_len",
        str(MAX_SEQ_LEN),
        "--port",
        "0",
        "--device",
        "cpu",
    ]
    running = Server(
        command, tmp_path_factory.mktemp("small_server") / "log", env={"LLAMA_API_KEY": "env-key"}, name="tiny"
    )
    yield running
    running.kill()


ORIGIN = "http://app.example"


def test_served_model_name_and_key_from_the_environment(small_server):
    client = openai.OpenAI(base_url=small_server.url("/v1"), api_key="env-key", timeout=60, max_retries=0)
    assert [model.id for model in client.models.list().data] == ["tiny"]
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2
    with pytest.raises(openai.NotFoundError, match="'tiny'"):
        client.completions.create(model="tiny-stdlib", prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=small_server.url("/v1"), api_key=API_KEY, max_retries=0).models.list()


def test_speculating_server_answers_as_plain_greedy_decoding(small_server, llama):
    assert "speculative decoding for every request: lookup, 4 token(s)" in small_server.log()
    client = openai.OpenAI(base_url=small_server.url("/v1"), api_key="env-key", timeout=60, max_retries=0)
    for prompt in PROMPTS[1:]:
        answer = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
        assert answer.choices[0].text == llama.text_completion([prompt], max_gen_len=40, temperature=0)[0]["generation"]


def test_cors_preflight_and_headers_on_every_answer(small_server):
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers, _ = raw_answer(small_server, "OPTIONS", "/v1/chat/completions", headers=preflight, key="")
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == ORIGIN and "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    for path, key in (("/v1/models", "env-key"), ("/v1/models", "wrong"), ("/nowhere", "env-key"), ("/metrics", "")):
        status, headers, _ = raw_answer(small_server, "GET", path, headers={"Origin": ORIGIN}, key=key)
        assert headers.get("Access-Control-Allow-Origin") == ORIGIN, (path, status)
    status, headers, _ = raw_answer(
        small_server, "OPTIONS", "/v1/models", headers={**preflight, "Origin": "http://elsewhere.example"}, key=""
    )
    assert status == 204 and "Access-Control-Allow-Origin" not in headers  # the browser blocks that page


def test_a_full_queue_answers_503_and_a_hang_up_frees_the_slot(small_server):
    running = open_stream(small_server, {"prompt": "x", "max_tokens": 100, "logit_bias": {"2": -100}}, key="env-key")
    status, answer = raw_request(
        small_server, "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 2}', key="env-key"
    )
    assert status == 503 and answer["error"]["type"] == "server_error" and "--max_queue" in answer["error"]["message"]
    running.close()  # the client hangs up: its slot is free at the next step
    wait_until(lambda: metrics(small_server)["llama_running_slots"] == 0)
    status, answer = raw_request(
        small_server, "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 2}', key="env-key"
    )
    assert status == 200 and answer["usage"]["completion_tokens"] == 2


def test_a_compiled_server_compiles_before_it_serves_and_no_mix_of_options_compiles_again(tmp_path, llama):
    """``--compile``: every graph is compiled before the server listens; then every combination of
    greedy or sampled, penalties or none, no logprobs, logprobs or 20 alternatives, one row or two
    (one pair to the last position of the cache), with a grammar or not, adds no graph, and a
    grammar's greedy answer is the eager one's. SIGTERM lets a running stream end."""
    max_seq_len = 16  # one cache length to compile: the smallest bucket (two blocks) is the whole row
    command = [
        sys.executable,
        "-m",
        "llama.server",
        "--compile",
        "--max_seq_len",
        str(max_seq_len),
        "--max_batch_size",
        "2",
        "--port",
        "0",
        "--device",
        "cpu",
    ]
    server = Server(command, tmp_path / "log", start_timeout=600)
    try:
        log = server.log()
        assert log.index("compiled the decode step for widths [1, 2] x cache lengths [16] in") < log.index(
            "serving tiny-stdlib"
        )
        graphs = metrics(server)["llama_compiled_graphs"]
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=600, max_retries=0)
        prompt_len = len(llama.tokenizer.encode("import os\n", bos=True, eos=False))
        answer = client.completions.create(
            model="tiny-stdlib", prompt="import os\n", n=2, max_tokens=max_seq_len - prompt_len, temperature=0
        )
        assert [c.finish_reason for c in answer.choices] == ["length", "length"]
        assert answer.usage.prompt_tokens == prompt_len and answer.usage.completion_tokens == 2 * (
            max_seq_len - prompt_len
        )
        mixes = itertools.product(
            [{"temperature": 0}, {"temperature": 0.8}],
            [{}, {"presence_penalty": 1.0, "logit_bias": {"13": 5}}],
            [{}, {"logprobs": 0}, {"logprobs": 20}],
        )
        for i, (sampling, penalties, logprobs) in enumerate(mixes):
            answer = client.completions.create(
                model="tiny-stdlib", prompt="x = ", n=1 + i % 2, max_tokens=3, **sampling, **penalties, **logprobs
            )
            assert [c.finish_reason in ("stop", "length") for c in answer.choices] == [True] * (1 + i % 2)
        schema = {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        }
        answer = client.completions.create(
            model="tiny-stdlib",
            prompt="x = ",
            n=2,
            max_tokens=12,
            temperature=0,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}},
        )
        expected = llama.text_completion(["x = "], max_gen_len=12, temperature=0, json_schema=schema)[0]["generation"]
        assert [c.text for c in answer.choices] == [expected] * 2 and answer.choices[0].finish_reason == "stop"
        assert metrics(server)["llama_compiled_graphs"] == graphs

        stream = open_stream(
            server, {"prompt": "import os\n", "n": 2, "max_tokens": max_seq_len - prompt_len}, key="unused"
        )  # the same graph
        server.process.send_signal(
            signal.SIGTERM
        )  # a running answer finishes within --shutdown_timeout; no new one starts
        events = [stream.first_line] + list(stream)
        assert events[-2:] == [b"data: [DONE]\n", b"\n"] and sum(b'"finish_reason": "length"' in e for e in events) == 2
        assert server.process.wait(timeout=30) == 0 and "server stopped" in server.log()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(server.port)), timeout=5)
    finally:
        server.kill()


def test_under_torchrun_rank0_serves_the_followers_keep_up_and_sigterm_stops_every_rank(tmp_path, llama):
    """Two CPU ranks whose process group times out after PG_TIMEOUT_SECONDS: the server idles past it
    (rank 0's heartbeats), answers as one process does, refuses a bad request and loses a client
    without leaving a rank behind, and SIGTERM to torchrun ends every process."""
    worker = [str(ROOT / "tests" / "server_worker.py")] + SERVER_ARGS + ["--heartbeat_seconds", "0.5"]
    server = Server(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + worker,
        tmp_path / "log",
    )
    ranks = child_pids(server.process.pid)
    try:
        assert len(ranks) == 2
        time.sleep(2 * PG_TIMEOUT_SECONDS)
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=60, max_retries=0)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny-stdlib", prompt="x", max_tokens=0)
        answer = client.completions.create(model="tiny-stdlib", prompt=PROMPTS, max_tokens=16, temperature=0)
        assert [c.text for c in answer.choices] == [
            e["generation"] for e in llama.text_completion(PROMPTS, temperature=0, max_gen_len=16)
        ]
        stream = client.completions.create(
            model="tiny-stdlib", prompt=PROMPTS[0], max_tokens=100, temperature=0, stream=True
        )
        next(iter(stream))
        short = client.completions.create(
            model="tiny-stdlib", prompt=PROMPTS[1], max_tokens=6, temperature=0
        )  # admitted mid-decode
        assert (
            short.choices[0].text == llama.text_completion(PROMPTS[1:2], temperature=0, max_gen_len=6)[0]["generation"]
        )
        stream.close()  # the client hangs up after the first chunk
        server.wait_for_log("the client hung up; rows cancelled after", timeout=30)
        chat = client.chat.completions.create(model="tiny-stdlib", messages=DIALOG, max_tokens=8, temperature=0)
        assert (
            chat.choices[0].message.content
            == llama.chat_completion([DIALOG], temperature=0, max_gen_len=8)[0]["generation"]["content"]
        )

        server.process.send_signal(signal.SIGTERM)  # to torchrun only, as a job scheduler sends it
        server.process.wait(timeout=40)
        assert "rank 1: the server shut down" in server.log() and "server stopped" in server.log()
        assert [pid for pid in ranks if alive(pid)] == []  # no rank outlived torchrun
    finally:
        server.kill()
        for pid in ranks:  # torchrun starts each rank in its own session
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def child_pids(pid: int) -> list:
    """The processes whose parent is ``pid`` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_row_ended_by_a_failed_step_streams_a_500_error_chunk_and_a_finished_row_its_reason():
    from llama.engine import RowDelta
    from llama.options import GenerationOptions
    from llama.server.app import StreamChunks
    from llama.server.protocol import Job

    job = Job("completion", "m", ["a"], [[1, 2]], GenerationOptions(num_return_sequences=2), stream=True)
    chunks = StreamChunks(job, lambda token: b"x", threading.Event())
    failed = chunks.of(RowDelta(0, "", [], [], [], "error"))
    assert failed[-1]["error"]["type"] == "server_error" and "generation failed" in failed[-1]["error"]["message"]
    finished = chunks.of(RowDelta(1, "", [], [], [], "length"))
    assert finished[-1]["choices"][0]["finish_reason"] == "length"
