"""Hugging Face folders load directly: random transformers LlamaForCausalLM models saved with
save_pretrained give transformers' own logits, greedy tokens and loss, on one process and on two, with
the folder's own tokenizer.model; every unsupported setting or broken file is an error naming it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_worker import PROMPTS, TOKENS
from llama.checkpoints.hf import meta_ffn_params, rotary_from_hf, rotary_to_hf
from llama.generation import Llama
from llama.model import ModelArgs

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# name -> (dtype, max_shard_size, LlamaConfig keys). 64 dims: Meta's rule gives 192 with multiple_of 32.
CONFIGS = {
    "gqa, Code Llama's theta, odd FFN size, 8 safetensors files": (
        torch.float32,
        "40KB",
        {
            "num_key_value_heads": 4,
            "intermediate_size": 100,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        },
    ),
    "tied embeddings, bf16, one file": (
        torch.bfloat16,
        None,
        {"intermediate_size": 172, "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    ),
}


@pytest.fixture(scope="module")
def hf_folders(make_hf_checkpoint):
    return {
        name: make_hf_checkpoint(dtype, shard_size, **config) for name, (dtype, shard_size, config) in CONFIGS.items()
    }


def transformers_model(folder: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def transformers_greedy(model, prompts, max_gen_len: int):
    """transformers' greedy continuation of each prompt, cut before EOS as Llama.generate cuts it."""
    results = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_gen_len, do_sample=False)[
            0, len(prompt) :
        ].tolist()
        results.append(out[: out.index(2)] if 2 in out else out)
    return results


def build(folder: str) -> Llama:
    return Llama.build(folder, max_seq_len=32, max_batch_size=2, device="cpu", dtype="float32")


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(hf_folders, name):
    llama = build(hf_folders[name])
    with torch.no_grad():
        expected = transformers_model(hf_folders[name])(TOKENS).logits
    torch.testing.assert_close(llama.model.forward(TOKENS), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_tokens_match_transformers(hf_folders, name):
    llama = build(hf_folders[name])
    tokens, _ = llama.generate(PROMPTS, max_gen_len=8, temperature=0)
    assert tokens == transformers_greedy(transformers_model(hf_folders[name]), PROMPTS, 8)


def test_two_processes_match_transformers(hf_folders, tokenizer_path, tmp_path):
    folders = list(hf_folders.values())
    worker = str(ROOT / "tests" / "distributed_worker.py")
    result = subprocess.run(
        TORCHRUN + [worker, "generate", str(tmp_path), tokenizer_path] + folders,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for folder in folders:
            model = transformers_model(folder)
            with torch.no_grad():
                torch.testing.assert_close(results[folder]["logits"], model(TOKENS).logits, atol=1e-4, rtol=0)
            assert results[folder]["greedy"] == transformers_greedy(model, PROMPTS, 8)


def test_pytorch_model_bin_folder_loads(make_hf_checkpoint, tmp_path):
    """The second choice: a pytorch_model.bin next to config.json, read with weights_only."""
    folder = Path(make_hf_checkpoint(num_key_value_heads=2, intermediate_size=96))
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    for name in ("config.json", "tokenizer.model"):
        shutil.copyfile(folder / name, bin_folder / name)
    model = transformers_model(str(folder))
    torch.save(model.state_dict(), bin_folder / "pytorch_model.bin")
    with torch.no_grad():
        expected = model(TOKENS).logits
    torch.testing.assert_close(build(str(bin_folder)).model.forward(TOKENS), expected, atol=1e-4, rtol=0)


def test_rotary_permutation_inverts():
    weight = torch.randn(4 * 8, 5)
    torch.testing.assert_close(rotary_from_hf(rotary_to_hf(weight, 4), 4), weight, atol=0, rtol=0)


@pytest.mark.parametrize(
    "dim, hidden_dim, expected",
    [
        (4096, 11008, {"multiple_of": 256}),  # Llama 2 7B: Meta's own params
        (5120, 13824, {"multiple_of": 512}),  # Llama 2 13B: Meta writes 256, which gives the same size
        (8192, 28672, {"multiple_of": 4096, "ffn_dim_multiplier": 1.3}),  # Llama 2 70B: Meta's own params
    ],
)
def test_meta_ffn_params_of_published_models(dim, hidden_dim, expected):
    assert meta_ffn_params(dim, hidden_dim) == expected
    assert ModelArgs(dim=dim, n_heads=dim // 128, **expected).ffn_hidden_dim == hidden_dim


def test_meta_ffn_params_express_any_size():
    for hidden_dim in list(range(1, 400)) + [28672, 14336, 5632, 11007]:
        params = meta_ffn_params(64 if hidden_dim < 400 else 4096, hidden_dim)
        assert ModelArgs(dim=64 if hidden_dim < 400 else 4096, n_heads=8, **params).ffn_hidden_dim == hidden_dim, (
            hidden_dim,
            params,
        )


def edit_config(folder: str, **changes) -> str:
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return folder


@pytest.fixture
def hf_copy(hf_folders, tmp_path):
    """A private copy of the sharded folder, to break."""
    return str(shutil.copytree(hf_folders[next(iter(CONFIGS))], tmp_path / "copy"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "mistral", "sliding_window": 4096}, "model_type = 'mistral' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act = 'gelu' is not supported"),
        ({"attention_bias": True}, "attention_bias = True is not supported"),
        ({"mlp_bias": True}, "mlp_bias = True is not supported"),
        ({"head_dim": 16}, "head_dim = 16 is not supported; this model needs hidden_size / num_attention_heads = 8"),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            "rope_parameters has rope_type 'linear', which is not supported",
        ),
        (
            {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "rope_scaling has rope_type 'dynamic', which is not supported",
        ),
        ({"intermediate_size": None}, "intermediate_size must be a positive integer, found None"),
    ],
)
def test_unsupported_config_is_an_error_naming_the_key(hf_copy, changes, message):
    with pytest.raises(ValueError, match=message):
        build(edit_config(hf_copy, **changes))


def second_shard(folder: str) -> Path:
    index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())
    return Path(folder) / sorted(set(index["weight_map"].values()))[1]


