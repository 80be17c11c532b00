"""The OpenAI-compatible server, through the official ``openai`` client, on a loopback port.

The servers run in-process (uvicorn in a thread) on the bundled demo model when it exists, else
on the tiny random checkpoint of ``conftest.text_model``; nothing here depends on which.
References: an offline :class:`framework.LLM` on the same checkpoint decides what greedy
outputs must be; ``jsonschema`` validates structured outputs.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from framework.server import ServerConfig, ServerThread  # noqa: E402
from framework.server.metrics import parse_metrics  # noqa: E402

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "framework" / "demo" / "demo" / "config.json"
PROMPT = "Once upon a time"


def write_spec(directory: Path, model: str, max_num_seqs: int = 8) -> Path:
    spec = directory / "spec.yaml"
    spec.write_text(
        f"model: {model}\n"
        f"engine: {{max_num_seqs: {max_num_seqs}, kv_cache_memory: 64MiB}}\n"
        "sampling: {max_tokens: 12, temperature: 1.0}\n"
    )
    return spec


@pytest.fixture(scope="module")
def model_ref(request) -> str:
    return "demo" if DEMO_CONFIG.is_file() else str(request.getfixturevalue("text_model"))


def start_server(tmp_path_factory, model: str, plugin_manager=None, **config) -> ServerThread:
    from framework.pipeline import load_pipeline

    spec = write_spec(tmp_path_factory.mktemp("spec"), model, config.pop("max_num_seqs", 8))
    overrides = {} if plugin_manager is None else {"plugin_manager": plugin_manager}
    return ServerThread(load_pipeline(spec, **overrides), ServerConfig(port=0, log_level="warning", **config)).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_ref):
    srv = start_server(tmp_path_factory, model_ref)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory, model_ref):
    """One sequence at a time, a queue of one, an API key and tight limits."""
    srv = start_server(tmp_path_factory, model_ref, max_num_seqs=1, max_queue=1, api_key="s3cret",
                       max_body_bytes=32 * 1024, max_prompt_tokens=64)
    yield srv
    srv.stop()


def client(srv: ServerThread, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(server) -> str:
    return client(server).models.list().data[0].id


def raw(srv: ServerThread, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON or text) over plain http.client."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    if isinstance(body, str):
        body = body.encode()
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = data.decode()
    return resp.status, dict(resp.getheaders()), parsed


def metrics(srv: ServerThread) -> dict[str, float]:
    return parse_metrics(raw(srv, "GET", "/metrics")[2])


def wait_idle(srv: ServerThread, timeout: float = 10.0) -> dict[str, float]:
    """Metrics once no request is in flight and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(srv)
        if m["decodekit_num_requests_active"] == 0 and m["decodekit_kv_blocks_used"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle: {m}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(model_ref):
    """An offline engine on the same checkpoint (greedy references)."""
    from framework import LLM

    return LLM(model_ref, kv_cache_memory="16MiB")


# ---------------------------------------------------------------------------------- basics
def test_models_health_and_metrics(server, model_name):
    assert raw(server, "GET", "/health")[:1] == (200,)
    status, _, body = raw(server, "GET", f"/v1/models/{model_name}")
    assert status == 200 and body["id"] == model_name
    m = metrics(server)
    for name in ("decodekit_num_requests_waiting", "decodekit_num_requests_running", "decodekit_kv_blocks_used",
                 "decodekit_kv_blocks_free", "decodekit_prefix_cache_hit_rate", "decodekit_prompt_tokens_total",
                 "decodekit_generation_tokens_total", "decodekit_time_to_first_token_seconds_count",
                 "decodekit_time_per_output_token_seconds_count", "decodekit_inter_token_latency_seconds_count"):
        assert name in m, name


def test_completion_matches_offline_greedy(server, model_name, reference):
    from framework import SamplingParams

    r = client(server).completions.create(model=model_name, prompt=PROMPT, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    want = reference.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert r.choices[0].text == want.outputs[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == 10 and r.usage.total_tokens == r.usage.prompt_tokens + 10


def test_chat_completion(server, model_name, reference):
    from framework import SamplingParams
    from framework.chat import render_chat

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    r = client(server).chat.completions.create(model=model_name, messages=messages, max_completion_tokens=8,
                                               temperature=0, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.message.role == "assistant" and c.finish_reason == "length"
    tok = reference.tokenizer
    ids = tok.encode(render_chat(tok, messages), add_special_tokens=not tok.chat_template)
    want = reference.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert c.message.content == want.outputs[0].text
    assert r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("kind", ["completions", "chat"])
def test_stream_deltas_equal_non_streamed_text(server, model_name, kind):
    cl = client(server)
    common = dict(model=model_name, max_tokens=24, temperature=0.9, seed=1234, extra_body={"ignore_eos": True})
    if kind == "completions":
        full = cl.completions.create(prompt=PROMPT, **common)
        chunks = list(cl.completions.create(prompt=PROMPT, stream=True, stream_options={"include_usage": True}, **common))
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        want = full.choices[0].text
    else:
        msgs = [{"role": "user", "content": "Hello there"}]
        full = cl.chat.completions.create(messages=msgs, **common)
        chunks = list(cl.chat.completions.create(messages=msgs, stream=True, stream_options={"include_usage": True}, **common))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
        want = full.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) >= 2  # content, then usage (deltas may be merged when the client lags)
    assert text == want
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_n_completions_share_a_request(server, model_name):
    r = client(server).completions.create(model=model_name, prompt=PROMPT, n=3, max_tokens=6, seed=7,
                                          temperature=1.0, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 18
    assert len({c.text for c in r.choices}) > 1  # different samples
    stream = client(server).completions.create(model=model_name, prompt=PROMPT, n=3, max_tokens=6, seed=7,
                                               temperature=1.0, stream=True, extra_body={"ignore_eos": True})
    texts = {0: "", 1: "", 2: ""}
    for ch in stream:
        for c in ch.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in r.choices}


def test_prompt_batch_streams_every_choice(server, model_name):
    cl = client(server)
    kw = dict(model=model_name, prompt=[PROMPT, "The engine"], n=2, max_tokens=5, seed=11, temperature=1.0,
              extra_body={"ignore_eos": True})
    full = cl.completions.create(**kw)
    assert sorted(c.index for c in full.choices) == [0, 1, 2, 3]
    texts: dict[int, str] = {}
    for ch in cl.completions.create(stream=True, **kw):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in full.choices}
    assert full.usage.completion_tokens == 20


def test_completion_logprobs(server, model_name):
    r = client(server).completions.create(model=model_name, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
                                          extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for tok_lp, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and tok_lp <= 0
        assert tok_lp == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely token
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_echo_with_logprobs_scores_the_prompt(server, model_name, reference):
    from framework import SamplingParams

    cl = client(server)
    kw = dict(model=model_name, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, echo=True,
              extra_body={"ignore_eos": True})
    r = cl.completions.create(**kw)
    c, n_prompt = r.choices[0], r.usage.prompt_tokens
    assert c.text.startswith(PROMPT)
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n_prompt + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    want = reference.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2, ignore_eos=True))[0]
    assert n_prompt == len(want.prompt_token_ids)
    for j in range(1, n_prompt):
        tok = want.prompt_token_ids[j]
        assert lp.token_logprobs[j] == pytest.approx(want.prompt_logprobs[j][tok], abs=1e-4)
    assert lp.text_offset[n_prompt] == len(PROMPT) and c.text[len(PROMPT):] == want.outputs[0].text
    chunks = list(cl.completions.create(stream=True, **kw))
    assert sum((ch.choices[0].logprobs.tokens for ch in chunks if ch.choices), []) == lp.tokens
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text


def test_best_of_keeps_the_most_likely_samples(server, model_name):
    cl = client(server)
    kw = dict(model=model_name, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=4, logprobs=0,
              extra_body={"ignore_eos": True})
    all4 = cl.completions.create(n=4, **kw).choices  # the same four samples (per-sample seeds)
    best = cl.completions.create(n=2, best_of=4, **kw).choices
    ranked = sorted(all4, key=lambda c: sum(c.logprobs.token_logprobs), reverse=True)
    assert [c.text for c in best] == [c.text for c in ranked[:2]]
    with pytest.raises(openai.BadRequestError) as ei:
        cl.completions.create(n=3, best_of=2, **kw)
    assert ei.value.body["param"] == "best_of"


def test_reranker_in_the_extra_body(server, model_name):
    """`reranker` reaches the request-finish stage: the built-in logprob reranker with
    per-token normalisation orders best_of candidates by mean log-probability."""
    cl = client(server)
    kw = dict(model=model_name, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=4, logprobs=0)
    all4 = cl.completions.create(n=4, extra_body={"ignore_eos": True}, **kw).choices
    best = cl.completions.create(n=2, best_of=4, extra_body={"ignore_eos": True, "reranker": {"logprob": {"normalize": "length"}}},
                                 **kw).choices
    ranked = sorted(all4, key=lambda c: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs), reverse=True)
    assert [c.text for c in best] == [c.text for c in ranked[:2]]
    with pytest.raises(openai.BadRequestError) as ei:
        cl.completions.create(n=2, extra_body={"reranker": {"logprb": {}}}, **kw)
    assert "logprob" in ei.value.body["message"]  # did you mean ...

