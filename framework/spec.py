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


def _error_message(err: dict) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if err["type"] == "missing":
        return "field required"
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


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
        fields = dict(self.spec.sampling)
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
    issues: list[SpecIssue] = []
    spec: PipelineSpec | None = None
    try:
        spec = PipelineSpec.model_validate(data)
    except ValidationError as exc:  # report it, and go on checking what can be checked
        for err in exc.errors():
            p = tuple(err["loc"])
            issues.append(loc.issue(p, _error_message(err), value=err["type"] not in ("extra_forbidden", "missing")))
    model_ref = data.get("model") if isinstance(data.get("model"), str) else None
    aliases = data.get("models") if isinstance(data.get("models"), dict) else {}
    sampling = data.get("sampling") if isinstance(data.get("sampling"), dict) else {}
    raw_processors = data.get("processors") if isinstance(data.get("processors"), list) else []

    from framework.plugins import get_plugin_manager, unknown_name_message

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
    for key in ("processors", "constraint", "reranker"):
        if key in sampling:
            issues.append(loc.issue(("sampling", key), f"give {key} as a top-level section of the spec"))
    try:
        SamplingParams.model_validate({k: v for k, v in sampling.items() if k not in ("processors", "constraint", "reranker")})
    except ValidationError as exc:
        errors = exc.errors()
        inner = errors[0].get("ctx", {}).get("error") if len(errors) == 1 else None
        errors = getattr(inner, "validation_errors", None) or errors
        for err in errors:
            p = ("sampling",) + tuple(err["loc"])
            issues.append(loc.issue(p, _error_message(err), value=err["type"] not in ("extra_forbidden", "missing")))

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
        params_model = reg.params
        if params_model is not None:
            if not isinstance(opts, dict):
                short = getattr(params_model, "__shorthand__", None)
                if short is None:
                    issues.append(loc.issue(p + (name,), f"options of {name!r} must be a mapping", value=True))
                    return None
                opts = {short: opts}
            try:
                validated = params_model.model_validate(opts, context=ctx)
            except ValidationError as exc:
                for err in exc.errors():
                    ep = p + (name,) + tuple(err["loc"])
                    issues.append(loc.issue(ep, _error_message(err), value=err["type"] not in ("extra_forbidden", "missing")))
                return None
            opts = json.loads(validated.model_dump_json(exclude_unset=True))
        elif not isinstance(opts, dict):
            issues.append(loc.issue(p + (name,), f"options of {name!r} must be a mapping", value=True))
            return None
        return PluginRef(name=name, options=opts)

    processors = [r for i, raw in enumerate(raw_processors) if (r := check_ref(raw, ("processors", i), "processors"))]
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


# ------------------------------------------------------------------------------------ schema
def spec_json_schema(plugin_manager=None) -> dict[str, Any]:
    """JSON Schema of a spec for editor completion, with every registered plugin's options."""
    from framework.plugins import get_plugin_manager

    pm = plugin_manager or get_plugin_manager()
    schema = PipelineSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "decodekit pipeline spec"
    props = schema["properties"]
    sp = SamplingParams.model_json_schema()
    sp_props = {k: v for k, v in sp.get("properties", {}).items() if k not in ("processors", "constraint", "reranker")}
    props["sampling"] = {"type": "object", "description": "SamplingParams fields", "properties": sp_props, "additionalProperties": False}
    defs = schema.setdefault("$defs", {})
    defs.update(sp.get("$defs", {}))

    def one_of(kind: str) -> dict[str, Any]:
        options = []
        for reg in pm.registry(kind):
            if reg.params is not None:
                ps = reg.params.model_json_schema()
                defs.update(ps.pop("$defs", {}))
            else:
                ps = {"type": "object"}
            options.append({"type": "object", "properties": {reg.name: ps}, "required": [reg.name], "additionalProperties": False})
            options.append({"const": reg.name})
        return {"anyOf": options} if options else {"not": {}}

    props["processors"] = {"type": "array", "items": one_of("logits_processor"), "description": "logits processors, in order"}
    for section in ("constraint", "reranker", "drafter"):
        props[section] = {"anyOf": [one_of(SECTION_KINDS[section]), {"type": "null"}], "description": f"one registered {section}"}
    return schema


