"""Fixtures: a small sentencepiece model trained on the standard library's source, random-weight
checkpoints written in Meta's exact layout, the same weights as a transformers LlamaForCausalLM, and
random transformers models saved as Hugging Face folders."""

import importlib.util
import os
import shutil
import sysconfig
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from bench.transformers_llama import to_transformers  # noqa: F401 (the tests import it from here)
from llama.checkpoints.files import BUNDLED
from llama.checkpoints.placement import place_tensors
from llama.checkpoints.writers import save_checkpoint
from llama.layers.quantize import Quantization, quantizable_weights
from llama.model import ModelArgs, Transformer
from llama.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BUNDLED_TOKENIZER = BUNDLED / "tokenizer.model"  # the tests import both from here


@pytest.fixture(scope="session", autouse=True)
def timed_choices_folder(tmp_path_factory):
    """The choices timed on this machine (``llama.layers.timed_choices``) go to a folder of the session's own, in
    this process and the commands it starts, never the user's cache: each session times afresh."""
    with mock.patch.dict(os.environ, {"LLAMA_CACHE_DIR": str(tmp_path_factory.mktemp("llama-cache"))}):
        yield


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="device of the models built by make_llama (e.g. cuda): "
        "runs the model, generation, streaming and decoding tests there",
    )


@pytest.fixture(scope="session")
def example_script():
    """example_script("example_chat.py") -> the example script at the repository root, imported as a
    module (its main is not run): its main, prompts and dialogs."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def device(request) -> str:
    device = request.config.getoption("--device")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: CUDA is not available on this machine")
    return device


SMALL_PARAMS = {  # grouped-query attention, ffn_dim_multiplier and a non-default rope_theta
    "dim": 64,
    "n_layers": 2,
    "n_heads": 8,
    "n_kv_heads": 4,
    "multiple_of": 32,
    "ffn_dim_multiplier": 1.3,
    "norm_eps": 1e-5,
    "rope_theta": 50000.0,
    "vocab_size": -1,
}


def stdlib_lines(limit: int):
    """Lines of Python source from the running interpreter's standard library."""
    lines = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        lines += [line for line in path.read_text(errors="ignore").splitlines() if line.strip()]
        if len(lines) >= limit:
            break
    return lines[:limit]


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    """A 512-piece BPE tokenizer with Llama's special ids (unk 0, BOS 1, EOS 2, no pad) and byte fallback."""
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    lines = stdlib_lines(20000) + ["[INST] <<SYS>> <</SYS>> [/INST] héllo wörld ✓"]
    path.write_bytes(
        train_tokenizer(lines, vocab_size=512, keep_whitespace=False)
    )  # sentencepiece's defaults, as Llama's
    return str(path)


def random_state(args: ModelArgs, seed: int = 0) -> dict:
    """Full (unsharded) random weights for ``args``; norms are random too, so a swapped norm shows."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def quantize_linears(model: Transformer, quantization: Quantization) -> Transformer:
    """``model`` with its linear weights quantized in place by the loader's own step
    (``placement.place_tensors``), as ``Llama.build(quantize=...)`` quantizes a checkpoint's; returns it."""
    embedding = model.tok_embeddings.weight
    linears = [(f"{name}.weight", module.weight.detach()) for name, module in quantizable_weights(model).items()]
    place_tensors(model, linears, embedding.device, embedding.dtype, quantization)
    return model


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer_path):
    """make_checkpoint(n_shards=1, params=SMALL_PARAMS, seed=0, dtype=bfloat16) -> (ckpt_dir, full state)."""

    def make(n_shards: int = 1, params: dict = SMALL_PARAMS, seed: int = 0, dtype=torch.bfloat16):
        args = ModelArgs.from_dict({**params, "vocab_size": 512})
        state = random_state(args, seed)
        ckpt_dir = tmp_path_factory.mktemp("ckpt")
        save_checkpoint(str(ckpt_dir), params, state, n_shards=n_shards, dtype=dtype)
        return str(ckpt_dir), {k: v.to(dtype) for k, v in state.items()}

    return make


