"""An Earley parser over terminals with persistent, hash-consed parse states.

The constraint engine needs a parser that takes any context-free grammar (left recursion and
ambiguity included: lark grammars, ``anyOf`` in JSON Schema), can be asked "which terminals may
come next?" and "may the input end here?", can branch cheaply (the mask computation tries many
lexemes from one state) and can go back (``rollback``). An :class:`EarleySet` is immutable: feeding
a terminal returns a new set, memoized on the old one; identical sets are shared (hash-consed by
their items), so work done for one sequence or position is reused wherever the parse state
recurs.

Prediction is precomputed: the items a set predicts depend only on the nonterminals its kernel
items wait for, so they come from a cached :class:`_Block` (Aycock & Horspool's treatment of
nullable symbols is folded into the closure). A scan then only touches kernel items and the
completions they cause.
"""

from __future__ import annotations

import itertools
import threading
from typing import Iterable

from plugins.constraints.grammar import Grammar

__all__ = ["EarleyGrammar", "EarleySet"]


class _Block:
    """Items predicted (origin = the set that owns the block) for a set of nonterminals."""

    __slots__ = ("wait", "terminals", "complete_start")

    def __init__(self, g: "EarleyGrammar", nts: frozenset[int]):
        rhs, rules_of, nullable, n_nt = g.rhs, g.rules_of, g.nullable, g.n_nt
        seen: set[tuple[int, int]] = set()
        todo = [(r, 0) for n in nts for r in rules_of[n]]
        wait: dict[int, list[tuple[int, int]]] = {}
        complete_start = False
        while todo:
            it = todo.pop()
            if it in seen:
                continue
            seen.add(it)
            r, d = it
            body = rhs[r]
            if d == len(body):
                if r == g.start_rule:
                    complete_start = True
                continue
            s = body[d]
            wait.setdefault(s, []).append(it)
            if s < n_nt:
                todo.extend((r2, 0) for r2 in rules_of[s])
                if nullable[s]:
                    todo.append((r, d + 1))
        self.wait = wait
        self.terminals = frozenset(s for s in wait if s >= n_nt)
        self.complete_start = complete_start


class EarleySet:
    """One parse state. ``terminals``: terminal symbols that may come next; ``accepting``: the
    input so far is a sentence of the grammar. Feed terminals with :meth:`scan`."""

    __slots__ = ("g", "kwait", "block", "terminals", "accepting", "memo", "uid", "__weakref__")

    def __init__(self, g: "EarleyGrammar", kwait: dict, block: _Block, accepting: bool,
                 kterms: list[int] | None = None):
        self.g = g
        self.kwait = kwait
        self.block = block
        self.accepting = accepting
        if kterms is None:
            n_nt = g.n_nt
            kterms = [s for s in kwait if s >= n_nt]
        self.terminals: frozenset[int] = block.terminals.union(kterms) if kterms else block.terminals
        # transitions (keys: tuples of terminal symbols) and, under int keys, scratch space for
        # the layers above (lexer states, masks): one dict, fewer objects for the cyclic GC
        self.memo: dict = {}
        self.uid = next(g._uids)

    def scan(self, terms: Iterable[int]) -> "EarleySet | None":
        """The state after one lexeme of any of the terminal symbols ``terms`` (``None``: not
        allowed here). Memoized."""
        key = terms if isinstance(terms, tuple) else tuple(terms)
        got = self.memo.get(key, False)
        if got is not False:
            return got
        res = self.g._scan(self, key)
        self.memo[key] = res
        return res


