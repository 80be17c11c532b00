"""Counted repetition (``maxLength`` up to 100,000, ``X{m,n}``) with a counter beside the
automaton (plugins/constraints/counted.py): compiles at any count with a DFA whose size does not
grow with it, and stays exact.

References: ``jsonschema`` decides which strings are valid; ``re`` for regexes; and, on small
cases, brute force: the unrolled automaton (the plain construction, one copy per count, which
is exact by definition) says for every token whether the text stays a prefix of the language.
"""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from plugins.constraints import compile_constraint
from plugins.constraints.automata import compile_dfa
from plugins.constraints.counted import clamp_for, terminal_dfa
from plugins.constraints.json_schema import JSON_CHAR, QUOTE
from plugins.constraints.matcher import CompiledGrammar
from plugins.constraints.frontends import regex_grammar
from plugins.constraints import regex as rx


class TinyTokenizer:
    """A byte-level vocabulary of short tokens (the longest is 3 bytes: clamp 8), so small
    counts already exercise the looping classes."""

    def __init__(self, pieces: list[bytes]):
        self.table = pieces + [b""]
        self.vocab_size = len(self.table)
        self.eos_token_ids = frozenset({len(pieces)})
        self.special_ids = frozenset({len(pieces)})

    def token_byte_table(self) -> list[bytes]:
        return self.table


TINY = TinyTokenizer([b"a", b"b", b"ab", b"aaa", b'"', b'"a', b'a"', b"\\", b"n", b"\\n", b"\xc3", b"\xa9", "é".encode(),
                      b"u", b"0", b"\\u0", b"00"])


@pytest.fixture(scope="module")
def demo_tok():
    from framework.demo import demo_model_dir
    from framework.tokenizer import load_tokenizer

    return load_tokenizer(demo_model_dir("demo"))


def _alive(dfa, data: bytes) -> bool:
    """Brute force: ``data`` is a prefix of some string of the (trimmed, unrolled) automaton."""
    s = 0
    for b in data:
        s = int(dfa.trans[s, b])
        if s < 0:
            return False
    return True


def _reference_mask(dfa, text: bytes, tok: TinyTokenizer) -> set[int]:
    allowed = {t for t, piece in enumerate(tok.table) if piece and _alive(dfa, text + piece)}
    if dfa.matches(text):
        allowed |= set(tok.eos_token_ids)
    return allowed


@pytest.mark.parametrize("lo,hi", [(0, 30), (20, 40), (9, 9 + 40), (25, None), (17, 17), (0, 17)])
def test_masks_equal_brute_force_on_small_counts(lo, hi):
    node = rx.seq(QUOTE, rx.repeat(JSON_CHAR, lo, hi), QUOTE)  # a JSON string with minLength/maxLength
    key, counted = terminal_dfa(node, clamp_for(3))
    assert counted.counter is not None  # the counted construction, not the unrolled one
    # (unbounded: the reference stops beyond what 90 tokens of at most 3 characters can reach)
    unrolled = compile_dfa(rx.seq(QUOTE, rx.repeat(JSON_CHAR, lo, hi if hi is not None else lo + 3 * 90 + 1), QUOTE))
    from plugins.constraints.grammar import GrammarBuilder

    b = GrammarBuilder("test")
    g = b.build(b.rule([[b.term(node, "STRING")]], "start"))
    cg = CompiledGrammar(g, TINY)
    assert cg.counting
    rng = random.Random(lo * 1000 + (hi or 0))
    walks = 0
    for _ in range(40):  # random walks through the grammar, comparing every mask on the way
        st = cg.new_state()
        text = b""
        for _ in range(90):
            got = set(st.allowed_token_ids())
            want = _reference_mask(unrolled, text, TINY)
            assert got == want, (lo, hi, text)
            choices = sorted(got - set(TINY.eos_token_ids))
            if not choices:
                break
            # mostly one-character tokens so that walks get deep into the counts
            t = rng.choice(choices) if rng.random() < 0.3 else min(choices, key=lambda x: (len(TINY.table[x]), x))
            assert st.advance(t)
            text += TINY.table[t]
        walks += 1
    assert walks == 40


def test_exhaustive_short_sequences_equal_brute_force():
    lo, hi = 18, 26
    node = rx.seq(QUOTE, rx.repeat(JSON_CHAR, lo, hi), QUOTE)
    unrolled = compile_dfa(node)
    from plugins.constraints.grammar import GrammarBuilder

    b = GrammarBuilder("test")
    cg = CompiledGrammar(b.build(b.rule([[b.term(node, "STRING")]], "start")), TINY)
    base = [TINY.table.index(b"aaa")] * 5 + [TINY.table.index(b"a")]  # '"' then 16 characters: near both ends
    prefix_state = cg.new_state()
    assert prefix_state.advance(TINY.table.index(b'"'))
    for t in base:
        assert prefix_state.advance(t)
    text0 = b'"' + b"aaa" * 5 + b"a"
    frontier = [(prefix_state, text0)]
    for _ in range(3):  # every sequence of three more tokens
        nxt = []
        for st, text in frontier:
            got = set(st.allowed_token_ids())
            assert got == _reference_mask(unrolled, text, TINY), text
            for t in sorted(got - set(TINY.eos_token_ids)):
                s2 = st.copy()
                assert s2.advance(t)
                nxt.append((s2, text + TINY.table[t]))
        frontier = nxt
    assert len(frontier) > 100


