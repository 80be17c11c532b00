"""Batch-level logits processors: the protocol, slot bookkeeping and the per-step chain.

A logits processor is built once per engine and serves every request that uses it. Each running
sequence that uses at least one processor holds a *slot* (a small integer, reused after the
sequence leaves); processors keep their per-sequence state in tensors indexed by slot, so one
tensor op per step serves all of their rows, however the batch changes around them::

    proc = factory(setup)                         # once per engine, on first use
    params = proc.prepare(params, sampling)       # optional: per-request checks (tokenize, vocab)
    proc.add_request(slot, params, request)       # the sequence starts running (or resumes)
    logits = proc.apply(logits, ctx)              # every step: only this processor's rows
    proc.on_tokens(ctx, tokens)                   # optional: the tokens just sampled
    proc.fork(src_slot, dst_slot)                 # optional: copy state to a forked sequence
    proc.remove(slot)                             # finished, aborted or preempted

:class:`ProcessorChain` does the bookkeeping for the engine: it resolves a request's processors
when the request is added (so a bad parameter is an :class:`InvalidRequestError` before any
engine state changes), gives sequences slots when they are first due, hands each processor
exactly the rows that use it (rows that do not are never touched), and releases slots when a
sequence finishes, is aborted or is preempted (a preempted sequence is re-added from its tokens
when it resumes, so it continues exactly as before).

Processors run in a fixed global order so that a request's output never depends on the batch
it shares: by :class:`Stage`, then by registration order. The built-ins follow Hugging Face
transformers' order (see ``plugins/samplers/__init__.py``).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import torch
from pydantic import ValidationError

from framework.errors import InvalidRequestError
from framework.plugins import unknown_name_message
from framework.sampling_params import SamplingParams, format_validation_error

if TYPE_CHECKING:  # pragma: no cover
    from framework.plugins import Registry
    from framework.sequence import Sequence as Seq


class Stage(IntEnum):
    """Where a processor runs in the chain (lower first). Third-party processors default to
    ``GUIDANCE``: after penalties and bans, before temperature and truncation."""

    BIAS = 100  # logit_bias
    PENALTY = 200  # repetition, frequency and presence penalties
    BAN = 300  # no-repeat n-grams, bad words, min_tokens
    GUIDANCE = 500  # FUDGE, RAD, contrastive decoding ... (default)
    CONSTRAINT = 600  # grammar / JSON-schema token masks: before temperature and truncation
    TEMPERATURE = 700
    TRUNCATION = 800  # top-k, top-p, min-p, typical, epsilon, eta


@dataclass(frozen=True, slots=True)
class ProcessorSetup:
    """What a processor factory receives, once per engine."""

    vocab_size: int  # logits width V
    device: torch.device  # where the logits (and the processor's state) live
    eos_token_ids: frozenset[int]
    tokenizer: Any | None = None  # framework.tokenizer.Tokenizer, None with skip_tokenizer_init


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What ``add_request`` learns about a sequence that starts (or resumes) running."""

    token_ids: Sequence[int]  # prompt + tokens generated so far; read-only
    num_prompt_tokens: int
    sampling: SamplingParams


@dataclass(slots=True, eq=False)
class StepContext:
    """The rows of one step that use one processor (``R`` of them), in logits-row order.

    The chain reuses a context for as long as the batch composition does not change, so a
    processor may keep values derived from ``slots`` in ``cache`` (per-row parameter tensors,
    index tensors ...). ``token_ids`` are live: each step they hold every token so far.
    ``shared`` is scratch space common to all processors of one step (cleared every step), where
    a processor may leave something for the next ones, e.g. a compact form of the logits it
    returned (check that the logits you get are the tensor it describes).
    """

    slots: list[int]  # [R] slot of each row
    slot_index: torch.Tensor  # [R] int64 on the logits device
    token_ids: list[Sequence[int]]  # [R] prompt + output so far (read-only; not yet the new token)
    num_prompt_tokens: list[int]  # [R]
    cache: dict[Any, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, slots: list[int], token_ids: list[Sequence[int]], num_prompt_tokens: list[int],
              device: torch.device | str = "cpu", shared: dict[str, Any] | None = None) -> "StepContext":
        return cls(slots, torch.tensor(slots, dtype=torch.int64, device=device), token_ids, num_prompt_tokens,
                   shared={} if shared is None else shared)

    def __len__(self) -> int:
        return len(self.slots)

    def num_output_tokens(self, row: int) -> int:
        return len(self.token_ids[row]) - self.num_prompt_tokens[row]


