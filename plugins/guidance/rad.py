"""``rad``: reward-augmented decoding (Deng & Raffel 2023).

    processors:
      - rad: {reward_model: demo-reward, beta: 10, top_k: 20, inverse: false}

At every step, for each row with (processed) logits ``z``:

* ``C = top_k(z, k)``: the ``k`` highest-logit next tokens;
* ``r(v) = clamp(RM(x_<t, v), 0, 1)`` for ``v`` in ``C`` — the prefix reward model's reward of
  the prefix extended by the candidate (``1 - r`` with ``inverse: true``, to steer away);
* ``z'(v) = z(v) + beta * r(v)`` on ``C``, ``-inf`` elsewhere.

The reward model is a lockstep companion with its own paged KV cache: its cache is advanced by
the chosen token only (the engine computes it with the main model's token each step), and the
``k`` candidates are one batched candidate forward over that cache, O(k) tokens per step.
``cache: false`` re-runs the reward model over the whole prefix + each candidate instead (the
reference implementation, for checks and benchmarks).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from framework.processors import ProcessorSetup, Stage, StepContext
from plugins.guidance.common import NEG_INF, GuidanceBase, UncachedScorer, companion_for, group_rows, rows_tensor


class RadParams(BaseModel):
    """Options of ``rad``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reward_model: str = Field("demo-reward", description="prefix reward model: a registered name, a spec `models:` alias or a directory")
    beta: float = Field(10.0, allow_inf_nan=False, description="steering strength: z' = z + beta * r")
    top_k: int = Field(20, ge=1, description="candidates scored per step (top-k by logit); the others are masked")
    inverse: bool = Field(False, description="reward 1 - r: steer away from the attribute")
    cache: bool = Field(True, description="false: re-run the reward model on the whole prefix + each candidate every step (the reference implementation)")


class Rad(GuidanceBase):
    """Reward-augmented decoding (Deng & Raffel 2023): the top-k by logit, plus ``beta * clamp(RM(prefix + v), 0, 1)``; others masked. See docs/guidance.md."""

    stage = Stage.GUIDANCE
    Params = RadParams

    def __init__(self, setup: ProcessorSetup) -> None:
        super().__init__(setup)
        self.uncached = UncachedScorer(setup)

    def _companion(self, params: RadParams) -> Any:
        return companion_for(self.setup, "reward_model", params.reward_model, kind="scorer", scorer_kind="reward")

    def prepare(self, params: RadParams, sampling: Any) -> RadParams:
        if self.setup.models is None and self.setup.catalog is None:  # no engine, no model descriptions: the options only
            return params
        self._companion(params)
        return params

    def companions(self, params: RadParams) -> list[Any]:
        return [self._companion(params)] if params.cache else []

    def _plan(self, ctx: StepContext, device: torch.device) -> list[tuple[Any, list[int], torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        """Per (reward model, cache, k): rows, rows tensor, beta [m], inverse [m]."""
        params = self.row_params(ctx)
        plan = []
        for (ref, cached, k), rows in group_rows((p.reward_model, p.cache, p.top_k) for p in params).items():
            beta = torch.tensor([params[r].beta for r in rows], dtype=torch.float32, device=device)
            inverse = torch.tensor([params[r].inverse for r in rows], dtype=torch.bool, device=device)
            plan.append(((ref, cached, k), rows, rows_tensor(rows, len(ctx), device), beta, inverse))
        return plan

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        plan = self.cached(ctx, "plan", lambda: self._plan(ctx, logits.device))
        out = torch.full_like(logits, NEG_INF)
        V = logits.shape[-1]
        for (ref, cached, k), rows, rows_t, beta, inverse in plan:
            z = logits if rows_t is None else logits.index_select(0, rows_t)
            top_v, top_i = z.topk(min(k, V), dim=-1)
            if cached:
                raw = self.setup.models.get(ref).candidates(ctx, top_i, rows)  # type: ignore[union-attr]
            else:
                raw = self.uncached.candidates(ref, ctx, top_i, rows)
            r = torch.sigmoid(raw[..., 0].float()).clamp(0.0, 1.0)  # [m, k]
            r = torch.where(inverse[:, None], 1.0 - r, r)
            guided = top_v.float() + beta[:, None] * r
            rows_out = torch.full_like(z, NEG_INF).scatter_(1, top_i, guided.to(z.dtype))
            if rows_t is None:
                out = rows_out
            else:
                out.index_copy_(0, rows_t, rows_out)
        return out
