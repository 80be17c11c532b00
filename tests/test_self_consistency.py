"""The ``self_consistency`` reranker: vote counted against a brute force, order, errors, end to end."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from framework import LLM, SamplingParams
from framework.errors import InvalidRequestError
from framework.outputs import CompletionOutput
from framework.rerankers import RerankRequest
from plugins.rerankers.self_consistency import SelfConsistencyReranker

PATTERN = r"The answer is (-?[0-9]+)"


def _req(texts_logps, **opts):
    cands = [CompletionOutput(i, t, [0] * (i + 1), lp, None, "stop") for i, (t, lp) in enumerate(texts_logps)]
    params = SelfConsistencyReranker.Params(**opts)
    return RerankRequest("r", "", [], None, params, cands)


def test_count_vote_orders_winner_then_others_then_no_answer():
    req = _req([("x. The answer is 3.", -5.0), ("The answer is 4", -1.0), ("no idea", -0.1),
                ("The answer is 2. The answer is 4.", -2.0), ("The answer is 3", -4.0), ("The answer is 4", -3.0)])
    out = SelfConsistencyReranker().select(req)
    assert [c.index for c in out] == [1, 3, 5, 4, 0, 2]  # '4' x3 by logprob, '3' x2 by logprob, no answer last
    assert [round(c.score, 6) for c in out] == [0.6, 0.6, 0.6, 0.4, 0.4, 0.0]


def test_logprob_weighting_equals_brute_force_sum_of_probabilities():
    texts = [("The answer is 7", -0.5), ("The answer is 9", -3.0), ("The answer is 9", -3.2), ("The answer is 9", -2.9)]
    out = SelfConsistencyReranker().select(_req(texts, weighting="logprob"))
    mass = Counter()
    for t, lp in texts:
        mass[re.findall(PATTERN, t)[-1]] += math.exp(lp)
    best = max(mass, key=mass.get)
    assert best == "7" and out[0].index == 0  # one likely answer outweighs three unlikely ones
    assert out[0].score == pytest.approx(mass["7"] / sum(mass.values()))
    count = SelfConsistencyReranker().select(_req(texts))
    assert count[0].index == 3  # by count '9' wins; the most probable '9' first


def test_bad_pattern_is_a_clear_request_error(text_model):
    llm = LLM(text_model)
    with pytest.raises(InvalidRequestError, match="answer_pattern"):
        llm.generate("Q:", SamplingParams(max_tokens=4, best_of=2, reranker={"self_consistency": {"answer_pattern": "(("}}))
    with pytest.raises(InvalidRequestError, match="answer_pattern.*no group"):
        llm.generate("Q:", SamplingParams(max_tokens=4, best_of=2, reranker={"self_consistency": {"answer_pattern": "[0-9]+"}}))
    with pytest.raises(InvalidRequestError, match="weighting"):
        llm.generate("Q:", SamplingParams(max_tokens=4, best_of=2, reranker={"self_consistency": {"weighting": "max"}}))


def test_end_to_end_on_demo_majority_answer_first():
    llm = LLM("demo")
    prompt = "Q: Tom has 12 apples and finds 7 more. How many apples does Tom have now?\nA:"
    base = dict(max_tokens=40, temperature=1.0, seed=3, stop=["\n"])
    plain = llm.generate(prompt, SamplingParams(n=8, **base), use_tqdm=False)[0].outputs
    ranked = llm.generate(prompt, SamplingParams(n=8, reranker={"self_consistency": {}}, **base), use_tqdm=False)[0].outputs
    assert sorted(o.text for o in ranked) == sorted(o.text for o in plain)  # same seeded samples, reordered
    answers = [(re.findall(PATTERN, o.text) or [None])[-1] for o in plain]
    votes = Counter(a for a in answers if a is not None)
    assert votes, "the demo model should state an answer in at least one of 8 samples"
    top = max(votes.values())
    first = (re.findall(PATTERN, ranked[0].text) or [None])[-1]
    assert votes[first] == top
    assert ranked[0].score == pytest.approx(top / sum(votes.values()))
    ranked_answers = [(re.findall(PATTERN, o.text) or [None])[-1] for o in ranked]
    n_none = ranked_answers.count(None)
    assert all(a is None for a in ranked_answers[len(ranked_answers) - n_none:])
