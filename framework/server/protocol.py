"""OpenAI request bodies (pydantic) and their mapping onto :class:`SamplingParams`.

Fields a request leaves out take the pipeline spec's ``sampling`` values, except ``n`` and
``num_return_sequences`` (how many completions come back): those are 1 unless the request or the
spec's ``server.sampling`` section sets them (:meth:`framework.spec.LoadedSpec.server_sampling_params`). Besides OpenAI's own
parameters a request may carry *extra body* fields for what OpenAI lacks: the SamplingParams
fields in :data:`EXTRA_SAMPLING_FIELDS` (``top_k``, ``min_p``, ``repetition_penalty`` ...),
``processors`` (registered logits processors, validated against each plugin's Params model),
``grammar`` / ``regex`` / ``choice`` and ``response_format`` (constraint plugins) and
``reranker``. Every problem is an :class:`~framework.server.errors.APIError` (400) naming the
field.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from framework.errors import InvalidRequestError
from framework.sampling_params import SamplingParams
from framework.server.constraint_fields import (
    ALIAS_FIELDS,
    CONSTRAINT_FIELDS,
    IGNORED_ALIAS_FIELDS,
    requested,
    resolve,
)
from framework.server.errors import bad_request, loc_to_param, not_supported

EXTRA_SAMPLING_FIELDS: frozenset[str] = frozenset({
    "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "min_tokens_to_keep",
    "repetition_penalty", "no_repeat_ngram_size", "bad_words", "min_tokens", "stop_token_ids",
    "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
})
"""SamplingParams fields a request may set directly as extra body fields."""

IGNORED_FIELDS: frozenset[str] = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
"""OpenAI fields accepted and ignored (they do not change what is generated)."""

# a SamplingParams field that derives a built-in processor: a request setting the field replaces
# the spec's entry for that processor (else the engine would see the processor set twice)
_FIELD_PROCESSOR = {
    "repetition_penalty": "repetition_penalty", "frequency_penalty": "frequency_presence_penalty",
    "presence_penalty": "frequency_presence_penalty", "logit_bias": "logit_bias",
    "no_repeat_ngram_size": "no_repeat_ngram", "bad_words": "bad_words", "min_tokens": "min_tokens",
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
    "typical_p": "typical_p", "epsilon_cutoff": "epsilon_cutoff", "eta_cutoff": "eta_cutoff",
}

_CONSTRAINT_PROCESSOR = "constraint"  # the logits processor that runs constraints (framework/constraints.py)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _CommonRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: StrictInt | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    # extra body: plugins
    processors: list[dict[str, Any] | str] | None = None
    grammar: str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    reranker: dict[str, Any] | str | None = None
    best_of: StrictInt | None = Field(None, ge=1)


class CompletionRequest(_CommonRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None


class ChatCompletionRequest(_CommonRequest):
    """``POST /v1/chat/completions``."""

    messages: list[Any]
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """JSON bytes -> a validated request model; 400 naming the field on any problem."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object")
    try:  # JSON may escape lone surrogates ("\ud800"), which no tokenizer can take
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request("the request body contains invalid Unicode (a lone surrogate)") from None
    huge = _huge_number(data)
    if huge is not None:
        raise bad_request(f"{huge}: a number beyond the 32-bit float range (|x| > {_FLOAT32_MAX:.4g}), which the "
                          "engine computes in", param=huge)
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = loc_to_param(err["loc"][:1]) if err["type"] == "missing" else loc_to_param(err["loc"])
        if err["type"] == "missing":
            msg = f"{param}: field required"
        elif err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
            raise bad_request(_unknown_field(param, model), param=param, code="unknown_parameter") from None
        else:
            msg = f"{param}: {err['msg'].removeprefix('Value error, ')}"
        raise bad_request(msg, param=param) from None
    for key in (req.model_extra or {}):
        if key not in EXTRA_SAMPLING_FIELDS and key not in IGNORED_FIELDS and key not in _ALIASES:
            raise bad_request(_unknown_field(key, model), param=key, code="unknown_parameter")
    return req


