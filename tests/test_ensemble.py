"""Output ensembling: member samples follow the member model exactly; pooled MBR; errors."""

from __future__ import annotations

import pytest
import sacrebleu

from framework import LLM, SamplingParams
from framework.errors import InvalidRequestError

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def llm():
    return LLM("demo")


def test_member_samples_are_the_member_models_greedy_outputs(llm):
    draft = LLM("demo-draft")
    g = dict(max_tokens=12, temperature=0)
    main_text = llm.generate(PROMPT, SamplingParams(**g), use_tqdm=False)[0].outputs[0].text
    draft_text = draft.generate(PROMPT, SamplingParams(**g), use_tqdm=False)[0].outputs[0].text
    assert main_text != draft_text
    out = llm.generate(PROMPT, SamplingParams(n=5, processors=[{"ensemble": {"members": {"demo-draft": 2}}}], **g),
                       use_tqdm=False)[0].outputs
    assert [o.text for o in out] == [main_text] * 3 + [draft_text] * 2  # main model first, then the member
    assert llm.engine.models.check_all_free()


def test_pooled_candidates_reranked_by_mbr(llm):
    params = SamplingParams(n=1, best_of=6, max_tokens=10, temperature=1.0, seed=1,
                            processors=[{"ensemble": {"members": {"demo-draft": 3}}}], reranker={"mbr": {"utility": "chrf"}})
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    texts = [c.text for c in out.candidates]
    m = sacrebleu.CHRF()
    exp = [sum(m.sentence_score(h, [r]).score for r in texts) / 6 for h in texts]
    assert out.outputs[0].text == texts[0] and exp[0] == pytest.approx(max(exp))
    assert [c.score for c in out.candidates] == pytest.approx(exp)
    plain = llm.generate(PROMPT, SamplingParams(n=6, max_tokens=10, temperature=1.0, seed=1,
                                                processors=[{"ensemble": {"members": {"demo-draft": 3}}}]), use_tqdm=False)[0]
    assert sorted(texts) == sorted(o.text for o in plain.outputs)  # the same pooled samples, reranked


def test_bad_members_are_clear_errors(llm):
    def gen(members, **kw):
        llm.generate(PROMPT, SamplingParams(max_tokens=4, processors=[{"ensemble": {"members": members}}], **kw),
                     use_tqdm=False)

    with pytest.raises(InvalidRequestError, match="members.*4 samples.*samples 3"):
        gen({"demo-draft": 4}, n=3)
    with pytest.raises(InvalidRequestError, match="members.*scorer"):
        gen({"demo-reward": 1}, n=2)
    with pytest.raises(InvalidRequestError, match="members.*no-such"):
        gen({"no-such": 1}, n=2)
    with pytest.raises(InvalidRequestError, match="members"):
        gen({"demo-draft": 0}, n=2)
    assert len(llm.generate(PROMPT, SamplingParams(n=2, max_tokens=3), use_tqdm=False)[0].outputs) == 2
