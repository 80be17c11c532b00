"""Continuous batching: which sequences run this step, and how many tokens each computes.

Each step has a token budget (``max_num_batched_tokens``). Running sequences are served first,
in arrival order: a decode costs one token, an unfinished prefill continues with a chunk. Then
waiting sequences are admitted (first come, first served) while the budget, ``max_num_seqs`` and
free KV blocks allow; with chunked prefill a long prompt takes whatever budget is left and
continues next step. When a running sequence needs a block and none is free, the most recently
admitted sequence is preempted: its blocks are freed and it goes back to the head of the
waiting queue to be recomputed later (its generated tokens are kept, so its output does not
change). With prefix caching on, recomputation reuses whatever blocks are still cached.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from framework.kv_cache import BlockManager
from framework.sequence import Sequence, SeqStatus


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens to compute)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)

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
        """Drop a finished or aborted sequence and free its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free_table(seq.block_table)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Blocks (and private copies of shared ones) for computing ``n`` more tokens of ``seq``."""
        start = seq.num_computed_tokens
        copies = self.bm.copy_on_write(seq.block_table, start, start + n)
        if copies is None:
            return False
        out.block_copies.extend(copies)
        return self.bm.ensure_slots(seq.block_table, start + n)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.bm.free_table(seq.block_table)
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[int] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
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
            if seq.num_computed_tokens + n < seq.num_prompt_tokens or n > 1:
                out.num_prefill_tokens += n
            else:
                out.num_decode_tokens += n
            budget -= n
            i += 1

        if out.preempted:
            return out  # memory is short: admit nobody new this step

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            plp = seq.request.prompt_logprobs  # prompt logprobs need every prompt position computed
            use_cache = plp is None or len(plp) >= seq.num_prompt_tokens
            cached = self.bm.match_prefix(seq.token_ids, use_cache)
            num_cached = len(cached) * self.bm.block_size
            n = seq.num_tokens - num_cached
            if n > budget:
                # without chunked prefill a prompt runs whole; a preempted sequence's recompute
                # (prompt + outputs) may exceed the budget, so it is chunked regardless
                if not self.chunked and seq.num_output_tokens == 0:
                    break
                n = budget
            need = self.bm.blocks_needed(num_cached + n) - len(cached)
            revived = sum(1 for b in cached if self.bm.ref_count[b] == 0)  # cached blocks sitting in the free list
            if need + revived > self.bm.num_free_blocks:
                break
            self.waiting.popleft()
            got = self.bm.allocate_prompt(seq.block_table, seq.token_ids, use_cache)
            assert got == num_cached
            seq.num_computed_tokens = num_cached
            ok = self.bm.ensure_slots(seq.block_table, num_cached + n)
            assert ok
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            out.num_prefill_tokens += n
            budget -= n
        return out
