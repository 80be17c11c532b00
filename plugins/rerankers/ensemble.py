"""Output ensembling: some of a request's samples are drawn from other language models.

The ``ensemble`` logits processor gives each sample of a request a *source* model: with
``members: {draft: 8}`` and ``best_of: 16``, samples 0-7 draw from the main model and samples
8-15 from the companion ``draft`` (a spec ``models:`` alias, a registered name such as
``demo-draft``, or a directory; several members take consecutive ranges, in the order given).
A reranker then chooses among the pooled candidates — with ``mbr`` this is MBR across models
(output ensembling). For a member's rows the processor replaces the main model's logits by the
member's, before every other processor (``stage`` 50, ahead of ``logit_bias``), so penalties,
constraints, temperature and truncation apply to the member's distribution as to the main
model's.

Members run in lockstep with the main model (each sequence is computed by every model of the
ensemble, in its own KV pool); the members must read the main model's token ids (same
vocabulary and tokenizer). The processor is a *source* (it has ``models``): every candidate is
labelled with the model that sampled it (``CompletionOutput.model``: the main model's name or
the member's reference as given in ``members``), and its ``cumulative_logprob`` and ``logprobs``
are that model's own (the log-softmax of that model's logits, before temperature and
truncation, at each token it sampled). So ``weights: logprob`` in MBR weighs each candidate by
the probability its own model gave it.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class EnsembleParams(BaseModel):
    """Options of the ``ensemble`` processor."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    members: dict[str, int] = Field(description="companion language model -> how many of the request's samples "
                                    "it draws (the main model draws the rest, the first ones)")

    @field_validator("members")
    @classmethod
    def _counts(cls, v: dict[str, int]) -> dict[str, int]:
        if not v:
            raise ValueError("name at least one member model: {alias: number of samples}")
        for ref, k in v.items():
            if k < 1:
                raise ValueError(f"{ref}: the number of samples must be >= 1, got {k}")
        return v


class EnsembleSources:
    """Per sample, the logits of the model it draws from (see the module docstring)."""

    stage = 50  # before logit_bias (Stage.BIAS = 100): later processors see the member's logits

    def __init__(self, setup: Any):
        self.setup = setup
        self.slots: dict[int, tuple[EnsembleParams, int]] = {}

    def _member(self, ref: str) -> Any:
        if self.setup.models is None:
            raise ValueError("ensemble needs an engine's companion models")
        return self.setup.models.get(ref)

    def prepare(self, params: EnsembleParams, sampling: Any) -> EnsembleParams:
        total = sampling.num_samples
        k = sum(params.members.values())
        if k > total:
            raise ValueError(f"members: {k} samples from the members but the request samples {total} "
                             f"(set best_of to at least {k}, plus the main model's)")
        if sampling.num_beams > 1:
            raise ValueError("members: ensembling draws samples; it cannot be combined with beam search")
        if self.setup.models is None:  # `decodekit validate`: no engine, no models to check
            return params
        for ref in params.members:
            try:
                comp = self._member(ref)
            except ValueError as exc:
                raise ValueError(f"members: {exc}") from None
            if comp.kind != "lm":
                raise ValueError(f"members: {ref!r} is a scorer, not a language model to sample from")
        return params

    def companions(self, params: EnsembleParams) -> list[Any]:
        return [self._member(ref) for ref in params.members]

    def add_request(self, slot: int, params: EnsembleParams, request: Any) -> None:
        self.slots[slot] = (params, request.sampling.num_samples)

    def remove(self, slot: int) -> None:
        self.slots.pop(slot, None)

    @staticmethod
    def source(index: int, params: EnsembleParams, total: int) -> str | None:
        """The member sample ``index`` draws from (None: the main model)."""
        start = total - sum(params.members.values())
        if index < start:
            return None
        for ref, k in params.members.items():
            if index < start + k:
                return ref
            start += k
        return None

    def models(self, ctx: Any) -> list[str]:
        """The model each row of ``ctx`` draws from: a member's reference, or the main model's name."""
        main = self.setup.models.main.name
        out = []
        for slot, seq in zip(ctx.slots, ctx.seqs):
            params, total = self.slots[slot]
            out.append(self.source(seq.index, params, total) or main)
        return out

    def apply(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
        by_member: dict[str, list[int]] = {}
        for r, (slot, seq) in enumerate(zip(ctx.slots, ctx.seqs)):
            params, total = self.slots[slot]
            ref = self.source(seq.index, params, total)
            if ref is not None:
                by_member.setdefault(ref, []).append(r)
        for ref, rows in by_member.items():
            member = self._member(ref).logits(ctx, rows)
            logits[torch.tensor(rows, device=logits.device)] = member.to(logits.dtype)
        return logits


__all__ = ["EnsembleParams", "EnsembleSources"]
