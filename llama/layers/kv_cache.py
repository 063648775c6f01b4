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

A pool may store keys and values in 8 bits (``KV_CACHE_DTYPES``: int8, float8_e4m3fn) with a scale per
token and head beside them, (n_local_kv_heads, n_blocks, block_size, 1) in the dtype attention computes
in: ``update`` quantizes what it writes (symmetric absmax over head_dim, ``quantize``), the gather
dequantizes the blocks it copies, and FlexAttention reads a dequantized copy of the pool.
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
# the pools stored in 8 bits with a scale per token and head (``EngineOptions.kv_cache_dtype``), and the largest
# magnitude each holds: a vector's absmax is stored as that
KV_CACHE_DTYPES = {"int8": torch.int8, "float8_e4m3fn": torch.float8_e4m3fn}
LARGEST = {torch.int8: 127.0, torch.float8_e4m3fn: torch.finfo(torch.float8_e4m3fn).max}


class BlockTables(NamedTuple):
    """Which blocks of the pool a cached pass's rows hold, in order: (bsz, blocks). The rows attend over
    all of them up to each query's own position. ``starts``: ``block_starts`` of the whole tables
    (bsz, n_blocks), given for a pass that reads the pool in place with FlexAttention (one token per row).
    ``lengths``: each row's tokens in a pass whose shorter rows are padded (bsz,): the padding writes to the
    scratch block, wherever its positions point."""

    tables: torch.Tensor
    starts: Optional[torch.Tensor] = None
    lengths: Optional[torch.Tensor] = None


def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype, in which cached attention computes: the model's, but float32 for a bfloat16 or
    float16 model on a CPU, where torch's attention kernel runs several times slower in half precision than
    in float32 (docs/performance.md; the cache then takes twice the memory)."""
    return torch.float32 if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else dtype


def quantize(x: torch.Tensor, storage: torch.dtype, scale_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., head_dim) as ``storage`` (int8 or float8_e4m3fn) values and a scale per vector (..., 1) in
    ``scale_dtype``, symmetric: the scale is the vector's absmax over ``LARGEST[storage]``, rounded to
    ``scale_dtype`` before the values are divided by it, so that ``dequantize`` is within half a step
    (int8: absmax / 254) of ``x``. Computed in float32 whatever ``x``'s dtype."""
    x = x.float()
    scale = (x.abs().amax(-1, keepdim=True) / LARGEST[storage]).to(scale_dtype)
    scaled = x / scale.float().clamp(min=torch.finfo(torch.float32).tiny)  # a zero vector stays zero
    if storage == torch.int8:
        return scaled.round().clamp(-127, 127).to(storage), scale
    return scaled.clamp(-LARGEST[storage], LARGEST[storage]).to(storage), scale


