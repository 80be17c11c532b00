"""``fudge``: Future Discriminators for Generation (Yang & Klein 2021).

    processors:
      - fudge: {classifier: demo-sentiment, target: positive, strength: 1.0, top_k: 200}

At every step, for each row with (processed) logits ``z``:

* ``C = top_k(z, K)``: the generator's ``K`` most likely next tokens;
* for each candidate ``v`` in ``C`` the prefix classifier scores ``prefix + v``:
  ``s(v) = log P(target | x_<t, v)`` (``logsigmoid(d)`` for a binary classifier with logit
  difference ``d``; ``log(1 - sigma(d))`` for the other class);
* ``z'(v) = z(v) + sum_a strength_a * s_a(v)`` for ``v`` in ``C`` (several attributes add up),
  ``z'(v) = -inf`` elsewhere.

So ``softmax(z') ∝ p_LM(v | x_<t) * prod_a P(a | x_<t, v)^strength_a`` over the top ``K`` —
the FUDGE posterior. The classifier is a causal prefix scorer running as a lockstep companion
with its own paged KV cache: the prefix is computed once (one token per step, with the main
model), and the ``K`` candidates are scored in *one* batched candidate forward per step over the
cached prefix (``Companion.candidates``), not ``K`` re-runs of the whole prefix as in the
paper's reference code. ``cache: false`` runs that reference (for checks and benchmarks).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from framework.processors import ProcessorSetup, Stage, StepContext
from plugins.guidance.common import NEG_INF, GuidanceBase, UncachedScorer, companion_for, group_rows, rows_tensor


class FudgeAttribute(BaseModel):
    """One more attribute: a classifier, the label wanted, and its weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classifier: str = Field(description="prefix classifier: a registered name, a spec `models:` alias or a directory")
    target: str | int = Field("positive", description="the label to steer towards (name or index)")
    strength: float = Field(1.0, allow_inf_nan=False, description="weight lambda of log P(target | prefix + v)")


