"""The ``prompt_lookup`` drafter: n-gram matching in the prompt and the output, no model.

For each sequence the last ``n`` tokens (``n`` from ``max_ngram`` down to ``min_ngram``) are
looked up earlier in its tokens (prompt + output); at the most recent earlier occurrence, the
tokens that followed it are the draft (Saxena 2023, "prompt lookup decoding"; vLLM's ``ngram``
speculator). Each sequence keeps an index (:class:`NgramIndex`: n-gram -> where its latest
occurrence ends) that grows with the tokens, so a proposal costs O(max_ngram) dict look-ups plus
the indexing of the tokens added since the last one — not a rescan of the whole sequence. The draft is a point mass (``DraftProposal.probs`` is None): exact speculative
sampling accepts a token ``x`` with probability ``p(x)``. It pays off on input-grounded work —
records re-emitted with edits, code continued from the prompt, quotations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from framework.drafting import DraftProposal

if TYPE_CHECKING:  # pragma: no cover
    from framework.sequence import Sequence


def lookup(tokens: np.ndarray, num_tokens: int, min_ngram: int, max_ngram: int) -> list[int]:
    """Up to ``num_tokens`` tokens following the most recent earlier occurrence of the longest
    suffix n-gram of ``tokens`` (``min_ngram <= n <= max_ngram``); ``[]`` when none recurs."""
    L = len(tokens)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        pattern = tokens[L - n :]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: L - 1], n)  # starts 0 .. L-1-n
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + num_tokens].tolist()
    return []


class NgramIndex:
    """Where the latest occurrence of every n-gram (``lo <= n <= hi``) of a growing token list
    ends; :meth:`propose` gives what :func:`lookup` gives, in amortised O(1) per new token."""

    __slots__ = ("lo", "hi", "maps", "done")

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.maps: list[dict[tuple[int, ...], int]] = [{} for _ in range(hi + 1)]  # by n
        self.done = 0  # occurrences ending at positions <= done are indexed

    def propose(self, tokens: list[int], num_tokens: int) -> list[int]:
        L = len(tokens)
        if L <= self.done:  # the list shrank (not seen in practice): start over
            self.maps, self.done = [{} for _ in range(self.hi + 1)], 0
        maps, lo, hi = self.maps, self.lo, self.hi
        for e in range(self.done + 1, L):  # occurrences inside tokens[:L-1], ending at e
            for n in range(lo, min(hi, e) + 1):
                maps[n][tuple(tokens[e - n : e])] = e
        self.done = max(self.done, L - 1)
        for n in range(min(hi, L - 1), lo - 1, -1):
            e = maps[n].get(tuple(tokens[L - n :]))
            if e is not None:
                return list(tokens[e : e + num_tokens])
        return []


class PromptLookupDrafter:
    """Drafts by n-gram lookup in the sequence's own tokens."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        num_tokens: int = Field(4, ge=1, le=64, description="draft tokens per step (the start value when adaptive)")
        max_ngram: int = Field(3, ge=1, le=32, description="longest suffix n-gram looked up")
        min_ngram: int = Field(1, ge=1, le=32, description="shortest suffix n-gram looked up")
        adaptive: bool = Field(False, description="grow num_tokens by one when a draft is accepted whole, shrink by one otherwise")
        max_num_tokens: int = Field(8, ge=1, le=64, description="upper bound of the adaptive num_tokens")

        @model_validator(mode="after")
        def _order(self) -> "PromptLookupDrafter.Params":
            if self.min_ngram > self.max_ngram:
                raise ValueError(f"min_ngram ({self.min_ngram}) must not exceed max_ngram ({self.max_ngram})")
            return self

    def __init__(self, setup: Any, params: "PromptLookupDrafter.Params | None" = None):
        params = params or self.Params()
        self.params = params
        self.num_tokens = params.num_tokens
        self.adaptive = params.adaptive
        self.max_num_tokens = max(params.max_num_tokens, params.num_tokens)
        self._index: dict[int, NgramIndex] = {}  # seq_id -> its n-gram index

    def propose(self, seqs: list["Sequence"], num_tokens: list[int]) -> list[DraftProposal]:
        p = self.params
        if len(self._index) > 2 * len(seqs) + 256:  # sequences that left unannounced (aborts): drop
            live = {s.seq_id for s in seqs}
            self._index = {i: x for i, x in self._index.items() if i in live}
        out = []
        for seq, k in zip(seqs, num_tokens):
            idx = self._index.get(seq.seq_id)
            if idx is None:
                idx = self._index[seq.seq_id] = NgramIndex(p.min_ngram, p.max_ngram)
            out.append(DraftProposal(idx.propose(seq.token_ids, k)))
        return out

    def accepted(self, seq: "Sequence", num_accepted: int) -> None:
        """Nothing to undo: the index only ever covers the sequence's own (kept) tokens."""

    def release(self, seq: "Sequence") -> None:
        """The sequence left: forget its index."""
        self._index.pop(seq.seq_id, None)
