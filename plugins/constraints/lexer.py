"""Lexer states and the token tables that make masks cheap.

**Lexer states.** Every terminal DFA gets a process-wide id. A *lexer state* is the set of
``(terminal, DFA state)`` pairs still alive in the current lexeme — the subset construction of
"any of the terminals the parser allows here", built lazily and shared by every grammar and
tokenizer in the process (a JSON string is the same automaton in every schema). State 0 is dead.

**Token tables.** For one tokenizer, :class:`Vocab` holds every token's bytes in a
``[V, 32]`` uint8 matrix. :meth:`Vocab.level` runs a lexer state's DFA over all tokens at once
(numpy, one column per step) and sorts them into

* tokens that stay inside the current lexeme — allowed whatever the parser says (the
  *context-independent* part, XGrammar's term), kept as one Python int bitset;
* tokens whose lexeme ends inside them (the next byte cannot continue it) — grouped by the
  lexer state where it ended into :class:`Branch` es, with the offset of their remainder.

A branch is continued from the lexer state that the parser allows after the finished lexeme
(:meth:`Branch.level`), which again yields a bitset and sub-branches. Every level is cached by
lexer state, so at run time a mask is a few dictionary hits, parser steps at lexeme ends, and
big-int ORs.
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from typing import Any

import numpy as np

from plugins.constraints.automata import DFA

__all__ = ["LexerStates", "LEXER", "Vocab", "Level", "Branch", "FirstByteBranch", "vocab_for", "LMAX"]

LMAX = 32  # bytes per token held in the matrix; longer tokens take a scalar path
PREFILTER_MIN = 64  # branches of at least this many tokens drop those dead at their next byte
NARROW = 32  # a combined state's component alive on at most this many bytes is "narrow"
SMALL_SET = 24  # bitsets of at most this many ids are built with Python int ORs
SMALL_CLASSIFY = 12  # classifications of at most this many tokens run in plain Python
NP = 10  # states of UTF8_TEXT (native.py's DK_NP)


def _utf8_text() -> np.ndarray:
    """``UTF8_TEXT[p, b]``: the automaton of *plain JSON-string text* — valid UTF-8 without
    control characters, ``"``, ``\\`` or U+2028/U+2029 (which regex ``.`` excludes) — as 10
    states (0 between characters, 1–3 continuation bytes still due, 4–7 the restricted second
    bytes after E0, ED, F0, F4, 8–9 after E2 and E2 80); -1 = not text.
    Trie nodes record where their subtrees stay text, and each lexer state how long a text
    string must be to kill it (``LexerStates.dd``): a subtree shorter than that is alive whole,
    without a walk — what makes a counted string (``maxLength``) or an unanchored pattern cheap."""
    P = np.full((NP, 256), -1, np.int32)
    for b in range(0x20, 0x7F):
        if b not in (0x22, 0x5C):
            P[0, b] = 0
    P[0, 0xC2:0xE0] = 1
    P[0, 0xE0], P[0, 0xE1:0xED], P[0, 0xED], P[0, 0xEE:0xF0] = 4, 2, 5, 2
    P[0, 0xE2] = 8
    P[0, 0xF0], P[0, 0xF1:0xF4], P[0, 0xF4] = 6, 3, 7
    P[1, 0x80:0xC0], P[2, 0x80:0xC0], P[3, 0x80:0xC0] = 0, 1, 2
    P[4, 0xA0:0xC0], P[5, 0x80:0xA0], P[6, 0x90:0xC0], P[7, 0x80:0x90] = 1, 1, 2, 2
    P[8, 0x80], P[8, 0x81:0xC0] = 9, 1
    P[9, 0x80:0xC0] = 0
    P[9, 0xA8:0xAA] = -1
    return P


UTF8_TEXT = _utf8_text()


class LexerStates:
    """Process-wide registry of terminal DFAs and combined lexer states."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.dfas: list[DFA] = []
        self.tid_by_key: dict[bytes, int] = {}  # terminal ids by regex.node_key of their syntax tree
        self.states: list[tuple[tuple[int, int], ...]] = [()]
        self.index: dict[tuple[tuple[int, int], ...], int] = {(): 0}
        cap = 1 << 16  # zeroed lazily by the OS: pages are paid for as rows are written
        self.table = np.zeros((cap, 256), np.int32)
        self.has_row = np.zeros(cap, bool)
        self.has_row[0] = True
        self.acc_any = np.zeros(cap, bool)
        # loops[sid]: the bytes on which state sid stays in sid (256 bits as 4 uint64 words)
        self.loops = np.zeros((cap, 4), np.uint64)
        self.has_loop = np.zeros(cap, np.uint8)
        # dd[sid, p]: text strings (UTF8_TEXT from state p) shorter than this never kill sid;
        # set with the row (0 = no bound known)
        self.dd = np.zeros((cap, NP), np.uint8)
        self.term_dd: dict[int, np.ndarray] = {}
        self.sparse: dict[tuple[int, int], tuple[tuple[int, int], ...] | None] = {}
        self.dfa_ids: dict[int, np.ndarray] = {}
        self.rows: list[tuple[int, ...] | None] = [(0,) * 256]
        self.accepts: list[tuple[int, ...]] = [()]
        self.starts: dict[frozenset[int], int] = {}
        self.counters: dict[int, Any] = {}  # terminal id -> counted.Counter (counted repetitions)
        self._mids: dict[int, tuple[tuple[int, int, int], ...]] = {}
        self._ptrs: tuple[int, tuple[int, int, int, int, int]] | None = None

    def terminal(self, key: bytes, dfa: DFA) -> int:
        """The process-wide id of the terminal whose syntax tree has ``regex.node_key`` ``key``."""
        with self.lock:
            tid = self.tid_by_key.get(key)
            if tid is None:
                tid = self.tid_by_key[key] = len(self.dfas)
                self.dfas.append(dfa)
                if getattr(dfa, "counter", None) is not None:
                    self.counters[tid] = dfa.counter
            return tid

    def mids(self, sid: int) -> tuple[tuple[int, int, int], ...]:
        """``(component index, terminal, class)`` of each component of state ``sid`` that is in a
        looping class of a counted terminal (:mod:`plugins.constraints.counted`), cached."""
        got = self._mids.get(sid)
        if got is None:
            out = []
            for i, (t, q) in enumerate(self.states[sid]):
                c = self.counters.get(t)
                if c is not None and c.region[q]:
                    out.append((i, t, int(c.region[q])))
            got = self._mids[sid] = tuple(out)
        return got

    def _grow(self, need: int) -> None:
        """Make room for state ids below ``need`` (call with :attr:`lock` held)."""
        cap = self.table.shape[0]
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        n = len(self.states)

        def grown(a: np.ndarray) -> np.ndarray:
            out = np.zeros((cap,) + a.shape[1:], a.dtype)
            out[:n] = a[:n]
            return out

        self.table, self.has_row, self.acc_any = grown(self.table), grown(self.has_row), grown(self.acc_any)
        self.loops, self.has_loop, self.dd = grown(self.loops), grown(self.has_loop), grown(self.dd)
        self._ptrs = None

    def terminal_states(self, t: int) -> np.ndarray:
        """The ids of the single-terminal states ``((t, q),)`` for every state ``q`` of
        terminal ``t``'s DFA, interned in bulk (cached)."""
        got = self.dfa_ids.get(t)
        if got is not None:
            return got
        with self.lock:
            dfa = self.dfas[t]
            keys = [((t, q),) for q in range(dfa.size)]
            ids = [self.index.get(k, -1) for k in keys]
            new = [q for q, i in enumerate(ids) if i < 0]
            if new:
                base = len(self.states)
                self._grow(base + len(new))
                acc = dfa.accept[new]
                self.states.extend(keys[q] for q in new)
                self.accepts.extend((t,) if a else () for a in acc.tolist())
                self.rows.extend([None] * len(new))
                self.acc_any[base : base + len(new)] = acc
                for j, q in enumerate(new):  # published last: readers look ids up without the lock
                    ids[q] = self.index[keys[q]] = base + j
            got = self.dfa_ids[t] = np.asarray(ids, np.int32)
            return got

    def intern(self, comps: tuple[tuple[int, int], ...]) -> int:
        sid = self.index.get(comps)
        if sid is not None:
            return sid
        with self.lock:
            sid = self.index.get(comps)
            if sid is not None:
                return sid
            sid = len(self.states)
            self._grow(sid + 1)
            self.states.append(comps)
            self.rows.append(None)
            accepts = tuple(t for t, s in comps if self.dfas[t].accept[s])
            self.accepts.append(accepts)
            self.acc_any[sid] = bool(accepts)
            self.index[comps] = sid
            return sid

    def start(self, tids: frozenset[int]) -> int:
        sid = self.starts.get(tids)
        if sid is None:
            sid = self.starts[tids] = self.intern(tuple((t, 0) for t in sorted(tids)))
        return sid

    def row(self, sid: int) -> tuple[int, ...]:
        r = self.rows[sid]
        if r is None:
            if not self.has_row[sid]:
                self._build_row(sid)
            # the tuple view of the table row (a tuple of ints: untracked by the cyclic GC)
            r = self.rows[sid] = tuple(self.table[sid].tolist())
        return r

    def table_row(self, sid: int) -> np.ndarray:
        """State ``sid``'s row of :attr:`table` (built if missing), without the tuple view
        that :meth:`row` makes for Python-side stepping."""
        if not self.has_row[sid]:
            self._build_row(sid)
        return self.table[sid]

    def ensure_rows(self, sids: np.ndarray) -> None:
        missing = sids[~self.has_row[sids]]
        if missing.size:
            for sid in np.unique(missing).tolist():
                self._build_row(sid)

    def pointers(self) -> tuple[int, int, int, int, int, int]:
        """Data addresses of ``table``, ``has_row``, ``acc_any``, ``loops``, ``has_loop``, ``dd``
        for the compiled walks (cached until the arrays grow). Call with :attr:`lock` held."""
        key = id(self.table)
        got = self._ptrs
        if got is None or got[0] != key:
            got = self._ptrs = (key, (self.table.ctypes.data, self.has_row.ctypes.data, self.acc_any.ctypes.data,
                                      self.loops.ctypes.data, self.has_loop.ctypes.data, self.dd.ctypes.data))
        return got[1]

    def terminal_dd(self, t: int) -> np.ndarray:
        """``[dfa.size, NP]`` uint8: per DFA state of terminal ``t`` and UTF-8 text state, the
        length of the shortest text string that kills it (capped at 255); zeros (no bound)
        without the compiled helper, whose walk is the only reader."""
        got = self.term_dd.get(t)
        if got is None:
            got = self.term_dd[t] = _death_distances(self.dfas[t])
        return got

    def close_rows(self, sids: list[int], limit: int = 64) -> None:
        """Build the rows of ``sids`` and of the states they reach (at most ``limit`` new rows
        of combined states; a single-terminal state brings its whole DFA, in one pass), so
        that a walk that found these rows missing does not stop at the next ones. ``limit=0``:
        only ``sids`` (and their DFAs)."""
        stack = list(sids)
        built = 0
        while stack and (built < limit or not limit):
            sid = stack.pop()
            if self.has_row[sid]:
                continue
            comps = self.states[sid]
            if len(comps) == 1:  # one terminal: every state of its DFA at once
                built += self._build_dfa_rows(comps[0][0])
                continue
            self._build_row(sid)
            built += 1
            if limit:
                for n in set(self.table[sid].tolist()):
                    if n and not self.has_row[n]:
                        stack.append(n)

    def _build_dfa_rows(self, t: int) -> int:
        """The rows of every single-terminal state ``((t, q),)`` of terminal ``t``'s DFA, in
        one vectorized pass (their list views are made on demand by :meth:`row`)."""
        with self.lock:
            dfa = self.dfas[t]
            ids = self.terminal_states(t)
            todo = ~self.has_row[ids]
            if not todo.any():
                return 0
            rows = np.where(dfa.trans >= 0, ids[np.maximum(dfa.trans, 0)], 0).astype(np.int32)
            sel = ids[todo]
            rows = rows[todo]
            self.table[sel] = rows
            self.loops[sel] = np.packbits(rows == sel[:, None], axis=1, bitorder="little").view(np.uint64)
            self.has_loop[sel] = (rows == sel[:, None]).any(axis=1)
            if (rows != 0).sum(axis=1).max() > NARROW:  # distances matter only where walks are long
                self.dd[sel] = self.terminal_dd(t)[todo]
            self.has_row[sel] = True
            return int(todo.sum())

    def _sparse(self, t: int, q: int) -> tuple[tuple[int, int], ...] | None:
        """The live transitions ``(byte, next)`` of DFA state ``q`` of terminal ``t`` when
        there are at most :data:`NARROW` of them (a *narrow* state), else None (cached)."""
        key = (t, q)
        got = self.sparse.get(key, False)
        if got is False:
            tr = self.dfas[t].trans[q]
            live = np.flatnonzero(tr >= 0)
            got = self.sparse[key] = tuple(zip(live.tolist(), tr[live].tolist())) if len(live) <= NARROW else None
        return got

    def _build_row(self, sid: int) -> None:
        with self.lock:
            if self.has_row[sid]:
                return
            comps = self.states[sid]
            dd = None
            if len(comps) == 1:
                t, q = comps[0]
                vals, inv = np.unique(self.dfas[t].trans[q], return_inverse=True)
                ids = [0 if v < 0 else self.intern(((t, int(v)),)) for v in vals.tolist()]
                row = np.asarray(ids, np.int32)[inv.reshape(-1)]
                dd = self.terminal_dd(t)[q]
            else:
                sparse = [self._sparse(t, q) for t, q in comps]
                wide = [i for i, x in enumerate(sparse) if x is None]
                if len(wide) <= 1:
                    row = self._combined_row(comps, sparse, wide[0] if wide else -1)
                else:
                    row = self._general_row(comps)
                # the combined state dies only when all its components have: any component's
                # bound holds (the wide ones' are those worth having, when already known)
                known = [self.term_dd[comps[i][0]][comps[i][1]] for i in wide if comps[i][0] in self.term_dd]
                if known:
                    dd = known[0] if len(known) == 1 else np.max(known, axis=0)
            self.table[sid] = row
            if dd is not None:
                self.dd[sid] = dd
            same = self.table[sid] == sid
            if same.any():
                self.loops[sid] = np.packbits(same, bitorder="little").view(np.uint64)
                self.has_loop[sid] = True
            self.has_row[sid] = True  # the tuple view in self.rows is made on demand (row())

    def _general_row(self, comps: tuple[tuple[int, int], ...]) -> np.ndarray:
        """The row of a combined state by distinct columns (next component states per byte):
        sort, then cut at changes."""
        mat = np.stack([self.dfas[t].trans[s] for t, s in comps])  # [k, 256]
        order = np.lexsort(mat[::-1])
        sc = mat.T[order]
        new = np.ones(256, bool)
        new[1:] = (sc[1:] != sc[:-1]).any(axis=1)
        inv = np.empty(256, np.int64)
        inv[order] = np.cumsum(new) - 1
        cols = sc[new]
        ids = []
        for col in cols.tolist():
            nxt = tuple((t, v) for (t, _), v in zip(comps, col) if v >= 0)
            ids.append(self.intern(nxt))
        return np.asarray(ids, np.int32)[inv.reshape(-1)]

    def _combined_row(self, comps: tuple[tuple[int, int], ...], sparse: list, w: int) -> np.ndarray:
        """The row of a combined state where at most one component (``w``; -1: none) is
        *wide* (alive on more than :data:`NARROW` bytes) — say a JSON string next to key
        literals: the wide component's row gives every byte the narrow ones leave alone, and
        only the few bytes a narrow component continues on need a combined state."""
        if w >= 0:
            # the wide component alone is a single-terminal state: its row is the default
            ws = self.intern((comps[w],))
            if not self.has_row[ws]:
                self._build_dfa_rows(comps[w][0])
            row = self.table[ws].copy()
            wt, wq = comps[w]
            wtrans = self.dfas[wt].trans[wq]
        else:
            row = np.zeros(256, np.int32)
        groups: dict[int, list[tuple[int, tuple[int, int]]]] = {}
        for i, sp in enumerate(sparse):
            if i != w:
                t = comps[i][0]
                for b, v in sp:
                    groups.setdefault(b, []).append((i, (t, v)))
        for b, items in groups.items():
            if w >= 0 and wtrans[b] >= 0:
                items.append((w, (wt, int(wtrans[b]))))
                items.sort()
            row[b] = self.intern(tuple(c for _, c in items))
        return row


