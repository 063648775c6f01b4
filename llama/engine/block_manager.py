"""The KV cache pool's blocks, on the host: which row holds which block, and which full blocks hold a
known prefix (prefix caching).

Each layer's cache is a pool of ``n_blocks`` blocks of ``block_size`` positions (``llama.layers.kv_cache``);
block 0 is scratch (positions nobody reads land there) and is never handed out. A row's
``BlockTable`` lists its blocks in order: position p lives in block ``blocks[p // block_size]``.

Prefix caching: a full block is keyed by a chained hash, of the previous block's key and its own
tokens, rooted in a ``salt`` naming the weights (two models, or two adapters of one, never share
keys), and for a row computing with an adapter served per request, in that adapter's identity too.
A new row takes the longest run of its leading full blocks whose keys are known and whose stored
tokens are its own, and computes the rest; it never takes the block holding its last
prompt token, so at least one token is always computed and a shared block is never written.
Blocks are reference-counted; one that no row holds but whose key is known stays cached, and is
evicted, least recently used first, only when a fresh block is needed. When the weights change (a
training step), every key is forgotten (``reset_prefix_cache``).
"""

import hashlib
import itertools
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Tuple

from llama.layers.kv_cache import SCRATCH_BLOCK


@dataclass
class BlockTable:
    """One row's blocks, in position order, and how many leading ones are keyed (hashed)."""

    blocks: List[int] = field(default_factory=list)
    hashed: int = 0  # blocks[:hashed] are keyed; the last key is ``key``
    key: Optional[bytes] = None
    root: bytes = b""  # what its first key is chained on (``BlockManager.root_for``)


