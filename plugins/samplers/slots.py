"""A base for the built-in processors: per-slot parameters and state kept in slot-indexed tensors.

Subclasses declare a pydantic ``Params`` model (``extra="forbid"``), a ``stage``, and
``from_sampling_params`` (which SamplingParams fields turn them on). Per-slot scalars live in
:class:`SlotTensor` columns, so ``row_values(ctx, name)`` gathers a ``[R]`` tensor for the rows of
a step with one op (cached on the step context while the batch does not change).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from framework.processors import ProcessorSetup, RequestInfo, SlotTensor, Stage, StepContext
from framework.sampling_params import SamplingParams


class ProcessorParams(BaseModel):
    """Base of the built-in processors' options: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SlotProcessor:
    """Bookkeeping shared by the built-in processors."""

    stage: ClassVar[int] = Stage.GUIDANCE
    Params: ClassVar[type[ProcessorParams]]
    scalars: ClassVar[dict[str, torch.dtype]] = {}  # per-slot scalar columns this processor keeps

    def __init__(self, setup: ProcessorSetup):
        self.setup = setup
        self.vocab_size = setup.vocab_size
        self.device = setup.device
        self.slot_params: dict[int, Any] = {}
        self.tensors: dict[str, SlotTensor] = {
            name: SlotTensor((), dtype, setup.device) for name, dtype in self.scalars.items()
        }

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> ProcessorParams | None:
        """The options SamplingParams ask for, or None when this processor is off for them."""
        return None

    def vocab_tensor(self, name: str, dtype: torch.dtype, fill: float | bool = 0) -> SlotTensor:
        """A per-slot ``[V]`` state tensor (created on first use)."""
        t = self.tensors.get(name)
        if t is None:
            t = self.tensors[name] = SlotTensor((self.vocab_size,), dtype, self.device, fill)
        return t

    # -- life cycle -----------------------------------------------------------------------------
    def add_request(self, slot: int, params: Any, request: RequestInfo) -> None:
        self.slot_params[slot] = params
        for t in self.tensors.values():
            t.ensure(slot)
        self.init_slot(slot, params, request)

    def init_slot(self, slot: int, params: Any, request: RequestInfo) -> None:
        """Fill this slot's state (scalars via ``set_scalars``)."""

    def set_scalars(self, slot: int, **values: float) -> None:
        for name, value in values.items():
            self.tensors[name].data[slot] = value

    def remove(self, slot: int) -> None:
        self.slot_params.pop(slot, None)

    def fork(self, src: int, dst: int) -> None:
        self.slot_params[dst] = self.slot_params[src]
        for t in self.tensors.values():
            t.ensure(dst)[dst] = t.data[src]
        self.fork_extra(src, dst)

    def fork_extra(self, src: int, dst: int) -> None:
        """Copy Python-side per-slot state (tensors are copied by :meth:`fork`)."""

    # -- per step -------------------------------------------------------------------------------
    def row_values(self, ctx: StepContext, name: str) -> torch.Tensor:
        """Column ``name`` for the rows of ``ctx``: ``[R]`` (cached while the batch is unchanged)."""
        key = (id(self), name)
        v = ctx.cache.get(key)
        if v is None:
            v = ctx.cache[key] = self.tensors[name].data.index_select(0, ctx.slot_index)
        return v

    def row_params(self, ctx: StepContext) -> list[Any]:
        key = (id(self), "params")
        v = ctx.cache.get(key)
        if v is None:
            v = ctx.cache[key] = [self.slot_params[s] for s in ctx.slots]
        return v


class TokenTable:
    """Per slot, the distinct tokens of a history and how often each occurred, so that a penalty
    touches only the logits of tokens that occurred: ``O(R x distinct)`` tensor work per step,
    with no Python loop over rows or history.

    ``ids`` / ``counts`` ``[slots, width]``: a row's distinct tokens (-1 past its end) and their
    counts; ``column`` ``[slots, V]``: where each token sits in its row (-1: not seen);
    ``size`` ``[slots]``: distinct tokens per row. Appending a step's tokens is a handful of
    indexed reads and writes for all rows at once.
    """

    def __init__(self, vocab_size: int, device: torch.device | str):
        self.vocab_size = vocab_size
        self.device = device
        self.ids = torch.full((0, 0), -1, dtype=torch.int64, device=device)
        self.counts = torch.zeros((0, 0), dtype=torch.float32, device=device)
        self.column = SlotTensor((vocab_size,), torch.int64, device, -1)
        self.size = SlotTensor((), torch.int64, device, 0)

    def _grow(self, slot: int, width: int) -> None:
        self.column.ensure(slot)
        self.size.ensure(slot)
        cap, cap_w = self.ids.shape
        if slot < cap and width <= cap_w:
            return
        new_cap = max(cap, self.column.data.shape[0])
        new_w = cap_w if width <= cap_w else max(16, 2 * cap_w, width)
        ids = torch.full((new_cap, new_w), -1, dtype=torch.int64, device=self.device)
        counts = torch.zeros((new_cap, new_w), dtype=torch.float32, device=self.device)
        ids[:cap, :cap_w] = self.ids
        counts[:cap, :cap_w] = self.counts
        self.ids, self.counts = ids, counts

    def reset(self, slot: int, tokens: list[int]) -> None:
        """The history of ``slot`` is ``tokens`` (a sequence starts or resumes)."""
        uniq, freq = torch.tensor(tokens, dtype=torch.int64, device=self.device).unique(return_counts=True)
        n = uniq.numel()
        self._grow(slot, n)
        self.ids[slot] = -1
        self.counts[slot] = 0
        self.ids[slot, :n] = uniq
        self.counts[slot, :n] = freq.to(torch.float32)
        col = self.column.data[slot]
        col.fill_(-1)
        col[uniq] = torch.arange(n, device=self.device)
        self.size.data[slot] = n

    def add(self, slot_index: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append ``tokens[r]`` to the history of slot ``slot_index[r]`` (slots distinct)."""
        col = self.column.data[slot_index, tokens]  # [R]
        new = col < 0
        size = self.size.data[slot_index]
        col = torch.where(new, size, col)
        self._grow(0, int(size.max()) + 1)
        self.column.data[slot_index, tokens] = col
        self.ids[slot_index, col] = tokens
        self.counts[slot_index, col] += 1.0
        self.size.data[slot_index] = size + new

    def copy(self, src: int, dst: int) -> None:
        self._grow(dst, 0)
        for t in (self.ids, self.counts, self.column.data, self.size.data):
            t[dst] = t[src]

    def entries(self, slot_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(ids, counts)`` ``[R, W]`` of the rows' distinct tokens; a row's unused entries
        repeat its first one (so scattering a function of them writes each logit once, with one
        value), or point at token 0 with count 0 in a row with no token. None: no row has any."""
        width = int(self.size.data.index_select(0, slot_index).max())
        if width == 0:
            return None
        ids = self.ids[:, :width].index_select(0, slot_index)
        counts = self.counts[:, :width].index_select(0, slot_index)
        valid = ids >= 0
        ids = torch.where(valid, ids, ids[:, :1].clamp(min=0))
        counts = torch.where(valid, counts, counts[:, :1])
        return ids, counts
