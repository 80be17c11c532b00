"""The grammar engine: a compiled grammar for one tokenizer, and per-sequence matcher states.

A matcher position is ``(lexer state, parse state, last ignored terminal, fresh)``: the DFA
state of the lexeme in progress (it ends lazily, when the next byte cannot continue it — lark's
longest-match rule), the Earley set of the lexemes before it, and whether the lexeme is empty.

The mask of a position is

    tokens that stay inside the lexeme                          (cached per lexer state)
  | for each group of tokens whose lexeme ends inside them:
        feed that lexeme to the parser (memoized), continue the rest of the tokens from the
        lexer state the parser allows next                      (cached per lexer state)
  | EOS, if the lexeme in progress can end here and the parser accepts

and is memoized on the (hash-consed) parse state, so a position that recurs — the same point
in an array item, the same character class in a GBNF loop — costs one dictionary lookup.
Because terminal DFAs are trimmed and the grammar has only productive rules, every allowed
token leaves a position from which the grammar can still be completed: masks never dead-end.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from framework.bitmask import allocate_token_bitmask, apply_token_bitmask_  # noqa: F401  (re-exported; the core owns them)
from framework.errors import ConstraintError
from plugins.constraints.counted import clamp_for, terminal_dfa
from plugins.constraints.earley import EarleyGrammar, EarleySet
from plugins.constraints.grammar import Grammar
from plugins.constraints.lexer import LEXER, TRIE_MIN_TOKENS, Branch, Vocab, vocab_for
from plugins.constraints.regex import node_key

__all__ = ["CompiledGrammar", "GrammarState", "apply_token_bitmask_", "allocate_token_bitmask"]

_Pos = tuple  # (lexer sid, EarleySet, ignored-terminal symbol or -1, fresh, counts)
# counts: ((terminal, class, count), ...) for the components of the lexer state that are in a
# looping class of a counted repetition (plugins/constraints/counted.py); () almost always


class CompiledGrammar:
    """A grammar compiled for one tokenizer. Thread-safe to share; :meth:`new_state` gives each
    sequence its own :class:`GrammarState`.

    Args:
        grammar: the grammar (from any front end).
        tokenizer: any object with ``token_byte_table()``, ``vocab_size``, ``eos_token_ids`` and
            ``special_ids`` (the ``framework.tokenizer.Tokenizer`` protocol).
        deadline: ``time.monotonic()`` value after which compilation gives up.
    """

    def __init__(self, grammar: Grammar, tokenizer: Any, *, deadline: float | None = None, vocab: Vocab | None = None):
        self.grammar = grammar
        self.vocab = vocab if vocab is not None else vocab_for(tokenizer)
        if len(self.vocab.usable_ids) >= TRIE_MIN_TOKENS:
            self.vocab.trie  # noqa: B018 - built once per tokenizer, here (off the engine thread) rather than in a mask
        self.earley = EarleyGrammar(grammar)
        eg = self.earley
        self._nsym = eg.n_nt + len(eg.term_names) + 2  # symbol ids (and -1) in memo keys
        self.tid_syms: dict[int, tuple[int, ...]] = {}
        self.sym_tid: dict[int, int] = {}
        self.literal: dict[int, bool] = {}
        self.priority: dict[int, int] = {}
        clamp = clamp_for(int(self.vocab.lens.max()) if self.vocab.size else 0)
        for k, name in enumerate(eg.term_names):
            term = grammar.terminals[name]
            where = f"{grammar.source}: terminal {name}"
            key, dfa = terminal_dfa(term.node, clamp, where=where, deadline=deadline, key=node_key(term.node))
            if dfa.empty():
                raise ConstraintError(f"{where} matches no string")
            if dfa.accepts_empty():
                raise ConstraintError(f"{where} matches the empty string (a lexeme must not be empty)")
            tid = LEXER.terminal(key, dfa)
            sym = eg.n_nt + k
            self.sym_tid[sym] = tid
            self.tid_syms[tid] = self.tid_syms.get(tid, ()) + (sym,)
            self.literal[sym] = term.literal
            self.priority[sym] = term.priority
        self.ignore_syms = frozenset(eg.terminal_symbol(n) for n in grammar.ignore)
        self.shadows: dict[int, frozenset[int]] = {
            eg.terminal_symbol(n): frozenset(eg.terminal_symbol(x) for x in t.shadows)
            for n, t in grammar.terminals.items() if t.shadows
        }
        self.eos_ids = frozenset(self.vocab.eos_ids)
        self.lark_ties = grammar.ties != "all"
        self.counting = any(t in LEXER.counters for t in self.sym_tid.values())
        root = eg.root
        start = self.lex_start(root, -1)
        self.initial: _Pos = (start, root, -1, True, self._enter(start))

    # -- parser/lexer glue ------------------------------------------------------------------
    def present(self, P: EarleySet, ign: int) -> frozenset[int]:
        """Terminal symbols the lexer tries at a lexeme start: what the parser allows, their
        shadows, and the ignored terminals (not the one just ignored)."""
        key = (ign + 1) << 3  # memo keys are ints (no tuples for the cyclic GC to track)
        got = P.memo.get(key)
        if got is None:
            syms = set(P.terminals)
            if self.shadows:
                for s in P.terminals:
                    syms.update(self.shadows.get(s, ()))
            syms.update(s for s in self.ignore_syms if s != ign)
            got = P.memo[key] = frozenset(syms)
        return got

    def lex_start(self, P: EarleySet, ign: int) -> int:
        key = ((ign + 1) << 3) | 1
        sid = P.memo.get(key)
        if sid is None:
            st = self.sym_tid
            sid = P.memo[key] = LEXER.start(frozenset(st[s] for s in self.present(P, ign)))
        return sid

    def feed(self, P: EarleySet, ign: int, X: int) -> tuple[EarleySet, int] | None:
        """The parse state after the lexeme that ended in lexer state ``X``."""
        key = ((X * self._nsym + ign + 1) << 3) | 2
        got = P.memo.get(key, False)
        if got is not False:
            return got
        present = self.present(P, ign)
        cands = [s for t in LEXER.accepts[X] for s in self.tid_syms.get(t, ()) if s in present]
        res: tuple[EarleySet, int] | None = None
        if len(cands) > 1 and self.lark_ties:  # lark's tie-breaking: literals over regexes, then priority
            lits = [s for s in cands if self.literal[s]]
            cands = lits or cands
            top = max(self.priority[s] for s in cands)
            cands = [s for s in cands if self.priority[s] == top]
        syms = [s for s in cands if s in P.terminals]
        if syms:
            P2 = P.scan((syms[0],) if len(syms) == 1 else tuple(sorted(syms)))
            res = None if P2 is None else (P2, -1)
        else:
            ig = [s for s in cands if s in self.ignore_syms and s != ign]
            if ig:
                res = (P, ig[0])
        P.memo[key] = res
        return res

    # -- counted repetitions ------------------------------------------------------------------
    def _enter(self, sid: int) -> tuple:
        """The counts of a lexeme that starts in state ``sid`` (each looping class at its entry)."""
        if not self.counting:
            return ()
        mids = LEXER.mids(sid)
        return tuple((t, r, LEXER.counters[t].entry[r]) for _, t, r in mids) if mids else ()

    def _count(self, n: int, cnt: tuple) -> tuple[int, tuple]:
        """State ``n`` reached by one byte from a state with counts ``cnt`` (same lexeme): its
        counts, and the state itself moved out of a looping class whose exit count was reached."""
        mids = LEXER.mids(n)
        if not mids:
            return n, ()
        prev = {t: (r, c) for t, r, c in cnt}
        comps: list | None = None
        out = []
        for i, t, r in mids:
            spec = LEXER.counters[t]
            q = LEXER.states[n][i][1]
            pr = prev.get(t)
            c = pr[1] + (q == spec.boundary[r]) if pr is not None and pr[0] == r else spec.entry[r]
            ex = spec.exit[r]
            if ex is not None and c >= ex:  # leave the loop: the explicit class of count c
                if comps is None:
                    comps = list(LEXER.states[n])
                comps[i] = (t, spec.target[r])
            else:
                out.append((t, r, c))
        if comps is not None:
            n = LEXER.intern(tuple(comps))
        return n, tuple(out)

    def accepts_end(self, pos: _Pos) -> bool:
        sid, P, ign, fresh = pos[:4]
        if fresh:
            return P.accepting
        r = self.feed(P, ign, sid)
        return r is not None and r[0].accepting

    # -- masks -----------------------------------------------------------------------------
    def mask(self, pos: _Pos) -> int:
        """Allowed tokens at ``pos`` as a Python int bitset (bit ``i`` = token ``i``)."""
        sid, P, ign, fresh = pos[:4]
        key = (((sid * 2 + fresh) * self._nsym + ign + 1) << 3) | 3
        m = P.memo.get(key)
        if m is not None:
            return m
        lv = self.vocab.level(sid)
        m = lv.mask
        for br in lv.branches:
            m |= self._branch(br, P, ign)
        if self.accepts_end(pos):
            m |= self.vocab.eos_mask
        P.memo[key] = m
        return m

    def _branch(self, br: Branch, P: EarleySet, ign: int) -> int:
        # feed() and lex_start() with their memo lookups inlined (the hot path of a new mask)
        r = P.memo.get(((br.X * self._nsym + ign + 1) << 3) | 2, False)
        if r is False:
            r = self.feed(P, ign, br.X)
        if r is None:
            return 0
        P2, ign2 = r
        sid = P2.memo.get(((ign2 + 1) << 3) | 1)
        if sid is None:
            sid = self.lex_start(P2, ign2)
        lv = br.cache.get(sid)
        if lv is None:
            lv = br.level(self.vocab, sid)
        m = lv.mask
        for b2 in lv.branches:
            m |= self._branch(b2, P2, ign2)
        return m

    def step(self, pos: _Pos, token: int) -> _Pos | None:
        """The position after ``token`` (not EOS), or ``None`` if the token is not allowed."""
        data = self.vocab.table[token] if 0 <= token < self.vocab.size else b""
        if not data:
            return None
        if self.counting:
            return self._walk(pos, data)
        sid, P, ign, fresh = pos[:4]
        rows, lex = LEXER.rows, LEXER
        for b in data:
            row = rows[sid]
            if row is None:
                row = lex.row(sid)
            n = row[b]
            if n == 0:
                if fresh:
                    return None
                r = self.feed(P, ign, sid)
                if r is None:
                    return None
                P, ign = r
                sid = self.lex_start(P, ign)
                row = rows[sid] or lex.row(sid)
                n = row[b]
                if n == 0:
                    return None
            sid, fresh = n, False
        return (sid, P, ign, False, ())

    def _walk(self, pos: _Pos, data: bytes) -> _Pos | None:
        """:meth:`step` (and :meth:`matches`) with counted repetitions: the same walk, keeping
        each looping class's count and leaving the loop when its exit count is reached."""
        sid, P, ign, fresh, cnt = pos
        lex = LEXER
        for b in data:
            n = lex.row(sid)[b]
            if n == 0:
                if fresh:
                    return None
                r = self.feed(P, ign, sid)
                if r is None:
                    return None
                P, ign = r
                sid = self.lex_start(P, ign)
                cnt = self._enter(sid)
                n = lex.row(sid)[b]
                if n == 0:
                    return None
            sid, cnt = self._count(n, cnt) if (cnt or lex.mids(n)) else (n, ())
            fresh = False
        return (sid, P, ign, False, cnt)

    def new_state(self) -> "GrammarState":
        return GrammarState(self)

    def matches(self, data: bytes | str) -> bool:
        """Whether the whole of ``data`` is a sentence of the grammar (a reference check)."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        if not data:
            return self.accepts_end(self.initial)
        pos = self._walk(self.initial, data)
        return pos is not None and self.accepts_end(pos)


class GrammarState:
    """One sequence's position in a compiled grammar, with history for :meth:`rollback`.

    ``fill_bitmask`` / ``forced_tokens`` / ``is_accepting`` read the current position;
    ``advance`` moves it by one token; ``rollback(n)`` undoes the last ``n`` advances.
    """

    __slots__ = ("cg", "_hist", "_done")

    def __init__(self, cg: CompiledGrammar):
        self.cg = cg
        self._hist: list[_Pos | None] = [cg.initial]  # None: EOS was accepted
        self._done = False

    @property
    def num_tokens(self) -> int:
        """Tokens advanced so far (EOS included)."""
        return len(self._hist) - 1

    def allowed_mask(self) -> int:
        """The allowed tokens as a Python int bitset (0 once terminated)."""
        pos = self._hist[-1]
        return 0 if pos is None else self.cg.mask(pos)

    def peek_allowed_mask(self) -> int | None:
        """:meth:`allowed_mask` if it is already known (memoized), else None — never computes.
        The engine uses it to decide jump-forward without paying for a new mask outside the
        time the next forward pass runs."""
        pos = self._hist[-1]
        if pos is None:
            return 0
        sid, P, ign, fresh = pos[:4]
        return P.memo.get((((sid * 2 + fresh) * self.cg._nsym + ign + 1) << 3) | 3)

    def allowed_token_ids(self) -> list[int]:
        m, out = self.allowed_mask(), []
        while m:
            low = m & -m
            out.append(low.bit_length() - 1)
            m ^= low
        return out

    def is_token_allowed(self, token: int) -> bool:
        return bool(self.allowed_mask() >> token & 1) if token >= 0 else False

    def prefetch(self) -> None:
        """Compute (and memoize) the current mask and its bitmask words, so that the next
        :meth:`fill_bitmask` is a copy (the engine runs this while the model's forward runs)."""
        if self._hist[-1] is not None:
            self._words()

    def _words(self) -> np.ndarray:
        words = self.cg.vocab.words
        pos = self._hist[-1]
        if pos is None:
            return np.zeros(words, np.int32)
        sid, P, ign, fresh = pos[:4]  # the mask as int32 words, memoized beside the mask
        key = (((sid * 2 + fresh) * self.cg._nsym + ign + 1) << 3) | 4
        src = P.memo.get(key)
        if src is None:
            src = P.memo[key] = np.frombuffer(self.cg.mask(pos).to_bytes(words * 4, "little"), dtype=np.int32)
        return src

    def fill_bitmask(self, bitmask: torch.Tensor, row: int = 0) -> None:
        """Write the allowed tokens into ``bitmask[row]`` (int32 words, bit ``i % 32`` of word
        ``i // 32`` is token ``i``; words past the vocabulary are zeroed)."""
        words = self.cg.vocab.words
        src = self._words()
        if bitmask.device.type == "cpu":
            view = bitmask.numpy()
            w = min(words, view.shape[1])
            view[row, :w] = src[:w]
            if view.shape[1] > w:
                view[row, w:] = 0
        else:
            t = torch.zeros(bitmask.shape[1], dtype=torch.int32)
            w = min(words, bitmask.shape[1])
            t[:w] = torch.from_numpy(src[:w].copy())
            bitmask[row].copy_(t, non_blocking=True)

    def advance(self, token: int) -> bool:
        """Consume ``token``. Returns False (and changes nothing) if it is not allowed."""
        pos = self._hist[-1]
        if pos is None:
            return False
        cg = self.cg
        if token in cg.eos_ids:
            if not cg.accepts_end(pos):
                return False
            self._hist.append(None)
            return True
        nxt = cg.step(pos, token)
        if nxt is None:
            return False
        self._hist.append(nxt)
        return True

    def advance_many(self, tokens: Sequence[int]) -> int:
        """Advance token by token; return how many were accepted (stops at the first refusal)."""
        for k, t in enumerate(tokens):
            if not self.advance(t):
                return k
        return len(tokens)

    def rollback(self, n: int) -> None:
        """Undo the last ``n`` accepted tokens (speculative decoding)."""
        if n < 0 or n > len(self._hist) - 1:
            raise ValueError(f"cannot roll back {n} tokens: {len(self._hist) - 1} were advanced")
        if n:
            del self._hist[-n:]

    def forced_tokens(self, limit: int = 32) -> list[int]:
        """Tokens that are the only allowed choice, in a row from here (EOS included, last).

        These can be appended without a forward pass to choose them; they are token ids the
        grammar forces one at a time, never a re-tokenization of forced text. The state is not
        changed: call :meth:`advance` for each one appended.
        """
        cg = self.cg
        pos = self._hist[-1]
        out: list[int] = []
        while pos is not None and len(out) < limit:
            m = cg.mask(pos)
            if m == 0 or m & (m - 1):
                break
            t = m.bit_length() - 1
            out.append(t)
            if t in cg.eos_ids:
                break
            pos = cg.step(pos, t)
        return out

    def mask_within(self, budget: int, max_branch: int = 64, max_nodes: int = 2048) -> int | None:
        """The allowed tokens after which the output can still be completed within ``budget``
        tokens (None: no such restriction is known); see :func:`plugins.constraints.budget.mask_within`."""
        from plugins.constraints.budget import mask_within

        return mask_within(self, budget, max_branch, max_nodes)

    def is_accepting(self) -> bool:
        """The output so far is complete: EOS is allowed (or was accepted)."""
        pos = self._hist[-1]
        return True if pos is None else self.cg.accepts_end(pos)

    def is_terminated(self) -> bool:
        """EOS was accepted; nothing more may follow."""
        return self._hist[-1] is None

    def copy(self) -> "GrammarState":
        new = GrammarState(self.cg)
        new._hist = list(self._hist)
        return new

    def reset(self) -> None:
        self._hist = [self.cg.initial]


