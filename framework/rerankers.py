"""The request-finish stage: a reranker chooses among a request's finished candidates.

A request that samples several candidates (``n``, ``best_of``) may name a reranker
(``SamplingParams(reranker={"mbr": {...}})``, a spec's ``reranker:`` section, the server's
``reranker`` field). It is resolved when the request is added (a bad option is an
``InvalidRequestError`` then) and called once all candidates are finished, in place of
returning them in sampling order. ``best_of > n`` without a reranker uses the built-in
``logprob`` reranker (highest cumulative log-probability first, as vLLM does).

A reranker is built once per engine by its registered factory, ``factory(setup)`` (``setup``:
:class:`~framework.processors.ProcessorSetup`, with ``setup.models`` for companion models such as
a reward model), and implements::

    select(request: RerankRequest) -> list[ScoredCandidate]              # best first
    select_many(requests: list[RerankRequest]) -> list[list[ScoredCandidate]]   # optional, batched

``select_many`` (when present) receives every request that finished in the same engine step,
so a reranker can score all their candidates in one companion forward. The first ``n`` returned
candidates become the request's outputs, in that order, each carrying its ``score``; the
request's output also lists every ranked candidate (``RequestOutput.candidates``, best first,
with scores; ``decodekit run --all-candidates`` writes them). Streaming
of partial text is off for such requests (the choice is only known at the end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

from framework.outputs import CompletionOutput


@dataclass(frozen=True, slots=True)
class RerankRequest:
    """What a reranker sees of one finished request."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: Any  # framework.sampling_params.SamplingParams
    options: Any  # the reranker's validated per-request options
    candidates: list[CompletionOutput]  # every finished candidate, in sampling order (index = position)

    @property
    def n(self) -> int:
        """How many outputs the request returns."""
        return self.params.n


@dataclass(frozen=True, slots=True)
class ScoredCandidate:
    """A candidate (its index in ``RerankRequest.candidates``) and the reranker's score."""

    index: int
    score: float


@runtime_checkable
class Reranker(Protocol):
    """See the module docstring."""

    def select(self, request: RerankRequest) -> list[ScoredCandidate]: ...


@dataclass(frozen=True, slots=True)
class RerankerUse:
    """A request's resolved reranker: its name, options and the engine's instance."""

    name: str
    options: Any
    instance: Any


def rerank_many(requests: Sequence[tuple[RerankerUse, RerankRequest]]) -> list[list[ScoredCandidate]]:
    """Run each reranker once over all of its requests (``select_many`` when it has one)."""
    results: list[list[ScoredCandidate] | None] = [None] * len(requests)
    groups: dict[int, list[int]] = {}
    for i, (use, _) in enumerate(requests):
        groups.setdefault(id(use.instance), []).append(i)
    for idx in groups.values():
        inst = requests[idx[0]][0].instance
        batch = [requests[i][1] for i in idx]
        many = getattr(inst, "select_many", None)
        outs = many(batch) if many is not None else [inst.select(r) for r in batch]
        for i, out in zip(idx, outs):
            results[i] = _checked(out, requests[i][1], requests[i][0].name)
    return [r for r in results if r is not None]


def _checked(out: list[ScoredCandidate], req: RerankRequest, name: str) -> list[ScoredCandidate]:
    seen = set()
    for c in out:
        if not 0 <= c.index < len(req.candidates) or c.index in seen:
            raise RuntimeError(f"reranker {name!r} returned an invalid or repeated candidate index {c.index}")
        seen.add(c.index)
    if len(out) < min(req.n, len(req.candidates)):
        raise RuntimeError(f"reranker {name!r} returned {len(out)} candidates; the request needs {req.n}")
    return out


def rerank_finished(reqs: list) -> None:
    """Run the finished requests' rerankers (batched per reranker); keep the best ``n``."""
    if not reqs:
        return
    work = []
    for req in reqs:
        seqs = sorted(req.seqs, key=lambda s: s.index)
        req.seqs = seqs
        work.append((req.reranker, RerankRequest(req.request_id, req.prompt, req.prompt_token_ids, req.params,
                                                 req.reranker.options, [s.to_output() for s in seqs])))
    for req, order in zip(reqs, rerank_many(work)):
        chosen, ranked = [], []
        for k, sc in enumerate(order):
            seq = req.seqs[sc.index]
            seq.index, seq.score = k, sc.score
            ranked.append(seq.to_output())
            if k < req.params.n:
                chosen.append(seq)
        req.seqs = chosen
        req.candidates = ranked


__all__ = ["Reranker", "RerankRequest", "RerankerUse", "ScoredCandidate", "rerank_finished", "rerank_many"]
