"""Logit bias and repetition penalties, batched over slot-indexed state.

Per-sequence history is kept in a :class:`TokenTable` (the distinct tokens so far and their
counts, per slot), built once when a sequence starts running and extended with one indexed write
per step in ``on_tokens``. A step reads and writes only the logits of tokens that occurred
(gather, transform, scatter, as HF does), never the whole vocabulary.
"""

from __future__ import annotations

import torch
from pydantic import Field

from framework.processors import RequestInfo, Stage, StepContext
from framework.sampling_params import SamplingParams
from plugins.samplers.slots import ProcessorParams, SlotProcessor, TokenTable


class LogitBias(SlotProcessor):
    """Add a bias to chosen tokens' logits (OpenAI/vLLM ``logit_bias``; HF
    ``SequenceBiasLogitsProcessor`` with one-token sequences)."""

    stage = Stage.BIAS

    class Params(ProcessorParams):
        bias: dict[int, float] = Field(description="token id -> bias added to its logit")

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Params | None:
        return cls.Params(bias=params.logit_bias) if params.logit_bias else None

    def prepare(self, params: Params, sampling: SamplingParams) -> Params:
        bad = sorted(t for t in params.bias if not 0 <= t < self.vocab_size)
        if bad:
            raise ValueError(f"token id(s) {bad} outside the vocabulary [0, {self.vocab_size})")
        return params

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        key = (id(self), "index")
        index = ctx.cache.get(key)
        if index is None:
            rows, cols, vals = [], [], []
            for r, p in enumerate(self.row_params(ctx)):
                rows += [r] * len(p.bias)
                cols += p.bias.keys()
                vals += p.bias.values()
            dev = logits.device
            index = ctx.cache[key] = (
                torch.tensor(rows, dtype=torch.int64, device=dev), torch.tensor(cols, dtype=torch.int64, device=dev),
                torch.tensor(vals, dtype=torch.float32, device=dev).to(logits.dtype),
            )
        rows_t, cols_t, vals_t = index
        return logits.index_put_((rows_t, cols_t), vals_t, accumulate=True)


class RepetitionPenalty(SlotProcessor):
    """CTRL-style repetition penalty over prompt + output (HF ``RepetitionPenaltyLogitsProcessor``):
    a token seen before has its logit divided by ``penalty`` if positive, multiplied if negative."""

    stage = Stage.PENALTY
    scalars = {"penalty": torch.float32}

    class Params(ProcessorParams):
        penalty: float = Field(gt=0.0, allow_inf_nan=False, description="> 1 discourages repeats, < 1 encourages them")

    def __init__(self, setup):
        super().__init__(setup)
        self.seen = TokenTable(setup.vocab_size, setup.device)  # distinct tokens of prompt + output

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Params | None:
        return cls.Params(penalty=params.repetition_penalty) if params.repetition_penalty != 1.0 else None

    def init_slot(self, slot: int, params: Params, request: RequestInfo) -> None:
        self.seen.reset(slot, list(request.token_ids))
        self.set_scalars(slot, penalty=params.penalty)

    def fork_extra(self, src: int, dst: int) -> None:
        self.seen.copy(src, dst)

    def on_tokens(self, ctx: StepContext, tokens: torch.Tensor) -> None:
        self.seen.add(ctx.slot_index, tokens)

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        entries = self.seen.entries(ctx.slot_index)
        if entries is None:
            return logits
        ids, _ = entries  # [R, W]
        p = self.row_values(ctx, "penalty").to(logits.dtype)[:, None]
        vals = logits.gather(1, ids)
        return logits.scatter_(1, ids, torch.where(vals < 0, vals * p, vals / p))


class FrequencyPresencePenalty(SlotProcessor):
    """OpenAI-style penalties over the output only: ``logit -= frequency * count`` then
    ``logit -= presence * (count > 0)``, ``count`` = how often the token was generated so far."""

    stage = Stage.PENALTY
    scalars = {"frequency": torch.float32, "presence": torch.float32}

    class Params(ProcessorParams):
        frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
        presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)

    def __init__(self, setup):
        super().__init__(setup)
        self.generated = TokenTable(setup.vocab_size, setup.device)  # distinct output tokens and their counts

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Params | None:
        if params.frequency_penalty == 0.0 and params.presence_penalty == 0.0:
            return None
        return cls.Params(frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty)

    def init_slot(self, slot: int, params: Params, request: RequestInfo) -> None:
        self.generated.reset(slot, list(request.token_ids[request.num_prompt_tokens:]))
        self.set_scalars(slot, frequency=params.frequency_penalty, presence=params.presence_penalty)

    def fork_extra(self, src: int, dst: int) -> None:
        self.generated.copy(src, dst)

    def on_tokens(self, ctx: StepContext, tokens: torch.Tensor) -> None:
        self.generated.add(ctx.slot_index, tokens)

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        entries = self.generated.entries(ctx.slot_index)
        if entries is None:
            return logits
        ids, counts = entries  # [R, W]
        counts = counts.to(logits.dtype)
        vals = logits.gather(1, ids)
        vals = vals - self.row_values(ctx, "frequency").to(logits.dtype)[:, None] * counts
        vals = vals - self.row_values(ctx, "presence").to(logits.dtype)[:, None] * (counts > 0).to(logits.dtype)
        return logits.scatter_(1, ids, vals)