def test_shard_named_in_index_but_missing(hf_copy):
    shard = second_shard(hf_copy)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"{shard.name}, named in .*model.safetensors.index.json"):
        build(hf_copy)


def test_corrupt_safetensors_header_names_the_file(hf_copy):
    shard = second_shard(hf_copy)
    shard.write_bytes(b"\x20\x00\x00\x00\x00\x00\x00\x00{not a header" + shard.read_bytes()[40:])
    with pytest.raises(ValueError, match=f"cannot read safetensors file .*{shard.name}"):
        build(hf_copy)


def test_wrong_weight_shape_names_key_and_shapes(hf_copy):
    edit_config(hf_copy, intermediate_size=128)
    with pytest.raises(ValueError, match=r"mlp.gate_proj.weight has shape \(100, 64\), expected \(128, 64\)"):
        build(hf_copy)


def test_tokenizer_defaults_to_the_folder_s_own(hf_copy, tokenizer_path):
    assert (
        build(hf_copy).tokenizer.sp_model.serialized_model_proto()
        == Llama.build(hf_copy, tokenizer_path, 32, 2, device="cpu").tokenizer.sp_model.serialized_model_proto()
    )


def test_missing_default_tokenizer_names_where_it_looked(hf_copy):
    (Path(hf_copy) / "tokenizer.model").unlink()
    with pytest.raises(
        FileNotFoundError,
        match="no --tokenizer_path given, and none of .*copy.tokenizer.model, .*copy.tokenizer.json, "
        ".*copy.original.tokenizer.model or .*tokenizer.model exists",
    ):
        build(hf_copy)


def test_perplexity_of_an_hf_folder_is_transformers_loss(hf_folders, tmp_path, capsys):
    """llama.perplexity with only --ckpt_dir: the folder's tokenizer, and transformers' mean loss."""
    from llama.perplexity import main
    from llama.tokenizer import Tokenizer

    folder = hf_folders[next(iter(CONFIGS))]
    text = "def add(a, b):\n    return a + b\n"
    (tmp_path / "text.py").write_text(text)
    main(["--ckpt_dir", folder, "--text_file", str(tmp_path / "text.py"), "--device", "cpu", "--dtype", "float32"])
    tokens = torch.tensor([Tokenizer(str(Path(folder) / "tokenizer.model")).encode(text, bos=True, eos=False)])
    with torch.no_grad():
        loss = transformers_model(folder)(tokens, labels=tokens).loss.item()
    assert f"mean loss {loss:.4f} nats/token" in capsys.readouterr().out


def test_example_runs_an_hf_folder_with_one_command(hf_folders):
    folder = hf_folders[next(iter(CONFIGS))]
    result = subprocess.run(
        [
            sys.executable,
            "example_text_completion.py",
            "--ckpt_dir",
            folder,
            "--max_gen_len",
            "4",
            "--prompts",
            "['import os']",
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"Loaded {folder} (tokenizer: {Path(folder) / 'tokenizer.model'}) on cpu with " in result.stdout


def test_missing_weight_is_an_error_naming_it(hf_folders, tmp_path):
    folder = tmp_path / "bin"
    shutil.copytree(hf_folders[next(iter(CONFIGS))], folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = transformers_model(hf_folders[next(iter(CONFIGS))]).state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"missing weight\(s\) \['model.layers.1.mlp.up_proj.weight'\]"):
        build(str(folder))


def test_folder_without_weights_names_the_files_looked_for(hf_copy):
    for path in Path(hf_copy).glob("model*"):
        path.unlink()
    with pytest.raises(
        FileNotFoundError, match="no weights in .*: expected model.safetensors.index.json, model.safetensors, "
    ):
        build(hf_copy)
