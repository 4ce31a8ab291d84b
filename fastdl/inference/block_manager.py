"""KV-cache blocks, handed out like virtual-memory pages (vLLM's PagedAttention, arXiv:2309.06180).

The cache of every layer is (num_blocks, block_size, n_kv_head, head_dim); a sequence owns a *block table*,
the list of block ids holding its tokens in order: token t lives in slot
``table[t // block_size] * block_size + t % block_size``. Blocks are reference counted:

* **forks share.** A sequence forked for parallel sampling or beam search gets a copy of its parent's table
  and every block's count goes up by one; nothing is copied.
* **copy on write.** Before a sequence writes into a block that another sequence also holds (count > 1),
  :meth:`BlockManager.prepare_write` gives it a fresh block and returns the (src, dst) pair for
  ``copy_blocks`` to copy the cached keys and values.
* **prompt prefixes are shared.** With ``enable_prefix_caching``, a full block is registered under a hash of
  all the tokens up to its end once its keys and values are computed; a new prompt that starts with the same
  tokens takes those blocks (count + 1) instead of computing them again. A block leaves the table when its
  count drops to zero, so only blocks some live sequence holds are shared.

A block whose count drops to zero returns to the free list; when every sequence is freed every count is
zero again (:meth:`BlockManager.check_no_leaks`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

__all__ = ["BlockManager", "NoFreeBlocksError"]


class NoFreeBlocksError(RuntimeError):
    """Not enough free blocks for an allocation; the scheduler preempts a sequence and tries again."""


class BlockManager:
    """Allocates, shares and frees the blocks of a paged KV cache. Pure bookkeeping: no tensors."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._hash_to_block: dict[int, int] = {}
        self._block_to_hash: dict[int, int] = {}

    # ------------------------------------------------------------------ counts

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def check_no_leaks(self) -> None:
        """Raises if any block is still held: call when no sequence is alive."""
        held = {b: c for b, c in enumerate(self.ref_counts) if c != 0}
        if held or len(self._free) != self.num_blocks or self._hash_to_block:
            first = dict(list(held.items())[:8])
            raise AssertionError(f"leaked KV blocks: {len(held)} blocks still referenced ({first}), "
                                 f"{len(self._free)} of {self.num_blocks} free, {len(self._hash_to_block)} cached")

    # ------------------------------------------------------------------ allocation

    def _allocate(self) -> int:
        if not self._free:
            raise NoFreeBlocksError(f"all {self.num_blocks} KV blocks are in use")
        block = self._free.popleft()
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        count = self.ref_counts[block]
        if count <= 0:
            raise AssertionError(f"block {block} freed more times than it was referenced")
        self.ref_counts[block] = count - 1
        if count == 1:
            cached_hash = self._block_to_hash.pop(block, None)
            if cached_hash is not None:
                del self._hash_to_block[cached_hash]
            self._free.append(block)

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Appends fresh blocks to table until it holds num_tokens tokens. All or nothing: raises
        NoFreeBlocksError, with table unchanged, when the free blocks do not suffice."""
        missing = self.blocks_for(num_tokens) - len(table)
        if missing > len(self._free):
            raise NoFreeBlocksError(f"need {missing} more KV blocks, {len(self._free)} free")
        for _ in range(missing):
            table.append(self._allocate())

    def prepare_write(self, table: list[int], start: int, end: int) -> list[tuple[int, int]]:
        """Makes the blocks holding token positions [start, end) private to this table (copy on write).
        Returns the (src, dst) block pairs whose contents the caller must copy before writing. The table
        must already cover end tokens (:meth:`grow`). Raises NoFreeBlocksError, table unchanged, when
        too few blocks are free."""
        if end <= start:
            return []
        first, last = start // self.block_size, (end - 1) // self.block_size
        shared = [i for i in range(first, last + 1) if self.ref_counts[table[i]] > 1]
        if len(shared) > len(self._free):
            raise NoFreeBlocksError(f"copy on write needs {len(shared)} KV blocks, {len(self._free)} free")
        copies = []
        for i in shared:
            src, dst = table[i], self._allocate()
            self._release(src)
            table[i] = dst
            copies.append((src, dst))
        return copies

    def fork(self, table: Sequence[int]) -> list[int]:
        """A child's table sharing every block of table (counts + 1)."""
        for block in table:
            if self.ref_counts[block] <= 0:
                raise AssertionError(f"fork of a table holding freed block {block}")
            self.ref_counts[block] += 1
        return list(table)

    def free(self, table: list[int]) -> None:
        """Drops table's references (its blocks return to the free list at count zero) and empties it."""
        for block in table:
            self._release(block)
        table.clear()

    # ------------------------------------------------------------------ prefix sharing

    def _block_hashes(self, tokens: Sequence[int], num_full_blocks: int) -> list[int]:
        hashes, parent = [], None
        bs = self.block_size
        for i in range(num_full_blocks):
            parent = hash((parent, tuple(tokens[i * bs:(i + 1) * bs])))
            hashes.append(parent)
        return hashes

    def share_prefix(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        """The longest run of cached full blocks that starts tokens and covers at most max_tokens tokens,
        each with count + 1: a new table to start the sequence with. Empty without prefix caching."""
        if not self.enable_prefix_caching:
            return []
        table: list[int] = []
        for h in self._block_hashes(tokens, min(len(tokens), max_tokens) // self.block_size):
            block = self._hash_to_block.get(h)
            if block is None:
                break
            self.ref_counts[block] += 1
            table.append(block)
        return table

    def register_prefix(self, table: Sequence[int], tokens: Sequence[int], num_computed: int) -> None:
        """Makes the full blocks of table whose keys and values are computed (the first num_computed tokens)
        available to :meth:`share_prefix`."""
        if not self.enable_prefix_caching:
            return
        full = min(num_computed // self.block_size, len(table))
        for i, h in enumerate(self._block_hashes(tokens, full)):
            block = table[i]
            if block in self._block_to_hash or h in self._hash_to_block:
                continue
            self._hash_to_block[h] = block
            self._block_to_hash[block] = h
