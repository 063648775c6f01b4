"""python -m llama.server --lora_modules NAME=DIR ...: a request's model names the base or an adapter, whose
answers are those of the model with that adapter merged; /v1/models lists the adapters under the base
(vLLM's cards); an unknown model is OpenAI's 404 model_not_found."""

import json
import sys
import threading
import time
from pathlib import Path
from typing import Dict

import openai
import pytest
import torch

from conftest import BUNDLED
from llama import Llama
from llama.checkpoints.loader import load_model
from llama.checkpoints.peft import write_adapter
from llama.convert import source_model
from llama.finetune import adapter_tensors
from llama.layers.lora import TARGET_SETS, LoraConfig, apply_lora
from test_server import MAX_SEQ_LEN, SERVER_ARGS, Server, open_stream, raw_answer, raw_request, stream_text

ADAPTER_SHAPES = {"one": (4, TARGET_SETS["all"]), "two": (2, ("wq", "wv"))}  # name: (rank, targets)
GREEDY = dict(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Dict[str, str]:
    """Two adapters of the bundled model, B random, by name."""
    args = source_model(str(BUNDLED))[1]
    folders = {}
    for seed, (name, (rank, targets)) in enumerate(ADAPTER_SHAPES.items()):
        config = LoraConfig(rank=rank, alpha=2.0 * rank, targets=targets)
        model = apply_lora(load_model(str(BUNDLED), args, torch.device("cpu"), torch.float32), config)
        torch.manual_seed(seed)
        for module_name, module in model.named_modules():
            if module_name.endswith("lora_B"):
                torch.nn.init.normal_(module.weight, std=0.2)
        folder = tmp_path_factory.mktemp(f"adapter-{name}")
        write_adapter(str(folder), adapter_tensors(model), config, args, str(BUNDLED))
        folders[name] = str(folder)
    return folders


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    """One adapter on the device at a time (--max_loras 1): requests of the other swap it."""
    modules = [f"{name}={folder}" for name, folder in adapters.items()]
    command = [sys.executable, "-m", "llama.server", "--lora_modules", *modules, "--max_loras", "1", *SERVER_ARGS]
    running = Server(command, tmp_path_factory.mktemp("server") / "log")
    yield running
    running.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", timeout=60, max_retries=0)


def merged(adapter_dir=None) -> Llama:
    """The bundled model in this process with ``adapter_dir`` merged, the reference (on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return Llama.build(
            str(BUNDLED),
            max_seq_len=MAX_SEQ_LEN,
            max_batch_size=1,
            device="cpu",
            dtype="float32",
            adapter_dir=adapter_dir,
        )
    finally:
        torch.set_num_threads(threads)


def test_models_lists_each_adapter_under_the_base_model(client, adapters):
    listed = client.models.list().data
    assert [model.id for model in listed] == ["tiny-stdlib", "one", "two"]
    for model in listed[1:]:
        assert model.model_extra["parent"] == "tiny-stdlib" and model.model_extra["root"] == adapters[model.id]
        assert model.model_extra["adapter"]["rank"] == ADAPTER_SHAPES[model.id][0]


def test_a_request_naming_an_adapter_answers_as_the_model_with_it_merged(client, server, adapters):
    prompt, dialog = "def remove_non_ascii(s: str) -> str:\n", [{"role": "user", "content": "Read a file."}]
    for name in ["one", "two", "one", "tiny-stdlib"]:  # one adapter on the device at a time: each swaps it in
        reference = merged(adapters.get(name))
        answer = client.completions.create(model=name, prompt=prompt, **GREEDY)
        expected = reference.text_completion([prompt], temperature=0, max_gen_len=12)[0]["generation"]
        assert (answer.model, answer.choices[0].text) == (name, expected)
        chat = client.chat.completions.create(model=name, messages=dialog, **GREEDY)
        expected = reference.chat_completion([dialog], temperature=0, max_gen_len=12)[0]["generation"]["content"]
        assert (chat.model, chat.choices[0].message.content) == (name, expected)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="three", prompt=prompt, max_tokens=1)
    status, answer = raw_request(server, "POST", "/v1/completions", b'{"model": "three", "prompt": "x"}', key="")
    assert status == 404 and answer["error"] == {
        "message": "The model 'three' does not exist: this server serves 'tiny-stdlib', 'one', 'two'",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_bad_lora_modules_are_one_line_errors(adapters, monkeypatch):
    from llama.server.__main__ import main

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    with monkeypatch.context() as patched:
        patched.setattr(Llama, "from_options", load)
        for modules, error in [
            (["one"], r"^--lora_modules: expected NAME=DIR \(an adapter's name and its folder\), got 'one'$"),
            (["a=x", "a=y"], r"^--lora_modules: the name 'a' is given twice; each adapter needs a name of its own$"),
            (["tiny-stdlib=x"], r"^--lora_modules: the name 'tiny-stdlib' is the base model's;"),
            (['{"name": "a"'], r"^--lora_modules: '\{\"name\": \"a\"' is not a JSON object \(Expecting"),
            (['{"name": "a", "dir": "x"}'], r'^--lora_modules: expected \{"name": NAME, "path": DIR\} and optionally'),
            (['{"name": "", "path": "x"}'], r"^--lora_modules: the name and the path must be non-empty strings, got"),
            (
                ['{"name": "a", "path": "x", "base_model_name": "meta-llama/Llama-2-7b-hf"}'],
                r"^--lora_modules: adapter 'a' names base_model_name 'meta-llama/Llama-2-7b-hf', but this server "
                r"serves 'tiny-stdlib': give --served_model_name 'meta-llama/Llama-2-7b-hf', or leave base_model_name",
            ),
        ]:
            with pytest.raises(ValueError, match=error):
                main(["--lora_modules", *modules, "--port", "0", "--traceback"])
    with pytest.raises(ValueError, match=r"^adapter 'one' \(.*\) has rank 4, over max_lora_rank=2: serve it with"):
        main(["--lora_modules", f"one={adapters['one']}", "--max_lora_rank", "2", "--port", "0", "--traceback"])
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json not found"):
        main(["--lora_modules", f"nowhere={Path(adapters['one']).parent / 'nowhere'}", "--port", "0", "--traceback"])


def test_lora_modules_take_vllms_json_form_beside_name_equals_dir():
    from llama.server.__main__ import parse_lora_modules

    modules = ['{"name": "sql", "path": "out/sql", "base_model_name": "tiny-stdlib"}', '{"name": "poems", "path": "p"}']
    assert parse_lora_modules(modules, "tiny-stdlib", False) == {"sql": "out/sql", "poems": "p"}
    assert parse_lora_modules(["sql=out/sql", "poems=p"], "tiny-stdlib", False) == {"sql": "out/sql", "poems": "p"}
    assert parse_lora_modules(None, "tiny-stdlib", True) == {} and parse_lora_modules(None, "x", False) is None


@pytest.fixture(scope="module")
def updating_server(tmp_path_factory):
    """Adapters loaded and unloaded while serving, none at the start, of rank 3 at most."""
    command = [sys.executable, "-m", "llama.server", "--allow_adapter_updates", "--max_lora_rank", "3", *SERVER_ARGS]
    running = Server(command, tmp_path_factory.mktemp("updating") / "log")
    yield running
    running.kill()


def post(server, path: str, body: dict) -> tuple:
    """(status, body: parsed JSON, or the text of a 200) of a POST."""
    status, _, data = raw_answer(server, "POST", path, json.dumps(body).encode(), key="")
    return status, data.decode() if status == 200 else json.loads(data)


def test_an_adapter_loaded_while_serving_answers_as_merged_and_unloading_it_lets_a_running_stream_finish(
    updating_server, server, adapters
):
    load = {"lora_name": "two", "lora_path": adapters["two"]}
    assert post(updating_server, "/v1/load_lora_adapter", load) == (
        200,
        "Success: LoRA adapter 'two' added successfully.",
    )
    status, answer = post(updating_server, "/v1/load_lora_adapter", load)
    assert status == 400 and answer["error"]["message"].startswith("an adapter named 'two' is already loaded")
    status, answer = post(updating_server, "/v1/load_lora_adapter", {"lora_name": "one", "lora_path": adapters["one"]})
    assert status == 400 and "has rank 4, over max_lora_rank=3" in answer["error"]["message"]
    status, listed = raw_request(updating_server, "GET", "/v1/models", key="")
    assert [model["id"] for model in listed["data"]] == ["tiny-stdlib", "two"]

    prompt = "class Stack:\n    def __init__(self):\n"
    expected = merged(adapters["two"]).text_completion([prompt], temperature=0, max_gen_len=48)[0]["generation"]
    stream = open_stream(updating_server, {"model": "two", "prompt": prompt, "max_tokens": 48}, key="")
    unloading = {}
    unload = threading.Thread(
        target=lambda: unloading.update(answer=post(updating_server, "/v1/unload_lora_adapter", {"lora_name": "two"}))
    )
    unload.start()
    deadline = time.monotonic() + 30
    while post(updating_server, "/v1/completions", {"model": "two", "prompt": "x"})[0] != 404:  # refused at once
        assert time.monotonic() < deadline
    assert unload.is_alive()  # the stream still runs with it
    assert stream_text(stream) == expected
    unload.join(timeout=60)
    assert unloading["answer"] == (200, "Success: LoRA adapter 'two' removed successfully.")
    status, answer = post(updating_server, "/v1/unload_lora_adapter", {"lora_name": "two"})
    assert (status, answer["error"]["code"]) == (404, "model_not_found")
    status, answer = post(server, "/v1/load_lora_adapter", load)  # a server without --allow_adapter_updates
    assert status == 404 and "no route POST /v1/load_lora_adapter" in answer["error"]["message"]