def test_chat_logprobs(server, model_name):
    r = client(server).chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
                                               extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert entry.top_logprobs[0].bytes == entry.bytes


def test_stop_string(server, model_name):
    cl = client(server)
    base = cl.completions.create(model=model_name, prompt=PROMPT, max_tokens=16, temperature=0,
                                 extra_body={"ignore_eos": True}).choices[0].text
    stop = base[5:7]
    assert len(stop) == 2
    want = base[: base.find(stop)]
    r = cl.completions.create(model=model_name, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop],
                              extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in cl.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == want


def test_extra_body_processors_and_sampling_fields(server, model_name, reference):
    from framework import SamplingParams

    cl = client(server)
    r = cl.completions.create(model=model_name, prompt=PROMPT, max_tokens=12, temperature=0,
                              extra_body={"processors": [{"repetition_penalty": {"penalty": 3.0}}], "ignore_eos": True})
    want = reference.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, repetition_penalty=3.0, ignore_eos=True))
    assert r.choices[0].text == want[0].outputs[0].text
    # OpenAI's own knobs and the extra ones together
    r = cl.completions.create(model=model_name, prompt=PROMPT, max_tokens=5, temperature=0.7, top_p=0.9, seed=3,
                              presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"5": -100}, user="u1",
                              extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True})
    assert r.usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError) as ei:
        cl.completions.create(model=model_name, prompt=PROMPT, extra_body={"processors": [{"repetition_penalty": {"penalty": -1}}]})
    assert ei.value.body["param"] == "processors[0].repetition_penalty.penalty"
    with pytest.raises(openai.BadRequestError) as ei:
        cl.completions.create(model=model_name, prompt=PROMPT, extra_body={"processors": [{"repetition_penalti": {}}]})
    assert "repetition_penalty" in ei.value.body["message"]  # did you mean ...


SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"enum": [1, 2, 3]}},
          "required": ["answer", "score"], "additionalProperties": False}  # bounded: any model finishes


def test_response_format_json_schema(server, model_name):
    import jsonschema

    cl = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}
    kw = dict(model=model_name, messages=[{"role": "user", "content": "JSON please"}], response_format=fmt,
              max_tokens=200, temperature=0.8, seed=5)
    r = cl.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in cl.chat.completions.create(stream=True, **kw) if ch.choices)
    assert streamed == r.choices[0].message.content
    r = cl.completions.create(model=model_name, prompt=PROMPT, n=3, max_tokens=200, temperature=1.0, seed=9,
                              extra_body={"response_format": fmt})  # completions too (extra body), three samples
    for c in r.choices:
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_response_format_json_object(server, model_name):
    r = client(server).chat.completions.create(model=model_name, messages=[{"role": "user", "content": "JSON"}],
                                               response_format={"type": "json_object"}, max_tokens=64, temperature=0)
    text = r.choices[0].message.content
    assert text.lstrip().startswith("{")  # an object, as OpenAI's JSON mode promises
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_regex_grammar_and_choice(server, model_name):
    import re

    cl = client(server)
    r = cl.completions.create(model=model_name, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=1,
                              extra_body={"regex": "[a-c]{3,5}"})
    assert re.fullmatch("[a-c]{3,5}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = cl.completions.create(model=model_name, prompt=PROMPT, max_tokens=20, temperature=1.0, seed=2,
                              extra_body={"grammar": 'start: "a" ("b" | "bb" | "bbb") "c"\n'})
    assert re.fullmatch("ab{1,3}c", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    texts: dict[int, str] = {}
    for ch in cl.completions.create(model=model_name, prompt=PROMPT, n=3, max_tokens=20, stream=True, seed=3,
                                    extra_body={"choice": ["red", "green", "blue"]}):
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1, 2] and set(texts.values()) <= {"red", "green", "blue"}