class FudgeParams(BaseModel):
    """Options of ``fudge``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    classifier: str = Field("demo-sentiment", description="prefix classifier: a registered name, a spec `models:` alias or a directory")
    target: str | int = Field("positive", description="the label to steer towards (name or index)")
    strength: float = Field(1.0, allow_inf_nan=False, description="weight lambda of log P(target | prefix + v); 0: the generator's top-k")
    top_k: int = Field(200, ge=1, description="candidates scored per step (the generator's top-k); the others are masked")
    attributes: tuple[FudgeAttribute, ...] = Field((), description="more attributes; their weighted log-probabilities add up")
    cache: bool = Field(True, description="false: re-run the classifier on the whole prefix + each candidate every step (the reference implementation)")


class Fudge(GuidanceBase):
    """FUDGE (Yang & Klein 2021): the generator's top-K, plus ``strength * log P(target | prefix + v)`` from a prefix classifier; others masked. See docs/guidance.md."""

    stage = Stage.GUIDANCE
    Params = FudgeParams

    def __init__(self, setup: ProcessorSetup) -> None:
        super().__init__(setup)
        self.uncached = UncachedScorer(setup)
        # slot -> ((classifier ref, label index, strength), ...)
        self.terms: dict[int, tuple[tuple[str, int, float], ...]] = {}

    @staticmethod
    def _attributes(params: FudgeParams) -> list[tuple[str, str, str | int, float]]:
        out = [("classifier", params.classifier, params.target, params.strength)]
        out += [(f"attributes[{i}].classifier", a.classifier, a.target, a.strength) for i, a in enumerate(params.attributes)]
        return out

    def _resolve(self, params: FudgeParams) -> tuple[tuple[str, int, float], ...]:
        terms = []
        for field, ref, target, strength in self._attributes(params):
            comp = companion_for(self.setup, field, ref, kind="scorer", scorer_kind="classifier")
            try:
                idx = comp.label_index(target)
            except ValueError as exc:
                raise ValueError(f"{field.replace('classifier', 'target')}: {exc}") from None
            terms.append((ref, idx, float(strength)))
        return tuple(terms)

    def prepare(self, params: FudgeParams, sampling: Any) -> FudgeParams:
        if self.setup.models is None and self.setup.catalog is None:  # no engine, no model descriptions: the options only
            return params
        self._resolve(params)  # unknown model, a reward model, a wrong label: rejected now
        return params

    def companions(self, params: FudgeParams) -> list[Any]:
        if not params.cache:
            return []
        return [companion_for(self.setup, "classifier", ref, kind="scorer") for ref, _, _ in self._resolve(params)]

    def add_request(self, slot: int, params: FudgeParams, request: Any) -> None:
        super().add_request(slot, params, request)
        self.terms[slot] = self._resolve(params)

    def remove(self, slot: int) -> None:
        super().remove(slot)
        self.terms.pop(slot, None)

    def fork(self, src_slot: int, dst_slot: int) -> None:
        super().fork(src_slot, dst_slot)
        self.terms[dst_slot] = self.terms[src_slot]

    def _plan(self, ctx: StepContext, device: torch.device) -> list[tuple[int, list[int], torch.Tensor | None, list[tuple[Any, list[int], list[tuple[int, torch.Tensor]]]]]]:
        """Per candidate count K: (K, rows, rows tensor, per scorer: (scorer key, positions in
        the K group, [(label index, strength [m] with 0 where a row does not use it)]))."""
        plan = []
        params = self.row_params(ctx)
        for K, rows in group_rows(p.top_k for p in params).items():
            scorers: dict[tuple[str, bool], dict[int, dict[int, float]]] = {}
            for pos, r in enumerate(rows):
                slot = ctx.slots[r]
                for ref, idx, strength in self.terms[slot]:
                    by_row = scorers.setdefault((ref, params[r].cache), {})
                    by_row.setdefault(pos, {}).setdefault(idx, 0.0)
                    by_row[pos][idx] += strength
            entries = []
            for key, by_row in scorers.items():
                positions = sorted(by_row)
                labels = sorted({i for d in by_row.values() for i in d})
                weights = [(i, torch.tensor([by_row[p].get(i, 0.0) for p in positions], dtype=torch.float32, device=device))
                           for i in labels]
                entries.append((key, positions, weights))
            plan.append((K, rows, rows_tensor(rows, len(ctx), device), entries))
        return plan

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        plan = self.cached(ctx, "plan", lambda: self._plan(ctx, logits.device))
        out = torch.full_like(logits, NEG_INF)
        V = logits.shape[-1]
        for K, rows, rows_t, entries in plan:
            z = logits if rows_t is None else logits.index_select(0, rows_t)
            top_v, top_i = z.topk(min(K, V), dim=-1)
            guided = top_v.float()
            for (ref, cached), positions, weights in entries:
                ctx_rows = [rows[p] for p in positions]
                pos_t = torch.tensor(positions, dtype=torch.long, device=logits.device)
                cand = top_i.index_select(0, pos_t)
                if cached:
                    raw = self.setup.models.get(ref).candidates(ctx, cand, ctx_rows)  # type: ignore[union-attr]
                else:
                    raw = self.uncached.candidates(ref, ctx, cand, ctx_rows)
                logp = torch.log_softmax(raw.float(), dim=-1)  # [m, K, C]
                bonus = None
                for label, w in weights:
                    use = w != 0  # (w * -inf would be nan where a row does not use the label)
                    term = torch.where(use[:, None], w[:, None] * logp[..., label], torch.zeros((), device=logits.device))
                    bonus = term if bonus is None else bonus + term
                if bonus is None:
                    continue
                if len(positions) == len(rows):  # every row of the K group, in order
                    guided = guided + bonus
                else:
                    guided = guided.index_add(0, pos_t, bonus)
            rows_out = torch.full_like(z, NEG_INF).scatter_(1, top_i, guided.to(z.dtype))
            if rows_t is None:
                out = rows_out
            else:
                out.index_copy_(0, rows_t, rows_out)
        return out
