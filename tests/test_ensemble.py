"""Output ensembling: member samples follow the member model exactly; pooled MBR; errors."""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=None)
def _hf(model_dir):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _hf_logprob(model_dir, prompt_ids: list[int], out_ids: list[int]) -> float:
    """Sum of log P(token) under the transformers model, teacher-forced on prompt + output."""
    import torch

    hf = _hf(model_dir)
    ids = torch.tensor([prompt_ids + out_ids])
    with torch.no_grad():
        logp = hf(ids).logits[0].log_softmax(-1)
    n = len(prompt_ids)
    return float(sum(logp[n - 1 + i, t] for i, t in enumerate(out_ids)))


def test_each_candidate_carries_its_model_and_that_models_own_logprob(llm):
    from framework.batch_run import PromptRecord, result_record
    from framework.demo import DEMO_DIR

    params = SamplingParams(n=1, best_of=4, max_tokens=8, temperature=0.7, seed=4,
                            processors=[{"ensemble": {"members": {"demo-draft": 2}}}], reranker={"mbr": {"utility": "chrf"}})
    out = llm.generate(PROMPT, params, use_tqdm=False)[0]
    models = {c.model for c in out.candidates}
    assert models == {"demo", "demo-draft"}
    # samples 0-1 are the main model's, 2-3 demo-draft's; the reranker reorders them, so check
    # each candidate's logprob against the model it names, computed independently
    refs = {name: DEMO_DIR / name for name in ("demo", "demo-draft")}
    for c in out.candidates:
        own = _hf_logprob(refs[c.model], out.prompt_token_ids, c.token_ids)
        other = _hf_logprob(refs[({"demo", "demo-draft"} - {c.model}).pop()], out.prompt_token_ids, c.token_ids)
        assert c.cumulative_logprob == pytest.approx(own, rel=1e-4, abs=1e-3), c.model
        assert abs(own - other) > 1e-2  # the two models disagree, so the check above can fail
    assert sorted(c.model for c in out.candidates) == ["demo", "demo", "demo-draft", "demo-draft"]
    rec = result_record(PromptRecord(id="1", prompt=PROMPT), out, all_candidates=True)
    assert [c["model"] for c in rec["candidates"]] == [c.model for c in out.candidates]
    assert [c["cumulative_logprob"] for c in rec["candidates"]] == [c.cumulative_logprob for c in out.candidates]
    assert rec["outputs"][0]["model"] == out.outputs[0].model
    plain = llm.generate(PROMPT, SamplingParams(n=2, max_tokens=3), use_tqdm=False)[0]
    assert all(o.model is None for o in plain.outputs)  # no source processor: no label
    assert "model" not in result_record(PromptRecord(id="2", prompt=PROMPT), plain)["outputs"][0]


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
