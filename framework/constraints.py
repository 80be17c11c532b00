"""Constrained decoding in the engine: the ``constraint`` logits processor and request handles.

A request selects at most one registered constraint (``register_constraints``) through
:class:`~framework.sampling_params.SamplingParams` (``json_schema=``, ``regex=``, ``grammar=``,
``choice=`` or generically ``constraint={name: params}``). The engine drives it like this:

* **Admission** (``LLMEngine.add_request``): :meth:`ConstraintProcessor.prepare` validates the
  parameters (cheap checks only: pydantic params, the JSON Schema meta-schema, regex syntax —
  errors name the JSON pointer or rule) and *submits* the compilation to a background thread.
  Nothing of the engine has changed yet, so a bad constraint is an ``InvalidRequestError``.
* **Waiting for the grammar**: the request's sequence is held outside the scheduler until its
  :class:`ConstraintHandle` is done, so other requests keep running. A compilation that fails or
  passes its time limit finishes just that request, with finish reason ``"error"`` and the
  message in ``RequestOutput.error``; it never held KV blocks.
* **Each step**: this processor runs at :attr:`Stage.CONSTRAINT` (after penalties, bans and
  guidance, before temperature and truncation): it writes each constrained row's allowed-token
  bitmask and masks the logits in one op. After sampling, ``on_tokens`` advances every state.
* **Jump-forward**: when the grammar allows exactly one token, :meth:`ConstraintProcessor.forced_tokens`
  reports it (and the forced tokens after it); the sampling strategy appends them without a
  forward pass to choose them (every processor learns them through ``extend``), and they are
  computed later as a multi-token chunk (``framework/strategies/sample.py``).
* **Forks, rollback and preemption**: ``n > 1`` siblings and beams get a copy of the parent's
  state (``fork``); ``rollback(slot, n)`` undoes tokens (speculative decoding); a sequence that
  is preempted is re-added from its tokens, which replays them through a fresh state.

Third-party constraints only need the protocol in ``framework/hookspecs.py``: a factory
``factory(tokenizer, **params)`` returning an object with ``new_state()``; states with
``fill_bitmask(bitmask, row)``, ``advance(token) -> bool``, ``forced_tokens()``,
``is_accepting()`` and ``rollback(n)``. A factory may also offer
``factory.submit(tokenizer, params) -> concurrent.futures.Future`` (validate now, compile in the
background, as the built-ins do); otherwise the engine runs the factory on its own thread.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from framework.bitmask import apply_token_bitmask_
from framework.errors import ConstraintError, ConstraintTimeoutError
from framework.hookspecs import Register, hookimpl
from framework.processors import ProcessorSetup, RequestInfo, Stage, StepContext
from framework.sampling_params import SamplingParams

__all__ = [
    "ConstraintHandle", "ConstraintProcessor", "PROCESSOR_NAME", "DEFAULT_TIMEOUT_S", "bitmask_apply",
    "constraint_handle", "wait_for_constraints",
]  # fmt: skip

PROCESSOR_NAME = "constraint"
"""Name the constraint processor is registered under (``register_logits_processors``)."""

BUDGET_LOOKAHEAD = 16
"""In a request's last this many tokens (``max_tokens``), the constraint mask drops the tokens
after which the grammar cannot be completed in time, where that is cheap to prove (the state's
``mask_within``): a budget that fits ``"alpha"`` is not spent on ``"al`` ``p`` ``h``."""

DEFAULT_TIMEOUT_S = 30.0
"""Time limit of a compilation whose factory does not set its own (``factory.timeout_s``)."""

_POOLS: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _pool(name: str = "constraint-ext") -> concurrent.futures.ThreadPoolExecutor:
    """A one-thread executor per use: ``constraint-ext`` compiles third-party constraints
    whose factory has no ``submit``; ``mask`` prefetches masks during the forward."""
    with _POOL_LOCK:
        pool = _POOLS.get(name)
        if pool is None:
            pool = _POOLS[name] = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"decodekit-{name}")
        return pool


