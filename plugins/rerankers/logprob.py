"""The ``logprob`` reranker: highest cumulative log-probability first."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from framework.rerankers import RerankRequest, ScoredCandidate


class LogprobReranker:
    """Order candidates by cumulative log-probability (``length_normalized``: per token)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        normalize: Literal["none", "length"] = Field("none", description="'length': mean log-probability per token")

    def __init__(self, setup=None):
        self.setup = setup

    def select(self, request: RerankRequest) -> list[ScoredCandidate]:
        opts = request.options
        per_token = opts is not None and getattr(opts, "normalize", "none") == "length"
        scored = []
        for i, c in enumerate(request.candidates):
            s = c.cumulative_logprob or 0.0
            if per_token:
                s /= max(1, len(c.token_ids))
            scored.append(ScoredCandidate(i, s))
        # stable: ties keep sampling order
        return sorted(scored, key=lambda c: -c.score)