@pytest.fixture(scope="session")
def checkpoint(make_checkpoint):
    """The session's shared checkpoint (SMALL_PARAMS, seed 0, one shard): (ckpt_dir, full state)."""
    return make_checkpoint()


@pytest.fixture(scope="session")
def make_llama(checkpoint, tokenizer_path, device):
    """make_llama(max_seq_len=96, max_batch_size=4, **build_options) -> a float32 Llama on the
    session's --device (default: the CPU), on the shared checkpoint."""
    from llama.generation import Llama

    ckpt_dir, _ = checkpoint

    def make(max_seq_len: int = 96, max_batch_size: int = 4, **build_options):
        return Llama.build(
            ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device=device, dtype="float32", **build_options
        )

    return make


HF_CONFIG = {
    "vocab_size": 512,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@pytest.fixture(scope="session")
def make_hf_checkpoint(tmp_path_factory, tokenizer_path):
    """make_hf_checkpoint(dtype=float32, max_shard_size=None, seed=0, **LlamaConfig keys) -> folder of a
    random transformers LlamaForCausalLM saved with save_pretrained, with the session's tokenizer.model."""

    def make(dtype=torch.float32, max_shard_size=None, seed=0, **config):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**{**HF_CONFIG, **config}))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):  # random norms, so that a swapped norm shows
                    p.copy_(1 + 0.1 * torch.randn_like(p))
        folder = tmp_path_factory.mktemp("hf")
        extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.to(dtype).save_pretrained(folder, **extra)
        shutil.copyfile(tokenizer_path, folder / "tokenizer.model")
        return str(folder)

    return make


@pytest.fixture
def fake_world():
    """fake_world(n): this process becomes rank 0 of a fake process group of n ranks (no collective
    runs), so the model's per-rank shapes are those of a real rank of an n-process job."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def init(world_size: int):
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- Llama 3: a small byte-level BPE tokenizer in Meta's and Hugging Face's files ---------------------

# Meta's split pattern and special tokens, as Meta's llama3 / llama-models tokenizer.py write them.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]


def train_byte_bpe(lines, n_merges: int) -> dict:
    """Ranks of a byte-level BPE vocabulary: the 256 bytes, then ``n_merges`` merges of the most frequent
    adjacent pair within the pattern's pieces of ``lines`` (ties broken by the pair's bytes)."""
    import collections

    import regex

    words = collections.Counter(
        tuple(bytes([b]) for b in piece.encode()) for line in lines for piece in regex.findall(LLAMA3_PATTERN, line)
    )
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < 256 + n_merges:
        pairs = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        (left, right), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        ranks.setdefault(left + right, len(ranks))
        merged = {}
        for word, count in words.items():
            if left not in word or right not in word:
                merged[word] = merged.get(word, 0) + count
                continue
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == (left, right):
                    out.append(left + right)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return ranks


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    """(Meta's tokenizer.model, the tokenizer.json transformers' tiktoken converter makes of it, and the
    reference tiktoken.Encoding) for a 300-merge BPE trained on the standard library's source."""
    import base64

    import tiktoken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    folder = tmp_path_factory.mktemp("llama3_tokenizer")
    ranks = train_byte_bpe(stdlib_lines(1000) + ["héllo wörld ✓ 日本語 <|eot_id|> 12345"], 300)
    lines = [
        base64.b64encode(token) + b" " + str(rank).encode()
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
    ]
    (folder / "tokenizer.model").write_bytes(b"\n".join(lines) + b"\n")
    specials = {token: len(ranks) + i for i, token in enumerate(LLAMA3_SPECIALS)}
    encoding = tiktoken.Encoding("test", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": ""}):  # tiktoken would cache the file by its path
        converter = TikTokenConverter(
            vocab_file=str(folder / "tokenizer.model"), pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIALS
        )
        converter.converted().save(str(folder / "tokenizer.json"))
    return str(folder / "tokenizer.model"), str(folder / "tokenizer.json"), encoding
