"""The Ray pieces that need no cluster (and run without Ray installed): the callable class users
hand to their own Ray Data jobs, called here on a batch as Ray Data would, against the
single-process run; and the command line's answers when Ray is missing or misused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from framework.batch_run import PromptRecord, run_records
from framework.cli import main
from framework.errors import ConfigError
from framework.ray.batch import PipelinePredictor, open_output
from framework.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "pipelines"

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]
RECORDS = [PromptRecord(id="a", prompt="Once upon a time"), PromptRecord(id="b", messages=MESSAGES),
           PromptRecord(id="c", prompt_token_ids=[1, 40, 52, 7]), PromptRecord(id="d", prompt="The king")]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("predictor") / "spec.yaml"
    path.write_text("model: demo\nsampling: {temperature: 0.7, max_tokens: 5, seed: 3, n: 2}\n")
    return path


@pytest.fixture(scope="module")
def predictor(spec):
    return PipelinePredictor(spec)


def obj(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def strip(rec: dict) -> dict:
    rec = {k: v for k, v in rec.items() if k != "timings"}
    rec["outputs"] = [{k: v for k, v in o.items() if k != "cumulative_logprob"} for o in rec.get("outputs", [])]
    return rec


def test_a_batch_as_ray_data_hands_it_matches_the_single_process_run(spec, predictor, tmp_path):
    ref_path = tmp_path / "ref.jsonl"
    run_records(predictor.pipeline, RECORDS, ref_path, progress=False)
    ref = {r["id"]: r for r in map(json.loads, ref_path.read_text().splitlines())}
    batch = {  # columns as Ray Data gives them (numpy object arrays, nested values as arrays too)
        "id": np.array(["a", "b", "c", "d"], dtype=object),
        "prompt": obj(["Once upon a time", None, None, "The king"]),
        "messages": obj([None, np.array(MESSAGES, dtype=object), None, None]),
        "prompt_token_ids": obj([None, None, np.array([1, 40, 52, 7]), None]),
    }
    out = predictor(batch)
    assert set(out) == {"id", "record", "text", "error"}
    got = {rid: json.loads(line) for rid, line in zip(out["id"], out["record"])}
    assert sorted(got) == sorted(ref) and list(out["error"]) == [None] * 4
    for rid, rec in got.items():
        assert strip(rec) == strip(ref[rid])
        assert [o["cumulative_logprob"] for o in rec["outputs"]] == pytest.approx(
            [o["cumulative_logprob"] for o in ref[rid]["outputs"]], rel=1e-4, abs=1e-4)
    assert [out["text"][list(out["id"]).index(r)] for r in "abcd"] == [ref[r]["outputs"][0]["text"] for r in "abcd"]


def test_bad_rows_fail_alone_with_the_field_named(predictor):
    batch = {
        "id": np.array(["ok", "none", "two", "ids", "msg"], dtype=object),
        "prompt": obj(["The sea", None, "x", None, None]),
        "messages": obj([None, None, np.array(MESSAGES, dtype=object), None, np.array([{"role": "user"}], dtype=object)]),
        "prompt_token_ids": obj([None, None, None, np.array([1.5, 2.0]), None]),
    }
    out = predictor(batch)
    errors = dict(zip(out["id"], out["error"]))
    assert errors["ok"] is None
    assert "needs exactly one of prompt, messages, prompt_token_ids (got none)" in errors["none"]
    assert "(got prompt, messages)" in errors["two"]
    assert "prompt_token_ids" in errors["ids"] and "integers" in errors["ids"]
    assert "content" in errors["msg"]
    for rid, line in zip(out["id"], out["record"]):
        rec = json.loads(line)
        assert rec["id"] == rid and ("error" in rec) == (rid != "ok") and "fingerprint" in rec


def test_an_actor_with_another_spec_than_the_driver_refuses_to_start(spec):
    with pytest.raises(ConfigError, match="differ from the driver"):
        PipelinePredictor(spec, run="0123456789abcdef")


def test_output_directory_means_results_jsonl_inside(spec, tmp_path):
    loaded = load_spec(spec)
    params = loaded.sampling_params()
    sink, _ = open_output(loaded, RECORDS, str(tmp_path / "new") + "/", params)
    sink.close()
    assert (tmp_path / "new" / "results.jsonl").exists()
    sink, _ = open_output(loaded, RECORDS, str(tmp_path / "new"), params)  # an existing directory
    sink.close()


def test_cli_without_ray_installed_says_which_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    out = tmp_path / "out.jsonl"
    rc = main(["run", str(EXAMPLES / "quickstart.yaml"), "--prompts", str(EXAMPLES / "quickstart.txt"),
               "--output", str(out), "--ray", "--no-progress"])
    assert rc == 2 and "pip install 'decodekit[ray]'" in capsys.readouterr().err
    assert not out.exists()


def test_cli_ray_needs_a_prompts_file(capsys):
    assert main(["run", str(EXAMPLES / "quickstart.yaml"), "Once upon a time", "--ray"]) == 2
    assert "--ray needs --prompts FILE" in capsys.readouterr().err


def test_local_run_still_refuses_a_directory_output(tmp_path, capsys):
    rc = main(["run", str(EXAMPLES / "quickstart.yaml"), "--prompts", str(EXAMPLES / "quickstart.txt"),
               "--output", str(tmp_path), "--no-progress"])
    assert rc == 2 and "is a directory" in capsys.readouterr().err
