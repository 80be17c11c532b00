"""The sampler protocol and the per-step batch it works on.

Per-row settings are tensors so one op serves the whole batch; requests with different
settings share a batch. A request with a seed carries its own ``torch.Generator`` so its draws
do not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from framework.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingBatch:
    """Rows to sample this step (one per sequence whose next token is due)."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]  # per row; None = use the engine's generator
    temperature: torch.Tensor  # [S] float32 (0 = greedy)
    top_k: torch.Tensor  # [S] int64 (0 = off)
    top_p: torch.Tensor  # [S] float32 (1 = off)
    all_greedy: bool
    max_logprobs: int  # largest `logprobs` asked for in the batch (0 = none)
    engine_generator: torch.Generator

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None], engine_generator: torch.Generator) -> "SamplingBatch":
        return cls(
            params=params,
            generators=generators,
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32),
            top_k=torch.tensor([max(p.top_k, 0) for p in params], dtype=torch.int64),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32),
            all_greedy=all(p.temperature == 0.0 for p in params),
            max_logprobs=max((p.logprobs or 0) for p in params),
            engine_generator=engine_generator,
        )


@dataclass(slots=True)
class SamplerOutput:
    tokens: torch.Tensor  # [S] int64
    logprobs: torch.Tensor  # [S] float32: log-probability of each sampled token under the model
    top_ids: torch.Tensor | None = None  # [S, k] top-k alternatives (k = batch.max_logprobs)
    top_logprobs: torch.Tensor | None = None  # [S, k]


class Sampler(Protocol):
    """Turns a batch of logits into one token per row."""

    def sample(self, batch: SamplingBatch, logits: torch.Tensor) -> SamplerOutput:  # logits: [S, V] float32
        ...
