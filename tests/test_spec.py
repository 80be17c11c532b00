"""Pipeline specs: validation errors with file:line:column, the pipeline, and `decodekit run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from framework.cli import main
from framework.spec import SpecError, load_spec, spec_json_schema


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def spec_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as ei:
        load_spec(path)
    return ei.value


@pytest.fixture()
def model_dir(text_model) -> str:
    return str(text_model)


def test_valid_spec_resolves_everything(tmp_path, model_dir):
    p = write(tmp_path, f"""
model: {model_dir}
engine: {{max_num_seqs: 8}}
sampling: {{temperature: 0.7, max_tokens: 5, seed: 1}}
processors:
  - repetition_penalty: {{penalty: 1.2}}
  - top_k: {{top_k: 40}}
""")
    loaded = load_spec(p)
    assert [r.name for r in loaded.processors] == ["repetition_penalty", "top_k"]
    assert loaded.processors[0].options == {"penalty": 1.2}
    sp = loaded.sampling_params(temperature=0.0)
    assert sp.temperature == 0.0 and sp.max_tokens == 5 and sp.seed == 1
    assert sp.processors == [{"repetition_penalty": {"penalty": 1.2}}, {"top_k": {"top_k": 40}}]


def test_relative_model_path_is_relative_to_the_spec(tmp_path, model_dir):
    sub = tmp_path / "specs"
    sub.mkdir()
    link = tmp_path / "m"
    link.symlink_to(model_dir)
    p = write(sub, "model: ../m\n")
    assert load_spec(p).model_path == str(Path(model_dir).resolve())


def test_misspelt_processor_suggests_nearest_with_line(tmp_path, model_dir):
    p = write(tmp_path, f"""model: {model_dir}
processors:
  - top_k: {{top_k: 5}}
  - repetition_penalti: {{penalty: 1.1}}
""")
    err = spec_error(p)
    assert len(err.issues) == 1
    it = err.issues[0]
    assert (it.line, it.column) == (4, 5)
    assert it.path == "processors[1].repetition_penalti"
    assert "did you mean 'repetition_penalty'?" in str(err)
    assert str(err).startswith(f"{p}:4:5: processors[1].repetition_penalti: unknown logits processor")


def test_unknown_key_wrong_type_and_plugin_option(tmp_path, model_dir):
    p = write(tmp_path, f"""model: {model_dir}
engine:
  max_num_seqs: lots
sampling:
  temprature: 0.5
processors:
  - repetition_penalty: {{penalty: -1, extra: 2}}
