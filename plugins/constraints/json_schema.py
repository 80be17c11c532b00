"""JSON Schema (draft 2020-12 and draft-07, as people write them) -> :class:`Grammar`.

Supported: ``type`` (and unions), ``enum``, ``const``, ``properties`` / ``required`` /
``additionalProperties`` (true, false, schema) / ``patternProperties``, ``items`` /
``prefixItems`` / ``additionalItems`` / ``minItems`` / ``maxItems``, ``anyOf`` / ``oneOf`` /
``allOf``, ``$ref`` with ``$defs`` / ``definitions`` (recursion included), string ``minLength`` /
``maxLength`` / ``pattern`` / ``format`` (date, time, date-time, email, uuid, uri, ipv4, ipv6,
hostname), integer and number ``minimum`` / ``maximum`` / ``exclusiveMinimum`` /
``exclusiveMaximum`` (exact for integers, and for numbers when the bounds are integers),
``nullable`` (OpenAPI). Keywords that only annotate (``title``, ``description``, ...) and
unknown keywords are ignored, as the specification says.

A keyword the compiler cannot enforce (``uniqueItems``, ``multipleOf``, ``not``, ...) is handled
by ``strict``: ``True`` raises :class:`ConstraintError` naming the keyword and its JSON pointer;
``False`` (default) ignores it and records a warning in :attr:`SchemaCompiler.warnings` (and the
``warnings`` module), so outputs may then violate that keyword.

Object properties may come in any order, each at most once (``property_order="any"``, the
default), for objects of up to ``max_any_order`` properties: the grammar tracks which properties
were written (one rule per subset, so the limit keeps it small). Larger objects, or
``property_order="schema"``, take properties in the order ``properties`` lists them (as
llguidance and XGrammar do). Additional properties, when allowed, may appear anywhere. Whitespace:
``"compact"`` (the default) is ``json.dumps``'s layout — one space after every ``:`` and ``,``,
nowhere else — so a small model cannot waste its tokens (or run out of them) on whitespace;
``"minified"`` has none (``separators=(",", ":")``); ``"flexible"`` allows up to
``max_whitespace`` characters of space / tab / newline between any two lexemes, as JSON does.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from framework.errors import ConstraintError
from plugins.constraints import regex as rx
from plugins.constraints.automata import compile_dfa
from plugins.constraints.grammar import Grammar, GrammarBuilder
from plugins.constraints.regex import RegexError

__all__ = ["JsonSchemaOptions", "SchemaCompiler", "json_schema_grammar", "any_json_grammar", "WHITESPACE_MODES"]

ANNOTATIONS = frozenset({
    "$schema", "$id", "id", "$comment", "$anchor", "$vocabulary", "title", "description", "default",
    "examples", "deprecated", "readOnly", "writeOnly", "contentEncoding", "contentMediaType",
    "contentSchema", "$defs", "definitions", "discriminator", "xml", "externalDocs", "example",
})  # fmt: skip
UNSUPPORTED = frozenset({
    "uniqueItems", "multipleOf", "not", "if", "then", "else", "dependentRequired",
    "dependentSchemas", "dependencies", "minProperties", "maxProperties", "propertyNames",
    "contains", "minContains", "maxContains", "unevaluatedProperties", "unevaluatedItems",
    "$dynamicRef", "$recursiveRef",
})  # fmt: skip
TYPES = ("null", "boolean", "object", "array", "string", "number", "integer")
WHITESPACE_MODES = ("compact", "minified", "flexible")

# JSON text pieces
_HEX = rx.chars([(48, 57), (65, 70), (97, 102)])
_ESCAPE = rx.seq(rx.literal("\\"), rx.alt(rx.chars([(ord(c), ord(c)) for c in '"\\/bfnrt']), rx.seq(rx.literal("u"), rx.repeat(_HEX, 4, 4))))
_PLAIN = rx.chars(rx.negate_ranges(((0, 0x1F), (0x22, 0x22), (0x5C, 0x5C))))
JSON_CHAR = rx.alt(_PLAIN, _ESCAPE)
QUOTE = rx.literal('"')
ANY_STRING = rx.seq(QUOTE, rx.star(JSON_CHAR), QUOTE)
_DIG = rx.chars([(48, 57)])
_D19 = rx.chars([(49, 57)])
_UINT = rx.alt(rx.literal("0"), rx.seq(_D19, rx.star(_DIG)))
INTEGER = rx.seq(rx.opt(rx.literal("-")), _UINT)
_FRAC = rx.seq(rx.literal("."), rx.plus(_DIG))
_EXP = rx.seq(rx.chars([(69, 69), (101, 101)]), rx.opt(rx.chars([(43, 43), (45, 45)])), rx.plus(_DIG))
NUMBER = rx.seq(INTEGER, rx.opt(_FRAC), rx.opt(_EXP))

_SHORT = {8: "b", 9: "t", 10: "n", 12: "f", 13: "r"}

# full-date, exactly as a date: month lengths and leap years (year 0000 excluded, as
# datetime.date and so jsonschema's format checker exclude it)
_YEAR = r"(?:[0-9]{3}[1-9]|[0-9]{2}[1-9]0|[0-9][1-9]00|[1-9]000)"
_LEAP = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         rf"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)")

FORMATS = {
    "date": _DATE,
    "time": r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])",
    "date-time": _DATE + r"[Tt](?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]+)?(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])",
    "email": r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+",
    "uuid": r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
    "uri": r"[A-Za-z][A-Za-z0-9+.-]*:[^\x00-\x20\"<>\\^`{|}]*",
    "ipv4": r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])",
    "ipv6": r"(?:[0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}",
    "hostname": r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*",
}


@dataclass(frozen=True)
class JsonSchemaOptions:
    """How a schema becomes a grammar (see the module docstring)."""

    strict: bool = False
    whitespace: str = "compact"  # json.dumps's ", " and ": "; or "minified" (none), "flexible"
    max_whitespace: int = 20
    max_depth: int = 64  # nested schema levels ($ref chains, allOf merges, nesting)
    max_enum: int = 10_000
    max_items_expanded: int = 2_000
    max_string_length: int = 100_000  # longest minLength / maxLength enforced exactly (counted: plugins/constraints/counted.py)
    max_string_length_with_pattern: int = 1_000  # the same beside a pattern or format (unrolled, intersected)
    property_order: str = "any"  # or "schema"
    max_any_order: int = 6  # objects with more properties take them in schema order


def json_text_node(content: rx.Node, ranges_only: bool = False) -> rx.Node:
    """``content`` (a regex over decoded string characters) as a regex over JSON string text:
    characters that JSON must escape become their escape sequences."""
    if isinstance(content, rx.Chars):
        plain = rx.subtract_ranges(content.ranges, ((0, 0x1F), (0x22, 0x22), (0x5C, 0x5C)))
        alts = [rx.chars(plain)] if plain else []
        for lo, hi in rx.intersect_ranges(content.ranges, ((0, 0x1F), (0x22, 0x22), (0x5C, 0x5C))):
            for cp in range(lo, hi + 1):
                if cp == 0x22:
                    alts.append(rx.literal('\\"'))
                elif cp == 0x5C:
                    alts.append(rx.literal("\\\\"))
                elif cp in _SHORT:
                    alts.append(rx.literal("\\" + _SHORT[cp]))
                else:
                    alts.append(rx.seq(rx.literal("\\u00"), rx.alt(rx.literal(f"{cp:02x}"), rx.literal(f"{cp:02X}"))))
        return rx.alt(*alts) if alts else rx.NOTHING
    if isinstance(content, rx.Seq):
        return rx.seq(*(json_text_node(x) for x in content.items))
    if isinstance(content, rx.Alt):
        return rx.alt(*(json_text_node(x) for x in content.items))
    if isinstance(content, rx.Repeat):
        return rx.repeat(json_text_node(content.item), content.min, content.max)
    if isinstance(content, rx.And):
        return rx.And(json_text_node(content.a), json_text_node(content.b))
    raise TypeError(content)


# ----------------------------------------------------------------------------- integer ranges


def _fixed(x: str, y: str) -> rx.Node:
    """Digit strings of len(x) == len(y) between x and y inclusive."""
    if x == y:
        return rx.literal(x)
    n = len(x) - 1
    dx, dy = int(x[0]), int(y[0])
    if dx == dy:
        return rx.seq(rx.literal(x[0]), _fixed(x[1:], y[1:]))
    if x[1:] == "0" * n and y[1:] == "9" * n:
        return rx.seq(rx.chars([(48 + dx, 48 + dy)]), rx.repeat(_DIG, n, n))
    parts = [rx.seq(rx.literal(x[0]), _fixed(x[1:], "9" * n))]
    if dy - dx > 1:
        parts.append(rx.seq(rx.chars([(49 + dx, 47 + dy)]), rx.repeat(_DIG, n, n)))
    parts.append(rx.seq(rx.literal(y[0]), _fixed("0" * n, y[1:])))
    return rx.alt(*parts)


def _uint_range(a: int, b: int | None) -> rx.Node:
    """Canonical decimal naturals in [a, b] (b None: unbounded)."""
    if b is not None and a > b:
        return rx.NOTHING
    parts = []
    if a == 0:
        parts.append(rx.literal("0"))
        a = 1
    la = len(str(a))
    lb = len(str(b)) if b is not None else la
    for L in range(la, lb + 1):
        lo = max(a, 10 ** (L - 1))
        hi = 10**L - 1 if b is None else min(b, 10**L - 1)
        if lo <= hi:
            parts.append(_fixed(str(lo), str(hi)))
    if b is None:
        parts.append(rx.seq(_D19, rx.repeat(_DIG, la, None)))
    return rx.alt(*parts)


def integer_range(lo: int | None, hi: int | None) -> rx.Node:
    """JSON integers in [lo, hi] (None: unbounded)."""
    parts = []
    if hi is None or hi >= 0:
        parts.append(_uint_range(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        # negatives: -k with k in [max(1, -hi), -lo]
        kmin = 1 if hi is None or hi >= 0 else -hi
        parts.append(rx.seq(rx.literal("-"), _uint_range(kmin, None if lo is None else -lo)))
    return rx.alt(*parts)


def number_range(lo: int | None, hi: int | None) -> rx.Node:
    """JSON numbers (no exponent) in [lo, hi] for integer (or None) bounds."""
    anyfrac = rx.opt(_FRAC)
    zerofrac = rx.opt(rx.seq(rx.literal("."), rx.plus(rx.literal("0"))))
    parts = []
    if hi is None or hi >= 0:  # x >= 0
        a = max(lo, 0) if lo is not None else 0
        if hi is None:
            parts.append(rx.seq(_uint_range(a, None), anyfrac))
        else:
            if a <= hi - 1:
                parts.append(rx.seq(_uint_range(a, hi - 1), anyfrac))
            if a <= hi:
                parts.append(rx.seq(_uint_range(hi, hi), zerofrac))
    if lo is None or lo < 0:  # x = -y, y > 0
        b = max(-hi, 0) if hi is not None else 0  # y >= b
        if lo is None:
            parts.append(rx.seq(rx.literal("-"), _uint_range(b, None), anyfrac))
        else:
            if b <= -lo - 1:
                parts.append(rx.seq(rx.literal("-"), _uint_range(b, -lo - 1), anyfrac))
            if b <= -lo:
                parts.append(rx.seq(rx.literal("-"), _uint_range(-lo, -lo), zerofrac))
    return rx.alt(*parts)


# ----------------------------------------------------------------------------- compiler


def _esc_ptr(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


class SchemaCompiler:
    """Compiles one JSON Schema document; see :func:`json_schema_grammar`."""

    def __init__(self, schema: Any, options: JsonSchemaOptions | None = None):
        self.root = schema
        self.opts = options or JsonSchemaOptions()
        if self.opts.whitespace not in WHITESPACE_MODES:
            raise ConstraintError(f"whitespace must be one of {', '.join(WHITESPACE_MODES)}, not {self.opts.whitespace!r}")
        self.b = GrammarBuilder("JSON Schema")
        self.warnings: list[str] = []
        self._memo: dict[int, str] = {}
        self._keep: list[Any] = []
        self._any: str | None = None
        self._depth = 0
        dialect = str(schema.get("$schema", "")) if isinstance(schema, dict) else ""
        # Before 2019-09, keywords beside a $ref are ignored; from 2019-09 on they also apply.
        self.ref_siblings = not any(f"draft-0{n}" in dialect for n in range(3, 8))

    # -- policy -----------------------------------------------------------------------------
    def unsupported(self, ptr: str, what: str) -> None:
        msg = f"{ptr}: {what}"
        if self.opts.strict:
            raise ConstraintError(f"JSON Schema {msg} (strict mode)")
        self.warnings.append(msg)
        warnings.warn(f"JSON Schema {msg}; ignored", stacklevel=4)

    def error(self, ptr: str, what: str) -> ConstraintError:
        return ConstraintError(f"JSON Schema {ptr or '#'}: {what}")

    # -- separators ---------------------------------------------------------------------------
    def colon(self) -> str:
        """The ``:`` between a key and its value (``": "`` in compact mode)."""
        return self.b.lit(": " if self.opts.whitespace == "compact" else ":")

    def comma(self) -> str:
        """The ``,`` between members and items (``", "`` in compact mode)."""
        return self.b.lit(", " if self.opts.whitespace == "compact" else ",")

    # -- entry ------------------------------------------------------------------------------
    def compile(self) -> Grammar:
        start = self.value(self.root, "#")
        if start is None:
            raise self.error("#", "the schema admits no value (false, or contradictory keywords)")
        if self.opts.whitespace == "flexible":
            ws = self.b.term(rx.repeat(rx.chars([(9, 10), (13, 13), (32, 32)]), 1, self.opts.max_whitespace), "WS")
            self.b.ignore.append(ws)
        if start in self.b.terminals:
            start = self.b.rule([[start]], "start")
        return self.b.build(start)

    # -- references ---------------------------------------------------------------------------
    def resolve(self, ref: str, ptr: str) -> tuple[Any, str]:
        if not ref.startswith("#"):
            raise self.error(ptr, f"$ref {ref!r}: only references inside the document (#...) are supported")
        frag = unquote(ref[1:])
        node: Any = self.root
        if frag and not frag.startswith("/"):  # $anchor
            found = self._find_anchor(self.root, frag)
            if found is None:
                raise self.error(ptr, f"$ref {ref!r}: no $anchor {frag!r} in the document")
            return found, ref
        for part in [p for p in frag.split("/")[1:]]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise self.error(ptr, f"$ref {ref!r} does not resolve (no {part!r})")
        return node, "#" + frag

    def _find_anchor(self, node: Any, name: str) -> Any:
        if isinstance(node, dict):
            if node.get("$anchor") == name or node.get("$id") == "#" + name or node.get("id") == "#" + name:
                return node
            for v in node.values():
                got = self._find_anchor(v, name)
                if got is not None:
                    return got
        elif isinstance(node, list):
            for v in node:
                got = self._find_anchor(v, name)
                if got is not None:
                    return got
        return None

    def deref(self, schema: Any, ptr: str) -> tuple[Any, str]:
        """Follow ``$ref`` chains; siblings of a ``$ref`` are merged in (2019+ semantics)."""
        seen = 0
        while isinstance(schema, dict) and "$ref" in schema and isinstance(schema["$ref"], str):
            seen += 1
            if seen > self.opts.max_depth:
                raise self.error(ptr, "$ref chain too long (cyclic?)")
            target, tptr = self.resolve(schema["$ref"], ptr)
            rest = {k: v for k, v in schema.items() if k != "$ref" and k not in ANNOTATIONS} if self.ref_siblings else {}
            if rest and target is not True:
                if target is False:
                    return False, ptr
                schema = self.merge(target, rest, ptr)
            else:
                schema, ptr = target, tptr
        return schema, ptr

    # -- allOf ------------------------------------------------------------------------------
    def merge(self, a: Any, b: Any, ptr: str) -> Any:
        """The conjunction of two schemas as one schema (the cases people write)."""
        self._depth += 1
        try:
            if self._depth > self.opts.max_depth:
                raise self.error(ptr, "schema nesting too deep while merging allOf")
            a, _ = self.deref(a, ptr)
            b, _ = self.deref(b, ptr)
            if a is True or a == {}:
                return b
            if b is True or b == {}:
                return a
            if a is False or b is False:
                return False
            out = dict(a)
            pa, pb = a.get("properties") or {}, b.get("properties") or {}
            for side, other_props, own_props in ((a, pb, pa), (b, pa, pb)):
                addl = side.get("additionalProperties", True)
                if addl is not True and other_props:
                    # the other side's properties are "additional" to this side
                    extra = {k: (False if addl is False else addl) for k in other_props if k not in own_props}
                    if extra:
                        side_props = dict(own_props)
                        side_props.update(extra)
                        if side is a:
                            out["properties"] = side_props
                        else:
                            b = dict(b)
                            b["properties"] = side_props
            for k, v in b.items():
                if k not in out:
                    out[k] = v
                    continue
                u = out[k]
                if k == "type":
                    ta = set(u if isinstance(u, list) else [u])
                    tb = set(v if isinstance(v, list) else [v])
                    both = ta & tb
                    if "integer" in (ta | tb) and "number" in (ta | tb):
                        if ("number" in ta and "integer" in tb) or ("integer" in ta and "number" in tb):
                            both.add("integer")
                    out[k] = sorted(both)
                elif k == "properties":
                    props = dict(u)
                    for pk, pv in v.items():
                        props[pk] = self.merge(props[pk], pv, f"{ptr}/properties/{_esc_ptr(pk)}") if pk in props else pv
                    out[k] = props
                elif k == "required":
                    out[k] = list(dict.fromkeys(list(u) + list(v)))
                elif k in ("minimum", "minLength", "minItems", "exclusiveMinimum") and isinstance(u, (int, float)) and isinstance(v, (int, float)) and not isinstance(u, bool):
                    out[k] = max(u, v)
                elif k in ("maximum", "maxLength", "maxItems", "exclusiveMaximum") and isinstance(u, (int, float)) and isinstance(v, (int, float)) and not isinstance(u, bool):
                    out[k] = min(u, v)
                elif k == "enum":
                    out[k] = [x for x in u if x in v]
                elif k in ("allOf",):
                    out[k] = list(u) + list(v)
                elif k in ("anyOf", "oneOf") and isinstance(u, list) and isinstance(v, list):
                    out[k] = [self.merge(ui, {"anyOf": v}, ptr) for ui in u]
                elif k == "pattern":
                    out["x-extra-patterns"] = list(out.get("x-extra-patterns", [])) + [v]
                elif k in ("items", "additionalProperties") and isinstance(u, (dict, bool)) and isinstance(v, (dict, bool)):
                    out[k] = self.merge(u, v, f"{ptr}/{k}")
                elif u != v and k not in ANNOTATIONS:
                    self.unsupported(ptr, f"allOf with two different {k!r} values")
            return out
        finally:
            self._depth -= 1

    # -- values -----------------------------------------------------------------------------
    def value(self, schema: Any, ptr: str) -> str | None:
        """A grammar symbol for values matching ``schema`` (None: no value matches)."""
        if schema is True or schema == {}:
            return self.any_value()
        if schema is False:
            return None
        if not isinstance(schema, dict):
            raise self.error(ptr, f"a schema must be an object or a boolean, not {type(schema).__name__}")
        key = id(schema)
        got = self._memo.get(key)
        if got is not None:
            return got if got != "" else None
        self._depth += 1
        if self._depth > self.opts.max_depth:
            raise self.error(ptr, f"schema nesting deeper than {self.opts.max_depth} levels")
        try:
            if "$ref" in schema:
                target, tptr = self.deref(schema, ptr)
                self._keep.append(target)
                if target is False:
                    self._memo[key] = ""
                    return None
                if target is True or target == {}:
                    return self.any_value()
                if id(target) in self._memo:  # compiled, or being compiled (recursion)
                    out = self._memo[id(target)]
                    self._memo[key] = out
                    return out or None
                name = self.b.declare("ref")
                self._memo[key] = name
                sym = self.value(target, tptr)
                if sym is None:
                    self._memo[key] = ""
                    return None
                self.b.define(name, [[sym]])
                return name
            name = self.b.declare("v")
            self._memo[key] = name  # recursion through this schema refers to the rule by name
            alts = self._alternatives(schema, ptr)
            if not alts:
                self._memo[key] = ""
                return None
            self.b.define(name, [[a] for a in alts])
            return name
        finally:
            self._depth -= 1

    def _alternatives(self, s: dict, ptr: str) -> list[str]:
        for k in s:
            if k in UNSUPPORTED:
                self.unsupported(f"{ptr}/{_esc_ptr(k)}", f"keyword {k!r} is not supported")
        if "allOf" in s:
            parts = s["allOf"]
            if not isinstance(parts, list):
                raise self.error(f"{ptr}/allOf", "allOf must be an array")
            merged: Any = {k: v for k, v in s.items() if k != "allOf"}
            for i, part in enumerate(parts):
                merged = self.merge(merged, part, f"{ptr}/allOf/{i}")
            self._keep.append(merged)
            sym = self.value(merged, ptr)
            return [sym] if sym else []
        for comb in ("anyOf", "oneOf"):
            if comb in s:
                branches = s[comb]
                if not isinstance(branches, list) or not branches:
                    raise self.error(f"{ptr}/{comb}", f"{comb} must be a non-empty array")
                if comb == "oneOf" and len(branches) > 1:  # approximated, in strict mode too
                    msg = f"{ptr}/oneOf: enforced as anyOf (that only one branch matches is not checked)"
                    self.warnings.append(msg)
                    warnings.warn(f"JSON Schema {msg}", stacklevel=3)
                base = {k: v for k, v in s.items() if k != comb and k not in ANNOTATIONS}
                out = []
                for i, br in enumerate(branches):
                    sub = self.merge(base, br, f"{ptr}/{comb}/{i}") if base else br
                    self._keep.append(sub)
                    sym = self.value(sub, f"{ptr}/{comb}/{i}")
                    if sym and sym not in out:
                        out.append(sym)
                return out
        if "const" in s:
            if not _has_type(s["const"], s.get("type")):
                return []  # const and type disagree: no value is valid
            return [self.const(s["const"], f"{ptr}/const")]
        if "enum" in s:
            vals = s["enum"]
            if not isinstance(vals, list):
                raise self.error(f"{ptr}/enum", "enum must be an array")
            if len(vals) > self.opts.max_enum:
                raise self.error(f"{ptr}/enum", f"enum has {len(vals)} values, over the limit of {self.opts.max_enum}")
            vals = [v for v in vals if _has_type(v, s.get("type"))]  # both keywords apply
            return self.enum(vals, ptr) if vals else []
        types = s.get("type")
        if types is None:
            tset = list(TYPES)
            tset.remove("integer")
        else:
            tset = list(types) if isinstance(types, list) else [types]
            if "any" in tset:
                tset = [t for t in TYPES if t != "integer"]
            for t in tset:
                if t not in TYPES:
                    raise self.error(f"{ptr}/type", f"unknown type {t!r}")
        if s.get("nullable") is True and "null" not in tset:
            tset.append("null")
        if "number" in tset and "integer" in tset:
            tset.remove("integer")
        out = []
        for t in dict.fromkeys(tset):
            sym = getattr(self, "t_" + t)(s, ptr)
            if sym is not None:
                out.append(sym)
        return out

    def const(self, v: Any, ptr: str) -> str:
        if isinstance(v, dict):
            b = self.b
            if not v:
                return b.rule([[b.lit("{"), b.lit("}")]], "obj")
            seq: list[str] = [b.lit("{")]
            for i, (k, x) in enumerate(v.items()):
                if i:
                    seq.append(self.comma())
                seq += [b.lit(json.dumps(k, ensure_ascii=False)), self.colon(), self.const(x, f"{ptr}/{_esc_ptr(k)}")]
            seq.append(b.lit("}"))
            return b.rule([seq], "const")
        if isinstance(v, list):
            b = self.b
            seq = [b.lit("[")]
            for i, x in enumerate(v):
                if i:
                    seq.append(self.comma())
                seq.append(self.const(x, f"{ptr}/{i}"))
            seq.append(b.lit("]"))
            return b.rule([seq], "const")
        return self.b.lit(json.dumps(v, ensure_ascii=False))

    def enum(self, vals: list, ptr: str) -> list[str]:
        scalars = [v for v in vals if not isinstance(v, (dict, list))]
        out = []
        if scalars:
            texts = list(dict.fromkeys(json.dumps(v, ensure_ascii=False) for v in scalars))
            node = rx.alt(*(rx.literal(t) for t in texts))
            out.append(self.b.term(node, "ENUM", literal=True))
        for i, v in enumerate(vals):
            if isinstance(v, (dict, list)):
                out.append(self.const(v, f"{ptr}/enum/{i}"))
        return out

    # -- types ------------------------------------------------------------------------------
    def t_null(self, s: dict, ptr: str) -> str:
        return self.b.lit("null")

    def t_boolean(self, s: dict, ptr: str) -> str:
        return self.b.term(rx.alt(rx.literal("true"), rx.literal("false")), "BOOL", literal=True)

    def _bounds(self, s: dict, ptr: str, integer: bool) -> tuple[Any, Any, bool, bool]:
        lo, hi = s.get("minimum"), s.get("maximum")
        xlo, xhi = s.get("exclusiveMinimum"), s.get("exclusiveMaximum")
        elo = ehi = False
        if isinstance(xlo, bool):  # draft-04
            elo = xlo
        elif isinstance(xlo, (int, float)):
            lo, elo = (xlo, True) if lo is None or xlo >= lo else (lo, False)
        if isinstance(xhi, bool):
            ehi = xhi
        elif isinstance(xhi, (int, float)):
            hi, ehi = (xhi, True) if hi is None or xhi <= hi else (hi, False)
        for name, v in (("minimum", lo), ("maximum", hi)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise self.error(f"{ptr}/{name}", f"{name} must be a finite number")
        return lo, hi, elo, ehi

    def t_integer(self, s: dict, ptr: str) -> str | None:
        lo, hi, elo, ehi = self._bounds(s, ptr, True)
        if lo is None and hi is None:
            return self.b.term(INTEGER, "INT")
        ilo = None if lo is None else (math.floor(lo) + 1 if elo and lo == math.floor(lo) else math.ceil(lo))
        ihi = None if hi is None else (math.ceil(hi) - 1 if ehi and hi == math.ceil(hi) else math.floor(hi))
        if ilo is not None and ihi is not None and ilo > ihi:
            return None
        return self.b.term(integer_range(ilo, ihi), "INT_RANGE")

    def t_number(self, s: dict, ptr: str) -> str | None:
        lo, hi, elo, ehi = self._bounds(s, ptr, False)
        if lo is None and hi is None:
            return self.b.term(NUMBER, "NUMBER")
        exact = (lo is None or (float(lo).is_integer() and not elo)) and (hi is None or (float(hi).is_integer() and not ehi))
        if not exact:
            self.unsupported(ptr, "a non-integer or exclusive number bound is enforced on integers only")
            ilo = None if lo is None else math.floor(lo) + 1 if elo or not float(lo).is_integer() else int(lo)
            ihi = None if hi is None else math.ceil(hi) - 1 if ehi or not float(hi).is_integer() else int(hi)
            if ilo is not None and ihi is not None and ilo > ihi:
                return None
            node = number_range(ilo, ihi)
        else:
            node = number_range(None if lo is None else int(lo), None if hi is None else int(hi))
        return self.b.term(node, "NUM_RANGE")

    def t_string(self, s: dict, ptr: str) -> str | None:
        parts: list[rx.Node] = []  # constraints on the string's JSON text, all must hold
        fmt = s.get("format")
        if isinstance(fmt, str):
            if fmt in FORMATS:
                parts.append(json_text_node(rx.parse_python_regex(FORMATS[fmt])))
            else:
                self.unsupported(f"{ptr}/format", f"format {fmt!r} is not supported")
        pats = [s["pattern"]] if "pattern" in s else []
        pats += list(s.get("x-extra-patterns", ()))  # from allOf merges
        for pat in pats:
            if not isinstance(pat, str):
                raise self.error(f"{ptr}/pattern", "pattern must be a string")
            try:
                parts.append(json_text_node(rx.parse_python_regex(pat, ecma=True, search=True)))
            except ConstraintError as exc:
                raise self.error(f"{ptr}/pattern", str(exc)) from None
        mn, mx = s.get("minLength", 0), s.get("maxLength")
        if not isinstance(mn, int) or (mx is not None and not isinstance(mx, int)):
            raise self.error(ptr, "minLength / maxLength must be integers")
        if mx is not None and mx < mn:
            return None
        limit = self.opts.max_string_length if not parts else self.opts.max_string_length_with_pattern
        if mx is not None and mx > limit:
            self.unsupported(f"{ptr}/maxLength", f"maxLength {mx} is over the limit of {limit} that is enforced")
            mx = None
        if mn > limit:
            self.unsupported(f"{ptr}/minLength", f"minLength {mn} is over the limit of {limit} that is enforced")
            mn = 0
        length = rx.repeat(JSON_CHAR, mn, mx) if (mn > 0 or mx is not None) else None
        if not parts and length is None:
            return self.b.term(ANY_STRING, "STRING")
        node = self._string_node(parts, length)
        if not parts:  # "…" with a count: built with a counter beside the automaton when compiled
            return self.b.term(node, "STRING")
        try:
            compile_dfa(node, where=ptr)
        except RegexError as exc:
            if length is None or not parts:
                raise self.error(ptr, str(exc)) from None
            self.unsupported(ptr, f"minLength/maxLength together with a pattern or format is too complex ({exc})")
            node = self._string_node(parts, None)
        return self.b.term(node, "STRING")

    @staticmethod
    def _string_node(parts: list[rx.Node], length: rx.Node | None) -> rx.Node:
        items = parts + ([length] if length is not None else [])
        node = rx.seq(QUOTE, items[0], QUOTE)
        for extra in items[1:]:  # the quotes delimit the text uniquely, so intersect whole strings
            node = rx.And(node, rx.seq(QUOTE, extra, QUOTE))
        return node

    def t_array(self, s: dict, ptr: str) -> str | None:
        b = self.b
        prefix = s.get("prefixItems")
        items = s.get("items", True)
        rest: Any = items
        if isinstance(items, list):  # draft-07 tuple form
            prefix, rest = items, s.get("additionalItems", True)
        elif prefix is None:
            prefix = []
        mn, mx = s.get("minItems", 0), s.get("maxItems")
        if not isinstance(mn, int) or (mx is not None and not isinstance(mx, int)):
            raise self.error(ptr, "minItems / maxItems must be integers")
        elems = [self.value(p, f"{ptr}/prefixItems/{i}") for i, p in enumerate(prefix)]
        rest_sym = self.value(rest, f"{ptr}/items")
        # the array can hold at most: the prefix up to its first impossible item, then rest
        limit = next((i for i, e in enumerate(elems) if e is None), None)
        cap = limit if limit is not None else (len(elems) if rest_sym is None else None)
        if mx is not None:
            cap = mx if cap is None else min(cap, mx)
        if cap is not None and cap < mn:
            return None
        if cap is not None and cap > self.opts.max_items_expanded and cap > len(elems):
            if mx is not None and mx > self.opts.max_items_expanded:
                raise self.error(f"{ptr}/maxItems", f"maxItems {mx} is over the limit of {self.opts.max_items_expanded}")
        comma = self.comma()

        def elem(i: int) -> str:
            return elems[i] if i < len(elems) else rest_sym  # type: ignore[return-value]

        # tail(k): what may follow after k elements
        loop: str | None = None
        tails: dict[int, str] = {}
        top = max(len(elems), mn)
        for k in range(max(top, 1) if cap is None else cap, 0, -1):
            alts: list[list[str]] = []
            if k >= mn:
                alts.append([])
            if cap is None and k == max(top, 1):
                if loop is None:
                    loop = b.declare("items")
                    b.define(loop, [[], [comma, rest_sym, loop]])  # type: ignore[list-item]
                tails[k] = loop if k >= mn else loop
                continue
            if cap is None or k < cap:
                alts.append([comma, elem(k), tails[k + 1]])
            tails[k] = b.rule(alts, "tail")
        lb, rb = b.lit("["), b.lit("]")
        alts = []
        if mn == 0:
            alts.append([lb, rb])
        if cap is None or cap >= 1:
            alts.append([lb, elem(0), tails[1], rb] if 1 in tails else [lb, elem(0), rb])
        return b.rule(alts, "array")

    def t_object(self, s: dict, ptr: str) -> str | None:
        b = self.b
        props = s.get("properties") or {}
        if not isinstance(props, dict):
            raise self.error(f"{ptr}/properties", "properties must be an object")
        required = s.get("required") or []
        if not isinstance(required, list):  # draft-03 "required": true on a property
            required = []
        addl = s.get("additionalProperties", True)
        pprops = s.get("patternProperties") or {}
        keys = list(props)
        for r in required:
            if r not in props:
                if addl is False and not any(re.search(p, r) for p in pprops):
                    return None
                keys.append(r)
        req = set(required)
        colon = self.colon()
        kvs: list[str | None] = []
        for k in keys:
            sub = props[k] if k in props else addl
            v = self.value(sub, f"{ptr}/properties/{_esc_ptr(k)}")
            if v is None:
                if k in req:
                    return None
                kvs.append(None)
                continue
            kvs.append(b.rule([[b.lit(json.dumps(k, ensure_ascii=False), "KEY"), colon, v]], "kv"))
        key_lits = tuple(b.lit(json.dumps(k, ensure_ascii=False), "KEY") for k in keys)
        extras: list[str] = []
        for i, (pat, psch) in enumerate(pprops.items()):
            v = self.value(psch, f"{ptr}/patternProperties/{_esc_ptr(pat)}")
            if v is None:
                continue
            try:
                knode = json_text_node(rx.parse_python_regex(pat, ecma=True, search=True))
            except ConstraintError as exc:
                raise self.error(f"{ptr}/patternProperties/{_esc_ptr(pat)}", str(exc)) from None
            kt = b.term(rx.seq(QUOTE, knode, QUOTE), "PKEY", priority=1, shadows=key_lits)
            extras.append(b.rule([[kt, colon, v]], "pkv"))
        if addl is not False:
            v = self.value(addl, f"{ptr}/additionalProperties")
            if v is not None:
                kt = b.term(ANY_STRING, "ANYKEY", shadows=key_lits)
                extras.append(b.rule([[kt, colon, v]], "xkv"))
        comma = self.comma()
        x = b.rule([[e] for e in extras], "extra") if extras else None
        live = [k for k in range(len(keys)) if kvs[k] is not None]
        if self.opts.property_order == "any" and 1 < len(live) <= self.opts.max_any_order:
            return self._any_order_object([kvs[k] for k in live], [keys[k] in req for k in live], x)  # type: ignore[misc]
        n = len(keys)
        # after[k]: the members after the written ones when property k is the next that may
        # come, each introduced by a comma; first: all the members of the object. Additional
        # members (x) attach only right after the last written property (after[k] ::= "," x
        # after[k]), never after a skipped optional one: one parse per text, so the parser
        # carries one item per position instead of one per property that could have been
        # skipped (which made long optional-property lists quadratic).
        # after0[k]/first0[k]: the same, not starting with an additional member
        after0: list[str] = [""] * (n + 1)
        first0: list[str] = [""] * (n + 1)
        after: list[str] = [""] * (n + 1)
        after0[n] = first0[n] = b.rule([[]], "end")
        for k in range(n, -1, -1):
            if k < n:
                kv, optional = kvs[k], keys[k] not in req
                fa: list[list[str]] = []
                aa: list[list[str]] = []
                if kv is not None:
                    fa.append([kv, after[k + 1]])
                    aa.append([comma, kv, after[k + 1]])
                if optional:
                    fa.append([first0[k + 1]])
                    aa.append([after0[k + 1]])
                after0[k] = b.rule(aa, "after")  # not empty: a property without a schema is optional
                first0[k] = b.rule(fa, "first")
            if x is None:
                after[k] = after0[k]
            else:
                after[k] = b.declare("after")
                b.define(after[k], [[after0[k]], [comma, x, after[k]]])
        first = first0[0] if x is None else b.rule([[first0[0]], [x, after[0]]], "first")
        return b.rule([[b.lit("{"), first, b.lit("}")]], "object")

    def _any_order_object(self, kvs: list[str], required: list[bool], x: str | None) -> str:
        """``{ members }`` with the members ``kvs`` in any order, each at most once, the
        ``required`` ones all present, and additional members ``x`` (if any) anywhere. One
        rule per set of members written so far."""
        b = self.b
        comma = self.comma()
        need = sum(1 << i for i, r in enumerate(required) if r)
        rest: dict[int, str] = {}

        def after(used: int) -> str:  # what may follow once the members in `used` are written
            got = rest.get(used)
            if got is None:
                got = rest[used] = b.declare("members")
                alts: list[list[str]] = [[]] if used & need == need else []
                alts += [[comma, kv, after(used | 1 << i)] for i, kv in enumerate(kvs) if not used >> i & 1]
                if x is not None:
                    alts.append([comma, x, after(used)])
                b.define(got, alts)
            return got

        first: list[list[str]] = [[]] if need == 0 else []
        first += [[kv, after(1 << i)] for i, kv in enumerate(kvs)]
        if x is not None:
            first.append([x, after(0)])
        body = b.rule(first, "members")
        return b.rule([[b.lit("{"), body, b.lit("}")]], "object")

    # -- any JSON ----------------------------------------------------------------------------
    def any_value(self) -> str:
        if self._any is None:
            b = self.b
            v = self._any = b.declare("json")
            s = b.term(ANY_STRING, "STRING")
            lb, rb, ls, rs = (b.lit(c) for c in "{}[]")
            comma, colon = self.comma(), self.colon()
            members = b.declare("members")
            b.define(members, [[], [comma, s, colon, v, members]])
            elems = b.declare("elements")
            b.define(elems, [[], [comma, v, elems]])
            obj = b.rule([[lb, rb], [lb, s, colon, v, members, rb]], "any_object")
            arr = b.rule([[ls, rs], [ls, v, elems, rs]], "any_array")
            b.define(v, [[obj], [arr], [s], [b.term(NUMBER, "NUMBER")], [b.lit("true")], [b.lit("false")], [b.lit("null")]])
        return self._any


def json_schema_grammar(schema: Any, options: JsonSchemaOptions | None = None) -> tuple[Grammar, list[str]]:
    """Compile a JSON Schema (dict, bool, or JSON text) to a grammar; also return the warnings
    about ignored keywords (empty in strict mode, which raises instead)."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ConstraintError(f"JSON Schema is not valid JSON: {exc}") from None
    comp = SchemaCompiler(schema, options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = comp.compile()
    for w in comp.warnings:
        warnings.warn(f"JSON Schema {w}; ignored", stacklevel=2)
    return g, comp.warnings


def any_json_grammar(options: JsonSchemaOptions | None = None) -> Grammar:
    """Any JSON value."""
    return json_schema_grammar(True, options)[0]


def _has_type(value: Any, types: Any) -> bool:
    """Whether a JSON value (from ``enum`` / ``const``) has one of the schema ``type`` names
    (``None``: no type constraint)."""
    if types is None:
        return True
    names = [types] if isinstance(types, str) else list(types) if isinstance(types, list) else []
    for t in names:
        if t == "null" and value is None:
            return True
        if t == "boolean" and isinstance(value, bool):
            return True
        if t == "string" and isinstance(value, str):
            return True
        if t == "array" and isinstance(value, list):
            return True
        if t == "object" and isinstance(value, dict):
            return True
        if not isinstance(value, bool) and isinstance(value, (int, float)):
            if t == "number" or (t == "integer" and float(value).is_integer()):
                return True
    return not names  # an unrecognised type value constrains nothing here
