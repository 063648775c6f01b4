"""The Llama 3 family (3.0, 3.1, 3.2) in Meta's and Hugging Face's layouts.

References: tiktoken itself for token ids; transformers' tiktoken converter for tokenizer.json and its
LlamaForCausalLM with rope llama3 for logits and greedy tokens; Meta's ChatFormat written out by hand;
transformers' apply_chat_template for a folder's chat template. The models are random: a 3.1-like one
(Meta's rope constants, factor 8, untied) and a 3.2-like one (factor 32, a 32-token original context so
that short prompts pass it, tied output), each saved by save_pretrained and written in Meta's 3.x layout
(two shards, the embedding split on the vocabulary, as Meta's VocabParallelEmbedding splits it).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

from conftest import LLAMA3_SPECIALS
from distributed_worker import LLAMA3_MAX_SEQ_LEN, llama3_inputs
from llama.generation import UNSAFE_ERROR, Llama
from llama.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "héllo wörld ✓ 日本語, isn't it? 1234567 apples",
    "  leading spaces\n\n\ttabs and <|eot_id|> as plain text <|begin_of_text|>",
    "",
]
ROPES = {  # name -> (rope_parameters of transformers' config beyond rope_type and theta, tied)
    "3.1: Meta's constants, factor 8": (
        {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        False,
    ),
    "3.2: factor 32, 32-token original context, tied": (
        {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        True,
    ),
}
# 64 dims in 4 heads of 16 (8 rotary frequencies, some in the blended band), 2 key/value heads.
DIM, N_HEADS, N_KV_HEADS, FFN, N_LAYERS, THETA = 64, 4, 2, 192, 2, 500000.0


def special(name: str, encoding) -> int:
    return encoding.n_vocab - len(LLAMA3_SPECIALS) + LLAMA3_SPECIALS.index(name)


# ---- the tokenizer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tokenizer.model", "tokenizer.json"])
def test_tokenizer_ids_equal_tiktoken(llama3_tokenizer, which):
    model_path, json_path, encoding = llama3_tokenizer
    tokenizer = Tokenizer(model_path if which == "tokenizer.model" else json_path)
    assert tokenizer.n_words == encoding.n_vocab == 556 + 256
    assert (tokenizer.bos_id, tokenizer.eos_id) == (
        special("<|begin_of_text|>", encoding),
        special("<|end_of_text|>", encoding),
    )
    assert tokenizer.stop_tokens == [
        special(name, encoding) for name in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")
    ]
    for text in TEXTS:
        expected = encoding.encode(text, allowed_special=set(), disallowed_special=())  # specials as plain text
        assert tokenizer.encode(text, bos=True, eos=True) == [tokenizer.bos_id] + expected + [tokenizer.eos_id]
        assert tokenizer.decode(expected) == text


def test_special_token_text_is_plain_text(llama3_tokenizer):
    model_path, _, encoding = llama3_tokenizer
    tokens = Tokenizer(model_path).encode("<|eot_id|>", bos=False, eos=False)
    assert special("<|eot_id|>", encoding) not in tokens and len(tokens) > 1


def test_tokenizer_json_equals_transformers(llama3_tokenizer):
    from transformers import PreTrainedTokenizerFast

    _, json_path, _ = llama3_tokenizer
    reference = PreTrainedTokenizerFast(tokenizer_file=json_path)
    for text in TEXTS[:2]:
        assert Tokenizer(json_path).encode(text, bos=False, eos=False) == reference.encode(
            text, add_special_tokens=False
        )


def test_long_runs_are_cut_as_metas_tokenizer_cuts_them():
    from llama.tokenizer import MAX_RUN_CHARS, text_pieces

    text = "a" * (MAX_RUN_CHARS + 10) + " " * (MAX_RUN_CHARS * 2 + 1) + "b"
    pieces = list(text_pieces(text))
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [MAX_RUN_CHARS, 10 + MAX_RUN_CHARS, MAX_RUN_CHARS, 2]


def test_file_that_is_neither_tokenizer_is_a_one_line_error(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("hello world\n")
    with pytest.raises(
        ValueError, match=r"^\S*tokenizer.model is neither a sentencepiece model nor a tiktoken BPE file: [^\n]*$"
    ):
        Tokenizer(str(path))


def test_tiktoken_file_with_a_bad_line_names_it(llama3_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(Path(llama3_tokenizer[0]).read_bytes() + b"IQ== 9999 extra\n")
    with pytest.raises(ValueError, match=r"tokenizer.model, line 557: expected 'base64\(token\) rank'"):
        Tokenizer(str(path))


def test_tokenizer_json_that_is_not_byte_level_bpe_names_the_file(llama3_tokenizer, tmp_path):
    data = json.loads(Path(llama3_tokenizer[1]).read_text())
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"tokenizer.json: pre_tokenizer .*Metaspace.* is not supported"):
        Tokenizer(str(tmp_path / "tokenizer.json"))


# ---- rope scaling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROPES)
def test_rope_scaling_equals_transformers(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    from llama.model import RopeScaling, llama3_rope_scaling, rope_frequencies

    scaling, _ = ROPES[name]
    config = LlamaConfig(
        hidden_size=DIM,
        num_attention_heads=N_HEADS,
        max_position_embeddings=1 << 17,
        rope_parameters={"rope_type": "llama3", "rope_theta": THETA, **scaling},
    )
    expected, _ = _compute_llama3_parameters(config, "cpu")
    ours = llama3_rope_scaling(rope_frequencies(DIM // N_HEADS, THETA), RopeScaling(**scaling))
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)
    assert (ours != rope_frequencies(DIM // N_HEADS, THETA)).any()  # the scaling changed something


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "longrope"])
def test_other_rope_types_are_errors_naming_the_type(rope_type):
    from llama.checkpoints.hf import config_to_params

    config = {
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 8,
        "rope_scaling": {"rope_type": rope_type, "factor": 2.0},
    }
    with pytest.raises(
        ValueError, match=f"^config.json: rope_scaling has rope_type '{rope_type}', which is not supported"
    ):
        config_to_params(config, "config.json")


def test_llama3_rope_without_its_keys_names_them():
    from llama.checkpoints.hf import config_to_params

    config = {
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 8,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": THETA, "factor": 8.0},
    }
    with pytest.raises(
        ValueError,
        match=r"rope_parameters of rope_type 'llama3' lacks \['low_freq_factor', "
        r"'high_freq_factor', 'original_max_position_embeddings'\]",
    ):
        config_to_params(config, "config.json")


def test_params_json_use_scaled_rope_is_metas_constants():
    from llama.model import ModelArgs, RopeScaling

    assert ModelArgs.from_dict({"use_scaled_rope": True}).rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert ModelArgs.from_dict({"use_scaled_rope": True, "rope_scaling_factor": 32}).rope_scaling.factor == 32
    assert ModelArgs.from_dict({"use_scaled_rope": False}).rope_scaling is None
    with pytest.raises(ValueError, match=r"p.json: \['rope_scaling_factor'\] need use_scaled_rope: true"):
        ModelArgs.from_dict({"rope_scaling_factor": 32}, source="p.json")


# ---- checkpoints in both layouts --------------------------------------------------------------------


def hf_model(scaling: dict, tied: bool, vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=DIM,
        intermediate_size=FFN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS,
        num_key_value_heads=N_KV_HEADS,
        rms_norm_eps=1e-5,
        max_position_embeddings=1 << 17,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "llama3", "rope_theta": THETA, **scaling},
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # random norms, so that a swapped norm shows
                p.copy_(1 + 0.1 * torch.randn_like(p))
            if name.endswith(("q_proj.weight", "k_proj.weight")):  # sharp attention, so that every angle shows
                p.mul_(10)
    return model.eval()


def meta_state(model) -> dict:
    """transformers' weights under Meta's names, wq/wk rows back in Meta's interleaved rotary order."""

    def interleave(w, n_heads):  # transformers rotates halves (x[i], x[i+d/2]); Meta pairs (x[2i], x[2i+1])
        rows, cols = w.shape
        return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)

    hf = model.state_dict()
    state = {
        "tok_embeddings.weight": hf["model.embed_tokens.weight"],
        "norm.weight": hf["model.norm.weight"],
        "output.weight": hf["lm_head.weight"],
    }  # a tied model's too: Meta's 3.2 shards carry output.weight
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        state.update(
            {
                f"layers.{i}.attention.wq.weight": interleave(hf[p + "self_attn.q_proj.weight"], N_HEADS),
                f"layers.{i}.attention.wk.weight": interleave(hf[p + "self_attn.k_proj.weight"], N_KV_HEADS),
                f"layers.{i}.attention.wv.weight": hf[p + "self_attn.v_proj.weight"],
                f"layers.{i}.attention.wo.weight": hf[p + "self_attn.o_proj.weight"],
                f"layers.{i}.feed_forward.w1.weight": hf[p + "mlp.gate_proj.weight"],
                f"layers.{i}.feed_forward.w2.weight": hf[p + "mlp.down_proj.weight"],
                f"layers.{i}.feed_forward.w3.weight": hf[p + "mlp.up_proj.weight"],
                f"layers.{i}.attention_norm.weight": hf[p + "input_layernorm.weight"],
                f"layers.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
            }
        )
    return state


