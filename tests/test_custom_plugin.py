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


def test_companion_plugin_from_a_spec_matches_transformers(installed, tmp_path):
    """`blend` adds a companion model's log-probabilities; greedy outputs equal a reference
    that runs both models with transformers and combines their logits the same way."""
    import transformers
    import torch

    from framework.demo import DEMO_DIR
    from framework.tokenizer import load_tokenizer

    texts = ["Once upon a time", "The for statement"]
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(texts) + "\n")
    spec = tmp_path / "blend.yaml"
    spec.write_text("model: demo\nmodels: {amateur: demo-draft}\n"
                    "sampling: {temperature: 0, max_tokens: 10, ignore_eos: true}\n"
                    "processors:\n  - blend: {model: amateur, weight: 1.5}\n")
    out = tmp_path / "o.jsonl"
    r = subprocess.run([sys.executable, "-m", "framework.cli", "run", str(spec), "--prompts", str(prompts),
                        "--output", str(out), "--no-progress"], capture_output=True, text=True, env=_env(installed))
    assert r.returncode == 0, r.stderr
    got = [json.loads(x)["outputs"][0]["text"] for x in out.read_text().splitlines()]
    tok = load_tokenizer(DEMO_DIR / "demo")
    main = transformers.AutoModelForCausalLM.from_pretrained(DEMO_DIR / "demo", dtype=torch.float32).eval()
    amateur = transformers.AutoModelForCausalLM.from_pretrained(DEMO_DIR / "demo-draft", dtype=torch.float32).eval()
    plain_differs = False
    for text, got_text in zip(texts, got):
        seq = tok.encode(text)
        n_prompt = len(seq)
        ref = []
        for _ in range(10):
            with torch.no_grad():
                x = torch.tensor([seq])
                z = main(x).logits[0, -1] + 1.5 * torch.log_softmax(amateur(x).logits[0, -1], dim=-1)
                plain_differs |= int(main(x).logits[0, -1].argmax()) != int(z.argmax())
            ref.append(int(z.argmax()))
            seq.append(ref[-1])
        assert got_text == tok.decode(seq)[len(tok.decode(seq[:n_prompt])):]
    assert plain_differs  # the companion changed some choice
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: demo\nprocessors:\n  - blend: {model: no-such-model}\n")
    r = subprocess.run([sys.executable, "-m", "framework.cli", "run", str(bad), "Once upon"], capture_output=True, text=True,
                       env=_env(installed))
    assert r.returncode != 0 and "no-such-model" in r.stderr
