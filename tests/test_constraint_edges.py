"""Constraints at the edges: a compiled-constraint cache keyed by file contents (across
processes), compact JSON by default (and what it saves), bounded ignored whitespace, ends that
fit max_tokens, and one way for every constraint error to reach ``LLM.generate``'s caller.

References: ``jsonschema`` and ``json`` for JSON, Python ``re`` for regexes, lark for lark
grammars.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest

from framework import LLM, SamplingParams
from framework.errors import InvalidRequestError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "framework" / "demo" / "demo"


@pytest.fixture(scope="module")
def demo() -> LLM:
    return LLM("demo", kv_cache_memory="64MiB")


# ------------------------------------------------------------------------------ item 1: cache
_COMPILE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from framework.tokenizer import load_tokenizer
    from plugins.constraints import compile_constraint
    tok = load_tokenizer({demo!r})
    out = []
    for kind, path, texts in json.loads(sys.argv[1]):
        params = {{"schema": path}} if kind == "json_schema" else {{"grammar": path}}
        cg = compile_constraint(kind, tok, params)
        out.append([cg.matches(t) for t in texts])
    print(json.dumps(out))
""")

CASES = [  # kind, file, first contents, second contents, texts (the first matches only the first contents)
    ("grammar", "g.lark", 'start: "yes"\n', 'start: "no"\n', ["yes", "no"]),
    ("gbnf", "g.gbnf", 'root ::= "yes"\n', 'root ::= "no"\n', ["yes", "no"]),
    ("json_schema", "s.json", json.dumps({"const": "yes"}), json.dumps({"const": "no"}), ['"yes"', '"no"']),
]


def _compile_in_fresh_process(cache: Path, jobs: list) -> list[list[bool]]:
    code = _COMPILE.format(root=str(ROOT), demo=str(DEMO))
    env = {**os.environ, "DECODEKIT_CACHE_DIR": str(cache)}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(jobs)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_changed_file_recompiles_across_processes(tmp_path):
    """A .lark, a .gbnf and a .json schema, each compiled by one process (cached on disk), edited,
    compiled by the next: the same path and params, new contents, so a new compilation."""
    cache = tmp_path / "cache"
    jobs = []
    for kind, name, first, _, texts in CASES:
        (tmp_path / name).write_text(first)
        jobs.append((kind, str(tmp_path / name), texts))
    assert _compile_in_fresh_process(cache, jobs) == [[True, False]] * 3
    assert len(list((cache / "constraints").rglob("*.pkl"))) == 3  # the first process stored them on disk
    for _, name, _, second, _ in CASES:
        (tmp_path / name).write_text(second)
    assert _compile_in_fresh_process(cache, jobs) == [[False, True]] * 3
    for _, name, first, _, _ in CASES:  # and back: the first entries are found again
        (tmp_path / name).write_text(first)
    assert _compile_in_fresh_process(cache, jobs) == [[True, False]] * 3


def test_changed_file_recompiles_in_process(tmp_path):
    from framework.tokenizer import load_tokenizer
    from plugins.constraints import compile_constraint

    tok = load_tokenizer(DEMO)
    src = tmp_path / "g.lark"
    src.write_text('start: "yes"\n')
    assert compile_constraint("grammar", tok, {"grammar": str(src)}).matches("yes")
    src.write_text('start: "no"\n')
    cg = compile_constraint("grammar", tok, {"grammar": str(src)})
    assert cg.matches("no") and not cg.matches("yes")


def test_imported_grammar_is_part_of_the_key(tmp_path):
    from plugins.constraints.cache import ConstraintCache

    (tmp_path / "words.lark").write_text('WORD: "a"\n')
    main = tmp_path / "main.lark"
    main.write_text("%import .words.WORD\nstart: WORD\n")
    cache = ConstraintCache(None)
    k1 = cache.key("grammar", {"grammar": str(main), "start": "start"}, "v")
    (tmp_path / "words.lark").write_text('WORD: "b"\n')
    assert cache.key("grammar", {"grammar": str(main), "start": "start"}, "v") != k1


