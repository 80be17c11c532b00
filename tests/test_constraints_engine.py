"""Constraint engine: regex -> byte DFA, masks vs a brute-force reference, EOS, rollback, forced
tokens, bitmask application, tokenizers with byte fallback / split UTF-8, shipped lark grammars
(random walks must parse with lark itself)."""

from __future__ import annotations

import io
import random
import re
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.errors import ConstraintError
from plugins.constraints import regex as rx
from plugins.constraints.automata import compile_dfa, utf8_sequences
from plugins.constraints.frontends import choice_grammar, lark_grammar, regex_grammar
from plugins.constraints.matcher import CompiledGrammar, allocate_token_bitmask, apply_token_bitmask_

CORPUS = [
    '{"name": "Ada", "age": 36, "tags": ["x", "y"], "ok": true, "none": null}',
    "SELECT name, count(*) AS n FROM users WHERE age >= 18 AND city = 'Paris' GROUP BY name;",
    "<call>get_weather(city=\"Zürich\", days=3)</call>",
    "1 + 2 * (3 - 4) / 5 ^ 2",
    "日本語のテキスト 🙂 and ünïcödé, \"quotes\" \\ back",
]


class ByteVocab:
    """A toy tokenizer protocol object over an explicit byte table."""

    def __init__(self, table: list[bytes], eos: int):
        self._t = table
        self.vocab_size = len(table)
        self.eos_token_ids = frozenset({eos})
        self.special_ids = frozenset({eos})

    def token_byte_table(self) -> list[bytes]:
        return self._t


def _sp_tokenizer(tmp_path_factory):
    import sentencepiece as spm

    from plugins.tokenizers.sentencepiece import SentencePieceTokenizer

    d = tmp_path_factory.mktemp("sp")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buf, model_type="bpe", vocab_size=420,
        byte_fallback=True, character_coverage=0.98, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    return SentencePieceTokenizer.from_dir(d)


def _bpe_tokenizer(tmp_path_factory):
    from conftest import train_bytelevel_tokenizer

    from plugins.tokenizers.hf import HFTokenizer

    d = tmp_path_factory.mktemp("bpe")
    train_bytelevel_tokenizer(d)
    return HFTokenizer.from_dir(d)


@pytest.fixture(scope="module", params=["sentencepiece", "bytelevel"])
def tokenizer(request, tmp_path_factory):
    return _sp_tokenizer(tmp_path_factory) if request.param == "sentencepiece" else _bpe_tokenizer(tmp_path_factory)


# ----------------------------------------------------------------------------- regex / DFA


