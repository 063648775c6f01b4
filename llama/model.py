"""The Llama 2 and Llama 3 transformer, in the order the data flows: hyper-parameters, RMSNorm, rotary
embeddings, attention over its KV cache's blocks, the SwiGLU feed-forward, a block, the model.

Pure math: no file I/O and no device selection. Model parallelism enters only through the layer
classes of ``llama.layers.parallel``; with one process they are plain linear and embedding layers.
"""

import math
from dataclasses import dataclass, fields
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from llama.layers.kv_cache import DEFAULT_BLOCK_SIZE, BlockTables, CachePass, KVCache, contiguous_tables
from llama.layers.loss import causal_lm_loss, chunked_causal_lm_loss, chunked_token_logprobs, token_logprobs
from llama.layers.parallel import (
    ColumnParallelLinear,
    FusedColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    check_world_size,
    fuse_parts,
    group_size,
    split_size,
)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's stretch of the rotary wavelengths for a longer context (``llama3_rope_scaling``).
    The defaults are Meta's constants (llama-models' ``apply_scaling``)."""

    factor: float = 8.0  # how much the long wavelengths are stretched (Llama 3.2 1B/3B: 32)
    low_freq_factor: float = 1.0  # wavelengths above original / low_freq_factor are stretched fully
    high_freq_factor: float = 4.0  # wavelengths below original / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # the context the model was first trained on

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"RopeScaling.{name} must be a positive number, got {value!r}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"RopeScaling.high_freq_factor = {self.high_freq_factor} "
                f"must exceed low_freq_factor = {self.low_freq_factor}"
            )


# params.json's keys for the scaling: use_scaled_rope (Meta's, Llama 3.1+) turns it on with Meta's
# constants; rope_scaling_factor and rope_high_freq_factor are llama-models' names (Llama 4) for
# other values, and the last two follow their pattern, so that any Hugging Face llama3 setting fits.
ROPE_SCALING_KEYS = {
    "rope_scaling_factor": "factor",
    "rope_low_freq_factor": "low_freq_factor",
    "rope_high_freq_factor": "high_freq_factor",
    "rope_original_max_position_embeddings": "original_max_position_embeddings",
}


@dataclass
class ModelArgs:
    """Every key of Meta's ``params.json``, and Meta's two sizes: ``max_batch_size`` rows of
    ``max_seq_len`` positions."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None: as many as n_heads (no grouped-query attention)
    vocab_size: int = -1  # -1: taken from the tokenizer
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Code Llama uses 1e6, Llama 3 5e5
    rope_scaling: Optional[RopeScaling] = None  # Llama 3.1+: params.json's use_scaled_rope
    max_batch_size: int = 32  # Meta's: the rows of the model's own cache (an engine sizes its pool itself)
    max_seq_len: int = 2048  # the longest row: the rotary table's positions

    @classmethod
    def from_dict(cls, params: dict, source: str = "params") -> "ModelArgs":
        """Build from a ``params.json`` dictionary; an unknown key is an error naming the known ones.
        ``use_scaled_rope`` (and ``ROPE_SCALING_KEYS``) become ``rope_scaling``."""
        params = dict(params)
        use_scaled_rope = params.pop("use_scaled_rope", False)
        scaling = {ROPE_SCALING_KEYS[key]: params.pop(key) for key in list(params) if key in ROPE_SCALING_KEYS}
        if not isinstance(use_scaled_rope, bool):
            raise ValueError(f"{source}: use_scaled_rope must be true or false, got {use_scaled_rope!r}")
        if scaling and not use_scaled_rope:
            raise ValueError(
                f"{source}: {sorted(k for k in ROPE_SCALING_KEYS if ROPE_SCALING_KEYS[k] in scaling)} "
                "need use_scaled_rope: true"
            )
        known = [f.name for f in fields(cls) if f.name != "rope_scaling"]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {unknown}; known keys are {known + ['use_scaled_rope', *ROPE_SCALING_KEYS]}"
            )
        if use_scaled_rope:
            params["rope_scaling"] = RopeScaling(**scaling)
        return cls(**params)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelArgs.dim = {self.dim} is not divisible by n_heads = {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs.n_heads = {self.n_heads} is not divisible by n_kv_heads = {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"head_dim = dim / n_heads = {self.dim // self.n_heads} must be even for rotary embeddings"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's rule: 2/3 of 4*dim (SwiGLU has three matrices, not two), scaled, rounded up."""
        hidden_dim = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden_dim = int(self.ffn_dim_multiplier * hidden_dim)
        return self.multiple_of * ((hidden_dim + self.multiple_of - 1) // self.multiple_of)

    @property
    def split_sizes(self) -> dict:
        """The sizes that model parallelism divides over the ranks (heads, hidden units, vocabulary)."""
        return {
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "dim": self.dim,
            "ffn_hidden_dim": self.ffn_hidden_dim,
            "vocab_size": self.vocab_size,
        }


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 whatever the model's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """The rotation speed of each pair of features, ``theta^(-2i/head_dim)``: (head_dim/2,). Meta's shards
    store the same numbers as ``rope.freqs``."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device="cpu").float() / head_dim))


def llama3_rope_scaling(freqs: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.1's frequencies for a long context: a pair whose wavelength (2 pi / frequency) is longer
    than ``original / low_freq_factor`` turns ``factor`` times slower, one shorter than ``original /
    high_freq_factor`` keeps its speed (it already repeats many times within the original context), and
    in between the speed is blended linearly in ``original / wavelength``. (head_dim/2,) -> (head_dim/2,)."""
    wavelengths = 2 * math.pi / freqs
    original = scaling.original_max_position_embeddings
    blend = (original / wavelengths - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - blend) * freqs / scaling.factor + blend * freqs
    stretched = torch.where(wavelengths > original / scaling.low_freq_factor, freqs / scaling.factor, blended)
    return torch.where(wavelengths < original / scaling.high_freq_factor, freqs, stretched)


def precompute_rope(
    head_dim: int, end: int, theta: float, scaling: Optional[RopeScaling] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angle ``position * theta^(-2i/head_dim)`` (with ``scaling``: the
    frequencies of ``llama3_rope_scaling``), each (end, head_dim/2), computed on the CPU even inside
    ``torch.device("meta")``, where the loader builds the model."""
    freqs = rope_frequencies(head_dim, theta)
    if scaling is not None:
        freqs = llama3_rope_scaling(freqs, scaling)
    angles = torch.outer(torch.arange(end, dtype=torch.float32, device="cpu"), freqs)
    return angles.cos(), angles.sin()


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of every head by its angle, as Meta does (Meta
    multiplies the pair as a complex number by cos + j sin; the same arithmetic on real numbers lets
    ``torch.compile`` fuse it, which it cannot do for complex tensors).

    x: (bsz, seqlen, n_heads, head_dim); cos, sin: (bsz, seqlen, head_dim/2), broadcast over heads.
    """
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each (bsz, seqlen, n_heads, head_dim/2)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, rotary positions and an in-place KV cache.

    With ``n_kv_heads < n_heads`` each key/value head serves ``n_heads / n_kv_heads`` query heads.
    Under model parallelism this rank holds ``n_local_heads`` query and ``n_local_kv_heads``
    key/value heads; ``wo`` sums the heads' contributions over ranks.
    """

    def __init__(self, args: ModelArgs, group: Optional[ProcessGroup] = None):
        super().__init__()
        self.n_local_heads = split_size(args.n_heads, "n_heads", group)
        self.n_local_kv_heads = split_size(args.n_kv_heads, "n_kv_heads", group)
        self.head_dim = args.head_dim
        # wq, wk, wv as one weight: one matmul instead of three small ones (checkpoints keep Meta's three)
        kv_features = args.n_kv_heads * self.head_dim
        parts = {"wq": args.n_heads * self.head_dim, "wk": kv_features, "wv": kv_features}
        self.wqkv = FusedColumnParallelLinear(args.dim, parts, group)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, group)
        self.kv_cache: Optional[KVCache] = None  # set by Transformer.setup_cache

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Optional[torch.Tensor],
        cache: Optional[CachePass],
    ) -> torch.Tensor:
        """Without ``cache`` the sequence attends to itself: causally (``mask`` None) or as ``mask`` (bsz, 1,
        seqlen, seqlen) allows. With it, the chunk's keys and values are written into this layer's
        ``kv_cache`` and the chunk attends to its rows' cached ones."""
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wqkv(x)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, cos, sin), apply_rotary_emb(xk, cos, sin)
        xq = xq.transpose(1, 2)  # (bsz, n_local_heads, seqlen, head_dim)
        if cache is None:  # enable_gqa: each kv head serves its group of query heads
            keys, values = xk.transpose(1, 2), xv.transpose(1, 2)  # (bsz, n_local_kv_heads, seqlen, head_dim)
            output = F.scaled_dot_product_attention(
                xq, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
        else:
            self.kv_cache.update(cache, xk, xv)
            output = self.kv_cache.attend(xq, cache)  # (bsz, n_local_heads, seqlen, head_dim), in the cache's dtype
        return self.wo(output.transpose(1, 2).reshape(bsz, seqlen, -1).type_as(x))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int, group: Optional[ProcessGroup] = None):
        super().__init__()
        # w1 and w3 as one matmul
        self.w13 = FusedColumnParallelLinear(dim, {"w1": hidden_dim, "w3": hidden_dim}, group)
        self.w2 = RowParallelLinear(hidden_dim, dim, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x)  # w1 x, w3 x
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs, group: Optional[ProcessGroup] = None):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args, group)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim, group)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs, group: Optional[ProcessGroup] = None):
        """``group``: the processes that split every layer between them (tensor parallelism: a
        ``torch.distributed`` process group, or a device mesh's tensor-parallel group); None: the
        model is whole in this process."""
        super().__init__()
        if params.vocab_size < 1:
            raise ValueError(
                f"ModelArgs.vocab_size must be set (got {params.vocab_size}); -1 means 'take it from the "
                "tokenizer', which Llama.build does"
            )
        check_world_size(params.split_sizes, group_size(group))  # one error naming every misfit
        self.params = params
        self.group = group
        self.tok_embeddings = ParallelEmbedding(params.vocab_size, params.dim, group)
        self.layers = nn.ModuleList(TransformerBlock(i, params, group) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, group, gather_output=True)
        self.register_load_state_dict_pre_hook(fuse_parts)  # state dicts in Meta's keys: wq, wk, wv apart
        self.setup_rope()
        block_size = min(DEFAULT_BLOCK_SIZE, params.max_seq_len)  # Meta's cache: a contiguous row for each of its rows
        self.setup_cache(1 + params.max_batch_size * -(-params.max_seq_len // block_size), block_size)

    def setup_rope(self):
        """(Re)compute the rotary tables, cos and sin (max_seq_len, head_dim/2) in float32, on the weights' device."""
        device = self.tok_embeddings.weight.device
        cos, sin = precompute_rope(
            self.params.head_dim, self.params.max_seq_len, self.params.rope_theta, self.params.rope_scaling
        )
        self.register_buffer("freqs_cos", cos.to(device), persistent=False)
        self.register_buffer("freqs_sin", sin.to(device), persistent=False)

    def setup_cache(
        self,
        n_blocks: int,
        block_size: int,
        dtype: Optional[torch.dtype] = None,
        storage: Optional[torch.dtype] = None,
    ):
        """(Re)allocate every layer's KV cache pool (``llama.layers.kv_cache``): ``n_blocks`` blocks of
        ``block_size`` positions, block 0 the scratch block, on the weights' device, in ``dtype`` (None:
        the embedding's), or stored as ``storage`` (int8, float8_e4m3fn) with a scale per token and head in
        ``dtype``. Cached attention computes in ``dtype``."""
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            attention = layer.attention
            with torch.device(weight.device):
                attention.kv_cache = KVCache(
                    attention.n_local_kv_heads,
                    attention.head_dim,
                    n_blocks,
                    block_size,
                    dtype or weight.dtype,
                    storage,
                )

    def drop_cache(self):
        """Free every layer's KV cache pool: a model that is only trained or scored never reads one."""
        for layer in self.layers:
            layer.attention.kv_cache = None

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: Union[int, torch.Tensor, None] = None,
        *,
        positions: Optional[torch.Tensor] = None,
        cache: Optional[BlockTables] = None,
        logits_at: Union[int, torch.Tensor, None] = None,
    ) -> torch.Tensor:
        """Float32 logits (bsz, seqlen, vocab_size) of ``tokens`` (bsz, seqlen), the token ``tokens[b, i]``
        at position ``positions[b, i]``.

        - ``cache`` (``llama.layers.kv_cache.BlockTables``): the rows' blocks of the KV cache pool. The
          tokens are written there at their positions and attend to their rows' cached positions up to
          their own. Rows of a ragged batch each sit at their own positions. Call it without autograd.
        - no ``cache``: the sequence attends only to itself and gradients flow (training, scoring).
          ``positions`` None: 0 .. seqlen-1. Given, positions restarting at 0 start a new document, and
          a token attends to its own document's earlier tokens only (packed rows).
        - ``start_pos``, Meta's call: the tokens sit at ``start_pos`` onwards (an int, or a (bsz,) tensor of
          one start per row), in the model's own cache, row b in the blocks a contiguous cache would give
          it; under ``torch.inference_mode``.

        ``logits_at`` (an index into seqlen, a (bsz,) tensor of one index per row, or a (bsz, k) tensor of k
        per row) asks for the logits of those positions only, (bsz, 1 or k, vocab_size): a prefill needs
        just the last position's, scoring those of the tokens scored, and the vocabulary projection is
        the model's largest matmul.
        """
        if start_pos is not None:
            return self.forward_from(tokens, start_pos, logits_at)
        if cache is not None:
            if positions is None:
                raise ValueError("a cached pass needs positions: (bsz, seqlen), where each token sits in its row")
            cache_pass = CachePass.of(cache, positions, self.layers[0].attention.kv_cache)
            return self.logits(self.hidden_states(tokens, positions, None, cache_pass), logits_at)
        return self.logits(self.hidden_states(tokens, positions, document_mask(positions), None), logits_at)

    def forward_from(
        self,
        tokens: torch.Tensor,
        start_pos: Union[int, torch.Tensor],
        logits_at: Union[int, torch.Tensor, None] = None,
    ) -> torch.Tensor:
        """Meta's ``forward(tokens, start_pos)``: row b of the model's own cache holds its positions up to
        ``start_pos + seqlen - 1`` in the blocks a contiguous cache would give it."""
        bsz, seqlen = tokens.shape
        if self.layers[0].attention.kv_cache is None:
            raise ValueError(
                "the model has no KV cache pool (load_model leaves it to the engine): set one up with "
                "Transformer.setup_cache, or decode through Llama.build / llama.engine.Engine"
            )
        pool = self.layers[0].attention.kv_cache.cache_k  # (n_local_kv_heads, n_blocks, block_size, head_dim)
        block_size = pool.shape[2]
        blocks_per_row = -(-self.params.max_seq_len // block_size)
        if 1 + bsz * blocks_per_row > pool.shape[1]:
            raise ValueError(
                f"a batch of {bsz} row(s) without block tables needs {bsz} x {blocks_per_row} blocks of {block_size} "
                f"tokens (max_seq_len={self.params.max_seq_len} each), but the pool holds {pool.shape[1] - 1}: "
                "pass block tables, or set up a larger cache (Transformer.setup_cache)"
            )
        offsets = torch.arange(seqlen, device=tokens.device)
        if isinstance(start_pos, torch.Tensor):  # (bsz,): one start per row
            positions, end = start_pos.to(tokens.device)[:, None] + offsets, int(start_pos.max()) + seqlen
        else:
            positions, end = (start_pos + offsets).expand(bsz, seqlen), start_pos + seqlen
        tables = contiguous_tables(bsz, blocks_per_row, tokens.device)[:, : -(-end // block_size)]
        with torch.inference_mode():
            return self(tokens, positions=positions, cache=BlockTables(tables), logits_at=logits_at)

    def forward_loss(
        self, tokens: torch.Tensor, labels: torch.Tensor, positions: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Training's loss: the summed ``causal_lm_loss`` of ``labels`` (bsz, seqlen) under the logits of
        ``forward(tokens, positions=positions)``, computed chunk by chunk of tokens from the last hidden
        states without the logits of the whole batch (``chunked_causal_lm_loss``; an int8 or int4 output
        weight included). Through the logits where the output layer is not whole here: a slice of the
        vocabulary per rank (tensor parallelism), or a module other than the plain linear (an adapter beside it)."""
        h = self.norm(self.hidden_states(tokens, positions, document_mask(positions), None))  # (bsz, seqlen, dim)
        if isinstance(self.output, ColumnParallelLinear) and group_size(self.group) == 1:
            return chunked_causal_lm_loss(h, self.output.weight, labels, self.output.scales)
        return causal_lm_loss(self.output(h).float(), labels, reduction="sum")

    def forward_logprobs(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        positions: Optional[torch.Tensor] = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """Post-training's entry: each label's log-probability under ``softmax(logits / temperature)`` of
        ``forward(tokens, positions=positions)``, (bsz, seqlen), entry [b, t] that of ``labels[b, t]`` given
        ``tokens[b, :t]``, 0 where the label is -100 (``llama.layers.loss.token_logprobs``). Chunk by chunk
        from the last hidden states where the output layer is whole here, as ``forward_loss``."""
        h = self.norm(self.hidden_states(tokens, positions, document_mask(positions), None))  # (bsz, seqlen, dim)
        if isinstance(self.output, ColumnParallelLinear) and group_size(self.group) == 1:
            return chunked_token_logprobs(h, self.output.weight, labels, self.output.scales, temperature)
        return token_logprobs(self.output(h).float(), labels, temperature)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: Optional[torch.Tensor],
        mask: Optional[torch.Tensor],
        cache: Optional[CachePass],
    ) -> torch.Tensor:
        """The last layer's output (bsz, seqlen, dim)."""
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        if positions is None:  # (1, seqlen, head_dim/2), broadcast over rows
            cos, sin = self.freqs_cos[None, : tokens.shape[1]], self.freqs_sin[None, : tokens.shape[1]]
        else:  # (bsz, seqlen, head_dim/2): each token's own angle, shared by every layer
            cos, sin = self.freqs_cos[positions], self.freqs_sin[positions]
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        return h

    def logits(self, h: torch.Tensor, logits_at: Union[int, torch.Tensor, None]) -> torch.Tensor:
        if logits_at is not None:  # keep the positions asked for: (bsz, 1 or k, dim)
            rows, index = torch.arange(h.shape[0], device=h.device), torch.as_tensor(logits_at, device=h.device)
            h = h[rows[:, None], index] if index.dim() == 2 else h[rows, index].unsqueeze(1)
        return self.output(self.norm(h)).float()


def document_mask(positions: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """What each token of packed rows may attend to, (bsz, 1, seqlen, seqlen): its own document's earlier
    tokens, a document starting where the positions restart at 0. None (causal over the whole row)
    without positions."""
    if positions is None:
        return None
    documents = (positions == 0).cumsum(-1)  # (bsz, seqlen)
    causal = torch.ones(positions.shape[1], positions.shape[1], dtype=torch.bool, device=positions.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal).unsqueeze(1)