def test_bad_constraints_are_400_naming_the_field(server, model_name):
    cl = client(server)
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}
    cases = [
        ({"extra_body": {"response_format": bad_schema}}, "response_format"),
        ({"extra_body": {"regex": "[a-c"}}, "regex"),
        ({"extra_body": {"grammar": "start: undefined_rule"}}, "grammar"),  # fails when it compiles
        ({"extra_body": {"choice": ["a"], "ignore_eos": True}}, "ignore_eos"),
    ]
    for kw, param in cases:
        for stream in (False, True):  # a stream that fails before its first token: an HTTP 400 too
            with pytest.raises(openai.BadRequestError) as ei:
                r = cl.completions.create(model=model_name, prompt=PROMPT, max_tokens=5, stream=stream, **kw)
                list(r) if stream else None
            assert ei.value.body["param"] == param, (kw, ei.value.body)
    wait_idle(server)


def test_constraint_fields_map_onto_the_registered_plugins(server):
    from framework.server.errors import APIError
    from framework.server.protocol import ChatCompletionRequest, CompletionRequest

    builder = server.state.builder
    registry = builder.pm.registry("constraint")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases = [
        (ChatCompletionRequest, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}, "json_schema"),
        (ChatCompletionRequest, {"response_format": {"type": "json_object"}}, "json_schema"),
        (CompletionRequest, {"regex": "[a-z]+"}, "regex"),
        (CompletionRequest, {"choice": ["yes", "no"]}, "choice"),
        (CompletionRequest, {"grammar": 'start: "a"+'}, "grammar"),
    ]
    for model, extra, name in cases:
        base = {"messages": [{"role": "user", "content": "x"}]} if model is ChatCompletionRequest else {"prompt": "x"}
        req = model.model_validate({**base, **extra})
        if name not in registry:
            with pytest.raises(APIError) as ei:
                builder.constraint_for(req)
            assert ei.value.status == 400 and "not supported" in ei.value.message
            continue
        field, got_name, options = builder.constraint_for(req)
        assert (field, got_name) == (next(iter(extra)), name)
        registry.get(name).params.model_validate(options)  # what the plugin will see validates
    assert builder.constraint_for(CompletionRequest.model_validate({"prompt": "x", "response_format": {"type": "text"}})) is None
    for bad, param in (({"regex": "a", "choice": ["b"]}, "choice"), ({"grammar": "/etc/passwd"}, "grammar"),
                       ({"grammar": "/tmp/x:y.lark"}, "grammar"), ({"choice": []}, "choice")):
        with pytest.raises(APIError) as ei:
            builder.constraint_for(CompletionRequest.model_validate({"prompt": "x", **bad}))
        assert ei.value.status == 400 and ei.value.param == param


