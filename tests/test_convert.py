"""python -m llama.convert: Hugging Face -> Meta -> Hugging Face gives transformers the same logits,
Meta's shards -> Hugging Face is read by transformers as the original, and the Meta files written
hold only what Meta's own reference code reads."""

import json
from pathlib import Path

import pytest
import torch

from conftest import BUNDLED, SMALL_PARAMS, stdlib_lines, to_transformers
from distributed_worker import TOKENS
from llama.convert import convert, main
from llama.generation import Llama
from llama.tokenizer import train_tokenizer

# The fields of Meta's ModelArgs (meta-llama/llama, llama/model.py); Code Llama's adds rope_theta.
LLAMA2_FIELDS = {
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "max_batch_size",
    "max_seq_len",
}
CODE_LLAMA_FIELDS = LLAMA2_FIELDS | {"rope_theta"}

HF_MODELS = {  # LlamaConfig keys; 64 dims and intermediate sizes Meta's rule gives only with a multiplier
    "gqa, theta 1e6, FFN 100, 3 files": (
        {"num_key_value_heads": 4, "intermediate_size": 100, "rope_theta": 1e6},
        "40KB",
    ),
    "tied embeddings, theta 10000, FFN 172": ({"intermediate_size": 172, "tie_word_embeddings": True}, None),
}


def transformers_logits(folder) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    with torch.no_grad():
        return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()(TOKENS).logits


def our_logits(folder) -> torch.Tensor:
    return Llama.build(str(folder), max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32").model.forward(
        TOKENS
    )