def dequantize(stored: torch.Tensor, scale: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``stored`` (..., head_dim) times its ``scale`` (..., 1), in the scale's dtype; into ``out`` if given."""
    if out is None:
        return stored.to(scale.dtype) * scale
    return out.copy_(stored).mul_(scale)


def pool_token_bytes(n_kv_heads: int, head_dim: int, dtype: torch.dtype, storage: Optional[torch.dtype] = None) -> int:
    """One token's keys and values in one layer of a pool computing in ``dtype`` and storing ``storage``
    (None: ``dtype``), scales included: 2 x n_kv_heads x (head_dim x storage's bytes + dtype's bytes)."""
    if storage is None:
        return 2 * n_kv_heads * head_dim * dtype.itemsize
    return 2 * n_kv_heads * (head_dim * storage.itemsize + dtype.itemsize)


def check_storage(storage: torch.dtype, device: torch.device) -> None:
    """Whether torch stores ``storage`` on ``device`` and reads it back: a write into a pool at an index and a
    cast from it, what ``update`` and the reads do.

    Raises:
        ValueError: naming what is needed, where torch lacks a kernel for it there."""
    try:
        pool = torch.zeros(2, 2, dtype=storage, device=device)
        pool[torch.tensor([1], device=device)] = torch.ones(1, 2, device=device).to(storage)
        pool.to(torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as error:
        raise ValueError(
            f"kv_cache_dtype {str(storage).removeprefix('torch.')} needs a device where torch writes, indexes and "
            f"casts {storage}, which it does not on {device.type} ({str(error).splitlines()[0]}): "
            "use kv_cache_dtype int8, or the default"
        ) from None


def pool_bytes(model: nn.Module) -> int:
    """The bytes of every layer's KV cache pool in ``model`` (scales included)."""
    return sum(module.nbytes for module in model.modules() if isinstance(module, KVCache))


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
    # eager gathered: (2, bsz * heads * blocks, block_size, head_dim) keys and values in the dtype attention
    # computes in, where each layer gathers in turn; from a quantized pool through ``stored``: the blocks as stored
    # and their scales, (2, bsz * heads * blocks, block_size, head_dim) and (2, ..., block_size, 1)
    gathered: Optional[torch.Tensor]
    stored: Optional[Tuple[torch.Tensor, torch.Tensor]]
    mask: Union[torch.Tensor, BlockMask]  # gathered: (bsz, 1, seqlen, blocks * block_size); in place: a BlockMask

    @staticmethod
    def of(cache: BlockTables, positions: torch.Tensor, kv_cache: "KVCache") -> "CachePass":
        """For tokens at ``positions`` (bsz, seqlen) of rows holding ``cache``'s blocks, in pools shaped and
        typed as ``kv_cache``'s (n_local_kv_heads, n_blocks, block_size, head_dim)."""
        heads, n_blocks, block_size, head_dim = kv_cache.cache_k.shape
        tables = cache.tables
        index = positions // block_size  # a position past the table's blocks (padding, an idle slot) writes to scratch
        blocks = torch.where(
            index < tables.shape[1], tables.gather(1, index.clamp(max=tables.shape[1] - 1)), SCRATCH_BLOCK
        )
        if cache.lengths is not None:
            padding = torch.arange(positions.shape[1], device=positions.device) >= cache.lengths[:, None]
            blocks = blocks.masked_fill(padding, SCRATCH_BLOCK)
        if cache.starts is not None:
            if positions.shape[1] != 1:
                raise ValueError(
                    "reading the pool in place (BlockTables.starts given) takes one token per row, "
                    f"got {positions.shape[1]}"
                )
            mask = pool_block_mask(tables, positions, cache.starts, block_size)
            return CachePass(blocks, positions % block_size, None, None, None, mask)
        gather = torch.arange(heads, device=tables.device)[None, :, None] * n_blocks + tables[:, None, :]
        key_positions = torch.arange(tables.shape[1] * block_size, device=tables.device)
        mask = (key_positions <= positions[..., None]).unsqueeze(1)  # broadcast over heads
        # one buffer a pass, which the layers gather into in turn: megabytes allocated anew twice a layer
        # come as fresh pages from the OS (docs/performance.md); compiled, inductor plans its own buffers; a
        # decode step over an 8-bit pool reads its blocks as stored (``KVCache.attend_stored``)
        gathered, stored = None, None
        if not torch.compiler.is_compiling() and not (kv_cache.quantized and positions.shape[1] == 1):
            shape = (2, gather.numel(), block_size, head_dim)
            gathered = torch.empty(shape, dtype=kv_cache.dtype, device=tables.device)
            if kv_cache.quantized:
                scales = torch.empty(shape[:-1] + (1,), dtype=kv_cache.dtype, device=tables.device)
                stored = kv_cache.cache_k.new_empty(shape), scales
        return CachePass(blocks, positions % block_size, gather, gathered, stored, mask)


class KVCache(nn.Module):
    """One attention layer's pool of keys and values, (n_local_kv_heads, n_blocks, block_size, head_dim)
    each, with its update (write a pass's keys and values) and its read (attend over a row's blocks).
    Attention computes in ``dtype``; ``storage`` (int8 or float8_e4m3fn) stores the pool in 8 bits with a
    scale per token and head in ``dtype``, ``scale_k`` and ``scale_v`` (n_local_kv_heads, n_blocks,
    block_size, 1); None stores it in ``dtype``."""

    def __init__(
        self,
        n_local_kv_heads: int,
        head_dim: int,
        n_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        storage: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if storage is not None and storage not in LARGEST:
            raise ValueError(f"a KV cache pool stores {sorted(map(str, LARGEST))} or its dtype, got {storage}")
        shape = (n_local_kv_heads, n_blocks, block_size, head_dim)
        self.register_buffer("cache_k", torch.zeros(shape, dtype=storage or dtype), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, dtype=storage or dtype), persistent=False)
        scales = None if storage is None else torch.zeros(shape[:-1] + (1,), dtype=dtype)
        self.register_buffer("scale_k", scales, persistent=False)
        self.register_buffer("scale_v", None if scales is None else scales.clone(), persistent=False)

    @property
    def block_size(self) -> int:
        return self.cache_k.shape[2]

    @property
    def quantized(self) -> bool:
        """Whether the pool stores 8-bit values with their scales."""
        return self.scale_k is not None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype attention computes in: the pool's, or its scales'."""
        return self.scale_k.dtype if self.quantized else self.cache_k.dtype

    @property
    def nbytes(self) -> int:
        """The pool's bytes, scales included."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def update(self, where: CachePass, xk: torch.Tensor, xv: torch.Tensor) -> None:
        """Write the keys and values (bsz, seqlen, n_local_kv_heads, head_dim) at their positions, in place
        (quantized, with their scales, in an 8-bit pool)."""
        for pool, scales, x in ((self.cache_k, self.scale_k, xk), (self.cache_v, self.scale_v, xv)):
            x = x.permute(2, 0, 1, 3)  # (heads, bsz, seqlen, head_dim)
            if scales is None:
                pool[:, where.blocks, where.offsets] = x.to(pool.dtype)
            else:
                pool[:, where.blocks, where.offsets], scales[:, where.blocks, where.offsets] = quantize(
                    x, pool.dtype, scales.dtype
                )

    def attend(self, xq: torch.Tensor, where: CachePass) -> torch.Tensor:
        """Attention of the queries (bsz, n_local_heads, seqlen, head_dim) over their rows' cached keys and
        values, in the cache's ``dtype``: (bsz, n_local_heads, seqlen, head_dim). Each key/value head serves
        its group of query heads."""
        xq = xq.to(self.dtype)
        if isinstance(where.mask, BlockMask):
            return self.attend_in_place(xq, where.mask)
        if self.quantized and xq.shape[2] == 1:
            return self.attend_stored(xq, where)
        keys, values = self.gather(where)
        return F.scaled_dot_product_attention(xq, keys, values, attn_mask=where.mask, enable_gqa=True)

    def attend_stored(self, xq: torch.Tensor, where: CachePass) -> torch.Tensor:
        """A decode step's attention over an 8-bit pool, one query per row: each row's blocks read as stored and
        converted, their scales applied to the scores and to the probabilities rather than to every value.
        Eagerly on a CPU row by row: a row's converted blocks (a few MB) stay in the CPU's caches between the
        two products, and no buffer of every row's blocks is written (fresh pages from the OS each pass);
        compiled, every row at once, its read and conversion one loop of inductor's; on a GPU every row at once
        (a loop would launch each kernel once a row)."""
        if torch.compiler.is_compiling() or xq.device.type != "cpu":
            return self.attend_rows(xq, where.gather, where.mask)
        rows = range(xq.shape[0])
        return torch.cat(
            [self.attend_rows(xq[b : b + 1], where.gather[b : b + 1], where.mask[b : b + 1]) for b in rows]
        )

    def attend_rows(self, xq: torch.Tensor, gather: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``attend_stored`` of the rows ``gather`` (bsz, heads, blocks) holds, their queries ``xq`` (bsz,
        n_local_heads, 1, head_dim) and ``mask`` (bsz, 1, 1, blocks * block_size)."""
        bsz, n_heads, _, head_dim = xq.shape
        heads = gather.shape[1]

        def blocks_of(pool: torch.Tensor) -> torch.Tensor:  # (bsz, heads, blocks * block_size, head_dim or 1)
            pool = pool.flatten(0, 1)  # (heads * blocks, block_size, head_dim or 1)
            blocks = pool[gather] if torch.compiler.is_compiling() else torch.index_select(pool, 0, gather.flatten())
            return blocks.view(bsz, heads, -1, pool.shape[-1])

        keys, values = blocks_of(self.cache_k).to(self.dtype), blocks_of(self.cache_v).to(self.dtype)
        key_scales, value_scales = blocks_of(self.scale_k).transpose(2, 3), blocks_of(self.scale_v).transpose(2, 3)
        xq = xq.view(bsz, heads, n_heads // heads, head_dim)  # each key/value head's group of query heads
        scores = torch.matmul(xq, keys.transpose(2, 3)) * (key_scales * head_dim**-0.5)  # (bsz, heads, group, keys)
        scores = scores.masked_fill(~mask, float("-inf"))
        output = torch.matmul(torch.softmax(scores, dim=-1) * value_scales, values)
        return output.view(bsz, n_heads, 1, head_dim)

    def gather(self, where: CachePass) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each row's blocks gathered in order, (bsz, n_local_kv_heads, blocks * block_size, head_dim) keys and
        values in ``dtype`` (dequantized from an 8-bit pool)."""
        gathered = []
        for i in range(2):
            blocks, scales = self.read(where, i)
            if scales is not None:
                out = None if where.gathered is None else where.gathered[i].view(blocks.shape)
                blocks = dequantize(blocks, scales, out)
            gathered.append(blocks)
        return gathered[0], gathered[1]

    def read(self, where: CachePass, i: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The keys (``i`` 0) or values (1) of each row's blocks as the pool stores them, (bsz, n_local_kv_heads,
        blocks * block_size, head_dim), and an 8-bit pool's scales (..., 1), else None. Compiled, by indexing,
        which inductor turns into plain loops; eager, by index_select into the pass's buffers, a third of
        indexing's time on a CPU."""
        bsz, heads, _ = where.gather.shape
        pools = [(self.cache_k, self.cache_v)[i]] + ([(self.scale_k, self.scale_v)[i]] if self.quantized else [])
        pools = [pool.flatten(0, 1) for pool in pools]  # (heads * blocks, block_size, head_dim or 1)
        if where.gathered is None:
            read = [pool[where.gather] for pool in pools]  # (bsz, heads, blocks, block_size, head_dim or 1)
        else:
            buffers = [where.gathered[i]] if not self.quantized else [where.stored[0][i], where.stored[1][i]]
            read = [torch.index_select(pool, 0, where.gather.flatten(), out=out) for pool, out in zip(pools, buffers)]
        read = [tensor.view(bsz, heads, -1, tensor.shape[-1]) for tensor in read]
        return read[0], read[1] if self.quantized else None

    def attend_in_place(self, xq: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
        """FlexAttention of one query per row over the blocks ``block_mask`` lists, where they lie in the pool
        (a quantized pool dequantized whole)."""
        heads, n_blocks, block_size, head_dim = self.cache_k.shape
        keys, values = self.cache_k, self.cache_v
        if self.quantized:
            keys, values = dequantize(keys, self.scale_k), dequantize(values, self.scale_v)
        keys = keys.view(1, heads, n_blocks * block_size, head_dim)  # one batch row, broadcast over the query rows
        values = values.view(1, heads, n_blocks * block_size, head_dim)
        # the query scaled here, a tensor of its own shape: inductor's CPU kernel takes the query's shape
        # from the tensor a view reads (torch 2.13), here the rotary embedding's (..., head_dim / 2, 2)
        return flex_attention(xq * head_dim**-0.5, keys, values, block_mask=block_mask, scale=1.0, enable_gqa=True)
