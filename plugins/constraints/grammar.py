"""The grammar every front end compiles to: BNF rules over named terminals (regex ASTs).

:class:`Grammar` is the common form. Lark grammars (``.lark`` text, inline or from ``grammars/``)
are loaded with lark itself — its grammar parser, ``%import``, templates and EBNF-to-BNF
expansion — and read back from the ``Lark`` object; JSON Schema, regex and choice lists build a
:class:`Grammar` directly (going through lark text would cost far more than the conversion) and
can be exported as lark text with :meth:`Grammar.to_lark`, which lark loads and parses like the
original.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from framework.errors import ConstraintError
from plugins.constraints import regex as rx

__all__ = ["Terminal", "Grammar", "GrammarBuilder", "grammar_from_lark", "GRAMMARS_DIR"]



def _grammars_dir() -> Path:
    """Where the shipped ``.lark`` grammars are: ``plugins/constraints/grammars/`` in an
    installed wheel (setup.py copies them there at build time), else the repository's
    top-level ``grammars/`` folder, which is their source (a checkout or an editable install)."""
    here = Path(__file__).resolve().parent
    packaged = here / "grammars"
    if packaged.is_dir():
        return packaged
    return here.parents[1] / "grammars"


GRAMMARS_DIR = _grammars_dir()


@dataclass(frozen=True, slots=True)
class Terminal:
    """A lexeme: ``node`` is its regex; lark's ``priority`` breaks ties between terminals
    matching the same text; ``literal`` marks string terminals (which win over regexes that
    match the same text, as lark's lexer does)."""

    name: str
    node: rx.Node
    priority: int = 0
    literal: bool = False
    shadows: tuple[str, ...] = ()  # literals the lexer also tries wherever this terminal may come


@dataclass(slots=True)
class Grammar:
    """BNF: ``rules[i] = (lhs, rhs)`` with symbols by name; terminal names are keys of
    ``terminals``; ``ignore`` terminals may appear between any two lexemes (lark ``%ignore``)."""

    terminals: dict[str, Terminal]
    rules: list[tuple[str, tuple[str, ...]]]
    start: str
    ignore: tuple[str, ...] = ()
    source: str = "grammar"
    ties: str = "lark"  # "lark": literals, then priority, pick the lexeme type; "all": the parser decides

    def nonterminals(self) -> list[str]:
        return list(dict.fromkeys(lhs for lhs, _ in self.rules))

    def check(self) -> "Grammar":
        """Drop rules that cannot derive any string or are unreachable; name what is wrong."""
        names = set(self.nonterminals())
        for lhs, rhs in self.rules:
            for s in rhs:
                if s not in names and s not in self.terminals:
                    raise ConstraintError(f"{self.source}: rule {lhs!r} uses {s!r}, which is not defined")
        if self.start not in names:
            raise ConstraintError(f"{self.source}: start rule {self.start!r} is not defined")
        for name in self.ignore:
            if name not in self.terminals:
                raise ConstraintError(f"{self.source}: %ignore names {name!r}, which is not a terminal")
        productive: set[str] = set()
        changed = True
        while changed:
            changed = False
            for lhs, rhs in self.rules:
                if lhs not in productive and all(s in self.terminals or s in productive for s in rhs):
                    productive.add(lhs)
                    changed = True
        if self.start not in productive:
            raise ConstraintError(f"{self.source}: the start rule {self.start!r} derives no finite string")
        rules = [(l, r) for l, r in self.rules if l in productive and all(s in self.terminals or s in productive for s in r)]
        reach, stack = {self.start}, [self.start]
        by_lhs: dict[str, list[tuple[str, ...]]] = {}
        for l, r in rules:
            by_lhs.setdefault(l, []).append(r)
        while stack:
            for r in by_lhs.get(stack.pop(), ()):
                for s in r:
                    if s not in self.terminals and s not in reach:
                        reach.add(s)
                        stack.append(s)
        self.rules = [(l, r) for l, r in rules if l in reach]
        return self

    def to_lark(self) -> str:
        """This grammar as lark text (rules lower-case, terminals as regexes)."""
        rn = {n: _lark_rule_name(n, i) for i, n in enumerate(self.nonterminals())}
        tn = {n: _lark_term_name(n, i) for i, n in enumerate(self.terminals)}
        by: dict[str, list[str]] = {}
        for lhs, rhs in self.rules:
            by.setdefault(lhs, []).append(" ".join(rn.get(s) or tn[s] for s in rhs) or "")
        lines = [f"start: {rn[self.start]}"] if self.start != "start" else []
        for lhs, alts in by.items():
            lines.append(f"{rn[lhs]}: " + "\n    | ".join(a if a else "" for a in alts))
        for name, t in self.terminals.items():
            text = rx.to_regex_text(t.node).replace("/", "\\/")
            prio = f".{t.priority}" if t.priority else ""
            lines.append(f"{tn[name]}{prio}: /{text}/")
        for name in self.ignore:
            lines.append(f"%ignore {tn[name]}")
        return "\n".join(lines) + "\n"


def _lark_rule_name(name: str, i: int) -> str:
    s = re.sub(r"[^a-z0-9_]", "_", name.lower()).lstrip("_") or "r"
    return s if s[0].isalpha() else f"r{i}_{s}"


def _lark_term_name(name: str, i: int) -> str:
    s = re.sub(r"[^A-Z0-9_]", "_", name.upper()).lstrip("_") or "T"
    return f"T{i}_{s}" if not s[0].isalpha() else s


class GrammarBuilder:
    """Builds a :class:`Grammar` programmatically, sharing identical terminals and rules."""

    def __init__(self, source: str):
        self.source = source
        self.terminals: dict[str, Terminal] = {}
        self._term_by_node: dict = {}
        self.rules: list[tuple[str, tuple[str, ...]]] = []
        self._rule_by_body: dict[tuple[tuple[str, ...], ...], str] = {}
        self._names: set[str] = set()
        self.ignore: list[str] = []

    def _fresh(self, hint: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_]", "_", hint)[:40] or "x"
        name, k = base, 1
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def term(self, node: rx.Node, hint: str = "T", *, literal: bool = False, priority: int = 0,
             shadows: tuple[str, ...] = ()) -> str:
        """A terminal for ``node``. ``shadows``: literal terminals that win over this one when
        they match the same text, even where the parser does not allow them (so a key pattern
        never produces a key that has its own schema)."""
        key = (node, priority, shadows)
        got = self._term_by_node.get(key)  # type: ignore[call-overload]
        if got is not None:
            return got
        name = self._fresh(hint.upper())
        self.terminals[name] = Terminal(name, node, priority, literal, shadows)
        self._term_by_node[key] = name  # type: ignore[index]
        return name

    def lit(self, text: str, hint: str | None = None) -> str:
        return self.term(rx.literal(text), hint or _hint_for(text), literal=True)

    def declare(self, hint: str) -> str:
        """A rule name whose alternatives are added later with :meth:`define` (for recursion)."""
        return self._fresh(hint.lower())

    def define(self, name: str, alternatives: list[tuple[str, ...]] | list[list[str]]) -> str:
        for a in alternatives:
            self.rules.append((name, tuple(a)))
        return name

    def rule(self, alternatives: list[tuple[str, ...]] | list[list[str]], hint: str = "r") -> str:
        body = tuple(tuple(a) for a in alternatives)
        got = self._rule_by_body.get(body)
        if got is not None:
            return got
        name = self.define(self._fresh(hint.lower()), list(body))
        self._rule_by_body[body] = name
        return name

    def build(self, start: str) -> Grammar:
        return Grammar(dict(self.terminals), list(self.rules), start, tuple(self.ignore), self.source).check()


def _hint_for(text: str) -> str:
    names = {"{": "LBRACE", "}": "RBRACE", "[": "LSQB", "]": "RSQB", ",": "COMMA", ":": "COLON", ", ": "COMMA",
             ": ": "COLON"}
    return names.get(text) or ("LIT_" + re.sub(r"[^A-Za-z0-9]", "", text)[:20])


# ----------------------------------------------------------------------------- lark


def _lark_flags(flags) -> int:
    f = 0
    for ch in flags or ():
        f |= {"i": re.IGNORECASE, "s": re.DOTALL, "m": re.MULTILINE, "x": re.VERBOSE, "u": 0, "l": 0}.get(ch, 0)
    return f


_WHITESPACE = rx.normalize_ranges([(9, 13), (32, 32), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                                   (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)])


def _only_whitespace(node: rx.Node) -> bool:
    if isinstance(node, rx.Chars):
        return not rx.subtract_ranges(node.ranges, _WHITESPACE)
    if isinstance(node, (rx.Seq, rx.Alt)):
        return all(_only_whitespace(x) for x in node.items)
    if isinstance(node, rx.Repeat):
        return _only_whitespace(node.item)
    return False


def bound_whitespace(node: rx.Node, limit: int) -> rx.Node:
    """``node`` matching at most ``limit`` characters when it matches only whitespace (lark's
    ``WS: /[ \t\n\r]+/`` is unbounded: ignored between any two lexemes, it would let a model
    emit whitespace until ``max_tokens``); other nodes unchanged."""
    if not _only_whitespace(node):
        return node
    if isinstance(node, rx.Repeat) and isinstance(node.item, rx.Chars):  # /[ \t]+/: the usual form
        if node.max is not None and node.max <= limit:
            return node
        return rx.repeat(node.item, node.min, max(node.min, limit))
    return rx.And(node, rx.repeat(rx.Chars(_WHITESPACE), 0, limit))


def grammar_from_lark(text: str, start: str = "start", source: str = "lark grammar", max_whitespace: int | None = None) -> Grammar:
    """Load lark grammar text with lark and convert it to a :class:`Grammar`.

    ``%import`` paths resolve against lark's own library and the project's ``grammars/``.
    ``max_whitespace``: the longest run an ``%ignore``'d terminal made only of whitespace may
    match (None: as the grammar says).

    Raises:
        ConstraintError: lark rejects the grammar (its message names the rule and line), or a
            terminal uses a regex construct that is not regular.
    """
    import lark

    try:
        lk = lark.Lark(text, start=start, parser="earley", lexer="dynamic", import_paths=[str(GRAMMARS_DIR)])
    except lark.exceptions.LarkError as exc:
        raise ConstraintError(f"{source}: {exc}".strip()) from None
    terminals: dict[str, Terminal] = {}
    for td in lk.terminals:
        pat = td.pattern
        flags = _lark_flags(pat.flags)
        try:
            if type(pat).__name__ == "PatternStr":
                node = rx.literal(pat.value)
                if flags & re.IGNORECASE:
                    node = rx.parse_python_regex(re.escape(pat.value), re.IGNORECASE)
                terminals[td.name] = Terminal(td.name, node, td.priority, literal=True)
            else:
                node = rx.parse_python_regex(pat.value, flags)
                terminals[td.name] = Terminal(td.name, node, td.priority)
        except ConstraintError as exc:
            raise ConstraintError(f"{source}: terminal {td.name}: {exc}") from None
    if max_whitespace is not None:
        for name in lk.ignore_tokens:
            t = terminals.get(name)
            if t is not None:
                terminals[name] = Terminal(t.name, bound_whitespace(t.node, max_whitespace), t.priority, t.literal, t.shadows)
    rules = [(r.origin.name, tuple(s.name for s in r.expansion)) for r in lk.rules]
    starts = lk.options.start
    st = starts[0] if isinstance(starts, list) else starts
    return Grammar(terminals, rules, str(st), tuple(lk.ignore_tokens), source).check()