colour: blue
""")
    err = spec_error(p)
    by_path = {it.path: it for it in err.issues}
    assert by_path["engine.max_num_seqs"].line == 3 and "integer" in by_path["engine.max_num_seqs"].message
    assert by_path["sampling.temprature"].line == 5 and by_path["sampling.temprature"].message == "unknown field; did you mean 'temperature'?"
    assert by_path["colour"].line == 8 and by_path["colour"].message == "unknown field"
    assert by_path["processors[0].repetition_penalty.extra"].message == "unknown field"
    assert "processors[0].repetition_penalty.penalty" in by_path
    assert by_path["processors[0].repetition_penalty.penalty"].line == 7


def test_yaml_syntax_error_has_line(tmp_path):
    p = write(tmp_path, "model: demo\nsampling: {temperature: 0.5\nprocessors: []\n")
    err = spec_error(p)
    assert err.issues[0].line is not None and err.issues[0].line >= 2
    assert "YAML syntax error" in str(err)


def test_unknown_model_and_missing_file(tmp_path):
    p = write(tmp_path, "sampling: {max_tokens: 3}\nmodel: demmo\n")
    err = spec_error(p)
    assert err.issues[0].line == 2 and err.issues[0].path == "model"
    assert "did you mean 'demo'?" in str(err)
    err = spec_error(tmp_path / "nope.yaml")
    assert "spec file not found" in str(err)


def test_missing_model_key_and_non_mapping(tmp_path):
    err = spec_error(write(tmp_path, "sampling: {max_tokens: 3}\n"))
    assert err.issues[0].path == "model" and err.issues[0].message == "field required"
    err = spec_error(write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert "a spec is a mapping" in str(err)


def test_yaml_is_safe(tmp_path, model_dir):
    p = write(tmp_path, f"model: {model_dir}\nsampling: !!python/object/apply:os.system ['echo hacked']\n")
    err = spec_error(p)
    assert "YAML" in str(err)


def test_json_schema_lists_plugins():
    schema = spec_json_schema()
    items = schema["properties"]["processors"]["items"]["anyOf"]
    names = {next(iter(o["properties"])) for o in items if "properties" in o}
    assert {"repetition_penalty", "top_k", "min_p"} <= names
    assert "temperature" in schema["properties"]["sampling"]["properties"]


def test_cli_validate_and_errors(tmp_path, model_dir, capsys):
    good = write(tmp_path, f"model: {model_dir}\nsampling: {{max_tokens: 3}}\n")
    assert main(["validate", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    bad = write(tmp_path, "model: demo\nprocessors: [{top_kk: {}}]\n", "bad.yaml")
    assert main(["validate", str(bad)]) == 2
    errtext = capsys.readouterr().err
    assert f"{bad}:2:" in errtext and "did you mean 'top_k'?" in errtext and "Traceback" not in errtext
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "decodekit pipeline spec"


def test_cli_run_writes_jsonl_and_resumes(tmp_path, model_dir, capsys):
    spec = write(tmp_path, f"model: {model_dir}\nsampling: {{temperature: 0, max_tokens: 4, ignore_eos: true}}\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": f"hello number {i}"}) for i in range(6)) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["run", str(spec), "--prompts", str(prompts), "--output", str(out), "--no-progress"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == [f"q{i}" for i in range(6)]
    assert all(r["output_tokens"] == 4 and r["finish_reason"] == "length" for r in rows)
    assert "requests: 6 done" in capsys.readouterr().err
    # simulate a kill: drop two results and tear the last line
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][:10])
    assert main(["run", str(spec), "--prompts", str(prompts), "--output", str(out), "--no-progress"]) == 0
    rows2 = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows2) == [f"q{i}" for i in range(6)]  # no duplicates, none lost
    assert "3 skipped" in capsys.readouterr().err
    by_id = {r["id"]: r["outputs"][0]["text"] for r in rows}
    assert all(by_id[r["id"]] == r["outputs"][0]["text"] for r in rows2)  # greedy: same text


def test_cli_run_bad_prompts_file(tmp_path, model_dir, capsys):
    spec = write(tmp_path, f"model: {model_dir}\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": \n')
    assert main(["run", str(spec), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert f"{prompts}:2: invalid JSON" in capsys.readouterr().err


def test_cli_run_chat_messages_and_txt(tmp_path, model_dir):
    spec = write(tmp_path, f"model: {model_dir}\nsampling: {{temperature: 0, max_tokens: 3, ignore_eos: true}}\n")
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"id": "c", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["run", str(spec), "--prompts", str(prompts), "--output", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["prompt"] == [{"role": "user", "content": "hi"}]
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    out2 = tmp_path / "o2.jsonl"
    assert main(["run", str(spec), "--prompts", str(txt), "--output", str(out2), "--no-progress"]) == 0
    assert sorted(json.loads(x)["id"] for x in out2.read_text().splitlines()) == ["1", "3"]


def test_killed_run_resumes_to_the_same_ids(tmp_path, model_dir):
    """Kill `decodekit run` mid-way (SIGKILL), run it again: same ids as a clean run, no duplicates."""
    spec = write(tmp_path, f"model: {model_dir}\nengine: {{max_num_seqs: 2}}\nsampling: {{temperature: 0, max_tokens: 24, ignore_eos: true}}\n")
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(40)))
    out = tmp_path / "o.jsonl"
    cmd = [sys.executable, "-m", "framework.cli", "run", str(spec), "--prompts", str(prompts), "--output", str(out), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 5):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    partial = len(out.read_text().splitlines())
    assert 5 <= partial < 40
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 40
    assert set(ids) == {str(i + 1) for i in range(40)}


def test_pipelines_doc_is_in_sync():
    from framework.spec import reference_markdown

    doc = (Path(__file__).resolve().parents[1] / "docs" / "pipelines.md").read_text()
    assert doc == reference_markdown(), "docs/pipelines.md is stale: run `python tools/gen_docs.py`"


def test_load_pipeline_generate_and_overrides(tmp_path, model_dir):
    from framework import load_pipeline

    p = write(tmp_path, f"model: {model_dir}\nsampling: {{temperature: 0, max_tokens: 6, ignore_eos: true}}\n"
                        "processors:\n  - repetition_penalty: {penalty: 1.5}\n")
    pipe = load_pipeline(p)
    out = pipe.generate(["hello there", "the engine"])
    assert [len(o.outputs[0].token_ids) for o in out] == [6, 6]
    short = pipe.generate("hello there", max_tokens=2)[0]
    assert short.outputs[0].token_ids == out[0].outputs[0].token_ids[:2]  # greedy: a prefix
    assert "".join(pipe.stream("hello there")) == out[0].outputs[0].text
    # the spec's processor is the same as the SamplingParams field of the same name
    from framework import SamplingParams

    direct = pipe.llm.generate("hello there", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.5))
    assert direct[0].outputs[0].token_ids == out[0].outputs[0].token_ids
