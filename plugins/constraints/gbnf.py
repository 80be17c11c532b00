"""llama.cpp GBNF grammars -> lark grammar text.

GBNF (``name ::= expr``; ``"literals"``, ``[classes]``, ``.``, ``( )``, ``|``, ``* + ?``,
``{m}``, ``{m,}``, ``{m,n}``, ``{,n}``, ``#`` comments; ``root`` is the start rule) describes
text character by character, with no lexer. The conversion keeps that meaning: every literal
character, class and ``.`` becomes a one-character lark terminal, so there is no longest-match
lexing to change the language, and the engine compiles GBNF grammars with ties between matching
terminals resolved by the parser (``ties="all"``), as a scannerless parser would.
"""

from __future__ import annotations

import re

from framework.errors import ConstraintError
from plugins.constraints import regex as rx

__all__ = ["gbnf_to_lark"]

_TOKEN = re.compile(
    r"""(?P<ws>[ \t\r\n]+|\#[^\n]*)
      | (?P<def>::=)
      | (?P<name>[A-Za-z0-9_-]+)
      | (?P<str>"(?:[^"\\]|\\.)*")
      | (?P<cls>\[(?:[^\]\\]|\\.)*\])
      | (?P<rep>\{\s*\d*\s*(?:,\s*\d*\s*)?\})
      | (?P<op>[()|*+?.])""",
    re.X | re.S,
)

_ESC = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-", "^": "^", "/": "/", "0": "\0"}


def _unescape(text: str, i: int) -> tuple[int, int]:
    """Code point of the (possibly escaped) character at text[i]; returns (cp, next index)."""
    ch = text[i]
    if ch != "\\":
        return ord(ch), i + 1
    e = text[i + 1]
    for lead, n in (("x", 2), ("u", 4), ("U", 8)):
        if e == lead:
            return int(text[i + 2 : i + 2 + n], 16), i + 2 + n
    if e in _ESC:
        return ord(_ESC[e]), i + 2
    return ord(e), i + 2


class _Parser:
    def __init__(self, text: str, source: str):
        self.source = source
        self.toks: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                line = text.count("\n", 0, pos) + 1
                raise ConstraintError(f"{source}: line {line}: unexpected {text[pos:pos + 10]!r}")
            kind = m.lastgroup
            if kind != "ws":
                self.toks.append((kind, m.group(), text.count("\n", 0, pos) + 1))  # type: ignore[arg-type]
            pos = m.end()
        self.i = 0
        self.depth = 0

    def peek(self, k: int = 0) -> tuple[str, str, int]:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ("eof", "", -1)

    def expect(self, kind: str, value: str | None = None) -> str:
        t = self.peek()
        if t[0] != kind or (value is not None and t[1] != value):
            raise ConstraintError(f"{self.source}: line {t[2]}: expected {value or kind}, found {t[1] or 'end of grammar'!r}")
        self.i += 1
        return t[1]

    def rules(self) -> list[tuple[str, list]]:
        out = []
        while self.peek()[0] != "eof":
            name = self.expect("name")
            self.expect("def")
            out.append((name, self.alternatives()))
        return out

    def at_rule_start(self) -> bool:
        return self.peek()[0] == "name" and self.peek(1)[0] == "def"

    def alternatives(self) -> list:
        alts = [self.sequence()]
        while self.peek() == ("op", "|", self.peek()[2]):
            self.i += 1
            alts.append(self.sequence())
        return alts

    def sequence(self) -> list:
        items = []
        while True:
            kind, val, line = self.peek()
            if kind == "eof" or (kind == "op" and val in "|)") or self.at_rule_start():
                if kind == "eof" and self.depth:
                    last = self.toks[-1][2] if self.toks else 1
                    raise ConstraintError(f"{self.source}: line {last}: unclosed '(' at the end of the grammar")
                return items
            if kind == "name":
                atom: tuple = ("ref", val)
                self.i += 1
            elif kind == "str":
                atom = ("str", val[1:-1])
                self.i += 1
            elif kind == "cls":
                atom = ("cls", val)
                self.i += 1
            elif kind == "op" and val == ".":
                atom = ("any",)
                self.i += 1
            elif kind == "op" and val == "(":
                self.i += 1
                self.depth += 1
                atom = ("group", self.alternatives())
                self.expect("op", ")")
                self.depth -= 1
            else:
                raise ConstraintError(f"{self.source}: line {line}: unexpected {val!r}")
            while True:
                kind, val, line = self.peek()
                if kind == "op" and val in "*+?":
                    atom = ("rep", atom, {"*": (0, None), "+": (1, None), "?": (0, 1)}[val])
                    self.i += 1
                elif kind == "rep":
                    body = val[1:-1].replace(" ", "")
                    if "," in body:
                        a, b = body.split(",")
                        lo, hi = int(a or 0), (int(b) if b else None)
                    else:
                        lo = hi = int(body)
                    if hi is not None and hi < lo:
                        raise ConstraintError(f"{self.source}: line {line}: bad repetition {val}")
                    atom = ("rep", atom, (lo, hi))
                    self.i += 1
                else:
                    break
            items.append(atom)