class EarleyGrammar:
    """A :class:`Grammar` prepared for Earley parsing. Symbols are ints: nonterminals
    ``0..n_nt-1`` (``n_nt - 1`` is the augmented start), terminal ``k`` of ``term_names`` is
    ``n_nt + k``."""

    def __init__(self, grammar: Grammar):
        nts = grammar.nonterminals()
        self.nt_names = nts + ["$start"]
        nt_id = {n: i for i, n in enumerate(self.nt_names)}
        self.n_nt = len(self.nt_names)
        self.term_names = list(grammar.terminals)
        t_id = {n: self.n_nt + i for i, n in enumerate(self.term_names)}

        def sym(s: str) -> int:
            return nt_id[s] if s in nt_id else t_id[s]

        self.lhs: list[int] = []
        self.rhs: list[tuple[int, ...]] = []
        for lhs, body in grammar.rules:
            self.lhs.append(nt_id[lhs])
            self.rhs.append(tuple(sym(s) for s in body))
        self.start_rule = len(self.lhs)
        self.lhs.append(self.n_nt - 1)
        self.rhs.append((nt_id[grammar.start],))
        self.rules_of: list[list[int]] = [[] for _ in range(self.n_nt)]
        for r, l in enumerate(self.lhs):
            self.rules_of[l].append(r)
        nullable = [False] * self.n_nt
        changed = True
        while changed:
            changed = False
            for r, l in enumerate(self.lhs):
                if not nullable[l] and all(s < self.n_nt and nullable[s] for s in self.rhs[r]):
                    nullable[l] = changed = True
        self.nullable = nullable
        self._blocks: dict[frozenset[int], _Block] = {}
        self._intern: dict = {}
        self._lock = threading.Lock()
        self._uids = itertools.count()
        self.width = max((len(b) for b in self.rhs), default=0) + 1  # dot positions per rule
        self.max_states = 200_000
        root_block = self.block(frozenset((self.n_nt - 1,)))
        self.root = EarleySet(self, {}, root_block, root_block.complete_start)

    def block(self, nts: frozenset[int]) -> _Block:
        b = self._blocks.get(nts)
        if b is None:
            b = self._blocks[nts] = _Block(self, nts)
        return b

    def terminal_symbol(self, name: str) -> int:
        return self.n_nt + self.term_names.index(name)

    def _scan(self, E: EarleySet, terms: tuple[int, ...]) -> EarleySet | None:
        rhs, lhs, nullable, n_nt = self.rhs, self.lhs, self.nullable, self.n_nt
        start_nt = n_nt - 1
        seen: set = set()
        todo: list = []
        for t in terms:
            for r, d, o in E.kwait.get(t, ()):
                todo.append((r, d + 1, o))
            for r, d in E.block.wait.get(t, ()):
                todo.append((r, d + 1, E))
        if not todo:
            return None
        kwait: dict[int, list] = {}
        need: set[int] = set()
        kterms: list[int] = []  # terminals kernel items wait for
        accepting = False
        while todo:
            it = todo.pop()
            if it in seen:
                continue
            seen.add(it)
            r, d, o = it
            body = rhs[r]
            if d == len(body):
                a = lhs[r]
                if a == start_nt:
                    accepting = True
                    continue
                for r2, d2, o2 in o.kwait.get(a, ()):
                    todo.append((r2, d2 + 1, o2))
                for r2, d2 in o.block.wait.get(a, ()):
                    todo.append((r2, d2 + 1, o))
                continue
            s = body[d]
            lst = kwait.get(s)
            if lst is None:
                kwait[s] = [it]
                if s >= n_nt:
                    kterms.append(s)
            else:
                lst.append(it)
            if s < n_nt:
                need.add(s)
                if nullable[s]:
                    todo.append((r, d + 1, o))
        block = self.block(frozenset(need))
        accepting = accepting or block.complete_start
        # hash-consing key: the kernel items as ints (rule, dot, origin's uid), sorted — a
        # tuple of ints, which the cyclic GC stops tracking
        w = self.width
        key = (accepting, tuple(sorted(((r * w + d) << 32) | o.uid for lst in kwait.values() for r, d, o in lst)))
        got = self._intern.get(key)
        if got is not None:
            return got
        new = EarleySet(self, kwait, block, accepting, kterms)
        with self._lock:
            if len(self._intern) > self.max_states:
                # Bound memory: forget the shared table (live sequences keep their own states).
                self._intern.clear()
                self.root.memo.clear()
            self._intern[key] = new
        return new
