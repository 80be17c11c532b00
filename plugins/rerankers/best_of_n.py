"""The ``best_of_n`` reranker: candidates by a reward model's score, or by log-probability.

``scorer: demo-reward`` (any prefix-scorer companion: a registered name such as
``demo-reward`` / ``demo-sentiment``, a spec ``models:`` alias or a directory) scores each
finished candidate as the scorer's output after the last token of ``prompt + completion``:
``sigmoid`` of a reward model's head (a reward in [0, 1]) or ``log P(label)`` of a classifier
(``label:``, default the scorer's default label). Every candidate of every request that
finished in the same engine step is scored in batched forwards of the companion
(:meth:`framework.companions.Companion.score_sequences`, through its own prefix cache, so a
shared prompt is computed once).

``scorer: logprob`` orders by cumulative log-probability (``normalize: length``: per token),
what the built-in ``logprob`` reranker does.

The output is every candidate, best first (ties keep sampling order), each with its score.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from framework.rerankers import RerankRequest, ScoredCandidate


class BestOfNReranker:
    """Best-of-n by a companion scorer (see the module docstring)."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        __shorthand__ = "scorer"
        scorer: str = Field("demo-reward", description="'logprob', or a scorer companion (registered name, "
                            "models: alias or directory)")
        label: str | None = Field(None, description="classifier scorers: the label whose log-probability is "
                                  "the score (default: the scorer's default label)")
        normalize: Literal["none", "length"] = Field("none", description="logprob: 'length' divides by the "
                                                     "number of tokens")

    def __init__(self, setup: Any = None):
        self.setup = setup

    def _companion(self, ref: str) -> Any:
        models = getattr(self.setup, "models", None)
        if models is None:
            raise ValueError(f"scorer: {ref!r} needs an engine's companion models (use scorer: logprob outside one)")
        return models.get(ref, lockstep=False)

    def prepare(self, options: Params, sampling: Any) -> Params:
        """Load the scorer now (errors name it) and check the label."""
        if options.scorer == "logprob":
            if options.label is not None:
                raise ValueError("label: only a classifier scorer has labels (scorer is 'logprob')")
            return options
        try:
            comp = self._companion(options.scorer)
        except ValueError as exc:
            raise ValueError(f"scorer: {exc}") from None
        if comp.scorer_kind is None:
            raise ValueError(f"scorer: {options.scorer!r} is a language model, not a reward model or classifier "
                             "(use scorer: logprob for the sampling model's own log-probability)")
        if options.label is not None:
            if comp.scorer_kind == "reward":
                raise ValueError(f"label: {options.scorer!r} is a reward model with one output; labels are for classifiers")
            try:
                comp.label_index(options.label)
            except ValueError as exc:
                raise ValueError(f"label: {exc}") from None
        return options

    def select(self, request: RerankRequest) -> list[ScoredCandidate]:
        return self.select_many([request])[0]

    def select_many(self, requests: list[RerankRequest]) -> list[list[ScoredCandidate]]:
        """Score every candidate of every request, one batched companion pass per scorer."""
        scores: list[list[float] | None] = [None] * len(requests)
        by_scorer: dict[tuple[str, str | None], list[int]] = {}
        for i, req in enumerate(requests):
            opts = req.options if req.options is not None else self.Params()
            if opts.scorer == "logprob":
                per_token = opts.normalize == "length"
                scores[i] = [(c.cumulative_logprob or 0.0) / (max(1, len(c.token_ids)) if per_token else 1)
                             for c in req.candidates]
            else:
                by_scorer.setdefault((opts.scorer, opts.label), []).append(i)
        for (ref, label), idx in by_scorer.items():
            comp = self._companion(ref)
            seqs = [list(requests[i].prompt_token_ids) + list(c.token_ids) for i in idx for c in requests[i].candidates]
            flat = comp.to_scores(comp.score_sequences(seqs), label).tolist()
            k = 0
            for i in idx:
                m = len(requests[i].candidates)
                scores[i] = flat[k : k + m]
                k += m
        out = []
        for s in scores:
            assert s is not None
            order = sorted(range(len(s)), key=lambda j: (-s[j], j))
            out.append([ScoredCandidate(j, float(s[j])) for j in order])
        return out


__all__ = ["BestOfNReranker"]
