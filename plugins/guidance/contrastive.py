"""``contrastive``: contrastive decoding (Li et al. 2023; O'Brien & Lewis 2023).

    processors:
      - contrastive: {amateur: demo-draft, alpha: 0.1, beta: 0.5, amateur_temperature: 1.0}

For each row with (processed) logits ``z`` of the expert and logits ``a`` of the amateur, a
smaller language model run as a lockstep companion on the same tokens:

* ``s_exp = log_softmax(z)``, ``s_ama = log_softmax(a / amateur_temperature)``;
* plausibility head ``H = {v : p_exp(v) >= alpha * max_w p_exp(w)}``;
* ``scoring: obrien`` (default, O'Brien & Lewis): ``z'(v) = (1 + beta) * s_exp(v) - beta * s_ama(v)``
  on ``H``; ``scoring: li`` (Li et al.): ``z'(v) = s_exp(v) - s_ama(v)`` on ``H`` (``beta`` unused);
* ``z'(v) = -inf`` outside ``H``.

Greedy decoding of ``z'`` is the papers' contrastive search over the head; sampling draws from
``softmax(z')`` (after temperature and truncation, which run later in the chain). ``cache: false``
re-runs the amateur over the whole prefix every step instead (the reference, for checks and
benchmarks).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from framework.processors import ProcessorSetup, Stage, StepContext
from plugins.guidance.common import NEG_INF, GuidanceBase, UncachedLM, companion_for, group_rows, rows_tensor


class ContrastiveParams(BaseModel):
    """Options of ``contrastive``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    amateur: str = Field("demo-draft", description="the amateur language model: a registered name, a spec `models:` alias or a directory")
    alpha: float = Field(0.1, ge=0.0, le=1.0, description="plausibility: keep tokens with p_exp >= alpha * max p_exp")
    beta: float = Field(0.5, ge=0.0, allow_inf_nan=False, description="weight of the amateur (obrien scoring)")
    amateur_temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="temperature of the amateur's distribution")
    scoring: Literal["obrien", "li"] = Field("obrien", description="obrien: (1+beta) s_exp - beta s_ama; li: log p_exp - log p_ama")
    cache: bool = Field(True, description="false: re-run the amateur on the whole prefix every step (no companion KV; the reference)")


class Contrastive(GuidanceBase):
    """Contrastive decoding (Li et al. 2023; O'Brien & Lewis 2023): ``(1+beta) s_exp - beta s_ama`` on the plausibility head of an expert/amateur pair. See docs/guidance.md."""

    stage = Stage.GUIDANCE
    Params = ContrastiveParams

    def __init__(self, setup: ProcessorSetup) -> None:
        super().__init__(setup)
        self.uncached = UncachedLM(setup)

    def _companion(self, params: ContrastiveParams) -> Any:
        return companion_for(self.setup, "amateur", params.amateur, kind="lm")

    def prepare(self, params: ContrastiveParams, sampling: Any) -> ContrastiveParams:
        if self.setup.models is None and self.setup.catalog is None:  # no engine, no model descriptions: the options only
            return params
        self._companion(params)
        return params

    def companions(self, params: ContrastiveParams) -> list[Any]:
        return [self._companion(params)] if params.cache else []

    def _plan(self, ctx: StepContext, device: torch.device) -> list[tuple[str, bool, list[int], torch.Tensor | None, dict[str, torch.Tensor]]]:
        params = self.row_params(ctx)
        plan = []
        for (ref, cache), rows in group_rows((p.amateur, p.cache) for p in params).items():
            ps = [params[r] for r in rows]
            t = {
                "log_alpha": torch.tensor([math.log(p.alpha) if p.alpha > 0 else NEG_INF for p in ps], device=device),
                "w_exp": torch.tensor([1.0 if p.scoring == "li" else 1.0 + p.beta for p in ps], device=device),
                "w_ama": torch.tensor([1.0 if p.scoring == "li" else p.beta for p in ps], device=device),
                "inv_t": torch.tensor([1.0 / p.amateur_temperature for p in ps], device=device),
            }
            plan.append((ref, cache, rows, rows_tensor(rows, len(ctx), device), t))
        return plan

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        plan = self.cached(ctx, "plan", lambda: self._plan(ctx, logits.device))
        for ref, cache, rows, rows_t, t in plan:
            z = (logits if rows_t is None else logits.index_select(0, rows_t)).float()
            if cache:
                amateur = self.setup.models.get(ref).logits(ctx, None if rows_t is None else rows).float()  # type: ignore[union-attr]
            else:
                amateur = self.uncached.logits(ref, ctx, rows)
            s_exp = torch.log_softmax(z, dim=-1)
            s_ama = torch.log_softmax(amateur * t["inv_t"][:, None], dim=-1)
            head = s_exp >= s_exp.amax(dim=-1, keepdim=True) + t["log_alpha"][:, None]
            score = t["w_exp"][:, None] * s_exp - t["w_ama"][:, None] * s_ama
            rows_out = torch.where(head, score, torch.full_like(score, NEG_INF)).to(logits.dtype)
            if rows_t is None:
                logits = rows_out
            else:
                logits.index_copy_(0, rows_t, rows_out)
        return logits
