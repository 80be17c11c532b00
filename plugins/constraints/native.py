"""An optional C accelerator for the token-trie walk (compiled on first use, loaded with ctypes).

The walk in :meth:`plugins.constraints.lexer.TokenTrie.classify` visits trie nodes one lexer
transition at a time; numpy vectorizes it level by level, but each level costs a dozen array
operations. This module compiles the same walk (a depth-first loop, one table lookup per node)
with the system C compiler into ``$DECODEKIT_CACHE_DIR/native/`` (default
``~/.cache/decodekit/native``) the first time it is needed, and loads it with :mod:`ctypes`.
No compiler, a failed build, or ``DECODEKIT_NATIVE=0`` simply leaves the numpy walk in place:
results are identical either way (tests compare them).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["trie_walker", "classifier", "SOURCE"]

logger = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
#define DK_NP 10  /* states of lexer.UTF8_TEXT */
#define SETBIT(i) (bits[(i) >> 3] |= (uint8_t)(1u << ((i) & 7)))

/* Walk the token trie from lexer state `start`. Nodes are numbered in preorder, so the
 * subtree of node n is n .. n + size[n] - 1 and the walk reads every array front to back.
 *   table[s * 256 + b]: next lexer state (0 = dead); states with has_row[s] == 0 have no row
 *   yet: their subtree is skipped and s is reported in missing[] (the caller builds the rows
 *   and walks again). loops[s*4..]: the bytes on which s stays in s (has_loop[s]: any).
 *   dd[s * DK_NP + p]: no string of fewer than dd bytes that is plain JSON-string text from UTF-8
 *   state p (see lexer.UTF8_TEXT) kills s (0: unknown).
 *   Node n: depth[n] (0 = a first byte), byte[n] on the edge into it, endtok[n] the token
 *   ending exactly there (-1: none), lo[n]..hi[n]-1 its range of sorted tokens, desc[n*4..]
 *   the bytes on edges below it, pst[n] the UTF-8 text state after its path when every string
 *   below it is plain text from there (255: not so), height[n] the longest string below it.
 * Outputs: alive tokens as bits of bits[] (bit i % 8 of byte i / 8 = token i; zeroed by the
 * caller; sorted_ids maps sorted positions to ids) and dead subtrees whose lexeme can end before
 * the failing byte: (state before it, offset of the byte, range).
 * Returns the number of missing states (0: the walk is complete). */
int64_t dk_walk(const int32_t *table, const uint8_t *has_row, const uint8_t *acc_any,
                const uint64_t *loops, const uint8_t *has_loop, const uint8_t *dd, int32_t start,
                const uint8_t *first, int64_t n_nodes, const int32_t *depth, const uint8_t *byte,
                const int64_t *endtok, const int32_t *size, const int32_t *lo, const int32_t *hi,
                const uint64_t *desc, const uint8_t *pst, const uint8_t *height,
                const int64_t *sorted_ids, uint8_t *bits,
                int32_t *dx, int32_t *dp, int32_t *dlo, int32_t *dhi, int64_t *n_dead,
                int32_t *missing, int64_t max_missing, int32_t *st) {
    int64_t nd = 0, nm = 0, n = 0;
    while (n < n_nodes) {
        int32_t d = depth[n];
        int32_t ps = d == 0 ? start : st[d - 1];
        if (d == 0 && !first[byte[n]]) { n += size[n]; continue; }
        int32_t s = table[(int64_t)ps * 256 + byte[n]];
        if (s == 0) {
            if (acc_any[ps]) { dx[nd] = ps; dp[nd] = d; dlo[nd] = lo[n]; dhi[nd] = hi[n]; nd++; }
            n += size[n];
            continue;
        }
        if (size[n] == 1) { SETBIT(endtok[n]); n++; continue; }  /* a leaf ends a token */
        if (!has_row[s]) {
            int found = 0;
            for (int64_t i = 0; i < nm; i++) if (missing[i] == s) { found = 1; break; }
            if (!found) {
                if (nm >= max_missing) return nm;
                missing[nm++] = s;
            }
            n += size[n];
            continue;
        }
        uint8_t p = pst[n];
        if (p != 255 && height[n] < dd[(int64_t)s * DK_NP + p]) {
            for (int32_t k = lo[n]; k < hi[n]; k++) SETBIT(sorted_ids[k]);  /* too short to kill s */
            n += size[n];
            continue;
        }
        if (has_loop[s]) {
            const uint64_t *dn = desc + n * 4, *ls = loops + (int64_t)s * 4;
            if (!((dn[0] & ~ls[0]) | (dn[1] & ~ls[1]) | (dn[2] & ~ls[2]) | (dn[3] & ~ls[3]))) {
                for (int32_t k = lo[n]; k < hi[n]; k++) SETBIT(sorted_ids[k]);  /* s loops on all below */
                n += size[n];
                continue;
            }
        }
        if (endtok[n] >= 0) SETBIT(endtok[n]);
        st[d] = s;
        n++;
    }
    *n_dead = nd;
    return nm;
}

/* Distances to death: for a DFA (T[q * nc + c], -1 = dead, over nc byte classes) and the UTF-8
 * text automaton (P[p * nc + c], -1 = not text), dd[q * npp + p] = the length of the shortest
 * string that is text from p and kills q, capped at 255 (unreachable: 255). Reverse BFS from
 * the pairs one byte from death. cnt: N + 1, adj: N * nc, queue: N int32 (N = nq * npp). */
void dk_dd(int32_t nq, int32_t nc, const int32_t *T, int32_t npp, const int32_t *P, uint8_t *dd,
           int32_t *cnt, int32_t *adj, int32_t *queue) {
    int64_t N = (int64_t)nq * npp, head = 0, tail = 0;
    for (int64_t u = 0; u <= N; u++) cnt[u] = 0;
    for (int64_t u = 0; u < N; u++) dd[u] = 0;
    for (int32_t q = 0; q < nq; q++)
        for (int32_t p = 0; p < npp; p++) {
            int64_t u = (int64_t)q * npp + p;
            for (int32_t c = 0; c < nc; c++) {
                int32_t pn = P[p * nc + c];
                if (pn < 0) continue;
                int32_t qn = T[(int64_t)q * nc + c];
                if (qn < 0) { if (!dd[u]) { dd[u] = 1; queue[tail++] = (int32_t)u; } continue; }
                cnt[(int64_t)qn * npp + pn + 1]++;
            }
        }
    for (int64_t u = 0; u < N; u++) cnt[u + 1] += cnt[u];
    for (int32_t q = 0; q < nq; q++)
        for (int32_t p = 0; p < npp; p++)
            for (int32_t c = 0; c < nc; c++) {
                int32_t pn = P[p * nc + c];
                if (pn < 0) continue;
                int32_t qn = T[(int64_t)q * nc + c];
                if (qn < 0) continue;
                int64_t v = (int64_t)qn * npp + pn;
                adj[cnt[v]++] = q * npp + p;  /* cnt[v] moves to the end of v's list */
            }
    /* cnt[v] is now the end of v's list, which starts at cnt[v - 1] (0 for v = 0) */
    while (head < tail) {
        int32_t v = queue[head++];
        uint8_t nx = dd[v] >= 254 ? 255 : (uint8_t)(dd[v] + 1);
        for (int32_t k = v ? cnt[v - 1] : 0; k < cnt[v]; k++) {
            int32_t u = adj[k];
            if (!dd[u]) { dd[u] = nx; queue[tail++] = u; }
        }
    }
    for (int64_t u = 0; u < N; u++) if (!dd[u]) dd[u] = 255;
}

/* Run lexer state `start` over the bytes of token ids[i] from offset offs[i], for every i.
 * status[i]: 1 = consumed with the lexer alive, 2 = stuck after an accepting state
 * (sx[i] = that state, sp[i] = offset of the byte that failed), 0 = dead, 3 = reached a state
 * without a row (sx[i], sp[i]: where; the state is reported in missing[]). With `resume`, only
 * the tokens with status 3 run, from there (the caller built the missing rows).
 * Returns the number of missing states. */
int64_t dk_classify(const int32_t *table, const uint8_t *has_row, const uint8_t *acc_any, int32_t start,
                    const uint8_t *data, const int64_t *tok_off, const int64_t *tok_len,
                    const int64_t *ids, const int64_t *offs, int64_t n,
                    uint8_t *status, int32_t *sx, int32_t *sp, int32_t *missing, int64_t max_missing,
                    int32_t resume) {
    int64_t nm = 0;
    for (int64_t i = 0; i < n; i++) {
        if (resume && status[i] != 3) continue;
        int64_t t = ids[i], p = resume ? sp[i] : offs[i], len = tok_len[t];
        const uint8_t *b = data + tok_off[t];
        int32_t s = resume ? sx[i] : start;
        uint8_t st = 1;
        while (p < len) {
            if (!has_row[s]) {
                int found = 0;
                for (int64_t k = 0; k < nm; k++) if (missing[k] == s) { found = 1; break; }
                if (!found) {
                    if (nm >= max_missing) break;  /* no room: this token waits for a later pass */
                    missing[nm++] = s;
                }
                st = 3;
                break;
            }
            int32_t ns = table[(int64_t)s * 256 + b[p]];
            if (ns == 0) { st = acc_any[s] ? 2 : 0; break; }
            s = ns; p++;
        }
        if (p < len && st == 1) st = 3;  /* stopped for want of room in missing[] */
        status[i] = st; sx[i] = s; sp[i] = (int32_t)p;
    }
    return nm;
}
"""

