"""Fixtures: a small sentencepiece model trained on the standard library's source, random-weight
checkpoints written in Meta's exact layout, and the same weights as a transformers LlamaForCausalLM."""

import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.distributed as dist

from bench.transformers_llama import to_transformers  # noqa: F401 (the tests import it from here)
from llama.checkpoint import save_checkpoint
from llama.model import ModelArgs, Transformer

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
    prefix = tmp_path_factory.mktemp("tokenizer") / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(stdlib_lines(20000) + ["[INST] <<SYS>> <</SYS>> [/INST] héllo wörld ✓"]),
        model_prefix=str(prefix),
        vocab_size=512,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return str(prefix) + ".model"


def random_state(args: ModelArgs, seed: int = 0) -> dict:
    """Full (unsharded) random weights for ``args``; norms are random too, so a swapped norm shows."""
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