def meta_split_dim(key: str):
    """Meta's Llama 3 model-parallel layout: VocabParallelEmbedding and ColumnParallelLinear split dim 0,
    RowParallelLinear (wo, w2) dim 1, norms replicated."""
    if key.endswith("norm.weight"):
        return None
    return 1 if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else 0


def write_meta_checkpoint(folder: Path, state: dict, params: dict, n_shards: int, tokenizer_path: str) -> str:
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps(params))
    for shard in range(n_shards):
        tensors = {}
        for key, tensor in state.items():
            dim = meta_split_dim(key)
            tensors[key] = tensor.clone() if dim is None else tensor.chunk(n_shards, dim)[shard].clone()
        torch.save(tensors, folder / f"consolidated.{shard:02d}.pth")
    shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
    return str(folder)


def meta_params(scaling: dict, vocab_size: int) -> dict:
    """params.json as Meta writes it for Llama 3.1 (use_scaled_rope), plus the scaling keys for values
    other than Meta's constants."""
    params = {
        "dim": DIM,
        "n_layers": N_LAYERS,
        "n_heads": N_HEADS,
        "n_kv_heads": N_KV_HEADS,
        "vocab_size": vocab_size,
        "multiple_of": 32,
        "norm_eps": 1e-5,
        "rope_theta": THETA,
        "use_scaled_rope": True,
    }
    if scaling["factor"] != 8.0:
        params["rope_scaling_factor"] = scaling["factor"]
    if scaling["original_max_position_embeddings"] != 8192:
        params["rope_original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return params


@pytest.fixture(scope="module")
def llama3_folders(llama3_tokenizer, tmp_path_factory):
    """name -> (transformers model, its save_pretrained folder with tokenizer.json, Meta's 3.x folder)."""
    model_path, json_path, encoding = llama3_tokenizer
    folders = {}
    for name, (scaling, tied) in ROPES.items():
        model = hf_model(scaling, tied, encoding.n_vocab)
        hf_folder = tmp_path_factory.mktemp("llama3_hf")
        model.save_pretrained(hf_folder)
        shutil.copyfile(json_path, hf_folder / "tokenizer.json")
        meta_folder = write_meta_checkpoint(
            tmp_path_factory.mktemp("llama3_meta") / "meta",
            meta_state(model),
            meta_params(scaling, encoding.n_vocab),
            2,
            model_path,
        )
        folders[name] = (model, str(hf_folder), meta_folder)
    return folders


def transformers_greedy(model, prompt_tokens, max_gen_len: int, stop_tokens):
    results = []
    for prompt in prompt_tokens:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_gen_len, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        out = out[0, len(prompt) :].tolist()
        results.append(out[: min([out.index(t) for t in stop_tokens if t in out], default=len(out))])
    return results


def build(folder: str, **options) -> Llama:
    return Llama.build(
        folder, max_seq_len=LLAMA3_MAX_SEQ_LEN, max_batch_size=2, device="cpu", dtype="float32", **options
    )


@pytest.mark.parametrize("layout", ["hf", "meta"])
@pytest.mark.parametrize("name", ROPES)
def test_logits_and_greedy_tokens_equal_transformers(llama3_folders, llama3_tokenizer, name, layout):
    model, hf_folder, meta_folder = llama3_folders[name]
    llama = build(hf_folder if layout == "hf" else meta_folder)
    tokens, prompts = llama3_inputs(Tokenizer(llama3_tokenizer[0]))
    with torch.no_grad():
        torch.testing.assert_close(llama.model.forward(tokens), model(tokens).logits, atol=1e-4, rtol=0)
    generated, _ = llama.generate(prompts, max_gen_len=8, temperature=0)
    assert len(prompts[0]) + len(generated[0]) > 32  # past the 3.2-like model's original context
    assert generated == transformers_greedy(model, prompts, 8, llama.tokenizer.stop_tokens)


def test_tied_hf_folder_has_no_lm_head(llama3_folders):
    from safetensors import safe_open

    _, hf_folder, _ = llama3_folders["3.2: factor 32, 32-token original context, tied"]
    with safe_open(str(Path(hf_folder) / "model.safetensors"), "pt") as file:
        assert "lm_head.weight" not in file.keys()


def test_meta_shards_split_the_vocabulary(llama3_folders, llama3_tokenizer):
    _, _, meta_folder = llama3_folders["3.1: Meta's constants, factor 8"]
    shard = torch.load(Path(meta_folder) / "consolidated.00.pth", weights_only=True)
    assert tuple(shard["tok_embeddings.weight"].shape) == (llama3_tokenizer[2].n_vocab // 2, DIM)


def test_folder_tokenizers_found_in_place(llama3_folders, llama3_tokenizer, tmp_path):
    """tokenizer.json in a Hugging Face folder; Meta's file in original/ when there is no tokenizer.json."""
    _, hf_folder, _ = llama3_folders["3.1: Meta's constants, factor 8"]
    folder = Path(shutil.copytree(hf_folder, tmp_path / "hf"))
    (folder / "tokenizer.json").unlink()
    (folder / "original").mkdir()
    shutil.copyfile(llama3_tokenizer[0], folder / "original" / "tokenizer.model")
    text = TEXTS[1]
    assert build(str(folder)).tokenizer.encode(text, bos=True, eos=False) == build(hf_folder).tokenizer.encode(
        text, bos=True, eos=False
    )


def test_vocabulary_that_does_not_match_the_embedding_is_an_error(llama3_folders, tokenizer_path):
    _, _, meta_folder = llama3_folders["3.1: Meta's constants, factor 8"]
    with pytest.raises(
        ValueError,
        match=r"^tokenizer \S+ has 512 tokens but the checkpoint's tok_embeddings.weight has 812 rows "
        r"\(\S+consolidated.00.pth\): this tokenizer is not the checkpoint's$",
    ):
        build(meta_folder, tokenizer_path=tokenizer_path)


def test_perplexity_of_a_meta_llama3_folder_is_transformers_loss(llama3_folders, tmp_path, capsys):
    from llama.perplexity import main

    model, _, meta_folder = llama3_folders["3.2: factor 32, 32-token original context, tied"]
    text = "def add(a, b):\n    return a + b\n" * 4
    (tmp_path / "text.py").write_text(text)
    main(["--ckpt_dir", meta_folder, "--text_file", str(tmp_path / "text.py"), "--device", "cpu", "--dtype", "float32"])
    tokens = torch.tensor([Tokenizer(str(Path(meta_folder) / "tokenizer.model")).encode(text, bos=True, eos=False)])
    assert tokens.shape[1] > 32  # past the original context
    with torch.no_grad():
        loss = model(tokens, labels=tokens).loss.item()
    assert f"mean loss {loss:.4f} nats/token" in capsys.readouterr().out


def test_two_processes_equal_transformers(llama3_folders, llama3_tokenizer, tmp_path):
    """Under torchrun on 2 processes, every folder of both layouts (each rank reads its part of both of
    Meta's embedding shards) gives transformers' logits and greedy tokens."""
    tokenizer = Tokenizer(llama3_tokenizer[0])
    tokens, prompts = llama3_inputs(tokenizer)
    folders = [folder for _, hf_folder, meta_folder in llama3_folders.values() for folder in (hf_folder, meta_folder)]
    worker = str(ROOT / "tests" / "distributed_worker.py")
    result = subprocess.run(
        TORCHRUN + [worker, "llama3", str(tmp_path), "-"] + folders,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    for model, hf_folder, meta_folder in llama3_folders.values():
        expected_greedy = transformers_greedy(model, prompts, 8, tokenizer.stop_tokens)
        with torch.no_grad():
            expected_logits = model(tokens).logits
        for rank_results in results:
            for folder in (hf_folder, meta_folder):
                torch.testing.assert_close(rank_results[folder]["logits"], expected_logits, atol=1e-4, rtol=0)
                assert rank_results[folder]["greedy"] == expected_greedy


# ---- chat ------------------------------------------------------------------------------------------

DIALOG = [
    {"role": "system", "content": "Be brief. "},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": " 4 "},
    {"role": "user", "content": "And <|eot_id|>?\n"},
]


def metas_chat_tokens(dialog, encoding) -> list:
    """Meta's ChatFormat.encode_dialog_prompt, written out: BOS; per message the header (special start,
    the role's text, special end, "\\n\\n"), the stripped content, end of turn; an open assistant header."""

    def header(role):
        return (
            [special("<|start_header_id|>", encoding)]
            + encoding.encode(role)
            + [special("<|end_header_id|>", encoding)]
            + encoding.encode("\n\n")
        )

    tokens = [special("<|begin_of_text|>", encoding)]
    for message in dialog:
        content = encoding.encode(message["content"].strip(), disallowed_special=())
        tokens += header(message["role"]) + content + [special("<|eot_id|>", encoding)]
    return tokens + header("assistant")


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_chat_tokens_are_metas_chat_format(llama3_folders, llama3_tokenizer, layout):
    _, hf_folder, meta_folder = llama3_folders["3.1: Meta's constants, factor 8"]
    llama = build(hf_folder if layout == "hf" else meta_folder)
    assert llama.encode_dialog(DIALOG) == metas_chat_tokens(DIALOG, llama3_tokenizer[2])


def test_chat_reply_ends_at_each_stop_token(llama3_folders, llama3_tokenizer):
    """A model made to say end-of-turn (or end-of-message, end-of-text) stops there, without it; in a
    batch of two dialogs with logprobs, where the rows stop at different steps."""
    _, hf_folder, _ = llama3_folders["3.1: Meta's constants, factor 8"]
    encoding = llama3_tokenizer[2]
    dialogs = [DIALOG[:2], DIALOG]
    llama = build(hf_folder)
    free, _ = llama.generate([llama.encode_dialog(DIALOG[:2])], max_gen_len=12, temperature=0, stop_tokens=[])
    common = max(set(free[0]), key=free[0].count)
    for name in ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"):
        model = build(hf_folder).model
        stop = special(name, encoding)
        with torch.no_grad():
            model.output.weight[stop] = 10 * model.output.weight[common]
        llama = Llama(model, llama.tokenizer)
        unstopped, _ = llama.generate(
            [llama.encode_dialog(d) for d in dialogs], max_gen_len=12, temperature=0, stop_tokens=[]
        )
        assert stop in unstopped[0]
        results = llama.chat_completion(dialogs, temperature=0, max_gen_len=12, logprobs=True)
        for result, tokens in zip(results, unstopped):
            kept = tokens[: tokens.index(stop)] if stop in tokens else tokens
            assert result["tokens"] == [encoding.decode([t]) for t in kept]
            assert len(result["logprobs"]) == len(kept)


ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


@pytest.fixture
def template_folder(llama3_folders, tmp_path):
    """The 3.1-like Hugging Face folder, fine-tuned to a Zephyr-style chat template."""
    _, hf_folder, _ = llama3_folders["3.1: Meta's constants, factor 8"]
    folder = Path(shutil.copytree(hf_folder, tmp_path / "zephyr"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "chat_template": ZEPHYR_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def test_chat_template_renders_as_apply_chat_template(template_folder):
    from transformers import AutoTokenizer

    dialog = [dict(message, content=message["content"].replace("<|eot_id|>", "eot")) for message in DIALOG]
    expected = AutoTokenizer.from_pretrained(template_folder).apply_chat_template(
        dialog, add_generation_prompt=True, tokenize=True
    )
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert build(template_folder).encode_dialog(dialog) == list(expected)


def test_chat_template_refuses_special_tokens_in_messages(template_folder):
    results = build(template_folder).chat_completion([DIALOG], temperature=0, max_gen_len=2)
    assert results[0]["generation"]["content"] == UNSAFE_ERROR


def test_chat_template_of_the_header_format_is_metas_chat_format(template_folder, llama3_tokenizer):
    """Llama 3.1 Instruct's own template (which writes the headers) gives way to Meta's format."""
    config_path = Path(template_folder) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    )
    config_path.write_text(json.dumps(config))
    assert build(template_folder).encode_dialog(DIALOG) == metas_chat_tokens(DIALOG, llama3_tokenizer[2])


# ---- convert and reshard -----------------------------------------------------------------------------


def test_convert_meta_to_hf_and_back(llama3_folders, llama3_tokenizer, tmp_path):
    """Meta's 3.x folder -> Hugging Face: config.json with rope_scaling llama3 that transformers loads to
    the same logits, tokenizer.json with the same ids; and back: params.json as Meta's, tiktoken file."""
    from transformers import LlamaForCausalLM

    from llama.convert import convert

    name = "3.2: factor 32, 32-token original context, tied"
    model, _, meta_folder = llama3_folders[name]
    encoding = llama3_tokenizer[2]
    convert(meta_folder, str(tmp_path / "hf"), "hf", dtype="float32")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "llama3", "rope_theta": THETA, **ROPES[name][0]}
    assert config["max_position_embeddings"] == 131072  # Llama 3.1 and 3.2's context, which Meta's files do not state
    tokens, _ = llama3_inputs(Tokenizer(llama3_tokenizer[0]))
    with torch.no_grad():
        converted = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)(tokens).logits
        torch.testing.assert_close(converted, model(tokens).logits, atol=1e-4, rtol=0)
    hf_tokenizer = Tokenizer(str(tmp_path / "hf" / "tokenizer.json"))
    for text in TEXTS:
        assert hf_tokenizer.encode(text, bos=True, eos=False) == [hf_tokenizer.bos_id] + encoding.encode(
            text, disallowed_special=()
        )

    convert(str(tmp_path / "hf"), str(tmp_path / "meta"), "meta", shards=2, dtype="float32")
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params == {**meta_params(ROPES[name][0], encoding.n_vocab), "multiple_of": 64}
    assert Path(tmp_path / "meta" / "tokenizer.model").read_bytes() == Path(llama3_tokenizer[0]).read_bytes()
    shard = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    assert tuple(shard["tok_embeddings.weight"].shape) == (encoding.n_vocab // 2, DIM)
    with torch.no_grad():
        torch.testing.assert_close(
            build(str(tmp_path / "meta")).model.forward(tokens), model(tokens).logits, atol=1e-4, rtol=0
        )


def test_reshard_writes_llama3_shards_as_meta_splits_them(llama3_folders, llama3_tokenizer, tmp_path):
    from llama.reshard import reshard

    model, _, meta_folder = llama3_folders["3.1: Meta's constants, factor 8"]
    reshard(meta_folder, str(tmp_path / "one"), 1)  # copies the tokenizer too
    reshard(str(tmp_path / "one"), str(tmp_path / "two"), 2)  # from one shard: the tokenizer says Llama 3
    for source in (meta_folder, str(tmp_path / "two")):
        for i in range(2):
            expected = torch.load(Path(meta_folder) / f"consolidated.{i:02d}.pth", weights_only=True)
            written = torch.load(Path(source) / f"consolidated.{i:02d}.pth", weights_only=True)
            for key in expected:
                assert torch.equal(written[key], expected[key]), key


def test_chat_stream_and_server_request_use_metas_chat_format(llama3_folders, llama3_tokenizer):
    """The stream's pieces join to chat_completion's answer; the server's chat request is parsed into
    the same prompt, and its token bytes are tiktoken's."""
    from llama.server.protocol import parse_chat
    from llama.server.schemas import ChatRequest

    _, hf_folder, _ = llama3_folders["3.1: Meta's constants, factor 8"]
    encoding = llama3_tokenizer[2]
    llama = build(hf_folder)
    answer = llama.chat_completion([DIALOG], temperature=0, max_gen_len=6)[0]["generation"]["content"]
    assert "".join(piece for (piece,) in llama.chat_completion_stream([DIALOG], temperature=0, max_gen_len=6)) == answer
    job = parse_chat(ChatRequest.model_validate({"messages": DIALOG, "max_tokens": 4}), llama, "test")
    assert job.prompt_tokens == [metas_chat_tokens(DIALOG, encoding)]
    token = encoding.encode(" héllo")[0]
    assert llama.tokenizer.token_bytes(token) == encoding.decode_single_token_bytes(
        token
    )  # what the server's logprobs show


@pytest.mark.parametrize("legacy", [True, False])
def test_chat_template_with_a_sentencepiece_tokenizer_renders_as_apply_chat_template(tmp_path, legacy):
    """A Llama 2 fine-tune (TinyLlama-Chat style) with its own template, read by transformers' Llama
    tokenizer from tokenizer.model: it needs protobuf (setup.py's test extra) to convert the model."""
    pytest.importorskip("google.protobuf")

    from transformers import AutoTokenizer

    from conftest import stdlib_lines

    # Llama's settings: no normalization, whitespace kept, a leading space added
    lines = stdlib_lines(5000) + ["héllo wörld"]
    model = train_tokenizer(lines, 400, add_dummy_prefix=True, allow_whitespace_only_pieces=False)
    (tmp_path / "tokenizer.model").write_bytes(model)
    template = "{{ bos_token }}" + ZEPHYR_TEMPLATE + "{{ ' ' + eos_token + '  x' }}"
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": template,
        "legacy": legacy,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "def f(x):  return x"},
        {"role": "assistant", "content": " ok "},
        {"role": "user", "content": "  héllo\nwörld"},
    ]
    expected = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        dialog, add_generation_prompt=True, tokenize=True
    )
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected

    from llama.chat.format import chat_format_for
    from llama.checkpoints.hf import read_chat_template

    chat_format = chat_format_for(Tokenizer(str(tmp_path / "tokenizer.model")), read_chat_template(str(tmp_path)))
    assert chat_format.encode_dialog(dialog) == list(expected)


