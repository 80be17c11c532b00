"""Counted repetition with a counter beside the automaton: ``X{m,n}`` without a DFA state per count.

A JSON string with ``maxLength: 100000`` is ``"`` + ``JSON_CHAR{0,100000}`` + ``"``: unrolled,
that is a hundred thousand copies of the character automaton. Here the terminal's DFA keeps a
copy (a *class*) only for the counts where the count matters to a mask, and two looping classes
for the long stretches where it does not; a counter in the matcher's position tracks the exact
count through them.

**Why this is exact.** Let ``L`` be the longest token of the vocabulary in bytes and ``K`` the
*clamp*, ``K > L``. One token completes at most ``L`` repetitions (every unit is at least one
byte). Counts ``c`` split into

* ``A = [0, m - K]``: from any such count, ``L`` more units can neither reach ``m`` (so the
  string cannot end within the token) nor ``n``: every count in ``A`` behaves the same for any
  token, so one class serves them all (it loops on itself);
* ``B = [m, n - K]`` (``[m, ∞)`` when unbounded): the string may end, and ``L`` more units
  cannot reach ``n``: one looping class;
* every other count (fewer than ``2K``), a class of its own.

Masks are computed from the DFA alone (the position's lexer state, cached as always): exact by
the above. Only *where a token leaves* a looping class depends on the count: the matcher counts
unit completions inside ``A`` / ``B`` (a transition into the class's *boundary* state, where a
unit starts) and, when the count reaches the class's exit, moves to the boundary of the first
explicit class after it (:class:`Counter`). The result is the automaton of ``X{m,n}`` exactly,
with ``O(K)`` states whatever ``n`` is.

Eligible terminals: ``prefix · U{m,n} · suffix`` where the prefix is literal text (so the
counted part starts at one known offset), ``U`` is *prefix-free* (no unit is a proper prefix of
another: its accepting states have no way out, as a character class or a JSON string character
has) and the suffix cannot start with a byte a unit starts with. Other repetitions are unrolled
as before (:func:`plugins.constraints.automata.compile_dfa`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from plugins.constraints.automata import DFA, compile_dfa
from plugins.constraints.regex import Chars, Node, Repeat, Seq, node_key

__all__ = ["Counter", "COUNT_MIN", "clamp_for", "counted_parts", "terminal_dfa"]

COUNT_MIN = 17
"""Repetitions whose largest count (or, unbounded, smallest) is at least this are built with a
counter; smaller ones are unrolled."""

NONE, REGION_A, REGION_B = 0, 1, 2


@dataclass(frozen=True)
class Counter:
    """What the matcher needs beside a counted terminal's DFA, per looping class ``r``
    (1: ``A``, 2: ``B``; index 0 unused):

    * ``region[q]``: the looping class DFA state ``q`` belongs to (0: none);
    * ``boundary[r]``: the class's state where a unit starts (entered on every completion);
    * ``entry[r]``: the count when the class is entered from outside (``A``: 0, ``B``: m);
    * ``exit[r]``: the count at which the class is left (None: never), for
      ``target[r]``, the boundary state of the explicit class of that count.
    """

    region: np.ndarray  # [states] int8
    boundary: tuple[int, int, int]
    entry: tuple[int, int, int]
    exit: tuple[int | None, int | None, int | None]
    target: tuple[int, int, int]
    clamp: int


def clamp_for(max_token_bytes: int) -> int:
    """The clamp ``K`` for a vocabulary whose longest token has ``max_token_bytes`` bytes: the
    next power of two above it (so vocabularies of similar sizes share compiled terminals)."""
    k = 8
    while k <= max_token_bytes:
        k *= 2
    return k


def counted_parts(node: Node) -> tuple[bytes, Node, int, int | None, Node] | None:
    """``(prefix bytes, unit, m, n, suffix)`` when ``node`` is ``literal · U{m,n} · rest`` with a
    repetition large enough to count (:data:`COUNT_MIN`), else None. (Prefix-freedom of the unit
    and the suffix's first bytes are checked when the DFA is built.)"""
    items = node.items if isinstance(node, Seq) else (node,)
    for i, it in enumerate(items):
        if isinstance(it, Repeat):
            big = it.max if it.max is not None else it.min
            if big < COUNT_MIN:
                return None
            pre = items[:i]
            if not all(isinstance(x, Chars) and len(x.ranges) == 1 and x.ranges[0][0] == x.ranges[0][1] for x in pre):
                return None
            prefix = "".join(chr(x.ranges[0][0]) for x in pre).encode("utf-8")  # type: ignore[union-attr]
            rest = items[i + 1 :]
            suffix: Node = Seq(tuple(rest)) if len(rest) != 1 else rest[0]
            return prefix, it.item, it.min, it.max, suffix
        if not (isinstance(it, Chars) and len(it.ranges) == 1 and it.ranges[0][0] == it.ranges[0][1]):
            return None
    return None


_CACHE: dict[bytes, tuple[bytes, DFA]] = {}
_LOCK = threading.Lock()


def terminal_dfa(node: Node, clamp: int | None, *, where: str = "expression", deadline: float | None = None,
                 key: bytes | None = None) -> tuple[bytes, DFA]:
    """``(key, DFA)`` of a terminal: counted (:class:`Counter` attached, key depending on the
    clamp) when eligible and ``clamp`` is given, else :func:`compile_dfa`'s."""
    base = node_key(node) if key is None else key
    if clamp is not None:
        ckey = base + b"#count" + clamp.to_bytes(4, "little")
        got = _CACHE.get(ckey)
        if got is not None:
            return got
        parts = counted_parts(node)
        dfa = None if parts is None else build_counted(*parts, clamp=clamp, where=where, deadline=deadline)
        if dfa is not None:
            with _LOCK:
                if len(_CACHE) > 4096:
                    _CACHE.clear()
                _CACHE[ckey] = (ckey, dfa)
            return ckey, dfa
    return base, compile_dfa(node, where=where, deadline=deadline, key=base)


def build_counted(prefix: bytes, unit: Node, lo: int, hi: int | None, suffix: Node, *, clamp: int,
                  where: str = "expression", deadline: float | None = None) -> DFA | None:
    """The DFA of ``prefix · unit{lo,hi} · suffix`` with a :class:`Counter` (None: not eligible —
    the unit is not prefix-free or matches the empty string, or the suffix can start like a unit)."""
    K = clamp
    U = compile_dfa(unit, where=where, deadline=deadline)
    S = compile_dfa(suffix, where=where, deadline=deadline)
    if U.empty() or S.empty() or U.accepts_empty():
        return None
    final = U.accept
    if (U.trans[final] >= 0).any():  # an accepting state with a way out: not prefix-free
        return None
    unit_first = U.trans[0] >= 0
    suffix_first = S.trans[0] >= 0
    if (unit_first & suffix_first).any():
        return None
    # the classes, in count order: ("A",), ("B",) or ("E", c)
    a_end = lo - K if lo >= K else None
    b_end: int | None
    if hi is None:
        b_end, has_b = None, True
    else:
        has_b = hi - K >= lo
        b_end = hi - K if has_b else None
    classes: list[tuple] = []
    if a_end is not None:
        classes.append(("A",))
    classes += [("E", c) for c in range(0 if a_end is None else a_end + 1, lo)]
    if has_b:
        classes.append(("B",))
        top = None if hi is None else hi
        classes += [("E", c) for c in range(b_end + 1, top + 1)] if top is not None else []  # type: ignore[operator]
    else:
        classes += [("E", c) for c in range(lo, hi + 1)]  # type: ignore[operator]
    index = {cls: i for i, cls in enumerate(classes)}

    def class_of(c: int) -> int | None:
        if hi is not None and c > hi:
            return None
        if a_end is not None and c <= a_end:
            return index[("A",)]
        if has_b and c >= lo and (b_end is None or c <= b_end):
            return index[("B",)]
        return index[("E", c)]

    internal = np.flatnonzero(~final)  # U's states that are not accepting (a unit in progress)
    m = 1 + len(internal)  # per class: the boundary (a copy of U's start with no way in) + those
    local = np.full(U.size, -1, np.int64)
    local[internal] = 1 + np.arange(len(internal))
    NEXT = -2
    # template rows of one class: local targets, NEXT where a unit completes, -1 where dead
    rows_u = np.concatenate([U.trans[:1], U.trans[internal]])  # [m, 256]: the boundary acts as U's start
    tmpl = np.where(rows_u < 0, -1, np.where(final[np.maximum(rows_u, 0)], NEXT, local[np.maximum(rows_u, 0)]))
    p = len(prefix)
    base = [p + i * m for i in range(len(classes))]
    post = p + len(classes) * m
    n_states = post + S.size
    trans = np.full((n_states, 256), -1, np.int32)
    accept = np.zeros(n_states, bool)
    region = np.zeros(n_states, np.int8)
    s_rows = np.where(S.trans >= 0, S.trans + post, -1)
    trans[post:] = s_rows
    accept[post:] = S.accept
    for k, cls in enumerate(classes):
        b0 = base[k]
        if cls[0] == "E":
            c = cls[1]
            nxt = class_of(c + 1)
            closable = c >= lo
            full = hi is not None and c >= hi
        else:
            nxt = k  # the looping classes: the counter decides when they are left
            closable = cls[0] == "B"
            full = False
            region[b0 : b0 + m] = REGION_A if cls[0] == "A" else REGION_B
        block = np.where(tmpl >= 0, tmpl + b0, -1)
        if nxt is None:
            block = np.where(tmpl == NEXT, -1, block)
        else:
            block = np.where(tmpl == NEXT, base[nxt], block)
        if full:  # no room for another unit: only the suffix may follow, and nothing is in progress
            block[:] = -1
        if closable:
            block[0] = np.where(suffix_first, s_rows[0], block[0])
            accept[b0] = bool(S.accept[0])
        trans[b0 : b0 + m] = block
    for i, byte in enumerate(prefix):  # the literal prefix: a chain into the first class
        trans[i, byte] = i + 1 if i + 1 < p else base[0]
    if p == 0 and base[0] != 0:  # pragma: no cover - the first class's boundary is state 0
        raise AssertionError("counted DFA must start at state 0")
    ia, ib = index.get(("A",)), index.get(("B",))
    counter = Counter(
        region=region,
        boundary=(-1, base[ia] if ia is not None else -1, base[ib] if ib is not None else -1),
        entry=(0, 0, lo),
        exit=(None, None if a_end is None else a_end + 1, None if b_end is None else b_end + 1),
        target=(-1, base[class_of(a_end + 1)] if a_end is not None else -1,  # type: ignore[index]
                base[class_of(b_end + 1)] if b_end is not None else -1),  # type: ignore[index]
        clamp=K,
    )
    return DFA(trans, accept, counter)