# ---------------------------------------------------------------------------------- errors
BAD_COMPLETIONS = [
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "logprobs": 50}, "logprobs"),
    ({"prompt": PROMPT, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {"5": 1000}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {"99999999": 1}}, None),
    ({"prompt": PROMPT, "stop": [""]}, "stop"),
    ({"prompt": PROMPT, "seed": 2**70}, "seed"),
    ({"prompt": PROMPT, "repetition_penalty": 1e308}, "repetition_penalty"),  # float32 overflow, not a 500
    ({"prompt": PROMPT, "processors": [{"temperature": {"temperature": 1e300}}]}, "processors[0].temperature.temperature"),
    ({"prompt": PROMPT, "top_k": "many"}, "top_k"),
    ({"prompt": PROMPT, "min_p": 2}, "min_p"),
    ({"prompt": PROMPT, "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": PROMPT, "bogus": 1}, "bogus"),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": PROMPT, "suffix": "x"}, "suffix"),
    ({"prompt": PROMPT, "processors": "nope"}, "processors"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [99999999]}, "prompt"),
    ({"prompt": [[1, 2], []]}, "prompt[1]"),
    ({"prompt": PROMPT, "max_tokens": True}, "max_tokens"),
    ({"prompt": PROMPT, "n": 1.5}, "n"),
    ({"prompt": PROMPT, "processors": [{"repetition_penalty": {"penalty": 1.1}}], "repetition_penalty": 1.2}, "processors"),
    ({"prompt": PROMPT, "processors": [{"constraint": {"grammar": "/etc/passwd.lark"}}]}, "processors[0].constraint"),
    ({}, "prompt"),
]
BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
]