_ALIASES = frozenset(ALIAS_FIELDS) | IGNORED_ALIAS_FIELDS | {"guided_whitespace_pattern"}


def _unknown_field(key: str, model: type[BaseModel]) -> str:
    """``unknown field 'max_new_tokens'; decodekit calls it 'max_tokens'`` — against the request's
    fields; a SamplingParams or engine field that requests cannot set says where it goes."""
    from framework.config import EngineConfig
    from framework.names import unknown_field_message

    known = set(model.model_fields) | EXTRA_SAMPLING_FIELDS | set(ALIAS_FIELDS)
    if key in SamplingParams.model_fields:
        return f"{key!r} cannot be set per request on this server; set it in the spec's sampling section"
    if key in EngineConfig.model_fields:
        return f"{key!r} is an engine option; set it in the spec's engine section"
    return unknown_field_message(key, known)


_FLOAT32_MAX = 3.4028234663852886e38


def _huge_number(value: Any, path: str = "") -> str | None:
    """The path (``processors[0].temperature.temperature``) of the first number in a request
    body that no 32-bit float can hold, or None. Sampling runs in float32 (at most), so such a
    value can only overflow; refusing it here keeps it from failing a whole engine step."""
    if isinstance(value, float) and abs(value) > _FLOAT32_MAX:
        return path or "body"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _FLOAT32_MAX:
        return path or "body"
    if isinstance(value, dict):
        for k, v in value.items():
            if (hit := _huge_number(v, f"{path}.{k}" if path else str(k))) is not None:
                return hit
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (hit := _huge_number(v, f"{path}[{i}]")) is not None:
                return hit
    return None


