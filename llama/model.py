"""The Llama 2 and Llama 3 transformer, in the order the data flows: hyper-parameters, RMSNorm, rotary
embeddings, attention over its KV cache's blocks, the SwiGLU feed-forward, a block, the model.

Pure math: no file I/O and no device selection. Model parallelism enters only through the layer
classes of ``llama.layers.parallel``; with one process they are plain linear and embedding layers.
"""

import math
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from torch.nn.attention.flex_attention import BlockMask

from llama.layers.loss import causal_lm_loss, chunked_causal_lm_loss
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
from llama.layers.pool_attention import pool_attention, pool_block_mask

ATTENTIONS = ("gather", "flex")  # how forward_at reads the cache pool: a gathered copy, or FlexAttention in place


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
            raise ValueError(f"RopeScaling.high_freq_factor = {self.high_freq_factor} must exceed low_freq_factor = {self.low_freq_factor}")


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
    """Every key of Meta's ``params.json`` plus the sizes of the inference cache."""

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
    max_batch_size: int = 32  # the most rows decoded together
    max_seq_len: int = 2048  # the longest row
    kv_cache_tokens: Optional[int] = None  # the KV cache pool's size in tokens; None: max_batch_size * max_seq_len (in whole blocks)
    kv_block_size: Optional[int] = None  # tokens per block of the pool; None: 16, or max_seq_len if shorter

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
            raise ValueError(f"{source}: {sorted(k for k in ROPE_SCALING_KEYS if ROPE_SCALING_KEYS[k] in scaling)} need use_scaled_rope: true")
        known = [f.name for f in fields(cls) if f.name != "rope_scaling"]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys are {known + ['use_scaled_rope', *ROPE_SCALING_KEYS]}")
        if use_scaled_rope:
            params["rope_scaling"] = RopeScaling(**scaling)
        return cls(**params)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_batch_size", "max_seq_len", "kv_block_size", "kv_cache_tokens"):
            if name == "kv_block_size" and self.kv_block_size is None:
                self.kv_block_size = min(16, self.max_seq_len)
            if name == "kv_cache_tokens" and self.kv_cache_tokens is None:
                self.kv_cache_tokens = self.max_batch_size * -(-self.max_seq_len // (self.kv_block_size or 16)) * (self.kv_block_size or 16)
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelArgs.dim = {self.dim} is not divisible by n_heads = {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelArgs.n_heads = {self.n_heads} is not divisible by n_kv_heads = {self.n_kv_heads}"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head_dim = dim / n_heads = {self.dim // self.n_heads} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def blocks_per_row(self) -> int:
        """The most blocks one row holds: its block table's length."""
        return -(-self.max_seq_len // self.kv_block_size)

    @property
    def kv_cache_blocks(self) -> int:
        """The pool's blocks: ``kv_cache_tokens`` rounded up to whole blocks, and the scratch block."""
        return -(-self.kv_cache_tokens // self.kv_block_size) + 1

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
        return {"n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "dim": self.dim,
                "ffn_hidden_dim": self.ffn_hidden_dim, "vocab_size": self.vocab_size}


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


def precompute_rope(head_dim: int, end: int, theta: float, scaling: Optional[RopeScaling] = None) -> Tuple[torch.Tensor, torch.Tensor]:
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


class CacheIndex(NamedTuple):
    """Where a pass writes and reads the KV cache pool, computed once for every layer."""

    blocks: torch.Tensor  # (bsz, seqlen): the block of each token's position
    offsets: torch.Tensor  # (bsz, seqlen): its place in the block
    gather: torch.Tensor  # (bsz, n_local_kv_heads, kv_blocks): each row's attended blocks, per head, in the pool seen as (heads * blocks, ...)
    gathered: Optional[torch.Tensor]  # eager: (2, bsz * n_local_kv_heads * kv_blocks, block_size, head_dim), where each layer gathers its keys and values

    @staticmethod
    def of(block_table: torch.Tensor, positions: torch.Tensor, kv_blocks: int, pool: torch.Tensor, gathers: bool) -> "CacheIndex":
        """For rows with blocks ``block_table`` (bsz, blocks_per_row) of pools shaped and typed as ``pool``
        (n_local_kv_heads, n_blocks, block_size, head_dim), tokens at ``positions`` (bsz, seqlen),
        attending over their first ``kv_blocks`` blocks; ``gathers``: the layers copy those blocks
        (else FlexAttention reads them in the pool)."""
        heads, n_blocks, block_size, head_dim = pool.shape
        blocks = block_table.gather(1, positions // block_size)
        gather = torch.arange(heads, device=block_table.device)[None, :, None] * n_blocks + block_table[:, None, :kv_blocks]
        # one buffer per pass, which the layers gather into in turn: megabytes allocated anew twice a layer
        # come as fresh pages from the OS (glibc maps large blocks until freed ones raise its threshold),
        # which slowed a server's first requests (docs/performance.md); compiled, inductor plans its own buffers
        gathered = pool.new_empty(2, gather.numel(), block_size, head_dim) if gathers and not torch.compiler.is_compiling() else None
        return CacheIndex(blocks, positions % block_size, gather, gathered)


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

    def setup_cache(self, n_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        # a pool of blocks per head, (n_local_kv_heads, n_blocks, block_size, head_dim): a row's gathered
        # keys are each head's positions in a row, as the attention kernel reads them, and each head's
        # blocks end to end are one sequence, which FlexAttention reads in place
        shape = (self.n_local_kv_heads, n_blocks, block_size, self.head_dim)
        self.register_buffer("cache_k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def write_cache(self, xk: torch.Tensor, xv: torch.Tensor, cache_index: "CacheIndex"):
        """Write the keys and values (bsz, seqlen, n_local_kv_heads, head_dim) where ``cache_index``
        says, in place."""
        self.cache_k[:, cache_index.blocks, cache_index.offsets] = xk.permute(2, 0, 1, 3).to(self.cache_k.dtype)  # (heads, bsz, seqlen, head_dim)
        self.cache_v[:, cache_index.blocks, cache_index.offsets] = xv.permute(2, 0, 1, 3).to(self.cache_v.dtype)

    def gather_cache(self, cache_index: "CacheIndex"):
        """Each row's attended blocks gathered in order, (bsz, n_local_kv_heads, kv_len, head_dim) keys and values."""
        pool_k, pool_v = self.cache_k.flatten(0, 1), self.cache_v.flatten(0, 1)  # (heads * blocks, block_size, head_dim)
        if torch.compiler.is_compiling():  # indexing: plain loops for inductor (its index_select over the symbolic length was 8x slower)
            return pool_k[cache_index.gather].flatten(2, 3), pool_v[cache_index.gather].flatten(2, 3)
        bsz, heads, _ = cache_index.gather.shape
        shape = (bsz, heads, -1, self.head_dim)
        gather = cache_index.gather.flatten()  # eager, index_select: a third of the time of indexing on a CPU
        keys, values = cache_index.gathered
        return torch.index_select(pool_k, 0, gather, out=keys).view(shape), torch.index_select(pool_v, 0, gather, out=values).view(shape)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: Optional[torch.Tensor],
        mask: Union[torch.Tensor, BlockMask, None],
        cache_index: Optional["CacheIndex"] = None,
    ) -> torch.Tensor:
        """``positions`` None: no cache (training, scoring), the sequence attends to itself, causally
        or as ``mask`` (bsz, 1, seqlen, seqlen) allows (packed rows). Otherwise the chunk is written into
        the cache where ``cache_index`` says and attends to the cached entries that ``mask`` (bsz, 1,
        seqlen, kv_len) allows, gathered; or, ``mask`` a ``BlockMask`` (``llama.layers.pool_attention``), to
        those it allows where they lie in the pool."""
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wqkv(x)
        xq = xq.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        xk = xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, cos, sin), apply_rotary_emb(xk, cos, sin)
        if positions is not None:
            self.write_cache(xk, xv, cache_index)
        xq = xq.transpose(1, 2)  # (bsz, n_local_heads, seqlen, head_dim)
        if not isinstance(mask, BlockMask):
            # (bsz, n_local_kv_heads, seqlen or kv_len, head_dim): the chunk's own, or its rows' blocks gathered
            keys, values = (xk.transpose(1, 2), xv.transpose(1, 2)) if positions is None else self.gather_cache(cache_index)
            # (bsz, n_heads, seqlen, head_dim) in the cache's dtype; enable_gqa lets each kv head serve its group of query heads
            output = F.scaled_dot_product_attention(xq.to(keys.dtype), keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        else:  # FlexAttention reads the rows' blocks in the pool, no copy
            output = pool_attention(xq.to(self.cache_k.dtype), self.cache_k, self.cache_v, mask)
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

    def forward(self, x, cos, sin, positions, mask, cache_index=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, positions, mask, cache_index)
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
        self.setup_caches()

    def setup_caches(self, cache_dtype: Optional[torch.dtype] = None):
        """(Re)allocate the KV cache pools (``params.kv_cache_blocks`` blocks of ``kv_block_size``
        positions per layer; block 0 is scratch, written by positions nobody reads) and the rotary
        tables, on the weights' device, the pools in ``cache_dtype`` (None: the embedding's dtype), the
        rotary tables in float32. Cached attention computes in the cache's dtype."""
        device = self.tok_embeddings.weight.device
        cache_dtype = cache_dtype or self.tok_embeddings.weight.dtype
        for layer in self.layers:
            layer.attention.setup_cache(self.params.kv_cache_blocks, self.params.kv_block_size, device, cache_dtype)
        cos, sin = precompute_rope(self.params.head_dim, self.params.max_seq_len, self.params.rope_theta, self.params.rope_scaling)
        self.register_buffer("freqs_cos", cos.to(device), persistent=False)
        self.register_buffer("freqs_sin", sin.to(device), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: Union[int, torch.Tensor, None] = None,
        logits_at: Union[int, torch.Tensor, None] = None,
    ) -> torch.Tensor:
        """Float32 logits (bsz, seqlen, vocab_size) for ``tokens`` (bsz, seqlen): Meta's call.

        With ``start_pos`` the tokens sit at positions ``start_pos .. start_pos+seqlen-1`` (an int, or
        a (bsz,) tensor of one start per row), are written into the KV cache and attend to everything
        cached before them, without autograd: ``forward_at`` with those positions. Without it the
        sequence attends only to itself, no cache is touched, and gradients flow (training, scoring).
        ``logits_at``: see ``forward_at``.
        """
        bsz, seqlen = tokens.shape
        if start_pos is None:
            return self.logits(self.hidden_states(tokens, None, None), logits_at)
        offsets = torch.arange(seqlen, device=tokens.device)
        with torch.inference_mode():
            if isinstance(start_pos, torch.Tensor):
                return self.forward_at(tokens, start_pos[:, None] + offsets, logits_at)
            return self.forward_at(tokens, (start_pos + offsets).expand(bsz, seqlen), logits_at, kv_len=start_pos + seqlen)

    def forward_at(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        logits_at: Union[int, torch.Tensor, None] = None,
        kv_len: Optional[int] = None,
        block_table: Optional[torch.Tensor] = None,
        attention: str = "gather",
        block_starts: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The cached inference step: token ``tokens[b, i]`` sits at position ``positions[b, i]``, is
        written into row b's blocks ``block_table[b]`` there (position p in block ``block_table[b, p //
        kv_block_size]``), and attends to that row's cached positions up to its own. ``block_table``
        (bsz, blocks_per_row) None: row b owns blocks 1 + b * blocks_per_row onwards, as a contiguous
        cache would (the pool must hold bsz whole rows). Rows of a ragged batch each decode at their own
        positions; a right-padded prompt's padding entries are overwritten before any row reads them, or
        land in the scratch block 0 where the table points there. Call it without autograd.

        Shapes are static: the mask compares every key position 0 .. kv_len-1 (rounded up to whole
        blocks) with each query's position, so one compiled decode step serves every position.
        ``kv_len`` (default ``max_seq_len``) may be lowered by a caller that knows no position reaches
        it, to skip attending over empty cache entries.

        ``logits_at`` (an index into seqlen, or a (bsz,) tensor of one index per row) asks for the
        logits of that one position per row only, (bsz, 1, vocab_size): a prefill needs just the last
        position's, and the vocabulary projection is the model's largest matmul.

        ``attention``: how the cached entries are read. "gather" copies each row's blocks in order for
        ``scaled_dot_product_attention``, on any device. "flex", for one token per row (a decode step),
        has FlexAttention read them where they lie in the pool, each row only its own blocks up to its
        position (``kv_len`` then changes nothing), where ``block_starts`` (bsz, kv_cache_blocks), the
        caller's ``llama.layers.pool_attention.block_starts`` of the block tables, says each block sits in
        its row; fast only under ``torch.compile``, which generates its kernel.
        """
        params = self.params
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if attention == "flex" and tokens.shape[1] != 1:
            raise ValueError(f'attention="flex" reads the pool for one token per row, got {tokens.shape[1]} per row')
        if attention == "flex" and (block_table is None or block_starts is None):
            missing = [name for name, value in (("block_table", block_table), ("block_starts", block_starts)) if value is None]
            raise ValueError(f'attention="flex" needs block_table and block_starts (llama.layers.pool_attention.block_starts of the table), got no {" and no ".join(missing)}')
        kv_len = params.max_seq_len if kv_len is None else kv_len
        if block_table is None:
            block_table = self.contiguous_block_table(tokens.shape[0], tokens.device)
        kv_blocks = -(-kv_len // params.kv_block_size)
        cache_index = CacheIndex.of(block_table, positions, kv_blocks, self.layers[0].attention.cache_k, gathers=attention == "gather")
        if attention == "gather":
            key_positions = torch.arange(kv_blocks * params.kv_block_size, device=tokens.device)
            mask = (key_positions <= positions[..., None]).unsqueeze(1)  # (bsz, 1, seqlen, kv_len), broadcast over heads
        else:
            mask = pool_block_mask(block_table, positions, block_starts, params.kv_block_size)
        return self.logits(self.hidden_states(tokens, positions, mask, cache_index), logits_at)

    def contiguous_block_table(self, bsz: int, device: torch.device) -> torch.Tensor:
        """(bsz, blocks_per_row): row b's blocks 1 + b * blocks_per_row onwards, a contiguous cache's
        layout, for callers that keep no block tables (Meta's ``forward(tokens, start_pos)``)."""
        params = self.params
        if 1 + bsz * params.blocks_per_row > params.kv_cache_blocks:
            raise ValueError(
                f"a batch of {bsz} row(s) without block tables needs {bsz} x {params.blocks_per_row} blocks of {params.kv_block_size} tokens "
                f"(max_seq_len={params.max_seq_len} each), but the pool holds {params.kv_cache_blocks - 1} (kv_cache_tokens={params.kv_cache_tokens}): "
                "pass block tables, or build with more kv_cache_tokens"
            )
        return 1 + torch.arange(bsz * params.blocks_per_row, device=device).view(bsz, params.blocks_per_row)

    def forward_packed(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Training on packed rows, several documents each: float32 logits (bsz, seqlen, vocab_size).
        No cache is touched and gradients flow. ``positions`` (bsz, seqlen) restart at 0 with each
        document; ``mask`` (bsz, 1, seqlen, seqlen) lets a token attend to its own document's earlier
        tokens only (block-diagonal and causal)."""
        return self.logits(self.hidden_states(tokens, positions, mask), None)

    def forward_loss(
        self, tokens: torch.Tensor, labels: torch.Tensor, positions: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Training's loss: the summed ``causal_lm_loss`` of ``labels`` (bsz, seqlen) under the logits
        of ``forward(tokens)``, or of ``forward_packed(tokens, positions, mask)`` for packed rows,
        computed chunk by chunk of tokens from the last hidden states without the logits of the whole
        batch (``chunked_causal_lm_loss``; an int8 or int4 output weight included). Through the logits
        where the output layer is not whole here: a slice of the vocabulary per rank (tensor
        parallelism), or a module other than the plain linear (an adapter beside it)."""
        h = self.norm(self.hidden_states(tokens, positions, mask))  # (bsz, seqlen, dim)
        if isinstance(self.output, ColumnParallelLinear) and group_size(self.group) == 1:
            return chunked_causal_lm_loss(h, self.output.weight, labels, self.output.scales)
        return causal_lm_loss(self.output(h).float(), labels, reduction="sum")

    def hidden_states(
        self, tokens: torch.Tensor, positions: Optional[torch.Tensor], mask: Union[torch.Tensor, BlockMask, None], cache_index: Optional["CacheIndex"] = None
    ) -> torch.Tensor:
        """The last layer's output (bsz, seqlen, dim). ``positions`` None: the sequence alone, from 0.
        With ``cache_index`` the tokens are written into the cache and attend to it (``forward_at``);
        without, to each other as ``mask`` allows (packed rows, whose ``positions`` restart)."""
        h = self.tok_embeddings(tokens)  # (bsz, seqlen, dim)
        if positions is None:  # (1, seqlen, head_dim/2), broadcast over rows
            cos, sin = self.freqs_cos[None, : tokens.shape[1]], self.freqs_sin[None, : tokens.shape[1]]
        else:  # (bsz, seqlen, head_dim/2): each token's own angle, shared by every layer
            cos, sin = self.freqs_cos[positions], self.freqs_sin[positions]
        cached_positions = None if cache_index is None else positions  # None: the layers touch no cache
        for layer in self.layers:
            h = layer(h, cos, sin, cached_positions, mask, cache_index)
        return h

    def logits(self, h: torch.Tensor, logits_at: Union[int, torch.Tensor, None]) -> torch.Tensor:
        if logits_at is not None:  # keep one position per row: (bsz, 1, dim)
            rows = torch.arange(h.shape[0], device=h.device)
            h = h[rows, torch.as_tensor(logits_at, device=h.device)].unsqueeze(1)
        return self.output(self.norm(h)).float()
