"""Constraint plugins: registration with params models, the compiler service (futures, shared
compilations, time limit) and the memory + disk cache."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import framework.plugins as fp
from framework.errors import ConstraintError, ConstraintTimeoutError
from plugins.constraints import PARAMS, constraint_params
from plugins.constraints.cache import CompilerService, ConstraintCache
from test_constraints_engine import ByteVocab

TOK = ByteVocab([bytes([b]) for b in range(256)] + [b'{"', b'":', b""], eos=258)


def test_registered_names_and_params():
    pm = fp.PluginManager(load_entry_points=False)
    names = set(pm.registry("constraint").names())
    assert {"json_schema", "json", "regex", "choice", "grammar", "gbnf"} <= names
    for name in PARAMS:
        reg = pm.get("constraint", name)
        assert reg.source == "plugins.constraints" and reg.params is PARAMS[name]
        with pytest.raises(ValidationError):  # naming the main field: the rest must be params
            reg.params.model_validate({reg.params.__shorthand__ or "x": "y", "no_such_option": 1})
    cg = pm.get("constraint", "regex").factory(TOK, pattern="[ab]+")
    s = cg.new_state()
    assert s.advance(ord("a")) and s.is_accepting()


def test_shorthand_params():
    assert constraint_params("regex", "a+")["pattern"] == "a+"
    assert constraint_params("choice", ["x", "y"])["choices"] == ["x", "y"]
    assert constraint_params("json_schema", {"type": "object"})["schema"] == {"type": "object"}
    assert constraint_params("json_schema", {"schema": {"type": "string"}, "strict": True})["strict"] is True
    assert constraint_params("grammar", "json")["grammar"] == "json"
    assert constraint_params("json", None)["whitespace"] == "compact"  # json.dumps layout by default


def test_service_futures_share_and_cache(tmp_path):
    svc = CompilerService(ConstraintCache(tmp_path), timeout_s=20)
    params = constraint_params("json_schema", {"type": "object", "properties": {"a": {"type": "integer"}}})
    f1 = svc.submit("json_schema", params, TOK)
    f2 = svc.submit("json_schema", params, TOK)
    cg = f1.result(timeout=20)
    assert f2.result(timeout=20) is cg
    assert svc.submit("json_schema", params, TOK).result() is cg  # memory hit
    assert list((tmp_path / "constraints").rglob("*.pkl"))
    # a fresh cache (a new process) loads the grammar from disk
    cold = ConstraintCache(tmp_path)
    cg2 = cold.get_or_compile("json_schema", params, TOK)
    assert cold.disk_hits == 1 and cg2 is not cg
    assert cg2.matches('{"a": 12}') and not cg2.matches('{"a": "x"}')
    svc.shutdown()


def test_service_errors_and_time_limit(tmp_path):
    svc = CompilerService(ConstraintCache(None), timeout_s=20)
    with pytest.raises(ConstraintError, match="#/type"):
        svc.compile("json_schema", constraint_params("json_schema", {"type": "nope"}), TOK)
    with pytest.raises(ConstraintTimeoutError):
        svc.compile("regex", constraint_params("regex", "(a|b)*a(a|b){13}x[a-z]{1,300}"), TOK, timeout_s=0.05)
    svc.shutdown()
