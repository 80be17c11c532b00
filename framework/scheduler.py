"""Continuous batching: which sequences run this step, and how many tokens each computes.

Each step has a token budget (``max_num_batched_tokens``). Running sequences are served first,
in arrival order: a decode costs one token, an unfinished prefill continues with a chunk. Then
waiting sequences are admitted (first come, first served) while the budget, ``max_num_seqs`` and
free KV blocks allow; with chunked prefill a long prompt takes whatever budget is left and
continues next step. When a running sequence needs a block and none is free, the most recently
admitted sequence is preempted: its blocks are freed and it goes back to the head of the
waiting queue to be recomputed later (its generated tokens are kept, so its output does not
change). With prefix caching on, recomputation reuses whatever blocks are still cached.

A sequence holds blocks in every pool its request uses (the main model's and each lockstep
companion's, ``framework/companions.py``): the scheduler reserves them together, preempts and
frees them together. The token budget counts the main model's tokens. Draft tokens
(``Sequence.draft``, speculative decoding) are scheduled with the sequence or not at all: when
they do not fit the budget they are dropped (``SchedulerOutput.drafts_dropped``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from framework.kv_cache import BlockManager
from framework.sequence import Sequence, SeqStatus


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    block_copies: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # pool index -> CoW (src, dst) blocks
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    drafts_dropped: list[Sequence] = field(default_factory=list)  # drafts that did not fit this step

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A fork of a running sequence joins the batch directly (it shares its parent's blocks)."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks (in every pool)."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.free_blocks(seq)

    @staticmethod
    def free_blocks(seq: Sequence) -> None:
        for pool, kv in zip(seq.request.pools, seq.kv):
            pool.free(kv)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Blocks (and private copies of shared ones) for computing ``n`` more tokens of ``seq``
        in every lockstep pool of its request."""
        end = seq.kv[0].num_computed + n
        for pool, kv in zip(seq.request.pools, seq.kv):
            if not pool.lockstep:
                continue
            lo, hi = kv.num_computed - kv.num_evicted, end - kv.num_evicted
            if hi <= lo:
                continue
            copies = pool.bm.copy_on_write(kv.table, lo, hi)
            if copies is None:
                return False
            if copies:
                out.block_copies.setdefault(pool.index, []).extend(copies)
            if not pool.bm.ensure_slots(kv.table, hi):
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.free_blocks(seq)
        seq.draft.clear()
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    @staticmethod
    def _fits(bm: BlockManager, cached: list[int], num_tokens: int) -> bool:
        need = bm.blocks_needed(num_tokens) - len(cached)
        revived = sum(1 for b in cached if bm.ref_count[b] == 0)  # cached blocks sitting in the free list
        return max(0, need) + revived <= bm.num_free_blocks

    def schedule(self) -> SchedulerOutput:
        """Plan one step: running sequences first (preempting the newest when blocks run out),
        then waiting ones while the budget, ``max_num_seqs`` and free blocks allow."""
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:  # memory is short: admit nobody new this step
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        scheduled_ids: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            todo = len(seq.token_ids) + len(seq.draft) - seq.kv[0].num_computed
            if seq.draft and todo > budget:
                seq.draft.clear()  # drafts run whole or not at all
                out.drafts_dropped.append(seq)
                todo = len(seq.token_ids) - seq.kv[0].num_computed
            n = min(todo, budget)
            if n == 0:  # parked: its next token waits on others (a beam waiting for its siblings)
                i += 1
                continue
            while not self._reserve(seq, n, out):
                victim = self.running[-1]
                if id(victim) in scheduled_ids:  # never undo work already planned this step
                    victim = seq
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue  # seq itself was preempted; running[i] is now the next one
            out.scheduled.append((seq, n))
            scheduled_ids.add(id(seq))
            if seq.kv[0].num_computed + n < seq.num_prompt_tokens or n > 1:
                out.num_prefill_tokens += n
            else:
                out.num_decode_tokens += n
            budget -= n
            i += 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            plp = seq.request.prompt_logprobs  # prompt logprobs need every prompt position computed
            use_cache = plp is None or len(plp) >= seq.num_prompt_tokens
            pools = [(p, kv) for p, kv in zip(seq.request.pools, seq.kv) if p.lockstep]
            cached = [p.bm.match_prefix(seq.token_ids, use_cache) for p, _ in pools]
            num_cached = len(cached[0]) * self.bm.block_size
            n = seq.num_tokens - num_cached
            if n > budget:
                # without chunked prefill a prompt runs whole; a preempted sequence's recompute
                # (prompt + outputs) may exceed the budget, so it is chunked regardless
                if not self.chunked and seq.num_output_tokens == 0:
                    break
                n = budget
            if not all(self._fits(p.bm, c, num_cached + n) for (p, _), c in zip(pools, cached)):
                break
            self.waiting.popleft()
            for (p, kv), c in zip(pools, cached):
                got = p.bm.allocate_prompt(kv.table, seq.token_ids, use_cache)
                assert got == len(c) * p.bm.block_size
                kv.num_computed = got
                ok = p.bm.ensure_slots(kv.table, max(got, num_cached + n))
                assert ok
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            out.num_prefill_tokens += n
            budget -= n
