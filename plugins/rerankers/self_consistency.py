"""The ``self_consistency`` reranker (Wang et al. 2023): majority vote over extracted answers.

Each candidate's answer is the first group of the **last** match of ``answer_pattern`` in its
text (the pattern must have a group: a pattern without one is an options error). Answers are voted for with weight 1
(``weighting: count``) or with the candidate's sequence probability ``exp(cumulative_logprob)``
(``weighting: logprob``, Wang et al.'s weighted vote). The output is every candidate best first:

1. candidates whose answer won, most probable first;
2. the other answers by decreasing vote, each group most probable first;
3. candidates without an answer, last.

A candidate's score is its answer's share of the votes (0.0 without an answer); ties between
answers go to the one sampled first, so the order is deterministic.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from framework.rerankers import RerankRequest, ScoredCandidate

DEFAULT_PATTERN = r"The answer is (-?[0-9]+)"


def extract_answer(text: str, pattern: re.Pattern[str]) -> str | None:
    """The answer in ``text``: the first group of the last match (the whole match without groups)."""
    last = None
    for last in pattern.finditer(text):
        pass
    if last is None:
        return None
    return last.group(1) if pattern.groups else last.group(0)


class SelfConsistencyReranker:
    """Majority (or probability-weighted) vote over the answers the candidates reach."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        answer_pattern: str = Field(DEFAULT_PATTERN, description="regex with a group; its first group is the answer")
        weighting: Literal["count", "logprob"] = Field("count", description="vote weight: 1 per candidate, or exp(cumulative logprob)")

        @field_validator("answer_pattern")
        @classmethod
        def _compiles(cls, v: str) -> str:
            try:
                compiled = re.compile(v)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
            if compiled.groups < 1:
                raise ValueError(f"{v!r} has no group: put the answer in parentheses, e.g. 'The answer is (-?[0-9]+)'")
            return v

    def __init__(self, setup=None):
        self.setup = setup

    def select(self, request: RerankRequest) -> list[ScoredCandidate]:
        opts = request.options or self.Params()
        pattern = re.compile(opts.answer_pattern)
        answers = [extract_answer(c.text, pattern) for c in request.candidates]
        logps = [c.cumulative_logprob if c.cumulative_logprob is not None else 0.0 for c in request.candidates]
        if opts.weighting == "logprob":
            top = max(logps, default=0.0)
            weights = [math.exp(lp - top) for lp in logps]  # shifted: only the ratios matter
        else:
            weights = [1.0] * len(answers)
        votes: dict[str, float] = {}
        first_seen: dict[str, int] = {}
        for i, (a, w) in enumerate(zip(answers, weights)):
            if a is not None:
                votes[a] = votes.get(a, 0.0) + w
                first_seen.setdefault(a, i)
        total = sum(votes.values())
        rank = {a: r for r, a in enumerate(sorted(votes, key=lambda a: (-votes[a], first_seen[a])))}
        order = sorted(
            range(len(answers)),
            key=lambda i: (answers[i] is None, rank.get(answers[i], 0) if answers[i] is not None else 0, -logps[i], i),
        )
        return [ScoredCandidate(i, votes[answers[i]] / total if answers[i] is not None else 0.0) for i in order]
