"""Decoding strategies: how a request's sequences turn the step's logits into tokens.

The engine's step is the same for every request — schedule, one forward of every model, hand
the logits to the strategies, collect outputs — and everything that differs between ways of
decoding lives behind this small protocol:

* ``claims(params) -> bool``: whether the strategy takes a request (asked in reverse
  registration order, so plugins come before the built-ins; ``sample`` takes any request);
* ``prepare(request)``: at ``add_request``, after validation; per-request state goes in
  ``request.state``; raise ``InvalidRequestError`` to refuse the request;
* ``on_ready(request, now)`` (optional): the request is about to be scheduled for the first
  time (its constraint compiled);
* ``before_schedule(seqs)`` (optional; an attribute that is None counts as absent): the
  running sequences of this strategy, before the scheduler plans the step — e.g. put draft tokens in ``seq.draft`` to have them verified;
* ``after_forward(rows, now) -> requests``: the rows whose next token is due; sample, verify,
  or search, through :class:`~framework.engine_core.EngineCore` (``core.sample``,
  ``core.append_sampled``, ``core.fork``, ``core.finish`` ...); returns the requests that made
  progress (their outputs are collected);
* ``on_preempt(seq)`` / ``on_draft_dropped(seq)`` (optional);
* ``streams``: whether partial outputs may be streamed (False when the final choice is only
  known at the end, as in beam search).

Strategies register through ``register_strategies``; the built-ins are ``sample`` (plain
sampling, ``n``/``best_of`` forking, grammar jump-forward), ``beam_search`` and
``speculative`` (draft and verify, for engines with a drafter: ``speculative.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Protocol, runtime_checkable

import torch

from framework.hookspecs import Register, hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from framework.sampling_params import SamplingParams
    from framework.sequence import Request, Sequence


@dataclass(slots=True)
class DueRows:
    """The sequences of one strategy whose next token is due, and their logits.

    Row layout: sequence ``i`` owns ``counts[i]`` consecutive rows starting at ``starts[i]``
    (1 + the number of draft tokens it had verified this step); with no drafts, row ``i`` is
    sequence ``i``.
    """

    seqs: list["Sequence"]
    logits: torch.Tensor  # [N, V] float32, the main model's
    counts: list[int]
    starts: list[int]

    @classmethod
    def single(cls, seqs: list["Sequence"], logits: torch.Tensor) -> "DueRows":
        return cls(seqs, logits, [1] * len(seqs), list(range(len(seqs))))

    @property
    def one_row_each(self) -> bool:
        return len(self.seqs) == self.logits.shape[0]


@runtime_checkable
class DecodingStrategy(Protocol):
    """See the module docstring."""

    name: str
    streams: bool

    def claims(self, params: "SamplingParams") -> bool: ...

    def prepare(self, request: "Request") -> None: ...

    def after_forward(self, rows: DueRows, now: float) -> Iterable["Request"]: ...


@hookimpl
def register_strategies(register: Register) -> None:
    from framework.strategies.beam import BeamSearchStrategy
    from framework.strategies.sample import SampleStrategy
    from framework.strategies.speculative import SpeculativeStrategy

    register("sample", SampleStrategy)
    register("beam_search", BeamSearchStrategy)
    register("speculative", SpeculativeStrategy)  # takes requests only when the engine has a drafter


__all__ = ["DecodingStrategy", "DueRows"]
