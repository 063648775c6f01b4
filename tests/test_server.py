"""python -m llama.server, as a client sees it: a real server on 127.0.0.1 serving the bundled model,
driven by the official openai client, its answers compared with the Python API's on the same model.

Every server runs in its own process group, is waited on with timeouts, and is killed at teardown.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch

from llama import Llama
from server_worker import PG_TIMEOUT_SECONDS

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "checkpoints" / "tiny-stdlib"
API_KEY = "test-key"
MAX_SEQ_LEN, MAX_BATCH_SIZE = 128, 4
SERVER_ARGS = ["--max_seq_len", str(MAX_SEQ_LEN), "--max_batch_size", str(MAX_BATCH_SIZE), "--port", "0", "--dtype", "float32", "--device", "cpu"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the server and this process share the machine: on 2 busy cores, torch's
# thread pools contending with each other make a step 10x slower than one thread each
START_TIMEOUT = 60  # seconds for a server to load and listen
PROMPTS = ["import os\n", 'def remove_non_ascii(s: str) -> str:\n    """', "class Stack:\n    def __init__(self):\n"]
DIALOG = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "How do I read a file?"}]


class Server:
    """A server process: its port (read from its log), its log, and a clean stop."""

    def __init__(self, command, log_path: Path):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **ONE_THREAD}
            )
        self.port = self.wait_for_log("serving tiny-stdlib on http://127.0.0.1:", START_TIMEOUT)

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
    running = Server([sys.executable, "-m", "llama.server", "--api_key", API_KEY] + SERVER_ARGS, tmp_path_factory.mktemp("server") / "log")
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
    yield Llama.build(str(BUNDLED), str(BUNDLED / "tokenizer.model"), MAX_SEQ_LEN, MAX_BATCH_SIZE, device="cpu", dtype="float32")
    torch.set_num_threads(threads)


