"""Regular expressions as a small AST over Unicode code points.

Every terminal of a constraint grammar — a lark ``/regex/`` or ``"literal"``, a JSON string with
``pattern`` / ``minLength``, a number range — is first written as a :class:`Node` tree here, then
compiled to a byte-level DFA by :mod:`plugins.constraints.automata`. Python ``re`` syntax is
parsed with the standard library's own parser (``re._parser``), so what we accept is exactly
what ``re`` accepts, minus the constructs that are not regular (back-references, look-arounds),
which are rejected with a :class:`RegexError` naming the construct.
"""

from __future__ import annotations

import functools
import re
import hashlib
from dataclasses import dataclass

try:  # Python 3.11+
    import re._constants as _c  # type: ignore[import-not-found]
    import re._parser as _p  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

from framework.errors import ConstraintError

__all__ = [
    "Node", "Chars", "Seq", "Alt", "Repeat", "And", "RegexError", "EMPTY", "NOTHING",
    "literal", "chars", "seq", "alt", "repeat", "opt", "star", "plus", "parse_python_regex",
    "MAX_CP", "ANY_CHAR", "to_regex_text",
]  # fmt: skip

MAX_CP = 0x10FFFF
Ranges = tuple[tuple[int, int], ...]


class RegexError(ConstraintError):
    """A regular expression uses an unsupported construct or is too large."""


# ----------------------------------------------------------------------------- AST


