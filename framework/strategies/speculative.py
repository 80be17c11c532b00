"""Speculative decoding: the engine's drafter proposes, one target forward verifies, exactly.

The strategy takes every sampling request (not beam search) of an engine that has a drafter
(``LLM(..., drafter={...})`` or a spec's ``drafter:`` section). Before each step it asks the
drafter for up to ``g`` tokens per decoding sequence and puts them in ``seq.draft``; the
scheduler computes them with the sequence, so the target model's logits at every draft position
come back from the same forward as every other row of the batch (rows without a draft are
ordinary decodes). Verification then walks the draft positions in order, batched across
sequences — position ``i`` of every sequence still accepting is processed together:

1. the processor chain runs on the target's logits at position ``i`` (``offsets = i``), with the
   processors' state advanced by exactly the tokens accepted before it — so ``p`` is the
   *processed* distribution ordinary decoding would sample from there (penalties, guidance,
   grammar mask, temperature, truncation). Processors never see a rejected token, so nothing of
   theirs needs rolling back;
2. greedy rows (``temperature == 0``) accept the draft token when it is the argmax of ``p``;
   unseeded sampled rows accept ``x`` with probability ``min(1, p(x) / q(x))`` (Leviathan et
   al. 2023; Chen et al. 2023; ``q`` one-hot for a point-mass drafter such as prompt lookup);
   seeded rows draw their token from ``p`` with the generator keyed by (seed, position), exactly
   as ordinary decoding does, and accept the draft token iff it is that token (coupling: the
   output is ordinary seeded decoding's, whatever was drafted, dropped or grouped in a step);
3. a rejected unseeded position draws its token from ``norm(max(0, p - q))`` (through the
   engine's sampler); when the whole draft is accepted a bonus token is drawn from ``p`` at the
   position after it.

Every token is appended through :meth:`~framework.engine_core.EngineCore.append` (logprobs
under the unprocessed model, stop strings, ``max_tokens``), so several tokens landing in one
step behave as if they came one per step. The target's KV past the accepted tokens is truncated
(``core.truncate_kv``) and the drafter told how many it got (``drafter.accepted``: a draft model
cuts its own KV back).

With no draft anywhere in a step's rows the strategy is plain sampling (the parent class);
without a drafter it takes no request and adds nothing to the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch

from framework.sampling import SamplingBatch
from framework.strategies import DueRows
from framework.strategies.sample import SampleStrategy

if TYPE_CHECKING:  # pragma: no cover
    from framework.engine_core import EngineCore
    from framework.sampling_params import SamplingParams
    from framework.sequence import Request, Sequence


@dataclass(slots=True)
class _Pending:
    """A sequence's draft in flight: its tokens and the distributions they came from."""

    tokens: list[int]
    probs: torch.Tensor | None  # [g, V] or None (point mass)


@dataclass(slots=True)
class _Row:
    seq: "Sequence"
    start: int  # its first logits row
    draft: list[int]
    probs: torch.Tensor | None
    accepted: int = 0
    done: bool = False


class SpecStats:
    """Counters of speculative decoding since the engine started."""

    def __init__(self) -> None:
        self.num_drafts = 0  # sequence-steps that verified a non-empty draft
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        self.num_emitted_tokens = 0  # tokens appended by verification steps (accepted + 1 each)
        self.num_verify_steps = 0  # target forwards that verified at least one draft
        self.num_drafts_dropped = 0  # drafts dropped because the step's token budget could not hold them

    def as_dict(self) -> dict[str, float | int]:
        d = self.num_draft_tokens
        return {
            "spec_num_drafts": self.num_drafts,
            "spec_num_draft_tokens": d,
            "spec_num_accepted_tokens": self.num_accepted_tokens,
            "spec_num_emitted_tokens": self.num_emitted_tokens,
            "spec_num_verify_steps": self.num_verify_steps,
            "spec_num_drafts_dropped": self.num_drafts_dropped,
            "spec_acceptance_rate": self.num_accepted_tokens / d if d else 0.0,
            "spec_mean_accepted_length": self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0,
        }


