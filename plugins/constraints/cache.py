"""Compiled-constraint cache (memory + disk) and the compiler service that compiles off-thread.

Keys hash the kind, the canonical params, the contents of the files they name, the tokenizer's
vocabulary and the format and decodekit versions (:meth:`ConstraintCache.key`). The
memory tier holds :class:`CompiledGrammar` objects (LRU); the disk tier, under
``$DECODEKIT_CACHE_DIR`` (default ``~/.cache/decodekit``; ``off`` disables it), holds the
front end's grammar and its terminal automata, so a cold process skips schema conversion, lark
loading and regex determinization.

:class:`CompilerService` runs compilations on a small thread pool: ``submit`` returns a
``concurrent.futures.Future`` immediately, so the engine keeps stepping other requests while a
grammar compiles; each compilation has a deadline, checked inside the expensive loops, and
fails with :class:`ConstraintTimeoutError` past it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from framework.errors import ConstraintError, ConstraintTimeoutError
from plugins.constraints import automata
from plugins.constraints.frontends import build_grammar, source_files
from plugins.constraints.lexer import vocab_for
from plugins.constraints.matcher import CompiledGrammar
from plugins.constraints.regex import node_key

__all__ = ["ConstraintCache", "CompilerService", "default_cache_dir", "get_compiler", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)
FORMAT_VERSION = "dk-constraints-3"


def default_cache_dir() -> Path | None:
    """``$DECODEKIT_CACHE_DIR`` (``off``/empty: no disk cache), else ``~/.cache/decodekit``."""
    env = os.environ.get("DECODEKIT_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "none", "0") else Path(env).expanduser()
    return Path.home() / ".cache" / "decodekit"


def _engine_version() -> str:
    from framework import __version__

    return __version__


def _canonical(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


class ConstraintCache:
    """Memory LRU + optional disk store of compiled constraints."""

    def __init__(self, cache_dir: Path | str | None = "default", memory_items: int = 256):
        self.dir = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
        self.memory_items = memory_items
        self._mem: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.disk_hits = 0

    def key(self, kind: str, params: dict[str, Any], vocab_hash: str) -> str:
        """What decides a compiled constraint: the format and decodekit versions, the kind, the
        canonical params, the *contents* of every file they name (a schema, grammar file or
        shipped grammar and its imports: a changed file is a new key, in this process and the
        next) and the tokenizer's vocabulary hash."""
        h = hashlib.sha256(f"{FORMAT_VERSION}\0{_engine_version()}\0{kind}\0{_canonical(params)}\0{vocab_hash}".encode())
        for path in source_files(kind, params):
            h.update(b"\0file\0" + str(path).encode())
            try:
                h.update(hashlib.sha256(path.read_bytes()).digest())
            except OSError:
                h.update(b"missing")  # the compilation reports it
        return h.hexdigest()

    def get(self, key: str) -> CompiledGrammar | None:
        with self._lock:
            cg = self._mem.get(key)
            if cg is not None:
                self._mem.move_to_end(key)
                self.hits += 1
            return cg

    def put(self, key: str, cg: CompiledGrammar) -> None:
        with self._lock:
            self._mem[key] = cg
            self._mem.move_to_end(key)
            while len(self._mem) > self.memory_items:
                self._mem.popitem(last=False)

    # -- disk -------------------------------------------------------------------------------
    def _path(self, key: str) -> Path | None:
        return None if self.dir is None else self.dir / "constraints" / key[:2] / f"{key}.pkl"

    def load(self, key: str) -> tuple[Any, list[str]] | None:
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f)
            if entry.get("version") != FORMAT_VERSION:
                return None
            for node, dfa in entry["dfas"]:
                automata._CACHE.setdefault(node, dfa)
            self.disk_hits += 1
            return entry["grammar"], entry["warnings"]
        except Exception as exc:  # a corrupt entry is a miss, never an error
            logger.warning("ignoring unreadable constraint cache entry %s: %s", path, exc)
            return None

    def store(self, key: str, grammar: Any, warnings: list[str]) -> None:
        path = self._path(key)
        if path is None:
            return
        try:
            keys = [node_key(t.node) for t in grammar.terminals.values()]  # automata._CACHE is keyed by node_key
            dfas = [(k, automata._CACHE[k]) for k in keys if k in automata._CACHE]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
            with open(tmp, "wb") as f:
                pickle.dump({"version": FORMAT_VERSION, "grammar": grammar, "warnings": warnings, "dfas": dfas}, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
        except Exception as exc:
            logger.warning("could not write constraint cache entry %s: %s", path, exc)

    # -- compile ----------------------------------------------------------------------------
    def get_or_compile(self, kind: str, params: dict[str, Any], tokenizer: Any, *, deadline: float | None = None,
                       warm: bool = True) -> CompiledGrammar:
        """The compiled constraint, from memory, disk, or compiled now (then stored)."""
        vocab = vocab_for(tokenizer)
        key = self.key(kind, params, vocab.hash)
        cg = self.get(key)
        if cg is not None:
            return cg
        self.misses += 1
        loaded = self.load(key)
        if loaded is not None:
            grammar, warnings = loaded
        else:
            grammar, warnings = build_grammar(kind, params)
        if deadline is not None and time.monotonic() > deadline:
            raise ConstraintTimeoutError(f"{kind}: compilation exceeded its time limit")
        cg = CompiledGrammar(grammar, tokenizer, deadline=deadline, vocab=vocab)
        cg.kind = kind  # type: ignore[attr-defined]
        cg.warnings = list(warnings)  # type: ignore[attr-defined]
        if warm:  # the first mask is part of "time to first mask": do it here, off the engine
            cg.mask(cg.initial)
        if loaded is None:
            self.store(key, grammar, warnings)
        self.put(key, cg)
        return cg


class CompilerService:
    """Compiles constraints on a thread pool with a per-compilation time limit.

    Args:
        cache: where compiled constraints are kept (default: a :class:`ConstraintCache` with the
            default disk directory).
        max_workers: compilation threads (1 keeps compilation from competing with the engine
            for more than one core).
        timeout_s: time limit per compilation, in seconds.
    """

    def __init__(self, cache: ConstraintCache | None = None, max_workers: int = 1, timeout_s: float = 30.0):
        self.cache = cache or ConstraintCache()
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="decodekit-constraint")
        self._pending: dict[str, Future] = {}
        self._lock = threading.Lock()

    def submit(self, kind: str, params: dict[str, Any], tokenizer: Any, timeout_s: float | None = None) -> "Future[CompiledGrammar]":
        """Start compiling (or return the cached result as a done future). Concurrent requests
        for the same constraint share one compilation."""
        vocab = vocab_for(tokenizer)
        key = self.cache.key(kind, params, vocab.hash)
        cg = self.cache.get(key)
        if cg is not None:
            fut: Future = Future()
            fut.set_result(cg)
            return fut
        with self._lock:
            fut = self._pending.get(key)  # type: ignore[assignment]
            if fut is not None:
                return fut
            limit = self.timeout_s if timeout_s is None else timeout_s
            deadline = time.monotonic() + limit

            def run() -> CompiledGrammar:
                try:
                    return self.cache.get_or_compile(kind, params, tokenizer, deadline=deadline)
                finally:
                    with self._lock:
                        self._pending.pop(key, None)

            fut = self._pool.submit(run)
            self._pending[key] = fut
            return fut

    def compile(self, kind: str, params: dict[str, Any], tokenizer: Any, timeout_s: float | None = None) -> CompiledGrammar:
        """Compile and wait (raises the compilation's error, or ConstraintTimeoutError)."""
        limit = self.timeout_s if timeout_s is None else timeout_s
        fut = self.submit(kind, params, tokenizer, limit)
        try:
            return fut.result(timeout=limit + 1.0)
        except TimeoutError:
            raise ConstraintTimeoutError(f"{kind}: compilation did not finish within {limit:g} s") from None
        except ConstraintError:
            raise

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_SERVICE: CompilerService | None = None
_SERVICE_LOCK = threading.Lock()


def get_compiler() -> CompilerService:
    """The process-wide compiler service."""
    global _SERVICE
    with _SERVICE_LOCK:
        if _SERVICE is None:
            _SERVICE = CompilerService()
        return _SERVICE