def raw_request(server, method: str, path: str, body: bytes = b"", headers=None) -> tuple:
    """(status, parsed JSON body) of one request sent by hand (for what the openai client won't send)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", int(server.port), timeout=30)
    connection.request(method, path, body=body, headers={"Authorization": f"Bearer {API_KEY}", **(headers or {})})
    response = connection.getresponse()
    status, data = response.status, response.read()
    connection.close()
    return status, json.loads(data)


def test_health_and_models(server, client):
    assert raw_request(server, "GET", "/health", headers={"Authorization": ""}) == (200, {"status": "ok"})
    assert [model.id for model in client.models.list().data] == ["tiny-stdlib"]


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
    answer = client.completions.create(model="tiny-stdlib", prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=["sys"])
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
    for chunk in client.completions.create(model="tiny-stdlib", prompt=PROMPTS, max_tokens=30, temperature=0, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    assert texts == [choice.text for choice in whole.choices]
    assert reasons == ["length"] * 3


def test_streamed_chat_deltas_join_to_the_whole_and_count_usage(client):
    whole = client.chat.completions.create(model="tiny-stdlib", messages=DIALOG, max_tokens=25, temperature=0)
    chunks = list(client.chat.completions.create(
        model="tiny-stdlib", messages=DIALOG, max_tokens=25, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stream_ends_with_done(server):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", int(server.port), timeout=30)
    body = json.dumps({"prompt": "x", "max_tokens": 3, "stream": True})
    connection.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {API_KEY}"})
    response = connection.getresponse()
    assert response.getheader("Content-Type") == "text/event-stream"
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
    assert all(len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5) for entry in content)


def test_streamed_logprobs_equal_the_whole(client):
    whole = client.completions.create(model="tiny-stdlib", prompt=PROMPTS[2], max_tokens=12, temperature=0, logprobs=1)
    streamed = []
    for chunk in client.completions.create(model="tiny-stdlib", prompt=PROMPTS[2], max_tokens=12, temperature=0, logprobs=1, stream=True):
        if chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.token_logprobs
    assert streamed == whole.choices[0].logprobs.token_logprobs


def test_n_seeded_samples_equal_the_python_apis(client, llama):
    answer = client.completions.create(model="tiny-stdlib", prompt=PROMPTS[1], max_tokens=16, temperature=1.0, top_p=1.0, n=3, seed=7)
    expected = llama.text_completion(PROMPTS[1:2], temperature=1.0, top_p=1.0, max_gen_len=16, num_return_sequences=3, seed=7)
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
    ("/v1/completions", {"prompt": "x", "n": MAX_BATCH_SIZE + 1}, "n"),
    ("/v1/completions", {"prompt": ["x", "y"], "n": 3}, "n"),
    ("/v1/completions", {"prompt": "x " * MAX_SEQ_LEN}, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_SEQ_LEN}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 1.0}, "frequency_penalty"),
    ("/v1/chat/completions", {"max_tokens": 4}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "[INST] hi [/INST]"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ["hi"]}]}, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
]


@pytest.mark.parametrize("path, body, param", BAD_REQUESTS, ids=[f"{p.split('/')[-1]}-{param}-{i}" for i, (p, _, param) in enumerate(BAD_REQUESTS)])
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
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {2 << 20}\r\n\r\n".encode()
    )
    response = b""
    while chunk := connection.recv(4096):
        response += chunk
    connection.close()
    head, body = response.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413") and "limit is 1048576" in json.loads(body)["error"]["message"]


def test_openai_client_sees_bad_request_error(client):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny-stdlib", prompt="x", top_p=2.0)


def test_missing_or_wrong_api_key_gets_401(server):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}):
        status, answer = raw_request(server, "POST", "/v1/completions", b'{"prompt": "x"}', headers)
        assert status == 401 and answer["error"]["type"] == "authentication_error"


def test_a_refused_request_closes_its_connection_so_its_unread_body_is_not_read_as_a_request(server):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", int(server.port), timeout=30)
    connection.request("POST", "/v1/completions", body=b'{"prompt": "x"}', headers={"Authorization": "Bearer wrong"})
    response = connection.getresponse()
    response.read()
    assert (response.status, response.getheader("Connection")) == (401, "close")
    connection.close()


def test_concurrent_clients_are_batched_and_get_their_own_greedy_answers(server, client, llama):
    prompts = PROMPTS + ["import sys\n", "def main():\n", "x = 1\n", "for i in range(10):\n", "try:\n"]
    answers = [None] * len(prompts)

    def ask(i):
        answers[i] = client.completions.create(model="tiny-stdlib", prompt=prompts[i], max_tokens=12 + i, temperature=0).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert answers == [llama.text_completion([p], temperature=0, max_gen_len=12 + i)[0]["generation"] for i, p in enumerate(prompts)]
    batch_sizes = [int(line.split("decoding ")[1].split(" request")[0]) for line in server.log().splitlines() if "decoding " in line]
    assert max(batch_sizes) > 1  # requests that waited together were decoded together


def test_client_hanging_up_mid_stream_cancels_its_row(server, client):
    connection = socket.create_connection(("127.0.0.1", int(server.port)), timeout=30)
    body = json.dumps({"prompt": "import os\n", "max_tokens": 120, "temperature": 0, "stream": True}).encode()
    connection.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode()
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    received = b""
    while b"data: " not in received:  # the headers, then the first chunk
        received += connection.recv(4096)
    connection.close()
    tokens_decoded = int(server.wait_for_log("the client hung up; row cancelled after", timeout=30).split()[0])
    assert tokens_decoded < 120
    after = client.completions.create(model="tiny-stdlib", prompt="x", max_tokens=2, temperature=0)
    assert after.choices[0].finish_reason == "length"


def test_under_torchrun_rank0_serves_the_followers_keep_up_and_sigterm_stops_every_rank(tmp_path, llama):
    """Two CPU ranks whose process group times out after PG_TIMEOUT_SECONDS: the server idles past it
    (rank 0's heartbeats), answers as one process does, refuses a bad request and loses a client
    without leaving a rank behind, and SIGTERM to torchrun ends every process."""
    worker = [str(ROOT / "tests" / "server_worker.py")] + SERVER_ARGS + ["--heartbeat_seconds", "0.5"]
    server = Server([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] + worker, tmp_path / "log")
    ranks = child_pids(server.process.pid)
    try:
        assert len(ranks) == 2
        time.sleep(2 * PG_TIMEOUT_SECONDS)
        client = openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=60, max_retries=0)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny-stdlib", prompt="x", max_tokens=0)
        answer = client.completions.create(model="tiny-stdlib", prompt=PROMPTS, max_tokens=16, temperature=0)
        assert [c.text for c in answer.choices] == [e["generation"] for e in llama.text_completion(PROMPTS, temperature=0, max_gen_len=16)]
        stream = client.completions.create(model="tiny-stdlib", prompt=PROMPTS[0], max_tokens=100, temperature=0, stream=True)
        next(iter(stream))
        stream.close()  # the client hangs up after the first chunk
        server.wait_for_log("the client hung up; row cancelled after", timeout=30)
        chat = client.chat.completions.create(model="tiny-stdlib", messages=DIALOG, max_tokens=8, temperature=0)
        assert chat.choices[0].message.content == llama.chat_completion([DIALOG], temperature=0, max_gen_len=8)[0]["generation"]["content"]

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
