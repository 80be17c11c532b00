"""Tokenizer layer: plugins, byte tables and streaming detokenization on tiny trained tokenizers."""

from __future__ import annotations

import io
import json
import random
import time
from pathlib import Path

import pytest

from framework.errors import PluginError, TokenizerError
from framework.plugins import get_plugin_manager
from framework.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer
from plugins.tokenizers.hf import HFTokenizer, byte_level_char_to_byte
from plugins.tokenizers.sentencepiece import SentencePieceTokenizer

CORPUS = """The quick brown fox jumps over the lazy dog. Hello world, hello there!
Tokenizers turn text into numbers and back again, then stream it out token by token.
我们今天去公园散步。你好世界，你好朋友。今天天气很好。
日本語のテキストも少し入れます。東京と大阪。
Emoji are fun 😀 🎉 and sometimes 👍 or ❤️.
Numbers like 12345 and 67890 appear too; so do (brackets) and "quotes".
""".splitlines()

TEXTS = {
    "ascii": "Hello world, the quick brown fox jumps over the lazy dog.",
    "cjk": "我们今天去公园散步。你好世界！한국어 텍스트",  # Korean never seen in training
    "emoji": "Emoji 😀🎉👍 fun 🧑‍🚀 and 🇯🇵 flags",
    "mixed": "Mixed: 日本語 and emoji 🚀 together ☃ — ok? Ω≈ç√ 12345",
    "spaces": "two  spaces, a\ttab and\na newline",
}
IM_END = "<|im_end|>"
TEMPLATE = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"


