"""The drafter protocol: proposals for speculative decoding.

A drafter guesses the next few tokens of many sequences at once; the target model then verifies
every guess in one forward (``Sequence.draft`` tokens are scheduled with the sequence and their
logits come back as extra rows, see :class:`~framework.strategies.DueRows`). For exact
speculative sampling (Leviathan et al. 2023; Chen et al. 2023) the verifier needs the draft
distribution ``q`` each token was drawn from, so a proposal carries it — or ``None`` for a
point-mass drafter (n-gram prompt lookup), whose tokens are accepted with probability ``p(x)``.

A drafter is built once per engine (``factory(setup, params)``: ``setup`` is
:class:`~framework.processors.ProcessorSetup`, whose ``models.get(ref, lockstep=False)`` gives a
*driven* companion — a draft model with its own paged KV that the drafter advances with
``Companion.extend`` and cuts back with ``Companion.truncate``)::

    proposals = drafter.propose(seqs, num_tokens)     # one DraftProposal per sequence
    drafter.accepted(seq, num_accepted)               # after verification (rollback past it)
    drafter.release(seq)                              # optional: the sequence left

Drafters register through ``register_drafters``; a spec's ``drafter:`` section (or
``LLM(..., drafter={...})``) picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from framework.sequence import Sequence


@dataclass(slots=True)
class DraftProposal:
    """Draft tokens for one sequence and the distributions they were drawn from.

    ``probs[i]`` is the drafter's (processed) next-token distribution ``q`` at draft position
    ``i`` (``[len(tokens), V]`` float32), or None for a deterministic drafter.
    """

    tokens: list[int]
    probs: torch.Tensor | None = None


@runtime_checkable
class Drafter(Protocol):
    """See the module docstring."""

    def propose(self, seqs: list["Sequence"], num_tokens: list[int]) -> list[DraftProposal]:
        """Up to ``num_tokens[i]`` draft tokens continuing each sequence (fewer, or none, is fine)."""
        ...

    def accepted(self, seq: "Sequence", num_accepted: int) -> None:
        """The target accepted the first ``num_accepted`` tokens of ``seq``'s last proposal."""
        ...


__all__ = ["DraftProposal", "Drafter"]
