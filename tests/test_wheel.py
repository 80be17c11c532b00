"""A built wheel works where the source tree is not: the shipped grammars are package data.

Builds a wheel from a copy of the project, installs it (no dependencies: the test's own
environment provides them, through ``--system-site-packages``) into a fresh virtual environment,
and runs the installed code from a directory that holds no source — checking first that every
module really comes from the venv.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("decodekit", "framework", "plugins", "grammars", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")

CHECK = textwrap.dedent("""
    import sys
    from pathlib import Path
    import decodekit, framework, plugins, plugins.constraints.grammar as g
    venv = Path(sys.prefix).resolve()
    for mod in (decodekit, framework, plugins, g):
        assert venv in Path(mod.__file__).resolve().parents, (mod.__name__, mod.__file__)
    assert venv in g.GRAMMARS_DIR.resolve().parents, g.GRAMMARS_DIR
    from plugins.constraints.frontends import shipped_grammars
    assert {"json", "arithmetic", "sql_select", "function_call"} <= set(shipped_grammars()), shipped_grammars()
    from framework.demo import demo_model_dir
    from framework.tokenizer import load_tokenizer
    from plugins.constraints import compile_constraint
    cg = compile_constraint("grammar", load_tokenizer(demo_model_dir("demo")), "json")
    assert cg.matches('{"a": [1, 2]}') and not cg.matches('{"a": [1, 2]')
    from decodekit import LLM, SamplingParams
    print("ok")
""")


def test_wheel_ships_grammars_and_runs_outside_the_source(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(p, src / name)
    assert not (src / "plugins" / "constraints" / "grammars").exists()  # only the top-level folder is the source
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("decodekit-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "plugins/constraints/grammars/json.lark" in names and "decodekit/__init__.py" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    inst = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run([str(py), "-I", "-c", CHECK], cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
    cli = subprocess.run([str(venv / "bin" / "decodekit"), "plugins", "--kind", "constraint"], cwd=elsewhere,
                         capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0 and "json_schema" in cli.stdout, cli.stderr