@dataclass(eq=False)
class ConstraintHandle:
    """One request's constraint: what was asked for and the compilation in flight.

    ``future`` resolves to the compiled constraint (an object with ``new_state()``).
    ``deadline`` (``time.monotonic()``) is when the engine gives up waiting even if the compiler
    never reports back.
    """

    name: str
    params: Any
    future: "concurrent.futures.Future[Any]"
    deadline: float
    submitted: float = field(default_factory=time.monotonic)

    def done(self, now: float | None = None) -> bool:
        """The compilation finished (either way) or its deadline passed."""
        return self.future.done() or (now if now is not None else time.monotonic()) > self.deadline

    def error(self) -> str | None:
        """Why the compilation failed (None: it succeeded or is still running and in time)."""
        if not self.future.done():
            if time.monotonic() > self.deadline:
                return f"{self.name}: compilation did not finish within {self.deadline - self.submitted:.3g} s"
            return None
        exc = self.future.exception()
        if exc is None:
            return None
        if isinstance(exc, ConstraintError):
            return str(exc)
        return f"{self.name}: compilation failed: {type(exc).__name__}: {exc}"

    @property
    def compiled(self) -> Any:
        """The compiled constraint (the future must be done and successful)."""
        return self.future.result(timeout=0)


def constraint_handle(request: Any) -> ConstraintHandle | None:
    """The :class:`ConstraintHandle` of an accepted request (a ``framework.sequence.Request``),
    or None when it has no constraint."""
    for use in getattr(request, "processors", ()):
        if use.name == PROCESSOR_NAME and isinstance(use.params, ConstraintHandle):
            return use.params
    return None


def wait_for_constraints(requests: Iterable[Any]) -> None:
    """Wait until the constraints of ``requests`` (accepted by ``LLMEngine.add_request``) are
    compiled; raise :class:`~framework.errors.InvalidRequestError` with the compiler's message
    (the rule, terminal or JSON pointer at fault) for the first that failed or ran past its time
    limit. The offline API calls this before stepping, so every constraint error reaches the
    caller the same way, whether the cheap checks at admission or the compilation found it."""
    from framework.errors import InvalidRequestError

    for req in requests:
        handle = constraint_handle(req)
        if handle is None:
            continue
        remaining = handle.deadline - time.monotonic()
        if remaining > 0:
            concurrent.futures.wait([handle.future], timeout=remaining)
        err = handle.error() if handle.done() else f"{handle.name}: compilation did not finish in time"
        if err is not None:
            raise InvalidRequestError(f"constraint: {err}")


def _run_all(fns: list) -> None:
    for f in fns:
        f()


def spec_of(params: SamplingParams) -> tuple[str, Any] | None:
    """``(registered constraint name, raw params)`` a request asks for, or None."""
    getter = getattr(params, "constraint_spec", None)
    return getter() if getter is not None else None


