"""``decodekit validate`` refuses what ``run`` would refuse, before any model loads: constraints
compiled with the tokenizer alone, duplicate YAML keys, a processor set twice, misspelt keys."""

from __future__ import annotations

import pytest

from framework.cli import main


def _validate(tmp_path, text: str, capsys) -> tuple[int, str]:
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    rc = main(["validate", str(spec)])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("body,where,message", [
    ('constraint: {regex: "a(b"}', "2:14: constraint.regex", "invalid regular expression"),
    ("constraint: {json_schema: {type: objekt}}", "2:14: constraint.json_schema", "'objekt' is not valid"),
    ('constraint: {grammar: "start: foo"}', "2:14: constraint.grammar", "'foo' used but not defined"),
    ('sampling: {json_schema: {"$ref": "#/nope"}}', "2:12: sampling.json_schema", "does not resolve"),
    ("processors: [{bad_words: {token_ids: [[99999]]}}]", "processors[0].bad_words", "outside the vocabulary"),
], ids=["regex", "schema", "lark_rule", "ref", "vocab"])
def test_validate_compiles_with_the_tokenizer_only(tmp_path, capsys, monkeypatch, body, where, message):
    import framework.engine as engine  # imported first: it binds load_model at import time
    import framework.models.loader as loader

    def no_weights(*a, **k):  # validate must not load the model
        raise AssertionError("validate loaded the model")

    monkeypatch.setattr(loader, "load_model", no_weights)
    monkeypatch.setattr(engine, "load_model", no_weights)
    rc, err = _validate(tmp_path, f"model: demo\n{body}\n", capsys)
    assert rc == 2 and where in err and message in err, err


def test_duplicate_keys_are_refused_with_their_line(tmp_path, capsys):
    rc, err = _validate(tmp_path, "model: demo\nsampling: {temperature: 0}\nengine: {}\nsampling: {max_tokens: 3}\n", capsys)
    assert rc == 2 and "spec.yaml:4:1: sampling: duplicate key 'sampling' (first given on line 2" in err
    rc, err = _validate(tmp_path, "model: demo\nsampling:\n  top_k: 3\n  top_k: 4\n", capsys)
    assert rc == 2 and "4:3: sampling.top_k: duplicate key 'top_k'" in err


def test_processor_set_twice_is_refused(tmp_path, capsys):
    rc, err = _validate(tmp_path, "model: demo\nsampling: {top_k: 20}\nprocessors:\n  - top_k: {top_k: 40}\n", capsys)
    assert rc == 2 and "processors[0].top_k: processor 'top_k' is set twice: also by sampling.top_k" in err
    rc, err = _validate(tmp_path, "model: demo\nprocessors:\n  - min_p: {min_p: 0.1}\n  - min_p: {min_p: 0.2}\n", capsys)
    assert rc == 2 and "listed twice" in err


@pytest.mark.parametrize("body,hint", [
    ("sampling: {max_new_tokens: 4}", "sampling.max_new_tokens: unknown field; decodekit calls it 'max_tokens'"),
    ("sampling: {temprature: 0.5}", "did you mean 'temperature'?"),
    ("sampling: {max_num_seqs: 4}", "sampling.max_num_seqs: unknown field; it belongs in 'engine'"),
    ("engine: {gpu_memory_utilization: 0.9}", "decodekit calls it 'kv_cache_memory'"),
    ("engine: {max_num_seq: 4}", "did you mean 'max_num_seqs'?"),
    ("temperature: 0.5", "temperature: unknown field; it belongs in 'sampling'"),
    ("procesors: []", "did you mean 'processors'?"),
])
def test_misspelt_keys_get_a_did_you_mean(tmp_path, capsys, body, hint):
    rc, err = _validate(tmp_path, f"model: demo\n{body}\n", capsys)
    assert rc == 2 and hint in err, err


def test_a_good_spec_passes(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: demo\nsampling: {temperature: 0.5}\nconstraint: {regex: '[a-z]+'}\n")
    assert main(["validate", str(spec)]) == 0
    assert "ok" in capsys.readouterr().out
