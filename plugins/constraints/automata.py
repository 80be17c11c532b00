"""Byte-level automata: regex AST -> Thompson NFA over bytes -> trimmed DFA.

Terminals are matched on the bytes tokens contribute, so a token that carries half of a UTF-8
character simply leaves the DFA between two bytes of that character. Code point classes become
UTF-8 byte-range sequences (the usual split at encoding-length and continuation boundaries).

A :class:`DFA` is a dense ``[states, 256]`` int32 table (``-1``: no transition) with start state
0, trimmed so that every state can still reach an accepting state: "alive" means "completable",
which is what keeps constrained decoding from dead-ending inside a lexeme.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from framework.errors import ConstraintTimeoutError
from plugins.constraints.regex import Alt, And, Chars, Node, RegexError, Repeat, Seq, node_key

__all__ = ["DFA", "compile_dfa", "literal_dfa", "product", "utf8_sequences", "MAX_NFA_STATES", "MAX_DFA_STATES"]

MAX_NFA_STATES = 400_000
MAX_DFA_STATES = 20_000


@dataclass(frozen=True, slots=True)
class DFA:
    """A trimmed byte DFA: ``trans[s, b]`` is the next state or -1; start state is 0."""

    trans: np.ndarray  # [n, 256] int32
    accept: np.ndarray  # [n] bool
    counter: object = None  # plugins.constraints.counted.Counter of a counted repetition, else None

    @property
    def size(self) -> int:
        return int(self.trans.shape[0])

    def empty(self) -> bool:
        return self.size == 0

    def accepts_empty(self) -> bool:
        return self.size > 0 and bool(self.accept[0])

    def matches(self, data: bytes) -> bool:
        s = 0
        if self.size == 0:
            return False
        for b in data:
            s = int(self.trans[s, b])
            if s < 0:
                return False
        return bool(self.accept[s])


# ----------------------------------------------------------------------------- UTF-8


def utf8_sequences(lo: int, hi: int) -> list[tuple[tuple[int, int], ...]]:
    """Byte-range sequences whose concatenations are exactly the UTF-8 encodings of [lo, hi]."""
    out: list[tuple[tuple[int, int], ...]] = []
    for a, b, n in ((0, 0x7F, 1), (0x80, 0x7FF, 2), (0x800, 0xFFFF, 3), (0x10000, 0x10FFFF, 4)):
        x, y = max(lo, a), min(hi, b)
        if x <= y:
            prefix = (0x00, 0xC0, 0xE0, 0xF0)[n - 1]
            out.extend(_split(x, y, n, prefix))
    return out


def _split(a: int, b: int, n: int, prefix: int) -> list[tuple[tuple[int, int], ...]]:
    """Encodings of [a, b] as ``n`` bytes whose first byte is ``prefix | (v >> 6(n-1))``."""
    if n == 1:
        return [((prefix | a, prefix | b),)]
    shift = 6 * (n - 1)
    mask = (1 << shift) - 1
    ha, hb = a >> shift, b >> shift
    if ha == hb:
        return [((prefix | ha, prefix | ha),) + t for t in _split(a & mask, b & mask, n - 1, 0x80)]
    out: list[tuple[tuple[int, int], ...]] = []
    if a & mask:
        out += [((prefix | ha, prefix | ha),) + t for t in _split(a & mask, mask, n - 1, 0x80)]
        ha += 1
    tail: list[tuple[tuple[int, int], ...]] = []
    if b & mask != mask:
        tail = [((prefix | hb, prefix | hb),) + t for t in _split(0, b & mask, n - 1, 0x80)]
        hb -= 1
    if ha <= hb:
        out.append(((prefix | ha, prefix | hb),) + ((0x80, 0xBF),) * (n - 1))
    return out + tail


# ----------------------------------------------------------------------------- NFA


class _NFA:
    __slots__ = ("eps", "edges", "deadline", "where")

    def __init__(self, deadline: float | None, where: str):
        self.eps: list[list[int]] = []
        self.edges: list[list[tuple[int, int, int]]] = []
        self.deadline = deadline
        self.where = where

    def new(self) -> int:
        n = len(self.eps)
        if n >= MAX_NFA_STATES:
            raise RegexError(f"{self.where}: the expression is too large (over {MAX_NFA_STATES} automaton states)")
        if self.deadline is not None and n % 4096 == 0 and time.monotonic() > self.deadline:
            raise ConstraintTimeoutError(f"{self.where}: compiling the expression exceeded its time limit")
        self.eps.append([])
        self.edges.append([])
        return n

    def build(self, node: Node) -> tuple[int, int]:
        if isinstance(node, Chars):
            s, e = self.new(), self.new()
            for sq in (q for lo, hi in node.ranges for q in utf8_sequences(lo, hi)):
                cur = s
                for i, (blo, bhi) in enumerate(sq):
                    nxt = e if i == len(sq) - 1 else self.new()
                    self.edges[cur].append((blo, bhi, nxt))
                    cur = nxt
            return s, e
        if isinstance(node, Seq):
            s = e = self.new()
            for it in node.items:
                a, b = self.build(it)
                self.eps[e].append(a)
                e = b
            return s, e
        if isinstance(node, Alt):
            s, e = self.new(), self.new()
            for it in node.items:
                a, b = self.build(it)
                self.eps[s].append(a)
                self.eps[b].append(e)
            return s, e
        if isinstance(node, Repeat):
            s = e = self.new()
            for _ in range(node.min):
                a, b = self.build(node.item)
                self.eps[e].append(a)
                e = b
            if node.max is None:
                a, b = self.build(node.item)
                self.eps[e].append(a)
                self.eps[b].append(a)
                end = self.new()
                self.eps[e].append(end)
                self.eps[b].append(end)
                return s, end
            end = self.new()
            for _ in range(node.max - node.min):
                a, b = self.build(node.item)
                self.eps[e].append(a)
                self.eps[e].append(end)
                e = b
            self.eps[e].append(end)
            return s, end
        raise RegexError(f"{self.where}: an intersection (And) must be the whole expression")


def _determinize(nfa: _NFA, start: int, final: int, where: str) -> DFA:
    eps, edges = nfa.eps, nfa.edges
    closures: dict[frozenset[int], frozenset[int]] = {}

    def closure(states: frozenset[int]) -> frozenset[int]:
        got = closures.get(states)
        if got is not None:
            return got
        seen = set(states)
        stack = list(states)
        while stack:
            for t in eps[stack.pop()]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        # keep only states that matter (with byte edges, or final) as the DFA state's identity
        res = frozenset(x for x in seen if edges[x] or x == final)
        closures[states] = res
        return res

    s0 = closure(frozenset((start,)))
    index: dict[frozenset[int], int] = {s0: 0}
    order = [s0]
    rows: list[list[int]] = []
    i = 0
    while i < len(order):
        if len(order) > MAX_DFA_STATES:
            raise RegexError(f"{where}: the expression is too complex (over {MAX_DFA_STATES} DFA states)")
        if nfa.deadline is not None and i % 256 == 0 and time.monotonic() > nfa.deadline:
            raise ConstraintTimeoutError(f"{where}: compiling the expression exceeded its time limit")
        cur = order[i]
        i += 1
        targets: list[set[int] | None] = [None] * 256
        for st in cur:
            for lo, hi, t in edges[st]:
                for b in range(lo, hi + 1):
                    tb = targets[b]
                    if tb is None:
                        targets[b] = {t}
                    else:
                        tb.add(t)
        row = [-1] * 256
        memo: dict[frozenset[int], int] = {}
        for b in range(256):
            tb = targets[b]
            if tb is None:
                continue
            key = frozenset(tb)
            sid = memo.get(key)
            if sid is None:
                c = closure(key)
                sid = index.get(c)
                if sid is None:
                    sid = index[c] = len(order)
                    order.append(c)
                memo[key] = sid
            row[b] = sid
        rows.append(row)
    trans = np.array(rows, dtype=np.int32).reshape(len(rows), 256)
    accept = np.array([final in s for s in order], dtype=bool)
    return trim(trans, accept)


def trim(trans: np.ndarray, accept: np.ndarray) -> DFA:
    """Drop states that cannot reach acceptance (and those unreachable from 0); renumber."""
    n = trans.shape[0]
    if n == 0:
        return DFA(np.zeros((0, 256), np.int32), np.zeros(0, bool))
    # reverse reachability to accepting states
    src, byt = np.nonzero(trans >= 0)
    dst = trans[src, byt].astype(np.int64)
    pairs = np.unique(src.astype(np.int64) * n + dst)
    ps, pd = pairs // n, pairs % n
    by_dst = np.argsort(pd, kind="stable")
    ps_sorted = ps[by_dst].tolist()
    starts = np.searchsorted(pd[by_dst], np.arange(n + 1)).tolist()
    live = accept.copy()
    stack = np.nonzero(accept)[0].tolist()
    while stack:
        x = stack.pop()
        for p in ps_sorted[starts[x] : starts[x + 1]]:
            if not live[p]:
                live[p] = True
                stack.append(p)
    if not live[0]:
        return DFA(np.zeros((0, 256), np.int32), np.zeros(0, bool))
    t = np.where(trans >= 0, trans, 0)
    t = np.where((trans >= 0) & live[t], trans, -1)
    # forward reachability from 0 through live states
    reach = np.zeros(n, bool)
    reach[0] = True
    frontier = [0]
    while frontier:
        nxt = np.unique(t[frontier])
        nxt = nxt[nxt >= 0]
        new = nxt[~reach[nxt]]
        reach[new] = True
        frontier = new.tolist()
    keep = np.nonzero(reach)[0]
    remap = np.full(n, -1, np.int32)
    remap[keep] = np.arange(len(keep), dtype=np.int32)
    sub = t[keep]
    out = np.where(sub >= 0, remap[np.where(sub >= 0, sub, 0)], -1).astype(np.int32)
    return DFA(np.ascontiguousarray(out), accept[keep].copy())


def literal_dfa(data: bytes) -> DFA:
    n = len(data) + 1
    trans = np.full((n, 256), -1, np.int32)
    for i, b in enumerate(data):
        trans[i, b] = i + 1
    accept = np.zeros(n, bool)
    accept[-1] = True
    return DFA(trans, accept)


def product(a: DFA, b: DFA, mode: str = "and", where: str = "expression") -> DFA:
    """Intersection (``"and"``) or difference (``"diff"``: in ``a``, not in ``b``) of two DFAs."""
    if a.empty():
        return a
    nb = b.size
    index: dict[tuple[int, int], int] = {(0, 0 if nb else -1): 0}
    order = [(0, 0 if nb else -1)]
    rows = []
    i = 0
    dead_b = np.full(256, -1, np.int32)
    while i < len(order):
        if len(order) > MAX_DFA_STATES:
            raise RegexError(f"{where}: the combined expression is too complex (over {MAX_DFA_STATES} DFA states)")
        s1, s2 = order[i]
        i += 1
        r1 = a.trans[s1]
        r2 = b.trans[s2] if s2 >= 0 else dead_b
        ok = r1 >= 0 if mode == "diff" else (r1 >= 0) & (r2 >= 0)
        row = np.full(256, -1, np.int32)
        keys = r1.astype(np.int64) * (nb + 1) + (r2 + 1)
        for k in np.unique(keys[ok]).tolist():
            pair = (k // (nb + 1), k % (nb + 1) - 1)
            sid = index.get(pair)
            if sid is None:
                sid = index[pair] = len(order)
                order.append(pair)
            row[keys == k] = sid
        row[~ok] = -1
        rows.append(row)
    trans = np.stack(rows).astype(np.int32)
    if mode == "diff":
        accept = np.array([bool(a.accept[x]) and not (y >= 0 and bool(b.accept[y])) for x, y in order])
    else:
        accept = np.array([bool(a.accept[x]) and bool(b.accept[y]) for x, y in order])
    return trim(trans, accept)


_CACHE: dict[bytes, DFA] = {}
_CACHE_LOCK = threading.Lock()


def compile_dfa(node: Node, *, where: str = "expression", deadline: float | None = None, key: bytes | None = None) -> DFA:
    """The trimmed byte DFA of ``node`` (memoized process-wide by ``key``, default
    :func:`regex.node_key` of the node)."""
    if key is None:
        key = node_key(node)
    got = _CACHE.get(key)
    if got is not None:
        return got
    if isinstance(node, And):
        dfa = product(compile_dfa(node.a, where=where, deadline=deadline), compile_dfa(node.b, where=where, deadline=deadline), "and", where)
    elif isinstance(node, Seq) and all(isinstance(x, Chars) and len(x.ranges) == 1 and x.ranges[0][0] == x.ranges[0][1] for x in node.items):
        dfa = literal_dfa("".join(chr(x.ranges[0][0]) for x in node.items).encode("utf-8"))  # type: ignore[attr-defined]
    else:
        nfa = _NFA(deadline, where)
        s, e = nfa.build(node)
        dfa = _determinize(nfa, s, e, where)
    with _CACHE_LOCK:
        if len(_CACHE) > 20000:
            _CACHE.clear()
        _CACHE[key] = dfa
    return dfa