class Node:
    """Base of the regex AST (immutable, hashable: used as cache keys)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Chars(Node):
    """One code point from ``ranges`` (sorted, disjoint, inclusive; no surrogates)."""

    ranges: Ranges


@dataclass(frozen=True, slots=True)
class Seq(Node):
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Alt(Node):
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Repeat(Node):
    item: Node
    min: int
    max: int | None  # None: unbounded


@dataclass(frozen=True, slots=True)
class And(Node):
    """Strings matched by both ``a`` and ``b`` (compiled as a product automaton)."""

    a: Node
    b: Node


EMPTY = Seq(())
NOTHING = Alt(())


def node_key(node: Node) -> bytes:
    """A 16-byte digest of ``node``'s structure: the key of process-wide caches, which then
    hold bytes rather than whole syntax trees (objects the cyclic GC would keep scanning)."""
    return hashlib.blake2b(repr(node).encode(), digest_size=16).digest()


def normalize_ranges(ranges) -> Ranges:
    """Sort, merge and drop surrogates (UTF-8 cannot encode them)."""
    out: list[list[int]] = []
    for lo, hi in sorted((max(0, a), min(MAX_CP, b)) for a, b in ranges):
        if lo > hi:
            continue
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    res: list[tuple[int, int]] = []
    for lo, hi in out:  # cut 0xD800-0xDFFF
        if hi < 0xD800 or lo > 0xDFFF:
            res.append((lo, hi))
        else:
            if lo < 0xD800:
                res.append((lo, 0xD7FF))
            if hi > 0xDFFF:
                res.append((0xE000, hi))
    return tuple(res)


def negate_ranges(ranges: Ranges) -> Ranges:
    out, prev = [], 0
    for lo, hi in ranges:
        if lo > prev:
            out.append((prev, lo - 1))
        prev = hi + 1
    if prev <= MAX_CP:
        out.append((prev, MAX_CP))
    return normalize_ranges(out)


def subtract_ranges(a: Ranges, b: Ranges) -> Ranges:
    return intersect_ranges(a, negate_ranges(b))


def intersect_ranges(a: Ranges, b: Ranges) -> Ranges:
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tuple(out)


def chars(ranges) -> Node:
    r = normalize_ranges(ranges)
    return Chars(r) if r else NOTHING


def literal(text: str) -> Node:
    return seq(*(Chars(((ord(ch), ord(ch)),)) for ch in text))


def seq(*items: Node) -> Node:
    flat: list[Node] = []
    for it in items:
        if it == NOTHING:
            return NOTHING
        if isinstance(it, Seq):
            flat.extend(it.items)
        else:
            flat.append(it)
    return flat[0] if len(flat) == 1 else Seq(tuple(flat))


def alt(*items: Node) -> Node:
    flat: list[Node] = []
    for it in items:
        if isinstance(it, Alt):
            flat.extend(x for x in it.items if x not in flat)
        elif it not in flat:
            flat.append(it)
    # merge plain single-character alternatives into one class
    single = [x for x in flat if isinstance(x, Chars)]
    if len(single) > 1:
        merged = Chars(normalize_ranges([r for x in single for r in x.ranges]))
        flat = [merged] + [x for x in flat if not isinstance(x, Chars)]
    return flat[0] if len(flat) == 1 else Alt(tuple(flat))


def repeat(item: Node, lo: int, hi: int | None) -> Node:
    if hi is not None and hi < lo:
        return NOTHING
    if hi == 0 or item == EMPTY:
        return EMPTY
    if lo == hi == 1:
        return item
    return Repeat(item, lo, hi)


def opt(item: Node) -> Node:
    return repeat(item, 0, 1)


def star(item: Node) -> Node:
    return repeat(item, 0, None)


def plus(item: Node) -> Node:
    return repeat(item, 1, None)


ANY_CHAR = Chars(normalize_ranges([(0, MAX_CP)]))


# ----------------------------------------------------------------------------- categories


@functools.lru_cache(maxsize=None)
def _unicode_category(pattern: str) -> Ranges:
    """Code point ranges matched by ``pattern`` (e.g. ``\\d``) under Python's Unicode rules.

    ``re`` itself decides, scanning one string holding every code point once (~20 ms)."""
    text = "".join(map(chr, range(0xD800))) + "".join(map(chr, range(0xE000, MAX_CP + 1)))
    out = []
    for m in re.finditer(pattern + "+", text):
        lo, hi = m.start(), m.end() - 1
        shift = 0 if lo < 0xD800 else 0x800
        lo2 = lo + shift
        hi2 = hi + (0 if hi < 0xD800 else 0x800)
        out.append((lo2, hi2))
    return normalize_ranges(out)


_ASCII_CATS = {
    "d": ((48, 57),),
    "w": ((48, 57), (65, 90), (95, 95), (97, 122)),
    "s": ((9, 13), (32, 32)),
}
# ECMAScript (JSON Schema ``pattern``): \d and \w are ASCII, \s is Unicode white space.
_ECMA_SPACE = normalize_ranges(
    [(9, 13), (32, 32), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
     (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]
)  # fmt: skip


def _category(name: str, *, unicode: bool, ecma: bool) -> Ranges:
    neg = "NOT_" in name
    key = {"DIGIT": "d", "WORD": "w", "SPACE": "s"}.get(name.replace("CATEGORY_", "").replace("NOT_", ""))
    if key is None:
        raise RegexError(f"character category {name} is not supported")
    if ecma:
        r = _ECMA_SPACE if key == "s" else _ASCII_CATS[key]
    elif unicode:
        r = _unicode_category("\\" + key)
    else:
        r = _ASCII_CATS[key]
    return negate_ranges(r) if neg else r


def _casefold_ranges(ranges: Ranges) -> Ranges:
    extra = []
    for lo, hi in ranges:
        if hi - lo > 20000:  # huge classes already hold (nearly) every case variant
            continue
        for cp in range(lo, hi + 1):
            ch = chr(cp)
            for v in (ch.lower(), ch.upper(), ch.swapcase()):
                if len(v) == 1 and v != ch:
                    extra.append((ord(v), ord(v)))
    return normalize_ranges(list(ranges) + extra)


# ----------------------------------------------------------------------------- Python re syntax


def parse_python_regex(pattern: str, flags: int = 0, *, ecma: bool = False, search: bool = False) -> Node:
    """Parse ``pattern`` (Python ``re`` syntax) into a :class:`Node` matching the same strings.

    Semantics are ``re.fullmatch`` — or, with ``search=True`` (JSON Schema ``pattern``), "the
    string contains a match": sides without a ``^`` / ``$`` anchor are padded with ``.*``.
    ``ecma=True`` uses ECMAScript character classes (ASCII ``\\d``/``\\w``; ``.`` excludes all
    line terminators), which JSON Schema prescribes and which are a subset of Python's.

    Raises:
        RegexError: syntax error, or a construct that is not regular (back-reference,
            look-around, conditional, anchor in the middle of the pattern).
    """
    try:
        parsed = _p.parse(pattern, flags)
    except re.error as exc:
        raise RegexError(f"invalid regular expression {pattern!r}: {exc}") from None
    gflags = parsed.state.flags
    items = list(parsed)
    anchored_start = anchored_end = False
    if items and items[0][0] is _c.AT and items[0][1] in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING):
        anchored_start = True
        items = items[1:]
    if items and items[-1][0] is _c.AT and items[-1][1] in (_c.AT_END, _c.AT_END_STRING):
        anchored_end = True
        items = items[:-1]
    conv = _Converter(pattern, gflags, ecma)
    # A top-level alternation with anchors inside each branch (^a$|^b$) is common in schemas.
    if len(items) == 1 and items[0][0] is _c.BRANCH and not (anchored_start or anchored_end) and search:
        branches = []
        for br in items[0][1][1]:
            branches.append(parse_python_regex_items(conv, list(br), search))
        return alt(*branches)
    node = conv.seq(items)
    if search:
        anyc = conv.dot()
        if not anchored_start:
            node = seq(star(anyc), node)
        if not anchored_end:
            node = seq(node, star(anyc))
    return node


def parse_python_regex_items(conv: "_Converter", items: list, search: bool) -> Node:
    a0 = a1 = False
    if items and items[0][0] is _c.AT and items[0][1] in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING):
        a0, items = True, items[1:]
    if items and items[-1][0] is _c.AT and items[-1][1] in (_c.AT_END, _c.AT_END_STRING):
        a1, items = True, items[:-1]
    node = conv.seq(items)
    if search:
        if not a0:
            node = seq(star(conv.dot()), node)
        if not a1:
            node = seq(node, star(conv.dot()))
    return node


class _Converter:
    def __init__(self, pattern: str, flags: int, ecma: bool):
        self.pattern, self.flags, self.ecma = pattern, flags, ecma

    def err(self, what: str) -> RegexError:
        return RegexError(f"regular expression {self.pattern!r}: {what} is not supported")

    def dot(self, flags: int | None = None) -> Node:
        f = self.flags if flags is None else flags
        if f & re.DOTALL:
            return ANY_CHAR
        if self.ecma:
            return chars(negate_ranges(((10, 10), (13, 13), (0x2028, 0x2029))))
        return chars(negate_ranges(((10, 10),)))

    def cls(self, r: Ranges, flags: int) -> Node:
        if flags & re.IGNORECASE:
            r = _casefold_ranges(r)
        return chars(r)

    def seq(self, items, flags: int | None = None) -> Node:
        f = self.flags if flags is None else flags
        return seq(*(self.one(op, av, f) for op, av in items))

    def one(self, op, av, f: int) -> Node:
        unicode = not (f & re.ASCII)
        if op is _c.LITERAL:
            return self.cls(((av, av),), f)
        if op is _c.NOT_LITERAL:
            return self.cls(negate_ranges(((av, av),)), f) if not f & re.IGNORECASE else chars(
                negate_ranges(_casefold_ranges(((av, av),))))
        if op is _c.ANY:
            return self.dot(f)
        if op is _c.IN:
            neg, rs = False, []
            for iop, iav in av:
                if iop is _c.NEGATE:
                    neg = True
                elif iop is _c.LITERAL:
                    rs.append((iav, iav))
                elif iop is _c.RANGE:
                    rs.append(tuple(iav))
                elif iop is _c.CATEGORY:
                    rs.extend(_category(str(iav), unicode=unicode, ecma=self.ecma))
                else:
                    raise self.err(f"class item {iop}")
            r = normalize_ranges(rs)
            if f & re.IGNORECASE:
                r = _casefold_ranges(r)
            return chars(negate_ranges(r) if neg else r)
        if op is _c.BRANCH:
            return alt(*(self.seq(list(b), f) for b in av[1]))
        if op is _c.SUBPATTERN:
            _group, add, rem, p = av
            return self.seq(list(p), (f | add) & ~rem)
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT) or op is getattr(_c, "POSSESSIVE_REPEAT", None):
            if op is getattr(_c, "POSSESSIVE_REPEAT", None):
                raise self.err("a possessive quantifier")
            lo, hi, p = av
            return repeat(self.seq(list(p), f), lo, None if hi == _c.MAXREPEAT else hi)
        if op is _c.CATEGORY:
            return chars(_category(str(av), unicode=unicode, ecma=self.ecma))
        if op is _c.AT:
            raise self.err(f"an anchor ({av}) inside the pattern")
        if op in (_c.GROUPREF, getattr(_c, "GROUPREF_EXISTS", None)):
            raise self.err("a back-reference")
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            raise self.err("a look-around assertion")
        raise self.err(f"the construct {op}")


# ----------------------------------------------------------------------------- back to text


def _cp_text(cp: int) -> str:
    if cp < 0x20 or cp in (0x7F,) or 0x80 <= cp < 0xA0:
        return f"\\x{cp:02x}"
    ch = chr(cp)
    if ch in "\\]^-[":
        return "\\" + ch
    if cp > 0xFFFF:
        return f"\\U{cp:08x}"
    if cp > 0x7E:
        return f"\\u{cp:04x}"
    return ch


def to_regex_text(node: Node) -> str:
    """Python ``re`` text for ``node`` (used to export grammars to lark)."""
    if isinstance(node, Chars):
        if len(node.ranges) == 1 and node.ranges[0][0] == node.ranges[0][1]:
            cp = node.ranges[0][0]
            ch = chr(cp)
            return re.escape(ch) if 0x20 <= cp < 0x7F else _cp_text(cp)
        body = "".join(_cp_text(a) if a == b else f"{_cp_text(a)}-{_cp_text(b)}" for a, b in node.ranges)
        return f"[{body}]"
    if isinstance(node, Seq):
        return "".join(_group(x) if isinstance(x, Alt) else to_regex_text(x) for x in node.items)
    if isinstance(node, Alt):
        return "(?!)" if not node.items else "|".join(to_regex_text(x) for x in node.items)
    if isinstance(node, Repeat):
        inner = to_regex_text(node.item)
        if not isinstance(node.item, Chars):
            inner = f"(?:{inner})"
        if node.max is None:
            q = "*" if node.min == 0 else "+" if node.min == 1 else f"{{{node.min},}}"
        elif node.min == 0 and node.max == 1:
            q = "?"
        else:
            q = f"{{{node.min}}}" if node.min == node.max else f"{{{node.min},{node.max}}}"
        return inner + q
    raise TypeError(node)


def _group(node: Node) -> str:
    return f"(?:{to_regex_text(node)})"