_LIB: Any = None
_TRIED = False
_LOCK = threading.Lock()


def _cache_dir() -> Path:
    env = os.environ.get("DECODEKIT_CACHE_DIR")
    if env is not None and env.strip().lower() not in ("", "off", "none", "0"):
        return Path(env).expanduser() / "native"
    if env is not None:
        return Path(tempfile.gettempdir()) / "decodekit-native"
    return Path.home() / ".cache" / "decodekit" / "native"


def _build() -> Any:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    lib_path = out_dir / f"dk_trie_{digest}.so"
    if not lib_path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        src = out_dir / f"dk_trie_{digest}.{os.getpid()}.c"
        tmp = out_dir / f"dk_trie_{digest}.{os.getpid()}.so"
        src.write_text(SOURCE)
        try:
            subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True,
                           capture_output=True, timeout=60)
            os.replace(tmp, lib_path)
        finally:
            src.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    lib = ctypes.CDLL(str(lib_path))
    fn = lib.dk_walk
    fn.restype = ctypes.c_int64
    # table, has_row, acc_any, loops, has_loop, dd | start, first | n_nodes | depth .. n_dead
    # (16 pointers) | missing, max_missing | the state stack
    fn.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 16 + [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    cl = lib.dk_classify
    cl.restype = ctypes.c_int64
    cl.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int32] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] + [
        ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int32]
    fn.classify = cl
    dd = lib.dk_dd
    dd.restype = None
    dd.argtypes = [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32] + [ctypes.c_void_p] * 5
    fn.dd = dd
    return fn


def classifier() -> Any:
    """The compiled ``dk_classify`` function, or None."""
    walk = trie_walker()
    return None if walk is None else walk.classify


def trie_walker() -> Any:
    """The compiled ``dk_walk`` function, or None (no C compiler, disabled, or build failed)."""
    global _LIB, _TRIED
    if _TRIED:
        return _LIB
    with _LOCK:
        if not _TRIED:
            if os.environ.get("DECODEKIT_NATIVE", "1").strip().lower() not in ("0", "off", "false", "no"):
                try:
                    _LIB = _build()
                except Exception as exc:  # any failure: the numpy walk is used
                    logger.info("native trie walk unavailable (%s); using numpy", exc)
                    _LIB = None
            _TRIED = True
    return _LIB


def ptr(a: np.ndarray) -> int:
    """The data address of a C-contiguous array (for ctypes)."""
    assert a.flags["C_CONTIGUOUS"]
    return a.ctypes.data