@runtime_checkable
class LogitsProcessor(Protocol):
    """A batch-level logits processor (see the module docstring for the life cycle).

    ``apply`` gets only the rows of sequences that use this processor, as a tensor it may modify
    in place, and returns the processed logits (the same tensor or a new one of the same shape).
    Optional methods: ``prepare(params, sampling) -> params`` (per-request validation needing
    the model or tokenizer; raise ``ValueError`` with a clear message), ``on_tokens(ctx,
    tokens)`` and ``fork(src_slot, dst_slot)`` (without it, a fork is added from its tokens).
    An optional ``stage`` attribute places the processor in the chain (default
    ``Stage.GUIDANCE``).
    """

    def add_request(self, slot: int, params: Any, request: RequestInfo) -> None: ...

    def remove(self, slot: int) -> None: ...

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class ProcessorUse:
    """One processor a request uses, with its validated per-request parameters."""

    name: str
    params: Any


class SlotTensor:
    """A tensor whose first dimension is indexed by slot; it grows (doubling) on demand.

    ``SlotTensor((V,), torch.bool, device)`` holds one vocabulary-wide row per slot.
    """

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, fill: float | bool = 0):
        self.row_shape = row_shape
        self.fill = fill
        self.data = torch.full((0, *row_shape), fill, dtype=dtype, device=device)

    def ensure(self, slot: int) -> torch.Tensor:
        """Make room for ``slot``; returns ``data``."""
        cap = self.data.shape[0]
        if slot >= cap:
            new_cap = max(8, 2 * cap, slot + 1)
            grown = torch.full((new_cap, *self.row_shape), self.fill, dtype=self.data.dtype, device=self.data.device)
            grown[:cap] = self.data
            self.data = grown
        return self.data


# ------------------------------------------------------------------------------------ chain


@dataclass(slots=True)
class _PlanStep:
    proc: Any
    ctx: StepContext
    on_tokens: Any  # bound method or None


@dataclass(slots=True)
class _PlanGroup:
    """Consecutive processors serving the same rows: gathered and written back once."""

    rows: torch.Tensor | None  # None: every row of the batch
    steps: list[_PlanStep]


@dataclass(slots=True)
class StepPlan:
    """Which processor serves which rows, for one batch composition."""

    key: tuple[int | None, ...]
    version: int
    groups: list[_PlanGroup]
    shared: dict[str, Any]


