"""``hf``: tokenizers saved as ``tokenizer.json`` (the Hugging Face ``tokenizers`` library).

Also holds the helpers both built-in tokenizers use to read the Hugging Face side files
(``tokenizer_config.json``, ``special_tokens_map.json``, ``generation_config.json``,
``config.json``, ``chat_template.jinja``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from framework.errors import TokenizerError

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers

__all__ = ["HFTokenizer", "HFDirMeta", "byte_level_char_to_byte"]

# --------------------------------------------------------------------------- side-file metadata


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or ``{}`` when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{str(path)!r} must hold a JSON object, not {type(data).__name__}")
    return data


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as a string or as a serialized
    # AddedToken ({"__type": "AddedToken", "content": "<s>", ...}).
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _id_list(value: Any) -> list[int]:
    if isinstance(value, bool):  # bool is an int subclass; never a token id
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class HFDirMeta:
    """What a model directory's Hugging Face side files say about its tokenizer."""

    def __init__(self, directory: Path):
        tc = read_json(directory / "tokenizer_config.json")
        stm = read_json(directory / "special_tokens_map.json")
        gen = read_json(directory / "generation_config.json")
        cfg = read_json(directory / "config.json")
        self.tokenizer_config = tc

        def content(key: str) -> str | None:  # tokenizer_config wins over special_tokens_map
            found = _token_content(tc.get(key))
            return found if found is not None else _token_content(stm.get(key))

        self.bos_token, self.eos_token = content("bos_token"), content("eos_token")
        self.pad_token, self.unk_token = content("pad_token"), content("unk_token")
        add_bos, add_eos = tc.get("add_bos_token"), tc.get("add_eos_token")
        self.add_bos: bool | None = add_bos if isinstance(add_bos, bool) else None
        self.add_eos: bool | None = add_eos if isinstance(add_eos, bool) else None
        # transformers derives the generation config from config.json when the former is absent.
        ids_src = gen if "eos_token_id" in gen else cfg
        self.eos_ids_extra: list[int] = _id_list(ids_src.get("eos_token_id"))
        self.bos_id_fallback = next(iter(_id_list(gen.get("bos_token_id", cfg.get("bos_token_id")))), None)
        self.pad_id_fallback = next(iter(_id_list(gen.get("pad_token_id", cfg.get("pad_token_id")))), None)
        # added_tokens_decoder: {"32000": {"content": "<pad>", "special": true, ...}}
        self.added_tokens: dict[int, tuple[str, bool]] = {}
        for key, spec in (tc.get("added_tokens_decoder") or {}).items():
            text = _token_content(spec)
            if text is not None and str(key).isdigit():
                self.added_tokens[int(key)] = (text, bool(spec.get("special", False)))
        self.extra_special = [t for t in (_token_content(v) for v in tc.get("additional_special_tokens") or []) if t]
        self.chat_template = self._chat_template(directory, tc)

    @staticmethod
    def _chat_template(directory: Path, tc: dict[str, Any]) -> str | None:
        # Newer transformers saves the template next to the config; it takes precedence there too.
        jinja = directory / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        tpl = tc.get("chat_template")
        if isinstance(tpl, list):  # older multi-template form: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default", next(iter(named.values()), None))
        return tpl if isinstance(tpl, str) else None


# --------------------------------------------------------------------------- byte decoding


def byte_level_char_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode map used by byte-level BPE vocabularies.

    Bytes that are printable, non-space Latin-1 characters stand for themselves; every other byte
    (controls, space, 0x7F-0xA0, 0xAD) is assigned, in byte order, the characters from U+0100 on,
    so every byte has a visible, non-whitespace character.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    kept = set(keep)
    mapping = {chr(b): b for b in keep}
    shifted = 0
    for b in range(256):
        if b not in kept:
            mapping[chr(0x100 + shifted)] = b
            shifted += 1
    return mapping


