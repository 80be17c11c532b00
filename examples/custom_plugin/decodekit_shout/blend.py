"""The `blend` logits processor: add a companion model's log-probabilities (a product of experts).

    processors:
      - blend: {model: demo-draft, weight: 0.5}

``logits' = logits + weight * log_softmax(companion_logits)``. The companion is a second language
model with the main model's vocabulary; decodekit runs it in lockstep with the main model, with
its own paged KV cache, and hands its next-token logits for this processor's rows to ``apply``.
Written only against the ``framework`` protocols, as any third-party plugin would be.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class BlendParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="companion language model: a registered name, a spec `models:` alias or a directory")
    weight: float = Field(0.5, ge=-10.0, le=10.0, description="scale of the companion's log-probabilities")


class Blend:
    """Adds ``weight * log p_companion`` to each row's logits."""

    def __init__(self, setup) -> None:
        self.setup = setup
        self.params: dict[int, BlendParams] = {}

    def _companion(self, params: BlendParams):
        if self.setup.models is None:
            raise ValueError("blend needs an engine with companion models")
        companion = self.setup.models.get(params.model)  # loads it on first use; ValueError if unknown
        if companion.kind != "lm":
            raise ValueError(f"model {params.model!r} is a scorer, not a language model")
        return companion

    def prepare(self, params: BlendParams, sampling) -> BlendParams:
        self._companion(params)  # fail at add_request, naming the model
        return params

    def companions(self, params: BlendParams):
        return [self._companion(params)]

    def add_request(self, slot: int, params: BlendParams, request) -> None:
        self.params[slot] = params

    def remove(self, slot: int) -> None:
        self.params.pop(slot, None)

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:  # [R, V]: only this processor's rows
        groups: dict[str, list[int]] = {}
        for r, slot in enumerate(ctx.slots):  # rows may name different companions
            groups.setdefault(self.params[slot].model, []).append(r)
        for model, rows in groups.items():
            companion = self._companion(self.params[ctx.slots[rows[0]]])
            logp = torch.log_softmax(companion.logits(ctx, rows).float(), dim=-1)
            w = torch.tensor([self.params[ctx.slots[r]].weight for r in rows], device=logits.device)[:, None]
            idx = torch.tensor(rows, device=logits.device)
            logits[idx] = logits[idx] + (w * logp).to(logits.dtype)
        return logits
