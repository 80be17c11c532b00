"""Batch-level logits processors: the protocol a processor implements and what it is handed.

A logits processor is built once per engine and serves every request that uses it. Each running
sequence that uses at least one processor holds a *slot* (a small integer, reused after the
sequence leaves); processors keep their per-sequence state in tensors indexed by slot, so one
tensor op per step serves all of their rows, however the batch changes around them::

    proc = factory(setup)                         # once per engine, on first use
    params = proc.prepare(params, sampling)       # optional: per-request checks (tokenize, vocab)
    models = proc.companions(params)              # optional: companion models the request needs
    proc.add_request(slot, params, request)       # the sequence starts running (or resumes)
    logits = proc.apply(logits, ctx)              # every step: only this processor's rows
    proc.on_tokens(ctx, tokens)                   # optional: the tokens just sampled
    proc.extend(slot, tokens, request)            # optional: tokens appended without sampling
    proc.rollback(slot, n)                        # optional: forget the last n tokens
    proc.fork(src_slot, dst_slot)                 # optional: copy state to a forked sequence
    proc.remove(slot)                             # finished, aborted or preempted

The engine's :class:`~framework.processor_chain.ProcessorChain` does the bookkeeping: it
resolves a request's processors when the request is added (a bad parameter is an
:class:`InvalidRequestError` before any engine state changes), gives sequences slots, hands each
processor exactly the rows that use it, and releases slots when a sequence finishes, is aborted
or is preempted (a preempted sequence is re-added from its tokens when it resumes, so it
continues exactly as before). Optional methods have exact fallbacks: without ``extend`` the chain
replays the tokens through ``on_tokens`` one at a time; without ``rollback`` or ``fork`` it
rebuilds the slot from the sequence's tokens with ``add_request``.

Processors run in a fixed order so that a request's output never depends on the batch it
shares: by :class:`Stage`; within ``GUIDANCE``, in the order the request lists them in
``SamplingParams.processors`` (so guidance can be composed explicitly); otherwise by
registration order. The built-ins follow Hugging Face transformers' order (see
``plugins/samplers/__init__.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

import torch

from framework.sampling_params import SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from framework.companions import Companion, ModelCatalog, ModelSet
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
    # companion models by alias, registered name or directory: ``models.get("demo-sentiment")``
    # (framework/companions.py); None outside an engine
    models: "ModelSet | None" = None
    # offline (``decodekit validate``): companion models described from their config.json only,
    # ``catalog.get(ref)`` -> a Companion that has name, kind, config, labels, scorer_kind and
    # label_index but cannot run; None in an engine (use ``models``)
    catalog: "ModelCatalog | None" = None


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

    ``seqs`` are the engine's sequences behind the rows (what companion models need to find a
    row's KV: pass the context to :class:`~framework.companions.Companion` methods rather than
    reading them). ``offsets`` is set when one step processes several positions of a sequence
    (draft tokens being verified): row ``r`` holds the logits after ``offsets[r]`` draft tokens,
    which ``token_ids[r]`` then includes. None: every row is at its sequence's next token.
    """

    slots: list[int]  # [R] slot of each row
    slot_index: torch.Tensor  # [R] int64 on the logits device
    token_ids: list[Sequence[int]]  # [R] prompt + output so far (read-only; not yet the new token)
    num_prompt_tokens: list[int]  # [R]
    cache: dict[Any, Any] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    seqs: list[Any] = field(default_factory=list)  # [R] framework.sequence.Sequence
    offsets: list[int] | None = None

    @classmethod
    def build(cls, slots: list[int], token_ids: list[Sequence[int]], num_prompt_tokens: list[int],
              device: torch.device | str = "cpu", shared: dict[str, Any] | None = None,
              seqs: list[Any] | None = None) -> "StepContext":
        return cls(slots, torch.tensor(slots, dtype=torch.int64, device=device), token_ids, num_prompt_tokens,
                   shared={} if shared is None else shared, seqs=list(seqs or []))

    def __len__(self) -> int:
        return len(self.slots)

    def num_output_tokens(self, row: int) -> int:
        return len(self.token_ids[row]) - self.num_prompt_tokens[row]


@runtime_checkable
class LogitsProcessor(Protocol):
    """A batch-level logits processor (see the module docstring for the life cycle).

    ``apply`` gets only the rows of sequences that use this processor, as a tensor it may modify
    in place, and returns the processed logits (the same tensor or a new one of the same shape).

    Optional methods:

    * ``prepare(params, sampling) -> params``: per-request validation needing the model, the
      tokenizer or a companion; raise ``ValueError`` with a clear message;
    * ``companions(params) -> Sequence[Companion]``: companion models (``setup.models.get(...)``)
      that must run in lockstep for this request, with their own KV cache;
    * ``on_tokens(ctx, tokens [R])``: the tokens just sampled for the rows of ``ctx``
      (``ctx.token_ids`` do not include them yet);
    * ``extend(slot, tokens, request)``: tokens appended without sampling (forced by a grammar,
      accepted drafts); ``request.token_ids`` is the history before them;
    * ``rollback(slot, n)``: forget the last ``n`` tokens this slot was advanced by;
    * ``fork(src_slot, dst_slot)``: copy state to a forked sequence (``n > 1``, beams);
    * ``forced_tokens(slot, limit) -> (tokens, end)``: tokens the processor alone allows next
      (appended without a forward pass choosing them), and whether the sequence must end now;
    * ``prefetch()`` / ``wait()``: start work for the next step on another thread / wait for it;
    * ``models(ctx) -> list[str | None]``: a *source* processor, which replaces a row's logits by
      another model's (output ensembling), names per row the model it drew the row from (None:
      untouched). The chain then takes those rows' logprobs from the processor's output instead
      of the main model's logits and labels the sequences (``CompletionOutput.model``); give such
      a processor a stage before every other (the ``ensemble`` processor's is 50);
    * a ``stage`` attribute placing the processor in the chain (default ``Stage.GUIDANCE``).
    """

    def add_request(self, slot: int, params: Any, request: RequestInfo) -> None: ...

    def remove(self, slot: int) -> None: ...

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor: ...


@dataclass(frozen=True, slots=True)
class ProcessorUse:
    """One processor a request uses, with its validated per-request parameters.

    ``order`` is the processor's position among the request's explicitly listed ``GUIDANCE``
    processors (0 for every other processor): it orders guidance per request."""

    name: str
    params: Any
    order: int = 0


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


from framework.processor_chain import ProcessorChain, StepPlan  # noqa: E402  (re-exported)
