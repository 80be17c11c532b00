"""The core's view of tokenizers: a protocol, streaming detokenization, and loading by registry.

The core never imports a tokenizer library. Implementations live in plugins (built-ins: ``hf``
over the ``tokenizers`` library and ``sentencepiece``) and register through the
``register_tokenizers`` hook; :func:`load_tokenizer` picks one for a model directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

from framework.errors import DecodekitError, TokenizerError

if TYPE_CHECKING:  # pragma: no cover
    from framework.plugins import PluginManager

__all__ = ["Tokenizer", "IncrementalDetokenizer", "load_tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the engine, samplers and constraint compilers need from a tokenizer.

    Attributes:
        name: registry name of the implementation (``"hf"``, ``"sentencepiece"`` ...).
        vocab_size: number of token ids, including added and special tokens (ids are
            ``range(vocab_size)``; an id with no token behind it has ``token_bytes == b""``).
        bos_token_id / eos_token_id / pad_token_id: the primary special ids, or ``None``.
        eos_token_ids: every id that ends generation: ``eos_token_id`` plus the ids listed as
            ``eos_token_id`` (int or list) in the directory's ``generation_config.json`` (e.g.
            ``<|im_end|>``, ``<|eot_id|>``).
        special_ids: ids that ``decode(..., skip_special_tokens=True)`` drops; their
            ``token_bytes`` is ``b""``.
        add_bos: whether ``encode(text, add_special_tokens=True)`` prepends ``bos_token_id``.
        chat_template: the Jinja chat template shipped with the tokenizer, or ``None``.

    ``token_bytes(i)`` is the exact byte string token ``i`` contributes to the output when it
    follows other tokens: a SentencePiece ``▁hello`` gives ``b" hello"`` (the leading-space
    stripping that ``decode`` applies at the very start of a string is *not* applied), a
    byte-fallback ``<0xE2>`` gives ``b"\\xe2"``, a byte-level BPE ``Ġhello`` gives ``b" hello"``,
    special tokens give ``b""``. A token may carry part of a UTF-8 character, so the bytes of a
    single token need not be valid UTF-8. ``token_byte_table()`` returns ``token_bytes`` for every
    id (computed once and cached).
    """

    name: str
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    eos_token_ids: frozenset[int]
    pad_token_id: int | None
    special_ids: frozenset[int]
    add_bos: bool
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` BOS (and whatever else the
        tokenizer's post-processing adds) is included."""
        ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; incomplete UTF-8 sequences decode to U+FFFD."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """Bytes token ``token_id`` contributes to the output (see the class docstring)."""
        ...

    def token_byte_table(self) -> list[bytes]:
        """``token_bytes`` for every id in ``range(vocab_size)``; cached after the first call."""
        ...

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary strings (pieces) of ``ids``, e.g. ``["▁Hello", "<0xE2>"]``."""
        ...


_REPLACEMENT = "\ufffd"
# How many already-emitted tokens to re-decode as context. Five is what vLLM and TGI use: enough
# for decoders whose output depends on the previous token (leading-space stripping, byte runs).
_CONTEXT_TOKENS = 5
# A prompt can end inside a UTF-8 character; at most three of its tokens (four bytes minus one)
# can then belong to the character the output completes.
_MAX_PARTIAL_TOKENS = 3


class IncrementalDetokenizer:
    """Turns one sequence's output tokens into text deltas while they are generated.

    Contract: the deltas returned by :meth:`add` followed by :meth:`flush` concatenate to
    ``tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)):]`` — the text the output
    adds after the prompt (with the same ``skip_special_tokens``). Note this is *not* always
    ``decode(output)``: SentencePiece-style tokenizers strip the leading space of the first token
    of a string, but the first output token's leading space after a prompt is real text. Two
    consequences of decoding in context: with no prompt, the first token's leading space is
    stripped exactly as ``decode(output)`` would; and when the prompt itself ends in the middle of
    a UTF-8 character, the character the output completes is returned as output text (where the
    formula above would lose it).

    Every delta is whole characters: text is held back while the decoded tail ends in U+FFFD (an
    incomplete byte run that later tokens may complete) and released by the token that completes
    it; :meth:`flush` returns whatever is still held (as U+FFFD if it never completed).

    The contract assumes ``decode`` is local: text already complete does not change when more
    tokens follow. All built-in tokenizers are, for valid UTF-8; the one exception is an invalid
    byte sequence under tokenizers' ``ByteFallback`` decoder, which rewrites the *whole* byte run
    (including characters already emitted) as U+FFFDs — streamed text then keeps the characters.

    Cost: each :meth:`add` decodes a window of a few tokens — the tokens already emitted since the
    previous emission plus a short context (``prefix_offset``/``read_offset`` as in vLLM and TGI)
    — so it is O(window), not O(length). The context is widened until it decodes to non-empty
    text, which keeps first-token space stripping from leaking into the delta after skipped
    special tokens or a lone ``▁``.
    """

    __slots__ = ("_tok", "_skip", "_ids", "_prompt_len", "_prefix", "_read", "_prefix_text", "_chunks", "_text")

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_token_ids)
        self._prompt_len = len(self._ids)
        self._chunks: list[str] = []
        self._text: str | None = ""
        read = len(self._ids)
        # If the prompt ends inside a character, re-read its tail as output so that character is
        # emitted whole once completed (and the context text never ends in U+FFFD).
        for _ in range(_MAX_PARTIAL_TOKENS):
            self._read, self._prefix = read, max(0, read - _CONTEXT_TOKENS)
            self._prefix_text = self._settle_prefix()
            if read == 0 or not self._prefix_text.endswith(_REPLACEMENT):
                break
            read -= 1

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tok.decode(self._ids[start:stop], skip_special_tokens=self._skip)

    def _settle_prefix(self) -> str:
        """Decode the context window ``ids[prefix:read]``, moving its start back while

        * it decodes to nothing (only skipped specials / a stripped lone space): the window's
          first visible token must lie in the context, or the decoder would strip the new
          token's leading space;
        * it starts with U+FFFD (the start cuts a character's bytes): some decoders (tokenizers'
          ``ByteFallback``) turn a whole byte run into U+FFFDs when it starts mid-character, which
          would swallow the new bytes that continue the run. A few tokens back is a boundary.
        """
        text = self._decode(self._prefix, self._read)
        back = 0
        while self._prefix > 0 and (not text or (text[0] == _REPLACEMENT and back < _MAX_PARTIAL_TOKENS + 1)):
            if text:
                back += 1
                self._prefix -= 1
            else:
                self._prefix = max(0, self._prefix - _CONTEXT_TOKENS)
            text = self._decode(self._prefix, self._read)
        return text

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it makes final (often ``""``)."""
        self._ids.append(token_id)
        full = self._decode(self._prefix)
        prefix_text = self._prefix_text
        if len(full) <= len(prefix_text) or full.endswith(_REPLACEMENT):
            # Nothing visible yet, or the tail is an incomplete character: hold it back.
            return ""
        delta = full[len(prefix_text) :]
        self._prefix = self._read
        self._read = len(self._ids)
        self._prefix_text = self._settle_prefix()
        self._emit(delta)
        return delta

    def flush(self) -> str:
        """End of sequence: return any held-back text (U+FFFD for bytes that never completed)."""
        if self._read >= len(self._ids):
            return ""
        full = self._decode(self._prefix)
        delta = full[len(self._prefix_text) :]
        self._prefix = self._read
        self._read = len(self._ids)
        self._prefix_text = self._settle_prefix()
        self._emit(delta)
        return delta

    def _emit(self, delta: str) -> None:
        if delta:
            self._chunks.append(delta)
            self._text = None  # joined lazily: .text is read far less often than add() runs

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of every returned delta)."""
        if self._text is None:
            self._text = "".join(self._chunks)
            self._chunks = [self._text]
        return self._text

    @property
    def output_token_ids(self) -> list[int]:
        """The output tokens added so far."""
        return self._ids[self._prompt_len :]


def load_tokenizer(
    path: str | os.PathLike[str],
    name: str | None = None,
    plugin_manager: PluginManager | None = None,
) -> Tokenizer:
    """Load the tokenizer of a model directory.

    With ``name``, the registered tokenizer ``name`` is used (``factory.from_dir(path)``).
    Without, the first registered tokenizer (in registration order: built-in ``hf``, then
    ``sentencepiece``, then third-party plugins) whose ``factory.can_load(path)`` is true.

    Raises:
        TokenizerError: the directory does not exist, no registered tokenizer can load it (the
            message names the directory and the files looked for), or loading failed.
        PluginError: ``name`` is not a registered tokenizer.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {str(directory)!r} does not exist or is not a directory")
    if plugin_manager is None:
        from framework.plugins import get_plugin_manager

        plugin_manager = get_plugin_manager()
    if name is not None:
        reg = plugin_manager.get("tokenizer", name)
    else:
        registry = plugin_manager.registry("tokenizer")
        reg = next((r for r in registry if r.factory.can_load(directory)), None)
        if reg is None:
            # Factories may list their file patterns in ``looks_for`` so this message can name them.
            looked_for = "; ".join(
                f"{' or '.join(getattr(r.factory, 'looks_for', None) or ('files its can_load() accepts',))} ({r.name})"
                for r in registry
            )
            raise TokenizerError(
                f"no tokenizer found in {str(directory)!r}: looked for {looked_for or 'nothing (no tokenizer plugin registered)'}"
            )
    try:
        tokenizer = reg.factory.from_dir(directory)
    except DecodekitError:
        raise
    except Exception as exc:  # a library error must still say which directory and plugin
        raise TokenizerError(f"tokenizer {reg.name!r} failed to load {str(directory)!r}: {exc}") from exc
    return tokenizer
