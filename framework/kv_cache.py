"""Paged KV cache: a pool of fixed-size blocks with reference counts, prefix caching, CoW forks.

Bookkeeping (this module's :class:`BlockManager`) is separate from storage
(:class:`KVCacheStorage`, one ``[num_blocks * block_size, n_kv, head_dim]`` tensor per layer for K
and for V). A sequence owns a *block table*: the list of block ids holding its tokens in order;
token ``i`` lives in slot ``table[i // block_size] * block_size + i % block_size``.

Prefix caching: every *full* block is identified by a hash chained over (previous block's hash,
this block's token ids). A new sequence whose first full blocks match cached hashes reuses those
blocks (their reference count goes up) and skips computing those tokens. Token ids are stored
with each hash and compared, so a hash collision can never reuse the wrong block. Blocks whose
reference count drops to zero stay cached (and are reusable) until the pool needs them; they are
then evicted in least-recently-freed order.

Forks (``n > 1``, beams) share all blocks; a block with more than one owner is copied before a
sequence writes into it (copy-on-write); the copies to perform are returned to the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from framework.models.config import ModelConfig


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # prompt tokens found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class BlockManager:
    """Allocates blocks to sequences. All methods are O(blocks touched)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        # free blocks, oldest-freed first; cached (hashed) free blocks are evicted in this order
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.block_hash: dict[int, int] = {}  # block id -> hash of its content
        self.block_tokens: dict[int, tuple[int, ...]] = {}  # for collision checks
        self.stats = PrefixCacheStats()

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------------ allocation
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        self._unhash(block)  # evict its cached content
        self.ref_count[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def _unref(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} freed twice"
        if self.ref_count[block] == 0:
            self.free[block] = None

    @staticmethod
    def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def match_prefix(self, token_ids: list[int], use_cache: bool = True) -> list[int]:
        """Blocks holding the longest cached prefix of ``token_ids`` (full blocks only).

        The last token is never served from the cache: the engine must compute at least one
        token of a prompt to get its next-token logits. ``use_cache=False`` (a request that needs
        logits at every prompt position) matches nothing.
        """
        if not self.enable_prefix_caching or not use_cache:
            return []
        bs = self.block_size
        n_full = (len(token_ids) - 1) // bs
        blocks: list[int] = []
        prev: int | None = None
        for i in range(n_full):
            toks = tuple(token_ids[i * bs : (i + 1) * bs])
            h = self.chain_hash(prev, toks)
            b = self.hash_to_block.get(h)
            if b is None or self.block_tokens.get(b) != toks:
                break
            blocks.append(b)
            prev = h
        return blocks

    def allocate_prompt(self, table: list[int], token_ids: list[int], use_cache: bool = True) -> int:
        """Start a sequence's block table with its cached prefix; returns tokens served from cache.

        Only the lookup happens here; blocks for the tokens still to compute are added by
        :meth:`ensure_slots` as the scheduler schedules them.
        """
        assert not table
        cached = self.match_prefix(token_ids, use_cache)
        for b in cached:
            self._ref(b)
        table.extend(cached)
        self.stats.queries += len(token_ids)
        self.stats.hits += len(cached) * self.block_size
        return len(cached) * self.block_size

    def ensure_slots(self, table: list[int], num_tokens: int) -> bool:
        """Grow ``table`` to hold ``num_tokens`` tokens. False (and no change) if the pool is short."""
        need = self.blocks_needed(num_tokens) - len(table)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        for _ in range(need):
            table.append(self._take_free())
        return True

    def copy_on_write(self, table: list[int], first_token: int, last_token: int) -> list[tuple[int, int]] | None:
        """Before writing tokens ``[first_token, last_token)``, give the sequence private copies
        of shared blocks in that range. Returns the (src, dst) block copies to perform, or None
        if the pool is short (nothing changed)."""
        bs = self.block_size
        lo, hi = first_token // bs, min(len(table), -(-last_token // bs))
        shared = [i for i in range(lo, hi) if self.ref_count[table[i]] > 1]
        if len(shared) > len(self.free):
            return None
        copies = []
        for i in shared:
            src = table[i]
            dst = self._take_free()
            self._unref(src)
            table[i] = dst
            copies.append((src, dst))
        return copies

    def commit_full_blocks(self, table: list[int], token_ids: list[int], num_computed: int, hashed: int) -> int:
        """Register the hashes of blocks that became full and computed. Returns the new count of
        hashed blocks (the caller keeps it per sequence so each block is hashed once)."""
        if not self.enable_prefix_caching:
            return hashed
        bs = self.block_size
        n_full = min(num_computed // bs, len(table))
        prev = self.block_hash.get(table[hashed - 1]) if hashed > 0 else None
        for i in range(hashed, n_full):
            toks = tuple(token_ids[i * bs : (i + 1) * bs])
            h = self.chain_hash(prev, toks)
            b = table[i]
            if b not in self.block_hash:
                self.block_hash[b] = h
                self.block_tokens[b] = toks
                self.hash_to_block.setdefault(h, b)
            prev = h
        return max(hashed, n_full)

    def truncate(self, table: list[int], num_tokens: int, num_hashed: int) -> int:
        """Keep only the first ``num_tokens`` tokens of ``table`` (speculative tokens rejected,
        a rollback): blocks past them are released, and a kept block that is no longer full is
        taken out of the prefix cache if this table is its only owner (its tail will be
        overwritten; a shared block keeps its hash, since copy-on-write gives the writer a copy).
        Returns the new count of hashed blocks for the caller to store (``num_hashed`` capped)."""
        bs = self.block_size
        keep = self.blocks_needed(num_tokens)
        for b in reversed(table[keep:]):
            self._unref(b)
        del table[keep:]
        full = num_tokens // bs
        if keep > full and self.ref_count[table[-1]] == 1:
            self._unhash(table[-1])
        return min(num_hashed, full)

    def _unhash(self, block: int) -> None:
        h = self.block_hash.pop(block, None)
        if h is not None:
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_tokens.pop(block, None)

    def release_blocks(self, table: list[int], indices: list[int]) -> None:
        """Drop the blocks at ``indices`` of ``table`` (a KV policy evicting from the middle);
        they leave the prefix cache (the hash chain past them no longer describes the table)."""
        for i in sorted(indices, reverse=True):
            b = table.pop(i)
            if self.ref_count[b] == 1:
                self._unhash(b)
            self._unref(b)

    def fork(self, table: list[int]) -> list[int]:
        """A new table sharing every block of ``table`` (copy-on-write happens on first write)."""
        for b in table:
            self._ref(b)
        return list(table)

    def free_table(self, table: list[int]) -> None:
        # free in reverse so a sequence's tail blocks are evicted before its (more shareable) head
        for b in reversed(table):
            self._unref(b)
        table.clear()

    def check_all_free(self) -> bool:
        return len(self.free) == self.num_blocks and not any(self.ref_count)


class KVCacheStorage:
    """K and V tensors for every layer: ``[num_blocks * block_size, n_kv_heads, head_dim]``."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        slots = num_blocks * block_size
        shape = (cfg.num_hidden_layers, 2, slots, cfg.num_key_value_heads, cfg.head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.layers = [(self.data[i, 0], self.data[i, 1]) for i in range(cfg.num_hidden_layers)]

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        bs = self.block_size
        src = torch.tensor([s * bs + j for s, _ in copies for j in range(bs)], device=self.data.device)
        dst = torch.tensor([d * bs + j for _, d in copies for j in range(bs)], device=self.data.device)
        self.data[:, :, dst] = self.data[:, :, src]

    @staticmethod
    def num_blocks_for_budget(cfg: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype) -> int:
        per_block = cfg.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * block_size
        return max(1, budget_bytes // per_block)
