"""Every bad input gets a specific error that names what was expected and what was found."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from llama.generation import Llama
from llama.tokenizer import resolve_tokenizer_path


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    ckpt_dir, _ = make_checkpoint(n_shards=2)
    return ckpt_dir


@pytest.fixture
def broken(ckpt, tmp_path):
    """A fresh copy of a good 2-shard checkpoint for a test to break."""
    target = tmp_path / "ckpt"
    shutil.copytree(ckpt, target)
    return target


@pytest.fixture(scope="module")
def llama(ckpt, tokenizer_path):
    return Llama.build(ckpt, tokenizer_path, max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32")


def build(ckpt_dir, tokenizer_path, **kwargs):
    return Llama.build(
        str(ckpt_dir), tokenizer_path, **{"max_seq_len": 32, "max_batch_size": 2, "device": "cpu", **kwargs}
    )


# --- files ---------------------------------------------------------------------------------------


def test_missing_checkpoint_dir(tokenizer_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*nowhere"):
        build(tmp_path / "nowhere", tokenizer_path)


def test_missing_params_json(broken, tokenizer_path):
    (broken / "params.json").unlink()
    with pytest.raises(FileNotFoundError, match="params.json not found"):
        build(broken, tokenizer_path)


def test_invalid_params_json(broken, tokenizer_path):
    (broken / "params.json").write_text("{dim: 64")
    with pytest.raises(ValueError, match="params.json is not valid JSON"):
        build(broken, tokenizer_path)


def test_unknown_params_key(broken, tokenizer_path):
    params = json.loads((broken / "params.json").read_text())
    (broken / "params.json").write_text(json.dumps({**params, "vision_chunk_size": 560}))  # Llama 3.2 Vision's
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['vision_chunk_size'\]; known keys are"):
        build(broken, tokenizer_path)


def test_no_shards(broken, tokenizer_path):
    for shard in broken.glob("*.pth"):
        shard.unlink()
    with pytest.raises(FileNotFoundError, match="no consolidated.NN.pth shard files"):
        build(broken, tokenizer_path)


def test_gap_in_shard_numbering(broken, tokenizer_path):
    (broken / "consolidated.01.pth").rename(broken / "consolidated.02.pth")
    with pytest.raises(FileNotFoundError, match="lacks consolidated.01.pth"):
        build(broken, tokenizer_path)


def test_missing_tokenizer(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found: .*missing.model"):
        build(ckpt, str(tmp_path / "missing.model"))


def test_file_that_is_not_a_tokenizer(ckpt, tmp_path):
    bogus = tmp_path / "tokenizer.model"
    bogus.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model is neither a sentencepiece model nor a tiktoken BPE file"):
        build(ckpt, str(bogus))


def test_tokenizer_path_that_is_a_directory_says_so_and_names_the_file_in_it(ckpt, tokenizer_path, tmp_path):
    shutil.copyfile(tokenizer_path, tmp_path / "tokenizer.model")
    message = (
        f"tokenizer path {tmp_path} is a directory; a tokenizer.model or tokenizer.json file is expected: "
        f"pass {tmp_path / 'tokenizer.model'}"
    )
    with pytest.raises(IsADirectoryError, match=f"^{re.escape(message)}$"):
        build(ckpt, str(tmp_path))


def test_no_tokenizer_path_means_the_checkpoint_folders_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    assert resolve_tokenizer_path(str(tmp_path)) == str(tmp_path / "tokenizer.model")
    assert resolve_tokenizer_path(str(tmp_path), "other.model") == "other.model"


def test_no_tokenizer_path_and_none_in_the_folder_uses_the_one_beside_it(tmp_path):
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / "tokenizer.model").write_bytes(b"")  # where Meta's download puts it
    assert resolve_tokenizer_path(str(tmp_path / "llama-2-7b")) == str(tmp_path / "tokenizer.model")


def test_the_folders_own_tokenizer_comes_before_the_one_beside_it(tmp_path):
    (tmp_path / "llama-2-7b").mkdir()
    (tmp_path / "llama-2-7b" / "tokenizer.model").write_bytes(b"")
    (tmp_path / "tokenizer.model").write_bytes(b"")
    assert resolve_tokenizer_path(str(tmp_path / "llama-2-7b")) == str(tmp_path / "llama-2-7b" / "tokenizer.model")


def test_no_tokenizer_in_or_beside_the_folder_names_both_places_and_the_flag(tmp_path):
    (tmp_path / "llama-2-7b").mkdir()
    folder, beside = tmp_path / "llama-2-7b", tmp_path / "tokenizer.model"
    own = f"{folder / 'tokenizer.model'}, {folder / 'tokenizer.json'}, {folder / 'original' / 'tokenizer.model'}"
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(
            f"none of {own} or {beside} exists; "
            "pass the checkpoint's tokenizer.model or tokenizer.json with --tokenizer_path"
        ),
    ):
        resolve_tokenizer_path(str(tmp_path / "llama-2-7b"))


def test_corrupt_shard_names_the_file(broken, tokenizer_path):
    (broken / "consolidated.00.pth").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot load checkpoint shard .*consolidated.00.pth"):
        build(broken, tokenizer_path)


class Payload:
    """An object a pickle would rebuild by calling arbitrary code; weights_only refuses it."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_shard_with_code_is_refused_not_run(broken, tokenizer_path, capsys):
    state = torch.load(broken / "consolidated.00.pth", weights_only=True)
    torch.save({**state, "payload": Payload()}, broken / "consolidated.00.pth")
    with pytest.raises(ValueError, match="cannot load checkpoint shard .*consolidated.00.pth"):
        build(broken, tokenizer_path)
    assert "this must never run" not in capsys.readouterr().out