def _write(directory: Path, name: str, obj: dict) -> None:
    (directory / name).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def _train_sp(directory: Path) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_writer=buf, model_type="bpe", vocab_size=400,
        byte_fallback=True, character_coverage=0.995, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=[IM_END], minloglevel=2,
    )  # fmt: skip
    (directory / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    n = sp.get_piece_size()
    _write(directory, "tokenizer_config.json", {
        "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "chat_template": TEMPLATE,
        "added_tokens_decoder": {
            str(sp.piece_to_id(IM_END)): {"content": IM_END, "special": True},
            str(n): {"content": "<pad>", "special": True},
            str(n + 1): {"content": "<tool>", "special": False},
        },
    })  # fmt: skip
    _write(directory, "generation_config.json", {"eos_token_id": [2, sp.piece_to_id(IM_END)]})


def _train_byte_level(directory: Path) -> None:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "</s>", IM_END], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.add_tokens(["<tool call>", "héllo wörld"])  # non-special added tokens: literal text
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(directory / "tokenizer.json"))
    _write(directory, "tokenizer_config.json", {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": TEMPLATE})
    _write(directory, "generation_config.json", {"eos_token_id": [1, tok.token_to_id(IM_END)]})


def _train_metaspace(directory: Path, llama_decoder: bool) -> None:
    """BPE with byte_fallback and a Metaspace pre-tokenizer, like Llama/Mistral tokenizer.json."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    pre = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tmp = RustTokenizer(models.BPE(unk_token="<unk>"))
    tmp.pre_tokenizer = pre
    tmp.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    trained = json.loads(tmp.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre
    if llama_decoder:
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    else:
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="\u2581", prepend_scheme="first")])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(directory / "tokenizer.json"))  # no side files: bos/eos are guessed


@pytest.fixture(scope="session")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind, build in {
        "sentencepiece": _train_sp,
        "hf_byte_level": _train_byte_level,
        "hf_llama": lambda d: _train_metaspace(d, llama_decoder=True),
        "hf_metaspace": lambda d: _train_metaspace(d, llama_decoder=False),
    }.items():
        out[kind] = tmp_path_factory.mktemp(kind)
        build(out[kind])
    return out


KINDS = ["sentencepiece", "hf_byte_level", "hf_llama", "hf_metaspace"]
# Bytes the first token carries that decode() strips at the start of a string (dummy prefix).
LEADING = {"sentencepiece": b" ", "hf_byte_level": b"", "hf_llama": b" ", "hf_metaspace": b" "}


@pytest.fixture(scope="session")
def toks(dirs: dict[str, Path]) -> dict[str, Tokenizer]:
    return {kind: load_tokenizer(path) for kind, path in dirs.items()}


# ----------------------------------------------------------------------------------- loading


def test_plugins_registered_in_order() -> None:
    names = get_plugin_manager().registry("tokenizer").names()
    assert "hf" in names and "sentencepiece" in names
    assert names.index("hf") < names.index("sentencepiece")


def test_auto_selection(toks: dict[str, Tokenizer], dirs: dict[str, Path], tmp_path: Path) -> None:
    assert isinstance(toks["sentencepiece"], SentencePieceTokenizer)
    for kind in ("hf_byte_level", "hf_llama", "hf_metaspace"):
        assert isinstance(toks[kind], HFTokenizer)
    assert all(isinstance(t, Tokenizer) for t in toks.values())
    # Both files present: hf wins unless sentencepiece is asked for by name.
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.json").write_bytes((dirs["hf_byte_level"] / "tokenizer.json").read_bytes())
    (both / "tokenizer.model").write_bytes((dirs["sentencepiece"] / "tokenizer.model").read_bytes())
    assert load_tokenizer(both).name == "hf"
    assert load_tokenizer(both, name="sentencepiece").name == "sentencepiece"
    # Any single *.model file is accepted; two are ambiguous.
    other = tmp_path / "other"
    other.mkdir()
    (other / "spm.model").write_bytes((dirs["sentencepiece"] / "tokenizer.model").read_bytes())
    assert load_tokenizer(other).encode("hi") == toks["sentencepiece"].encode("hi")[:1] + toks["sentencepiece"].encode("hi", False)
    (other / "second.model").write_bytes(b"x")
    assert not SentencePieceTokenizer.can_load(other)


def test_load_errors(tmp_path: Path, dirs: dict[str, Path]) -> None:
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value) and "tokenizer.json" in str(err.value) and "tokenizer.model" in str(err.value)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(PluginError, match="sentencepiece"):
        load_tokenizer(dirs["sentencepiece"], name="sentencepeice")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)


# ----------------------------------------------------------------------------------- specials


def test_special_ids_sentencepiece(toks: dict[str, Tokenizer]) -> None:
    t = toks["sentencepiece"]
    im_end = t.encode(IM_END, add_special_tokens=False)[-1]
    assert (t.bos_token_id, t.eos_token_id) == (1, 2)
    assert t.vocab_size == 402 and t.pad_token_id == 400
    assert t.eos_token_ids == {2, im_end}
    assert {0, 1, 2, 400, im_end} <= t.special_ids and 401 not in t.special_ids
    assert t.add_bos and t.encode("hi")[0] == 1 and t.encode("hi", add_special_tokens=False)[0] != 1
    assert t.chat_template == TEMPLATE
    ids = t.encode("a</s>b<tool>c<pad>", add_special_tokens=False)
    assert 2 in ids and 401 in ids and 400 in ids
    # Text after a split-out token gets SentencePiece's dummy prefix again (transformers' legacy).
    assert t.decode(ids) == "a b<tool> c"
    assert t.decode(ids, skip_special_tokens=False) == "a</s> b<tool> c<pad>"
    assert t.decode([1, *t.encode("x y", False), 2], skip_special_tokens=False) == "<s> x y</s>"
    assert t.token_bytes(401) == b"<tool>" and t.token_bytes(400) == b"" == t.token_bytes(0)
    assert t.convert_ids_to_tokens([1, 401]) == ["<s>", "<tool>"]


def test_special_ids_hf(toks: dict[str, Tokenizer]) -> None:
    t = toks["hf_byte_level"]
    im_end = t.encode(IM_END, add_special_tokens=False)
    assert len(im_end) == 1
    assert (t.bos_token_id, t.eos_token_id) == (0, 1)
    assert t.eos_token_ids == {1, im_end[0]} and t.special_ids == {0, 1, im_end[0]}
    assert t.add_bos and t.encode("hi")[0] == 0 and t.chat_template == TEMPLATE
    tool = t.encode("<tool call>", add_special_tokens=False)
    assert len(tool) == 1 and t.token_bytes(tool[0]) == b"<tool call>"
    word = t.encode("héllo wörld", add_special_tokens=False)
    assert len(word) == 1 and t.token_bytes(word[0]) == "héllo wörld".encode()
    for kind in ("hf_llama", "hf_metaspace"):  # no side files: <s>/</s> guessed, post-processor adds BOS
        m = toks[kind]
        assert (m.bos_token_id, m.eos_token_id, m.pad_token_id) == (1, 2, None)
        assert m.eos_token_ids == {2} and m.special_ids == {0, 1, 2} and m.add_bos
        assert m.encode("hi")[0] == 1 and m.token_bytes(1) == b"" and m.chat_template is None


def test_hf_add_bos_from_config(dirs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((dirs["hf_byte_level"] / "tokenizer.json").read_bytes())
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<tool call>", "add_bos_token": False, "add_eos_token": True}
    _write(tmp_path, "tokenizer_config.json", config)
    t = load_tokenizer(tmp_path)
    plain = t.encode("hi there", add_special_tokens=False)
    assert not t.add_bos and t.encode("hi there") == [*plain, 1]
    # A token the config calls special becomes special (skipped, no bytes) as in transformers.
    pad = t.encode("<tool call>", add_special_tokens=False)
    assert pad == [t.pad_token_id] and pad[0] in t.special_ids and t.token_bytes(pad[0]) == b""
    assert t.decode([*plain, *pad]) == "hi there" and t.decode(pad, skip_special_tokens=False) == "<tool call>"


# ----------------------------------------------------------------------------------- bytes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(TEXTS))
def test_token_bytes_concatenate_to_text(toks: dict[str, Tokenizer], kind: str, name: str) -> None:
    t, text = toks[kind], TEXTS[name]
    ids = t.encode(text, add_special_tokens=False)
    assert t.decode(ids) == text
    assert b"".join(t.token_bytes(i) for i in ids) == LEADING[kind] + text.encode()
    table = t.token_byte_table()
    assert b"".join(table[i] for i in ids) == LEADING[kind] + text.encode()
    if name in ("cjk", "emoji"):  # the test is only meaningful if byte fallback really happened
        assert any(len(table[i]) == 1 and table[i][0] >= 0x80 for i in ids)


@pytest.mark.parametrize("kind", KINDS)
def test_byte_table_matches_single_token_decode(toks: dict[str, Tokenizer], kind: str) -> None:
    t = toks[kind]
    table = t.token_byte_table()
    assert len(table) == t.vocab_size and t.token_byte_table() is table
    # Decode each token after an anchor letter, so SentencePiece-style leading-space stripping
    # (which only applies at the start of a string) does not hide the token's real bytes.
    anchor = t.convert_ids_to_tokens(range(t.vocab_size)).index("e")
    checked = 0
    for i, expected in enumerate(table):
        if i in t.special_ids:
            assert expected == b"" and t.decode([anchor, i]) == "e"
            continue
        try:
            text = expected.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: decode is not well defined alone
            continue
        assert t.decode([anchor, i]) == "e" + text, (i, t.convert_ids_to_tokens([i]))
        assert t.token_bytes(i) == expected
        checked += 1
    assert checked > t.vocab_size // 3
    for bad in (-1, t.vocab_size):
        with pytest.raises(TokenizerError, match="out of range"):
            t.token_bytes(bad)
    if kind != "hf_byte_level":
        byte_ids = t.encode("\u00e9", add_special_tokens=False)  # é is not in any training text
        assert [table[i] for i in byte_ids][-2:] == [b"\xc3", b"\xa9"]


def test_byte_level_table_matches_transformers(dirs: dict[str, Path], toks: dict[str, Tokenizer]) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    assert byte_level_char_to_byte() == byte_decoder
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(dirs["hf_byte_level"] / "tokenizer.json"))
    t = toks["hf_byte_level"]
    table = t.token_byte_table()
    pieces = ref.convert_ids_to_tokens(list(range(t.vocab_size)))
    added = {i for i in range(t.vocab_size) if i in t.special_ids or "tool" in pieces[i] or " " in pieces[i]}
    assert len(added) == 5
    for i, piece in enumerate(pieces):
        if i not in added:
            assert table[i] == bytes(byte_decoder[c] for c in piece), piece
    assert t.convert_ids_to_tokens([5, 6]) == pieces[5:7]


def test_byte_table_fast_for_large_vocab(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    to_char = {b: c for c, b in byte_level_char_to_byte().items()}
    rng = random.Random(0)
    raw = {bytes(rng.randrange(256) for _ in range(rng.randint(2, 10))) for _ in range(160_000)}
    vocab = {"".join(to_char[b] for b in bytes([i])): i for i in range(256)}
    for token in sorted(raw):
        vocab.setdefault("".join(to_char[b] for b in token), len(vocab))
    tok = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(tmp_path / "tokenizer.json"))
    t = load_tokenizer(tmp_path)
    start = time.perf_counter()
    table = t.token_byte_table()
    elapsed = time.perf_counter() - start
    assert len(table) == len(vocab) > 150_000
    assert all(table[i] == bytes(byte_level_char_to_byte()[c] for c in piece) for piece, i in list(vocab.items())[::997])
    assert elapsed < 1.5, f"token_byte_table took {elapsed:.2f}s"


# ----------------------------------------------------------------------------------- streaming


def _stream(t: Tokenizer, prompt: list[int], output: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(t, prompt, skip_special_tokens=skip)
    deltas = [detok.add(i) for i in output] + [detok.flush()]
    assert detok.text == "".join(deltas) and detok.output_token_ids == output
    return deltas


def _expected(t: Tokenizer, prompt: list[int], output: list[int], skip: bool = True) -> str:
    return t.decode(prompt + output, skip_special_tokens=skip)[len(t.decode(prompt, skip_special_tokens=skip)) :]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(TEXTS))
def test_detokenizer_every_split(toks: dict[str, Tokenizer], kind: str, name: str) -> None:
    t = toks[kind]
    ids = t.encode(TEXTS[name])
    assert "".join(_stream(t, [], ids)) == t.decode(ids) == TEXTS[name]
    for k in range(1, len(ids)):
        prompt, output = ids[:k], ids[k:]
        if t.decode(prompt).endswith("\ufffd"):
            continue  # the prompt ends inside a character: see test_prompt_ending_mid_character
        deltas = _stream(t, prompt, output)
        assert "".join(deltas) == _expected(t, prompt, output)
        for d in deltas:
            assert "\ufffd" not in d and d.encode("utf-8").decode("utf-8") == d


@pytest.mark.parametrize("kind", KINDS)
def test_detokenizer_holds_back_partial_characters(toks: dict[str, Tokenizer], kind: str) -> None:
    t = toks[kind]
    prompt = t.encode("Say:")
    output = t.encode("🧑‍🚀한", add_special_tokens=False)
    assert len(output) > 4  # several tokens per character, or the test proves nothing
    deltas = _stream(t, prompt, output)
    assert "".join(deltas) == _expected(t, prompt, output) and "".join(deltas).endswith("🧑‍🚀한")
    assert "" in deltas and all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_random_mixes_with_specials(toks: dict[str, Tokenizer], kind: str, skip: bool) -> None:
    t = toks[kind]
    rng = random.Random(kind)
    snippets = [t.encode(s, add_special_tokens=False) for s in [*TEXTS.values(), " x", "你", "🎉", "a  "]]
    specials = [[i] for i in sorted(t.special_ids | t.eos_token_ids)] + [t.encode(" <tool call> ", False)]
    for _ in range(60):
        parts = [rng.choice(specials if rng.random() < 0.3 else snippets) for _ in range(rng.randint(1, 8))]
        ids = [i for p in parts for i in p]
        k = rng.randint(0, len(ids))
        prompt, output = ids[:k], ids[k:]
        if t.decode(prompt, skip_special_tokens=skip).endswith("\ufffd"):
            continue
        assert "".join(_stream(t, prompt, output, skip)) == _expected(t, prompt, output, skip), (prompt, output)


@pytest.mark.parametrize("kind", ["sentencepiece", "hf_byte_level"])
def test_detokenizer_random_ids(toks: dict[str, Tokenizer], kind: str) -> None:
    # Arbitrary ids, including invalid byte sequences; holds wherever decode is local (not for
    # tokenizers' ByteFallback, which turns a whole byte run into U+FFFDs if any byte is bad).
    t = toks[kind]
    rng = random.Random(1)
    byte_ids = [i for i, b in enumerate(t.token_byte_table()) if len(b) == 1 and b[0] >= 0x80]
    for _ in range(200):
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(t.vocab_size) for _ in range(rng.randint(1, 20))]
        k = rng.randint(0, len(ids))
        prompt, output = ids[:k], ids[k:]
        if t.decode(prompt).endswith("\ufffd"):
            continue
        deltas = _stream(t, prompt, output)
        assert "".join(deltas) == _expected(t, prompt, output)
        assert all(not d.endswith("\ufffd") for d in deltas[:-1])  # only flush may end incomplete


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_ending_mid_character(toks: dict[str, Tokenizer], kind: str) -> None:
    t = toks[kind]
    ids = t.encode("A 🧑‍🚀 b", add_special_tokens=False)
    cut = next(k for k in range(1, len(ids)) if t.decode(ids[:k]).endswith("\ufffd"))
    deltas = _stream(t, ids[:cut], ids[cut:])
    text = "".join(deltas)
    # The character the output completes is part of the output, whole.
    full = t.decode(ids)
    assert "\ufffd" not in text and "🧑" in text and full.endswith(text) and text.endswith(" b")
    assert t.decode(ids[:cut]).startswith(full[: len(full) - len(text)])


@pytest.mark.parametrize("kind", KINDS)
def test_detokenizer_window_stays_small(toks: dict[str, Tokenizer], kind: str) -> None:
    t = toks[kind]
    lengths: list[int] = []

    class Counting:
        def __getattr__(self, name: str):  # everything else straight through
            return getattr(t, name)

        def decode(self, ids, skip_special_tokens=True):
            lengths.append(len(ids))
            return t.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = t.encode(" ".join(TEXTS.values()) * 20, add_special_tokens=False)
    detok = IncrementalDetokenizer(Counting(), t.encode("prompt " * 200))  # type: ignore[arg-type]
    for i in ids:
        detok.add(i)
    detok.flush()
    assert len(ids) > 1000 and detok.text == _expected(t, t.encode("prompt " * 200), ids)
    assert max(lengths) <= 16
