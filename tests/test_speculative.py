"""Speculative decoding (framework/strategies/speculative.py, plugins/drafters/): greedy outputs
token-identical to ordinary decoding, several tokens per step handled like one per step, KV
freed, preemption mid-draft; exact sampling checked statistically (test_speculative_sampling.py)."""

from __future__ import annotations

import math

import pytest

from framework import LLM, SamplingParams
from framework.errors import ConfigError

WORDS = ["Once upon a time", "The cat", "def f(x):", "Hello", "In the beginning", "The king said",
         "import os\nimport sys\n", "She walked", "It was a dark night", "The answer is",
         '{"name": "Bob", "age": 3}\n{"name": "Alice", "age"', "A man who", "for i in range(10):",
         "The quick brown fox jumps over the lazy dog. The quick brown", "Dear sir,", "class Foo:",
         "We the people", "To be or not to be", "The city of Toronto", "1, 2, 3, 4, 5,"]
assert len(WORDS) == 20
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
DRAFTERS = {"prompt_lookup": {"prompt_lookup": {"num_tokens": 4, "max_ngram": 3}},
            "draft_model": {"draft_model": {"model": "demo-draft", "num_tokens": 4}},
            "adaptive": {"draft_model": {"num_tokens": 2, "adaptive": True, "max_num_tokens": 6}}}


@pytest.fixture(scope="module")
def ref() -> LLM:
    return LLM("demo", dtype="float32")


@pytest.fixture(scope="module", params=[*DRAFTERS][:2] + [pytest.param("adaptive", marks=pytest.mark.slow)])
def spec(request) -> LLM:
    return LLM("demo", dtype="float32", drafter=DRAFTERS[request.param])


_REF_ALONE: dict[tuple, list[list[int]]] = {}


def _ids(outs) -> list[list[int]]:
    return [c.token_ids for o in outs for c in o.outputs]


def _kinds(i: int) -> dict:
    """Per-request settings of the mixed batch."""
    kind = i % 4
    p: dict = dict(temperature=0.0, max_tokens=[12, 40, 25, 33][i % 4])
    if kind == 1:
        p["repetition_penalty"] = 1.3
    elif kind == 2:
        p["json_schema"] = PERSON
    elif kind == 3:
        p.update(repetition_penalty=1.2, json_schema=PERSON, logprobs=2)
    return p


@pytest.mark.parametrize("setting", ["plain", pytest.param("repetition", marks=pytest.mark.slow),
                                     pytest.param("json", marks=pytest.mark.slow), "both"])
def test_greedy_alone_is_token_identical(ref, spec, setting):
    extra = {"plain": {}, "repetition": {"repetition_penalty": 1.3}, "json": {"json_schema": PERSON},
             "both": {"repetition_penalty": 1.2, "json_schema": PERSON}}[setting]
    sp = SamplingParams(temperature=0.0, max_tokens=30, **extra)
    for prompt in WORDS:  # one request at a time: the batch holds only it
        key = (setting, prompt)
        if key not in _REF_ALONE:  # the same reference for every drafter
            _REF_ALONE[key] = _ids(ref.generate(prompt, sp))
        want = _REF_ALONE[key]
        got = _ids(spec.generate(prompt, sp))
        assert got == want, prompt
    assert spec.engine.check_all_free()
    assert spec.engine.stats()["spec_num_draft_tokens"] > 0


def test_greedy_mixed_batch_is_token_identical(ref, spec):
    prompts = [WORDS[i] for i in range(16)]
    params = [SamplingParams(**_kinds(i)) for i in range(16)]
    want = ref.generate(prompts, params)
    before = spec.engine.stats()
    got = spec.generate(prompts, params)
    assert _ids(got) == _ids(want)
    for g, w in zip(got, want):
        assert g.outputs[0].text == w.outputs[0].text
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
        if w.outputs[0].logprobs is not None:  # several tokens per step: same logprobs and alternatives
            for eg, ew in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
                assert eg.keys() == ew.keys()
                assert all(math.isclose(eg[t], ew[t], abs_tol=1e-4) for t in ew)
        assert math.isclose(g.outputs[0].cumulative_logprob, w.outputs[0].cumulative_logprob, abs_tol=1e-3)
    after = spec.engine.stats()
    assert after["spec_num_accepted_tokens"] > before["spec_num_accepted_tokens"]  # drafts did land
    assert spec.engine.check_all_free()


