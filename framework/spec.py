"""Pipeline specs: one YAML file composing model, engine, sampling and plugins.

A spec is validated completely before any model loads: its structure by the pydantic models
below, every plugin name against the registries, and every plugin's options against the
pydantic ``params`` model the plugin registered. Errors name the file, line and column and the
field path, and suggest the nearest registered name::

    pipe.yaml:7:5: processors[1].fudg: unknown logits processor 'fudg'; did you mean 'fudge'?

YAML is read with a safe loader: a spec can only reference registered names, never import code.
Paths in a spec (the model directory, files named by plugin options typed :data:`SpecPath`) are
relative to the spec file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo

from framework.config import EngineConfig
from framework.errors import ConfigError
from framework.sampling_params import SamplingParams

# plugin kind in the registries, by spec section
SECTION_KINDS = {"processors": "logits_processor", "constraint": "constraint", "reranker": "reranker", "drafter": "drafter"}


def _resolve_spec_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = Path(os.path.expanduser(value))
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if not path.exists():
        raise ValueError(f"file not found: {path}")
    return path


SpecPath = Annotated[Path, AfterValidator(_resolve_spec_path)]
"""A file path in a plugin's options: relative to the spec file, and checked to exist."""


class PluginRef(BaseModel):
    """``{name: {options}}`` after normalisation; ``name`` alone means default options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


COUNT_FIELDS = ("n", "num_return_sequences")
"""Sampling fields that set how many completions a request returns. A spec's ``sampling`` values
for them apply to ``decodekit run`` and :class:`~framework.pipeline.Pipeline` calls, not to server
requests, which return one completion unless they ask (OpenAI's default) or the spec's
``server.sampling`` says otherwise."""


class ServerSection(BaseModel):
    """Defaults for requests to ``decodekit serve``, over the spec's ``sampling``.

    A server request takes every field it leaves out from the spec's ``sampling`` section,
    except those that set how many completions it returns (``n``, ``num_return_sequences``):
    those default to 1, as in OpenAI's API, unless set here. ``server: {sampling: {n: 2}}``
    makes every request return two completions unless it gives its own ``n``.
    """

    model_config = ConfigDict(extra="forbid")

    sampling: dict[str, Any] = Field(default_factory=dict, description="SamplingParams fields for server "
                                     "requests, over the spec's sampling (e.g. {n: 2})")


class PipelineSpec(BaseModel):
    """A pipeline: what to load and how to decode. Every section but ``model`` is optional."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="a registered model name (e.g. demo) or a local Hugging Face directory")
    models: dict[str, str] = Field(
        default_factory=dict,
        description="auxiliary models by alias (drafts, amateurs, classifiers, reward models): name or directory",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="engine settings")
    sampling: dict[str, Any] = Field(default_factory=dict, description="SamplingParams fields")
    processors: list[dict[str, Any] | str] = Field(default_factory=list, description="logits processors (guidance ones run in this order)")
    constraint: dict[str, Any] | str | None = Field(None, description="one registered constraint")
    reranker: dict[str, Any] | str | None = Field(None, description="one registered reranker")
    drafter: dict[str, Any] | str | None = Field(None, description="one registered drafter")
    server: ServerSection | None = Field(None, description="defaults for server requests (n ...), over sampling")


@dataclass(slots=True)
class SpecIssue:
    path: str  # field path, e.g. "processors[1].fudg"
    message: str
    line: int | None = None  # 1-based
    column: int | None = None


class SpecError(ConfigError):
    """A spec that does not validate; ``issues`` lists every problem found."""

    def __init__(self, source: str, issues: list[SpecIssue]):
        self.source = source
        self.issues = issues
        lines = []
        for it in issues:
            where = source if it.line is None else f"{source}:{it.line}:{it.column}"
            lines.append(f"{where}: {it.path + ': ' if it.path else ''}{it.message}")
        super().__init__("\n".join(lines))


# ------------------------------------------------------------------------------------ YAML
def _marks(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, tuple[int, int]]:
    """Map every key path in a composed YAML tree to the (line, column) where it appears."""
    out = {} if out is None else out
    out.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            out[path + (key,)] = (k.start_mark.line + 1, k.start_mark.column + 1)
            _marks(v, path + (key,), out)
            out[path + (key, "__value__")] = (v.start_mark.line + 1, v.start_mark.column + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _marks(item, path + (i,), out)
    return out


def _fmt_path(path: tuple) -> str:
    s = ""
    for p in path:
        if isinstance(p, int):
            s += f"[{p}]"
        else:
            s += ("." if s else "") + str(p)
    return s


class _Located:
    def __init__(self, marks: dict[tuple, tuple[int, int]]):
        self.marks = marks

    def issue(self, path: tuple, message: str, *, value: bool = False) -> SpecIssue:
        key = path + ("__value__",) if value else path
        p = key
        while p not in self.marks and p:
            p = p[:-1]
        line, col = self.marks.get(p, (None, None))
        return SpecIssue(_fmt_path(path), message, line, col)


def _section_fields() -> dict[str, tuple[str, ...]]:
    spec_keys = tuple(PipelineSpec.model_fields)
    sampling = tuple(k for k in SamplingParams.model_fields if k not in ("processors", "constraint"))
    return {"": spec_keys, "engine": tuple(EngineConfig.model_fields), "sampling": sampling}


def _error_message(err: dict, path: tuple = ()) -> str:
    """pydantic's message for a spec error; an unknown key gets a did-you-mean against its
    section's fields (and says so when it belongs in another section)."""
    if err["type"] == "extra_forbidden":
        from framework.names import field_hint

        sections = _section_fields()
        where = "sampling" if path[:1] == ("server",) else (str(path[0]) if len(path) == 2 else "")
        if len(path) not in (1, 2, 3) or where not in sections:
            return "unknown field"
        others = {k or "top level": v for k, v in sections.items() if k != where and k != ""}
        return "unknown field" + field_hint(str(path[-1]), sections[where], others)
    if err["type"] == "missing":
        return "field required"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def _duplicate_keys(node: yaml.Node | None, path: tuple = ()) -> list[SpecIssue]:
    """Keys given twice in one mapping (YAML loaders keep the last silently: a second
    ``sampling:`` would replace the first), at the line of the repeat."""
    out: list[SpecIssue] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
            line = k.start_mark.line + 1
            if key in first:
                out.append(SpecIssue(_fmt_path(path + (key,)), f"duplicate key {key!r} (first given on line "
                                     f"{first[key]}; YAML would keep only this one)", line, k.start_mark.column + 1))
            else:
                first[key] = line
            out += _duplicate_keys(v, path + (key,))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out += _duplicate_keys(item, path + (i,))
    return out


def _check_sampling(section: tuple, sampling: dict[str, Any], loc: "_Located", issues: list[SpecIssue]) -> None:
    """A ``sampling`` section (or ``server.sampling``) as SamplingParams fields."""
    for key in ("processors", "constraint", "reranker"):
        if key in sampling:
            issues.append(loc.issue(section + (key,), f"give {key} as a top-level section of the spec"))
    try:
        SamplingParams.model_validate({k: v for k, v in sampling.items() if k not in ("processors", "constraint", "reranker")})
    except ValidationError as exc:
        errors = exc.errors()
        inner = errors[0].get("ctx", {}).get("error") if len(errors) == 1 else None
        errors = getattr(inner, "validation_errors", None) or errors
        for err in errors:
            p = section + tuple(err["loc"])
            issues.append(loc.issue(p, _error_message(err, p), value=err["type"] not in ("extra_forbidden", "missing")))


def _check_processors_twice(processors: list[tuple[int, "PluginRef"]], sampling: dict[str, Any], pm: Any,
                            loc: "_Located", issues: list[SpecIssue]) -> None:
    """A processor named twice in ``processors``, or named there and also turned on by a
    sampling field (``sampling.top_k`` and ``processors: [top_k: ...]``): the engine refuses
    such a request, so the spec is refused first."""
    registry = pm.registry("logits_processor")
    derived: dict[str, str] = {}
    for key, value in sampling.items():
        if key in ("processors", "constraint", "reranker"):
            continue
        try:
            one = SamplingParams(**{key: value})
        except Exception:  # noqa: BLE001 - reported by _check_sampling
            continue
        for reg in registry:
            derive = getattr(reg.factory, "from_sampling_params", None)
            if derive is not None and reg.name not in derived and derive(one) is not None:
                derived[reg.name] = key
    seen: dict[str, int] = {}
    for i, ref in processors:
        if ref.name in seen:
            issues.append(loc.issue(("processors", i, ref.name), f"processor {ref.name!r} is listed twice "
                                    f"(first as processors[{seen[ref.name]}])"))
        elif ref.name in derived:
            issues.append(loc.issue(("processors", i, ref.name), f"processor {ref.name!r} is set twice: also by "
                                    f"sampling.{derived[ref.name]} (give it in one place)"))
        seen.setdefault(ref.name, i)


# ------------------------------------------------------------------------------------ loading
@dataclass(slots=True)
class LoadedSpec:
    """A validated spec with its resolved plugin references."""

    spec: PipelineSpec
    source: str
    base_dir: Path
    model_path: str  # a resolved directory or a registered name
    models: dict[str, str]  # companion aliases -> resolved directories or registered names
    processors: list[PluginRef]
    constraint: PluginRef | None
    reranker: PluginRef | None
    drafter: PluginRef | None

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams from the spec's ``sampling`` and processors, with per-call overrides."""
        return self._params(dict(self.spec.sampling), overrides)

    def server_sampling_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams for a server request: the spec's ``sampling`` without the fields in
        :data:`COUNT_FIELDS`, then the spec's ``server.sampling``, then the request's fields."""
        fields = {k: v for k, v in self.spec.sampling.items() if k not in COUNT_FIELDS}
        if self.spec.server is not None:
            fields.update(self.spec.server.sampling)
        return self._params(fields, overrides)

    def _params(self, fields: dict[str, Any], overrides: dict[str, Any]) -> SamplingParams:
        fields["processors"] = [{p.name: p.options} for p in self.processors]
        if self.constraint is not None and "constraint" in SamplingParams.model_fields:
            fields["constraint"] = {self.constraint.name: self.constraint.options}
        if self.reranker is not None:
            fields["reranker"] = {self.reranker.name: self.reranker.options}
        fields.update(overrides)
        return SamplingParams(**fields)


def _normalise_ref(raw: Any) -> tuple[str, Any] | None:
    if isinstance(raw, str):
        return raw, {}
    if isinstance(raw, dict) and len(raw) == 1:
        (name, opts), = raw.items()
        return str(name), ({} if opts is None else opts)
    return None


def load_spec(path: str | os.PathLike, *, plugin_manager=None, text: str | None = None) -> LoadedSpec:
    """Read and validate a spec file. Raises :class:`SpecError` listing every problem."""
    path = Path(path)
    source = str(path)
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SpecError(source, [SpecIssue("", "spec file not found")]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(source, [SpecIssue("", f"cannot read spec: {exc}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        msg = f"YAML syntax error: {exc.problem or exc.context}"
        raise SpecError(source, [SpecIssue("", msg, mark.line + 1 if mark else None, mark.column + 1 if mark else None)]) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, [SpecIssue("", f"YAML error: {exc}")]) from None
    loc = _Located(_marks(node) if node is not None else {})
    if not isinstance(data, dict):
        raise SpecError(source, [loc.issue((), "a spec is a mapping with at least a 'model' key")])
    issues: list[SpecIssue] = _duplicate_keys(node)
    spec: PipelineSpec | None = None
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:  # report it, and go on checking what can be checked
        for err in exc.errors():
            p = tuple(err["loc"])
            if p[:2] == ("server", "sampling"):
                continue  # checked as SamplingParams below
            issues.append(loc.issue(p, _error_message(err, p), value=err["type"] not in ("extra_forbidden", "missing")))
    model_ref = data.get("model") if isinstance(data.get("model"), str) else None
    aliases = data.get("models") if isinstance(data.get("models"), dict) else {}
    sampling = data.get("sampling") if isinstance(data.get("sampling"), dict) else {}
    raw_processors = data.get("processors") if isinstance(data.get("processors"), list) else []

    from framework.plugins import PluginOptionsError, get_plugin_manager, unknown_name_message, validate_plugin_options

    pm = plugin_manager or get_plugin_manager()
    base_dir = path.resolve().parent
    ctx = {"base_dir": base_dir, "models": aliases}

    # model: a directory relative to the spec, an absolute one, or a registered name
    model_path = None if model_ref is None else _resolve_model(model_ref, base_dir, pm)
    if model_ref is not None and model_path is None:
        names = [r.name for r in pm.registry("model") if not isinstance(r.factory, type)]
        issues.append(loc.issue(("model",), unknown_name_message("model", model_ref, names) + " (and no such directory)", value=True))
    for alias, ref in aliases.items():
        if isinstance(ref, str) and _resolve_model(ref, base_dir, pm) is None:
            names = [r.name for r in pm.registry("model") if not isinstance(r.factory, type)]
            issues.append(loc.issue(("models", alias), unknown_name_message("model", ref, names) + " (and no such directory)", value=True))

    # sampling: validated as SamplingParams (its processors come from the processors section)
    _check_sampling(("sampling",), sampling, loc, issues)
    server = data.get("server") if isinstance(data.get("server"), dict) else {}
    if isinstance(server.get("sampling"), dict):
        _check_sampling(("server", "sampling"), server["sampling"], loc, issues)

    def check_ref(raw: Any, p: tuple, section: str) -> PluginRef | None:
        kind = SECTION_KINDS[section]
        norm = _normalise_ref(raw)
        if norm is None:
            issues.append(loc.issue(p, f"expected a name or a one-key mapping {{name: {{options}}}}", value=True))
            return None
        name, opts = norm
        registry = pm.registry(kind)
        if name not in registry:
            issues.append(loc.issue(p + (name,), unknown_name_message(kind, name, registry.names())))
            return None
        reg = registry.get(name)
        try:
            validated = validate_plugin_options(name, reg.params, opts, context=ctx)
        except PluginOptionsError as exc:
            for eloc, msg in exc.errors:
                msg = "field required" if msg == "Field required" else msg
                issues.append(loc.issue(p + (name,) + eloc, msg, value=not msg.startswith(("unknown field", "field required"))))
            return None
        opts = validated if reg.params is None else json.loads(validated.model_dump_json(exclude_unset=True))
        return PluginRef(name=name, options=opts)

    indexed = [(i, r) for i, raw in enumerate(raw_processors) if (r := check_ref(raw, ("processors", i), "processors"))]
    _check_processors_twice(indexed, sampling, pm, loc, issues)
    processors = [r for _, r in indexed]
    refs = {}
    for section in ("constraint", "reranker", "drafter"):
        raw = data.get(section)
        refs[section] = None if raw is None else check_ref(raw, (section,), section)
    if issues or spec is None or model_path is None:
        raise SpecError(source, issues)
    models = {alias: _resolve_model(ref, base_dir, pm) or ref for alias, ref in aliases.items()}
    return LoadedSpec(spec, source, base_dir, model_path, models, processors, refs["constraint"], refs["reranker"], refs["drafter"])


def _resolve_model(ref: str, base_dir: Path, pm) -> str | None:
    p = Path(os.path.expanduser(ref))
    for cand in ([p] if p.is_absolute() else [base_dir / p, p]):
        if cand.is_dir():
            return str(cand.resolve())
    reg = pm.registry("model").entries.get(ref)
    if reg is not None and not isinstance(reg.factory, type):
        return ref
    return None


# ------------------------------------------------------------------------------------ schema, docs
def spec_json_schema(plugin_manager=None) -> dict[str, Any]:
    """JSON Schema of a spec for editor completion (see :mod:`framework.spec_schema`)."""
    from framework.spec_schema import spec_json_schema as build

    return build(plugin_manager)


def reference_markdown(plugin_manager=None) -> str:
    """docs/pipelines.md (see :mod:`framework.spec_schema`)."""
    from framework.spec_schema import reference_markdown as build

    return build(plugin_manager)
