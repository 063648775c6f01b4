"""The same weights as transformers' ``LlamaForCausalLM``: the independent implementation that the
tests check this one against and that the benchmarks compare with.

Meta rotates interleaved pairs (x[2i], x[2i+1]); transformers rotates halves (x[i], x[i+d/2]).
Permuting the rows of wq and wk within each head turns one layout into the other.
"""

import dataclasses
from typing import Dict

import torch

from llama.model import ModelArgs


def rope_parameters(args: ModelArgs) -> dict:
    """transformers' rope_parameters: plain rotary, or Llama 3.1's scaling (rope_type llama3)."""
    if args.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": args.rope_theta}
    return {"rope_type": "llama3", "rope_theta": args.rope_theta, **dataclasses.asdict(args.rope_scaling)}


def transformers_config(args: ModelArgs, max_seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_hidden_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=max_seq_len,
        rope_parameters=rope_parameters(args),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def transformers_state(state: Dict[str, torch.Tensor], args: ModelArgs) -> Dict[str, torch.Tensor]:
    """Meta's state dict (full, unsharded) renamed and permuted into transformers' layout."""

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
    return hf


def to_transformers(
    state: Dict[str, torch.Tensor], params: dict, vocab_size: int, max_seq_len: int = 256, dtype=torch.float32
):
    """A transformers ``LlamaForCausalLM`` in ``dtype`` (eval mode) holding Meta-layout ``state``."""
    from transformers import LlamaForCausalLM

    args = ModelArgs.from_dict({**params, "vocab_size": vocab_size})
    model = LlamaForCausalLM(transformers_config(args, max_seq_len)).to(dtype).eval()
    model.load_state_dict({k: v.to(dtype) for k, v in transformers_state(state, args).items()}, strict=True)
    return model
