"""Ends that fit ``max_tokens``: which allowed tokens can still lead to a complete output within
the tokens left (used by the engine's constraint processor for a request's last tokens)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from plugins.constraints.matcher import GrammarState

__all__ = ["mask_within"]

_Pos = tuple


def mask_within(state: "GrammarState", budget: int, max_branch: int = 64, max_nodes: int = 2048) -> int | None:
    """The allowed tokens after which the output can still be completed with at most
    ``budget`` tokens in all (this one included), when that removes some and keeps some;
    else None (use :meth:`allowed_mask`).

    A request near its ``max_tokens`` would otherwise be cut mid-lexeme (``"alph`` where
    ``"alpha"`` fits): the engine's constraint processor uses this for the last tokens of a
    budget. The search stops (None: nothing proven) where more than ``max_branch`` tokens
    are allowed or after ``max_nodes`` steps, so it only prunes where the remaining choices
    are few — an enum, a literal key, a closing sequence. Only tokens proven unable to
    complete in time are removed: the result is a subset of the grammar's mask, never empty.
    """
    pos = state._hist[-1]
    if pos is None or budget < 1:
        return None
    cg = state.cg
    m = cg.mask(pos)
    if m.bit_count() > max_branch:
        return None
    eos = cg.vocab.eos_mask
    memo: dict[tuple, bool | None] = {}
    nodes = [0]

    def can(p: _Pos, d: int) -> bool | None:  # acceptance within d more tokens? (None: unknown)
        if cg.accepts_end(p):
            return True
        if d == 0:
            return False
        key = (p, d)
        if key in memo:
            return memo[key]
        mm = cg.mask(p) & ~eos
        if mm.bit_count() > max_branch:
            return None
        res: bool | None = False
        while mm:
            low = mm & -mm
            mm ^= low
            nodes[0] += 1
            if nodes[0] > max_nodes:
                return None
            nxt = cg.step(p, low.bit_length() - 1)
            r = None if nxt is None else can(nxt, d - 1)
            if r:
                res = True
                break
            if r is None and nxt is not None:
                res = None
        memo[key] = res
        return res

    keep = m & eos
    rest = m & ~eos
    while rest:
        low = rest & -rest
        rest ^= low
        nxt = cg.step(pos, low.bit_length() - 1)
        if nxt is not None and can(nxt, budget - 1) is not False:
            keep |= low
        if nodes[0] > max_nodes:
            return None
    return None if keep in (0, m) else keep
