"""The plugin manager: built-in plugins, entry-point plugins, and registries by name.

``get_plugin_manager()`` returns a process-wide :class:`PluginManager`. On first use it loads the
built-in plugin modules, then every module advertised under the entry-point group ``decodekit``,
then calls each registration hook once and fills one :class:`Registry` per kind.

Environment variables:

* ``DECODEKIT_PLUGINS`` — comma-separated entry-point names allowed to load (``""`` or
  ``"none"`` loads no third-party plugin; unset loads all). Built-ins always load.
* ``DECODEKIT_TRACE_HOOKS=1`` — log every hook call with its duration (to stderr).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Iterator

import pluggy

from framework import hookspecs
from framework.errors import PluginError

logger = logging.getLogger(__name__)

# kind -> registration hook name
KINDS: dict[str, str] = {
    "tokenizer": "register_tokenizers",
    "model": "register_models",
    "sampler": "register_samplers",
    "logits_processor": "register_logits_processors",
    "constraint": "register_constraints",
    "reranker": "register_rerankers",
    "utility": "register_utilities",
    "drafter": "register_drafters",
    "strategy": "register_strategies",
    "kv_policy": "register_kv_policies",
    "command": "register_commands",
    "route": "register_routes",
}

_KIND_ALIASES = {"utilities": "utility", "processor": "logits_processor", "logits_processors": "logits_processor", "guidance": "logits_processor"}


def normalize_kind(kind: str) -> str | None:
    """A kind as people write it (``logits-processor``, ``processors``, ``Constraints``) -> the
    registry's name (``logits_processor``, ``constraint``); None if it is no kind."""
    k = kind.strip().lower().replace("-", "_").replace(" ", "_")
    for cand in (k, k[:-1] if k.endswith("s") else k):
        if cand in KINDS:
            return cand
        if cand in _KIND_ALIASES:
            return _KIND_ALIASES[cand]
    return None


BUILTIN_PLUGINS: tuple[str, ...] = (
    "plugins.tokenizers",
    "framework.models",
    "framework.demo",
    "framework.strategies",
    "framework.kv_policy",
    "plugins.samplers",
    "framework.constraints",
    "plugins.constraints",
    "plugins.rerankers",
    "plugins.guidance",
    "plugins.drafters",
    "plugins.kv_policies",
)


@dataclass(frozen=True, slots=True)
class Registration:
    """One registered name: what it is, who registered it, and how to build it."""

    kind: str
    name: str
    factory: Any
    source: str
    params: type | None = None


@dataclass(slots=True)
class Registry:
    """Names registered for one kind, in registration order."""

    kind: str
    entries: dict[str, Registration] = field(default_factory=dict)

    def add(self, reg: Registration) -> None:
        prev = self.entries.get(reg.name)
        if prev is not None:
            raise PluginError(
                f"{self.kind} {reg.name!r} is registered twice: by plugin {prev.source!r} "
                f"and by plugin {reg.source!r}"
            )
        self.entries[reg.name] = reg

    def get(self, name: str) -> Registration:
        try:
            return self.entries[name]
        except KeyError:
            raise PluginError(unknown_name_message(self.kind, name, list(self.entries))) from None

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[Registration]:
        return iter(self.entries.values())

    def names(self) -> list[str]:
        return list(self.entries)


class PluginOptionsError(PluginError, ValueError):
    """A plugin's options do not validate against its Params model.

    ``errors`` lists ``(loc, message)`` pairs (``loc``: the field path inside the options, a
    tuple; empty for a problem with the options as a whole), so callers can point at the field
    (a spec's file:line, a server request's ``param``); ``str()`` is one line naming the plugin.
    """

    def __init__(self, name: str, errors: list[tuple[tuple, str]]):
        self.name = name
        self.errors = errors
        parts = [f"{'.'.join(map(str, loc))}: {msg}" if loc else msg for loc, msg in errors]
        super().__init__(f"invalid {name} params: " + "; ".join(parts))


def validate_plugin_options(name: str, params: type | None, options: Any, *, context: dict[str, Any] | None = None) -> Any:
    """Validate a plugin's ``options`` as every entry point does (spec sections, SamplingParams
    ``processors`` and ``constraint``, server request fields): the one place shorthand lives.

    * ``None`` means default options (``{}``).
    * With a Params model (``params``): a value that is not a mapping is the shorthand for
      ``{params.__shorthand__: value}`` (``regex: "a+"`` is ``{pattern: "a+"}``); a model
      without a shorthand needs a mapping. Returns the validated model instance (``context``
      goes to pydantic validators, e.g. ``{"base_dir": ...}`` for :data:`framework.spec.SpecPath`).
    * Without one: the options must be a mapping, returned as a dict.

    Raises:
        PluginOptionsError: naming the plugin and, per problem, the field path.
    """
    from pydantic import ValidationError

    if options is None:
        options = {}
    if params is None:
        if not isinstance(options, dict):
            raise PluginOptionsError(name, [((), f"options of {name!r} must be a mapping")])
        return dict(options)
    if not isinstance(options, dict):
        short = getattr(params, "__shorthand__", None)
        if short is None:
            raise PluginOptionsError(name, [((), f"options of {name!r} must be a mapping")])
        options = {short: options}
    try:
        return params.model_validate(options, context=context)  # type: ignore[attr-defined]
    except ValidationError as exc:
        from framework.names import field_hint

        errors = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            if err["type"] == "extra_forbidden":
                known = getattr(params, "model_fields", {})
                msg = "unknown field" + (field_hint(str(loc[-1]), known) if len(loc) == 1 else "")
            elif err["type"] == "missing":
                msg = "Field required"
            else:
                msg = err["msg"].removeprefix("Value error, ")
            errors.append((loc, msg))
        raise PluginOptionsError(name, errors) from None


