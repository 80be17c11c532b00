"""The ``best_of_n`` reranker: reward scores against the dense prefix scorer, batching, errors."""

from __future__ import annotations

import pytest
import torch

from framework import LLM, SamplingParams
from framework.companions import Companion
from framework.errors import InvalidRequestError
from framework.models.scorer import load_scorer

PROMPTS = ["What a lovely", "The storm destroyed"]


@pytest.fixture(scope="module")
def llm():
    return LLM("demo")


@pytest.fixture(scope="module")
def reward():
    return load_scorer("demo-reward")


def _dense_score(scorer, ids: list[int], label=None) -> float:
    return float(scorer.prefix_scores(torch.tensor([ids]), label)[0, -1])


def test_reward_scores_equal_the_dense_scorer_and_order(llm, reward, monkeypatch):
    calls = []
    orig = Companion.score_sequences

    def spy(self, token_ids, **kw):
        calls.append(len(token_ids))
        return orig(self, token_ids, **kw)

    monkeypatch.setattr(Companion, "score_sequences", spy)
    params = SamplingParams(n=6, max_tokens=12, temperature=1.0, seed=2, reranker={"best_of_n": {"scorer": "demo-reward"}})
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert calls == [12]  # both requests' candidates in one batched scoring call
    for out in outs:
        scores = [o.score for o in out.outputs]
        assert scores == sorted(scores, reverse=True)
        for o in out.outputs:
            want = _dense_score(reward, list(out.prompt_token_ids) + list(o.token_ids))
            assert o.score == pytest.approx(want, abs=2e-4)


def test_best_of_returns_the_top_reward(llm, reward):
    base = dict(max_tokens=10, temperature=1.0, seed=5)
    plain = llm.generate(PROMPTS[0], SamplingParams(n=5, **base), use_tqdm=False)[0]
    best = llm.generate(PROMPTS[0], SamplingParams(n=1, best_of=5, reranker={"best_of_n": "demo-reward"}, **base),
                        use_tqdm=False)[0]
    dense = [_dense_score(reward, list(plain.prompt_token_ids) + list(o.token_ids)) for o in plain.outputs]
    top = max(range(5), key=lambda i: (dense[i], -i))
    assert len(best.outputs) == 1 and best.outputs[0].text == plain.outputs[top].text


def test_classifier_label_and_logprob_scorer(llm):
    sent = load_scorer("demo-sentiment")
    params = SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=1,
                            reranker={"best_of_n": {"scorer": "demo-sentiment", "label": "negative"}})
    out = llm.generate(PROMPTS[1], params, use_tqdm=False)[0]
    for o in out.outputs:
        want = _dense_score(sent, list(out.prompt_token_ids) + list(o.token_ids), "negative")
        assert o.score == pytest.approx(want, abs=2e-4)
    lp = llm.generate(PROMPTS[1], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=1,
                                                 reranker={"best_of_n": {"scorer": "logprob"}}), use_tqdm=False)[0]
    assert [o.score for o in lp.outputs] == pytest.approx(sorted((o.cumulative_logprob for o in lp.outputs), reverse=True))


def test_batched_score_sequences_equals_one_at_a_time(llm):
    comp = llm.engine.models.get("demo-reward", lockstep=False)
    seqs = [[1, 5, 9, 11, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54][: 3 + k] + [100 + k] * (k % 3)
            for k in range(12)]
    batched = comp.score_sequences(seqs, max_batch_tokens=40)
    single = torch.cat([comp.score_sequences([s]) for s in seqs])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    prompt = [1] + list(range(200, 250))  # longer than a KV block: computed once, then shared
    seqs = [prompt + [300 + k] * (k + 1) for k in range(6)]
    hits = comp.pool.bm.stats.hits
    batched = comp.score_sequences(seqs)
    assert comp.pool.bm.stats.hits > hits
    single = torch.cat([comp.score_sequences([s]) for s in seqs])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)
    assert llm.engine.models.check_all_free()


def test_bad_scorer_options_are_clear_errors(llm):
    def gen(opts):
        llm.generate("Q:", SamplingParams(n=2, max_tokens=4, reranker={"best_of_n": opts}), use_tqdm=False)

    with pytest.raises(InvalidRequestError, match="scorer.*demo-draft.*language model"):
        gen({"scorer": "demo-draft"})
    with pytest.raises(InvalidRequestError, match="scorer.*no-such-model"):
        gen({"scorer": "no-such-model"})
    with pytest.raises(InvalidRequestError, match="label.*neutral"):
        gen({"scorer": "demo-sentiment", "label": "neutral"})
    with pytest.raises(InvalidRequestError, match="label.*reward model"):
        gen({"scorer": "demo-reward", "label": "positive"})
    out = llm.generate("Q:", SamplingParams(n=2, max_tokens=4), use_tqdm=False)  # engine keeps serving
    assert len(out[0].outputs) == 2