@given(st.integers(0, 0x10FFFF), st.integers(0, 0x10FFFF))
@settings(max_examples=200, deadline=None)
def test_utf8_sequences_encode_exactly_the_range(a, b):
    lo, hi = min(a, b), max(a, b)
    seqs = utf8_sequences(lo, hi)
    probe = {lo, hi, (lo + hi) // 2, min(hi, lo + 1), max(lo, hi - 1)}
    for cp in probe:
        if 0xD800 <= cp <= 0xDFFF:
            continue
        enc = chr(cp).encode("utf-8")
        assert any(len(s) == len(enc) and all(x <= c <= y for c, (x, y) in zip(enc, s)) for s in seqs)
    for s in seqs:  # every sequence decodes to code points inside the range
        first = bytes(x for x, _ in s)
        last = bytes(y for _, y in s)
        for data in (first, last):
            cp = ord(data.decode("utf-8", "surrogatepass"))
            assert lo <= cp <= hi


PATTERNS = [r"[a-z]+\d{2,3}", r"(?i)select|from", r".{0,4}", r"(ab|a)*b?", r"[^\"\\]*", r"\w+@\w+\.com",
            r"(?:\+|-)?\d+(?:\.\d+)?", r"[α-ω]{2}x?", r"a{3}|b{1,}"]  # fmt: skip


@pytest.mark.parametrize("pattern", PATTERNS)
@given(text=st.text(alphabet="abcxyz019@.-+ \"\\αβωSELECTfrom", max_size=8))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_dfa_agrees_with_re_fullmatch(pattern, text):
    dfa = compile_dfa(rx.parse_python_regex(pattern))
    assert dfa.matches(text.encode("utf-8")) == (re.fullmatch(pattern, text) is not None)


def test_non_regular_constructs_are_rejected_by_name():
    for pat, what in [(r"(a)\1", "back-reference"), (r"a(?=b)", "look-around"), (r"a^b", "anchor")]:
        with pytest.raises(ConstraintError, match=what):
            rx.parse_python_regex(pat)


# ----------------------------------------------------------------------------- masks


def brute_force_allowed(cg: CompiledGrammar, pos) -> set[int]:
    """Reference: a token is allowed iff stepping it keeps the lexer and parser alive (the DFAs
    are trimmed, so alive means completable); EOS iff the position accepts."""
    out = {t for t in range(cg.vocab.size) if t not in cg.eos_ids and cg.step(pos, t) is not None}
    if cg.accepts_end(pos):
        out |= set(cg.eos_ids)
    return out


def greedy_encode(cg: CompiledGrammar, text: str) -> list[int]:
    """Longest-match tokenization over the token byte table (SentencePiece's encode adds a
    leading "▁", which a grammar without a leading space rightly refuses)."""
    by = {b: i for i, b in enumerate(cg.vocab.table) if b and i not in cg.vocab.eos_ids}
    data, out, i = text.encode(), [], 0
    while i < len(data):
        for j in range(min(len(data), i + 32), i, -1):
            if data[i:j] in by:
                out.append(by[data[i:j]])
                i = j
                break
        else:
            raise AssertionError(f"no token for {data[i:]!r}")
    return out


def mask_ids(m: int) -> set[int]:
    return {i for i in range(m.bit_length()) if m >> i & 1}


def walk(cg: CompiledGrammar, rng: random.Random, max_steps: int = 300, eos_after: int = 40):
    """Random logits, masked; returns (bytes, finished)."""
    state = cg.new_state()
    V = cg.vocab.size
    bitmask = allocate_token_bitmask(1, V)
    out = b""
    for step in range(max_steps):
        logits = torch.randn(1, V + 7, generator=torch.Generator().manual_seed(rng.randrange(1 << 30)))
        for e in cg.eos_ids:
            logits[0, e] += 0.2 * max(0, step - eos_after)  # lengthen less as we go
        state.fill_bitmask(bitmask, 0)
        apply_token_bitmask_(logits, bitmask)
        assert torch.isfinite(logits).any(), "dead end: no token allowed"
        tok = int(logits.argmax())
        assert tok < V and state.is_token_allowed(tok)
        assert state.advance(tok)
        if state.is_terminated():
            return out, True
        out += cg.vocab.table[tok]
    return out, False


def test_masks_match_brute_force_on_json(tokenizer):
    cg = CompiledGrammar(lark_grammar("json"), tokenizer)
    rng = random.Random(0)
    for text in ['{"a": [1, 2.5e3, "x\\n"], "b": {"c": null}}', '["ünï", true, -0.5]']:
        ids = greedy_encode(cg, text)
        state = cg.new_state()
        for t in ids:
            pos = state._hist[-1]
            assert mask_ids(cg.mask(pos)) == brute_force_allowed(cg, pos)
            assert state.advance(t), (text, tokenizer.decode([t]))
        assert state.is_accepting()
        assert state.advance(next(iter(cg.eos_ids))) and state.is_terminated()
    assert rng  # deterministic


def test_eos_only_where_the_grammar_accepts(tokenizer):
    cg = CompiledGrammar(regex_grammar(r"ab(cd)?"), tokenizer)
    eos = next(iter(cg.eos_ids))
    s = cg.new_state()
    assert not s.is_accepting() and not s.advance(eos)
    for ch in "ab":
        ids = [t for t in range(cg.vocab.size) if cg.vocab.table[t] == ch.encode()]
        assert ids and s.advance(ids[0])
    assert s.is_accepting() and s.is_token_allowed(eos)


def test_special_and_empty_tokens_are_never_allowed(tokenizer):
    cg = CompiledGrammar(lark_grammar("json"), tokenizer)
    allowed = mask_ids(cg.new_state().allowed_mask())
    assert not (allowed & set(tokenizer.special_ids) - set(cg.eos_ids))
    assert all(cg.vocab.table[t] for t in allowed)


def test_tokens_that_split_utf8_characters(tmp_path_factory):
    # byte-fallback style vocabulary: single bytes plus a few pieces
    table = [bytes([b]) for b in range(256)] + [b"\xc3", "ü".encode()[1:], b" \xe6\x97", "日".encode(), b""]
    tok = ByteVocab(table, eos=len(table) - 1)
    cg = CompiledGrammar(regex_grammar(r"[üé]+ 日?"), tok)
    s = cg.new_state()
    assert s.is_token_allowed(256) and not s.is_token_allowed(ord("u"))
    assert s.advance(256) and not s.is_accepting()  # half of ü
    assert s.advance(257) and not s.advance(256 + 3)  # ü done; "日" needs the space first
    assert s.advance(258)  # " \xe6\x97": space and two bytes of 日
    assert s.is_token_allowed(0x9F - 0 if False else 0xA5)  # last byte of 日 (e6 97 a5)
    assert s.advance(0xA5) and s.is_accepting()


def test_rollback_and_forced_tokens(tokenizer):
    cg = CompiledGrammar(choice_grammar(["positive", "negative"]), tokenizer)
    s = cg.new_state()
    enc = greedy_encode(cg, "positive")
    assert s.advance_many(enc) == len(enc)
    assert s.is_accepting()
    forced = s.forced_tokens()
    assert forced == [next(iter(cg.eos_ids))] or forced == sorted(cg.eos_ids)[:1]
    s.rollback(len(enc))
    assert s.num_tokens == 0 and not s.is_accepting()
    # after the first token of "positive", the rest is forced token by token
    s.advance(enc[0])
    rest = s.forced_tokens()
    text = b"".join(cg.vocab.table[t] for t in [enc[0], *rest] if t not in cg.eos_ids)
    assert text in (b"positive", b"negative") or b"positive".startswith(text) or b"negative".startswith(text)
    with pytest.raises(ValueError):
        s.rollback(5)


def test_apply_token_bitmask_batch_and_indices():
    V = 70
    bm = allocate_token_bitmask(3, V)
    bm[0] = 0
    bm[0, 0] = 1 << 5
    bm[2, 2] = 0
    logits = torch.zeros(3, 80)
    apply_token_bitmask_(logits, bm)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [5]
    assert torch.isfinite(logits[1, :V]).all() and torch.isinf(logits[1, 96:]).all() if logits.shape[1] > 96 else True
    assert torch.isinf(logits[2, 64:70]).all() and torch.isfinite(logits[2, :64]).all()
    assert torch.isinf(logits[:, 96:]).all()
    logits = torch.zeros(4, V)
    apply_token_bitmask_(logits, bm[:2], indices=[1, 3])
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[3]).all() and torch.isinf(logits[1]).sum() == V - 1