def _byte_level_translation() -> dict[int, str]:
    # str.translate + encode("latin-1") converts a whole piece in C. Latin-1 characters that are
    # *not* part of the alphabet (e.g. a plain space) are mapped to U+FFFF so the encode fails and
    # the piece is treated as ordinary text instead of being silently misread.
    table: dict[int, str] = {c: "\uffff" for c in range(256)}
    for char, byte in byte_level_char_to_byte().items():
        table[ord(char)] = chr(byte)
    return table


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_parts(component: Any) -> list[dict[str, Any]]:
    """Flatten a (possibly Sequence) decoder / pre-tokenizer into its JSON configs."""
    if component is None:
        return []
    try:
        state = json.loads(component.__getstate__())
    except Exception:  # a component without JSON state tells us nothing
        return []
    out: list[dict[str, Any]] = []
    stack = [state]
    while stack:
        item = stack.pop(0)
        if isinstance(item, dict):
            out.append(item)
            stack.extend(item.get("decoders") or item.get("pretokenizers") or [])
    return out


def _detect_style(tok: "tokenizers.Tokenizer") -> tuple[str, str]:
    """``("byte_level" | "metaspace" | "generic", space_symbol)`` from the decoder, falling back
    to the pre-tokenizer and the model's ``byte_fallback`` flag."""
    for parts in (_decoder_parts(tok.decoder), _decoder_parts(tok.pre_tokenizer)):
        types = {p.get("type") for p in parts}
        if "ByteLevel" in types:
            return "byte_level", ""
        for p in parts:
            if p.get("type") == "Metaspace":
                return "metaspace", p.get("replacement", "\u2581")
            pattern = p.get("pattern")
            if p.get("type") == "Replace" and p.get("content") == " " and isinstance(pattern, dict):
                if isinstance(pattern.get("String"), str):
                    return "metaspace", pattern["String"]
        if "ByteFallback" in types:
            return "metaspace", "\u2581"
    if getattr(tok.model, "byte_fallback", False):
        return "metaspace", "\u2581"
    return "generic", ""


