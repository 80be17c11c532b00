"""The engine's logits-processor stage: per-request resolution, slots, and the batched chain.

See :mod:`framework.processors` for the protocol a processor implements. The chain:

* **resolves** a request's processors at ``add_request`` (SamplingParams fields through each
  factory's ``from_sampling_params``, plus ``SamplingParams.processors``), validating their
  options and running ``prepare`` — a bad option is an ``InvalidRequestError`` before anything
  of the engine changes; it also collects the companion models they need;
* gives each running sequence a **slot** and registers it with its processors (``admit``),
  copies state to forks (``fork``), feeds tokens appended without sampling (``extend``), undoes
  tokens (``rollback``) and releases the slot when the sequence leaves (``release``);
* **applies** every processor to exactly its rows, once per step, in a fixed order (stage,
  then a request's own order of guidance processors, then registration order): rows gathered
  and written back once per run of processors serving the same rows;
* keeps, for rows a *source* processor (one with ``models``, e.g. output ensembling) gave
  another model's distribution, that distribution for the sampled tokens' logprobs
  (:attr:`StepPlan.model_logits`) and labels their sequences with the model's name.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from framework.errors import InvalidRequestError
from framework.plugins import validate_plugin_options, unknown_name_message
from framework.processors import ProcessorSetup, ProcessorUse, RequestInfo, Stage, StepContext
from framework.sampling_params import SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from framework.plugins import Registry
    from framework.sequence import Sequence as Seq

_Key = tuple[str, int]  # (processor name, order)


@dataclass(slots=True)
class _PlanStep:
    proc: Any
    ctx: StepContext
    on_tokens: Any  # bound method or None
    models: Any = None  # bound method or None: a source processor's model per row


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
    # [S, V] set by each apply where a source processor named a model for some rows: the
    # unprocessed logits, with those rows replaced by the source's output (what the sampled
    # tokens' logprobs are computed from); None when no row has a source. Valid until the next apply.
    model_logits: torch.Tensor | None = None


class ProcessorChain:
    """The engine's logits-processor stage over one registry of processors."""

    def __init__(self, registry: "Registry", setup: ProcessorSetup):
        self.registry = registry
        self.setup = setup
        self._instances: dict[str, Any] = {}
        self._rank: dict[str, tuple[int, int]] = {}
        self._users: dict[_Key, set[int]] = {}  # (processor, order) -> slots using it
        self._free: list[int] = []  # heap of released slots (lowest reused first)
        self._next_slot = 0
        self._version = 0  # bumped whenever a slot is taken or released
        self._plans: OrderedDict[tuple, StepPlan] = OrderedDict()  # a few recent batch compositions
        self.forcing: set[str] = set()  # processors that implement forced_tokens
        self._buffer: torch.Tensor | None = None
        self._model_buffer: torch.Tensor | None = None

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
            if hasattr(proc, "forced_tokens"):
                self.forcing.add(name)
        return proc

    def resolve(self, params: SamplingParams) -> tuple[ProcessorUse, ...]:
        """The processors a request uses, validated, in the order they run; raises
        InvalidRequestError. A processor may appear once."""
        uses: dict[str, Any] = {}
        explicit: list[str] = []
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
            try:
                options = validate_plugin_options(name, self.registry.get(name).params, options)
            except ValueError as exc:
                raise InvalidRequestError(str(exc)) from None
            uses[name] = options
            explicit.append(name)
        prepared: dict[str, Any] = {}
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
            prepared[name] = p
        guidance = [n for n in explicit if self._rank[n][0] == Stage.GUIDANCE]  # in the request's order
        resolved = [ProcessorUse(name, p, guidance.index(name) if name in guidance else 0) for name, p in prepared.items()]
        resolved.sort(key=self._use_rank)
        return tuple(resolved)

    def _use_rank(self, use: ProcessorUse) -> tuple[int, int, int]:
        stage, index = self._rank[use.name]
        return (stage, use.order, index)

    def companions(self, uses: tuple[ProcessorUse, ...]) -> list[Any]:
        """Companion models (``framework.companions.Companion``) the processors of a request
        need in lockstep, in order, without repeats."""
        out: list[Any] = []
        for use in uses:
            get = getattr(self._instances[use.name], "companions", None)
            for c in (get(use.params) if get is not None else ()):
                if all(c.pool is not o.pool for o in out):
                    out.append(c)
        return out

    def order(self) -> list[_Key]:
        """(name, order) of the processor runs in use, in the order they run."""
        return sorted(self._users, key=lambda k: (self._rank[k[0]][0], k[1], self._rank[k[0]][1]))

    # -- per sequence -------------------------------------------------------------------------
    def _take_slot(self) -> int:
        self._version += 1
        if self._free:
            return heapq.heappop(self._free)
        self._next_slot += 1
        return self._next_slot - 1

    @staticmethod
    def _info(seq: "Seq") -> RequestInfo:
        return RequestInfo(seq.token_ids, seq.num_prompt_tokens, seq.request.params)

    def admit(self, seq: "Seq") -> None:
        """Give a sequence that uses processors a slot and register it with each of them."""
        if seq.slot is not None or not seq.request.processors:
            return
        slot = self._take_slot()
        info = self._info(seq)
        for use in seq.request.processors:
            self._instances[use.name].add_request(slot, use.params, info)
            self._users.setdefault((use.name, use.order), set()).add(slot)
        seq.slot = slot

    def fork(self, parent: "Seq", child: "Seq") -> None:
        """Give ``child`` (same request, same tokens as ``parent``) a copy of the parent's state."""
        if parent.slot is None or child.slot is not None:
            return  # a sequence without a slot is admitted from its own tokens when first due
        slot = self._take_slot()
        info = self._info(child)
        for use in child.request.processors:
            proc = self._instances[use.name]
            fork = getattr(proc, "fork", None)
            try:
                if fork is None:
                    raise NotImplementedError
                fork(parent.slot, slot)
            except NotImplementedError:
                proc.add_request(slot, use.params, info)
            self._users[(use.name, use.order)].add(slot)
        child.slot = slot

    def extend(self, seq: "Seq", tokens: list[int]) -> None:
        """Tell ``seq``'s processors about ``tokens`` appended without sampling (before they are
        appended to ``seq.token_ids``)."""
        if seq.slot is None or not tokens:
            return
        for use in seq.request.processors:
            proc = self._instances[use.name]
            ext = getattr(proc, "extend", None)
            if ext is not None:
                ext(seq.slot, list(tokens), self._info(seq))
                continue
            on_tokens = getattr(proc, "on_tokens", None)
            if on_tokens is None:
                continue
            history = list(seq.token_ids)  # replay one token at a time, history growing
            ctx = StepContext.build([seq.slot], [history], [seq.num_prompt_tokens], self.setup.device, seqs=[seq])
            for tok in tokens:
                on_tokens(ctx, torch.tensor([tok], dtype=torch.int64, device=self.setup.device))
                history.append(tok)

    def rollback(self, seq: "Seq", n: int) -> None:
        """Undo the last ``n`` tokens ``seq``'s processors were advanced by. The caller has
        already removed them from ``seq.token_ids`` (processors without ``rollback`` are rebuilt
        from the sequence's tokens)."""
        if seq.slot is None or n <= 0:
            return
        info = self._info(seq)
        for use in seq.request.processors:
            proc = self._instances[use.name]
            rb = getattr(proc, "rollback", None)
            if rb is not None:
                try:
                    rb(seq.slot, n)
                    continue
                except NotImplementedError:
                    pass
            proc.remove(seq.slot)
            proc.add_request(seq.slot, use.params, info)

    def forced_tokens(self, seq: "Seq", limit: int) -> tuple[list[int], bool]:
        """Tokens ``seq``'s processors force next (the first processor that forces any wins),
        and whether the sequence must end now (a grammar complete with no end token)."""
        if seq.slot is None:
            return [], False
        for use in seq.request.processors:
            forced = getattr(self._instances[use.name], "forced_tokens", None)
            if forced is None:
                continue
            tokens, end = forced(seq.slot, limit)
            if tokens or end:
                return tokens, end
        return [], False

    def release(self, seq: "Seq") -> None:
        """Drop a sequence's processor state (finished, aborted or preempted)."""
        slot = seq.slot
        if slot is None:
            return
        for use in seq.request.processors:
            self._instances[use.name].remove(slot)
            self._users[(use.name, use.order)].discard(slot)
        seq.slot = None
        heapq.heappush(self._free, slot)
        self._version += 1

    @property
    def num_slots_in_use(self) -> int:
        return self._next_slot - len(self._free)

    # -- background work ----------------------------------------------------------------------
    def prefetch(self) -> None:
        """Let processors start work for the next step on a thread (called before the forward)."""
        for proc in self._instances.values():
            f = getattr(proc, "prefetch", None)
            if f is not None:
                f()

    def wait(self) -> None:
        """Wait for work started by :meth:`prefetch`."""
        for proc in self._instances.values():
            f = getattr(proc, "wait", None)
            if f is not None:
                f()

    # -- per step -----------------------------------------------------------------------------
    def _build_plan(self, seqs: list["Seq"], key: tuple[int | None, ...], device: torch.device) -> StepPlan:
        shared: dict[str, Any] = {}
        groups: list[_PlanGroup] = []
        last_rows: list[int] | None = None
        for k in self.order():
            users = self._users[k]
            if not users:
                continue
            rows = [i for i, s in enumerate(key) if s is not None and s in users]
            if not rows:
                continue
            ctx = StepContext.build(
                [key[i] for i in rows], [seqs[i].token_ids for i in rows],  # type: ignore[misc]
                [seqs[i].num_prompt_tokens for i in rows], device, shared, seqs=[seqs[i] for i in rows],
            )
            proc = self._instances[k[0]]
            step = _PlanStep(proc, ctx, getattr(proc, "on_tokens", None), getattr(proc, "models", None))
            if rows == last_rows:
                groups[-1].steps.append(step)
                continue
            rows_t = None if len(rows) == len(key) else torch.tensor(rows, dtype=torch.int64, device=device)
            groups.append(_PlanGroup(rows_t, [step]))
            last_rows = rows
        return StepPlan(key, self._version, groups, shared)

    def _plan_for(self, seqs: list["Seq"], device: torch.device) -> StepPlan:
        for seq in seqs:
            if seq.slot is None and seq.request.processors:
                self.admit(seq)
        key = tuple(seq.slot for seq in seqs)
        plan = self._plans.get(key)
        if plan is None or plan.version != self._version:
            plan = self._plans[key] = self._build_plan(seqs, key, device)
            while len(self._plans) > 4:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def apply(self, seqs: list["Seq"], logits: torch.Tensor, offsets: list[int] | None = None) -> tuple[torch.Tensor, StepPlan | None]:
        """Process ``logits`` [S, V] (row i belongs to ``seqs[i]``; ``offsets[i]`` draft tokens
        in, see :class:`StepContext`). Returns the processed logits (``logits`` itself, untouched,
        when no row uses a processor; otherwise a tensor valid until the next call) and the plan
        to hand to :meth:`on_tokens` after sampling."""
        plan = self._plan_for(seqs, logits.device)
        if not plan.groups:
            return logits, None
        plan.shared.clear()
        plan.model_logits = None
        out = self._copy(logits)  # the model's logits stay intact (the sampler's logprobs use them)
        at = None if offsets is None else {id(s): o for s, o in zip(seqs, offsets)}
        for group in plan.groups:
            sub = out if group.rows is None else out.index_select(0, group.rows)
            for step in group.steps:
                if at is not None or step.ctx.offsets is not None:
                    step.ctx.offsets = None if at is None else [at[id(s)] for s in step.ctx.seqs]
                sub = step.proc.apply(sub, step.ctx)
                if step.models is not None:
                    self._keep_source(plan, step, sub, group.rows, logits)
            if group.rows is None:
                out = sub
            else:
                out.index_copy_(0, group.rows, sub)
        return out, plan

    def _keep_source(self, plan: StepPlan, step: _PlanStep, sub: torch.Tensor, rows: torch.Tensor | None,
                     logits: torch.Tensor) -> None:
        """After a source processor: label its rows' sequences with their model and keep the
        rows' distribution (``sub``, the processor's output) in ``plan.model_logits``."""
        names = step.models(step.ctx)
        mine = [r for r, name in enumerate(names) if name is not None]
        if not mine:
            return
        for r in mine:
            step.ctx.seqs[r].model = names[r]
        if plan.model_logits is None:
            buf = self._model_buffer
            S, V = logits.shape
            if buf is None or buf.shape[0] < S or buf.shape[1] != V or buf.dtype != logits.dtype or buf.device != logits.device:
                buf = self._model_buffer = torch.empty((max(S, 2 * (buf.shape[0] if buf is not None else 0)), V),
                                                       dtype=logits.dtype, device=logits.device)
            plan.model_logits = buf[:S].copy_(logits)
        local = torch.tensor(mine, dtype=torch.int64, device=sub.device)
        dest = local if rows is None else rows.index_select(0, local)
        plan.model_logits.index_copy_(0, dest, sub.index_select(0, local))

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
