"""The sampler protocol and the per-step batch it works on.

The sampler is the last stage of a step: the logits it receives have already been through the
logits-processor chain (penalties, bans, temperature, top-k/top-p/min-p ... see
:mod:`framework.processors`), so it only draws. Greedy rows (``temperature == 0``) take the
argmax of the processed logits. A request with a seed carries its own ``torch.Generator`` so its
draws do not depend on which other requests share the batch.
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
    greedy: torch.Tensor  # [S] bool: take the argmax (temperature 0)
    all_greedy: bool
    max_logprobs: int  # largest `logprobs` asked for in the batch (0 = none)
    engine_generator: torch.Generator
    # [S, V] the model's logits before any processor, for logprobs; None: the logits handed to
    # the sampler are the model's own (no processor touched this batch)
    model_logits: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        engine_generator: torch.Generator,
        model_logits: torch.Tensor | None = None,
    ) -> "SamplingBatch":
        greedy = [p.temperature == 0.0 for p in params]
        return cls(
            params=params,
            generators=generators,
            greedy=torch.tensor(greedy, dtype=torch.bool),
            all_greedy=all(greedy),
            max_logprobs=max((p.logprobs or 0) for p in params),
            engine_generator=engine_generator,
            model_logits=model_logits,
        )


@dataclass(slots=True)
class SamplerOutput:
    tokens: torch.Tensor  # [S] int64
    logprobs: torch.Tensor  # [S] float32: log-probability of each sampled token under the model
    top_ids: torch.Tensor | None = None  # [S, k] top-k alternatives (k = batch.max_logprobs)
    top_logprobs: torch.Tensor | None = None  # [S, k]


class Sampler(Protocol):
    """Turns a batch of processed logits into one token per row."""

    def sample(self, batch: SamplingBatch, logits: torch.Tensor) -> SamplerOutput:  # logits: [S, V] float32
        ...