def test_stop_strings_and_max_tokens_inside_a_verified_step(ref):
    spec = LLM("demo", dtype="float32", drafter={"prompt_lookup": {"num_tokens": 6}})
    prompt = "The cat"  # the demo model repeats " a man who is" : long accepted drafts
    full = ref.generate(prompt, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0].text
    assert full.count("man who") >= 3
    cases = [dict(stop=["who is a man who"]), dict(stop=["man who\nwas"], include_stop_str_in_output=True),
             *[dict(max_tokens=n) for n in (1, 2, 7, 13, 19)], dict(stop_token_ids=[ref.engine.tokenizer.encode(" who")[-1]])]
    for extra in cases:
        sp = SamplingParams(temperature=0, **{"max_tokens": 40, **extra})
        w, g = ref.generate(prompt, sp)[0].outputs[0], spec.generate(prompt, sp)[0].outputs[0]
        assert (g.text, g.token_ids, g.finish_reason, g.stop_reason) == (w.text, w.token_ids, w.finish_reason, w.stop_reason), extra
    st = spec.engine.stats()
    assert st["spec_num_emitted_tokens"] > st["spec_num_verify_steps"]  # several tokens in one step happened
    assert spec.engine.check_all_free()


def test_n_greater_than_one_forks_and_drafts(ref):
    spec = LLM("demo", dtype="float32", drafter={"prompt_lookup": {}})
    sp = SamplingParams(temperature=0, n=3, max_tokens=30, repetition_penalty=1.1)
    got, want = spec.generate("The cat", sp)[0], ref.generate("The cat", sp)[0]
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
    assert spec.engine.check_all_free()


def test_preemption_mid_draft_recovers(ref):
    # a KV pool too small for the batch: sequences are preempted while holding drafts
    kw = dict(dtype="float32", num_kv_blocks=24, block_size=8, max_num_seqs=8)
    small_ref = LLM("demo", **kw)
    for drafter in ({"prompt_lookup": {"num_tokens": 5}}, {"draft_model": {"num_tokens": 4}}):
        spec = LLM("demo", drafter=drafter, **kw)
        prompts = WORDS[:8]
        params = [SamplingParams(**{**_kinds(i), "max_tokens": 60}) for i in range(8)]
        want = small_ref.generate(prompts, params)
        got = spec.generate(prompts, params)
        assert _ids(got) == _ids(want)
        st = spec.engine.stats()
        assert st["num_preemptions"] > 0 and st["spec_num_draft_tokens"] > 0
        assert spec.engine.check_all_free()  # target and draft pools


def test_stats_and_bad_options():
    spec = LLM("demo", drafter={"prompt_lookup": {"num_tokens": 3}})
    spec.generate(WORDS[:4], SamplingParams(temperature=0, max_tokens=20))
    st = spec.engine.stats()
    assert st["spec_num_accepted_tokens"] <= st["spec_num_draft_tokens"]
    assert st["spec_acceptance_rate"] == pytest.approx(st["spec_num_accepted_tokens"] / st["spec_num_draft_tokens"])
    assert st["spec_mean_accepted_length"] == pytest.approx(st["spec_num_accepted_tokens"] / st["spec_num_drafts"])
    assert st["spec_num_emitted_tokens"] == st["spec_num_accepted_tokens"] + st["spec_num_drafts"]
    with pytest.raises(ConfigError, match="min_ngram"):
        LLM("demo", drafter={"prompt_lookup": {"min_ngram": 4, "max_ngram": 2}})
    with pytest.raises(ConfigError, match="num_tokens"):
        LLM("demo", drafter={"draft_model": {"num_tokens": 0}})
    with pytest.raises(ConfigError, match="no-such-model"):
        LLM("demo", drafter={"draft_model": {"model": "no-such-model"}})
    plain = LLM("demo")  # without a drafter nothing speculative is in the step
    assert all(getattr(s, "before_schedule", None) is None for s in plain.engine.core.strategies)
    assert not any(k.startswith("spec_") for k in plain.engine.stats())


def test_prompt_lookup_matches_brute_force():
    import random

    import numpy as np

    from plugins.drafters.prompt_lookup import lookup

    rng = random.Random(0)
    for _ in range(300):
        toks = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        k, lo, hi = rng.randrange(1, 6), rng.randrange(1, 3), rng.randrange(2, 5)
        want: list[int] = []
        for n in range(min(hi, len(toks) - 1), lo - 1, -1):
            pat = toks[len(toks) - n:]
            starts = [s for s in range(len(toks) - n) if toks[s:s + n] == pat]
            if starts:
                want = toks[starts[-1] + n: starts[-1] + n + k]
                break
        assert lookup(np.asarray(toks), k, lo, hi) == want


