"""The step core: schedule, one forward of every model, strategies turn logits into tokens.

:class:`EngineCore` owns the scheduler, the model pools and their executor, the logits-processor
chain, the sampler and the decoding strategies. Its :meth:`~EngineCore.step` is the whole
engine step; everything particular to a way of decoding (forking ``n`` samples, beam search,
jump-forward, speculative verification) lives in a strategy (``framework/strategies``), which
uses the services below to sample, append, fork and finish sequences.
"""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING, Any

import torch

from framework.companions import ModelSet
from framework.executor import Executor
from framework.outputs import StepStats
from framework.processor_chain import ProcessorChain
from framework.sampling import SamplerOutput, SamplingBatch
from framework.scheduler import Scheduler, SchedulerOutput
from framework.sequence import Request, Sequence, SeqStatus
from framework.strategies import DueRows

if TYPE_CHECKING:  # pragma: no cover
    from framework.strategies import DecodingStrategy


class EngineCore:
    """The engine's step and the services decoding strategies build on."""

    def __init__(self, *, models: ModelSet, scheduler: Scheduler, chain: ProcessorChain, sampler: Any,
                 tokenizer: Any, eos_token_ids: frozenset[int], max_model_len: int, seed: int):
        self.models = models
        self.scheduler = scheduler
        self.chain = chain
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.executor = Executor(models.pools)
        self.generator = torch.Generator().manual_seed(seed)
        self.strategies: list[DecodingStrategy] = []
        self._schedule_hooks: list | None = None  # strategies with before_schedule (computed once)
        self.drafter: Any = None  # the engine's drafter (speculative decoding), if configured
        self._seq_ids = itertools.count()
        self.step_count = 0
        self.num_prefill_tokens = 0  # prompt (and recomputed) tokens run through the main model
        self.num_generated_tokens = 0
        self.last_sched: SchedulerOutput | None = None

    # ------------------------------------------------------------------------------ the step
    def step(self, now: float) -> list[Request]:
        """One engine step; returns the requests that made progress."""
        self.chain.wait()  # background work left from a step that sampled nothing
        self._before_schedule()
        sched = self.last_sched = self.scheduler.schedule()
        self._after_schedule(sched, now)
        if sched.empty:
            return []
        self.chain.prefetch()
        fwd = self.executor.forward(sched)
        self.num_prefill_tokens += sched.num_prefill_tokens
        touched: dict[int, Request] = {}
        for strategy, rows in self._rows_by_strategy(fwd):
            for req in strategy.after_forward(rows, time.perf_counter()):
                touched[id(req)] = req
        self.step_count += 1
        return list(touched.values())

    def _before_schedule(self) -> None:
        hooks = self._schedule_hooks
        if hooks is None:
            hooks = self._schedule_hooks = [s for s in self.strategies if getattr(s, "before_schedule", None) is not None]
        if not hooks:
            return
        running = [s for s in self.scheduler.running if s.request.strategy is not None]
        for strategy in hooks:
            mine = [s for s in running if s.request.strategy is strategy]
            if mine:
                strategy.before_schedule(mine)

    def _after_schedule(self, sched: SchedulerOutput, now: float) -> None:
        for seq in sched.preempted:  # recomputed later: re-added to its processors from its tokens
            self.chain.release(seq)
            hook = getattr(seq.request.strategy, "on_preempt", None)
            if hook is not None:
                hook(seq)
        for seq in sched.drafts_dropped:
            hook = getattr(seq.request.strategy, "on_draft_dropped", None)
            if hook is not None:
                hook(seq)
        for seq, _ in sched.scheduled:
            m = seq.request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
                m.num_cached_tokens = seq.num_computed_tokens

    def _rows_by_strategy(self, fwd) -> list[tuple["DecodingStrategy", DueRows]]:
        if not fwd.seqs:
            return []
        assert fwd.logits is not None
        first = fwd.seqs[0].request.strategy
        if all(s.request.strategy is first for s in fwd.seqs):
            return [(first, self._due_rows(fwd.seqs, fwd.logits, fwd.counts))]
        starts = list(itertools.accumulate([0] + fwd.counts[:-1]))
        groups: dict[int, tuple[Any, list[int]]] = {}
        for i, seq in enumerate(fwd.seqs):
            groups.setdefault(id(seq.request.strategy), (seq.request.strategy, []))[1].append(i)
        out = []
        for strategy, idx in groups.values():
            rows = [r for i in idx for r in range(starts[i], starts[i] + fwd.counts[i])]
            logits = fwd.logits.index_select(0, torch.tensor(rows, device=fwd.logits.device))
            out.append((strategy, self._due_rows([fwd.seqs[i] for i in idx], logits, [fwd.counts[i] for i in idx])))
        return out

    @staticmethod
    def _due_rows(seqs: list[Sequence], logits: torch.Tensor, counts: list[int]) -> DueRows:
        if len(seqs) == logits.shape[0]:
            return DueRows.single(seqs, logits)
        return DueRows(seqs, logits, counts, list(itertools.accumulate([0] + counts[:-1])))

    # ------------------------------------------------------------------------------ services
    def clock(self) -> float:
        return time.perf_counter()

    def new_seq_id(self) -> int:
        return next(self._seq_ids)

    def sample(self, seqs: list[Sequence], logits: torch.Tensor, offsets: list[int] | None = None) -> SamplerOutput:
        """Process and sample one token per row (row i belongs to ``seqs[i]``); the processors
        learn the sampled tokens (``on_tokens``) before any sequence can finish."""
        processed, plan = self.chain.apply(seqs, logits, offsets)
        model = plan.model_logits if plan is not None and plan.model_logits is not None else logits
        gens = [s.generator_at(s.num_tokens + (offsets[i] if offsets else 0)) for i, s in enumerate(seqs)]
        batch = SamplingBatch.build(
            [s.request.params for s in seqs], gens, self.generator,
            model_logits=None if processed is logits else model,
        )
        out = self.sampler.sample(batch, processed)
        self.chain.on_tokens(plan, out.tokens)
        return out

    def append_sampled(self, seqs: list[Sequence], out: SamplerOutput, now: float) -> None:
        """Append each row's sampled token (with its logprob and top alternatives)."""
        tokens = out.tokens.tolist()
        lps = out.logprobs.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        for i, seq in enumerate(seqs):
            top = None
            if seq.logprobs is not None and top_ids is not None:
                k = seq.request.params.logprobs or 0
                top = dict(zip(top_ids[i][:k], top_lps[i][:k]))
            self.append(seq, tokens[i], lps[i], top, now)

    def extend(self, seq: Sequence, tokens: list[int], now: float) -> None:
        """Append tokens chosen without sampling (forced, accepted); processors learn them first."""
        self.chain.extend(seq, tokens)
        for tok in tokens:
            if seq.finished:
                break
            self.append(seq, tok, 0.0, None, now)

    def append(self, seq: Sequence, tok: int, lp: float, top: dict[int, float] | None, now: float) -> None:
        """Append one token: logprobs, detokenization, metrics, stop checks; finishes the
        sequence when it stops."""
        req = seq.request
        p = req.params
        seq.token_ids.append(tok)
        self.num_generated_tokens += 1
        seq.cumulative_logprob += lp
        if seq.logprobs is not None:
            entry = {tok: lp}
            if top:
                entry.update(top)
            seq.logprobs.append(entry)
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        old_len = seq.text_len
        if seq.detok is not None:
            seq.append_text(seq.detok.add(tok))
        n_out = seq.num_output_tokens
        reason: str | None = None
        if tok in self.eos_token_ids and not p.ignore_eos:
            reason = "stop"
        elif tok in p.stop_token_ids:
            reason, seq.stop_reason = "stop", tok
        elif n_out >= p.max_tokens or (seq.num_tokens >= self.max_model_len and not self.models.main.policy.unbounded):
            reason = "length"
        if reason is not None and seq.detok is not None:
            seq.append_text(seq.detok.flush())
        # none before min_tokens (vLLM); after the first check only the new text can hold a match
        if p.stop and n_out >= p.min_tokens and self._check_stop_strings(seq, old_len if n_out > p.min_tokens else 0):
            reason = "stop"
        if reason is not None:
            seq.finish_reason = reason
            self.finish(seq)

    def _check_stop_strings(self, seq: Sequence, checked: int) -> bool:
        """Look for a stop string in the text past ``checked`` characters (already searched),
        with an overlap of the longest stop string: O(new text), not O(text)."""
        p = seq.request.params
        lo = max(0, checked - max(len(s) for s in p.stop) + 1)
        tail = seq.text_from(lo)
        hit: tuple[int, str] | None = None
        for s in p.stop:
            idx = tail.find(s)
            if idx >= 0 and (hit is None or idx < hit[0]):
                hit = (idx, s)
        if hit is None:
            return False
        idx, s = hit
        idx += lo
        text = seq.text
        seq.text = text[: idx + len(s)] if p.include_stop_str_in_output else text[:idx]
        seq.stop_reason = s
        return True

    def new_sequence(self, req: Request, index: int) -> Sequence:
        """A fresh sequence of ``req`` at its prompt (its own seed stream and detokenizer)."""
        from framework.sequence import SeqKV

        p = req.params
        seed = None if p.seed is None else (p.seed + index) % 2**64
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        detok = None
        if self.tokenizer is not None:
            from framework.tokenizer import IncrementalDetokenizer

            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, p.skip_special_tokens)
        seq = Sequence(
            seq_id=self.new_seq_id(), request=req, index=index,
            token_ids=list(req.prompt_token_ids), num_prompt_tokens=len(req.prompt_token_ids),
            generator=gen, detok=detok, logprobs=[] if p.logprobs is not None else None,
            kv=[SeqKV() for _ in req.pools], seed=seed,
        )
        req.seqs.append(seq)
        return seq

    def fork(self, parent: Sequence, index: int) -> Sequence:
        """A running copy of ``parent`` as completion ``index`` of its request: KV blocks shared
        in every pool (copy-on-write), processor state copied, same tokens and text."""
        req = parent.request
        child = self.new_sequence(req, index)
        if parent.detok is None:
            child.detok = None
        elif parent.num_output_tokens:
            for tok in parent.output_token_ids:  # replay the output so far through its detokenizer
                child.detok.add(tok)
        child.token_ids = list(parent.token_ids)
        child.text = parent.text
        child.cumulative_logprob = parent.cumulative_logprob
        child.model = parent.model
        if parent.logprobs is not None:
            child.logprobs = list(parent.logprobs)
        for pool, src, dst in zip(req.pools, parent.kv, child.kv):
            dst.table = pool.bm.fork(src.table)
            dst.num_computed, dst.num_hashed, dst.num_evicted = src.num_computed, src.num_hashed, src.num_evicted
            row = pool.step_rows.get(parent.seq_id)
            if row is not None:  # the fork reads the parent's outputs of this step
                pool.step_rows[child.seq_id] = row
        self.chain.fork(parent, child)
        self.scheduler.add_running(child)
        return child

    def truncate_kv(self, seq: Sequence, num_tokens: int) -> None:
        """Forget ``seq``'s KV past its first ``num_tokens`` tokens in every lockstep pool (draft
        tokens rejected); blocks past them go back to the pools. Drops any draft."""
        seq.draft.clear()
        for pool, kv in zip(seq.request.pools, seq.kv):
            if pool.lockstep and kv.num_computed > num_tokens:
                kv.num_hashed = pool.bm.truncate(kv.table, num_tokens - kv.num_evicted, kv.num_hashed)
                kv.num_computed = num_tokens

    def finish(self, seq: Sequence) -> None:
        """Free a sequence's blocks and processor state; it no longer runs."""
        self.scheduler.remove(seq)
        self.chain.release(seq)
        seq.draft.clear()
        seq.status = SeqStatus.FINISHED

    def finish_now(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` here with ``reason`` (flushing held-back text)."""
        seq.finish_reason = reason
        if seq.detok is not None:
            seq.append_text(seq.detok.flush())
        self.finish(seq)

    # ------------------------------------------------------------------------------ stats
    def step_stats(self, dt: float, finished_ids: list[str]) -> StepStats:
        sched = self.last_sched or SchedulerOutput()
        bm = self.models.main.bm
        return StepStats(
            step=self.step_count,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_prefill_tokens=sched.num_prefill_tokens,
            num_decode_tokens=sched.num_decode_tokens,
            num_preempted=len(sched.preempted),
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_free=bm.num_free_blocks,
            prefix_cache_hit_rate=bm.stats.hit_rate,
            step_time=dt,
            finished_request_ids=finished_ids,
        )
