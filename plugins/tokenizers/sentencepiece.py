"""``sentencepiece``: tokenizers saved as a SentencePiece model (``tokenizer.model``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from framework.errors import TokenizerError
from plugins.tokenizers.hf import HFDirMeta

if TYPE_CHECKING:  # pragma: no cover
    import sentencepiece

__all__ = ["SentencePieceTokenizer"]

_SPACE = "\u2581"  # "▁", SentencePiece's visible space


class SentencePieceTokenizer:
    """A SentencePiece model; ``encode``/``decode`` call the C++ library directly.

    * Special ids: control pieces (``<s>``, ``</s>`` ...), the unknown piece, and ids that
      ``tokenizer_config.json``'s ``added_tokens_decoder`` marks special. ``decode`` with
      ``skip_special_tokens=True`` drops them; with ``False`` they are written as their piece text
      (``"<s>"``, ``"<unk>"``), like transformers does, instead of SentencePiece's invisible
      controls and ``" ⁇ "`` for unknown.
    * Unknown: ``encode`` maps text the model cannot represent (only possible without
      ``byte_fallback``) to ``unk``; its ``token_bytes`` is ``b""`` because the original text is
      lost, and ``decode`` skips it like any other special token.
    * Added tokens listed in ``added_tokens_decoder`` with ids past the model's pieces extend the
      vocabulary; they and the special pieces are recognised in ``encode``'s input text, which is
      split around them and each part encoded separately (transformers' ``legacy`` behaviour).
    * ``add_bos`` comes from ``add_bos_token`` in ``tokenizer_config.json`` and defaults to true
      when the model has a BOS piece (as for Llama and Gemma).
    """

    looks_for = ("tokenizer.model", "*.model")

    @staticmethod
    def model_file(path: Path) -> Path | None:
        """``tokenizer.model``, else the directory's only ``*.model`` file."""
        directory = Path(path)
        preferred = directory / "tokenizer.model"
        if preferred.is_file():
            return preferred
        found = [p for p in directory.glob("*.model") if p.is_file()]
        return found[0] if len(found) == 1 else None

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return cls.model_file(path) is not None

    @classmethod
    def from_dir(cls, path: Path) -> "SentencePieceTokenizer":
        import sentencepiece as spm  # imported here: optional dependency

        file = cls.model_file(path)
        if file is None:
            raise TokenizerError(f"no tokenizer.model (or single *.model file) in {str(path)!r}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(file))
        except Exception as exc:
            raise TokenizerError(f"cannot load SentencePiece model {str(file)!r}: {exc}") from exc
        return cls(sp, HFDirMeta(Path(path)))

    def __init__(self, sp: "sentencepiece.SentencePieceProcessor", meta: HFDirMeta, name: str = "sentencepiece"):
        self.name = name
        self._sp = sp
        self.chat_template = meta.chat_template
        n = sp.get_piece_size()
        self._n = n
        self._pieces: list[str] = sp.id_to_piece(list(range(n)))
        unk = sp.unk_id()
        control = {i for i in range(n) if sp.is_control(i)}
        # Added tokens past the model's own pieces: id -> (content, special).
        self._extras = {i: v for i, v in meta.added_tokens.items() if i >= n}
        special = set(control) | {i for i, (_, sp_) in meta.added_tokens.items() if sp_}
        if unk >= 0:
            special.add(unk)
        self.vocab_size = max(n, max(self._extras, default=-1) + 1)

        by_text = {text: i for i, (text, _) in self._extras.items()}

        def tid(text: str | None) -> int | None:
            if not text:
                return None
            if text in by_text:
                return by_text[text]
            i = sp.piece_to_id(text)
            return i if (i != unk or self._pieces[unk] == text) else None

        def positive(i: int) -> int | None:
            return i if i >= 0 else None

        bos = tid(meta.bos_token)
        self.bos_token_id = bos if bos is not None else positive(sp.bos_id())
        eos = tid(meta.eos_token)
        self.eos_token_id = eos if eos is not None else positive(sp.eos_id())
        pad = tid(meta.pad_token)
        self.pad_token_id = pad if pad is not None else positive(sp.pad_id())
        if self.pad_token_id is None:
            self.pad_token_id = meta.pad_id_fallback
        for i in (self.bos_token_id, self.eos_token_id, self.pad_token_id, *map(tid, meta.extra_special)):
            if i is not None:
                special.add(i)
        self.special_ids = frozenset(special)
        eos_ids = {i for i in (self.eos_token_id, *meta.eos_ids_extra) if i is not None and 0 <= i < self.vocab_size}
        self.eos_token_ids = frozenset(eos_ids)
        self.add_bos = self.bos_token_id is not None and (meta.add_bos is None or meta.add_bos)
        self._add_eos = bool(meta.add_eos) and self.eos_token_id is not None

        # Text each special/added id is written as when it is not skipped.
        self._inline_text = {i: self._pieces[i] for i in special if i < n}
        self._inline_text.update({i: text for i, (text, _) in self._extras.items()})
        # decode(skip=True) can hand ids to sp.decode unchanged unless one of these occurs: sp
        # would write unk/user-defined specials as text, and cannot decode added ids at all.
        self._drop = frozenset(special)
        self._needs_care = frozenset((special - control) | set(self._extras))
        self._plain_extras = frozenset(i for i, (_, sp_) in self._extras.items() if not sp_)
        self._breaks = frozenset(special | set(self._extras))
        # Strings split out of encode's input (longest first, so "<s>" never shadows "<s_x>").
        self._text_to_id = {self._inline_text[i]: i for i in sorted(self._inline_text)}
        names = sorted(self._text_to_id, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None
        self._anchor, self._anchor_text = self._find_anchor(unk, control)
        self._table: list[bytes] | None = None

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"

    def _find_anchor(self, unk: int, control: set[int]) -> tuple[int | None, str]:
        """A piece that decodes to a fixed letter with no space: decoding ``[anchor] + ids`` and
        cutting the letter off gives the text of ``ids`` *as a continuation* (SentencePiece only
        strips the leading space at the start of a string)."""
        candidates = [*"aeiontsrAEIOUT0123456789", *(f"<0x{b:02X}>" for b in b"aeAE0")]
        for cand in candidates:
            i = self._sp.piece_to_id(cand)
            if i == unk or i in control:
                continue
            text = self._sp.decode([i])
            if text and not text[0].isspace() and self._sp.decode([i, i]) == text * 2:
                return i, text
        return None, ""

    # -- encode / decode -------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._split_re is None or self._split_re.search(text) is None:
            ids: list[int] = self._sp.encode(text)
        else:
            ids = []
            for k, part in enumerate(self._split_re.split(text)):
                if k % 2:  # odd parts are the captured special strings
                    ids.append(self._text_to_id[part])
                elif part:
                    ids.extend(self._sp.encode(part))
        if add_special_tokens:
            if self.add_bos:
                ids.insert(0, self.bos_token_id)  # type: ignore[arg-type]
            if self._add_eos:
                ids.append(self.eos_token_id)  # type: ignore[arg-type]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        if not isinstance(ids, list):
            ids = list(ids)
        if skip_special_tokens:
            if self._needs_care.isdisjoint(ids):  # the common case: straight to the library
                return self._sp.decode(ids)
            ids = [i for i in ids if i not in self._drop]
            if self._plain_extras.isdisjoint(ids):
                return self._sp.decode(ids)
            return self._render(ids, self._plain_extras)
        return self._render(ids, self._breaks)

    def _render(self, ids: list[int], breaks: frozenset[int]) -> str:
        """Decode runs of ordinary pieces with the library, writing ``breaks`` ids as text."""
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in breaks:
                if run:
                    parts.append(self._decode_run(run, at_start=not any(parts)))
                    run = []
                parts.append(self._inline_text[i])
            else:
                run.append(i)
        if run:
            parts.append(self._decode_run(run, at_start=not any(parts)))
        return "".join(parts)

    def _decode_run(self, run: list[int], at_start: bool) -> str:
        if at_start:
            return self._sp.decode(run)
        if self._anchor is not None:
            return self._sp.decode([self._anchor, *run])[len(self._anchor_text) :]
        # No usable anchor piece (unusual vocabulary): restore the one space decode strips.
        text = self._sp.decode(run)
        return " " + text if self._pieces[run[0]].startswith(_SPACE) and not text.startswith(" ") else text

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._pieces[i] if i < self._n else self._inline_text.get(i, "") for i in ids]

    # -- bytes -----------------------------------------------------------------------------------
    def _piece_bytes(self, i: int) -> bytes:
        if i in self._drop:
            return b""
        if i >= self._n:
            extra = self._extras.get(i)
            return extra[0].encode("utf-8") if extra else b""
        piece = self._pieces[i]
        if len(piece) == 6 and piece.startswith("<0x") and self._sp.is_byte(i):
            return bytes((int(piece[3:5], 16),))
        return piece.replace(_SPACE, " ").encode("utf-8")

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is out of range (vocab_size={self.vocab_size})")
        if self._table is not None:
            return self._table[token_id]
        return self._piece_bytes(token_id)

    def token_byte_table(self) -> list[bytes]:
        if self._table is None:
            self._table = [self._piece_bytes(i) for i in range(self.vocab_size)]
        return self._table
