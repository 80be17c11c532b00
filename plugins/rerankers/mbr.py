"""The ``mbr`` reranker: minimum Bayes risk decoding over a request's samples.

The chosen output is ``y* = argmax_h sum_r w_r u(h, r)`` over hypotheses ``h`` and
pseudo-references ``r`` drawn from the model, for a utility ``u`` (``utility:``, a registered
``utility`` plugin: ``chrf``, ``bleu``, ``ter``, ``exact_match``). Weights ``w_r`` are uniform
(``weights: uniform``, a Monte-Carlo estimate of the expected utility) or proportional to each
reference's sequence probability (``weights: logprob``, ``exp(cumulative_logprob)``
normalised over the references). Every candidate's score is its expected utility
``sum_r w_r u(h, r)`` (weights summing to 1).

Methods:

* ``exact``: the ``H x R`` utility matrix, ``O(H R)`` utility calls.
* ``aggregate``: one aggregated reference — the weighted mean of the references' features
  (expected n-gram counts and length) — and ``u(h, aggregate)`` per hypothesis: ``O(H + R)``
  (DeNero et al. 2009; Vamvas & Sennrich 2024). Not the same number as ``exact`` (chrF and BLEU
  are not linear in the counts), but usually the same choice; needs a utility with
  ``features`` / ``aggregate`` / ``score_aggregate``.
* ``pruning``: confidence-based pruning (Cheng & Vlachos 2023). References are visited in a
  seeded random order; at each size of a growing schedule (``schedule``, default 8, 16, 32, ...)
  the surviving hypotheses' utilities against the references seen so far are bootstrapped
  (``bootstrap`` resamples) and a hypothesis that is at least as good as the current leader
  in fewer than ``1 - alpha`` of the resamples is pruned. Survivors are ranked by their
  expected utility over every reference they were scored against (all of them if they
  survive to the end); pruned ones follow, by the estimate they were pruned with.

References:

* ``references: candidates`` (default): the candidates are their own references (a candidate
  is a reference for itself too, as in ``mbrs``).
* ``references: K`` (an integer): the **last** ``K`` of the request's samples are references
  only and the first ``num_samples - K`` are the hypotheses — sample ``best_of = H + K``.

The returned order is every hypothesis, best first; ties keep sampling order.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from framework.rerankers import RerankRequest, ScoredCandidate
from plugins.rerankers.utilities import pairwise, supports_aggregate


class MBRReranker:
    """Minimum Bayes risk selection (see the module docstring)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        utility: str = Field("chrf", description="a registered utility: chrf, bleu, ter, exact_match or a plugin's")
        utility_options: dict[str, Any] = Field(default_factory=dict, description="options of the utility "
                                                "(e.g. chrf: {word_order: 2})")
        method: Literal["exact", "aggregate", "pruning"] = Field("exact", description="exact O(N^2), aggregate "
                                                                 "(linear time), pruning (confidence-based)")
        references: Literal["candidates"] | int = Field("candidates", description="'candidates', or K: the last K "
                                                        "samples are references only")
        weights: Literal["uniform", "logprob"] = Field("uniform", description="reference weights: uniform or "
                                                       "proportional to exp(cumulative_logprob)")
        schedule: list[int] = Field([8, 16, 32, 64, 128, 256], description="pruning: reference-set sizes")
        alpha: float = Field(0.99, gt=0.0, lt=1.0, description="pruning: keep a hypothesis that ties or beats the "
                             "leader in at least 1 - alpha of the bootstrap resamples")
        bootstrap: int = Field(200, ge=1, le=10000, description="pruning: bootstrap resamples per step")
        seed: int = Field(0, description="pruning: seed of the reference order and the bootstrap")

        @field_validator("references")
        @classmethod
        def _refs(cls, v: Any) -> Any:
            if isinstance(v, int) and v < 1:
                raise ValueError("references must be 'candidates' or a positive number of samples")
            return v

        @field_validator("schedule")
        @classmethod
        def _schedule(cls, v: list[int]) -> list[int]:
            if not v or any(b <= a for a, b in zip(v, v[1:])) or v[0] < 1:
                raise ValueError("schedule must be a non-empty increasing list of positive sizes")
            return v

    def __init__(self, setup: Any = None, utilities: dict[str, Any] | None = None):
        self.setup = setup
        self._utility_factories = utilities  # tests may pass {name: factory}; else the plugin registry
        self._utilities: dict[tuple[str, tuple], Any] = {}

    # -- options --------------------------------------------------------------------------------
    def _registry(self) -> dict[str, Any]:
        if self._utility_factories is not None:
            return self._utility_factories
        pm = getattr(getattr(getattr(self.setup, "models", None), "engine", None), "pm", None)
        if pm is None:
            from framework.plugins import get_plugin_manager

            pm = get_plugin_manager()
        return {r.name: r for r in pm.registry("utility")}

    def utility(self, name: str, options: dict[str, Any] | None = None) -> Any:
        """The utility ``name`` built with ``options`` (cached)."""
        options = dict(options or {})
        key = (name, tuple(sorted((k, repr(v)) for k, v in options.items())))
        u = self._utilities.get(key)
        if u is None:
            registry = self._registry()
            if name not in registry:
                from framework.plugins import unknown_name_message

                raise ValueError(f"reranker mbr: utility: {unknown_name_message('utility', name, list(registry))}")
            entry = registry[name]
            factory = getattr(entry, "factory", entry)
            params = getattr(entry, "params", None) or getattr(factory, "Params", None)
            if params is not None:
                from framework.plugins import validate_plugin_options

                try:
                    options = validate_plugin_options(f"utility {name}", params, options).model_dump()
                except ValueError as exc:
                    raise ValueError(f"reranker mbr: utility_options: {exc}") from None
            u = self._utilities[key] = factory(**options)
        return u

    def prepare(self, options: Params, sampling: Any) -> Params:
        """Checks that need the request: enough samples, a utility that serves the method."""
        u = self.utility(options.utility, options.utility_options)
        if options.method == "aggregate" and not supports_aggregate(u):
            raise ValueError(f"reranker mbr: method: utility {options.utility!r} has no aggregate form "
                             "(features/aggregate/score_aggregate); use method exact or pruning")
        total = sampling.num_samples
        if total < 2:
            raise ValueError(f"reranker mbr: n: MBR chooses among several samples; got {total} "
                             "(set n or best_of to 2 or more)")
        if isinstance(options.references, int):
            hyps = total - options.references
            if hyps < max(1, sampling.n):
                raise ValueError(f"reranker mbr: references: {options.references} reference samples leave {hyps} "
                                 f"hypotheses of the {total} sampled; the request returns n={sampling.n} "
                                 f"(set best_of >= n + {options.references})")
        return options

    # -- selection --------------------------------------------------------------------------------
    def select(self, request: RerankRequest) -> list[ScoredCandidate]:
        opts = request.options if request.options is not None else self.Params()
        cands = request.candidates
        if isinstance(opts.references, int):
            n_hyp = len(cands) - opts.references
            hyps, refs = cands[:n_hyp], cands[n_hyp:]
        else:
            hyps, refs = cands, cands
        scores, order = self.rank([c.text for c in hyps], [c.text for c in refs],
                                  [c.cumulative_logprob for c in refs], opts, same=hyps is refs)
        return [ScoredCandidate(i, float(scores[i])) for i in order]

    def rank(self, hyps: Sequence[str], refs: Sequence[str], ref_logprobs: Sequence[float | None],
             opts: Params, same: bool = False) -> tuple[np.ndarray, list[int]]:
        """(score per hypothesis, hypothesis indices best first) — the whole MBR computation
        (``same``: ``refs`` are the hypotheses themselves)."""
        if not hyps:
            return np.zeros(0), []
        u = self.utility(opts.utility, opts.utility_options)
        w = reference_weights(ref_logprobs, opts.weights)
        if opts.method == "exact":
            scores = exact_scores(u, hyps, refs, w)
            order = best_first(scores)
        elif opts.method == "aggregate":
            scores = aggregate_scores(u, hyps, refs, w)
            order = best_first(scores)
        else:
            scores, order = pruning_mbr(u, hyps, refs, w, opts.schedule, opts.alpha, opts.bootstrap, opts.seed,
                                        same=same)
        return scores, order


