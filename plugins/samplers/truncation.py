"""Temperature and truncation: top-k, top-p, min-p, typical, epsilon and eta.

Each computes what the matching Hugging Face ``LogitsProcessor`` computes, with the per-row
settings as tensors, so a batch of rows with different settings is one op. They are off for
greedy requests (``temperature == 0``), as in HF, where they only apply when sampling.
``min_tokens_to_keep`` (a SamplingParams field and an option of each) is honoured everywhere.

Top-p and min-p on a row with few finite logits (``<= V / 8``: after top-k, typically) work
on those only (a :class:`~plugins.samplers.support.Support`) instead of the whole vocabulary;
top-k hands its result on in that form. On this path the cumulative mass is a sequential sum of
``exp(logit - max)`` over the kept tokens in a fixed order (ascending value, then token id),
normalised by its total, and min-p compares ``exp(logit - max)`` with ``min_p``: neither
depends on how many masked entries pad a row, and the path is chosen per row, so a row's result
never depends on its batch. They can differ from the full-vocabulary computation only where a
probability sits within rounding of the cutoff. Otherwise each processor computes exactly HF's
ops (bitwise equal results).
"""

from __future__ import annotations

import torch
from pydantic import Field

from framework.processors import RequestInfo, Stage, StepContext
from framework.sampling_params import SamplingParams
from plugins.samplers.slots import ProcessorParams, SlotProcessor
from plugins.samplers.support import Support, compact_limit, topk_largest

_NEG_INF = float("-inf")

_Keep = Field(1, ge=1, description="never keep fewer tokens than this")


class Temperature(SlotProcessor):
    """Divide the logits by the temperature (HF ``TemperatureLogitsWarper``)."""

    stage = Stage.TEMPERATURE
    scalars = {"temperature": torch.float32}

    class Params(ProcessorParams):
        temperature: float = Field(gt=0.0, allow_inf_nan=False)

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Params | None:
        t = params.temperature
        return cls.Params(temperature=t) if t not in (0.0, 1.0) else None

    def init_slot(self, slot: int, params: Params, request: RequestInfo) -> None:
        self.set_scalars(slot, temperature=params.temperature)

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return logits.div_(self.row_values(ctx, "temperature").to(logits.dtype)[:, None])