# ------------------------------------------------------------------------------------ docs
def _field_rows(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        ann = f.annotation
        ann_s = ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "")
        if f.is_required():
            default = "required"
        else:
            value = f.default_factory() if f.default_factory is not None else f.default
            default = "see below" if isinstance(value, BaseModel) else f"`{value!r}`"
        desc = (f.description or "").replace("\n", " ")
        cells = [f"`{name}`", f"`{ann_s}`", default, desc]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return rows


def reference_markdown(plugin_manager=None) -> str:
    """The spec reference (docs/pipelines.md), generated from the pydantic models and the
    built-in plugins' Params models. ``python tools/gen_docs.py`` rewrites the file."""
    from framework.plugins import PluginManager

    pm = plugin_manager or PluginManager(load_entry_points=False)
    out = [
        "# Pipeline spec reference",
        "",
        "<!-- generated by `python tools/gen_docs.py` from framework/spec.py and the plugins' Params",
        "     models; tests/test_spec.py fails when this file is out of date. Do not edit by hand. -->",
        "",
        "A pipeline spec is a YAML file (read with a safe loader) that names a model and the decoding",
        "recipe. `decodekit validate SPEC` checks it without loading models; `decodekit schema` prints",
        "its JSON Schema for editor completion. Paths are relative to the spec file. Errors name the",
        "file, line and column and the field path, e.g.",
        "`spec.yaml:4:5: processors[1].fudg: unknown logits processor 'fudg'; did you mean 'fudge'?`.",
        "",
        "```yaml",
        "model: demo                      # a registered name or a local Hugging Face directory",
        "models: {draft: demo-draft}      # auxiliary models by alias",
        "engine: {max_num_seqs: 32}",
        "sampling: {temperature: 0.8, top_p: 0.95, max_tokens: 64, seed: 0}",
        "processors:",
        "  - repetition_penalty: {penalty: 1.1}",
        "  - no_repeat_ngram: {size: 3}",
        "```",
        "",
        "Plugin sections (`processors` items, `constraint`, `reranker`, `drafter`) are a one-key",
        "mapping `{name: {options}}` or just `name` for default options. Processors run by stage",
        "(bias, penalties, bans, guidance, constraint, temperature, truncation); guidance processors",
        "(FUDGE, RAD, contrastive, third-party ones) run in the order this list gives them, the",
        "others in their stage's fixed order, so a request's output never depends on its batch",
        "neighbours. `models:` aliases name companion models that plugin options can refer to;",
        "they are loaded with the main model and share its KV budget.",
        "",
        "## Top-level keys",
        "",
        *_field_rows(PipelineSpec),
        "",
        "## `engine`",
        "",
        *_field_rows(EngineConfig),
        "",
        "## `sampling`",
        "",
        *_field_rows(SamplingParams, skip=("processors", "constraint", "reranker")),
        "",
    ]
    titles = {"logits_processor": "`processors`", "constraint": "`constraint`", "reranker": "`reranker`", "drafter": "`drafter`"}
    for kind, title in titles.items():
        out += [f"## {title}", ""]
        regs = list(pm.registry(kind))
        if not regs:
            out += ["No built-in plugin of this kind yet.", ""]
        for reg in regs:
            doc = (getattr(reg.factory, "__doc__", None) or "").strip().split("\n\n")[0].replace("\n", " ")
            out += [f"### `{reg.name}` ({reg.source})", ""]
            if doc:
                out += [doc, ""]
            if reg.params is not None:
                short = getattr(reg.params, "__shorthand__", None)
                if short:
                    out += [f"A scalar value is shorthand for `{{{short}: value}}`.", ""]
                out += _field_rows(reg.params) + [""]
    return "\n".join(out).rstrip() + "\n"
