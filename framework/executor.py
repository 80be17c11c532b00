"""One forward of every model for a scheduled step.

The scheduler says which sequences compute how many tokens. The executor turns that into
:class:`~framework.model_runner.ForwardItem` lists — one per pool: the main model, and each
lockstep companion the scheduled requests use — runs each pool's model once, advances the
sequences' computed counts (registering full blocks in each pool's prefix cache and letting the
pool's KV policy evict), records prompt logprobs, and returns the main model's logits at every
row whose next token is due (one row per sequence, or ``1 + len(draft)`` rows for a sequence
with draft tokens to verify). Companions keep their due-row outputs in their pool
(``ModelPool.step_out``) for the processors to read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.companions import ModelPool
from framework.kv_policy import KeepAll
from framework.model_runner import ForwardItem
from framework.scheduler import SchedulerOutput
from framework.sequence import Sequence


@dataclass(slots=True)
class StepForward:
    """The main model's outputs for one step."""

    seqs: list[Sequence]  # due sequences, in row order
    logits: torch.Tensor | None  # [N, V] float32
    counts: list[int]  # rows per due sequence (1 + its draft length)


class Executor:
    """Runs the scheduled step on every pool it touches."""

    def __init__(self, pools: list[ModelPool]):
        self.pools = pools  # shared with the engine's ModelSet: companions loaded later appear here

    @torch.inference_mode()
    def forward(self, sched: SchedulerOutput) -> StepForward:
        ends = [seq.kv[0].num_computed + n for seq, n in sched.scheduled]
        due = [seq for (seq, _), end in zip(sched.scheduled, ends) if end == len(seq.token_ids) + len(seq.draft)]
        counts = [1 + len(seq.draft) for seq in due]
        per_pool = self._items(sched, ends)
        logits = None
        for pool in self.pools:
            work = per_pool.get(pool.index)
            copies = sched.block_copies.get(pool.index)
            if work is None:
                if copies:
                    pool.storage.copy_blocks(copies)
                continue
            items, owners = work
            hidden = pool.runner.forward(items, copies)
            out = self._split(pool, hidden, items, owners)
            if pool.index == 0:
                logits = out
        return StepForward(due, logits, counts)

    def _items(self, sched: SchedulerOutput, ends: list[int]) -> dict[int, tuple[list[ForwardItem], list[tuple]]]:
        """Per pool index: the items to run and, per item, (seq, kv, end, due rows, prompt-logprob rows)."""
        work: dict[int, tuple[list[ForwardItem], list[tuple]]] = {}
        for (seq, _), end in zip(sched.scheduled, ends):
            is_due = end == len(seq.token_ids) + len(seq.draft)
            m = 1 + len(seq.draft) if is_due else 0
            for j, (pool, kv) in enumerate(zip(seq.request.pools, seq.kv)):
                if not pool.lockstep or kv.num_computed >= end:
                    continue
                start = kv.num_computed
                n = end - start
                plp = 0
                if j == 0 and seq.request.prompt_logprobs is not None:
                    plp = self._prompt_logprob_rows(seq, start, end)
                outputs = range(0, n) if (plp and m) else (range(0, plp) if plp else range(n - m, n))
                item = ForwardItem(kv.table, seq.tokens_between(start, end), start - kv.num_evicted, outputs)
                items, owners = work.setdefault(pool.index, ([], []))
                items.append(item)
                owners.append((seq, kv, end, m, plp))
        return work

    @staticmethod
    def _prompt_logprob_rows(seq: Sequence, start: int, end: int) -> int:
        """How many rows from ``start`` give prompt logprobs this step (0: none wanted)."""
        plp = seq.request.prompt_logprobs
        P = seq.num_prompt_tokens
        if len(plp) >= P or start >= P - 1:
            return 0
        return min(end, P - 1) - start

    def _split(self, pool: ModelPool, hidden: torch.Tensor, items: list[ForwardItem], owners: list[tuple]) -> torch.Tensor | None:
        """Advance computed counts; compute the pool's outputs at due rows (and prompt logprobs)."""
        bm = pool.bm
        evicting = not isinstance(pool.policy, KeepAll)
        due_rows: list[int] = []
        pool.step_rows = {}
        row = 0
        for item, (seq, kv, end, m, plp) in zip(items, owners):
            kv.num_computed = end
            if kv.num_evicted == 0:
                kv.num_hashed = bm.commit_full_blocks(kv.table, seq.token_ids, min(end, len(seq.token_ids)), kv.num_hashed)
            if evicting:
                pool.policy.after_compute(kv, pool)
            if plp:
                self._prompt_logprobs(pool, seq, hidden[row : row + plp], end - (len(item.tokens)))
            n_out = len(item.outputs)
            if m:
                pool.step_rows[seq.seq_id] = len(due_rows)
                due_rows.extend(range(row + n_out - m, row + n_out))
            row += n_out
        if not due_rows:
            pool.step_out = None
            return None
        sel = hidden if len(due_rows) == hidden.shape[0] else hidden.index_select(0, torch.tensor(due_rows, device=hidden.device))
        pool.step_out = pool.outputs(sel)
        return pool.step_out

    @staticmethod
    def _prompt_logprobs(pool: ModelPool, seq: Sequence, hidden: torch.Tensor, first: int) -> None:
        """Append the logprobs of prompt tokens ``first + 1 ...`` (predicted by the hidden states
        of positions ``first ...``) to the request's ``prompt_logprobs``, skipping any it already
        has (a recomputed sequence), with the request's top-N alternatives."""
        req = seq.request
        plp = req.prompt_logprobs
        assert plp is not None
        k = req.params.prompt_logprobs or 0
        lp = torch.log_softmax(pool.model.compute_logits(hidden), dim=-1)
        targets = torch.tensor(seq.token_ids[first + 1 : first + 1 + hidden.shape[0]], device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        top_v, top_i = (lp.topk(k, dim=-1) if k else (None, None))
        tl = targets.tolist()
        for r in range(hidden.shape[0]):
            if first + 1 + r != len(plp):
                continue  # already recorded before a preemption
            entry = {tl[r]: chosen[r]}
            if top_i is not None:
                for t, v in zip(top_i[r].tolist(), top_v[r].tolist()):
                    entry.setdefault(t, v)
            plp.append(entry)
