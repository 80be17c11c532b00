"""Which request fields ask for a constraint, and what each one means.

decodekit's own fields: ``response_format`` (OpenAI), ``grammar`` (lark), ``regex``, ``choice``.
vLLM's names are accepted as aliases, so clients written for vLLM work unchanged:

============================  ==================================================================
``guided_json``               a JSON Schema (object or JSON text): the ``json_schema`` constraint
``guided_regex``              ``regex``
``guided_choice``             ``choice``
``guided_grammar``            GBNF (what vLLM's default backend takes) when the text has ``::=``
                              rules, else lark: the ``gbnf`` or ``grammar`` constraint
``structured_outputs``        ``{"json" | "regex" | "choice" | "grammar": ..., }`` or
                              ``{"json_object": true}``: the same, one key
``guided_decoding_backend``   accepted and ignored (there is one engine)
============================  ==================================================================

A request gives at most one of all these. Errors name the field the client sent.
"""

from __future__ import annotations

import re
from typing import Any

from framework.server.errors import bad_request, not_supported

CONSTRAINT_FIELDS = ("response_format", "grammar", "regex", "choice")
"""decodekit's request fields that select a constraint."""

ALIAS_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")
"""vLLM's names for the same, accepted as aliases."""

IGNORED_ALIAS_FIELDS = frozenset({"guided_decoding_backend"})

_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a shipped grammar's name (grammars/NAME.lark)
_STRUCTURED_KEYS = {"json": "guided_json", "regex": "guided_regex", "choice": "guided_choice", "grammar": "guided_grammar"}


def requested(req: Any) -> list[tuple[str, Any]]:
    """``(field, value)`` of every constraint field the request sets (``response_format`` of
    type text does not count)."""
    out: list[tuple[str, Any]] = []
    for f in CONSTRAINT_FIELDS:
        v = getattr(req, f, None)
        if v is None:
            continue
        if f == "response_format" and v.get("type", "text") == "text" and set(v) <= {"type"}:
            continue
        out.append((f, v))
    extra = getattr(req, "model_extra", None) or {}
    for f in ALIAS_FIELDS:
        if extra.get(f) is not None:
            out.append((f, extra[f]))
    if extra.get("guided_whitespace_pattern") is not None:
        raise not_supported("guided_whitespace_pattern", "guided_whitespace_pattern (JSON output is compact: "
                                                         "single spaces after ':' and ',')")
    return out


def resolve(field: str, value: Any) -> tuple[str, str, Any]:
    """``(constraint name, option the value fills, value)`` for one request field.

    Raises:
        APIError: 400 naming ``field`` for a value of the wrong shape, or a grammar that names a
            file (a request never makes the server read one).
    """
    if field == "response_format":
        if not isinstance(value, dict):
            raise bad_request("response_format must be an object", param=field)
        kind = value.get("type")
        if kind == "json_object":  # OpenAI's JSON mode: a JSON object
            return "json_schema", "schema", {"type": "object"}
        if kind == "json_schema":
            js = value.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise bad_request("response_format.json_schema.schema must be a JSON Schema object",
                                  param="response_format.json_schema.schema")
            return "json_schema", "schema", schema
        raise bad_request(f"response_format.type must be 'text', 'json_object' or 'json_schema', not {kind!r}",
                          param="response_format.type")
    if field == "structured_outputs":
        if not isinstance(value, dict):
            raise bad_request("structured_outputs must be an object such as {\"json\": {...schema...}}", param=field)
        given = [k for k, v in value.items() if v not in (None, False)]
        if value.get("json_object") is True and len(given) == 1:
            return "json_schema", "schema", {"type": "object"}
        known = [k for k in given if k in _STRUCTURED_KEYS]
        unknown = [k for k in given if k not in _STRUCTURED_KEYS and k != "json_object"]
        if unknown:
            raise not_supported(f"{field}.{unknown[0]}", f"structured_outputs.{unknown[0]}")
        if len(known) != 1:
            raise bad_request("structured_outputs takes exactly one of json, regex, choice, grammar, json_object",
                              param=field)
        name, option, arg = resolve(_STRUCTURED_KEYS[known[0]], value[known[0]])
        return name, option, arg
    if field == "guided_json":
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except ValueError as exc:
                raise bad_request(f"guided_json is not valid JSON: {exc}", param=field) from None
        if not isinstance(value, (dict, bool)):
            raise bad_request("guided_json must be a JSON Schema (an object, or its JSON text)", param=field)
        return "json_schema", "schema", value
    if field in ("regex", "guided_regex"):
        if not isinstance(value, str):
            raise bad_request(f"{field} must be a string", param=field)
        return "regex", "pattern", value
    if field in ("choice", "guided_choice"):
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            raise bad_request(f"{field} must be a non-empty list of strings", param=field)
        return "choice", "choices", value
    if field in ("grammar", "guided_grammar"):
        if not isinstance(value, str):
            raise bad_request(f"{field} must be a string", param=field)
        # a one-line value is a shipped grammar's name or an inline rule; never let a request
        # make the server read a file (the plugins read one-line values ending in .lark/.gbnf)
        one_line = "\n" not in value
        if one_line and (value.strip().endswith((".lark", ".gbnf")) or (":" not in value and not _NAME.fullmatch(value))):
            raise bad_request(f"{field} must be inline grammar text or the name of a shipped grammar (not a file path)",
                              param=field)
        if field == "guided_grammar" and "::=" in value:
            return "gbnf", "grammar", value
        return "grammar", "grammar", value
    raise bad_request(f"{field} does not select a constraint", param=field)  # pragma: no cover