def reference_weights(logprobs: Sequence[float | None], kind: str) -> np.ndarray:
    """Weights summing to 1: uniform, or ``softmax(cumulative logprobs)``."""
    n = len(logprobs)
    if kind == "uniform" or n == 0:
        return np.full(n, 1.0 / max(n, 1))
    lp = np.array([x if x is not None and math.isfinite(x) else -math.inf for x in logprobs], dtype=np.float64)
    if not np.isfinite(lp).any():
        return np.full(n, 1.0 / n)
    e = np.exp(lp - lp.max())
    return e / e.sum()


def best_first(scores: np.ndarray) -> list[int]:
    """Indices by decreasing score; ties keep the lower index first."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def exact_scores(u: Any, hyps: Sequence[str], refs: Sequence[str], w: np.ndarray) -> np.ndarray:
    """``sum_r w_r u(h, r)`` for every hypothesis (``H x R`` utility calls)."""
    return pairwise(u, hyps, refs) @ w


def aggregate_scores(u: Any, hyps: Sequence[str], refs: Sequence[str], w: np.ndarray) -> np.ndarray:
    """``u(h, aggregate(refs, w))`` for every hypothesis (``H + R`` feature extractions)."""
    agg = u.aggregate([u.features(r) for r in refs], list(w))
    return np.array([u.score_aggregate(u.features(h), agg) for h in hyps], dtype=np.float64)


def pruning_mbr(u: Any, hyps: Sequence[str], refs: Sequence[str], w: np.ndarray, schedule: Sequence[int],
                alpha: float, bootstrap: int, seed: int, same: bool = False) -> tuple[np.ndarray, list[int]]:
    """Confidence-based pruning MBR (Cheng & Vlachos 2023); see the module docstring.

    ``same``: the references are the hypotheses themselves (``references: candidates``). Then
    the pruning decisions leave each hypothesis's utility against itself out (a hypothesis that
    happens to be among the first references seen would otherwise lead by its self-match and
    prune the rest); the final scores include it, as exact MBR's do.

    Returns (scores, order): a survivor's score is its weighted mean utility over all references
    (its exact MBR score); a pruned hypothesis keeps the estimate it was pruned with.
    """
    H, R = len(hyps), len(refs)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(R)
    sizes = [s for s in schedule if s < R] + [R]
    alive = list(range(H))
    matrix = np.zeros((H, R))
    filled = 0  # references (in perm order) scored for every alive hypothesis
    scores = np.zeros(H)
    pruned_at: list[tuple[int, int]] = []  # (step, hypothesis) in pruning order
    for step, size in enumerate(sizes):
        cols = perm[filled:size]
        if len(cols):
            sub = pairwise(u, [hyps[i] for i in alive], [refs[j] for j in cols])
            matrix[np.ix_(alive, cols)] = sub
        filled = size
        seen = perm[:size]
        ws = w[seen]
        ws = ws / ws.sum() if ws.sum() > 0 else np.full(len(seen), 1.0 / len(seen))
        sub = matrix[np.ix_(alive, seen)]  # [A, S]
        scores[alive] = sub @ ws
        if size == R or len(alive) == 1:
            break
        # bootstrap the references seen so far: how often does each survivor tie or beat the leader?
        mask = np.ones_like(sub)
        if same:
            mask[np.array(alive)[:, None] == seen[None, :]] = 0.0
        wm = mask * ws[None, :]
        est = (sub * wm).sum(axis=1) / np.maximum(wm.sum(axis=1), 1e-300)
        lead_row = int(np.argmax(est))
        idx = rng.choice(len(seen), size=(bootstrap, len(seen)), replace=True, p=ws)  # resampled by weight
        num = (sub * mask)[:, idx].sum(axis=2)  # [A, B]
        den = mask[:, idx].sum(axis=2)
        boot = np.where(den > 0, num / np.maximum(den, 1), est[:, None])  # no other reference drawn: no news
        wins = (boot >= boot[lead_row][None, :] - 1e-12).mean(axis=1)
        keep = [a for k, a in enumerate(alive) if wins[k] >= 1.0 - alpha or k == lead_row]
        pruned_at.extend((step, a) for a in alive if a not in keep)
        alive = keep
    survivors = sorted(alive, key=lambda i: (-scores[i], i))
    # pruned ones after the survivors: later pruned first, then by their estimate
    pruned = sorted((p for p in pruned_at), key=lambda p: (-p[0], -scores[p[1]], p[1]))
    return scores, survivors + [p[1] for p in pruned]


__all__ = ["MBRReranker", "aggregate_scores", "exact_scores", "pruning_mbr", "reference_weights"]
