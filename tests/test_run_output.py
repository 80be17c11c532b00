"""``decodekit run``'s output file: never destroys what it did not write, resumes only what
matches (spec, overrides, prompt), retries failures, and the small things around it
(``--output -``, the summary of a fully resumed run, errors on their own line, n > 1 labelled).

Every test drives the real command (``framework.cli.main``) on the bundled demo model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from framework.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "pipelines"
QUICK = EXAMPLES / "quickstart.yaml"
QUICK_TXT = EXAMPLES / "quickstart.txt"


def run(*args: str) -> int:
    return main(["run", *map(str, args), "--no-progress", "--set", "max_tokens=3"])


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_refuses_a_file_that_is_not_a_results_file(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nline two\n")
    assert run(QUICK, "--prompts", QUICK_TXT, "--output", notes) == 2
    assert notes.read_text() == "my notes\nline two\n"  # untouched (it was truncated to zero)
    assert "not a decodekit results file" in capsys.readouterr().err
    data = tmp_path / "data.jsonl"  # JSON lines, but not ours
    data.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert run(QUICK, "--prompts", QUICK_TXT, "--output", data, "--overwrite") == 2
    assert data.read_text() == '{"text": "a"}\n{"text": "b"}\n'


def test_bad_line_in_the_middle_keeps_the_results_after_it(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run(QUICK, "--prompts", QUICK_TXT, "--output", out) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    out.write_text(lines[0] + "\n\nnot json\n" + lines[1] + "\n" + lines[2] + "\n")  # a blank and a bad line
    before = out.read_text()
    capsys.readouterr()
    assert run(QUICK, "--prompts", QUICK_TXT, "--output", out) == 0
    err = capsys.readouterr().err
    assert "0 done, 3 skipped" in err  # ids 2 and 3 (after the bad lines) still count
    assert "not result records (line 2, 3)" in err
    assert out.read_text() == before  # nothing deleted, nothing regenerated


def test_only_a_torn_last_line_is_cut(tmp_path):
    out = tmp_path / "out.jsonl"
    assert run(QUICK, "--prompts", QUICK_TXT, "--output", out) == 0
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][: len(lines[2]) // 2])  # killed while writing id 3
    assert run(QUICK, "--prompts", QUICK_TXT, "--output", out) == 0
    got = rows(out)
    assert [r["id"] for r in got] == ["1", "2", "3"]
    assert got[0] == json.loads(lines[0]) and got[1] == json.loads(lines[1])


def test_another_spec_or_override_is_refused_and_overwrite_starts_afresh(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert run(QUICK, "--prompts", QUICK_TXT, "--output", out) == 0
    first = out.read_text()
    # the sampling example's ids are not the quickstart's: resuming would mix two runs
    assert run(EXAMPLES / "sampling.yaml", "--prompts", EXAMPLES / "sampling.jsonl", "--output", out) == 2
    assert "another spec" in capsys.readouterr().err
    assert main(["run", str(QUICK), "--prompts", str(QUICK_TXT), "--output", str(out), "--no-progress",
                 "--set", "max_tokens=4"]) == 2  # another override
    assert out.read_text() == first
    assert main(["run", str(QUICK), "--prompts", str(QUICK_TXT), "--output", str(out), "--no-progress",
                 "--set", "max_tokens=4", "--overwrite"]) == 0
    assert [r["outputs"][0]["num_tokens"] for r in rows(out)] == [4, 4, 4]


def test_txt_ids_are_line_numbers_so_an_inserted_prompt_is_refused(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\nThe king said\n")
    out = tmp_path / "out.jsonl"
    assert run(QUICK, "--prompts", prompts, "--output", out) == 0
    prompts.write_text("A new first line\nOnce upon a time\nThe king said\n")
    assert run(QUICK, "--prompts", prompts, "--output", out) == 2
    assert "another prompt" in capsys.readouterr().err
    assert len(rows(out)) == 2


def test_failed_requests_exit_nonzero_and_are_retried(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "prompt": "Once upon a time"}\n{"id": "b", "prompt": "The king"}\n'
                       '{"id": "bad", "prompt_token_ids": [999999]}\n')
    out = tmp_path / "out.jsonl"
    assert run(QUICK, "--prompts", prompts, "--output", out) == 1  # one failed
    got = {r["id"]: r for r in rows(out)}
    assert "outside the vocabulary" in got["bad"]["error"]
    # a later run retries failures, and only them
    lines = out.read_text().splitlines()
    # turn b's result into an error record (as a crash of its constraint would leave it)
    b = json.loads(lines[1])
    lines[1] = json.dumps({"id": "b", "prompt": b["prompt"], "fingerprint": b["fingerprint"], "error": "boom"})
    out.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert run(QUICK, "--prompts", prompts, "--output", out) == 1  # bad fails again
    err = capsys.readouterr().err
    assert "1 done, 1 skipped" in err and "1 failed" in err  # b regenerated, a skipped
    last = {}
    for r in rows(out):
        last[r["id"]] = r
    assert "outputs" in last["b"] and "error" not in last["b"]


def test_output_dash_writes_stdout_and_summary_of_a_resumed_run(tmp_path, capsys):
    assert run(QUICK, "--prompts", QUICK_TXT, "--output", "-") == 0
    captured = capsys.readouterr()
    assert [json.loads(x)["id"] for x in captured.out.splitlines()] == ["1", "2", "3"]
    out = tmp_path / "out.jsonl"
    assert run(QUICK, "--prompts", QUICK_TXT, "--output", out) == 0
    capsys.readouterr()
    assert run(QUICK, "--prompts", QUICK_TXT, "--output", out) == 0
    err = capsys.readouterr().err
    assert "nan" not in err and "0 done, 3 skipped" in err


def test_single_prompt_error_is_on_its_own_line(tmp_path, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text("model: demo\nsampling: {max_tokens: 4}\nconstraint: {grammar: 'start: foo'}\n")
    assert main(["run", str(spec), "Once upon a time"]) == 2
    cap = capsys.readouterr()
    assert cap.out.endswith("\n")  # the prompt's line is ended before the error is shown
    assert cap.err.startswith("error: ") and "foo" in cap.err


def test_single_prompt_with_n_prints_each_sample_labelled(capsys):
    assert main(["run", str(EXAMPLES / "sampling.yaml"), "Once upon a time", "--set", "max_tokens=6"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample 1/2") == 1 and out.count("--- sample 2/2") == 1
    first, second = out.split("--- sample 2/2")
    assert first.count("Once upon a time") == 1 and second.count("Once upon a time") == 1


def test_plugins_kind_accepts_the_documented_spellings(capsys):
    for kind in ("logits_processor", "logits-processor", "processors", "processor"):
        assert main(["plugins", "--kind", kind, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got and {r["kind"] for r in got} == {"logits_processor"}
    assert main(["plugins", "--kind", "constraints", "--json"]) == 0
    assert {r["kind"] for r in json.loads(capsys.readouterr().out)} == {"constraint"}
    assert main(["plugins", "--kind", "samplr"]) == 2
    assert "did you mean 'sampler'?" in capsys.readouterr().err


def test_skip_tokenizer_init_runs_a_directory_without_tokenizer_files(tmp_path, capsys):
    """A model directory with only config.json and weights: token-id prompts in, token ids out,
    from the spec's engine section (and the same from LLM(skip_tokenizer_init=True))."""
    import shutil

    from framework import LLM, SamplingParams
    from framework.demo import demo_model_dir

    model = tmp_path / "bare"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(demo_model_dir("demo") / name, model / name)
    ids = [1, 430, 1011, 1183, 264, 795]  # "Once upon a time" in the demo vocabulary
    want = LLM("demo").generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=5, temperature=0))[0].outputs[0].token_ids
    llm = LLM(str(model), skip_tokenizer_init=True)
    got = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=5, temperature=0))[0].outputs[0]
    assert got.token_ids == want and got.text == ""
    spec = tmp_path / "s.yaml"
    spec.write_text(f"model: {model}\nengine: {{skip_tokenizer_init: true}}\nsampling: {{temperature: 0, max_tokens: 5}}\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "x", "prompt_token_ids": ids}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["validate", str(spec)]) == 0
    assert main(["run", str(spec), "--prompts", str(prompts), "--output", str(out), "--no-progress"]) == 0
    (r,) = rows(out)
    assert r["outputs"][0]["token_ids"] == want
    assert main(["generate", "-m", str(model), "--skip-tokenizer-init", "--max-tokens", "5", " ".join(map(str, ids))]) == 0
    assert capsys.readouterr().out.strip().endswith(" ".join(map(str, want)))