# ----------------------------------------------------------------------------- shipped grammars


@pytest.mark.parametrize("name", ["json", "arithmetic", "sql_select", "function_call"])
def test_shipped_grammar_random_walks_parse_with_lark(name, tokenizer):
    import lark

    parser = lark.Lark(lark_grammar.__globals__["shipped_grammars"]()[name].read_text(), parser="lalr")
    cg = CompiledGrammar(lark_grammar(name), tokenizer)
    rng = random.Random(zlib.crc32(name.encode()))
    finished = 0
    for _ in range(10):
        data, done = walk(cg, rng)
        if done:
            finished += 1
            parser.parse(data.decode("utf-8"))  # raises if the output is not in the language
    assert finished >= 3


@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
def test_property_regex_walks_fullmatch(seed):
    tok = ByteVocab([bytes([b]) for b in range(256)] + [b"ab", b"12", b"-x", b"\xce", b""], eos=260)
    pattern = r"[a-c]{1,3}-?\d{1,4}(x|yz)?"
    cg = CompiledGrammar(regex_grammar(pattern), tok)
    data, done = walk(cg, random.Random(seed), max_steps=60, eos_after=3)
    assert done and re.fullmatch(pattern, data.decode()) is not None


def test_grammar_errors_name_the_rule():
    with pytest.raises(ConstraintError, match="nothing_here"):
        lark_grammar("start: a\na: nothing_here\n")
    with pytest.raises(ConstraintError, match="zero-width|empty string"):
        CompiledGrammar(lark_grammar('start: A\nA: /x*/\n'), ByteVocab([b"x", b""], eos=1))
