"""Mistakes plugin authors make, and what they see: a hook implementation whose name is no hook,
a hook that raises (named, and ``--help`` still works), options validated with one shorthand
rule everywhere."""

from __future__ import annotations

import logging
import types

import pytest

import framework.plugins as fp
from framework.errors import PluginError
from framework.hookspecs import hookimpl


def _plugin(name: str, **hooks) -> types.ModuleType:
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(mod, hook_name, hookimpl(fn))
    return mod


def test_misspelt_hook_is_an_error_naming_plugin_and_hook():
    typo = _plugin("acme_typo", register_sampler=lambda register: register("acme", object))
    with pytest.raises(PluginError, match=r"plugin 'acme_typo' implements 'register_sampler', which is not a decodekit "
                                          r"hook; did you mean 'register_samplers'\?"):
        fp.PluginManager(load_entry_points=False, extra_plugins=[typo])


def test_exception_in_a_registration_hook_names_the_plugin():
    def broken(register):
        raise KeyError("missing config")

    with pytest.raises(PluginError, match=r"plugin 'acme_broken' failed in register_constraints: KeyError"):
        fp.PluginManager(load_entry_points=False, extra_plugins=[_plugin("acme_broken", register_constraints=broken)])


def test_observer_exception_log_names_the_plugin(caplog):
    def boom(request):
        raise RuntimeError("observer bug")

    pm = fp.PluginManager(load_entry_points=False, extra_plugins=[_plugin("acme_observer", on_request_added=boom)])
    with caplog.at_level(logging.ERROR, logger="framework.plugins"):
        pm.emit("on_request_added", request=object())
    assert "'acme_observer' raised in on_request_added" in caplog.text


def test_broken_plugin_does_not_break_help(monkeypatch, capsys):
    from framework import cli

    typo = _plugin("acme_typo", register_sampler=lambda register: None)
    real = fp.PluginManager

    monkeypatch.setattr(fp, "_MANAGER", None)
    monkeypatch.setattr(fp, "get_plugin_manager", lambda: real(load_entry_points=False, extra_plugins=[typo]))
    assert cli.main(["--help"]) == 0
    cap = capsys.readouterr()
    assert "Commands:" in cap.out and "run" in cap.out
    assert "acme_typo" in cap.err  # the broken plugin is still reported
    assert cli.main(["run", "--help"]) == 0
    assert "--prompts" in capsys.readouterr().out
    assert cli.main(["plugins"]) == 2  # a command that needs the plugins says why it cannot run
    assert "acme_typo" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["sampling_params", "spec"])
def test_shorthand_means_the_same_everywhere(tmp_path, where):
    """``regex: "a+"`` is ``{pattern: "a+"}`` in a spec, in SamplingParams(constraint=...) and in
    processors (one helper, framework.plugins.validate_plugin_options)."""
    pm = fp.PluginManager(load_entry_points=False)
    reg = pm.get("constraint", "regex")
    assert fp.validate_plugin_options("regex", reg.params, "a+").pattern == "a+"
    with pytest.raises(fp.PluginOptionsError, match=r"invalid top_k params: .*top_kk: unknown field; did you mean 'top_k'\?"):
        fp.validate_plugin_options("top_k", pm.get("logits_processor", "top_k").params, {"top_kk": 3})
    with pytest.raises(fp.PluginOptionsError, match="must be a mapping"):
        fp.validate_plugin_options("repetition_penalty", pm.get("logits_processor", "repetition_penalty").params, 1.2)
    if where == "spec":
        from framework.spec import load_spec

        spec = tmp_path / "s.yaml"
        spec.write_text("model: demo\nconstraint: {regex: 'a+'}\n")
        assert load_spec(spec).constraint.options["pattern"] == "a+"
    else:
        import torch

        from framework import SamplingParams
        from framework.processors import ProcessorChain, ProcessorSetup

        chain = ProcessorChain(pm.registry("logits_processor"), ProcessorSetup(100, torch.device("cpu"), frozenset()))
        (use,) = chain.resolve(SamplingParams(processors=[{"top_k": {"top_k": 5}}], temperature=1.0))
        assert use.name == "top_k" and use.params.top_k == 5
