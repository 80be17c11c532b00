"""Every spec in examples/pipelines/ validates and runs on the bundled demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from framework.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "pipelines"
SPECS = sorted(EXAMPLES.glob("*.yaml"))


def _prompts_for(spec: Path) -> Path:
    for ext in (".jsonl", ".txt"):
        cand = spec.with_suffix(ext)
        if cand.exists():
            return cand
    raise AssertionError(f"{spec.name} has no prompts file (.txt or .jsonl next to it)")


def test_there_are_examples():
    assert {"quickstart.yaml", "sampling.yaml"} <= {s.name for s in SPECS}


@pytest.mark.parametrize("spec", SPECS, ids=[s.stem for s in SPECS])
def test_example_pipeline_runs(spec: Path, tmp_path):
    assert main(["validate", str(spec)]) == 0
    prompts = _prompts_for(spec)
    out = tmp_path / "out.jsonl"
    assert main(["run", str(spec), "--prompts", str(prompts), "--output", str(out), "--no-progress",
                 "--set", "max_tokens=12"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    n_prompts = sum(1 for ln in prompts.read_text().splitlines() if ln.strip())
    assert len(rows) == n_prompts
    for r in rows:
        assert "error" not in r, r
        assert r["outputs"] and all(o["num_tokens"] >= 1 for o in r["outputs"])
        assert all(o["finish_reason"] in ("stop", "length") for o in r["outputs"])
    sampling = (yaml.safe_load(spec.read_text()) or {}).get("sampling", {})
    if sampling.get("num_beams", 1) > 1:  # beams come best first, each with its score
        for r in rows:
            scores = [o["score"] for o in r["outputs"]]
            assert len(scores) == sampling.get("num_return_sequences", 1)
            assert scores == sorted(scores, reverse=True)