def _death_distances(dfa: DFA) -> np.ndarray:
    """:meth:`LexerStates.terminal_dd` of ``dfa`` (a reverse BFS in ``native.dk_dd`` over the
    byte classes that both automata agree on)."""
    from plugins.constraints.native import ptr, trie_walker

    nq = dfa.size
    out = np.zeros((nq, NP), np.uint8)
    walk = trie_walker()
    if walk is None or nq == 0:
        return out
    cols = np.ascontiguousarray(np.concatenate([dfa.trans, UTF8_TEXT], axis=0).T)  # [256, nq + NP]
    _, first, inv = np.unique(cols.view(np.dtype((np.void, cols.shape[1] * 4))).reshape(-1), return_index=True,
                              return_inverse=True)
    reps = cols[first]  # [nc, nq + NP]: one column per byte class
    T = np.ascontiguousarray(reps[:, :nq].T, np.int32)
    P = np.ascontiguousarray(reps[:, nq:].T, np.int32)
    nc, n = len(first), nq * NP
    cnt, adj, queue = np.zeros(n + 1, np.int32), np.zeros(n * nc, np.int32), np.zeros(n, np.int32)
    walk.dd(nq, nc, ptr(T), NP, ptr(P), ptr(out), ptr(cnt), ptr(adj), ptr(queue))
    return out