class ProcessorChain:
    """The engine's logits-processor stage over one registry of processors."""

    def __init__(self, registry: "Registry", setup: ProcessorSetup):
        self.registry = registry
        self.setup = setup
        self._instances: dict[str, Any] = {}
        self._rank: dict[str, tuple[int, int]] = {}
        self._users: dict[str, set[int]] = {}  # processor name -> slots using it
        self._free: list[int] = []  # heap of released slots (lowest reused first)
        self._next_slot = 0
        self._version = 0  # bumped whenever a slot is taken or released
        self._plan: StepPlan | None = None
        self._buffer: torch.Tensor | None = None

    # -- per request --------------------------------------------------------------------------
    def instance(self, name: str) -> Any:
        """The engine's processor registered as ``name`` (built on first use)."""
        proc = self._instances.get(name)
        if proc is None:
            reg = self.registry.get(name)
            proc = reg.factory(self.setup)
            index = list(self.registry.entries).index(name)
            self._rank[name] = (int(getattr(proc, "stage", Stage.GUIDANCE)), index)
            self._instances[name] = proc
            self._users[name] = set()
        return proc

    def resolve(self, params: SamplingParams) -> tuple[ProcessorUse, ...]:
        """The processors a request uses, validated; raises InvalidRequestError.

        SamplingParams fields map onto registered processors through each factory's
        ``from_sampling_params(params) -> Params | None``; ``params.processors`` names more
        (``[{"repetition_penalty": {"penalty": 1.1}}]``). A processor may appear once.
        """
        uses: dict[str, Any] = {}
        for reg in self.registry:
            derive = getattr(reg.factory, "from_sampling_params", None)
            if derive is not None:
                p = derive(params)
                if p is not None:
                    uses[reg.name] = p
        for entry in params.processors:
            (name, options), = entry.items()
            if name not in self.registry:
                raise InvalidRequestError(unknown_name_message("logits_processor", name, self.registry.names()))
            if name in uses:
                raise InvalidRequestError(f"processor {name!r} is set twice (by a sampling field, or twice in processors)")
            model = self.registry.get(name).params
            if model is not None:
                try:
                    options = model(**(options or {}))
                except ValidationError as exc:
                    raise InvalidRequestError(format_validation_error(exc, f"{name} params")) from None
            uses[name] = options
        resolved = []
        for name, p in uses.items():
            proc = self.instance(name)
            prepare = getattr(proc, "prepare", None)
            if prepare is not None:
                try:
                    p = prepare(p, params)
                except InvalidRequestError:
                    raise
                except (ValueError, TypeError) as exc:
                    raise InvalidRequestError(f"{name}: {exc}") from None
            resolved.append(ProcessorUse(name, p))
        resolved.sort(key=lambda u: self._rank[u.name])
        return tuple(resolved)

    def order(self) -> list[str]:
        """Names of the processors built so far, in the order they run."""
        return sorted(self._instances, key=self._rank.__getitem__)

    # -- per sequence -------------------------------------------------------------------------
    def _take_slot(self) -> int:
        self._version += 1
        if self._free:
            return heapq.heappop(self._free)
        self._next_slot += 1
        return self._next_slot - 1

    def admit(self, seq: "Seq") -> None:
        """Give a sequence that uses processors a slot and register it with each of them."""
        if seq.slot is not None or not seq.request.processors:
            return
        slot = self._take_slot()
        info = RequestInfo(seq.token_ids, seq.num_prompt_tokens, seq.request.params)
        for use in seq.request.processors:
            self._instances[use.name].add_request(slot, use.params, info)
            self._users[use.name].add(slot)
        seq.slot = slot

    def fork(self, parent: "Seq", child: "Seq") -> None:
        """Give ``child`` (same request, same tokens as ``parent``) a copy of the parent's state."""
        if parent.slot is None or child.slot is not None:
            return  # a sequence without a slot is admitted from its own tokens when first due
        slot = self._take_slot()
        info = RequestInfo(child.token_ids, child.num_prompt_tokens, child.request.params)
        for use in child.request.processors:
            proc = self._instances[use.name]
            fork = getattr(proc, "fork", None)
            if fork is not None:
                fork(parent.slot, slot)
            else:
                proc.add_request(slot, use.params, info)
            self._users[use.name].add(slot)
        child.slot = slot

    def release(self, seq: "Seq") -> None:
        """Drop a sequence's processor state (finished, aborted or preempted)."""
        slot = seq.slot
        if slot is None:
            return
        for use in seq.request.processors:
            self._instances[use.name].remove(slot)
            self._users[use.name].discard(slot)
        seq.slot = None
        heapq.heappush(self._free, slot)
        self._version += 1

    @property
    def num_slots_in_use(self) -> int:
        return self._next_slot - len(self._free)

    # -- per step -----------------------------------------------------------------------------
    def _build_plan(self, seqs: list["Seq"], key: tuple[int | None, ...], device: torch.device) -> StepPlan:
        shared: dict[str, Any] = {}
        groups: list[_PlanGroup] = []
        last_rows: list[int] | None = None
        for name in self.order():
            users = self._users[name]
            if not users:
                continue
            rows = [i for i, s in enumerate(key) if s is not None and s in users]
            if not rows:
                continue
            ctx = StepContext.build(
                [key[i] for i in rows], [seqs[i].token_ids for i in rows],  # type: ignore[misc]
                [seqs[i].num_prompt_tokens for i in rows], device, shared,
            )
            proc = self._instances[name]
            step = _PlanStep(proc, ctx, getattr(proc, "on_tokens", None))
            if rows == last_rows:
                groups[-1].steps.append(step)
                continue
            rows_t = None if len(rows) == len(key) else torch.tensor(rows, dtype=torch.int64, device=device)
            groups.append(_PlanGroup(rows_t, [step]))
            last_rows = rows
        return StepPlan(key, self._version, groups, shared)

    def apply(self, seqs: list["Seq"], logits: torch.Tensor) -> tuple[torch.Tensor, StepPlan | None]:
        """Process ``logits`` [S, V] (row i belongs to ``seqs[i]``). Returns the processed logits
        (``logits`` itself, untouched, when no row uses a processor; otherwise a tensor valid
        until the next call) and the plan to hand to :meth:`on_tokens` after sampling."""
        for seq in seqs:
            if seq.slot is None and seq.request.processors:
                self.admit(seq)
        key = tuple(seq.slot for seq in seqs)
        plan = self._plan
        if plan is None or plan.key != key or plan.version != self._version:
            plan = self._plan = self._build_plan(seqs, key, logits.device)
        if not plan.groups:
            return logits, None
        plan.shared.clear()
        out = self._copy(logits)  # the model's logits stay intact (the sampler's logprobs use them)
        for group in plan.groups:
            sub = out if group.rows is None else out.index_select(0, group.rows)
            for step in group.steps:
                sub = step.proc.apply(sub, step.ctx)
            if group.rows is None:
                out = sub
            else:
                out.index_copy_(0, group.rows, sub)
        return out, plan

    def _copy(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` copied into a buffer reused from step to step (fresh multi-megabyte
        allocations cost page faults every step on CPU). Valid until the next :meth:`apply`."""
        S, V = logits.shape
        buf = self._buffer
        if buf is None or buf.shape[0] < S or buf.shape[1] != V or buf.dtype != logits.dtype or buf.device != logits.device:
            buf = self._buffer = torch.empty((max(S, 2 * (buf.shape[0] if buf is not None else 0)), V),
                                             dtype=logits.dtype, device=logits.device)
        return buf[:S].copy_(logits)

    def on_tokens(self, plan: StepPlan | None, tokens: torch.Tensor) -> None:
        """Tell the processors of ``plan`` which tokens were sampled (tokens: [S])."""
        if plan is None:
            return
        for group in plan.groups:
            sub = tokens if group.rows is None else tokens.index_select(0, group.rows)
            for step in group.steps:
                if step.on_tokens is not None:
                    step.on_tokens(step.ctx, sub)