@pytest.fixture(scope="module")
def round_trips(make_hf_checkpoint, tmp_path_factory):
    """name -> (HF source, Meta in 2 shards, HF again in 3 files), all float32."""
    folders = {}
    for name, (config, shard_size) in HF_MODELS.items():
        source = make_hf_checkpoint(max_shard_size=shard_size, **config)
        meta, back = tmp_path_factory.mktemp("meta"), tmp_path_factory.mktemp("hf_again")
        convert(source, str(meta), "meta", shards=2, dtype="float32")
        convert(str(meta), str(back), "hf", shards=3, dtype="float32")
        folders[name] = (source, meta, back)
    return folders


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_to_meta_to_hf_gives_transformers_the_same_logits(round_trips, name):
    source, _, back = round_trips[name]
    torch.testing.assert_close(transformers_logits(back), transformers_logits(source), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", HF_MODELS)
def test_hf_to_meta_loads_with_the_same_logits(round_trips, name):
    source, meta, _ = round_trips[name]
    assert sorted(p.name for p in meta.glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    torch.testing.assert_close(our_logits(meta), transformers_logits(source), atol=1e-4, rtol=0)


def test_meta_params_hold_only_meta_s_keys(round_trips):
    """Llama 2's ModelArgs has no rope_theta: it is written only when not 10000, as in Code Llama's files."""
    gqa, tied = (json.loads((meta / "params.json").read_text()) for _, meta, _ in round_trips.values())
    assert set(tied) <= LLAMA2_FIELDS and "rope_theta" not in tied
    assert set(gqa) <= CODE_LLAMA_FIELDS and gqa["rope_theta"] == 1e6


def test_meta_shards_hold_only_meta_s_keys_in_bf16_by_default(round_trips, tmp_path):
    source, _, _ = round_trips[next(iter(HF_MODELS))]
    convert(source, str(tmp_path / "meta"), "meta")
    shard = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.{i}.{name}.weight"
        for i in range(2)
        for name in (
            "attention.wq",
            "attention.wk",
            "attention.wv",
            "attention.wo",
            "feed_forward.w1",
            "feed_forward.w2",
            "feed_forward.w3",
            "attention_norm",
            "ffn_norm",
        )
    }
    assert set(shard) == expected
    assert {t.dtype for t in shard.values()} == {torch.bfloat16}


def test_hf_output_has_index_naming_every_file(round_trips):
    _, _, back = round_trips[next(iter(HF_MODELS))]
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert (back / "tokenizer.model").read_bytes() == (
        Path(round_trips[next(iter(HF_MODELS))][0]) / "tokenizer.model"
    ).read_bytes()


def test_meta_two_shards_to_hf_read_by_transformers(make_checkpoint, tokenizer_path, tmp_path):
    ckpt_dir, state = make_checkpoint(n_shards=2, dtype=torch.float32)
    convert(ckpt_dir, str(tmp_path / "hf"), "hf", dtype="source", tokenizer_path=tokenizer_path)
    with torch.no_grad():
        expected = to_transformers(state, SMALL_PARAMS, vocab_size=512)(TOKENS).logits
    torch.testing.assert_close(transformers_logits(tmp_path / "hf"), expected, atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (
        config["max_position_embeddings"] == 4096
    )  # Llama 2's context: a sentencepiece model, no rope scaling, rope_theta not 1e6


def test_meta_to_hf_writes_the_context_it_is_given(make_checkpoint, tokenizer_path, tmp_path):
    ckpt_dir, _ = make_checkpoint()
    main(
        [
            "--ckpt_dir",
            ckpt_dir,
            "--out",
            str(tmp_path / "hf"),
            "--format",
            "hf",
            "--tokenizer_path",
            tokenizer_path,
            "--max_position_embeddings",
            "2048",
        ]
    )
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["max_position_embeddings"] == 2048


def test_output_folder_must_be_empty(round_trips, tmp_path):
    source = round_trips[next(iter(HF_MODELS))][0]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("")
    with pytest.raises(FileExistsError, match="taken already exists and is not an empty directory"):
        convert(source, str(tmp_path / "taken"), "meta")


def test_shard_count_must_divide_the_model(round_trips, tmp_path):
    source = round_trips[next(iter(HF_MODELS))][0]
    with pytest.raises(ValueError, match="cannot split the model over 3 model-parallel ranks or shards"):
        convert(source, str(tmp_path / "out"), "meta", shards=3)


def test_tokenizer_of_another_vocabulary_is_refused(round_trips, tmp_path):
    source = round_trips[next(iter(HF_MODELS))][0]
    with pytest.raises(
        ValueError, match="tokenizer .* has 4096 tokens but the checkpoint's token embedding has 512 rows"
    ):
        convert(source, str(tmp_path / "out"), "hf", tokenizer_path=str(BUNDLED / "tokenizer.model"))


def test_cli_reports_a_bad_source_in_one_line_without_the_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--ckpt_dir", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), "--format", "hf"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"error: checkpoint directory not found: {tmp_path / 'absent'}\n"


def test_cli_reports_a_non_empty_output_in_one_line_without_the_usage(round_trips, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        main(["--ckpt_dir", round_trips[next(iter(HF_MODELS))][0], "--out", str(tmp_path / "out"), "--format", "meta"])
    assert capsys.readouterr().err == f"error: output {tmp_path / 'out'} already exists and is not an empty directory\n"


def test_cli_reports_a_usage_mistake_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--ckpt_dir", str(tmp_path), "--format", "hf"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: the following arguments are required: --out\n"


# ---- what transformers reads besides the weights: the tokenizer, the chat template, the stop tokens ----

SAMPLE_TEXTS = ["import os\n", "def f(x):  return x", "  héllo\nwörld", " a leading space", "", "x\n\n  y "]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "def f(x):  return x"},
    {"role": "assistant", "content": " ok "},
    {"role": "user", "content": "  héllo\nwörld"},
]


def llama_style_tokenizer(path: Path) -> str:
    """A 512-piece sentencepiece BPE with Llama's settings: no normalization, spaces kept, a leading space added."""
    lines = stdlib_lines(5000) + ["héllo wörld"]
    path.write_bytes(train_tokenizer(lines, 512, add_dummy_prefix=True, allow_whitespace_only_pieces=False))
    return str(path)


@pytest.fixture(scope="module")
def llama2_hf_folder(make_checkpoint, tmp_path_factory):
    """(Meta's folder with a Llama-style tokenizer.model, its conversion to a Hugging Face folder)."""
    pytest.importorskip("google.protobuf")  # transformers reads tokenizer.model with it (the test extra)
    ckpt_dir, _ = make_checkpoint()
    source = tmp_path_factory.mktemp("llama2_style")
    for path in Path(ckpt_dir).iterdir():
        (source / path.name).symlink_to(path)
    llama_style_tokenizer(source / "tokenizer.model")
    out = tmp_path_factory.mktemp("llama2_style_hf") / "hf"
    convert(str(source), str(out), "hf", dtype="float32")
    return str(source), str(out)


def test_transformers_tokenizes_text_and_chats_of_a_converted_llama2_folder_as_here(llama2_hf_folder):
    from transformers import AutoTokenizer

    from llama.chat.format import chat_format_for
    from llama.tokenizer import Tokenizer

    source, out = llama2_hf_folder
    ours, theirs = Tokenizer(str(Path(source) / "tokenizer.model")), AutoTokenizer.from_pretrained(out)
    assert [theirs(text)["input_ids"] for text in SAMPLE_TEXTS] == [
        ours.encode(text, bos=True, eos=False) for text in SAMPLE_TEXTS
    ]
    assert [theirs.decode(theirs(text)["input_ids"], skip_special_tokens=True) for text in SAMPLE_TEXTS] == [
        ours.decode(ours.encode(text, bos=True, eos=False)) for text in SAMPLE_TEXTS
    ]
    expected = theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    assert list(expected["input_ids"] if hasattr(expected, "keys") else expected) == chat_format_for(
        ours
    ).encode_dialog(CHAT)


def test_transformers_generates_from_a_converted_llama2_folder_the_greedy_tokens_of_here(llama2_hf_folder):
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    source, out = llama2_hf_folder
    llama = Llama.build(source, max_seq_len=32, max_batch_size=1, device="cpu", dtype="float32")
    assert GenerationConfig.from_pretrained(out).eos_token_id == llama.tokenizer.stop_tokens[0]
    model, tokenizer = (
        LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval(),
        AutoTokenizer.from_pretrained(out),
    )
    for text in SAMPLE_TEXTS[:2]:
        prompt = tokenizer(text, return_tensors="pt")["input_ids"]
        generated = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1] :].tolist()
        (expected,), _ = llama.generate([prompt[0].tolist()], max_gen_len=8, temperature=0)
        assert [t for t in generated if t not in llama.tokenizer.stop_tokens] == expected


