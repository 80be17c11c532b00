"""Bans: no-repeat n-grams, bad words and phrases, and min_tokens.

Each bans a handful of tokens per row, found from per-sequence state in O(1) per row (a table
of n-grams seen so far, a table of bad-word prefixes), then masked with one indexed write.
"""

from __future__ import annotations

import torch
from pydantic import Field

from framework.processors import RequestInfo, Stage, StepContext
from framework.sampling_params import SamplingParams
from plugins.samplers.slots import ProcessorParams, SlotProcessor

_NEG_INF = float("-inf")


def _mask(logits: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    if rows:
        dev = logits.device
        logits[torch.tensor(rows, dtype=torch.int64, device=dev), torch.tensor(cols, dtype=torch.int64, device=dev)] = _NEG_INF
    return logits


class NoRepeatNGram(SlotProcessor):
    """Never complete an n-gram that already occurs in prompt + output (HF
    ``NoRepeatNGramLogitsProcessor``). Keeps, per sequence, a table from each (n-1)-gram to
    the tokens that followed it, extended by one entry per generated token."""

    stage = Stage.BAN

    class Params(ProcessorParams):
        size: int = Field(ge=1, description="n: every n-gram occurs at most once")

    def __init__(self, setup):
        super().__init__(setup)
        self.tables: dict[int, dict[tuple[int, ...], set[int]]] = {}

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Params | None:
        return cls.Params(size=params.no_repeat_ngram_size) if params.no_repeat_ngram_size else None

    def init_slot(self, slot: int, params: Params, request: RequestInfo) -> None:
        n, toks = params.size, list(request.token_ids)
        table: dict[tuple[int, ...], set[int]] = {}
        for i in range(len(toks) - n + 1):
            table.setdefault(tuple(toks[i : i + n - 1]), set()).add(toks[i + n - 1])
        self.tables[slot] = table

    def remove(self, slot: int) -> None:
        super().remove(slot)
        self.tables.pop(slot, None)

    def fork_extra(self, src: int, dst: int) -> None:
        self.tables[dst] = {k: set(v) for k, v in self.tables[src].items()}

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        rows: list[int] = []
        cols: list[int] = []
        for r, (slot, p) in enumerate(zip(ctx.slots, self.row_params(ctx))):
            toks = ctx.token_ids[r]
            if len(toks) < p.size - 1:
                continue
            banned = self.tables[slot].get(tuple(toks[len(toks) - p.size + 1 :]))
            if banned:
                rows += [r] * len(banned)
                cols += banned
        return _mask(logits, rows, cols)

    def on_tokens(self, ctx: StepContext, tokens: torch.Tensor) -> None:
        for r, (slot, p, tok) in enumerate(zip(ctx.slots, self.row_params(ctx), tokens.tolist())):
            toks = ctx.token_ids[r]
            if len(toks) >= p.size - 1:
                self.tables[slot].setdefault(tuple(toks[len(toks) - p.size + 1 :]), set()).add(tok)


def tokenize_bad_words(tokenizer, words: list[str]) -> list[list[int]]:
    """Token sequences for ``words`` as vLLM forms them: each word as it starts a text, and with
    a leading space (mid-text) when that gives a different first token and as many tokens."""
    out: list[list[int]] = []
    for word in words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if plain:
            out.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
            out.append(spaced)
    return out


class BadWords(SlotProcessor):
    """Never generate the given token sequences (HF ``NoBadWordsLogitsProcessor``): a one-token
    word is always banned; a longer one only where the tokens so far (prompt + output) end with
    all but its last token, i.e. where the next token would complete it."""

    stage = Stage.BAN

    class Params(ProcessorParams):
        words: list[str] = Field(default_factory=list, description="tokenized with the request's tokenizer")
        token_ids: list[list[int]] = Field(default_factory=list, description="token sequences")

    def __init__(self, setup):
        super().__init__(setup)
        # slot -> (always banned tokens, {prefix length: {prefix: [last tokens]}})
        self.tables: dict[int, tuple[list[int], dict[int, dict[tuple[int, ...], list[int]]]]] = {}

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Params | None:
        if not params.bad_words and not params.bad_words_ids:
            return None
        return cls.Params(words=params.bad_words, token_ids=params.bad_words_ids)

    def prepare(self, params: Params, sampling: SamplingParams) -> Params:
        seqs = [list(s) for s in params.token_ids]
        if params.words:
            if self.setup.tokenizer is None:
                raise ValueError("bad words need a tokenizer; pass token sequences (bad_words_ids) instead")
            seqs += tokenize_bad_words(self.setup.tokenizer, params.words)
        if any(not s for s in seqs):
            raise ValueError("a bad word token sequence must not be empty")
        bad = sorted({t for s in seqs for t in s if not 0 <= t < self.vocab_size})
        if bad:
            raise ValueError(f"token id(s) {bad} outside the vocabulary [0, {self.vocab_size})")
        unique = list(dict.fromkeys(tuple(s) for s in seqs))
        return self.Params(token_ids=[list(s) for s in unique])

    def init_slot(self, slot: int, params: Params, request: RequestInfo) -> None:
        single: list[int] = []
        multi: dict[int, dict[tuple[int, ...], list[int]]] = {}
        for seq in params.token_ids:
            if len(seq) == 1:
                single.append(seq[0])
            else:
                multi.setdefault(len(seq) - 1, {}).setdefault(tuple(seq[:-1]), []).append(seq[-1])
        self.tables[slot] = (single, multi)

    def remove(self, slot: int) -> None:
        super().remove(slot)
        self.tables.pop(slot, None)

    def fork_extra(self, src: int, dst: int) -> None:
        self.tables[dst] = self.tables[src]  # read-only after init

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        rows: list[int] = []
        cols: list[int] = []
        for r, slot in enumerate(ctx.slots):
            single, multi = self.tables[slot]
            if single:
                rows += [r] * len(single)
                cols += single
            toks = ctx.token_ids[r]
            for plen, table in multi.items():
                if len(toks) >= plen:
                    last = table.get(tuple(toks[len(toks) - plen :]))
                    if last:
                        rows += [r] * len(last)
                        cols += last
        return _mask(logits, rows, cols)


class MinTokens(SlotProcessor):
    """Mask EOS and the request's stop token ids until ``min_tokens`` tokens were generated
    (vLLM ``min_tokens``; HF ``MinNewTokensLengthLogitsProcessor``). EOS is not masked for a
    request with ``ignore_eos`` (it does not stop that request anyway)."""

    stage = Stage.BAN

    class Params(ProcessorParams):
        min_tokens: int = Field(ge=1)
        token_ids: list[int] | None = Field(None, description="tokens to mask; default: EOS + stop_token_ids")

    @classmethod
    def from_sampling_params(cls, params: SamplingParams) -> Params | None:
        return cls.Params(min_tokens=params.min_tokens) if params.min_tokens else None

    def prepare(self, params: Params, sampling: SamplingParams) -> Params:
        ids = params.token_ids
        if ids is None:
            eos = set() if sampling.ignore_eos else set(self.setup.eos_token_ids)
            ids = sorted(eos | set(sampling.stop_token_ids))
        bad = sorted(t for t in ids if not 0 <= t < self.vocab_size)
        if bad:
            raise ValueError(f"token id(s) {bad} outside the vocabulary [0, {self.vocab_size})")
        return self.Params(min_tokens=params.min_tokens, token_ids=list(ids))

    def apply(self, logits: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        rows: list[int] = []
        cols: list[int] = []
        for r, p in enumerate(self.row_params(ctx)):
            if ctx.num_output_tokens(r) < p.min_tokens and p.token_ids:
                rows += [r] * len(p.token_ids)
                cols += p.token_ids
        return _mask(logits, rows, cols)