LEXER = LexerStates()


class Branch:
    """Tokens whose current lexeme ended in lexer state ``X`` at byte offsets ``offs``."""

    __slots__ = ("X", "ids", "offs", "cache", "_nb", "_fb")

    def __init__(self, X: int, ids: np.ndarray, offs: np.ndarray):
        self.X, self.ids, self.offs = X, ids, offs
        self.cache: dict[int, Level] = {}
        self._nb: np.ndarray | None = None
        self._fb: np.ndarray | None = None

    def level(self, vocab: "Vocab", start: int) -> "Level":
        lv = self.cache.get(start)
        if lv is None:
            ids, offs = self.ids, self.offs
            if len(ids) >= PREFILTER_MIN and not LEXER.acc_any[start]:
                # a token whose next byte kills the (non-accepting) start state is dead, so
                # only the others need walking: usually a small part of a big branch
                row = np.ones(257, np.int32)  # entry 256: the token has no byte left (alive)
                row[:256] = LEXER.table_row(start)
                live = row[self.next_bytes(vocab)] != 0
                ids, offs = ids[live], offs[live]
            lv = self.cache[start] = vocab.classify(start, ids, offs)
        return lv

    def next_bytes(self, vocab: "Vocab") -> np.ndarray:
        """The byte of each token at its offset (where the lexeme ended before it); 256 where
        the token has no byte left."""
        nb = self._nb
        if nb is None:
            ids, offs = self.ids, self.offs
            short = offs < np.minimum(vocab.lens[ids], LMAX)
            nb = np.full(len(ids), 256, np.int64)
            nb[short] = vocab.mat[ids[short], offs[short]]
            for k in np.nonzero(~short & (offs < vocab.lens[ids]))[0].tolist():
                data = vocab.table[int(ids[k])]
                o = int(offs[k])
                nb[k] = data[o]
            self._nb = nb
        return nb

    def first_bytes(self, vocab: "Vocab") -> np.ndarray:
        """The tokens' first bytes as uint8 (cached: branches are restricted repeatedly)."""
        first = self._fb
        if first is None:
            first = self._fb = vocab.first_byte[self.ids].astype(np.uint8)
        return first

    def restrict(self, vocab: "Vocab", fb: np.ndarray) -> "Branch | None":
        """The tokens whose first byte is in ``fb`` (None: none of them)."""
        sel = fb[self.first_bytes(vocab)]
        n = int(np.count_nonzero(sel))
        if n == 0:
            return None
        if n == len(sel):
            return self
        if 2 * n >= len(sel):
            # most of the tokens: levels come from this branch's (cached, shared by every such
            # restriction) rather than from classifying the subset again for each new start
            return RestrictedBranch(self, fb, sel)
        return Branch(self.X, self.ids[sel], self.offs[sel])


