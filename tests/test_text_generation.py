"""Text-level behaviour with a real tokenizer: stop strings, streaming, special tokens."""

from __future__ import annotations

import pytest

from framework import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(text_model):
    return LLM(str(text_model))


def _boundaries(tok, prompt_ids, out_ids):
    """Character offset in the output text after each output token."""
    base = tok.decode(prompt_ids)
    return [len(tok.decode(prompt_ids + out_ids[: i + 1])) - len(base) for i in range(len(out_ids))]


def test_stop_string_split_across_tokens_is_caught_and_cut(llm):
    prompt = "The quick brown fox"
    tok = llm.tokenizer
    # the tiny random model needs sampling to produce varied multi-character tokens; a seed
    # makes every run below draw the same tokens until the stop string ends it
    for seed in range(20):
        params = dict(max_tokens=40, temperature=1.0, seed=seed, ignore_eos=True)
        free = llm.generate(prompt, SamplingParams(**params))[0]
        text = free.outputs[0].text
        ends = _boundaries(tok, free.prompt_token_ids, free.outputs[0].token_ids)
        # a stop string made of the last 2 characters of one token and the first 2 of the next
        ks = [i for i in range(1, len(ends) - 1)
              if ends[i] - ends[i - 1] >= 2 and ends[i + 1] - ends[i] >= 2
              and text[ends[i - 1]:ends[i + 1]].isprintable() and "\ufffd" not in text[ends[i - 1]:ends[i + 1]]]
        if ks:
            break
    else:  # pragma: no cover
        pytest.fail("no two adjacent multi-character tokens in 20 samples")
    k = ks[0]
    stop = text[ends[k] - 2 : ends[k] + 2]
    first = text.find(stop)
    out = llm.generate(prompt, SamplingParams(**params, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:first]
    assert stop not in out.text
    kept = llm.generate(prompt, SamplingParams(**params, stop=[stop], include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[: first + len(stop)]


@pytest.mark.parametrize("stop", [[], ["zz-never"], "auto"])
def test_stream_deltas_equal_final_text_and_never_leak_stop(llm, stop):
    prompt = "Hello world! 日本語 🙂"
    params = dict(max_tokens=30, temperature=0.9, seed=7, ignore_eos=True)
    if stop == "auto":
        free = llm.generate(prompt, SamplingParams(**params))[0].outputs[0].text
        stop = [free[10:13]]
    final = llm.generate(prompt, SamplingParams(**params, stop=stop))[0].outputs[0].text
    deltas = list(llm.stream(prompt, SamplingParams(**params, stop=stop)))
    assert "".join(deltas) == final
    assert all("\ufffd" not in d or "\ufffd" in final for d in deltas)
    for s in stop:
        assert s not in "".join(deltas)
    assert llm.engine.block_manager.check_all_free()


def test_stream_consumer_stopping_early_frees_blocks(llm):
    gen = llm.stream("Once upon a time", SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    next(gen)
    gen.close()
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.check_all_free()


def test_eos_and_stop_token_ids(llm, monkeypatch):
    tok = llm.tokenizer
    assert tok.eos_token_id == 2 and 2 in llm.engine.eos_token_ids
    params = dict(max_tokens=12, temperature=1.0, seed=1)
    free = llm.generate("Once upon", SamplingParams(**params, ignore_eos=True))[0].outputs[0]
    t = free.token_ids[3]
    cut = free.token_ids[: free.token_ids.index(t) + 1]
    out = llm.generate("Once upon", SamplingParams(**params, stop_token_ids=[t], ignore_eos=True))[0].outputs[0]
    assert out.token_ids == cut and out.finish_reason == "stop" and out.stop_reason == t
    # the same token as EOS: generation ends there (the EOS id is kept in token_ids, like HF)
    monkeypatch.setattr(llm.engine, "eos_token_ids", frozenset({t}))
    out = llm.generate("Once upon", SamplingParams(**params))[0].outputs[0]
    assert out.token_ids == cut and out.finish_reason == "stop" and out.stop_reason is None
    out = llm.generate("Once upon", SamplingParams(**params, ignore_eos=True))[0].outputs[0]
    assert out.token_ids == free.token_ids and out.finish_reason == "length"


def test_generate_text_prompts_in_order_with_progress_off(llm):
    prompts = ["a", "The quick brown fox jumps", "日本語"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    for o in outs:
        assert o.prompt_token_ids == llm.tokenizer.encode(o.prompt)
        assert len(o.outputs[0].token_ids) == 5
