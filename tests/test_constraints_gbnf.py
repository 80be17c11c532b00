"""GBNF (llama.cpp grammar format) -> lark: conversion, positive/negative examples, and random
walks whose outputs lark's own Earley parser accepts on the converted grammar."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from framework.errors import ConstraintError
from plugins.constraints.frontends import gbnf_grammar
from plugins.constraints.gbnf import gbnf_to_lark
from plugins.constraints.matcher import CompiledGrammar

GBNF = Path(__file__).parent / "data" / "gbnf"
EXAMPLES = {
    "json": (['{"a": [1, -2.5e3, "x\\n"], "b": null}', "[]", '"s"'], ["{a:1}", "[1,]", "01"]),
    "json_arr": (['[1, "a", {"k": true}]', "[]"], ["[1", "{}"]),
    "arithmetic": (["x = 3\n", "a+b*(c-1)= (4)\n"], ["x = \n", "= 3\n"]),
    "list": (["- milk\n- eggs\n"], ["- \n", "milk\n", "- a\n" * 6]),
    "chess": (["1. e4 e5 2. Nf3 Nc6", "1. O-O Qxd8+"], ["1. e9 e5", "e4 e5"]),
    "c": (["int main() { int x = 1; return x + 2; }", "void f(int a, char b) {\n  a = b * 3;\n}"], ["int main() { return }", "main() {}"]),
    "english": (["Hello world.", "It works! Yes."], ["hello world.", "Hello world"]),
    "japanese": (["こんにちは。", "東京タワー、きれい。"], ["hello。", "こんにちは"]),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from test_constraints_engine import _sp_tokenizer

    return _sp_tokenizer(tmp_path_factory)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_gbnf_examples_and_walks(name, tok):
    import lark

    text = (GBNF / f"{name}.gbnf").read_text()
    lark_text = gbnf_to_lark(text, name)
    parser = lark.Lark(lark_text, start="g_root", parser="earley", lexer="dynamic")
    cg = CompiledGrammar(gbnf_grammar(text), tok)
    good, bad = EXAMPLES[name]
    for s in good:
        assert cg.matches(s), (name, s)
        parser.parse(s)
    for s in bad:
        assert not cg.matches(s), (name, s)
    from test_constraints_engine import walk

    rng = random.Random(7)
    finished = 0
    for _ in range(4):
        data, done = walk(cg, rng, max_steps=150, eos_after=10)
        if done:
            finished += 1
            parser.parse(data.decode("utf-8"))
    assert finished >= 1


def test_gbnf_syntax_errors_name_the_line():
    with pytest.raises(ConstraintError, match="line 2"):
        gbnf_to_lark('root ::= "a"\nx ::= ( "b"\n')
    with pytest.raises(ConstraintError, match="'undefined-rule'"):
        gbnf_to_lark("root ::= undefined-rule")
    with pytest.raises(ConstraintError, match="no 'root'"):
        gbnf_to_lark('start ::= "a"')