@pytest.fixture(scope="module")
def bundled_hf_folder(tmp_path_factory):
    """The bundled model (a sentencepiece model that adds no leading space) converted to a Hugging Face folder."""
    out = tmp_path_factory.mktemp("bundled_hf") / "hf"
    convert(str(BUNDLED), str(out), "hf", dtype="float32")
    return str(out)


def test_transformers_tokenizes_and_generates_on_the_converted_bundled_model_as_here(bundled_hf_folder, example_script):
    """The examples' code prompts: the same ids, their text back, and the same greedy completion's text."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    llama = Llama.build(str(BUNDLED), max_seq_len=64, max_batch_size=1, device="cpu", dtype="float32")
    model = LlamaForCausalLM.from_pretrained(bundled_hf_folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(bundled_hf_folder)
    for text in example_script("example_text_completion.py").CODE_PROMPTS:
        prompt = tokenizer(text, return_tensors="pt")["input_ids"]
        assert prompt[0].tolist() == llama.tokenizer.encode(text, bos=True, eos=False)
        assert tokenizer.decode(prompt[0], skip_special_tokens=True) == text
        generated = model.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1] :]
        (expected,) = llama.text_completion([text], max_gen_len=16, temperature=0)
        assert tokenizer.decode(generated, skip_special_tokens=True) == expected["generation"]


def test_the_converted_bundled_model_says_the_context_it_was_trained_for(bundled_hf_folder):
    """params.json's max_seq_len, the length of train.py's windows, not Llama 2's 4096."""
    trained = json.loads((BUNDLED / "params.json").read_text())["max_seq_len"]
    assert trained == 256
    assert json.loads((Path(bundled_hf_folder) / "config.json").read_text())["max_position_embeddings"] == trained
    assert json.loads((Path(bundled_hf_folder) / "tokenizer_config.json").read_text())["model_max_length"] == trained