class BlockManager:
    """Hands out the pool's blocks and keeps the prefix cache's keys. Rank 0's alone under torchrun.

    Args:
        n_blocks: the pool's blocks, the scratch block included.
        block_size: positions per block.
        salt: what names the keys and values a token gets (the weights, an adapter): part of every key.
        prefix_cache: reuse cached prefixes (False: every row computes its whole prompt).
    """

    def __init__(self, n_blocks: int, block_size: int, salt: str = "", prefix_cache: bool = True):
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self.root = hashlib.blake2b(salt.encode(), digest_size=16).digest()
        self.free: Deque[int] = deque(b for b in range(n_blocks) if b != SCRATCH_BLOCK)  # never keyed, or evicted
        self.references = [0] * n_blocks
        self.keys: Dict[bytes, int] = {}  # key -> its block
        self.contents: Dict[int, Tuple[bytes, Tuple[int, ...]]] = {}  # keyed block -> (key, tokens)
        self.cached: "OrderedDict[int, None]" = OrderedDict()  # keyed blocks no row holds, least recently used first
        self.queried_tokens = 0  # prompt tokens looked up, and found, since the start (the hit rate)
        self.hit_tokens = 0

    @property
    def capacity(self) -> int:
        """Blocks a row may ever hold: all but the scratch block."""
        return len(self.references) - 1

    @property
    def available(self) -> int:
        """Blocks a row can get now: free, or cached and unheld (evicted on demand)."""
        return len(self.free) + len(self.cached)

    @property
    def used(self) -> int:
        """Blocks held by some row."""
        return self.capacity - self.available

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def root_for(self, adapter: Optional[str]) -> bytes:
        """The root of a row's keys: the salt's, or with the identity of the adapter it computes with, another."""
        if adapter is None:
            return self.root
        return hashlib.blake2b(self.root + adapter.encode(), digest_size=16).digest()

    def key(self, previous: bytes, tokens: Sequence[int]) -> bytes:
        """A full block's key: the previous block's key (``root`` for the first) and its tokens."""
        return hashlib.blake2b(previous + struct.pack(f"<{len(tokens)}I", *tokens), digest_size=16).digest()

    def full_blocks(
        self, tokens: Sequence[int], root: Optional[bytes] = None
    ) -> Iterator[Tuple[bytes, Tuple[int, ...]]]:
        """The key and the tokens of each leading full block of ``tokens`` but its last token (which a
        row always computes), chained from ``root`` (None: the salt's): the blocks a row could take from the
        prefix cache."""
        key = root or self.root
        for start in range(0, len(tokens) - self.block_size, self.block_size):
            chunk = tuple(tokens[start : start + self.block_size])
            key = self.key(key, chunk)
            yield key, chunk

    def cached_prefix(self, tokens: Sequence[int], root: Optional[bytes] = None) -> List[int]:
        """The cached blocks holding the longest run of ``full_blocks`` of ``tokens``, without taking them."""
        if not self.prefix_cache:
            return []
        found = []
        for key, chunk in self.full_blocks(tokens, root):
            block = self.keys.get(key)
            if block is None or self.contents[block][1] != chunk:
                break
            found.append(block)
        return found

    def computed_keys(self, tokens: Sequence[int], root: Optional[bytes] = None) -> List[bytes]:
        """The keys of the ``full_blocks`` of ``tokens`` past its cached prefix: those a row computes
        (none without the prefix cache)."""
        if not self.prefix_cache:
            return []
        cached = len(self.cached_prefix(tokens, root))
        return [key for key, _ in itertools.islice(self.full_blocks(tokens, root), cached, None)]

    def needed(self, tokens: Sequence[int], n_tokens: int, root: Optional[bytes] = None) -> int:
        """Fresh blocks a new row whose first ``n_tokens`` positions are ``tokens`` needs now."""
        hits = self.cached_prefix(tokens, root)
        return self.blocks_for(n_tokens) - len(hits) + sum(block in self.cached for block in hits)

    def allocate(
        self, tokens: Sequence[int], n_tokens: int, adapter: Optional[str] = None
    ) -> Optional[Tuple[BlockTable, int]]:
        """A new row's table for its first ``n_tokens`` positions, whose tokens are ``tokens``, computed with
        ``adapter`` (its identity; None: the weights alone): the cached prefix taken, fresh blocks after it.
        Returns (table, cached tokens), or None (nothing taken) when the pool cannot give them."""
        root = self.root_for(adapter)
        if self.needed(tokens, n_tokens, root) > self.available:
            return None
        hits = self.cached_prefix(tokens, root)
        for block in hits:
            self.cached.pop(block, None)
            self.references[block] += 1
        table = BlockTable(list(hits), len(hits), self.contents[hits[-1]][0] if hits else None, root)
        self.grow(table, n_tokens)
        self.queried_tokens += len(tokens)
        self.hit_tokens += len(hits) * self.block_size
        return table, len(hits) * self.block_size

    def grow(self, table: BlockTable, n_tokens: int) -> bool:
        """Give ``table`` fresh blocks until it covers ``n_tokens`` positions; False (nothing given) if
        the pool cannot."""
        missing = self.blocks_for(n_tokens) - len(table.blocks)
        if missing > self.available:
            return False
        for _ in range(missing):
            table.blocks.append(self.fresh())
        return True

    def fresh(self) -> int:
        """A block for one row: a free one, else the least recently used cached one, its key dropped."""
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.cached.popitem(last=False)
            key, _ = self.contents.pop(block)
            del self.keys[key]
        self.references[block] = 1
        return block

    def register(self, table: BlockTable, tokens: Sequence[int], written: int) -> None:
        """Key the table's full blocks whose positions are all written (below ``written``); ``tokens``:
        the row's tokens at least that far. A block whose key another block holds stays unkeyed."""
        if not self.prefix_cache:
            return
        while (table.hashed + 1) * self.block_size <= min(written, len(table.blocks) * self.block_size):
            start = table.hashed * self.block_size
            chunk = tuple(tokens[start : start + self.block_size])
            key = self.key(table.key or table.root, chunk)
            block = table.blocks[table.hashed]
            if key not in self.keys and block not in self.contents:
                self.keys[key], self.contents[block] = block, (key, chunk)
            table.hashed, table.key = table.hashed + 1, key

    def release(self, table: BlockTable) -> None:
        """The row gives its blocks back: a block no row holds any more is cached if keyed, else free."""
        for block in reversed(table.blocks):  # the last blocks are evicted first
            self.references[block] -= 1
            if self.references[block] == 0:
                if block in self.contents:
                    self.cached[block] = None
                else:
                    self.free.append(block)
        table.blocks, table.hashed, table.key = [], 0, None

    def reset_prefix_cache(self) -> None:
        """Forget every key (the weights changed: the keys and values of the cached blocks are stale): the
        cached blocks become free. Only while no row holds a block, whose keys a later ``register`` would
        chain on."""
        if self.used:
            raise ValueError(f"{self.used} block(s) are held by rows: the prefix cache is reset with none held")
        self.free.extend(self.cached)
        self.cached.clear()
        self.keys.clear()
        self.contents.clear()
