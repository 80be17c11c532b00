"""The spec's JSON Schema (``decodekit schema``, for editors) and its reference (docs/pipelines.md).

Both come from the pydantic models of :mod:`framework.spec` and the Params models that plugins
register, so they cannot drift from what :func:`framework.spec.load_spec` accepts: every file
in ``examples/pipelines`` validates against the schema (tests/test_spec.py), including the
shorthands a spec may use:

* a plugin entry is ``name``, ``{name: null}`` or ``{name: {options}}``;
* a Params model with a ``__shorthand__`` field also takes that field's value in place of the
  options (``regex: "a+"``, ``json_schema: schemas/review.json``, ``json_schema: {type: object}``);
* ``sampling.stop`` may be one string.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from framework.config import EngineConfig
from framework.sampling_params import SamplingParams
from framework.spec import COUNT_FIELDS, SECTION_KINDS, PipelineSpec, ServerSection

__all__ = ["spec_json_schema", "reference_markdown"]


def _sampling_schema(defs: dict[str, Any], description: str) -> dict[str, Any]:
    sp = SamplingParams.model_json_schema()
    defs.update(sp.get("$defs", {}))
    props = {k: v for k, v in sp.get("properties", {}).items() if k not in ("processors", "constraint", "reranker")}
    if "stop" in props:  # the validator takes one string too
        props["stop"] = {"anyOf": [{"type": "string"}, props["stop"]], "description": "a stop string or a list of them"}
    return {"type": "object", "description": description, "properties": props, "additionalProperties": False}


def _options_schema(params: type | None, defs: dict[str, Any]) -> dict[str, Any]:
    """What may follow ``name:`` in a plugin entry: null, the options, or the shorthand value."""
    if params is None:
        return {"anyOf": [{"type": "object"}, {"type": "null"}]}
    ps = copy.deepcopy(params.model_json_schema())  # type: ignore[attr-defined]
    defs.update(ps.pop("$defs", {}))
    alts = [ps, {"type": "null"}]
    short = getattr(params, "__shorthand__", None)
    if short is not None:
        field = ps.get("properties", {}).get(short)
        if field is not None:
            alts.append({k: v for k, v in field.items() if k not in ("title",)})
    return {"anyOf": alts}


def spec_json_schema(plugin_manager=None) -> dict[str, Any]:
    """JSON Schema of a spec for editor completion, with every registered plugin's options."""
    from framework.plugins import get_plugin_manager

    pm = plugin_manager or get_plugin_manager()
    schema = PipelineSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "decodekit pipeline spec"
    props = schema["properties"]
    defs = schema.setdefault("$defs", {})
    props["sampling"] = _sampling_schema(defs, "SamplingParams fields")
    props["server"] = {
        "anyOf": [{"type": "object", "additionalProperties": False, "description": ServerSection.__doc__.split("\n\n")[0],
                   "properties": {"sampling": _sampling_schema(defs, "sampling fields for server requests (e.g. n)")}},
                  {"type": "null"}]}

    def one_of(kind: str) -> dict[str, Any]:
        options = []
        for reg in pm.registry(kind):
            options.append({"type": "object", "properties": {reg.name: _options_schema(reg.params, defs)},
                            "required": [reg.name], "additionalProperties": False})
            options.append({"const": reg.name})
        return {"anyOf": options} if options else {"not": {}}

    props["processors"] = {"type": "array", "items": one_of("logits_processor"), "description": "logits processors (guidance ones run in this order)"}
    for section in ("constraint", "reranker", "drafter"):
        props[section] = {"anyOf": [one_of(SECTION_KINDS[section]), {"type": "null"}], "description": f"one registered {section}"}
    return schema
def _field_rows(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[str]:
    rows = ["| field | type | default | description |", "|---|---|---|---|"]
    for field_name, f in model.model_fields.items():
        if field_name in skip:
            continue
        name = f.alias or field_name  # what a spec writes (JsonSchemaParams.schema_ is `schema`)
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
    titles = {"logits_processor": "`processors`", "constraint": "`constraint`", "reranker": "`reranker`", "drafter": "`drafter`",
              "kv_policy": "`engine.kv_policy`"}
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
                    out += [f"Shorthand: a value that is not a mapping of these options is `{{{short}: value}}` "
                            f"(`{reg.name}: VALUE`).", ""]
                out += _field_rows(reg.params) + [""]
    return "\n".join(out).rstrip() + "\n"
