"""Attention that reads the KV cache pool's blocks where they lie, with torch's FlexAttention: no copy
of a row's blocks into a contiguous cache first.

Each head's pool, (n_blocks, block_size, head_dim), is one sequence of n_blocks * block_size keys. A
``BlockMask`` lists, for each row's query, the blocks it attends to in that sequence: the row's blocks
before the one holding the query's position are full (every key visible: FlexAttention skips the
mask there), the query's own block is partial, masked after the query's position. Under
``torch.compile`` inductor generates one kernel that visits only the listed blocks (on a CPU too,
torch >= 2.6); eagerly torch evaluates the mask over the whole pool, which is correct but slow.
"""

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

QUERY_TILE = 128  # torch's default tile of queries; a decode step's one query per row sits in one
NOT_HELD = 1 << 30  # ``block_starts`` of a block a row does not hold: past every position


def block_starts(block_table: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """Where each of the pool's ``n_blocks`` blocks sits in each row, (bsz, n_blocks) int32: the
    position of its first key, ``block_size`` times its first index in the row's ``block_table`` (bsz,
    blocks_per_row), or ``NOT_HELD``. (A row's table ends in the scratch block, so the scratch block
    starts after the row's last position; an idle slot's table is all scratch, from 0.)"""
    index = torch.arange(block_table.shape[1], dtype=torch.int32, device=block_table.device) * block_size
    starts = torch.full((block_table.shape[0], n_blocks), NOT_HELD, dtype=torch.int32, device=block_table.device)
    return starts.scatter_reduce(1, block_table, index.expand(block_table.shape), "amin")


def pool_block_mask(block_table: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, block_size: int) -> BlockMask:
    """Which keys of the pool each row's one query attends to: those of its blocks ``block_table``
    (bsz, blocks_per_row) at logical positions up to the query's, ``positions`` (bsz, 1). ``starts``:
    ``block_starts`` of those tables, kept by the caller beside them (it changes when a table does):
    on a CPU (torch 2.13) a mask reading a tensor computed in the same graph reads a scatter's values
    from before the scatter, and one computed pointwise fails to compile; an operator of our own that
    computed it each step took a tenth of the bundled model's step."""
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
        torch.ones_like(counts), partial, counts, full, BLOCK_SIZE=(QUERY_TILE, block_size), mask_mod=visible,
        seq_lengths=(1, n_blocks * block_size), compute_q_blocks=False,
    )


def pool_attention(query: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """(bsz, n_heads, 1, head_dim) attention of ``query`` (bsz, n_heads, 1, head_dim) over the pools
    ``cache_k``, ``cache_v`` (n_kv_heads, n_blocks, block_size, head_dim) where ``block_mask`` allows;
    each key/value head serves its group of query heads."""
    heads, n_blocks, block_size, head_dim = cache_k.shape
    keys = cache_k.view(1, heads, n_blocks * block_size, head_dim)  # one batch row, broadcast over the query rows
    values = cache_v.view(1, heads, n_blocks * block_size, head_dim)
    # the query scaled here, a tensor of its own shape: inductor's CPU kernel takes the query's shape
    # from the tensor a view reads (torch 2.13), here the rotary embedding's (..., head_dim / 2, 2)
    return flex_attention(query * head_dim**-0.5, keys, values, block_mask=block_mask, scale=1.0, enable_gqa=True)