def test_missing_key_names_key_and_file(broken, tokenizer_path):
    state = torch.load(broken / "consolidated.01.pth", weights_only=True)
    del state["layers.1.feed_forward.w3.weight"]
    torch.save(state, broken / "consolidated.01.pth")
    with pytest.raises(
        ValueError, match=r"consolidated.01.pth: missing key\(s\) \['layers.1.feed_forward.w3.weight'\]"
    ):
        build(broken, tokenizer_path)


def test_unexpected_key_names_key_and_file(broken, tokenizer_path):
    state = torch.load(broken / "consolidated.00.pth", weights_only=True)
    state["layers.9.attention.wq.weight"] = torch.zeros(2, 2)
    torch.save(state, broken / "consolidated.00.pth")
    with pytest.raises(
        ValueError, match=r"consolidated.00.pth: unexpected key\(s\) \['layers.9.attention.wq.weight'\]"
    ):
        build(broken, tokenizer_path)


def test_shape_mismatch_names_key_file_and_both_shapes(broken, tokenizer_path):
    state = torch.load(broken / "consolidated.00.pth", weights_only=True)
    state["layers.0.attention.wk.weight"] = torch.zeros(12, 64, dtype=torch.bfloat16)
    torch.save(state, broken / "consolidated.00.pth")
    expected = (
        r"consolidated.00.pth: layers.0.attention.wk.weight has shape \(12, 64\), expected \(16, 64\) "
        r"\(a \(32, 64\) tensor split over 2 shard"
    )
    with pytest.raises(ValueError, match=expected):
        build(broken, tokenizer_path)


def test_tokenizer_that_does_not_match_the_checkpoint(broken, tokenizer_path):
    for path in broken.glob("*.pth"):
        state = torch.load(path, weights_only=True)
        state["tok_embeddings.weight"] = state["tok_embeddings.weight"][:500]
        state["output.weight"] = state["output.weight"][:250]
        torch.save(state, path)
    with pytest.raises(
        ValueError, match="tokenizer .* has 512 tokens but the checkpoint's tok_embeddings.weight has 500 rows"
    ):
        build(broken, tokenizer_path)


def test_params_vocab_size_that_contradicts_the_tokenizer(broken, tokenizer_path):
    params = json.loads((broken / "params.json").read_text())
    (broken / "params.json").write_text(json.dumps({**params, "vocab_size": 32000}))
    with pytest.raises(ValueError, match="says vocab_size=32000 but the tokenizer has 512 tokens"):
        build(broken, tokenizer_path)