# ------------------------------------------------------------------------------ sampling params
class ParamsBuilder:
    """Turns a request into SamplingParams over the spec's defaults and the plugin registries."""

    def __init__(self, loaded: Any, plugin_manager: Any):
        self.loaded = loaded  # framework.spec.LoadedSpec
        self.pm = plugin_manager
        self.spec_processors: list[tuple[str, dict[str, Any]]] = [(p.name, p.options) for p in loaded.processors]

    def build(self, req: _CommonRequest, *, chat: bool) -> SamplingParams:
        over: dict[str, Any] = {}
        set_fields = req.model_fields_set | set(req.model_extra or {})
        if isinstance(req, CompletionRequest) and req.suffix:
            raise not_supported("suffix")
        if chat:
            assert isinstance(req, ChatCompletionRequest)
            for name in ("tools", "functions"):
                if getattr(req, name):
                    raise not_supported(name, f"{name} (tool calling)")
            for name in ("tool_choice", "function_call"):
                if getattr(req, name) not in (None, "none"):
                    raise not_supported(name, f"{name} (tool calling)")
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            if req.logprobs:
                over["logprobs"] = req.top_logprobs or 0
            elif req.top_logprobs is not None:
                raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        else:
            assert isinstance(req, CompletionRequest)
            max_tokens = req.max_tokens
            if req.logprobs is not None:
                over["logprobs"] = req.logprobs
                if req.echo:  # the echoed prompt's tokens come with their logprobs too
                    if "prompt_logprobs" not in SamplingParams.model_fields:
                        raise not_supported("echo", "echo with logprobs (prompt logprobs)")
                    over["prompt_logprobs"] = req.logprobs
        if max_tokens is not None:
            over["max_tokens"] = max_tokens
        for name in ("temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty"):
            value = getattr(req, name)
            if value is not None:
                over[name] = value
        if req.stop is not None:
            over["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
        if req.logit_bias:
            bias: dict[int, float] = {}
            for key, value in req.logit_bias.items():
                try:
                    tok = int(key)
                except ValueError:
                    raise bad_request(f"logit_bias keys must be token ids (integers as strings), got {key!r}", param="logit_bias") from None
                bias[tok] = value
            over["logit_bias"] = bias
        if req.best_of is not None:
            if "best_of" in SamplingParams.model_fields:
                over["best_of"] = req.best_of  # the n of best_of samples with the highest cumulative logprob
            elif req.best_of != (req.n or self.loaded.server_sampling_params().n):
                raise not_supported("best_of", "best_of other than n (use a reranker plugin in the spec)")
        if not req.stream and req.stream_options is not None:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        for key, value in (req.model_extra or {}).items():
            if key in EXTRA_SAMPLING_FIELDS:
                over[key] = value
        over["processors"] = self._processors(req, set_fields)
        constraint = self._constraint(req)
        if constraint is not None:  # replaces the spec's constraint, however the spec gave it
            over.update({f: None for f in ("json_schema", "regex", "grammar", "choice") if f in SamplingParams.model_fields})
            over["constraint"] = constraint
        if req.reranker is not None:
            over["reranker"] = self._plugin_ref("reranker", "reranker", req.reranker)
        try:
            return self.loaded.server_sampling_params(**over)
        except InvalidRequestError as exc:
            errors = getattr(exc, "validation_errors", None) or []
            param = loc_to_param(errors[0]["loc"]) if errors and errors[0].get("loc") else None
            if param is None:  # a check across fields: blame the first request field it names
                param = _first_named(str(exc), set_fields)
            if chat and param == "logprobs":
                param = "top_logprobs"
            raise bad_request(str(exc), param=param) from None

    # -- plugins ------------------------------------------------------------------------------
    def _validate_options(self, kind: str, name: str, options: Any, param: str) -> dict[str, Any]:
        registry = self.pm.registry(kind)
        if name not in registry:
            from framework.plugins import unknown_name_message

            raise bad_request(unknown_name_message(kind, name, registry.names()), param=param)
        model = registry.get(name).params
        from framework.plugins import PluginOptionsError, validate_plugin_options

        try:
            validated = validate_plugin_options(name, model, options, context={"base_dir": self.loaded.base_dir, "models": {}})
        except PluginOptionsError as exc:
            loc, msg = exc.errors[0]
            where = loc_to_param(loc) if loc else ""
            full = f"{param}.{where}" if where else param
            raise bad_request(f"{full}: {msg}", param=full) from None
        if model is None:
            return validated
        return json.loads(validated.model_dump_json(exclude_unset=True, by_alias=True))

    def _processors(self, req: _CommonRequest, set_fields: set[str]) -> list[dict[str, Any]]:
        """The spec's processors, with the request's entries replacing same-named ones and
        appended otherwise; a spec entry whose SamplingParams field the request sets is dropped."""
        requested: list[tuple[str, dict[str, Any]]] = []
        for i, entry in enumerate(req.processors or []):
            param = f"processors[{i}]"
            if isinstance(entry, str):
                name, options = entry, {}
            elif isinstance(entry, dict) and len(entry) == 1:
                (name, options), = entry.items()
                options = {} if options is None else options
            else:
                raise bad_request("each processors entry is a name or a one-key object {name: {options}}", param=param)
            if name == _CONSTRAINT_PROCESSOR:  # only through the fields below: they never name server files
                raise bad_request("give a constraint with response_format, grammar, regex or choice, not as a processor",
                                  param=f"{param}.{name}")
            if any(name == n for n, _ in requested):
                raise bad_request(f"processor {name!r} is listed twice", param=param)
            requested.append((name, self._validate_options("logits_processor", name, options, f"{param}.{name}")))
        overridden = {_FIELD_PROCESSOR[f] for f in set_fields if f in _FIELD_PROCESSOR}
        names = {n for n, _ in requested}
        merged = [(n, o) for n, o in self.spec_processors if n not in names and n not in overridden]
        return [{n: o} for n, o in merged + requested]

    def _plugin_ref(self, kind: str, field: str, value: Any) -> dict[str, Any]:
        if field not in SamplingParams.model_fields:
            raise not_supported(field, f"{field} (no {kind} support in this build)")
        if isinstance(value, str):
            name, options = value, {}
        elif isinstance(value, dict) and len(value) == 1:
            (name, options), = value.items()
        else:
            raise bad_request(f"{field} is a name or a one-key object {{name: {{options}}}}", param=field)
        return {name: self._validate_options(kind, name, options, f"{field}.{name}")}

    def _constraint(self, req: _CommonRequest) -> dict[str, Any] | None:
        found = self.constraint_for(req)
        if found is None:
            return None
        field, name, options = found
        if "constraint" not in SamplingParams.model_fields:
            raise not_supported(field, f"{field} (constrained decoding: no per-request constraint field in this build)")
        return {name: options}

    def constraint_for(self, req: _CommonRequest) -> tuple[str, str, dict[str, Any]] | None:
        """``(request field, constraint name, validated options)`` of the request's constraint
        (its own fields or vLLM's aliases, :mod:`framework.server.constraint_fields`)."""
        given = requested(req)
        if not given:
            return None
        if len(given) > 1:
            names = [f for f, _ in given]
            raise bad_request(f"give at most one of {', '.join(CONSTRAINT_FIELDS + ALIAS_FIELDS)} (got {', '.join(names)})",
                              param=names[1])
        field, value = given[0]
        name, option, arg = resolve(field, value)
        if name not in self.pm.registry("constraint"):
            raise not_supported(field, f"{field} (constrained decoding: no {name!r} constraint in this build)")
        options = self._fit(name, option, arg)
        return field, name, self._validate_options("constraint", name, options, field)

    def _fit(self, name: str, option: str, value: Any) -> Any:
        """Options for constraint ``name`` holding ``value``: under the Params model's shorthand,
        the key we expect, or its only required field."""
        model = self.pm.registry("constraint").get(name).params
        if model is None:
            return {option: value}
        short = getattr(model, "__shorthand__", None)
        if short is not None:
            return {short: value}
        if any(option in (key, f.alias) for key, f in model.model_fields.items()):
            return {option: value}
        required = [n for n, f in model.model_fields.items() if f.is_required()]
        return {required[0] if len(required) == 1 else option: value}


def _first_named(message: str, fields: set[str]) -> str | None:
    """The request field whose name appears first in ``message`` (as a whole word)."""
    hits = [(m.start(), f) for f in fields if (m := re.search(rf"\b{re.escape(f)}\b", message))]
    return min(hits)[1] if hits else None


def constraint_fields(req: _CommonRequest) -> list[str]:
    """The request fields that ask for a constraint (``response_format`` of type text does not;
    vLLM's ``guided_*`` / ``structured_outputs`` aliases do)."""
    return [f for f, _ in requested(req)]


# ------------------------------------------------------------------------------ chat messages
_ROLES = {"system", "user", "assistant", "tool", "developer", "function"}


def chat_messages(messages: list[Any]) -> list[dict[str, str]]:
    """OpenAI messages -> ``[{role, content}]`` for the chat template (text parts joined)."""
    if not messages:
        raise bad_request("messages must be a non-empty list", param="messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{where} must be an object with 'role' and 'content'", param=where)
        role = m.get("role")
        if role not in _ROLES:
            raise bad_request(f"{where}.role must be one of {', '.join(sorted(_ROLES))}", param=f"{where}.role")
        if m.get("tool_calls") or m.get("function_call"):
            raise not_supported(f"{where}.tool_calls", "tool calls")
        if "content" not in m and role != "assistant":
            raise bad_request(f"{where}.content is required", param=f"{where}.content")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise not_supported(f"{where}.content[{j}]", f"content part of type {kind!r} (only 'text')")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out

