"""A third-party plugin package, installed the way users install one, used from a YAML spec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(ROOT / "examples" / "custom_plugin")],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert list(target.glob("decodekit_shout-*.dist-info"))
    return target


def _env(site: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))


def test_plugin_is_listed(installed):
    r = subprocess.run([sys.executable, "-m", "framework.cli", "plugins", "--json", "--kind", "logits_processor"],
                       capture_output=True, text=True, env=_env(installed))
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row["source"] for row in json.loads(r.stdout)}
    assert rows["shout"] == "shout"
    # DECODEKIT_PLUGINS restricts third-party plugins
    r = subprocess.run([sys.executable, "-m", "framework.cli", "plugins", "--json"], capture_output=True, text=True,
                       env=dict(_env(installed), DECODEKIT_PLUGINS="none"))
    assert "shout" not in {row["name"] for row in json.loads(r.stdout)}


def test_plugin_changes_output_from_a_spec(installed, text_model, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\nthe engine\n")
    results = {}
    for bonus in (0.0, 50.0):
        spec = tmp_path / f"s{bonus}.yaml"
        spec.write_text(f"model: {text_model}\nsampling: {{temperature: 0, max_tokens: 8, ignore_eos: true}}\n"
                        f"processors:\n  - shout: {{bonus: {bonus}}}\n")
        out = tmp_path / f"o{bonus}.jsonl"
        r = subprocess.run([sys.executable, "-m", "framework.cli", "run", str(spec), "--prompts", str(prompts),
                            "--output", str(out), "--no-progress"], capture_output=True, text=True, env=_env(installed))
        assert r.returncode == 0, r.stderr
        results[bonus] = [json.loads(x)["outputs"][0]["text"] for x in out.read_text().splitlines()]
    # with a huge bonus every generated word starts upper-case; without it the text differs
    assert results[0.0] != results[50.0]
    for text in results[50.0]:
        words = text.split()
        assert words and all(w[0].isupper() for w in words if w[0].isalpha()), text
    # a bad option is caught when the spec is validated, with its line
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {text_model}\nprocessors:\n  - shout: {{bonus: -1}}\n")
    r = subprocess.run([sys.executable, "-m", "framework.cli", "validate", str(bad)], capture_output=True, text=True, env=_env(installed))
    assert r.returncode == 2 and f"{bad}:3:" in r.stderr and "processors[0].shout.bonus" in r.stderr