def bitmask_apply(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Mask ``logits`` [R, V] in place with the int32 ``bitmask`` [R, W] (bit ``t % 32`` of word
    ``t // 32`` set: token ``t`` allowed; ids past ``32 W`` are disallowed)."""
    return apply_token_bitmask_(logits, bitmask)


class ConstraintProcessor:
    """The ``constraint`` logits processor: one grammar state per slot, masks per step.

    Built once per engine (``factory(setup)``); the engine calls :meth:`bind` with its plugin
    manager so constraint names resolve against the engine's registry.
    """

    stage = Stage.CONSTRAINT

    def __init__(self, setup: ProcessorSetup):
        self.setup = setup
        self.pm: Any = None
        self.states: dict[int, Any] = {}
        self._max_tokens: dict[int, int] = {}  # slot -> the request's max_tokens (budget-aware ends)
        self._bitmask: torch.Tensor | None = None
        self._pending: concurrent.futures.Future | None = None  # masks being prefetched
        self.prefetch_enabled = False  # engine.constraint_prefetch: masks on a worker thread during the forward
        # on an accelerator the forward runs asynchronously: a mask not known yet is left to be
        # computed while the next forward runs (jump-forward then only follows masks already known)
        self.overlap = setup.device.type != "cpu"

    # -- prefetching (masks computed while the forward runs) --------------------------------
    def prefetch(self) -> None:
        """Start computing the next mask of every state on a worker thread and return at once
        (the engine calls it just before the model's forward; states without ``prefetch()``
        are skipped). Every other method first waits for it, so states are never used from
        two threads at a time."""
        if self._pending is not None or not self.states or not self.prefetch_enabled:
            return
        warm = [f for f in (getattr(st, "prefetch", None) for st in self.states.values()) if f is not None]
        if warm:
            self._pending = _pool("mask").submit(_run_all, warm)

    def wait(self) -> None:
        """Wait for the prefetch in flight, if any."""
        fut, self._pending = self._pending, None
        if fut is not None:
            fut.result()

    def bind(self, pm: Any) -> None:
        """Resolve constraint names in ``pm``'s ``constraint`` registry."""
        self.pm = pm

    # -- per request ------------------------------------------------------------------------
    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> tuple[str, Any] | None:
        return spec_of(params)

    def prepare(self, spec: Any, sampling: SamplingParams) -> ConstraintHandle:
        """Validate the constraint (cheap checks) and submit its compilation.

        Raises:
            ValueError (ConstraintError): unknown name, bad params, a schema that fails its
                meta-schema (naming the JSON pointer), no tokenizer.
        """
        if isinstance(spec, dict):  # named explicitly in ``processors``: {constraint: {name: params}}
            if len(spec) != 1:
                raise ValueError("give one constraint as {name: params}")
            (spec,) = spec.items()
        name, raw = spec
        tok = self.setup.tokenizer
        if tok is None:
            raise ValueError("constrained decoding needs the tokenizer (the engine was started with skip_tokenizer_init)")
        if sampling.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with a constraint (the grammar decides where the output ends)")
        pm = self.pm
        if pm is None:
            from framework.plugins import get_plugin_manager

            pm = get_plugin_manager()
        registry = pm.registry("constraint")
        if name not in registry:
            from framework.plugins import unknown_name_message

            raise ValueError(unknown_name_message("constraint", name, registry.names()))
        reg = registry.get(name)
        submit = getattr(reg.factory, "submit", None)
        timeout = float(getattr(reg.factory, "timeout_s", DEFAULT_TIMEOUT_S))
        if submit is not None:
            fut = submit(tok, raw)
        else:
            options = self._validate(name, reg.params, raw)
            fut = _pool().submit(reg.factory, tok, **options)
        # the compiler enforces its own limit; this one only guards against a compiler that hangs
        return ConstraintHandle(name, raw, fut, time.monotonic() + timeout + 5.0)

    @staticmethod
    def _validate(name: str, model: Any, raw: Any) -> dict[str, Any]:
        from framework.plugins import validate_plugin_options

        validated = validate_plugin_options(name, model, raw)  # PluginOptionsError is a ValueError
        return validated if model is None else validated.model_dump(by_alias=True)

    # -- per sequence -----------------------------------------------------------------------
    def add_request(self, slot: int, handle: ConstraintHandle, request: RequestInfo) -> None:
        """A fresh state for ``slot``, advanced through the tokens generated so far (a resumed
        or rebuilt sequence continues exactly where it was)."""
        self.wait()
        state = handle.compiled.new_state()
        outputs = request.token_ids[request.num_prompt_tokens :]
        for k, tok in enumerate(outputs):
            if not state.advance(int(tok)):
                raise ConstraintError(f"{handle.name}: replaying output token {k} (id {tok}) was refused by the grammar")
        self.states[slot] = state
        self._max_tokens[slot] = int(getattr(request.sampling, "max_tokens", 0) or 0)

    def remove(self, slot: int) -> None:
        self.wait()
        self.states.pop(slot, None)
        self._max_tokens.pop(slot, None)

    def fork(self, src: int, dst: int) -> None:
        self.wait()
        state = self.states[src]
        copy = getattr(state, "copy", None)
        if copy is None:  # the chain then rebuilds the fork from its tokens
            raise NotImplementedError("constraint state has no copy()")
        self.states[dst] = copy()
        if src in self._max_tokens:
            self._max_tokens[dst] = self._max_tokens[src]

    def extend(self, slot: int, tokens: list[int], request: RequestInfo) -> None:
        """Advance through tokens appended without sampling (forced, accepted drafts)."""
        self.wait()
        state = self.states.get(slot)
        if state is None:
            return
        for k, tok in enumerate(tokens):
            if not state.advance(int(tok)):
                raise ConstraintError(f"constraint refused appended token {k} (id {tok})")

    def rollback(self, slot: int, n: int) -> None:
        """Undo the last ``n`` tokens of ``slot``'s state."""
        self.wait()
        state = self.states.get(slot)
        if state is not None:
            state.rollback(n)

    def forced_tokens(self, slot: int, limit: int) -> tuple[list[int], bool]:
        """Tokens the grammar alone allows next from ``slot``'s state (not advanced), and whether
        the output must end now: the grammar is complete and allows nothing, not even an end
        token (a tokenizer without EOS)."""
        self.wait()
        state = self.states.get(slot)
        if state is None:
            return [], False
        if self.overlap:
            peek = getattr(state, "peek_allowed_mask", None)
            if peek is not None and peek() is None:
                return [], False
        allowed = getattr(state, "allowed_mask", None)
        if allowed is not None and allowed() == 0:
            return [], True
        return state.forced_tokens(limit), False

    def state(self, slot: int | None) -> Any | None:
        """The state of ``slot`` (None when the slot has no constraint)."""
        self.wait()
        return None if slot is None else self.states.get(slot)

    # -- per step ---------------------------------------------------------------------------
    def _buffer(self, rows: int, words: int) -> torch.Tensor:
        bm = self._bitmask
        if bm is None or bm.shape[0] < rows or bm.shape[1] != words:
            bm = self._bitmask = torch.empty((max(rows, 8, 2 * (bm.shape[0] if bm is not None else 0)), words), dtype=torch.int32)
        return bm[:rows]

    def fill(self, slots: Iterable[int], bitmask: torch.Tensor) -> None:
        """Write the allowed tokens of each slot's state into consecutive rows of ``bitmask``."""
        self.wait()
        states = self.states
        for i, slot in enumerate(slots):
            states[slot].fill_bitmask(bitmask, i)

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        words = (self.setup.tokenizer.vocab_size + 31) // 32 if self.setup.tokenizer is not None else (logits.shape[1] + 31) // 32
        bm = self._buffer(len(ctx), words)
        self.fill(ctx.slots, bm)
        self._fit_budgets(ctx, bm, words)
        # rows the earlier stages left with nothing allowed (say min_tokens banned EOS where the
        # grammar allows only EOS): the grammar wins, uniformly over what it allows
        bitmask_apply(logits, bm)
        dead = torch.isneginf(logits.amax(dim=1))
        if bool(dead.any()):
            rows = torch.nonzero(dead).flatten()
            sub = torch.zeros((len(rows), logits.shape[1]), dtype=logits.dtype, device=logits.device)
            bitmask_apply(sub, bm.index_select(0, rows.cpu()))
            logits.index_copy_(0, rows, sub)
        return logits

    def _fit_budgets(self, ctx: StepContext, bm: torch.Tensor, words: int) -> None:
        """Rows in their last :data:`BUDGET_LOOKAHEAD` tokens: the state's ``mask_within``
        (tokens that can still complete the grammar in time), where it is known."""
        import numpy as np

        for i, slot in enumerate(ctx.slots):
            left = self._max_tokens.get(slot, 0) - ctx.num_output_tokens(i)
            if not 0 < left <= BUDGET_LOOKAHEAD:
                continue
            within = getattr(self.states[slot], "mask_within", None)
            m = within(left) if within is not None else None
            if m is not None:
                row = np.frombuffer(m.to_bytes(bm.shape[1] * 4, "little"), dtype=np.int32)
                bm[i] = torch.from_numpy(row.copy())

    def on_tokens(self, ctx: StepContext, tokens: torch.Tensor) -> None:
        self.wait()
        states = self.states
        for slot, tok in zip(ctx.slots, tokens.tolist()):
            state = states.get(slot)
            if state is not None:  # None: the sequence finished (and was released) on this token
                state.advance(int(tok))


@hookimpl
def register_logits_processors(register: Register) -> None:
    """The core's ``constraint`` processor, which applies any registered constraint's masks;
    requests select it through their constraint fields."""
    register(PROCESSOR_NAME, ConstraintProcessor)
