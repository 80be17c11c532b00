"""Grammar-constrained decoding: lark grammars, JSON Schema, regex, choice lists, GBNF.

Registered constraint names (``register_constraints``): ``json_schema``, ``json``, ``regex``,
``choice``, ``grammar`` (lark) and ``gbnf``. Each factory is ``factory(tokenizer, **params)``
with params validated by the pydantic model registered beside it, and returns a
:class:`CompiledGrammar` whose ``new_state()`` gives a per-sequence :class:`GrammarState`.

Engine-facing API (see docs/constraints.md)::

    fut = get_compiler().submit("json_schema", {"schema": schema}, tokenizer)  # off-thread
    compiled = fut.result()              # CompiledGrammar (cached in memory and on disk)
    state = compiled.new_state()         # per sequence
    state.fill_bitmask(bitmask, row)     # bitmask: int32 [B, ceil(V/32)]
    apply_token_bitmask_(logits, bitmask)
    state.advance(token_id); state.forced_tokens(); state.is_accepting(); state.rollback(n)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from framework.errors import ConstraintError
from concurrent.futures import Future

from framework.hookspecs import Register, hookimpl
from plugins.constraints.cache import CompilerService, ConstraintCache, get_compiler
from plugins.constraints.matcher import CompiledGrammar, GrammarState, allocate_token_bitmask, apply_token_bitmask_

__all__ = [
    "CompiledGrammar", "GrammarState", "apply_token_bitmask_", "allocate_token_bitmask", "get_compiler",
    "CompilerService", "ConstraintCache", "compile_constraint", "constraint_params", "PARAMS",
    "register_constraints",
]  # fmt: skip


class _Params(BaseModel):
    """Base of the params models. ``__shorthand__`` names the field a bare value fills
    (``regex: "a+"`` is ``{pattern: "a+"}``); a mapping whose keys are not all param names is the
    shorthand value too (``json_schema: {type: object}`` is ``{schema: {type: object}}``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    __shorthand__: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        short = cls.__shorthand__
        if short is None:
            return value
        if isinstance(value, dict):
            names = {f.alias or k for k, f in cls.model_fields.items()} | set(cls.model_fields)
            # params: empty, only param names, or naming the shorthand field (then a typo in
            # another key is an error rather than part of a schema)
            if not value or set(value) <= names or short in value or f"{short}_" in value:
                return value
        return {short: value}


def _spec_path(value: Any, info: ValidationInfo, suffixes: tuple[str, ...]) -> Any:
    """A file path given in a pipeline spec is relative to the spec (``context={"base_dir"}``)."""
    base = (info.context or {}).get("base_dir")
    if base is None or not isinstance(value, str) or "\n" in value or not value.strip().endswith(suffixes):
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(base) / path
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    return str(path)


class JsonSchemaParams(_Params):
    """``json_schema``: output is JSON valid under ``schema``."""

    __shorthand__ = "schema"
    schema_: Union[dict[str, Any], bool, str] = Field(alias="schema", description="the schema (object), JSON text, or a path to a .json file")
    strict: bool = Field(False, description="reject unsupported keywords (error naming the JSON pointer) instead of ignoring them with a warning")
    whitespace: Literal["compact", "minified", "flexible"] = Field(
        "compact", description="'compact': json.dumps's layout (one space after ':' and ','); 'minified': no whitespace; "
        "'flexible': up to max_whitespace whitespace characters between any two tokens")
    max_whitespace: int = Field(20, ge=1, le=1000, description="flexible mode: longest whitespace run between two tokens")
    property_order: Literal["any", "schema"] = Field(
        "any", description="'any': object properties in any order, each at most once (objects of up to max_any_order "
        "properties; larger ones in schema order); 'schema': in the order the schema lists them")
    max_any_order: int = Field(6, ge=0, le=12, description="largest object whose properties may come in any order")

    @field_validator("schema_", mode="before")
    @classmethod
    def _schema_file(cls, value: Any, info: ValidationInfo) -> Any:
        """In a pipeline spec, a ``.json`` path is read (relative to the spec) and inlined."""
        path = _spec_path(value, info, (".json",))
        if path is not value:
            try:
                return json.loads(Path(path).read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ValueError(f"{path} is not valid JSON: {exc}") from None
        return value


class JsonParams(_Params):
    """``json``: any JSON value."""

    whitespace: Literal["compact", "minified", "flexible"] = Field(
        "compact", description="'compact': json.dumps's layout; 'minified': none; 'flexible': bounded runs anywhere")
    max_whitespace: int = Field(20, ge=1, le=1000, description="flexible mode: longest whitespace run between two tokens")


class RegexParams(_Params):
    """``regex``: the whole output matches ``pattern`` (Python ``re`` syntax, anchored)."""

    __shorthand__ = "pattern"
    pattern: str
    flags: str = Field("", pattern=r"^[isax]*$", description="re flags: i (IGNORECASE), s (DOTALL), a (ASCII), x (VERBOSE)")


class ChoiceParams(_Params):
    """``choice``: the output is exactly one of ``choices``."""

    __shorthand__ = "choices"
    choices: list[str] = Field(min_length=1)


class GrammarParams(_Params):
    """``grammar``: a lark grammar (inline text, a shipped name from grammars/, or a .lark path)."""

    __shorthand__ = "grammar"
    grammar: str
    start: str = "start"
    max_whitespace: int = Field(20, ge=1, le=1000, description="longest run of an %ignore'd terminal made only of "
                                "whitespace (lark's WS is unbounded: a small model could emit whitespace forever)")

    @field_validator("grammar", mode="before")
    @classmethod
    def _grammar_file(cls, value: Any, info: ValidationInfo) -> Any:
        return _spec_path(value, info, (".lark",))


class GbnfParams(_Params):
    """``gbnf``: a llama.cpp GBNF grammar (inline text or a .gbnf path; start rule ``root``)."""

    __shorthand__ = "grammar"
    grammar: str

    @field_validator("grammar", mode="before")
    @classmethod
    def _grammar_file(cls, value: Any, info: ValidationInfo) -> Any:
        return _spec_path(value, info, (".gbnf",))


PARAMS: dict[str, type[_Params]] = {
    "json_schema": JsonSchemaParams, "json": JsonParams, "regex": RegexParams,
    "choice": ChoiceParams, "grammar": GrammarParams, "gbnf": GbnfParams,
}  # fmt: skip
_SHORTHAND = {"json_schema": "schema", "regex": "pattern", "choice": "choices", "grammar": "grammar", "gbnf": "grammar"}


def constraint_params(name: str, value: Any) -> dict[str, Any]:
    """Validated, canonical params for constraint ``name``. ``value`` is the params dict, or the
    shorthand users write (``json_schema: {...schema...}``, ``regex: "a+"``, ``choice: [..]``,
    ``grammar: json``): a dict is taken as params only when its keys are all param names."""
    model = PARAMS[name]
    fields = {f.alias or k for k, f in model.model_fields.items()} | set(model.model_fields)
    if value is None:
        value = {}
    if not (isinstance(value, dict) and value and set(value) <= fields) and not (name == "json" and value == {}):
        key = _SHORTHAND.get(name)
        if key is not None:
            value = {key: value}
    try:
        p = model.model_validate(value)
    except ValidationError as exc:
        from framework.sampling_params import format_validation_error

        raise ConstraintError(format_validation_error(exc, f"{name} params")) from None
    return p.model_dump(by_alias=True)


def _json_pointer(path: Any) -> str:
    return "#" + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def precheck(name: str, params: dict[str, Any]) -> None:
    """Cheap checks run when a request is accepted, before its compilation is queued: a JSON
    Schema against its meta-schema (the error names the JSON pointer), a regex's syntax.
    Everything else is found by the compilation itself (and fails just that request).

    Raises:
        ConstraintError: what is wrong, and where.
    """
    if name == "json_schema":
        from plugins.constraints.frontends import load_schema

        schema = load_schema(params["schema"])
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"JSON Schema #: a schema is an object or a boolean, not {type(schema).__name__}")
        if isinstance(schema, dict):
            try:
                from jsonschema import Draft202012Validator
                from jsonschema.exceptions import SchemaError
                from jsonschema.validators import validator_for
            except ImportError:  # pragma: no cover - jsonschema is optional here
                return
            try:
                validator_for(schema, default=Draft202012Validator).check_schema(schema)
            except SchemaError as exc:
                raise ConstraintError(f"JSON Schema {_json_pointer(exc.path)}: {exc.message}") from None
    elif name == "regex":
        from plugins.constraints.frontends import regex_flags
        from plugins.constraints.regex import parse_python_regex

        try:
            parse_python_regex(params["pattern"], regex_flags(params.get("flags", "")))
        except ConstraintError as exc:
            raise ConstraintError(f"regex: {exc}") from None
        except re.error as exc:
            raise ConstraintError(f"regex: {exc}") from None


def compile_constraint(name: str, tokenizer: Any, params: Any = None, *, timeout_s: float | None = None) -> CompiledGrammar:
    """Compile constraint ``name`` (synchronously, through the shared cache and time limit)."""
    return get_compiler().compile(name, constraint_params(name, params), tokenizer, timeout_s)


def submit_constraint(name: str, tokenizer: Any, params: Any = None) -> "Future[CompiledGrammar]":
    """Validate ``params`` now (:func:`constraint_params`, :func:`precheck`; raises
    ConstraintError) and compile in the background: the engine's entry point."""
    p = constraint_params(name, params)
    key = get_compiler().cache.key(name, p, "")  # by content: a schema file that changed is checked again
    if key not in _PRECHECKED:  # the meta-schema check costs milliseconds: once per constraint
        precheck(name, p)
        if len(_PRECHECKED) > 1024:
            _PRECHECKED.clear()
        _PRECHECKED.add(key)
    return get_compiler().submit(name, p, tokenizer)


_PRECHECKED: set[str] = set()


def _factory(name: str):
    def factory(tokenizer: Any, **params: Any) -> CompiledGrammar:
        return compile_constraint(name, tokenizer, params)

    def submit(tokenizer: Any, params: Any) -> "Future[CompiledGrammar]":
        return submit_constraint(name, tokenizer, params)

    factory.__name__ = f"compile_{name}"
    factory.__doc__ = f"Compile a ``{name}`` constraint for ``tokenizer`` (params: {PARAMS[name].__name__})."
    factory.submit = submit  # type: ignore[attr-defined]
    factory.timeout_s = get_compiler().timeout_s  # type: ignore[attr-defined]
    return factory


@hookimpl
def register_constraints(register: Register) -> None:
    for name, model in PARAMS.items():
        register(name, _factory(name), params=model)