# --- build arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp8", "int8", torch.int64])
def test_unsupported_dtype(ckpt, tokenizer_path, dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of \['float32', 'bfloat16', 'float16'\]"):
        build(ckpt, tokenizer_path, dtype=dtype)


def test_unknown_device(ckpt, tokenizer_path):
    with pytest.raises(ValueError, match="device must be e.g. 'cpu', 'cuda'"):
        build(ckpt, tokenizer_path, device="tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda(ckpt, tokenizer_path):
    with pytest.raises(ValueError, match="'cuda' was asked for but CUDA is not available"):
        build(ckpt, tokenizer_path, device="cuda")


@pytest.mark.parametrize("name, value", [("max_seq_len", 0), ("max_batch_size", -1), ("max_seq_len", 8.5)])
def test_non_positive_sizes(ckpt, tokenizer_path, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive integer, got {value}"):
        build(ckpt, tokenizer_path, **{name: value})


def test_model_parallel_size_that_is_not_the_world_size(ckpt, tokenizer_path):
    with pytest.raises(ValueError, match="model_parallel_size=2 but this job has 1 process"):
        build(ckpt, tokenizer_path, model_parallel_size=2)


# --- generation arguments ------------------------------------------------------------------------


def test_batch_larger_than_max_batch_size(llama):
    with pytest.raises(ValueError, match="3 prompts exceed max_batch_size=2"):
        llama.generate([[1], [1], [1]], max_gen_len=4)


def test_chat_errors_speak_of_dialogs(llama):
    long_dialog = [{"role": "user", "content": "x = 1\n" * 40}]
    short_dialog = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"dialog 1 has \d+ tokens, more than max_seq_len=32"):
        llama.chat_completion([short_dialog, long_dialog])
    with pytest.raises(ValueError, match="3 dialogs exceed max_batch_size=2"):
        llama.chat_completion([short_dialog] * 3)


def test_text_prompt_errors_speak_of_prompts(llama):
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens, more than max_seq_len=32"):
        llama.text_completion(["x = 1\n" * 40])


def test_prompt_longer_than_max_seq_len(llama):
    with pytest.raises(ValueError, match=r"prompt_tokens\[1\] has 33 tokens, more than max_seq_len=32"):
        llama.generate([[1, 5], [1] * 33], max_gen_len=4)


def test_token_id_outside_vocabulary(llama):
    with pytest.raises(
        ValueError, match=r"prompt_tokens\[0\] has token id\(s\) \[512, -3\] outside the vocabulary \[0, 512\)"
    ):
        llama.generate([[1, 512, -3]], max_gen_len=4)


def test_empty_prompt_tokens(llama):
    with pytest.raises(ValueError, match=r"prompt_tokens\[0\] is empty"):
        llama.generate([[]], max_gen_len=4)


@pytest.mark.parametrize("prompt_tokens", ["hello", [[1, "2"]], [[1, 2.0]], [1, 2]])
def test_prompt_tokens_of_the_wrong_type(llama, prompt_tokens):
    with pytest.raises(TypeError, match="prompt_tokens"):
        llama.generate(prompt_tokens, max_gen_len=4)


@pytest.mark.parametrize("temperature", [-0.1, float("nan"), "hot"])
def test_bad_temperature(llama, temperature):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        llama.text_completion(["x"], temperature=temperature)


@pytest.mark.parametrize("top_p", [0, 1.5, -1])
def test_top_p_outside_unit_interval(llama, top_p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        llama.text_completion(["x"], top_p=top_p)


@pytest.mark.parametrize("max_gen_len", [-1, 2.5])
def test_bad_max_gen_len(llama, max_gen_len):
    with pytest.raises(ValueError, match="max_gen_len must be a non-negative integer"):
        llama.text_completion(["x"], max_gen_len=max_gen_len)


@pytest.mark.parametrize("prompts", ["just a string", [1, 2], ["ok", None]])
def test_non_string_prompts(llama, prompts):
    with pytest.raises(TypeError, match="prompts must be a list of strings"):
        llama.text_completion(prompts)


# --- chat ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dialog, message",
    [
        ([{"role": "robot", "content": "hi"}], r"role' in \('system', 'user', 'assistant'\)"),
        ([{"role": "user"}], "str 'content'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], r"alternating .*got \['user', 'user'\]"),
        ([{"role": "assistant", "content": "a"}], r"alternating .*got \['assistant'\]"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "the last message must be from the user, got 'assistant'",
        ),
        ([{"role": "system", "content": "a"}], "a dialog with a system message needs a user message"),
        ([], "a dialog must be a non-empty list"),
    ],
)
def test_bad_dialogs(llama, dialog, message):
    with pytest.raises(ValueError, match=message):
        llama.chat_completion([dialog])


def test_a_missing_last_shard_is_named(make_checkpoint, tokenizer_path, tmp_path):
    ckpt_dir, _ = make_checkpoint(n_shards=2)
    broken = Path(shutil.copytree(ckpt_dir, tmp_path / "two_shards"))
    (broken / "consolidated.01.pth").unlink()
    message = (
        f"checkpoint directory {broken} lacks consolidated.01.pth: consolidated.00.pth's layers.0.attention.wq.weight "
        "has 32 of the 64 rows params.json's dim gives: it is 1 of 2 shards, and 1 is there"
    )
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        build(str(broken), tokenizer_path)
