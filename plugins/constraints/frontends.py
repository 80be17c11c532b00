"""Front ends: each turns a user's constraint description into a :class:`Grammar`.

=============  ==========================================================================
``json_schema`` a JSON Schema (dict, bool, JSON text, or a path to a ``.json`` file)
``json``        any JSON value
``regex``       a Python ``re`` pattern the whole output must match (``re.fullmatch``)
``choice``      one of a list of strings, exactly
``grammar``     a lark grammar: inline text, a shipped name (``grammars/NAME.lark``) or a path
``gbnf``        a llama.cpp GBNF grammar: inline text or a path to a ``.gbnf`` file
=============  ==========================================================================
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from framework.errors import ConstraintError
from plugins.constraints import regex as rx
from plugins.constraints.gbnf import gbnf_to_lark
from plugins.constraints.grammar import GRAMMARS_DIR, Grammar, GrammarBuilder, grammar_from_lark
from plugins.constraints.json_schema import JsonSchemaOptions, json_schema_grammar

__all__ = [
    "regex_grammar", "choice_grammar", "lark_grammar", "gbnf_grammar", "schema_grammar",
    "shipped_grammars", "build_grammar", "load_schema", "regex_flags", "source_files",
]  # fmt: skip

MAX_CHOICES = 100_000


def regex_grammar(pattern: str, flags: int = 0) -> Grammar:
    """The whole output matches ``pattern`` (Python ``re`` syntax, anchored at both ends)."""
    try:
        node = rx.parse_python_regex(pattern, flags)
    except ConstraintError as exc:
        raise ConstraintError(f"regex: {exc}") from None
    b = GrammarBuilder(f"regex {pattern!r}")
    t = b.term(node, "REGEX")
    return b.build(b.rule([[t]], "start"))


def choice_grammar(choices: list[str]) -> Grammar:
    """Exactly one of ``choices``."""
    if not choices:
        raise ConstraintError("choice: the list of choices is empty")
    if len(choices) > MAX_CHOICES:
        raise ConstraintError(f"choice: {len(choices)} choices, over the limit of {MAX_CHOICES}")
    for i, c in enumerate(choices):
        if not isinstance(c, str):
            raise ConstraintError(f"choice: item {i} is {type(c).__name__}, not a string")
        if c == "":
            raise ConstraintError(f"choice: item {i} is the empty string")
    b = GrammarBuilder("choice")
    t = b.term(rx.alt(*(rx.literal(c) for c in dict.fromkeys(choices))), "CHOICE", literal=True)
    return b.build(b.rule([[t]], "start"))


def shipped_grammars() -> dict[str, Path]:
    """The grammars in ``grammars/``, by name."""
    return {p.stem: p for p in sorted(GRAMMARS_DIR.glob("*.lark"))}


def _text_or_file(value: str, suffixes: tuple[str, ...]) -> tuple[str, str]:
    if "\n" not in value and len(value) < 4096 and value.endswith(suffixes):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConstraintError(f"grammar file {value!r} does not exist")
        return path.read_text(encoding="utf-8"), str(path)
    return value, "inline grammar"


def lark_grammar(grammar: str, start: str = "start", max_whitespace: int | None = 20) -> Grammar:
    """A lark grammar given inline, by shipped name, or as a ``.lark`` path. Ignored terminals
    made only of whitespace match at most ``max_whitespace`` characters (None: unbounded)."""
    shipped = shipped_grammars()
    if grammar in shipped:
        return grammar_from_lark(shipped[grammar].read_text(encoding="utf-8"), start, f"grammar {grammar!r}", max_whitespace)
    text, src = _text_or_file(grammar, (".lark",))
    return grammar_from_lark(text, start, src, max_whitespace)


def gbnf_grammar(grammar: str) -> Grammar:
    """A llama.cpp GBNF grammar given inline or as a ``.gbnf`` path (start rule ``root``)."""
    text, src = _text_or_file(grammar, (".gbnf",))
    lark_text = gbnf_to_lark(text, src)
    g = grammar_from_lark(lark_text, "g_root", src)
    g.ties = "all"
    return g


def load_schema(schema: Any) -> Any:
    """A schema given as an object, JSON text, or a ``.json`` path -> the object."""
    if isinstance(schema, str) and "\n" not in schema and schema.strip().endswith(".json") and not schema.lstrip().startswith("{"):
        path = Path(schema).expanduser()
        if not path.is_file():
            raise ConstraintError(f"JSON Schema file {schema!r} does not exist")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConstraintError(f"JSON Schema file {schema!r} is not valid JSON: {exc}") from None
    if isinstance(schema, str):
        try:
            return json.loads(schema)
        except ValueError as exc:
            raise ConstraintError(f"JSON Schema: the schema text is not valid JSON: {exc}") from None
    return schema


def regex_flags(flags: str) -> int:
    """``"is"`` -> ``re.IGNORECASE | re.DOTALL`` (letters i, s, a, x)."""
    out = 0
    for ch in flags:
        out |= {"i": re.IGNORECASE, "s": re.DOTALL, "a": re.ASCII, "x": re.VERBOSE}[ch]
    return out


def schema_grammar(schema: Any, options: JsonSchemaOptions) -> tuple[Grammar, list[str]]:
    return json_schema_grammar(load_schema(schema), options)


_IMPORT = re.compile(r"^\s*%import\s+\.?([A-Za-z_][\w.]*)", re.MULTILINE)


def source_files(kind: str, params: dict[str, Any]) -> list[Path]:
    """The files compiling ``kind`` with ``params`` reads: a ``.json`` schema path, a ``.lark``
    or ``.gbnf`` path, a shipped grammar, and the local grammars they ``%import``. A compiled
    constraint is cached under a key that hashes their contents, so a changed file recompiles
    (:meth:`plugins.constraints.cache.ConstraintCache.key`)."""
    out: list[Path] = []
    if kind == "json_schema":
        v = params.get("schema")
        if isinstance(v, str) and "\n" not in v and v.strip().endswith(".json") and not v.lstrip().startswith("{"):
            out.append(Path(v).expanduser())
    elif kind in ("grammar", "gbnf"):
        v = params.get("grammar")
        if isinstance(v, str):
            shipped = shipped_grammars() if kind == "grammar" else {}
            if v in shipped:
                out.append(shipped[v])
            elif "\n" not in v and len(v) < 4096 and v.endswith(".lark" if kind == "grammar" else ".gbnf"):
                out.append(Path(v).expanduser())
            if kind == "grammar":
                out += _lark_imports(out[0] if out else None, v if not out else None)
    return out


def _lark_imports(path: Path | None, text: str | None, seen: set[Path] | None = None) -> list[Path]:
    """Local ``.lark`` files that a grammar ``%import``s (next to it or in ``grammars/``), recursively."""
    seen = set() if seen is None else seen
    if text is None:
        try:
            text = path.read_text(encoding="utf-8") if path is not None else ""
        except OSError:
            return []
    found: list[Path] = []
    for mod in _IMPORT.findall(text):
        stem = mod.split(".")[0]
        for base in ([path.parent] if path is not None else []) + [GRAMMARS_DIR]:
            cand = (base / f"{stem}.lark").resolve()
            if cand.is_file() and cand not in seen:
                seen.add(cand)
                found.append(cand)
                found += _lark_imports(cand, None, seen)
                break
    return found


def build_grammar(kind: str, params: dict[str, Any]) -> tuple[Grammar, list[str]]:
    """Grammar (and warnings) for a registered constraint ``kind`` with validated ``params``."""
    if kind == "json_schema":
        opts = JsonSchemaOptions(strict=params.get("strict", False), whitespace=params.get("whitespace", "compact"),
                                 max_whitespace=params.get("max_whitespace", 20),
                                 property_order=params.get("property_order", "any"), max_any_order=params.get("max_any_order", 6))
        return schema_grammar(params["schema"], opts)
    if kind == "json":
        opts = JsonSchemaOptions(whitespace=params.get("whitespace", "compact"), max_whitespace=params.get("max_whitespace", 20))
        return json_schema_grammar(True, opts)
    if kind == "regex":
        return regex_grammar(params["pattern"], regex_flags(params.get("flags", ""))), []
    if kind == "choice":
        return choice_grammar(list(params["choices"])), []
    if kind == "grammar":
        return lark_grammar(params["grammar"], params.get("start", "start"), params.get("max_whitespace", 20)), []
    if kind == "gbnf":
        return gbnf_grammar(params["grammar"]), []
    raise ConstraintError(f"unknown constraint kind {kind!r}")
