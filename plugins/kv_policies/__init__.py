"""Built-in KV policies for unbounded generation (``framework/kv_policy.py``).

``attention_sinks`` (StreamingLLM, Xiao et al. 2023): a sequence keeps the KV of its first
``num_sinks`` tokens (the "attention sinks") and of its most recent ``window`` tokens; the
blocks in between are evicted as the sequence grows, so memory per sequence stays constant and
generation runs past the model's context length. ``sliding_window``: the same with no sinks
(the baseline StreamingLLM shows collapsing once the first tokens leave the cache).

Both evict whole blocks, so their sizes are in blocks of the pool (``block_size``):

* the sinks are the first ``ceil(num_sinks / block_size)`` blocks — with ``block_size: 16``,
  ``num_sinks: 4`` keeps the first 16 tokens (use ``block_size: 4`` for exactly 4);
* a block leaves once all its tokens are older than the most recent ``window`` computed
  tokens, so the window holds between ``window`` and ``window + block_size - 1`` tokens (plus
  the tokens of the current forward).

Positions are *cache positions* as in the paper: after an eviction the kept tokens are
contiguous from position 0 and the next token sits right after them. Keys are cached after RoPE,
so on each eviction the kept keys after the hole are re-rotated by the number of positions they
moved (``ModelPool.rotate_keys``): one gather/rotate/scatter of the window's keys per evicted
block run, ``O(window / block_size)`` key rotations per generated token amortised — a small
fraction of what attention reads every step. Evicted blocks go back to the pool and leave the
prefix cache; rotated blocks leave it too (the head blocks keep their hashes: their content is
unchanged, so later prompts still share them).

Each eviction re-rotates the whole window's keys, so its cost is ``O(window)`` per evicted run:
``evict_blocks: N`` waits until ``N`` blocks are out of the window and drops them at once,
dividing that amortised cost by ``N`` at the price of up to ``N * block_size - 1`` extra tokens
held (keep ``window + N * block_size`` within the model's context).

Tokens computed in one forward (a prefill chunk) attend to the cache as it stood before that
forward plus each other; eviction happens after each forward. A sequence preempted under
memory pressure is recomputed in chunks, which can change its later outputs slightly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from framework.hookspecs import Register, hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from framework.companions import ModelPool
    from framework.sequence import SeqKV


class AttentionSinks:
    """Keep the first ``num_sinks`` tokens and the most recent ``window`` tokens (in blocks)."""

    unbounded = True

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        num_sinks: int = Field(4, ge=0, description="leading tokens always kept (rounded up to whole blocks)")
        window: int = Field(1020, ge=1, description="most recent tokens kept (at least; whole blocks leave)")
        evict_blocks: int = Field(1, ge=1, description="evict only runs of at least this many blocks: one "
                                  "re-rotation of the window per run (the cache holds up to "
                                  "window + evict_blocks * block_size - 1 tokens)")

    def __init__(self, num_sinks: int = 4, window: int = 1020, evict_blocks: int = 1):
        self.num_sinks = num_sinks
        self.window = window
        self.evict_blocks = evict_blocks
        self.num_evictions = 0  # eviction events (a run of blocks dropped at once)

    def head_blocks(self, block_size: int) -> int:
        """Blocks at the start of the table that are never evicted."""
        return -(-self.num_sinks // block_size)

    def after_compute(self, kv: "SeqKV", pool: "ModelPool") -> None:
        bs = pool.block_size
        head = self.head_blocks(bs)
        n = kv.num_computed - kv.num_evicted  # cache positions in use
        last = (n - self.window) // bs  # blocks [head, last) hold only tokens older than the window
        k = last - head
        if k < self.evict_blocks:
            return
        # the kept tail moves k blocks down: its keys must read as their new cache positions
        if not pool.rotate_keys(kv.table, last * bs, n, -k * bs):
            return  # no free block for a copy-on-write: try again after the next forward
        pool.bm.release_blocks(kv.table, list(range(head, last)))
        kv.num_evicted += k * bs
        kv.num_hashed = min(kv.num_hashed, head)
        self.num_evictions += 1


class SlidingWindow(AttentionSinks):
    """Keep only the most recent ``window`` tokens (whole blocks): attention sinks without sinks."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        window: int = Field(1024, ge=1, description="most recent tokens kept (at least; whole blocks leave)")
        evict_blocks: int = Field(1, ge=1, description="evict only runs of at least this many blocks")

    def __init__(self, window: int = 1024, evict_blocks: int = 1):
        super().__init__(num_sinks=0, window=window, evict_blocks=evict_blocks)


@hookimpl
def register_kv_policies(register: Register) -> None:
    register("attention_sinks", AttentionSinks, params=AttentionSinks.Params)
    register("sliding_window", SlidingWindow, params=SlidingWindow.Params)


__all__ = ["AttentionSinks", "SlidingWindow"]
