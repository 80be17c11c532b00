"""Beam search: outputs and scores identical to transformers' generate(num_beams=...)."""

from __future__ import annotations

import pytest
import torch

from framework import LLM, SamplingParams
from framework.errors import InvalidRequestError

PROMPTS = [[5, 17, 42, 99, 7, 250, 31], [300, 12, 12, 64], [9, 8, 7, 6, 5, 4, 3, 2, 1, 111, 222]]
MAX_NEW = 14


@pytest.fixture(scope="module")
def hf_model(checkpoints):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(checkpoints):
    return LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, max_num_seqs=32)


def frequent_token(hf_model) -> int:
    """A token the model produces often, used as EOS so that beams finish early and the
    early-stopping rules matter."""
    with torch.no_grad():
        g = hf_model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    toks = g[0, len(PROMPTS[0]):].tolist()
    return max(set(toks), key=toks.count)


def hf_beam(hf_model, prompt, eos, max_new=MAX_NEW, **kw):
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True, **kw,
        )
    seqs = []
    for row in out.sequences[:, len(prompt):].tolist():
        if eos in row:  # a finished hypothesis is padded after its EOS
            row = row[: row.index(eos) + 1]
        seqs.append(row)
    return seqs, out.sequences_scores.tolist()


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_matches_transformers(hf_model, llm, early_stopping, length_penalty):
    eos = frequent_token(hf_model)
    params = SamplingParams(
        num_beams=4, num_return_sequences=3, length_penalty=length_penalty, early_stopping=early_stopping,
        max_tokens=MAX_NEW, ignore_eos=True, stop_token_ids=[eos],
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    for prompt, out in zip(PROMPTS, outs):
        ref_seqs, ref_scores = hf_beam(hf_model, prompt, eos, num_beams=4, num_return_sequences=3,
                                       length_penalty=length_penalty, early_stopping=early_stopping)
        assert [c.token_ids for c in out.outputs] == ref_seqs
        assert [c.score for c in out.outputs] == pytest.approx(ref_scores, abs=1e-5)
        assert all(c.finish_reason in ("stop", "length") for c in out.outputs)
        scores = [c.score for c in out.outputs]
        assert scores == sorted(scores, reverse=True)  # best first
    assert llm.engine.block_manager.check_all_free()


def test_beam_search_alongside_other_requests_and_with_processors(hf_model, llm):
    eos = frequent_token(hf_model)
    beam = SamplingParams(num_beams=3, max_tokens=10, ignore_eos=True, stop_token_ids=[eos], repetition_penalty=1.3)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = llm.generate({"prompt_token_ids": PROMPTS[0]}, beam)[0]
    mixed = llm.generate([{"prompt_token_ids": PROMPTS[1]}, {"prompt_token_ids": PROMPTS[0]}, {"prompt_token_ids": PROMPTS[2]}],
                         [greedy, beam, greedy])
    assert mixed[1].outputs[0].token_ids == alone.outputs[0].token_ids
    ref, ref_scores = hf_beam(hf_model, PROMPTS[0], eos, num_beams=3, repetition_penalty=1.3, max_new=10)
    assert alone.outputs[0].token_ids == ref[0]
    assert alone.outputs[0].score == pytest.approx(ref_scores[0], abs=1e-5)
    assert llm.engine.block_manager.check_all_free()


def test_beam_search_bad_params(llm):
    with pytest.raises(InvalidRequestError, match="num_return_sequences"):
        SamplingParams(num_beams=2, num_return_sequences=3)
    with pytest.raises(InvalidRequestError):
        SamplingParams(num_beams=2, temperature=0.7)
    with pytest.raises(InvalidRequestError):
        SamplingParams(num_beams=0)
    with pytest.raises(InvalidRequestError, match="n > 1"):
        SamplingParams(num_beams=2, n=2)
    # the engine is unharmed
    assert llm.generate({"prompt_token_ids": [1, 2]}, SamplingParams(num_beams=2, max_tokens=3, ignore_eos=True))[0].outputs


def test_beams_share_the_prompt_blocks(checkpoints):
    llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, block_size=8, enable_prefix_caching=False)
    engine = llm.engine
    prompt = [(7 * i) % 300 + 3 for i in range(160)]  # 20 full blocks
    engine.add_request("b", {"prompt_token_ids": prompt}, SamplingParams(num_beams=4, max_tokens=6, ignore_eos=True))
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine.block_manager.num_used_blocks)
        if len([s for s in engine.scheduler.running]) > 1:
            # four beams: the 20 prompt blocks are shared, each beam owns at most its last block
            assert engine.block_manager.num_used_blocks <= 20 + 4
    assert 20 <= peak <= 24
    assert engine.block_manager.check_all_free()
