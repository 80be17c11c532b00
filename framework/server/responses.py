"""OpenAI response bodies and stream chunks built from :class:`RequestOutput` s."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from framework.outputs import CompletionOutput, RequestOutput


class TokenText:
    """Token id -> the string OpenAI shows for it in logprobs (and its bytes), cached."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.text = lru_cache(maxsize=65536)(self._text)

    def bytes(self, token_id: int) -> bytes:
        try:
            return self.tokenizer.token_bytes(token_id)
        except Exception:  # noqa: BLE001 - an id without bytes shows as empty
            return b""

    def _text(self, token_id: int) -> str:
        b = self.bytes(token_id)
        if not b:  # special tokens contribute no bytes: show their piece
            try:
                return self.tokenizer.convert_ids_to_tokens([token_id])[0] or ""
            except Exception:  # noqa: BLE001
                return ""
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:  # part of a character: OpenAI's "bytes:\x.." form
            return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k] if k else []


def completion_logprobs(c: CompletionOutput, tt: TokenText, k: int, offset: int) -> dict[str, Any] | None:
    """The legacy completions ``logprobs`` object for the tokens of ``c`` (``offset``: where the
    first token's text starts in the choice's text)."""
    if c.logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for tok, entry in zip(c.token_ids, c.logprobs):
        s = tt.text(tok)
        tokens.append(s)
        token_lps.append(entry.get(tok))
        tops.append({tt.text(t): lp for t, lp in _top(entry, k)})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(out: RequestOutput, tt: TokenText, k: int) -> dict[str, Any]:
    """The completions ``logprobs`` object of the prompt's tokens (``echo`` with ``logprobs``):
    the first token has none. Offsets count the text of tokens with bytes (so a BOS token adds
    nothing), matching the echoed prompt text."""
    entries = out.prompt_logprobs or []
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = 0
    for j, tok in enumerate(out.prompt_token_ids):
        entry = entries[j] if j < len(entries) else None
        s = tt.text(tok)
        tokens.append(s)
        token_lps.append(None if entry is None else entry.get(tok))
        tops.append(None if entry is None else {tt.text(t): lp for t, lp in _top(entry, k)})
        offsets.append(offset)
        offset += len(s) if tt.bytes(tok) else 0
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def join_logprobs(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two completions ``logprobs`` objects, one after the other."""
    return {key: first[key] + second[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def chat_logprobs(c: CompletionOutput, tt: TokenText, k: int) -> dict[str, Any] | None:
    """The chat ``logprobs`` object (``{"content": [...], "refusal": None}``)."""
    if c.logprobs is None:
        return None
    content = []
    for tok, entry in zip(c.token_ids, c.logprobs):
        content.append({
            "token": tt.text(tok), "logprob": entry.get(tok), "bytes": list(tt.bytes(tok)),
            "top_logprobs": [{"token": tt.text(t), "logprob": lp, "bytes": list(tt.bytes(t))} for t, lp in _top(entry, k)],
        })
    return {"content": content, "refusal": None}


def finish_reason(c: CompletionOutput) -> str | None:
    """OpenAI's finish reasons: ``stop`` (EOS, stop string or stop token) or ``length``.

    An aborted completion (timeout, shutdown) has none: the error that follows says why."""
    return None if c.finish_reason == "abort" else c.finish_reason


def usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: dict[str, Any] | str) -> str:
    """One Server-Sent Events message."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"