class RestrictedBranch(Branch):
    """The tokens of branch ``parent`` whose first byte is in ``fb`` (``sel``: which of the
    parent's). Its level from a start state is the parent's level restricted to those first
    bytes — a token's first byte is where it starts, whatever its offset — so one
    classification of the parent serves all its restrictions."""

    __slots__ = ("parent", "fb", "sel", "_ids", "_offs")

    def __init__(self, parent: Branch, fb: np.ndarray, sel: np.ndarray):
        self.parent, self.fb, self.sel = parent, fb, sel
        self.X = parent.X
        self.cache = {}
        self._nb = None
        self._fb = None
        self._ids: np.ndarray | None = None
        self._offs: np.ndarray | None = None

    @property
    def ids(self) -> np.ndarray:  # type: ignore[override]
        if self._ids is None:
            self._ids = self.parent.ids[self.sel]
        return self._ids

    @property
    def offs(self) -> np.ndarray:  # type: ignore[override]
        if self._offs is None:
            self._offs = self.parent.offs[self.sel]
        return self._offs

    def level(self, vocab: "Vocab", start: int) -> "Level":
        lv = self.cache.get(start)
        if lv is None:
            lv = self.cache[start] = vocab.restrict(self.parent.level(vocab, start), self.fb)
        return lv

    def restrict(self, vocab: "Vocab", fb: np.ndarray) -> "Branch | None":
        both = self.fb & fb
        sel = both[self.parent.first_bytes(vocab)]
        n = int(np.count_nonzero(sel))
        if n == 0:
            return None
        if n == len(self.ids):
            return self
        return RestrictedBranch(self.parent, both, sel)


class FirstByteBranch(Branch):
    """All usable tokens whose first byte is in ``fb`` (bool[256]), ending the lexeme in ``X``
    before their first byte: their continuation from a lexer state is that state's own level,
    restricted to those first bytes — no new classification."""

    __slots__ = ("fb",)

    def __init__(self, X: int, fb: np.ndarray):
        self.X, self.fb = X, fb
        self.cache = {}

    def level(self, vocab: "Vocab", start: int) -> "Level":
        lv = self.cache.get(start)
        if lv is None:
            lv = self.cache[start] = vocab.restrict(vocab.level(start), self.fb)
        return lv

    def restrict(self, vocab: "Vocab", fb: np.ndarray) -> "Branch | None":
        both = self.fb & fb
        if not both.any():
            return None
        return FirstByteBranch(self.X, both)


class Level:
    """``mask``: tokens (bitset) fully consumed with the lexer alive; ``branches``: the rest."""

    __slots__ = ("mask", "branches")

    def __init__(self, mask: int, branches: list[Branch]):
        self.mask, self.branches = mask, branches