# --------------------------------------------------------------------------- the tokenizer


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer; ``encode``/``decode`` call the Rust library directly.

    Special ids are the added tokens marked special in ``tokenizer.json`` plus the bos/eos/pad/
    unk/additional special tokens named in ``tokenizer_config.json`` or ``special_tokens_map.json``
    (promoted to special in the backend, as transformers does). Without side files, ``<s>``/
    ``</s>``-style names are guessed among the special added tokens. ``add_bos`` follows
    ``add_bos_token`` from ``tokenizer_config.json`` when given (BOS/EOS are then added here
    instead of by the post-processor), else whatever ``tokenizer.json``'s post-processor does.
    """

    looks_for = ("tokenizer.json",)
    _BOS_GUESSES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
    _EOS_GUESSES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return (Path(path) / "tokenizer.json").is_file()

    @classmethod
    def from_dir(cls, path: Path) -> "HFTokenizer":
        from tokenizers import Tokenizer as _RustTokenizer  # imported here: optional dependency

        directory = Path(path)
        file = directory / "tokenizer.json"
        try:
            tok = _RustTokenizer.from_file(str(file))
        except Exception as exc:
            raise TokenizerError(f"cannot load {str(file)!r}: {exc}") from exc
        return cls(tok, HFDirMeta(directory))

    def __init__(self, tok: "tokenizers.Tokenizer", meta: HFDirMeta, name: str = "hf"):
        from tokenizers import AddedToken

        self.name = name
        self._tok = tok
        # Some tokenizer.json files ship padding/truncation settings for training; the engine
        # decides lengths itself, and encode must return exactly the text's tokens.
        tok.no_truncation()
        tok.no_padding()
        self.chat_template = meta.chat_template
        added = tok.get_added_tokens_decoder()
        special_contents = {a.content for a in added.values() if a.special}

        def guess(names: Sequence[str]) -> str | None:
            return next((n for n in names if n in special_contents), None)

        has_side_files = bool(meta.tokenizer_config)
        bos = meta.bos_token or (None if has_side_files else guess(self._BOS_GUESSES))
        eos = meta.eos_token or (None if has_side_files else guess(self._EOS_GUESSES))
        # Promote tokens the config calls special but tokenizer.json does not, so that the
        # library's skip_special_tokens (the fast path) drops exactly ``special_ids``.
        named = [t for t in (bos, eos, meta.pad_token, meta.unk_token, *meta.extra_special) if t]
        promote = [t for t in dict.fromkeys(named) if t not in special_contents and tok.token_to_id(t) is not None]
        if promote:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in promote])
            added = tok.get_added_tokens_decoder()
        self._added: dict[int, Any] = added
        self.special_ids = frozenset(i for i, a in added.items() if a.special)
        self.vocab_size = max(tok.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)

        def tid(text: str | None, fallback: int | None = None) -> int | None:
            found = tok.token_to_id(text) if text else None
            return found if found is not None else fallback

        self.bos_token_id = tid(bos, meta.bos_id_fallback)
        self.eos_token_id = tid(eos, next(iter(meta.eos_ids_extra), None))
        self.pad_token_id = tid(meta.pad_token, meta.pad_id_fallback)
        eos_ids = {i for i in (self.eos_token_id, *meta.eos_ids_extra) if i is not None and 0 <= i < self.vocab_size}
        self.eos_token_ids = frozenset(eos_ids)

        # What does the post-processor add on its own? Probe once with a one-character text.
        plain = tok.encode("a", add_special_tokens=False).ids
        full = tok.encode("a", add_special_tokens=True).ids
        natural_bos = self.bos_token_id is not None and len(full) > len(plain) and full[0] == self.bos_token_id
        natural_eos = self.eos_token_id is not None and len(full) > len(plain) and full[-1] == self.eos_token_id
        want_bos = natural_bos if meta.add_bos is None else meta.add_bos and self.bos_token_id is not None
        want_eos = natural_eos if meta.add_eos is None else meta.add_eos and self.eos_token_id is not None
        # Only when the config contradicts the post-processor do we add BOS/EOS by hand.
        self._manual = (want_bos, want_eos) != (natural_bos, natural_eos)
        self.add_bos = want_bos
        self._add_eos = want_eos

        self._style, self._space = _detect_style(tok)
        self._convert: Callable[[str, int], bytes] | None = None
        self._table: list[bytes] | None = None

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, style={self._style!r})"

    # -- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not self._manual:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos:
                ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]
            if self._add_eos:
                ids.append(self.eos_token_id)  # type: ignore[arg-type]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids if isinstance(ids, list) else list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in ids]

    # -- bytes -----------------------------------------------------------------------------------
    def _converter(self) -> Callable[[str, int], bytes]:
        if self._convert is None:
            self._convert = self._make_converter()
        return self._convert

    def _make_converter(self) -> Callable[[str, int], bytes]:
        """piece, id -> bytes for model-vocabulary tokens, chosen by the vocabulary's style."""
        if self._style == "byte_level":
            trans = _byte_level_translation()

            def byte_level(piece: str, _id: int) -> bytes:
                try:
                    return piece.translate(trans).encode("latin-1")
                except UnicodeEncodeError:  # not byte-level text: take the piece literally
                    return piece.encode("utf-8")

            return byte_level
        if self._style == "metaspace":
            space, fallback = self._space, bool(getattr(self._tok.model, "byte_fallback", False))

            def metaspace(piece: str, _id: int) -> bytes:
                if fallback and len(piece) == 6:
                    m = _BYTE_PIECE.fullmatch(piece)
                    if m:
                        return bytes((int(m.group(1), 16),))
                return piece.replace(space, " ").encode("utf-8")

            return metaspace
        decode = self._tok.decode
        # Unknown decoder (e.g. WordPiece): the token's text when decoded on its own.
        return lambda _piece, i: decode([i], skip_special_tokens=False).encode("utf-8")

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is out of range (vocab_size={self.vocab_size})")
        if self._table is not None:
            return self._table[token_id]
        at = self._added.get(token_id)
        if at is not None:
            return b"" if at.special else at.content.encode("utf-8")
        piece = self._tok.id_to_token(token_id)
        return b"" if piece is None else self._converter()(piece, token_id)

    def token_byte_table(self) -> list[bytes]:
        if self._table is None:
            table = [b""] * self.vocab_size
            convert = self._converter()
            for piece, i in self._tok.get_vocab(with_added_tokens=False).items():
                table[i] = convert(piece, i)
            # Added tokens are matched and decoded as literal text, never through the decoder.
            for i, at in self._added.items():
                table[i] = b"" if at.special else at.content.encode("utf-8")
            self._table = table
        return self._table
