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


# An operator of its own, so that inductor hands the mask a buffer it computed before: on a CPU (torch
# 2.13) a mask reading a tensor computed in the same graph reads a scatter's values from before the
# scatter, and one computed pointwise fails to compile.
@torch.library.custom_op("llama::visible_keys", mutates_args=())
def visible_keys(block_table: torch.Tensor, positions: torch.Tensor, n_blocks: int, block_size: int) -> torch.Tensor:
    """How many leading keys of each pool block the query of each row sees, (bsz, n_blocks): all of
    its blocks before the query's, the query's up to its position ``positions`` (bsz, 1), none of
    any other block."""
    bsz, blocks_per_row = block_table.shape
    starts = torch.arange(blocks_per_row, device=block_table.device) * block_size  # each of the row's blocks' first position
    seen = (positions - starts + 1).clamp(0, block_size)  # (bsz, blocks_per_row)
    return torch.zeros(bsz, n_blocks, dtype=seen.dtype, device=seen.device).scatter_reduce(1, block_table, seen, "amax")


@visible_keys.register_fake
def _(block_table, positions, n_blocks, block_size):
    return block_table.new_empty(block_table.shape[0], n_blocks)


def pool_block_mask(block_table: torch.Tensor, positions: torch.Tensor, n_blocks: int, block_size: int) -> BlockMask:
    """Which keys of the pool (``n_blocks`` of ``block_size``) each row's one query attends to: those
    of its blocks ``block_table`` (bsz, blocks_per_row) at logical positions up to the query's,
    ``positions`` (bsz, 1)."""
    seen = visible_keys(block_table, positions, n_blocks, block_size)

    def visible(b, h, q_idx, kv_idx):
        return kv_idx % block_size < seen[b, kv_idx // block_size]

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