class Vocab:
    """Token byte strings of one tokenizer, in the layout the mask computation needs."""

    def __init__(self, tokenizer: Any):
        table: list[bytes] = list(tokenizer.token_byte_table())
        self.size = V = int(tokenizer.vocab_size)
        table = (table + [b""] * V)[:V]
        self.table = table
        self.words = (V + 31) // 32
        self.eos_ids = tuple(sorted(i for i in getattr(tokenizer, "eos_token_ids", ()) or () if 0 <= i < V))
        self.eos_mask = 0
        for i in self.eos_ids:
            self.eos_mask |= 1 << i
        lens = np.fromiter((len(b) for b in table), np.int64, V)
        special = frozenset(getattr(tokenizer, "special_ids", ()) or ())
        usable = lens > 0
        for i in special:
            if 0 <= i < V:
                usable[i] = False
        self.lens = lens
        self.mat = np.frombuffer(b"".join(b[:LMAX].ljust(LMAX, b"\0") for b in table), np.uint8).reshape(V, LMAX)
        self.usable_ids = np.nonzero(usable)[0]
        h = hashlib.sha256()
        for b in table:
            h.update(len(b).to_bytes(2, "little"))
            h.update(b)
        h.update(repr(self.eos_ids).encode())
        self.hash = h.hexdigest()[:32]
        self.levels: dict[int, Level] = {}
        self._trie: TokenTrie | None = None
        # every token's bytes back to back, for the compiled classification
        self._flat = (np.frombuffer(b"".join(table) or b"\0", np.uint8).copy(), np.ascontiguousarray(np.cumsum(lens) - lens),
                      np.ascontiguousarray(lens))
        self._cbuf: tuple | None = None  # its reused output buffers and their addresses
        self._clock = threading.Lock()
        self._fb_cache: dict[bytes, int] = {}
        first = np.where(lens > 0, self.mat[:, 0], 0).astype(np.int64)
        self.first_byte = first
        ufirst = first[self.usable_ids]
        order = np.argsort(ufirst, kind="stable")
        self._by_first = self.usable_ids[order]
        self._first_cuts = np.searchsorted(ufirst[order], np.arange(257))
        self.fb_count = np.diff(self._first_cuts)
        self.fb_masks = [self.ids_to_int(self._by_first[self._first_cuts[b] : self._first_cuts[b + 1]]) for b in range(256)]
        self.usable_mask = self.ids_to_int(self.usable_ids)

    def tokens_with_first(self, fb: np.ndarray) -> np.ndarray:
        """Usable token ids whose first byte ``b`` has ``fb[b]`` set."""
        parts = [self._by_first[self._first_cuts[b] : self._first_cuts[b + 1]] for b in np.nonzero(fb)[0].tolist()]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def fb_mask(self, fb: np.ndarray) -> int:
        key = fb.tobytes()
        m = self._fb_cache.get(key)
        if m is None:
            on = np.flatnonzero(fb).tolist()
            if len(on) <= 128:
                m = 0
                for b in on:
                    m |= self.fb_masks[b]
            else:  # most bytes: every usable token but those starting with the others
                off = 0
                for b in np.flatnonzero(~fb).tolist():
                    off |= self.fb_masks[b]
                m = self.usable_mask ^ off
            if len(self._fb_cache) > 4096:
                self._fb_cache.clear()
            self._fb_cache[key] = m
        return m

    def restrict(self, lv: "Level", fb: np.ndarray) -> "Level":
        """``lv`` limited to tokens whose first byte is in ``fb``."""
        branches = [r for r in (br.restrict(self, fb) for br in lv.branches) if r is not None]
        return Level(lv.mask & self.fb_mask(fb), branches)

    def ids_to_int(self, ids: np.ndarray) -> int:
        """The bitset (bit ``i`` = token ``i``) of ``ids``, built over their span only."""
        if ids.size == 0:
            return 0
        if ids.size <= SMALL_SET:  # cheaper than a span-wide bit array for a few ids
            m = 0
            for i in ids.tolist():
                m |= 1 << i
            return m
        lo = int(ids.min()) & ~7
        bits = np.zeros(int(ids.max()) + 1 - lo, np.uint8)
        bits[ids - lo] = 1
        return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little") << lo

    def level(self, sid: int) -> Level:
        """The classification of every usable token from lexer state ``sid`` (cached)."""
        lv = self.levels.get(sid)
        if lv is None:
            lv = self.levels[sid] = self._level(sid)
        return lv

    def _level(self, sid: int) -> Level:
        lex = LEXER
        row = lex.table_row(sid)
        viable = row != 0
        branches: list[Branch] = []
        if lex.accepts[sid] and (~viable).any():
            # tokens whose first byte cannot continue the lexeme: it ends before them
            branches.append(FirstByteBranch(sid, ~viable))
        comps = lex.states[sid]
        total = int(self.fb_count[viable].sum())
        if len(comps) > 1 and total > 2000:
            # Decompose: most tokens are decided by one component (say a JSON string next to a
            # few key literals); only tokens starting with a byte another component accepts
            # need simulating here. The dominant component's level is shared process-wide.
            fbs = [lex.dfas[t].trans[q] >= 0 for t, q in comps]
            counts = [int(self.fb_count[f].sum()) for f in fbs]
            k = int(np.argmax(counts))
            others = np.zeros(256, bool)
            for i, f in enumerate(fbs):
                if i != k:
                    others |= f
            rest = viable & ~others
            if self.fb_count[others].sum() < 0.25 * total and rest.any():
                dom = lex.intern((comps[k],))
                base = self.restrict(self.level(dom), rest)
                fb = viable & others
                if self.fb_count[fb].sum() >= TRIE_MIN_EXTRA:
                    extra = self.trie.classify(self, sid, fb)
                else:
                    ids = self.tokens_with_first(fb)
                    extra = self.classify(sid, ids, np.zeros(len(ids), np.int64))
                return Level(base.mask | extra.mask, branches + base.branches + extra.branches)
        if total >= TRIE_MIN_TOKENS:
            lv = self.trie.classify(self, sid, viable)
        else:
            ids = self.tokens_with_first(viable)
            lv = self.classify(sid, ids, np.zeros(len(ids), np.int64))
        return Level(lv.mask, branches + lv.branches)

    @property
    def trie(self) -> "TokenTrie":
        """The byte trie of the usable tokens (built on first use)."""
        t = self._trie
        if t is None:
            with _VLOCK:
                if self._trie is None:
                    self._trie = TokenTrie(self.table, self.usable_ids)
                t = self._trie
        return t

    def classify(self, start: int, ids: np.ndarray, offs: np.ndarray) -> Level:
        """Run lexer state ``start`` over ``table[ids[i]][offs[i]:]`` for all i at once (compiled
        loop from :mod:`plugins.constraints.native` when available, else numpy)."""
        from plugins.constraints.native import classifier

        if len(ids) <= SMALL_CLASSIFY:
            return self.classify_small(start, ids, offs)
        fn = classifier()
        if fn is not None:
            return self._classify_native(fn, start, ids, offs)
        return self.classify_numpy(start, ids, offs)

    def classify_small(self, start: int, ids: np.ndarray, offs: np.ndarray) -> Level:
        """:meth:`classify` token by token in Python: for a few tokens, cheaper than any call
        into numpy or C."""
        lex = LEXER
        rows, accepts, table = lex.rows, lex.accepts, self.table
        mask = 0
        stuck: dict[int, tuple[list[int], list[int]]] = {}
        for t, p in zip(ids.tolist(), offs.tolist()):
            data = table[t]
            s = start
            end = len(data)
            while p < end:
                row = rows[s]
                if row is None:
                    row = lex.row(s)
                n = row[data[p]]
                if n == 0:
                    break
                s, p = n, p + 1
            if p == end:
                mask |= 1 << t
            elif accepts[s]:
                got = stuck.get(s)
                if got is None:
                    got = stuck[s] = ([], [])
                got[0].append(t)
                got[1].append(p)
        branches = [Branch(x, np.asarray(stuck[x][0], np.int64), np.asarray(stuck[x][1], np.int64)) for x in sorted(stuck)]
        return Level(mask, branches)

    def _classify_native(self, fn: Any, start: int, ids: np.ndarray, offs: np.ndarray) -> Level:
        from plugins.constraints.native import ptr

        lex = LEXER
        lex.table_row(start)
        ids = np.ascontiguousarray(ids, np.int64)
        offs = np.ascontiguousarray(offs, np.int64)
        n = len(ids)
        p_ids, p_offs = ids.__array_interface__["data"][0], offs.__array_interface__["data"][0]
        with self._clock:
            if self._cbuf is None or len(self._cbuf[0]) < n:
                m = max(n, 1024)
                bufs = (np.empty(m, np.uint8), np.empty(m, np.int32), np.empty(m, np.int32), np.empty(256, np.int32))
                data, tok_off, tok_len = self._flat
                self._cbuf = bufs + (tuple(ptr(a) for a in (data, tok_off, tok_len) + bufs),)
            status, sx, sp, missing, pt = self._cbuf
            resume = 0
            while True:
                with lex.lock:
                    t_p, h_p, a_p = lex.pointers()[:3]
                    nm = fn(t_p, h_p, a_p, start, pt[0], pt[1], pt[2], p_ids, p_offs, n, pt[3], pt[4], pt[5], pt[6], 256,
                            resume)
                if nm == 0:
                    break
                # build the rows the walk stopped at; the next pass resumes those tokens there
                lex.close_rows(missing[:nm].tolist(), limit=0)
                resume = 1
            status, sx, sp = status[:n].copy(), sx[:n].copy(), sp[:n].copy()
        mask = self.ids_to_int(ids[status == 1])
        branches: list[Branch] = []
        stuck = np.nonzero(status == 2)[0]
        if stuck.size:
            x = sx[stuck]
            order = np.argsort(x, kind="stable")
            stuck, x = stuck[order], x[order]
            cuts = np.nonzero(np.diff(x))[0] + 1
            bounds = [0] + cuts.tolist() + [len(x)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                sel = stuck[a:b]
                branches.append(Branch(int(x[a]), ids[sel], sp[sel].astype(np.int64)))
        return Level(mask, branches)

    def classify_numpy(self, start: int, ids: np.ndarray, offs: np.ndarray) -> Level:
        """:meth:`classify` with numpy: all tokens advance one byte per iteration."""
        lex = LEXER
        lens = self.lens[ids]
        longm = lens > LMAX
        alive: list[np.ndarray] = []
        stuck_x: list[np.ndarray] = []
        stuck_i: list[np.ndarray] = []
        stuck_p: list[np.ndarray] = []
        if longm.any():
            li, lx, lp, la = [], [], [], []
            for k in np.nonzero(longm)[0].tolist():
                data = self.table[int(ids[k])]
                s, p = start, int(offs[k])
                while p < len(data):
                    n = lex.row(s)[data[p]]
                    if n == 0:
                        break
                    s, p = n, p + 1
                if p == len(data):
                    la.append(k)
                elif lex.accepts[s]:
                    li.append(k)
                    lx.append(s)
                    lp.append(p)
            alive.append(np.asarray(la, np.int64))
            stuck_i.append(np.asarray(li, np.int64))
            stuck_x.append(np.asarray(lx, np.int32))
            stuck_p.append(np.asarray(lp, np.int64))
        idx = np.nonzero(~longm)[0]
        st = np.full(len(ids), start, np.int32)
        pos = offs.astype(np.int64, copy=True)
        tok = ids.astype(np.int64, copy=False)
        while idx.size:
            p = pos[idx]
            done = p >= lens[idx]
            if done.any():
                alive.append(idx[done])
                keep = ~done
                idx, p = idx[keep], p[keep]
                if not idx.size:
                    break
            cur = st[idx]
            lex.ensure_rows(cur)
            nxt = lex.table[cur, self.mat[tok[idx], p]]
            stuck = nxt == 0
            if stuck.any():
                s_idx, s_cur = idx[stuck], cur[stuck]
                acc = lex.acc_any[s_cur]
                if acc.any():
                    stuck_i.append(s_idx[acc])
                    stuck_x.append(s_cur[acc])
                    stuck_p.append(p[stuck][acc])
                keep = ~stuck
                idx, nxt, p = idx[keep], nxt[keep], p[keep]
            st[idx] = nxt
            pos[idx] = p + 1
        alive_idx = np.concatenate(alive) if alive else np.zeros(0, np.int64)
        mask = self.ids_to_int(ids[alive_idx])
        branches: list[Branch] = []
        if stuck_i:
            si = np.concatenate(stuck_i)
            if si.size:
                sx = np.concatenate(stuck_x)
                sp = np.concatenate(stuck_p)
                order = np.argsort(sx, kind="stable")
                si, sx, sp = si[order], sx[order], sp[order]
                cuts = np.nonzero(np.diff(sx))[0] + 1
                for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(sx)].tolist()):
                    branches.append(Branch(int(sx[a]), ids[si[a:b]], sp[a:b]))
        return Level(mask, branches)


