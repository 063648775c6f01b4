"""Fixtures: a small sentencepiece model trained on the standard library's source, random-weight
checkpoints written in Meta's exact layout, and the same weights as a transformers LlamaForCausalLM."""

import sysconfig
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

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


def to_transformers(state: dict, params: dict, vocab_size: int, max_seq_len: int = 256):
    """The same weights as a transformers LlamaForCausalLM (fp32).

    Meta rotates interleaved pairs (x[2i], x[2i+1]); transformers rotates halves (x[i], x[i+d/2]).
    Permuting the rows of wq and wk within each head turns one layout into the other.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    args = ModelArgs.from_dict({**params, "vocab_size": vocab_size})
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=max_seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )

    def permute(w, n_heads):
        rows, cols = w.shape
        return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)

    hf = {
        "model.embed_tokens.weight": state["tok_embeddings.weight"],
        "model.norm.weight": state["norm.weight"],
        "lm_head.weight": state["output.weight"],
    }
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        hf[q + "self_attn.q_proj.weight"] = permute(state[p + "attention.wq.weight"], args.n_heads)
        hf[q + "self_attn.k_proj.weight"] = permute(state[p + "attention.wk.weight"], args.n_kv_heads)
        hf[q + "self_attn.v_proj.weight"] = state[p + "attention.wv.weight"]
        hf[q + "self_attn.o_proj.weight"] = state[p + "attention.wo.weight"]
        hf[q + "mlp.gate_proj.weight"] = state[p + "feed_forward.w1.weight"]
        hf[q + "mlp.down_proj.weight"] = state[p + "feed_forward.w2.weight"]
        hf[q + "mlp.up_proj.weight"] = state[p + "feed_forward.w3.weight"]
        hf[q + "input_layernorm.weight"] = state[p + "attention_norm.weight"]
        hf[q + "post_attention_layernorm.weight"] = state[p + "ffn_norm.weight"]
    model = LlamaForCausalLM(config).float().eval()
    model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=True)
    return model