def _brute_lookup(toks: list[int], k: int, lo: int, hi: int) -> list[int]:
    for n in range(min(hi, len(toks) - 1), lo - 1, -1):
        pat = toks[len(toks) - n:]
        starts = [s for s in range(len(toks) - n) if toks[s:s + n] == pat]
        if starts:
            return toks[starts[-1] + n: starts[-1] + n + k]
    return []


def test_ngram_index_matches_brute_force_as_tokens_grow():
    """The drafter's incremental index proposes exactly what a full rescan finds, at every length."""
    import random

    from plugins.drafters.prompt_lookup import NgramIndex

    rng = random.Random(1)
    for _ in range(40):
        lo, hi = rng.randrange(1, 3), rng.randrange(2, 5)
        idx = NgramIndex(lo, hi)
        toks = [rng.randrange(3) for _ in range(rng.randrange(1, 4))]
        while len(toks) < 40:
            k = rng.randrange(1, 6)
            assert idx.propose(toks, k) == _brute_lookup(toks, k, lo, hi), (toks, k, lo, hi)
            toks += [rng.randrange(3) for _ in range(rng.randrange(1, 4))]  # one step's tokens (1..3)


def test_metrics_endpoint_reports_acceptance(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import http.client
    import json

    from framework.pipeline import load_pipeline
    from framework.server import ServerConfig, ServerThread
    from framework.server.metrics import parse_metrics

    spec = tmp_path / "spec.yaml"
    spec.write_text("model: demo\nengine: {max_num_seqs: 4, kv_cache_memory: 64MiB}\n"
                    "drafter: {prompt_lookup: {num_tokens: 4}}\n")
    srv = ServerThread(load_pipeline(spec), ServerConfig(port=0, log_level="warning")).start()
    try:
        def get(method: str, path: str, body: dict | None = None) -> str:
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
            conn.request(method, path, body=None if body is None else json.dumps(body),
                         headers={"Content-Type": "application/json"})
            data = conn.getresponse().read().decode()
            conn.close()
            return data

        models = json.loads(get("GET", "/v1/models"))["data"]
        done = json.loads(get("POST", "/v1/completions", {"model": models[0]["id"], "prompt": "The cat",
                                                          "max_tokens": 40, "temperature": 0}))
        assert done["usage"]["completion_tokens"] == 40
        m = parse_metrics(get("GET", "/metrics"))
        drafted, accepted = m["decodekit_spec_num_draft_tokens_total"], m["decodekit_spec_num_accepted_tokens_total"]
        assert 0 < accepted <= drafted
        assert m["decodekit_spec_acceptance_rate"] == pytest.approx(accepted / drafted)
        assert m["decodekit_spec_num_emitted_tokens_total"] <= 40
    finally:
        srv.stop()


@pytest.mark.parametrize("drafter", ["prompt_lookup", pytest.param("draft_model", marks=pytest.mark.slow)])
def test_seeded_sampling_reproduces_whatever_the_batch_and_equals_ordinary_decoding(ref, drafter):
    """Seeded draws are keyed by (seed, position): a seeded request gives the same tokens alone,
    inside a batch whose step budget drops drafts, and without any drafter at all."""
    prompt = WORDS[13]
    sp = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=4321, ignore_eos=True)
    plain = ref.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    alone = LLM("demo", dtype="float32", drafter=DRAFTERS[drafter])
    got = alone.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert alone.engine.stats()["spec_num_accepted_tokens"] > 0  # drafts were accepted
    # 8 decoding rows with 4-token drafts do not fit a 12-token step: drafts get dropped
    tight = LLM("demo", dtype="float32", drafter=DRAFTERS[drafter], max_num_batched_tokens=12)
    others = SamplingParams(max_tokens=28, temperature=1.0, ignore_eos=True)
    outs = tight.generate(WORDS[:3] + [prompt] + WORDS[4:8], [others] * 3 + [sp] + [others] * 4, use_tqdm=False)
    st = tight.engine.stats()
    assert st["spec_num_drafts_dropped"] > 0 and st["spec_num_drafts"] > 0
    assert got == plain
    assert outs[3].outputs[0].token_ids == plain
    assert tight.engine.check_all_free() and alone.engine.check_all_free()