def test_issue_schema_compiles_and_validates(demo_tok):
    """The schema of the issue (common in real schemas) was refused: 'over 20000 DFA states'."""
    schema = {"type": ["string", "null"], "maxLength": 1000}
    cg = compile_constraint("json_schema", demo_tok, {"schema": schema})
    v = jsonschema.Draft202012Validator(schema)
    cases = ["null", '""', '"' + "a" * 999 + '"', '"' + "a" * 1000 + '"', '"' + "a" * 1001 + '"',
             '"' + "é" * 1000 + '"', '"' + "é" * 1001 + '"', '"' + "\\n" * 1000 + '"', '"' + "\\u00e9" * 1001 + '"',
             '"' + "b" * 400 + "\\\"" + "c" * 599 + '"']
    for text in cases:
        assert cg.matches(text) == v.is_valid(json.loads(text)), text[:40]
    assert sum(cg.matches(t) for t in cases) == 7  # the 1001-character ones are refused


def test_generated_outputs_validate_with_jsonschema(demo_tok):
    schemas = [{"type": ["string", "null"], "maxLength": 1000}, {"type": "string", "minLength": 40, "maxLength": 60},
               {"type": "object", "properties": {"id": {"type": "string", "minLength": 30}, "n": {"type": "integer"}},
                "required": ["id", "n"], "additionalProperties": False},
               {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}]
    rng = random.Random(0)
    eos = demo_tok.eos_token_ids
    for schema in schemas:
        cg = compile_constraint("json_schema", demo_tok, {"schema": schema})
        for _ in range(8):
            st = cg.new_state()
            ids: list[int] = []
            for _ in range(400):
                allowed = st.allowed_token_ids()
                non_eos = [t for t in allowed if t not in eos]
                if not non_eos or (len(ids) > 20 and any(t in eos for t in allowed) and rng.random() < 0.3):
                    break
                t = rng.choice(non_eos)
                assert st.advance(t)
                ids.append(t)
            if st.is_accepting():
                jsonschema.validate(json.loads(demo_tok.decode(ids)), schema)


def test_hundred_thousand_characters(demo_tok):
    schema = {"type": "string", "maxLength": 100_000}
    cg = compile_constraint("json_schema", demo_tok, {"schema": schema})
    assert cg.matches('"' + "a" * 100_000 + '"') and not cg.matches('"' + "a" * 100_001 + '"')
    # masks near the end: exactly the tokens that still fit (brute force: the remaining room)
    st = cg.new_state()
    table = demo_tok.token_byte_table()
    a_id = next(i for i, b in enumerate(table) if b == b"a" and i not in demo_tok.special_ids)
    quote = next(i for i, b in enumerate(table) if b == b'"' and i not in demo_tok.special_ids)
    assert st.advance(quote)
    for _ in range(100_000 - 5):
        assert st.advance(a_id)
    room = compile_dfa(rx.seq(rx.repeat(JSON_CHAR, 0, 5), QUOTE))  # what may follow: at most 5 characters, then '"'
    want = {t for t, piece in enumerate(table) if piece and t not in demo_tok.special_ids and _alive(room, piece)}
    assert set(st.allowed_token_ids()) == want
    assert any(len(table[t]) > 1 for t in want) and not any(table[t] == b"aaaaaa" for t in want)
    for _ in range(5):
        assert st.advance(a_id)
    assert set(st.allowed_token_ids()) == {t for t, piece in enumerate(table) if piece == b'"' and t not in demo_tok.special_ids}


def test_dfa_size_does_not_grow_with_the_count():
    k = clamp_for(16)
    sizes = [terminal_dfa(rx.seq(QUOTE, rx.repeat(JSON_CHAR, 0, n), QUOTE), k)[1].size for n in (1_000, 10_000, 100_000)]
    assert sizes[0] == sizes[1] == sizes[2] < 4 * k * 25


@pytest.mark.parametrize("pattern", [r"[a-z]{3,5000}", r"x[0-9]{2000}y", r"(?:ab|c){40,3000}"])
def test_counted_regexes_match_like_re(pattern, demo_tok):
    g = regex_grammar(pattern)
    cg = CompiledGrammar(g, demo_tok)
    rng = random.Random(1)
    for n in (0, 2, 3, 39, 40, 41, 1999, 2000, 2001, 2999, 3000, 3001, 5000, 5001):
        for text in ("a" * n, "x" + "1" * n + "y", "ab" * n, "c" * n, "ab" * (n // 2) + "c" * (n - n // 2),
                     "".join(rng.choice("abc") for _ in range(n))):
            assert cg.matches(text) == bool(re.fullmatch(pattern, text)), (pattern, len(text))