def test_transformers_tokenizes_chats_and_generates_from_a_converted_folder_as_here(
    llama3_folders, llama3_tokenizer, tmp_path
):
    """Meta's 3.x folder -> Hugging Face: AutoTokenizer adds BOS and encodes text and chats (the header
    template) as tiktoken and Meta's ChatFormat; generate stops at the stop tokens and, greedy, writes
    this package's tokens."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    from llama.convert import convert

    _, _, meta_folder = llama3_folders["3.1: Meta's constants, factor 8"]
    encoding = llama3_tokenizer[2]
    convert(meta_folder, str(tmp_path / "hf"), "hf", dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    bos = special("<|begin_of_text|>", encoding)
    assert [tokenizer(text)["input_ids"] for text in TEXTS[:2]] == [[bos] + encoding.encode(text) for text in TEXTS[:2]]
    dialog = [dict(message, content=message["content"].replace("<|eot_id|>", "eot")) for message in DIALOG]
    expected = tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True)
    assert list(expected["input_ids"] if hasattr(expected, "keys") else expected) == metas_chat_tokens(dialog, encoding)
    stops = [special(name, encoding) for name in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    assert GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == stops

    llama = build(meta_folder)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    prompt = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1] :].tolist()
    (ours,), _ = llama.generate([prompt[0].tolist()], max_gen_len=8, temperature=0)
    assert [t for t in generated if t not in stops] == ours


def test_a_refused_conversion_leaves_no_output_folder(llama3_folders, tmp_path):
    """A tokenizer.json that splits text otherwise than Meta's pattern cannot become Meta's tiktoken file."""
    from llama.convert import convert

    _, hf_folder, _ = llama3_folders["3.1: Meta's constants, factor 8"]
    folder = Path(shutil.copytree(hf_folder, tmp_path / "other_pattern"))
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] += "|x"
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="Meta's tokenizer.model implies Meta's split pattern"):
        convert(str(folder), str(tmp_path / "out" / "meta"), "meta")
    assert not (tmp_path / "out").exists()


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"],
    "additionalProperties": False,
}


def test_tool_calls_are_written_in_metas_llama31_format_and_a_forced_call_is_valid(llama3_folders, llama3_tokenizer):
    """Llama 3.1's JSON tool calling as Meta's llama-models writes it (Environment: ipython, the
    functions in a user message, a call ending with <|eom_id|>, its result in the ipython role); a
    forced call from random weights is still a valid call."""
    from datetime import datetime

    from llama.chat.tool_calls import parse_calls
    from llama.server.protocol import parse_chat
    from llama.server.schemas import ChatRequest

    _, hf_folder, _ = llama3_folders["3.1: Meta's constants, factor 8"]
    encoding = llama3_tokenizer[2]
    llama = Llama.build(hf_folder, max_seq_len=640, max_batch_size=2, device="cpu", dtype="float32")
    tool = {
        "type": "function",
        "function": {"name": "weather", "description": "The weather in a city", "parameters": WEATHER},
    }
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
        {"role": "user", "content": "And in Rome?"},
    ]
    body = {"messages": messages, "tools": [tool], "tool_choice": "required", "max_tokens": 60, "temperature": 0}
    job = parse_chat(ChatRequest.model_validate(body), llama, "test")

    def header(role):
        return (
            [special("<|start_header_id|>", encoding)]
            + encoding.encode(role)
            + [special("<|end_header_id|>", encoding)]
            + encoding.encode("\n\n")
        )

    instruction = (
        "Answer the user's question by making use of the following functions if needed.\n"
        "If none of the function can be used, please say so.\n"
        f"Here is a list of functions in JSON format:\n{json.dumps(tool, indent=4)}\n\n"
        "Return function calls in JSON format."
    )
    system = (
        "Environment: ipython\n\nCutting Knowledge Date: December 2023\n"
        f"Today Date: {datetime.now().strftime('%d %B %Y')}\n\nBe brief."
    )
    expected = metas_chat_tokens(
        [{"role": "system", "content": system}, {"role": "user", "content": instruction}, messages[1]], encoding
    )
    expected += encoding.encode('{"type": "function", "name": "weather", "parameters": {"city": "Paris"}}') + [
        special("<|eom_id|>", encoding)
    ]
    expected += header("ipython") + encoding.encode("22 C") + [special("<|eot_id|>", encoding)]
    expected += (
        header("user") + encoding.encode("And in Rome?") + [special("<|eot_id|>", encoding)] + header("assistant")
    )
    assert job.prompt_tokens == [expected]
    request = llama.engine.submit(job.prompt_tokens, job.options, "dialog")
    list(llama.engine.run_until_done(request))
    ((name, arguments),) = parse_calls(request.texts()[0], ["weather"])
    assert name == "weather" and json.loads(request.texts()[0])["type"] == "function"
    jsonschema.validate(arguments, WEATHER)