class _Truncation(SlotProcessor):
    """Shared parts of the truncation processors: the ``keep`` column (min_tokens_to_keep)."""

    stage = Stage.TRUNCATION

    def keep_info(self, ctx: StepContext) -> tuple[torch.Tensor, int, bool]:
        """(keep [R] int64, largest keep, all rows keep the same number)."""
        key = (id(self), "keep_info")
        v = ctx.cache.get(key)
        if v is None:
            ks = [p.min_tokens_to_keep for p in self.row_params(ctx)]
            v = ctx.cache[key] = (self.row_values(ctx, "keep"), max(ks), len(set(ks)) == 1)
        return v

    def kth_largest(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """[R, 1]: each row's ``min_tokens_to_keep``-th largest logit."""
        keep, kmax, same = self.keep_info(ctx)
        if kmax == 1:
            return logits.amax(dim=-1, keepdim=True)
        kmax = min(kmax, logits.shape[-1])
        top = topk_largest(logits, kmax)[0]
        return top[:, -1:] if same else top.gather(1, (keep.clamp(max=kmax) - 1)[:, None])


class _CompactTruncation(_Truncation):
    """A truncation with two exact-in-intent paths: ``dense`` (HF's ops over the vocabulary) and
    ``compact`` (over the finite logits of a :class:`Support`). A row takes the compact path iff
    it has at most :func:`compact_limit` finite logits, whatever else the batch holds."""

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        support = Support.of(logits, ctx)  # every row of a support is within the limit
        if support is None:
            limit = compact_limit(logits.shape[-1])
            if not limit:
                return self.dense(logits, ctx, None)
            finite = logits.shape[-1] - torch.isneginf(logits).sum(-1, dtype=torch.int32)
            small = finite <= limit
            n_small = int(small.sum())
            if n_small == 0:
                return self.dense(logits, ctx, None)
            if n_small < len(ctx):  # some of each: two groups
                i_small, i_big = small.nonzero()[:, 0], (~small).nonzero()[:, 0]
                part = logits[i_small]
                self.compact(Support.covering(part, int(finite[i_small].max())), ctx, i_small)
                logits[i_small] = part
                logits[i_big] = self.dense(logits[i_big], ctx, i_big)
                return logits
            support = Support.covering(logits, int(finite.max()))
        self.compact(support, ctx, None)
        support.publish(ctx)
        return logits

    def dense(self, logits: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def compact(self, support: Support, ctx: StepContext, rows: torch.Tensor | None) -> None:
        raise NotImplementedError

    def per_row(self, ctx: StepContext, name: str, rows: torch.Tensor | None) -> torch.Tensor:
        v = self.row_values(ctx, name)
        return v if rows is None else v[rows]


class TopK(_Truncation):
    """Keep the k largest logits (ties with the k-th kept; HF ``TopKLogitsWarper``).

    When every row keeps few tokens and none ties with its k-th, the result is built from the
    top k alone (same values as masking) and handed on as a :class:`Support`."""

    scalars = {"k": torch.int64, "keep": torch.int64}

    class Params(ProcessorParams):
        top_k: int = Field(ge=1)
        min_tokens_to_keep: int = _Keep

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Params | None:
        if params.greedy or params.top_k <= 0:
            return None
        return cls.Params(top_k=params.top_k, min_tokens_to_keep=params.min_tokens_to_keep)

    def init_slot(self, slot: int, params: Params, request: RequestInfo) -> None:
        k = min(max(params.top_k, params.min_tokens_to_keep), self.vocab_size)
        self.set_scalars(slot, k=k, keep=params.min_tokens_to_keep)

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        key = (id(self), "kmax")
        info = ctx.cache.get(key)
        if info is None:
            k = self.row_values(ctx, "k")
            info = ctx.cache[key] = (int(k.max()), bool((k == k[0]).all()))
        kmax, same = info
        V = logits.shape[-1]
        if kmax >= V and same:
            return logits
        k = self.row_values(ctx, "k")
        compact = kmax + 1 <= compact_limit(V)
        top_v, top_i = topk_largest(logits, kmax + 1) if compact else logits.topk(kmax, dim=-1)
        kth = top_v[:, kmax - 1 : kmax] if same else top_v.gather(1, (k - 1)[:, None])
        if compact:
            following = top_v[:, kmax : kmax + 1] if same else top_v.gather(1, k[:, None])
            if not bool((following == kth).any()):  # no tie at the boundary: exactly k per row
                values = top_v[:, :kmax]
                if not same:
                    values = values.masked_fill(torch.arange(kmax, device=k.device)[None, :] >= k[:, None], _NEG_INF)
                out = logits.fill_(_NEG_INF).scatter_(1, top_i[:, :kmax], values)
                Support(out, 0, values, top_i[:, :kmax], ascending=False).publish(ctx)
                return out
        return logits.masked_fill_(logits < kth, _NEG_INF)


class TopP(_CompactTruncation):
    """Nucleus: keep the most likely tokens whose mass reaches ``top_p`` (HF ``TopPLogitsWarper``:
    drop tokens whose ascending cumulative probability is ``<= 1 - top_p``)."""

    scalars = {"threshold": torch.float32, "keep": torch.int64}

    class Params(ProcessorParams):
        top_p: float = Field(gt=0.0, le=1.0)
        min_tokens_to_keep: int = _Keep

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Params | None:
        if params.greedy or params.top_p >= 1.0:
            return None
        return cls.Params(top_p=params.top_p, min_tokens_to_keep=params.min_tokens_to_keep)

    def init_slot(self, slot: int, params: Params, request: RequestInfo) -> None:
        # 1 - top_p in double, then rounded to float32: what HF's comparison with a Python float does
        self.set_scalars(slot, threshold=1.0 - params.top_p, keep=params.min_tokens_to_keep)

    def dense(self, logits: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= self.per_row(ctx, "threshold", rows)[:, None]
        _, kmax, same = self.keep_info(ctx)
        if kmax == 1:
            remove[:, -1] = False
        else:  # never the last `keep` (most likely) positions
            V = remove.shape[-1]
            remove &= torch.arange(V, device=remove.device)[None, :] < (V - self.per_row(ctx, "keep", rows))[:, None]
        return logits.masked_fill_(remove.scatter(1, order, remove), _NEG_INF)

    def compact(self, support: Support, ctx: StepContext, rows: torch.Tensor | None) -> None:
        support.sort_ascending()
        vals = support.values
        cum = (vals - vals[:, -1:]).exp_().cumsum(dim=-1)  # sequential: leading zeros add nothing
        remove = cum <= self.per_row(ctx, "threshold", rows)[:, None] * cum[:, -1:]
        _, kmax, same = self.keep_info(ctx)
        support.protect_top(remove, self.per_row(ctx, "keep", rows), kmax, same)
        support.drop(remove)


class MinP(_CompactTruncation):
    """Drop tokens less likely than ``min_p`` times the most likely one (HF ``MinPLogitsWarper``)."""

    scalars = {"min_p": torch.float32, "keep": torch.int64}

    class Params(ProcessorParams):
        min_p: float = Field(ge=0.0, le=1.0)
        min_tokens_to_keep: int = _Keep

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Params | None:
        if params.greedy or params.min_p <= 0.0:
            return None
        return cls.Params(min_p=params.min_p, min_tokens_to_keep=params.min_tokens_to_keep)

    def init_slot(self, slot: int, params: Params, request: RequestInfo) -> None:
        self.set_scalars(slot, min_p=params.min_p, keep=params.min_tokens_to_keep)

    def dense(self, logits: torch.Tensor, ctx: StepContext, rows: torch.Tensor | None) -> torch.Tensor:
        probs = logits.softmax(dim=-1)
        top = probs.amax(dim=-1, keepdim=True)
        remove = probs < self.per_row(ctx, "min_p", rows)[:, None] * top
        _, kmax, same = self.keep_info(ctx)
        if kmax > 1:  # with one token to keep, the most likely one is never below the cutoff
            kmax = min(kmax, probs.shape[-1])
            top_idx = probs.topk(kmax, dim=-1).indices
            drop = remove.gather(1, top_idx)
            if same:
                drop.fill_(False)
            else:
                drop &= torch.arange(kmax, device=drop.device)[None, :] >= self.per_row(ctx, "keep", rows)[:, None]
            remove.scatter_(1, top_idx, drop)
        return logits.masked_fill_(remove, _NEG_INF)

    def compact(self, support: Support, ctx: StepContext, rows: torch.Tensor | None) -> None:
        vals = support.values  # p / p_max = exp(logit - max logit)
        remove = (vals - vals.amax(dim=-1, keepdim=True)).exp_() < self.per_row(ctx, "min_p", rows)[:, None]
        _, kmax, same = self.keep_info(ctx)
        support.protect_top(remove, self.per_row(ctx, "keep", rows), kmax, same)
        support.drop(remove)


class Typical(_Truncation):
    """Locally typical sampling (Meister et al. 2022; HF ``TypicalLogitsWarper``): keep the tokens
    whose surprisal is closest to the entropy until their mass reaches ``typical_p``."""

    scalars = {"mass": torch.float32, "keep": torch.int64}

    class Params(ProcessorParams):
        typical_p: float = Field(gt=0.0, lt=1.0)
        min_tokens_to_keep: int = _Keep

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Params | None:
        if params.greedy or params.typical_p >= 1.0:
            return None
        return cls.Params(typical_p=params.typical_p, min_tokens_to_keep=params.min_tokens_to_keep)

    def init_slot(self, slot: int, params: Params, request: RequestInfo) -> None:
        self.set_scalars(slot, mass=params.typical_p, keep=params.min_tokens_to_keep)

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        V = logits.shape[-1]
        logp = logits.log_softmax(dim=-1)
        ent = -(logp * logp.exp()).nansum(-1, keepdim=True)
        shifted = (-logp - ent).abs()
        sorted_scores, order = shifted.sort(dim=-1, descending=False)
        cum = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cum < self.row_values(ctx, "mass")[:, None]).sum(dim=1).clamp_(max=V - 1)
        remove = sorted_scores > sorted_scores.gather(1, last[:, None])
        keep, kmax, same = self.keep_info(ctx)
        if same:
            remove[:, :kmax] = False
        else:
            remove &= torch.arange(V, device=remove.device)[None, :] >= keep[:, None]
        return logits.masked_fill_(remove.scatter(1, order, remove), _NEG_INF)


class EpsilonCutoff(_Truncation):
    """Drop tokens with probability below ``epsilon`` (Hewitt et al. 2022; HF ``EpsilonLogitsWarper``)."""

    scalars = {"epsilon": torch.float32, "keep": torch.int64}

    class Params(ProcessorParams):
        epsilon: float = Field(gt=0.0, lt=1.0)
        min_tokens_to_keep: int = _Keep

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Params | None:
        if params.greedy or params.epsilon_cutoff <= 0.0:
            return None
        return cls.Params(epsilon=params.epsilon_cutoff, min_tokens_to_keep=params.min_tokens_to_keep)

    def init_slot(self, slot: int, params: Params, request: RequestInfo) -> None:
        self.set_scalars(slot, epsilon=params.epsilon, keep=params.min_tokens_to_keep)

    def cutoff(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return self.row_values(ctx, "epsilon")[:, None]

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        remove = logits.softmax(dim=-1) < self.cutoff(logits, ctx)
        remove &= logits < self.kth_largest(logits, ctx)
        return logits.masked_fill_(remove, _NEG_INF)


class EtaCutoff(EpsilonCutoff):
    """Eta sampling (Hewitt et al. 2022; HF ``EtaLogitsWarper``): the cutoff is
    ``min(epsilon, sqrt(epsilon) * exp(-entropy))``."""

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> "EpsilonCutoff.Params | None":
        if params.greedy or params.eta_cutoff <= 0.0:
            return None
        return cls.Params(epsilon=params.eta_cutoff, min_tokens_to_keep=params.min_tokens_to_keep)

    def cutoff(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        eps = self.row_values(ctx, "epsilon")
        entropy = torch.distributions.Categorical(logits=logits, validate_args=False).entropy()
        return torch.min(eps, eps.sqrt() * torch.exp(-entropy))[:, None]
