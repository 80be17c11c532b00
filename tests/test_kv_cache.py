"""Block manager bookkeeping: reference counts, prefix hashing, copy-on-write, eviction."""

from __future__ import annotations

import pytest

from framework.kv_cache import BlockManager


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    t: list[int] = []
    assert bm.allocate_prompt(t, list(range(10))) == 0
    assert bm.ensure_slots(t, 10) and len(t) == 3
    assert bm.num_free_blocks == 5
    assert not bm.ensure_slots(t, 40)  # would need 10 blocks: refused, nothing changed
    assert len(t) == 3 and bm.num_free_blocks == 5
    bm.free_table(t)
    assert t == [] and bm.check_all_free()


def test_prefix_hit_requires_identical_full_blocks_and_keeps_last_token():
    bm = BlockManager(num_blocks=16, block_size=4)
    toks = list(range(100, 113))  # 13 tokens: 3 full blocks
    a: list[int] = []
    bm.allocate_prompt(a, toks)
    bm.ensure_slots(a, len(toks))
    bm.commit_full_blocks(a, toks, num_computed=len(toks), hashed=0)
    b: list[int] = []
    assert bm.allocate_prompt(b, toks) == 12
    assert b == a[:3] and all(bm.ref_count[x] == 2 for x in a[:3])
    # exactly 12 tokens: the last block is not served (its last token must be computed)
    assert bm.match_prefix(toks[:12]) == a[:2]
    # a different second block stops the match after the first
    other = toks[:4] + [1, 2, 3, 4] + toks[8:]
    assert bm.match_prefix(other) == a[:1]
    blocks = list(a)
    bm.free_table(a)
    bm.free_table(b)
    assert bm.check_all_free()
    # freed blocks stay cached until the pool needs them
    assert bm.match_prefix(toks) == blocks[:3]


def test_hash_collision_never_reuses_wrong_block(monkeypatch):
    bm = BlockManager(num_blocks=8, block_size=2)
    monkeypatch.setattr(BlockManager, "chain_hash", staticmethod(lambda prev, toks: 42))  # everything collides
    a: list[int] = []
    bm.allocate_prompt(a, [1, 2, 3])
    bm.ensure_slots(a, 3)
    bm.commit_full_blocks(a, [1, 2, 3], 3, 0)
    assert bm.match_prefix([1, 2, 9]) == a[:1]
    assert bm.match_prefix([7, 8, 9]) == []  # same hash, different tokens


def test_eviction_takes_least_recently_freed_cached_block():
    bm = BlockManager(num_blocks=3, block_size=2)
    seqs = []
    for base in (10, 20):
        t: list[int] = []
        toks = [base, base + 1, base + 2]
        bm.allocate_prompt(t, toks)
        bm.ensure_slots(t, 2)
        bm.commit_full_blocks(t, toks, 2, 0)
        seqs.append((t, toks))
    for t, _ in seqs:
        bm.free_table(t)
    # need 2 blocks: the never-used one and the oldest freed (base 10) go first
    t: list[int] = []
    assert bm.ensure_slots(t, 4)
    assert bm.match_prefix([10, 11, 12]) == []
    assert len(bm.match_prefix([20, 21, 22])) == 1


def test_fork_and_copy_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent: list[int] = []
    bm.allocate_prompt(parent, list(range(6)))
    bm.ensure_slots(parent, 6)
    child = bm.fork(parent)
    assert child == parent and all(bm.ref_count[b] == 2 for b in parent)
    # the child writes token 6, inside the shared second block: it gets a private copy
    copies = bm.copy_on_write(child, 6, 7)
    assert copies == [(parent[1], child[1])] and child[1] != parent[1]
    assert child[0] == parent[0] and bm.ref_count[parent[0]] == 2 and bm.ref_count[parent[1]] == 1
    # the parent is now the only owner of its block: no copy
    assert bm.copy_on_write(parent, 6, 7) == []
    bm.free_table(parent)
    bm.free_table(child)
    assert bm.check_all_free()


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=2, block_size=2)
    t: list[int] = []
    bm.ensure_slots(t, 2)
    block = t[0]
    bm.free_table(t)
    with pytest.raises(AssertionError):
        bm._unref(block)
