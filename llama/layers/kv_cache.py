"""The KV cache: each attention layer's keys and values in a pool of blocks, the tables that say which
blocks hold a row's positions, and the two ways a cached pass reads them.

A row's positions live in blocks of ``block_size`` tokens: position p is at offset ``p % block_size``
of the block ``block_table[p // block_size]``. Block 0 is scratch: positions nobody reads (an idle
slot's, a right-padded prompt's padding, the end of a table) are written there. A layer's pool is
heads first, (n_local_kv_heads, n_blocks, block_size, head_dim): each head's blocks end to end are one
sequence, which FlexAttention reads in place, and a row's blocks gathered per head are its keys in the
order the attention kernel reads them.

A cached pass is told where its tokens sit (``positions``, (bsz, seqlen)) and which blocks each row
attends over (``BlockTables``); ``CachePass`` turns both, once per pass, into what every layer's
``KVCache.update`` and ``KVCache.attend`` need:

- gathered (any device): each row's blocks in the table are copied in order and read by
  ``scaled_dot_product_attention``, keys past a query's position masked. The table's width is the
  attended length: a caller that knows no row's position reaches past a block passes fewer; a position
  past the table's blocks (a padding entry, an idle slot) is written to the scratch block.
- in place (``BlockTables.starts`` given, one token per row): FlexAttention visits only the row's own
  blocks up to the query's position where they lie in the pool, no copy. Under ``torch.compile``
  inductor generates one kernel for it (on a CPU too, torch >= 2.6); eagerly torch evaluates the mask
  over the whole pool, which is correct but slow.
"""

from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention

SCRATCH_BLOCK = 0  # the block written by positions nobody reads
DEFAULT_BLOCK_SIZE = 16  # tokens per block, unless the context is shorter
QUERY_TILE = 128  # torch's default tile of queries; a decode step's one query per row sits in one
NOT_HELD = 1 << 30  # ``block_starts`` of a block a row does not hold: past every position


class BlockTables(NamedTuple):
    """Which blocks of the pool a cached pass's rows hold, in order: (bsz, blocks). The rows attend over
    all of them up to each query's own position. ``starts``: ``block_starts`` of the whole tables
    (bsz, n_blocks), given for a pass that reads the pool in place with FlexAttention (one token per row)."""

    tables: torch.Tensor
    starts: Optional[torch.Tensor] = None