def _class_ranges(text: str, source: str) -> rx.Node:
    body = text[1:-1]
    neg = body.startswith("^")
    if neg:
        body = body[1:]
    ranges, i = [], 0
    while i < len(body):
        lo, i = _unescape(body, i)
        if i + 1 < len(body) and body[i] == "-":
            hi, i = _unescape(body, i + 1)
            if hi < lo:
                raise ConstraintError(f"{source}: bad range in class {text}")
            ranges.append((lo, hi))
        else:
            ranges.append((lo, lo))
    r = rx.normalize_ranges(ranges)
    return rx.chars(rx.negate_ranges(r) if neg else r)


def _term(node: rx.Node) -> str:
    return "/" + rx.to_regex_text(node).replace("/", "\\/") + "/"


def gbnf_to_lark(text: str, source: str = "GBNF grammar") -> str:
    """Convert GBNF text to lark text whose start rule is ``root``.

    Raises:
        ConstraintError: a syntax error (with its line), an undefined rule, or no ``root``.
    """
    rules = _Parser(text, source).rules()
    names: dict[str, str] = {}
    for name, _ in rules:
        base = "g_" + re.sub(r"[^a-z0-9_]", "_", name.lower())
        cand, k = base, 1
        while cand in names.values() and names.get(name) != cand:
            k += 1
            cand = f"{base}_{k}"
        names.setdefault(name, cand)
    if "root" not in names:
        raise ConstraintError(f"{source}: no 'root' rule")

    def alts(a: list) -> str:
        seqs = [seq(s) for s in a]
        if any(not s for s in seqs):
            nonempty = [s for s in seqs if s]
            return f"({' | '.join(nonempty)})?" if nonempty else ""
        return " | ".join(seqs)

    def seq(items: list) -> str:
        return " ".join(p for p in (atom(x) for x in items) if p)

    def atom(a: tuple) -> str:
        kind = a[0]
        if kind == "ref":
            if a[1] not in names:
                raise ConstraintError(f"{source}: rule {a[1]!r} is used but not defined")
            return names[a[1]]
        if kind == "str":
            s, i, parts = a[1], 0, []
            while i < len(s):
                cp, i = _unescape(s, i)
                parts.append(_term(rx.chars([(cp, cp)])))
            return " ".join(parts)
        if kind == "cls":
            node = _class_ranges(a[1], source)
            if node == rx.NOTHING:
                raise ConstraintError(f"{source}: class {a[1]} matches nothing")
            return _term(node)
        if kind == "any":
            return _term(rx.ANY_CHAR)
        if kind == "group":
            inner = alts(a[1])
            return f"({inner})" if inner else ""
        if kind == "rep":
            inner = atom(a[1])
            if not inner:
                return ""
            inner = f"({inner})"
            lo, hi = a[2]
            if (lo, hi) == (0, None):
                return inner + "*"
            if (lo, hi) == (1, None):
                return inner + "+"
            if (lo, hi) == (0, 1):
                return inner + "?"
            if hi is None:
                return f"{inner} ~ {lo} {inner}*" if lo else inner + "*"
            if hi == 0:
                return ""
            return f"{inner} ~ {lo}..{hi}" if lo != hi else f"{inner} ~ {lo}"
        raise AssertionError(kind)

    lines = []
    for name, body in rules:
        b = alts(body)
        if not b:
            raise ConstraintError(f"{source}: rule {name!r} matches only the empty string; GBNF rules used here must match text")
        lines.append(f"{names[name]}: {b}")
    return "\n".join(lines) + "\n"