class SpeculativeStrategy(SampleStrategy):
    """Draft, verify in one target forward, accept exactly (see the module docstring)."""

    name = "speculative"
    streams = True

    def __init__(self, core: "EngineCore"):
        super().__init__(core)
        self.spec = SpecStats()
        self._pending: dict[int, _Pending] = {}  # seq_id -> draft being verified
        self._k: dict[int, int] = {}  # seq_id -> adaptive draft length

    # -- what it takes -------------------------------------------------------------------
    @property
    def drafter(self) -> Any:
        return self.core.drafter

    def claims(self, params: "SamplingParams") -> bool:
        return self.core.drafter is not None and not params.use_beam_search

    @property
    def before_schedule(self):  # type: ignore[override]
        """The pre-schedule hook, only when a drafter is configured (no per-step work otherwise)."""
        return self._propose if self.core.drafter is not None else None

    def stats(self) -> dict[str, float | int]:
        return self.spec.as_dict() if self.core.drafter is not None else {}

    # -- drafting --------------------------------------------------------------------------
    def _budget(self, seq: "Sequence") -> int:
        """Draft tokens worth proposing for ``seq`` now."""
        drafter = self.core.drafter
        base = int(getattr(drafter, "num_tokens", 4))
        k = self._k.get(seq.seq_id, base) if getattr(drafter, "adaptive", False) else base
        p = seq.request.params
        left = p.max_tokens - seq.num_output_tokens - 1  # the verified step adds one token more
        room = self.core.max_model_len - seq.num_tokens - 1
        return max(0, min(k, left, room))

    def _propose(self, seqs: list["Sequence"]) -> None:
        todo: list["Sequence"] = []
        ks: list[int] = []
        for seq in seqs:
            if seq.draft or not seq.request.forked or seq.num_computed_tokens < seq.num_prompt_tokens:
                continue  # prefilling, about to fork, or already holding a draft
            k = self._budget(seq)
            if k > 0:
                todo.append(seq)
                ks.append(k)
        if not todo:
            return
        proposals = self.core.drafter.propose(todo, ks)
        for seq, k, prop in zip(todo, ks, proposals):
            toks = list(prop.tokens[:k])
            if not toks:
                continue
            probs = prop.probs
            if probs is not None:
                probs = probs[: len(toks)]
            seq.draft = toks
            self._pending[seq.seq_id] = _Pending(toks, probs)

    def _forget(self, seq: "Sequence") -> None:
        self._pending.pop(seq.seq_id, None)
        release = getattr(self.core.drafter, "release", None)
        if release is not None:
            release(seq)

    def on_preempt(self, seq: "Sequence") -> None:
        self._forget(seq)

    def on_draft_dropped(self, seq: "Sequence") -> None:
        """The draft did not fit the step's budget: the drafter's work past the sequence is void."""
        if self._pending.pop(seq.seq_id, None) is not None:
            self.spec.num_drafts_dropped += 1
            self.core.drafter.accepted(seq, 0)

    # -- verification ------------------------------------------------------------------------
    def after_forward(self, rows: DueRows, now: float) -> Iterable["Request"]:
        if rows.one_row_each and not any(s.seq_id in self._pending for s in rows.seqs):
            touched = super().after_forward(rows, now)
            for seq in rows.seqs:
                if seq.finished:
                    self._finished(seq)
            return touched
        core = self.core
        work: list[_Row] = []
        for seq, start, count in zip(rows.seqs, rows.starts, rows.counts):
            pend = self._pending.pop(seq.seq_id, None)
            if count > 1 and pend is not None:
                seq.draft = []
                work.append(_Row(seq, start, pend.tokens, pend.probs))
                continue
            work.append(_Row(seq, start, [], None))
            req = seq.request
            if not req.forked:  # n > 1: fork now (no draft before the first token)
                req.forked = True
                core.chain.admit(seq)
                for idx in range(1, req.params.num_samples):
                    work.append(_Row(core.fork(seq, idx), start, [], None))
        base = {r.seq.seq_id: r.seq.num_tokens for r in work}
        offset = 0
        active = work
        while active:
            self._verify_position(active, rows.logits, offset, now)
            offset += 1
            active = [r for r in active if not r.done]
        drafter = core.drafter
        stats = self.spec
        verified = False
        for r in work:
            seq = r.seq
            if r.draft:
                verified = True
                stats.num_drafts += 1
                stats.num_draft_tokens += len(r.draft)
                stats.num_accepted_tokens += r.accepted
                self._adapt(seq, r)
            if seq.finished:
                self._finished(seq)
                continue
            if r.draft:
                core.truncate_kv(seq, base[seq.seq_id] + r.accepted)  # the accepted drafts' KV stays
                drafter.accepted(seq, r.accepted)
            if self.jump_forward and seq.request.processors and any(u.name in core.chain.forcing for u in seq.request.processors):
                self.jump(seq, now)
        if verified:
            stats.num_verify_steps += 1
        return {id(r.seq.request): r.seq.request for r in work}.values()

    def _adapt(self, seq: "Sequence", r: _Row) -> None:
        drafter = self.core.drafter
        if not getattr(drafter, "adaptive", False):
            return
        k = self._k.get(seq.seq_id, int(getattr(drafter, "num_tokens", 4)))
        hi = int(getattr(drafter, "max_num_tokens", 2 * k) or 2 * k)
        self._k[seq.seq_id] = min(hi, k + 1) if r.accepted == len(r.draft) else max(1, k - 1)

    def _finished(self, seq: "Sequence") -> None:
        self._k.pop(seq.seq_id, None)
        self._forget(seq)

    def _verify_position(self, active: list[_Row], logits: torch.Tensor, i: int, now: float) -> None:
        """Decide every active row's token at draft position ``i`` (batched)."""
        core = self.core
        seqs = [r.seq for r in active]
        dev = logits.device
        idx = torch.tensor([r.start + i for r in active], dtype=torch.long, device=dev)
        model = logits.index_select(0, idx)
        processed, plan = core.chain.apply(seqs, model, None if i == 0 else [i] * len(active))
        params = [s.request.params for s in seqs]
        n = len(active)
        greedy = [p.temperature == 0.0 for p in params]
        chosen: list[int] = [0] * n
        accept = [False] * n
        if any(greedy):
            best = processed.argmax(dim=-1).tolist()
            for j, r in enumerate(active):
                if greedy[j]:
                    chosen[j] = best[j]
                    accept[j] = i < len(r.draft) and r.draft[i] == best[j]
        if not all(greedy):
            self._sample_position(active, processed, params, greedy, i, chosen, accept)
        tok_t = torch.tensor(chosen, dtype=torch.long, device=dev)
        core.chain.on_tokens(plan, tok_t)
        if plan is not None and plan.model_logits is not None:  # rows a source processor drew from another model
            model = plan.model_logits
        logp = model.log_softmax(dim=-1)  # logprobs under the unprocessed model, like the sampler's
        lps = logp.gather(1, tok_t[:, None])[:, 0].tolist()
        kmax = max((p.logprobs or 0) for p in params)
        top_ids = top_lps = None
        if kmax:
            tv, ti = logp.topk(kmax, dim=-1)
            top_ids, top_lps = ti.tolist(), tv.tolist()
        emitted = 0
        for j, r in enumerate(active):
            seq = r.seq
            top = None
            if seq.logprobs is not None and top_ids is not None:
                top = dict(zip(top_ids[j][: params[j].logprobs or 0], top_lps[j][: params[j].logprobs or 0]))
            core.append(seq, chosen[j], lps[j], top, now)
            if r.draft:
                emitted += 1
            if accept[j]:
                r.accepted += 1
            if not accept[j] or seq.finished:
                r.done = True
        self.spec.num_emitted_tokens += emitted

    def _sample_position(self, active: list[_Row], processed: torch.Tensor, params: list, greedy: list[bool],
                         i: int, chosen: list[int], accept: list[bool]) -> None:
        """Sampled rows at position ``i``.

        Unseeded rows accept the draft token with probability ``min(1, p/q)`` and otherwise draw
        from the residual ``norm(max(0, p - q))`` (or from ``p`` past the draft). Seeded rows
        draw their token from ``p`` exactly as ordinary decoding would, with the generator keyed
        by (seed, position) (:meth:`~framework.sequence.Sequence.generator_at`), and accept the
        draft token iff it is that token — so their output does not depend on drafting at all."""
        core = self.core
        dev = processed.device
        drafted = [j for j, r in enumerate(active)
                   if not greedy[j] and i < len(r.draft) and r.seq.generator is None]
        # from p: bonus / no draft, and every seeded row
        need = [j for j, r in enumerate(active)
                if not greedy[j] and (i >= len(r.draft) or r.seq.generator is not None)]
        resid_logits: torch.Tensor | None = None
        rejected: list[int] = []
        if drafted:
            J = torch.tensor(drafted, dtype=torch.long, device=dev)
            P = processed.index_select(0, J).softmax(dim=-1)  # [m, V]
            x = torch.tensor([active[j].draft[i] for j in drafted], dtype=torch.long, device=dev)
            Q = torch.zeros_like(P)
            for k, j in enumerate(drafted):
                q = active[j].probs
                if q is None:
                    Q[k, x[k]] = 1.0  # a point-mass drafter
                else:
                    Q[k] = q[i].to(dev, torch.float32)
            px = P.gather(1, x[:, None])[:, 0]
            qx = Q.gather(1, x[:, None])[:, 0]
            u = torch.rand(len(drafted), generator=core.generator)
            ok = ((qx > 0) & (u.to(dev) * qx < px)).tolist()
            xs = x.tolist()
            rej_k = []
            for k, j in enumerate(drafted):
                if ok[k]:
                    chosen[j], accept[j] = xs[k], True
                else:
                    rej_k.append(k)
                    rejected.append(j)
            if rej_k:
                R = torch.tensor(rej_k, dtype=torch.long, device=dev)
                resid = (P.index_select(0, R) - Q.index_select(0, R)).clamp_min_(0.0)
                empty = resid.sum(dim=-1) <= 0  # p == q: cannot be rejected, but guard rounding
                if bool(empty.any()):
                    resid = torch.where(empty[:, None], P.index_select(0, R), resid)
                resid_logits = resid.log()
        rows = need + rejected
        if not rows:
            return
        parts = []
        if need:
            parts.append(processed.index_select(0, torch.tensor(need, dtype=torch.long, device=dev)))
        if resid_logits is not None:
            parts.append(resid_logits)
        sub = parts[0] if len(parts) == 1 else torch.cat(parts)
        gens = [active[j].seq.generator_at(active[j].seq.num_tokens) for j in rows]  # None for unseeded
        batch = SamplingBatch.build([params[j] for j in rows], gens, core.generator)
        drawn = core.sampler.sample(batch, sub).tokens.tolist()
        for k, j in enumerate(rows):
            chosen[j] = drawn[k]
            r = active[j]
            if r.seq.generator is not None and i < len(r.draft):
                accept[j] = drawn[k] == r.draft[i]