def test_bad_parameters_are_400_naming_the_field(server):
    cases = [("/v1/completions", b, p) for b, p in BAD_COMPLETIONS] + [("/v1/chat/completions", b, p) for b, p in BAD_CHAT]
    for path, body, param in cases:
        status, _, resp = raw(server, "POST", path, json.dumps(body))
        assert status == 400, (body, resp)
        err = resp["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param, (body, err)
    for junk in (b"not json", b"[1, 2]", b"\xff\xfe", b'{"prompt": "x", "n": 1e999}', b'{"prompt": "\\ud800"}',
                 b'{"prompt": "x", "temperature": NaN}'):
        status, _, resp = raw(server, "POST", "/v1/completions", junk)
        assert status == 400, (junk, resp)
    status, _, resp = raw(server, "GET", "/v1/nowhere")
    assert status == 404 and "error" in resp
    wait_idle(server)  # nothing leaked, and the server still works:
    assert raw(server, "POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2}))[0] == 200


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as ei:
        client(server).completions.create(model="gpt-17", prompt=PROMPT)
    assert ei.value.body["code"] == "model_not_found" and ei.value.body["param"] == "model"
    assert raw(server, "GET", "/v1/models/gpt-17")[0] == 404


def test_auth_on(strict, model_ref):
    with pytest.raises(openai.AuthenticationError):
        client(strict, "wrong").models.list()
    status, headers, body = raw(strict, "POST", "/v1/completions", json.dumps({"prompt": PROMPT}))
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert raw(strict, "GET", "/v1/models", headers={"Authorization": "Basic s3cret"})[0] == 401
    r = client(strict, "s3cret").completions.create(model=client(strict, "s3cret").models.list().data[0].id,
                                                    prompt=PROMPT, max_tokens=3)
    assert r.usage.completion_tokens <= 3
    assert raw(strict, "GET", "/health")[0] == 200  # probes need no key
    assert raw(strict, "GET", "/metrics")[0] == 200


def test_auth_off_accepts_any_key(server, model_name):
    assert client(server, "anything").models.list().data[0].id == model_name
    assert raw(server, "GET", "/v1/models")[0] == 200  # and none


def test_too_large_is_413(strict):
    key = {"Authorization": "Bearer s3cret"}
    big = json.dumps({"prompt": "word " * 10000, "max_tokens": 1})
    status, _, body = raw(strict, "POST", "/v1/completions", big, key)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError) as ei:
        client(strict, "s3cret").completions.create(model="x", prompt="word " * 10000)
    assert ei.value.status_code == 413
    long_prompt = json.dumps({"prompt": "The quick brown fox jumps. " * 40, "max_tokens": 1})
    status, _, body = raw(strict, "POST", "/v1/completions", long_prompt, key)
    assert status == 413 and body["error"]["code"] == "prompt_too_long" and body["error"]["param"] == "prompt"


def test_queue_full_is_429_then_disconnects_free_blocks(strict):
    cl = client(strict, "s3cret")
    name = cl.models.list().data[0].id
    before = wait_idle(strict)
    long = dict(model=name, prompt=PROMPT, max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    running = cl.completions.create(**long)
    next(iter(running))  # first token: it holds the only place in the batch
    waiting = cl.completions.create(**long)  # accepted, waits in the queue
    deadline = time.monotonic() + 10
    while metrics(strict)["decodekit_num_requests_waiting"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as ei:
        cl.completions.create(model=name, prompt=PROMPT, max_tokens=2)
    assert ei.value.response.headers["retry-after"] == "1"
    assert ei.value.body["code"] == "queue_full"
    assert metrics(strict)["decodekit_kv_blocks_used"] > 0
    running.close()  # clients disconnect mid-stream: both requests are aborted
    waiting.close()
    after = wait_idle(strict)
    assert after["decodekit_kv_blocks_free"] == after["decodekit_kv_blocks_total"]
    assert after['decodekit_requests_total{finish_reason="abort"}'] >= before.get('decodekit_requests_total{finish_reason="abort"}', 0) + 2
    assert after["decodekit_generation_tokens_total"] - before["decodekit_generation_tokens_total"] < 400


def test_disconnect_mid_stream_frees_blocks(server, model_name):
    before = wait_idle(server)
    stream = client(server).chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Go"}],
                                                    max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)
    assert metrics(server)["decodekit_kv_blocks_used"] > 0
    stream.close()
    after = wait_idle(server)
    assert after["decodekit_kv_blocks_used"] == 0
    assert after["decodekit_generation_tokens_total"] - before["decodekit_generation_tokens_total"] < 400
    engine = server.state.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_disconnect_while_waiting_for_a_non_streamed_result(server, model_name):
    before = wait_idle(server)
    body = json.dumps({"model": model_name, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 10
    while metrics(server)["decodekit_kv_blocks_used"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    conn.close()  # gone before the answer
    after = wait_idle(server)
    aborted = 'decodekit_requests_total{finish_reason="abort"}'
    assert after.get(aborted, 0) == before.get(aborted, 0) + 1
    assert after["decodekit_generation_tokens_total"] - before["decodekit_generation_tokens_total"] < 400


def test_shutting_down_is_503(strict):
    state = strict.state
    state.aengine.stop_accepting()
    try:
        status, headers, body = raw(strict, "POST", "/v1/completions", json.dumps({"prompt": PROMPT}),
                                    {"Authorization": "Bearer s3cret"})
        assert status == 503 and "retry-after" in {k.lower() for k in headers} and body["error"]["type"] == "service_unavailable"
        assert raw(strict, "GET", "/health")[0] == 503
    finally:
        state.aengine.resume_accepting()
    assert raw(strict, "GET", "/health")[0] == 200


def test_concurrent_requests_unaffected_by_a_bad_one(server, model_name):
    cl = client(server)
    prompts = [PROMPT, "The engine", "Hello world", "A"]
    solo = [cl.completions.create(model=model_name, prompt=p, max_tokens=8, temperature=0.8, seed=i,
                                  extra_body={"ignore_eos": True}).choices[0].text for i, p in enumerate(prompts)]
    results: dict[int, str] = {}
    errors: list[int] = []

    def good(i: int) -> None:
        results[i] = cl.completions.create(model=model_name, prompt=prompts[i], max_tokens=8, temperature=0.8, seed=i,
                                           extra_body={"ignore_eos": True}).choices[0].text

    def bad() -> None:
        try:
            cl.completions.create(model=model_name, prompt=PROMPT, extra_body={"top_k": -5})
        except openai.BadRequestError:
            errors.append(400)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(len(prompts))] + [threading.Thread(target=bad)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [400]
    assert [results[i] for i in range(len(prompts))] == solo
    wait_idle(server)


def slow_steps(monkeypatch, engine, seconds: float) -> None:
    """Make every engine step take at least ``seconds`` (so a long request is surely still running)."""
    real_step = engine.step

    def step():
        time.sleep(seconds)
        return real_step()

    monkeypatch.setattr(engine, "step", step)


def test_request_timeout_is_504_and_frees_blocks(server, model_name, monkeypatch):
    before = wait_idle(server)
    slow_steps(monkeypatch, server.state.engine, 0.01)  # 400 tokens take >= 4 s
    monkeypatch.setattr(server.state.aengine.config, "request_timeout", 0.3)
    cl = client(server)
    long = dict(model=model_name, prompt=PROMPT, max_tokens=400, extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIStatusError) as ei:
        cl.completions.create(**long)
    assert ei.value.status_code == 504 and ei.value.body["code"] == "request_timeout"
    with pytest.raises(openai.APIError) as ei:  # streamed: an error event, then [DONE]
        for _ in cl.completions.create(stream=True, **long):
            pass
    assert "timed out" in ei.value.message
    monkeypatch.undo()
    after = wait_idle(server)
    timeouts = 'decodekit_requests_total{finish_reason="timeout"}'
    assert after[timeouts] == before.get(timeouts, 0) + 2
    assert after["decodekit_generation_tokens_total"] - before["decodekit_generation_tokens_total"] < 2 * 400


def test_graceful_shutdown_lets_running_requests_finish(tmp_path_factory, model_ref, monkeypatch):
    srv = start_server(tmp_path_factory, model_ref, shutdown_timeout=60.0)
    engine = srv.state.engine
    cl = client(srv)
    stream = cl.completions.create(model=cl.models.list().data[0].id, prompt=PROMPT, max_tokens=150, stream=True,
                                   stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    slow_steps(monkeypatch, engine, 0.01)  # >= 1.5 s to go: still running when shutdown begins
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    deadline = time.monotonic() + 10
    while True:  # the listening socket closes at once
        try:
            raw(srv, "GET", "/health")
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    chunks = list(it)  # ... while the running request streams to its end
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 150
    stopper.join(30)
    assert not stopper.is_alive() and not srv.state.aengine.is_running
    assert not engine.has_unfinished_requests() and engine.block_manager.check_all_free()


def test_graceful_shutdown_aborts_what_outlives_the_grace(tmp_path_factory, model_ref, monkeypatch):
    srv = start_server(tmp_path_factory, model_ref, shutdown_timeout=0.5)
    engine = srv.state.engine
    cl = client(srv)
    name = cl.models.list().data[0].id
    long = dict(model=name, prompt=PROMPT, max_tokens=400, extra_body={"ignore_eos": True})
    slow_steps(monkeypatch, engine, 0.02)  # 400 tokens take >= 8 s, far beyond the grace
    waiting_result: list[BaseException] = []

    def non_streamed() -> None:
        try:
            cl.completions.create(**long)
        except openai.APIStatusError as exc:
            waiting_result.append(exc)

    waiter = threading.Thread(target=non_streamed)
    waiter.start()
    it = iter(cl.completions.create(stream=True, **long))
    next(it)
    deadline = time.monotonic() + 10
    while metrics(srv)["decodekit_num_requests_active"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    reasons = []
    with pytest.raises(openai.APIError) as ei:  # the stream ends with an error event, not a cut connection
        for chunk in it:
            reasons += [c.finish_reason for c in chunk.choices]
    assert "shutting down" in ei.value.message
    assert set(reasons) <= {None}  # no finish_reason outside OpenAI's set ("abort")
    waiter.join(30)
    assert [e.status_code for e in waiting_result] == [503]
    stopper.join(30)
    assert not stopper.is_alive() and time.monotonic() - t0 < 5.0  # the grace, not the requests' length
    assert not srv.state.aengine.is_running
    assert not engine.has_unfinished_requests() and engine.block_manager.check_all_free()


@pytest.fixture(scope="module")
def templated(tmp_path_factory, text_model):
    """A server on a copy of the test checkpoint whose tokenizer_config.json has a chat template."""
    import shutil

    model = tmp_path_factory.mktemp("templated") / "model"
    shutil.copytree(text_model, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    srv = start_server(tmp_path_factory, str(model))
    yield srv, model
    srv.stop()


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def test_chat_uses_the_tokenizer_config_template(templated):
    from framework import LLM, SamplingParams

    srv, model = templated
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    r = client(srv).chat.completions.create(model="model", messages=messages, max_tokens=6, temperature=0,
                                            extra_body={"ignore_eos": True})
    offline = LLM(str(model), kv_cache_memory="8MiB")
    tok = offline.tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    text = "<s><|system|>\nBe brief.</s>\n<|user|>\nHello world</s>\n<|assistant|>\n"
    ids = tok.encode(text, add_special_tokens=False)  # the template writes <s> itself
    assert r.usage.prompt_tokens == len(ids)
    want = offline.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert r.choices[0].message.content == want.outputs[0].text


def test_plugins_add_routes_behind_the_api_key(tmp_path_factory, model_ref):
    import types

    from fastapi import APIRouter

    from framework.hookspecs import hookimpl
    from framework.plugins import PluginManager

    def routes(state):
        router = APIRouter()

        @router.get("/v1/queue")
        async def queue() -> dict:
            return {"waiting": state.aengine.queue_length(), "model": state.model_name}

        return router

    plugin = types.ModuleType("queue_route")
    plugin.register_routes = hookimpl(lambda register: register("queue", routes))
    pm = PluginManager(load_entry_points=False, extra_plugins=[plugin])
    assert pm.get("route", "queue").source == "queue_route"
    srv = start_server(tmp_path_factory, model_ref, plugin_manager=pm, api_key="k")
    try:
        assert raw(srv, "GET", "/v1/queue")[0] == 401
        status, _, body = raw(srv, "GET", "/v1/queue", headers={"Authorization": "Bearer k"})
        assert status == 200 and body["waiting"] == 0 and body["model"] == client(srv, "k").models.list().data[0].id
    finally:
        srv.stop()

    clash = types.ModuleType("clash_route")
    router = APIRouter()
    router.add_api_route("/health", lambda: {}, methods=["GET"])
    clash.register_routes = hookimpl(lambda register: register("health", router))
    from framework.errors import ConfigError

    with pytest.raises(ConfigError, match="/health"):
        start_server(tmp_path_factory, model_ref, plugin_manager=PluginManager(load_entry_points=False, extra_plugins=[clash]))


def test_serve_command_reports_spec_errors(tmp_path, capsys):
    from framework.cli import main

    assert main(["serve", str(tmp_path / "missing.yaml")]) == 2
    assert "spec file not found" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing.yaml"), "--max-body-size", "lots"]) == 2