def unknown_name_message(kind: str, name: str, known: list[str]) -> str:
    """``unknown sampler 'gredy'; did you mean 'greedy'?`` — shared by every registry lookup."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f" (registered: {', '.join(sorted(known)) or 'none'})"
    return f"unknown {kind.replace('_', ' ')} {name!r}{hint}"


class PluginManager:
    """Loads plugins and holds the registries. Cheap to query; build it once per process."""

    def __init__(self, *, load_entry_points: bool = True, extra_plugins: list[Any] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        if os.environ.get("DECODEKIT_TRACE_HOOKS"):
            self._enable_tracing()
        for modname in BUILTIN_PLUGINS:
            self.pm.register(importlib.import_module(modname), name=modname)
        if load_entry_points:
            self._load_entry_points()
        for plugin in extra_plugins or []:
            self.pm.register(plugin)
        self._check_hook_names()
        self.registries: dict[str, Registry] = {kind: Registry(kind) for kind in KINDS}
        for kind, hook_name in KINDS.items():
            self._collect(kind, hook_name)
        # Event hooks are dispatched only when somebody listens (saves a pluggy call per step).
        self.listens = {
            name: bool(getattr(self.pm.hook, name).get_hookimpls())
            for name in ("on_request_added", "on_step_finished", "on_request_finished")
        }

    # -- loading ------------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        allowed_env = os.environ.get("DECODEKIT_PLUGINS")
        allowed: set[str] | None = None
        if allowed_env is not None:
            allowed = {p.strip() for p in allowed_env.split(",") if p.strip() and p.strip() != "none"}
        for ep in entry_points(group=hookspecs.PROJECT_NAME):
            if allowed is not None and ep.name not in allowed:
                logger.debug("skipping plugin %s (not in DECODEKIT_PLUGINS)", ep.name)
                continue
            if self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken third-party plugin must say who it is
                raise PluginError(f"plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
            self.pm.register(module, name=ep.name)

    def _check_hook_names(self) -> None:
        """A ``@hookimpl`` whose name is no hook (``register_sampler`` for ``register_samplers``)
        would silently never run: refuse it, naming the plugin and the nearest hook."""
        hooks = list(hookspecs.HOOK_NAMES)
        for name in self.pm.hook.__dict__:
            caller = getattr(self.pm.hook, name)
            if caller.spec is not None:
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                close = difflib.get_close_matches(name, hooks, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else f" (hooks: {', '.join(sorted(hooks))})"
                raise PluginError(f"plugin {impl.plugin_name!r} implements {name!r}, which is not a decodekit hook{hint}")
        self.pm.check_pending()  # whatever the loop above did not explain

    def _collect(self, kind: str, hook_name: str) -> None:
        hook = getattr(self.pm.hook, hook_name)
        registry = self.registries[kind]
        # Call each implementation separately so every registration knows its source plugin.
        for impl in hook.get_hookimpls():  # registration order: built-ins first
            source = impl.plugin_name

            def register(name: str, factory: Any, *, params: type | None = None, _src: str = source) -> None:
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {_src!r} registered a {kind} with an invalid name {name!r}")
                registry.add(Registration(kind, name, factory, _src, params))

            try:
                impl.function(register=register)
            except PluginError:
                raise
            except Exception as exc:  # a broken plugin must say who it is
                raise PluginError(f"plugin {source!r} failed in {hook_name}: {type(exc).__name__}: {exc} "
                                  "(DECODEKIT_PLUGINS=name,... loads only the plugins named)") from exc

    def _enable_tracing(self) -> None:
        def before(hook_name: str, impls: Any, kwargs: dict) -> None:
            print(f"[decodekit hook] {hook_name}({', '.join(kwargs)}) -> {len(impls)} impl(s)", file=sys.stderr)

        def after(outcome: Any, hook_name: str, impls: Any, kwargs: dict) -> None:
            print(f"[decodekit hook] {hook_name} done", file=sys.stderr)

        self.pm.add_hookcall_monitoring(before, after)

    # -- queries ------------------------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    def get(self, kind: str, name: str) -> Registration:
        return self.registries[kind].get(name)

    def all_registrations(self) -> list[Registration]:
        return [reg for registry in self.registries.values() for reg in registry]

    # -- events -------------------------------------------------------------------------------
    def emit(self, hook_name: str, **kwargs: Any) -> None:
        """Dispatch an event hook if any plugin listens; observer errors are logged, not raised."""
        if not self.listens.get(hook_name):
            return
        t0 = time.perf_counter()
        hook = getattr(self.pm.hook, hook_name)
        try:
            hook(**kwargs)
        except Exception as exc:  # an observer must never take the engine down
            logger.exception("plugin %r raised in %s: %s", _culprit(hook, exc), hook_name, exc)
        logger.debug("%s took %.1f us", hook_name, (time.perf_counter() - t0) * 1e6)


def _culprit(hook: Any, exc: BaseException) -> str:
    """The name of the plugin whose implementation of ``hook`` raised ``exc`` (from the
    traceback), or ``"?"``."""
    codes = {impl.function.__code__: impl.plugin_name for impl in hook.get_hookimpls()}
    tb = exc.__traceback__
    name = "?"
    while tb is not None:
        name = codes.get(tb.tb_frame.f_code, name)
        tb = tb.tb_next
    return name


_MANAGER: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager (built on first call)."""
    global _MANAGER
    if _MANAGER is None:
        _MANAGER = PluginManager()
    return _MANAGER


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests; after installing a plugin at run time)."""
    global _MANAGER
    _MANAGER = None
