"""Built-in tokenizers: ``hf`` (``tokenizer.json``) and ``sentencepiece`` (``tokenizer.model``).

``hf`` is registered first, so a directory holding both files is loaded with ``tokenizer.json``
(the fast tokenizer, whose added tokens and post-processor are authoritative).
"""

from __future__ import annotations

from framework.hookspecs import Register, hookimpl
from plugins.tokenizers.hf import HFTokenizer
from plugins.tokenizers.sentencepiece import SentencePieceTokenizer

__all__ = ["HFTokenizer", "SentencePieceTokenizer", "register_tokenizers"]


@hookimpl
def register_tokenizers(register: Register) -> None:
    register("hf", HFTokenizer)
    register("sentencepiece", SentencePieceTokenizer)