def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype, in which cached attention computes: the model's, but float32 for a bfloat16 or
    float16 model on a CPU, where torch's attention kernel runs several times slower in half precision than
    in float32 (docs/performance.md; the cache then takes twice the memory)."""
    return torch.float32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype


def contiguous_tables(bsz: int, blocks_per_row: int, device: torch.device) -> torch.Tensor:
    """(bsz, blocks_per_row): row b's blocks 1 + b * blocks_per_row onwards, a contiguous cache's layout,
    for callers that keep no block tables (Meta's ``forward(tokens, start_pos)``)."""
    return 1 + torch.arange(bsz * blocks_per_row, device=device).view(bsz, blocks_per_row)


def attended_tables(tables: torch.Tensor, kv_len: int, block_size: int, bucketed: bool = False) -> torch.Tensor:
    """The first blocks of ``tables`` (bsz, blocks_per_row), those that hold positions below ``kv_len``.
    ``bucketed``, for a compiled pass: a power-of-two bucket of positions (at least two blocks and 16
    positions), its block count marked dynamic, so that one graph serves every bucket short of the whole
    row, which gets a graph of its own (slicing the whole table is specialised)."""
    blocks_per_row = tables.shape[1]
    if bucketed:
        kv_len = max(16, 2 * block_size, 1 << (kv_len - 1).bit_length())
    blocks = min(-(-kv_len // block_size), blocks_per_row)
    attended = tables[:, :blocks]
    if bucketed and 2 <= blocks < blocks_per_row:
        torch._dynamo.mark_dynamic(attended, 1)
    return attended


def block_starts(block_table: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """Where each of the pool's ``n_blocks`` blocks sits in each row, (bsz, n_blocks) int32: the
    position of its first key, ``block_size`` times its first index in the row's ``block_table`` (bsz,
    blocks_per_row), or ``NOT_HELD``. (A row's table ends in the scratch block, so the scratch block
    starts after the row's last position; an idle slot's table is all scratch, from 0.) A caller keeps
    it beside the tables and writes it when a table changes: computed inside a compiled step, a CPU
    mask reads a scatter's values from before the scatter (torch 2.13)."""
    index = torch.arange(block_table.shape[1], dtype=torch.int32, device=block_table.device) * block_size
    starts = torch.full((block_table.shape[0], n_blocks), NOT_HELD, dtype=torch.int32, device=block_table.device)
    return starts.scatter_reduce(1, block_table, index.expand(block_table.shape), "amin")


def pool_block_mask(
    block_table: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, block_size: int
) -> BlockMask:
    """Which keys of the pool each row's one query attends to: those of its blocks ``block_table``
    (bsz, blocks_per_row) at logical positions up to the query's, ``positions`` (bsz, 1). The row's
    blocks before the query's own are full (FlexAttention skips the mask there), its own is partial."""
    n_blocks = starts.shape[1]

    def visible(b, h, q_idx, kv_idx):
        return kv_idx % block_size + starts[b, kv_idx // block_size] <= positions[b, 0]

    bsz, blocks_per_row = block_table.shape
    own = positions // block_size  # (bsz, 1): the query's block in its row, and how many full ones precede it
    # (bsz, 1 head, 1 query tile, n_blocks) block indices: they span the pool, the counts say how many are read
    full = F.pad(block_table, (0, max(n_blocks - blocks_per_row, 0))).int()[:, None, None]
    partial = F.pad(block_table.gather(1, own), (0, n_blocks - 1)).int()[:, None, None]
    counts = own.int()[:, None]  # (bsz, 1, 1)
    return BlockMask.from_kv_blocks(
        torch.ones_like(counts),
        partial,
        counts,
        full,
        BLOCK_SIZE=(QUERY_TILE, block_size),
        mask_mod=visible,
        seq_lengths=(1, n_blocks * block_size),
        compute_q_blocks=False,
    )


class CachePass(NamedTuple):
    """Where one cached pass writes and reads every layer's pool, computed once for all of them."""

    blocks: torch.Tensor  # (bsz, seqlen): the block of each token's position
    offsets: torch.Tensor  # (bsz, seqlen): its place in the block
    # gathered: each row's blocks per head, indices into the pool seen as (heads * blocks, ...): (bsz, heads, blocks)
    gather: Optional[torch.Tensor]
    # eager gathered: (2, bsz * heads * blocks, block_size, head_dim), where each layer gathers in turn
    gathered: Optional[torch.Tensor]
    mask: Union[torch.Tensor, BlockMask]  # gathered: (bsz, 1, seqlen, blocks * block_size); in place: a BlockMask

    @staticmethod
    def of(cache: BlockTables, positions: torch.Tensor, pool: torch.Tensor) -> "CachePass":
        """For tokens at ``positions`` (bsz, seqlen) of rows holding ``cache``'s blocks, in pools shaped and
        typed as ``pool`` (n_local_kv_heads, n_blocks, block_size, head_dim)."""
        heads, n_blocks, block_size, head_dim = pool.shape
        tables = cache.tables
        index = positions // block_size  # a position past the table's blocks (padding, an idle slot) writes to scratch
        blocks = torch.where(
            index < tables.shape[1], tables.gather(1, index.clamp(max=tables.shape[1] - 1)), SCRATCH_BLOCK
        )
        if cache.starts is not None:
            if positions.shape[1] != 1:
                raise ValueError(
                    "reading the pool in place (BlockTables.starts given) takes one token per row, "
                    f"got {positions.shape[1]}"
                )
            mask = pool_block_mask(tables, positions, cache.starts, block_size)
            return CachePass(blocks, positions % block_size, None, None, mask)
        gather = torch.arange(heads, device=tables.device)[None, :, None] * n_blocks + tables[:, None, :]
        key_positions = torch.arange(tables.shape[1] * block_size, device=tables.device)
        mask = (key_positions <= positions[..., None]).unsqueeze(1)  # broadcast over heads
        # one buffer a pass, which the layers gather into in turn: megabytes allocated anew twice a layer
        # come as fresh pages from the OS (docs/performance.md); compiled, inductor plans its own buffers
        gathered = None if torch.compiler.is_compiling() else pool.new_empty(2, gather.numel(), block_size, head_dim)
        return CachePass(blocks, positions % block_size, gather, gathered, mask)


class KVCache(nn.Module):
    """One attention layer's pool of keys and values, (n_local_kv_heads, n_blocks, block_size, head_dim)
    each, with its update (write a pass's keys and values) and its read (attend over a row's blocks)."""

    def __init__(self, n_local_kv_heads: int, head_dim: int, n_blocks: int, block_size: int, dtype: torch.dtype):
        super().__init__()
        shape = (n_local_kv_heads, n_blocks, block_size, head_dim)
        self.register_buffer("cache_k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, dtype=dtype), persistent=False)

    @property
    def block_size(self) -> int:
        return self.cache_k.shape[2]

    def update(self, where: CachePass, xk: torch.Tensor, xv: torch.Tensor) -> None:
        """Write the keys and values (bsz, seqlen, n_local_kv_heads, head_dim) at their positions, in place."""
        self.cache_k[:, where.blocks, where.offsets] = xk.permute(2, 0, 1, 3).to(
            self.cache_k.dtype
        )  # (heads, bsz, seqlen, head_dim)
        self.cache_v[:, where.blocks, where.offsets] = xv.permute(2, 0, 1, 3).to(self.cache_v.dtype)

    def attend(self, xq: torch.Tensor, where: CachePass) -> torch.Tensor:
        """Attention of the queries (bsz, n_local_heads, seqlen, head_dim) over their rows' cached keys and
        values, in the cache's dtype: (bsz, n_local_heads, seqlen, head_dim). Each key/value head serves
        its group of query heads."""
        xq = xq.to(self.cache_k.dtype)
        if isinstance(where.mask, BlockMask):
            return self.attend_in_place(xq, where.mask)
        keys, values = self.gather(where)
        return F.scaled_dot_product_attention(xq, keys, values, attn_mask=where.mask, enable_gqa=True)

    def gather(self, where: CachePass) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each row's blocks gathered in order, (bsz, n_local_kv_heads, blocks * block_size, head_dim) keys and
        values."""
        pool_k, pool_v = (
            self.cache_k.flatten(0, 1),
            self.cache_v.flatten(0, 1),
        )  # (heads * blocks, block_size, head_dim)
        if where.gathered is None:  # compiled: indexing, which inductor turns into plain loops
            return pool_k[where.gather].flatten(2, 3), pool_v[where.gather].flatten(2, 3)
        bsz, heads, _ = where.gather.shape
        shape = (bsz, heads, -1, self.cache_k.shape[-1])
        gather = (
            where.gather.flatten()
        )  # eager, index_select into the pass's buffer: a third of indexing's time on a CPU
        keys, values = where.gathered
        return torch.index_select(pool_k, 0, gather, out=keys).view(shape), torch.index_select(
            pool_v, 0, gather, out=values
        ).view(shape)

    def attend_in_place(self, xq: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
        """FlexAttention of one query per row over the blocks ``block_mask`` lists, where they lie in the pool."""
        heads, n_blocks, block_size, head_dim = self.cache_k.shape
        keys = self.cache_k.view(
            1, heads, n_blocks * block_size, head_dim
        )  # one batch row, broadcast over the query rows
        values = self.cache_v.view(1, heads, n_blocks * block_size, head_dim)
        # the query scaled here, a tensor of its own shape: inductor's CPU kernel takes the query's shape
        # from the tensor a view reads (torch 2.13), here the rotary embedding's (..., head_dim / 2, 2)
        return flex_attention(xq * head_dim**-0.5, keys, values, block_mask=block_mask, scale=1.0, enable_gqa=True)
