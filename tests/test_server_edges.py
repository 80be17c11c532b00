"""The server as clients written for vLLM and OpenAI use it: ``n`` from the request (not the
spec), vLLM's ``guided_*`` / ``structured_outputs`` aliases, ``/tokenize``, ``/detokenize``,
``/version``, and unknown fields that point at the decodekit name.

References: ``jsonschema`` validates structured outputs; Python's ``re`` checks regex outputs;
the tokenizer itself decides what ``/tokenize`` must return.
"""

from __future__ import annotations

import http.client
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from framework.server import ServerConfig, ServerThread  # noqa: E402

SAMPLING_SPEC = Path(__file__).resolve().parents[1] / "examples" / "pipelines" / "sampling.yaml"


def raw(srv: ServerThread, method: str, path: str, body: dict | None = None) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request(method, path, body=None if body is None else json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data.decode()


def start(spec: Path, **overrides) -> ServerThread:
    from framework.pipeline import load_pipeline

    return ServerThread(load_pipeline(spec, kv_cache_memory="64MiB", **overrides), ServerConfig(port=0, log_level="warning")).start()


@pytest.fixture(scope="module")
def server():
    """The README's server: examples/pipelines/sampling.yaml, whose sampling section has n: 2."""
    srv = start(SAMPLING_SPEC)
    yield srv
    srv.stop()


def client(srv: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)


# ------------------------------------------------------------------------------------ n
def test_spec_n_does_not_apply_to_server_requests(server):
    """sampling.yaml says n: 2 (for `decodekit run`); an OpenAI request that leaves n out gets
    one choice, as OpenAI's API does, and a request that asks for 3 gets 3."""
    c = client(server)
    r = c.completions.create(model="demo", prompt="Once upon a time", max_tokens=8)
    assert len(r.choices) == 1
    r3 = c.completions.create(model="demo", prompt="Once upon a time", max_tokens=4, n=3)
    assert sorted(ch.index for ch in r3.choices) == [0, 1, 2]
    chat = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert len(chat.choices) == 1


def test_readme_streaming_snippet_is_one_answer(server):
    """The README's streaming loop prints choices[0] of every chunk: every chunk must belong to
    the one completion (before the fix, half of them were sample 1's, interleaved)."""
    chunks = list(client(server).completions.create(model="demo", prompt="Once upon a time", max_tokens=16, stream=True,
                                                    extra_body={"top_k": 40, "processors": [{"no_repeat_ngram": {"size": 3}}]}))
    assert chunks and all(ch.choices[0].index == 0 for ch in chunks if ch.choices)


def test_server_section_sets_n_for_requests(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: demo\nsampling: {max_tokens: 4, n: 5}\nserver:\n  sampling: {n: 2}\n")
    srv = start(spec)
    try:
        c = client(srv)
        assert len(c.completions.create(model="demo", prompt="Hello", max_tokens=3).choices) == 2
        assert len(c.completions.create(model="demo", prompt="Hello", max_tokens=3, n=1).choices) == 1
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------ aliases
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"],
          "additionalProperties": False}


@pytest.mark.parametrize("body", [
    {"guided_json": SCHEMA},
    {"guided_json": json.dumps(SCHEMA)},
    {"structured_outputs": {"json": SCHEMA}},
], ids=["guided_json", "guided_json_text", "structured_outputs"])
def test_vllm_json_aliases(server, body):
    r = client(server).completions.create(model="demo", prompt="A person:", max_tokens=40, temperature=0,
                                          extra_body=body)
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_vllm_regex_choice_grammar_aliases(server):
    c = client(server)
    r = c.completions.create(model="demo", prompt="Q:", max_tokens=12, temperature=0, extra_body={"guided_regex": "[A-Z][a-z]{2,6}"})
    assert re.fullmatch("[A-Z][a-z]{2,6}", r.choices[0].text)
    r = c.completions.create(model="demo", prompt="Q:", max_tokens=6, extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no")
    r = c.completions.create(model="demo", prompt="Q:", max_tokens=6, extra_body={"structured_outputs": {"choice": ["up", "down"]}})
    assert r.choices[0].text in ("up", "down")
    r = c.completions.create(model="demo", prompt="Q:", max_tokens=6, extra_body={"guided_grammar": 'root ::= "ab" | "cd"'})
    assert r.choices[0].text in ("ab", "cd")  # GBNF, as vLLM's default backend takes
    r = c.completions.create(model="demo", prompt="Q:", max_tokens=6, extra_body={"guided_grammar": 'start: "xy" | "zw"'})
    assert r.choices[0].text in ("xy", "zw")  # lark


def test_alias_errors_name_the_field(server):
    status, body = raw(server, "POST", "/v1/completions", {"model": "demo", "prompt": "Q:", "guided_regex": "a(b"})
    assert status == 400 and body["error"]["param"] == "guided_regex" and "regex" in body["error"]["message"]
    status, body = raw(server, "POST", "/v1/completions", {"model": "demo", "prompt": "Q:", "guided_json": {"type": "object"},
                                                           "regex": "a+"})
    assert status == 400 and "at most one" in body["error"]["message"]
    status, body = raw(server, "POST", "/v1/completions", {"model": "demo", "prompt": "Q:", "guided_whitespace_pattern": " "})
    assert status == 400 and body["error"]["param"] == "guided_whitespace_pattern"


# ------------------------------------------------------------------------------------ fields
@pytest.mark.parametrize("field,value,hint", [
    ("max_new_tokens", 5, "decodekit calls it 'max_tokens'"),
    ("gpu_memory_utilization", 0.9, "engine option"),
    ("top_kk", 5, "did you mean 'top_k'?"),
    ("num_beams", 4, "spec's sampling section"),
])
def test_unknown_fields_point_at_the_decodekit_name(server, field, value, hint):
    status, body = raw(server, "POST", "/v1/completions", {"model": "demo", "prompt": "Q:", field: value})
    assert status == 400 and body["error"]["param"] == field and body["error"]["code"] == "unknown_parameter"
    assert hint in body["error"]["message"], body


# ------------------------------------------------------------------------------------ utilities
def test_tokenize_detokenize_version(server):
    tok = server.state.tokenizer
    status, body = raw(server, "POST", "/tokenize", {"model": "demo", "prompt": "Once upon a time"})
    assert status == 200 and body["tokens"] == tok.encode("Once upon a time") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == server.state.engine.max_model_len
    status, back = raw(server, "POST", "/detokenize", {"model": "demo", "tokens": body["tokens"]})
    assert status == 200 and back["prompt"].strip().endswith("Once upon a time")
    status, chat = raw(server, "POST", "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    from framework.chat import render_chat

    text = render_chat(tok, [{"role": "user", "content": "Hi"}])
    assert status == 200 and chat["tokens"] == tok.encode(text, add_special_tokens=not getattr(tok, "chat_template", None))
    status, v = raw(server, "GET", "/version")
    from framework import __version__

    assert status == 200 and v == {"version": __version__}
    status, err = raw(server, "POST", "/detokenize", {"tokens": [10 ** 9]})
    assert status == 400 and err["error"]["param"] == "tokens"
    status, err = raw(server, "POST", "/tokenize", {"promt": "x"})
    assert status == 400 and "did you mean 'prompt'?" in err["error"]["message"]