TRIE_MIN_TOKENS = 4000  # classifications over at least this many tokens walk the trie
TRIE_MIN_EXTRA = 100  # the same for the part of a decomposed state's level outside its dominant component


def _byte_bits(b: np.ndarray) -> np.ndarray:
    """One-hot 256-bit sets (4 uint64 words per row) of the bytes ``b``."""
    out = np.zeros((len(b), 4), np.uint64)
    out[np.arange(len(b)), b >> 6] = np.left_shift(np.uint64(1), (b & 63).astype(np.uint64))
    return out


class TokenTrie:
    """The usable tokens' byte strings as a trie, stored level by level for vectorized walks.

    Tokens are sorted by their bytes, so every trie node covers a contiguous range of the sorted
    tokens: ``lo[d][k]:hi[d][k]`` for node ``k`` at depth ``d + 1``. ``byte[d][k]`` is the byte
    on the edge into the node, ``end[d][k]`` the token whose bytes are exactly the node's
    prefix (or -1), and ``clo[d][k]:chi[d][k]`` its children at the next depth. A walk from a
    lexer state visits each live prefix once (shared by every token that starts with it) and
    drops a subtree as soon as the lexer dies in it: Qwen's 151k tokens (976k bytes) are 333k
    nodes, and most subtrees die within a byte or two.
    """

    def __init__(self, table: list[bytes], usable_ids: np.ndarray):
        ids = sorted(usable_ids.tolist(), key=table.__getitem__)
        self.sorted_ids = np.asarray(ids, np.int64)
        toks = [table[i] for i in ids]
        n = len(toks)
        lens = np.fromiter((len(b) for b in toks), np.int64, n)
        lcp = np.zeros(n, np.int64)
        for i in range(1, n):
            a, b = toks[i - 1], toks[i]
            m = min(len(a), len(b))
            k = 0
            while k < m and a[k] == b[k]:
                k += 1
            lcp[i] = k
        maxlen = int(lens.max()) if n else 0
        width = maxlen
        mat = np.zeros((n, max(width, 1)), np.uint8)
        for i, b in enumerate(toks):
            mat[i, : len(b)] = np.frombuffer(b, np.uint8)
        self.lo: list[np.ndarray] = []
        self.hi: list[np.ndarray] = []
        self.byte: list[np.ndarray] = []
        self.end: list[np.ndarray] = []
        pos = np.arange(n)
        for d in range(1, maxlen + 1):
            bound = pos[lcp < d]  # tokens whose depth-d prefix differs from the previous token's
            starts = bound[lens[bound] >= d]
            nxt = np.searchsorted(bound, starts, side="right")
            ends = np.where(nxt < len(bound), bound[np.minimum(nxt, len(bound) - 1)], n)
            self.lo.append(starts)
            self.hi.append(ends)
            self.byte.append(mat[starts, d - 1].astype(np.int64))
            self.end.append(np.where(lens[starts] == d, self.sorted_ids[starts], -1))
        self.clo: list[np.ndarray] = []
        self.chi: list[np.ndarray] = []
        for d in range(len(self.lo)):
            if d + 1 < len(self.lo):
                nlo = self.lo[d + 1]
                self.clo.append(np.searchsorted(nlo, self.lo[d], side="left"))
                self.chi.append(np.searchsorted(nlo, self.hi[d], side="left"))
            else:
                self.clo.append(np.zeros(len(self.lo[d]), np.int64))
                self.chi.append(np.zeros(len(self.lo[d]), np.int64))
        self.num_nodes = sum(len(x) for x in self.lo)
        # desc[d][k]: the bytes on edges below node k (256 bits as 4 uint64 words), so a walk can
        # take a whole subtree at once where the lexer state loops on all of them
        self.desc: list[np.ndarray] = [np.zeros((0, 4), np.uint64)] * len(self.lo)
        below = None
        for d in range(len(self.lo) - 1, -1, -1):
            k = len(self.lo[d])
            acc = np.zeros((k, 4), np.uint64)
            if below is not None and len(self.lo[d + 1]):
                child = below | _byte_bits(self.byte[d + 1])
                parent = np.repeat(np.arange(k), self.chi[d] - self.clo[d])
                for w in range(4):
                    np.bitwise_or.at(acc[:, w], parent, child[:, w])
            self.desc[d] = acc
            below = acc
        # text states (UTF8_TEXT after each node's path, -1: not text) and heights (the longest
        # string below a node), to take a subtree whole where it is too short to kill the lexer
        pst: list[np.ndarray] = []
        for d in range(len(self.lo)):
            if d == 0:
                pst.append(UTF8_TEXT[0, self.byte[0]])
            else:
                par = np.repeat(pst[d - 1], self.chi[d - 1] - self.clo[d - 1])
                pst.append(np.where(par >= 0, UTF8_TEXT[np.maximum(par, 0), self.byte[d]], -1))
        plain: list[np.ndarray] = [np.zeros(0, bool)] * len(self.lo)
        height: list[np.ndarray] = [np.zeros(0, np.int64)] * len(self.lo)
        for d in range(len(self.lo) - 1, -1, -1):
            k = len(self.lo[d])
            ok, h = pst[d] >= 0, np.zeros(k, np.int64)
            if d + 1 < len(self.lo) and len(self.lo[d + 1]):
                parent = np.repeat(np.arange(k), self.chi[d] - self.clo[d])
                bad = np.zeros(k, np.int64)
                np.add.at(bad, parent, ~plain[d + 1])
                ok &= bad == 0
                np.maximum.at(h, parent, height[d + 1] + 1)
            plain[d], height[d] = ok, h
        # the same in preorder (sorted by first token, parents first) for native.py: a subtree
        # is a run of consecutive nodes, so the compiled walk reads every array front to back
        cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)  # noqa: E731
        all_lo = cat(self.lo, np.int64)
        all_depth = cat([np.full(len(x), d, np.int64) for d, x in enumerate(self.lo)], np.int64)
        order = np.lexsort((all_depth, all_lo))
        c = np.ascontiguousarray
        self.p_lo = c(all_lo[order].astype(np.int32))
        self.p_hi = c(cat(self.hi, np.int64)[order].astype(np.int32))
        self.p_depth = c(all_depth[order].astype(np.int32))
        self.p_byte = c(cat(self.byte, np.int64)[order].astype(np.uint8))
        self.p_end = c(cat(self.end, np.int64)[order])
        self.p_desc = c(np.concatenate(self.desc)[order] if self.desc else np.zeros((0, 4), np.uint64))
        self.p_pst = c(np.where(cat(plain, bool), cat(pst, np.int64), 255)[order].astype(np.uint8))
        self.p_height = c(np.minimum(cat(height, np.int64), 255)[order].astype(np.uint8))
        # subtree of node n: the nodes that follow it with a first token inside its range
        self.p_size = c((np.searchsorted(self.p_lo, self.p_hi, side="left") - np.arange(len(order))).astype(np.int32))
        n_all = len(order)
        n_bits = (int(self.sorted_ids.max()) + 8) // 8 if n else 1
        self._buffers = (np.zeros(n_bits, np.uint8),) + tuple(np.zeros(n_all + 1, np.int32) for _ in range(4)) + (
            np.zeros(max(len(self.lo), 1) + 1, np.int32),)
        self._counts = np.zeros(1, np.int64)
        self._missing = np.zeros(256, np.int32)
        self._wlock = threading.Lock()
        self._ptrs: tuple[int, ...] | None = None

    def classify_native(self, vocab: "Vocab", start: int, first: np.ndarray, walk: Any) -> Level:
        """:meth:`classify` by the compiled depth-first walk (``native.dk_walk``)."""
        from plugins.constraints.native import ptr

        lex = LEXER
        lex.table_row(start)
        first_u8 = np.ascontiguousarray(first, dtype=np.uint8)
        with self._wlock:
            bits, dx, dp, dlo, dhi, stack = self._buffers
            c = self._counts
            while True:
                if self._ptrs is None:
                    self._ptrs = tuple(ptr(a) for a in (
                        self.p_depth, self.p_byte, self.p_end, self.p_size, self.p_lo, self.p_hi, self.p_desc, self.p_pst,
                        self.p_height, self.sorted_ids, bits, dx, dp, dlo, dhi, c, self._missing, stack))
                q = self._ptrs
                bits.fill(0)
                with lex.lock:
                    nm = walk(*lex.pointers(), start, ptr(first_u8), len(self.p_lo), *q[:16], q[16], len(self._missing), q[17])
                if nm == 0:
                    break
                # rows the walk reached first: build them and what they reach, then walk again
                lex.close_rows(self._missing[:nm].tolist())
            mask = int.from_bytes(bits.tobytes(), "little")
            branches: list[Branch] = []
            nd = int(c[0])
            if nd:
                xs, ps = dx[:nd].astype(np.int64), dp[:nd].astype(np.int64)
                los, his = dlo[:nd].astype(np.int64), dhi[:nd].astype(np.int64)
                branches = self._group_dead(xs, ps, los, his)
        return Level(mask, branches)

    def _group_dead(self, xs: np.ndarray, ps: np.ndarray, los: np.ndarray, his: np.ndarray) -> list[Branch]:
        """Dead subtrees grouped by the state before the failing byte (each token keeps the
        offset of that byte)."""
        order = np.argsort(xs, kind="stable")
        xs, ps, los, his = xs[order], ps[order], los[order], his[order]
        cuts = np.nonzero(np.diff(xs))[0] + 1
        out: list[Branch] = []
        for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(xs)].tolist()):
            lo, hi = los[a:b], his[a:b]
            cnt = hi - lo
            tot = int(cnt.sum())
            idx = np.arange(tot) + np.repeat(lo - (np.cumsum(cnt) - cnt), cnt)
            out.append(Branch(int(xs[a]), self.sorted_ids[idx], np.repeat(ps[a:b], cnt)))
        return out

    def classify(self, vocab: "Vocab", start: int, first: np.ndarray) -> Level:
        """:meth:`Vocab.classify` of every usable token whose first byte has ``first[b]`` set,
        from lexer state ``start`` (offsets 0), by a pruned breadth-first walk of the trie (the
        compiled walk of :mod:`plugins.constraints.native` when available)."""
        from plugins.constraints.native import trie_walker

        walk = trie_walker()
        if walk is not None:
            return self.classify_native(vocab, start, first, walk)
        return self.classify_numpy(vocab, start, first)

    def classify_numpy(self, vocab: "Vocab", start: int, first: np.ndarray) -> Level:
        """:meth:`classify` with numpy, one trie level at a time."""
        lex = LEXER
        lex.table_row(start)
        b0 = self.byte[0]
        nodes = np.nonzero(first[b0])[0]
        states = lex.table[start, b0[nodes]]
        alive_parts: list[np.ndarray] = []
        dead_x: list[np.ndarray] = []
        dead_p: list[int] = []
        dead_lo: list[np.ndarray] = []
        dead_hi: list[np.ndarray] = []
        parent_states = np.full(len(nodes), start, np.int32)
        d = 0
        depth = len(self.lo)
        while nodes.size:
            dead = states == 0
            if dead.any():
                px = parent_states[dead]
                acc = lex.acc_any[px]
                if acc.any():
                    dn = nodes[dead][acc]
                    dead_x.append(px[acc])
                    dead_p.append(d)
                    dead_lo.append(self.lo[d][dn])
                    dead_hi.append(self.hi[d][dn])
                live = ~dead
                nodes, states = nodes[live], states[live]
                if not nodes.size:
                    break
            lex.ensure_rows(states)
            whole = ~(self.desc[d][nodes] & ~lex.loops[states]).any(axis=1)
            if whole.any():  # the state loops on every byte below: the whole subtree is alive
                wn = nodes[whole]
                lo, hi = self.lo[d][wn], self.hi[d][wn]
                cnt = hi - lo
                alive_parts.append(self.sorted_ids[np.arange(int(cnt.sum())) + np.repeat(lo - (np.cumsum(cnt) - cnt), cnt)])
                keep = ~whole
                nodes, states = nodes[keep], states[keep]
                if not nodes.size:
                    break
            e = self.end[d][nodes]
            e = e[e >= 0]
            if e.size:
                alive_parts.append(e)
            if d + 1 >= depth:
                break
            clo, chi = self.clo[d][nodes], self.chi[d][nodes]
            cnt = chi - clo
            has = cnt > 0
            if not has.all():
                clo, cnt, states = clo[has], cnt[has], states[has]
            total = int(cnt.sum())
            if total == 0:
                break
            # children of every live node: concatenated contiguous ranges
            rep_states = np.repeat(states, cnt)
            offs = np.repeat(clo - (np.cumsum(cnt) - cnt), cnt)
            nodes = np.arange(total) + offs
            d += 1
            states = lex.table[rep_states, self.byte[d][nodes]]
            parent_states = rep_states
        alive = np.concatenate(alive_parts) if alive_parts else np.zeros(0, np.int64)
        mask = vocab.ids_to_int(alive)
        branches: list[Branch] = []
        if dead_x:
            xs = np.concatenate(dead_x).astype(np.int64)
            ps = np.concatenate([np.full(len(x), p, np.int64) for x, p in zip(dead_x, dead_p)])
            branches = self._group_dead(xs, ps, np.concatenate(dead_lo), np.concatenate(dead_hi))
        return Level(mask, branches)


_VOCABS: "weakref.WeakKeyDictionary[Any, Vocab]" = weakref.WeakKeyDictionary()
_VOCABS_BY_ID: dict[int, Vocab] = {}
_VLOCK = threading.Lock()


def vocab_for(tokenizer: Any) -> Vocab:
    """The (cached) :class:`Vocab` of ``tokenizer``."""
    try:
        got = _VOCABS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        got = _VOCABS_BY_ID.get(id(tokenizer))
    if got is not None:
        return got
    with _VLOCK:
        v = Vocab(tokenizer)
        try:
            _VOCABS[tokenizer] = v
        except TypeError:
            _VOCABS_BY_ID[id(tokenizer)] = v
        return v