# ------------------------------------------------------------------------------ item 8: whitespace
RECORD = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "role": {"type": "string"}},
          "required": ["name", "age", "role"], "additionalProperties": False}


def test_enum_fits_in_five_tokens(demo):
    """`"alpha"` is five tokens in the demo vocabulary; before, flexible whitespace spent the
    budget on spaces (and the model's favourite one-letter pieces): '              "al'."""
    for seed in range(3):
        out = demo.generate(["Pick:"], SamplingParams(json_schema={"enum": ["alpha"]}, max_tokens=5, seed=seed))[0].outputs[0]
        assert json.loads(out.text) == "alpha", out.text


def test_compact_is_the_json_dumps_layout_and_saves_tokens(demo):
    counts = {}
    for ws in ("flexible", "compact"):
        counts[ws] = 0
        for seed in range(3):
            p = SamplingParams(max_tokens=200, temperature=0.8, seed=seed,
                               **({"json_schema": RECORD} if ws == "compact" else
                                  {"constraint": {"json_schema": {"schema": RECORD, "whitespace": ws}}}))
            out = demo.generate(["A person record in JSON:\n"], p)[0].outputs[0]
            value = json.loads(out.text)
            jsonschema.validate(value, RECORD)
            if ws == "compact":  # the default: exactly json.dumps's layout
                assert out.text == json.dumps(value, ensure_ascii=False)
            counts[ws] += len(out.token_ids)
    assert counts["compact"] < counts["flexible"], counts


def test_response_format_defaults_to_compact():
    from framework.server.protocol import ChatCompletionRequest, ParamsBuilder
    from framework.plugins import get_plugin_manager
    from framework.spec import load_spec

    spec = ROOT / "examples" / "pipelines" / "quickstart.yaml"
    builder = ParamsBuilder(load_spec(spec), get_plugin_manager())
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],
                                response_format={"type": "json_schema", "json_schema": {"schema": RECORD}})
    name, opts = builder.build(req, chat=True).constraint_spec()
    from plugins.constraints import constraint_params

    assert name == "json_schema" and constraint_params(name, opts)["whitespace"] == "compact"


def test_lark_ignored_whitespace_is_bounded():
    from framework.tokenizer import load_tokenizer
    from plugins.constraints import compile_constraint

    tok = load_tokenizer(DEMO)
    cg = compile_constraint("grammar", tok, "json")  # grammars/json.lark: %ignore WS, WS: /[ \t\n\r]+/
    assert cg.matches('{"a":' + " " * 20 + "1}")
    assert not cg.matches('{"a":' + " " * 21 + "1}")
    loose = compile_constraint("grammar", tok, {"grammar": "json", "max_whitespace": 100})
    assert loose.matches('{"a": ' + " " * 60 + "1}")


# ------------------------------------------------------------------------------ item 9: errors
@pytest.mark.parametrize("params,match", [
    ({"regex": "a(b"}, "regex"),
    ({"grammar": "start: foo\n"}, "'foo' used but not defined"),
    ({"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}}, r"\$ref '#/\$defs/missing'"),
    ({"constraint": {"json_schema": {"schema": {"type": "array", "uniqueItems": True}, "strict": True}}}, "uniqueItems"),
    ({"json_schema": {"type": "objekt"}}, "objekt"),
    ({"constraint": {"gbnf": "root ::= undefined"}}, "undefined"),
], ids=["regex", "lark_rule", "ref", "strict_keyword", "meta_schema", "gbnf_rule"])
def test_every_constraint_error_raises_from_generate(demo, params, match):
    free = demo.engine.block_manager.num_free_blocks
    with pytest.raises(InvalidRequestError, match=match) as info:
        demo.generate(["Hi", "There"], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, **params)])
    assert str(info.value).startswith("constraint: ")
    assert not demo.engine.has_unfinished_requests()  # neither request ran
    assert demo.engine.block_manager.num_free_blocks == free
    assert demo.generate(["Hi"], SamplingParams(max_tokens=2))[0].outputs[0].finish_reason == "length"  # engine fine
