"""Plugin manager: registration, duplicates, entry points, env filtering, docs, CLI listing."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

import framework.plugins as fp
from framework import hookspecs
from framework.errors import PluginError
from framework.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parents[1]


def _plugin(name: str, **hooks) -> types.ModuleType:
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(mod, hook_name, hookimpl(fn))
    return mod


def test_builtins_register_through_hooks():
    pm = fp.PluginManager(load_entry_points=False)
    assert {"hf", "sentencepiece"} <= set(pm.registry("tokenizer").names())
    assert "LlamaForCausalLM" in pm.registry("model")
    assert pm.get("sampler", "default").source == "plugins.samplers"
    assert pm.get("model", "Qwen3ForCausalLM").source == "framework.models"


def test_duplicate_name_names_both_sources():
    clash = _plugin("my_plugin", register_samplers=lambda register: register("default", object))
    with pytest.raises(PluginError, match=r"sampler 'default' is registered twice: by plugin 'plugins.samplers' and by plugin 'my_plugin'"):
        fp.PluginManager(load_entry_points=False, extra_plugins=[clash])


def test_unknown_name_suggests_nearest():
    pm = fp.PluginManager(load_entry_points=False)
    with pytest.raises(PluginError, match=r"unknown sampler 'defualt'; did you mean 'default'\?"):
        pm.get("sampler", "defualt")
    with pytest.raises(PluginError, match=r"unknown drafter 'eagle' \(registered: none\)"):
        pm.get("drafter", "eagle")


def test_third_party_plugin_via_entry_point_and_env_filter(monkeypatch):
    mod = _plugin("acme_plugin", register_rerankers=lambda register: register("acme-best", object, params=None))
    sys.modules["acme_plugin"] = mod

    class EP:
        name, value, group = "acme", "acme_plugin", "decodekit"

        def load(self):
            return mod

    monkeypatch.setattr(fp, "entry_points", lambda group: [EP()] if group == "decodekit" else [])
    monkeypatch.delenv("DECODEKIT_PLUGINS", raising=False)
    pm = fp.PluginManager()
    assert pm.get("reranker", "acme-best").source == "acme"
    monkeypatch.setenv("DECODEKIT_PLUGINS", "other")
    assert "acme-best" not in fp.PluginManager().registry("reranker")
    monkeypatch.setenv("DECODEKIT_PLUGINS", "other, acme")
    assert "acme-best" in fp.PluginManager().registry("reranker")
    monkeypatch.setenv("DECODEKIT_PLUGINS", "none")
    assert "acme-best" not in fp.PluginManager().registry("reranker")


def test_broken_entry_point_names_the_plugin(monkeypatch):
    class EP:
        name, value, group = "broken", "broken_mod:thing", "decodekit"

        def load(self):
            raise ImportError("No module named 'broken_mod'")

    monkeypatch.setattr(fp, "entry_points", lambda group: [EP()])
    with pytest.raises(PluginError, match=r"plugin 'broken' \(broken_mod:thing\) failed to import"):
        fp.PluginManager()


def test_event_hooks_reach_observers(checkpoints):
    from framework import LLM, SamplingParams

    seen: dict[str, list] = {"added": [], "steps": [], "finished": []}
    obs = _plugin(
        "observer",
        on_request_added=lambda request: seen["added"].append(request.request_id),
        on_step_finished=lambda stats: seen["steps"].append(stats),
        on_request_finished=lambda output: seen["finished"].append(output),
    )
    pm = fp.PluginManager(load_entry_points=False, extra_plugins=[obs])
    llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, plugin_manager=pm)
    llm.generate([[5, 6, 7], [8, 9]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(seen["added"]) == 2 and len(seen["finished"]) == 2
    assert all(o.finished and len(o.outputs[0].token_ids) == 3 for o in seen["finished"])
    assert seen["steps"][0].num_prefill_tokens == 5
    assert sum(s.num_decode_tokens for s in seen["steps"]) == 4
    assert seen["steps"][-1].kv_blocks_used == 0


def test_observer_errors_do_not_break_the_engine(checkpoints):
    from framework import LLM, SamplingParams

    def boom(stats):
        raise RuntimeError("observer bug")

    pm = fp.PluginManager(load_entry_points=False, extra_plugins=[_plugin("bad_observer", on_step_finished=boom)])
    llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, plugin_manager=pm)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3


def test_every_hookspec_is_documented():
    doc = (ROOT / "docs" / "plugins.md").read_text()
    assert len(hookspecs.HOOK_NAMES) == 15  # + register_utilities (MBR utilities)
    missing = [h for h in hookspecs.HOOK_NAMES if f"### `{h}" not in doc]
    assert not missing, f"hooks missing from docs/plugins.md: {missing}"
    for h in hookspecs.HOOK_NAMES:
        assert getattr(hookspecs, h).__doc__.strip(), f"{h} has no docstring"


def test_cli_lists_plugins_with_kind_and_source():
    from click.testing import CliRunner

    from framework.cli import cli

    res = CliRunner().invoke(cli, ["plugins"])
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert re.match(r"KIND\s+NAME\s+SOURCE", lines[0])
    assert any(re.match(r"tokenizer\s+sentencepiece\s+plugins\.tokenizers$", ln) for ln in lines)
    assert any(re.match(r"model\s+Qwen2ForCausalLM\s+framework\.models$", ln) for ln in lines)
    assert any(re.match(r"sampler\s+default\s+plugins\.samplers$", ln) for ln in lines)


def test_cli_user_error_is_a_message_not_a_traceback(tmp_path, capsys):
    from framework.cli import main

    code = main(["generate", "-m", str(tmp_path / "missing"), "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: model" in err and "no such directory" in err and "Traceback" not in err
