"""Request and sequence state.

A :class:`Request` is what a user submitted; it owns one :class:`Sequence` per completion
(``n`` of them after its prompt is prefilled: they fork from the first and share its KV blocks).

A sequence holds KV blocks in one or more *pools*: the main model's (``kv[0]``) and one per
companion model its request uses (``framework/companions.py``), each a :class:`SeqKV`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from framework.outputs import CompletionOutput, RequestMetrics, RequestOutput
from framework.sampling_params import SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from framework.companions import ModelPool
    from framework.processors import ProcessorUse
    from framework.rerankers import RerankerUse
    from framework.strategies import DecodingStrategy
    from framework.tokenizer import IncrementalDetokenizer


def _mix_seed(seed: int, position: int) -> int:
    """A 63-bit seed from (seed, position): splitmix64's finaliser over both, so nearby seeds
    (forks use seed + index) and nearby positions give unrelated streams."""
    m = (1 << 64) - 1

    def fin(z: int) -> int:
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & m
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & m
        return z ^ (z >> 31)

    return fin((fin(seed & m) + 0x9E3779B97F4A7C15 * (position + 1)) & m) >> 1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class SeqKV:
    """A sequence's blocks in one model's KV pool.

    Token ``i`` of the sequence lives at *cache position* ``i`` — or ``i - num_evicted`` once a KV
    policy has dropped ``num_evicted`` tokens from the middle (attention sinks): then RoPE and
    attention see cache positions, as in StreamingLLM. Its slot is
    ``table[p // block_size] * block_size + p % block_size`` for cache position ``p``.
    """

    table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens (from the start of the sequence) whose KV is in the pool
    num_hashed: int = 0  # leading full blocks registered in the pool's prefix cache
    num_evicted: int = 0  # tokens dropped from the middle by the KV policy

    def cache_len(self) -> int:
        """Cache positions in use (computed tokens still held)."""
        return self.num_computed - self.num_evicted

    def reset(self) -> None:
        self.table.clear()
        self.num_computed = self.num_hashed = self.num_evicted = 0


@dataclass(slots=True, eq=False)
class Sequence:
    """One completion being generated: its tokens, KV blocks and output state."""

    seq_id: int
    request: "Request"
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt + output
    num_prompt_tokens: int
    generator: torch.Generator | None
    detok: "IncrementalDetokenizer | None" = None
    kv: list[SeqKV] = field(default_factory=lambda: [SeqKV()])  # per pool of request.pools; kv[0]: main model
    draft: list[int] = field(default_factory=list)  # provisional tokens (speculative) computed after token_ids
    status: SeqStatus = SeqStatus.WAITING
    _text: str = ""  # the text joined so far; `text` adds the pending pieces
    _pending: list[str] = field(default_factory=list)  # deltas appended since the last join
    text_len: int = 0  # len(text), kept without joining
    streamed_len: int = 0  # characters of `text` already handed out in stream deltas
    streamed_tokens: int = 0  # output tokens (and logprob entries) already handed out in stream deltas
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    slot: int | None = None  # logits-processor slot while running (framework.processors)
    score: float | None = None  # beam score or reranker score
    model: str | None = None  # the model a processor draws this sequence from (output ensembling); None: the main one
    seed: int | None = None  # the seed of ``generator`` (position-keyed draws: generator_at)

    def generator_at(self, position: int) -> torch.Generator | None:
        """The sequence's generator, re-seeded for the draws that decide the token at
        ``position`` (an index into ``token_ids``); None for an unseeded sequence.

        Keying every draw by (seed, position) rather than by how many draws came before makes a
        seeded sequence's tokens independent of how its steps were grouped: ordinary decoding,
        speculative steps whose drafts were accepted, rejected or dropped for the step's token
        budget, and recomputation after preemption all draw the same noise for the same token.
        Every consumer of the generator (sampler, draft model) calls this before drawing."""
        g = self.generator
        if g is None or self.seed is None:
            return g
        return g.manual_seed(_mix_seed(self.seed, position))

    # -- the main model's KV (most code only needs this one) -----------------------------------
    @property
    def block_table(self) -> list[int]:
        return self.kv[0].table

    @property
    def num_computed_tokens(self) -> int:
        return self.kv[0].num_computed

    @num_computed_tokens.setter
    def num_computed_tokens(self, value: int) -> None:
        self.kv[0].num_computed = value

    # -- text ------------------------------------------------------------------------------
    @property
    def text(self) -> str:
        """The output text. Appends (:meth:`append_text`) are O(1): the pieces are joined when
        the text is read, once per read rather than once per token."""
        if self._pending:
            self._text = "".join([self._text, *self._pending])
            self._pending.clear()
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        self._text = value
        self._pending.clear()
        self.text_len = len(value)

    def append_text(self, delta: str) -> None:
        if delta:
            self._pending.append(delta)
            self.text_len += len(delta)

    def text_from(self, start: int) -> str:
        """``text[start:]`` (``start >= 0``), joining only the pieces it needs: O(len(result)
        + pieces looked at) when ``start`` falls in the text appended since the last read."""
        if start >= len(self._text):
            pos, k = self.text_len, len(self._pending)
            while k > 0 and pos > start:
                k -= 1
                pos -= len(self._pending[k])
            return "".join(self._pending[k:])[start - pos :] if pos <= start else self.text[start:]
        return self.text[start:]

    # -- tokens ----------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_scheduled_target(self) -> int:
        """Tokens whose KV the next forward must hold: the known tokens plus any draft."""
        return len(self.token_ids) + len(self.draft)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def token_at(self, i: int) -> int:
        """Token ``i`` of prompt + output + draft."""
        n = len(self.token_ids)
        return self.token_ids[i] if i < n else self.draft[i - n]

    def tokens_between(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output + draft."""
        n = len(self.token_ids)
        if end <= n:
            return self.token_ids[start:end]
        return self.token_ids[start:] + self.draft[max(0, start - n) : end - n]

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def stream_safe_len(self) -> int:
        """Characters of ``text`` that can be shown now: a possible stop-string prefix at the end
        is held back (never less than what was already streamed)."""
        stops = self.request.params.stop
        if self.finished or not stops:
            return self.text_len
        hold = max(len(s) for s in stops) - 1
        return max(self.streamed_len, self.text_len - hold)

    def stream_safe_text(self) -> str:
        """Text that can be shown now: a possible stop-string prefix at the end is held back."""
        return self.text[: self.stream_safe_len()]

    def stream_delta(self) -> CompletionOutput:
        """What is new since the previous call: the stream-safe text, the output tokens and their
        logprobs appended since then (``finish_reason`` set once finished). O(new) — it never
        touches the text or tokens already handed out, so streaming stays O(1) per token."""
        a, end = self.streamed_len, self.stream_safe_len()
        text = self.text_from(a)[: end - a] if end > a else ""
        t = self.num_prompt_tokens + self.streamed_tokens
        n_tok = len(self.token_ids)
        self.streamed_len, self.streamed_tokens = end, n_tok - self.num_prompt_tokens
        return CompletionOutput(
            index=self.index,
            text=text,
            token_ids=self.token_ids[t:],
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else self.logprobs[t - self.num_prompt_tokens :],
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            score=self.score,
            model=self.model,
        )

    def to_output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=self.output_token_ids,
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            score=self.score,
            model=self.model,
        )


@dataclass(slots=True, eq=False)
class Request:
    """A submitted prompt with its parameters, plugin stack, completions and metrics."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    stream: bool = False
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # n > 1: siblings created after the prompt's prefill
    processors: tuple["ProcessorUse", ...] = ()  # resolved logits processors, in the order they run
    pools: tuple["ModelPool", ...] = ()  # KV pools its sequences hold blocks in; pools[0]: the main model
    strategy: "DecodingStrategy | None" = None  # turns its logits into tokens (framework/strategies)
    state: Any = None  # the strategy's per-request state (e.g. the beam search)
    reranker: "RerankerUse | None" = None  # chooses among finished candidates (framework/rerankers.py)
    prompt_logprobs: list[dict[int, float] | None] | None = None  # prompt_logprobs: one entry per prompt token
    error: str | None = None  # set when the request failed after admission (finish reason "error")
    candidates: list[CompletionOutput] | None = None  # reranked: every ranked candidate, best first

    @property
    def finished(self) -> bool:
        return (self.forked or self.params.num_samples == 1) and all(s.finished for s in self.seqs)

    @property
    def streams_partial(self) -> bool:
        """Whether partial outputs can be shown while it runs (not when the final choice is made
        at the end: beam search, or a reranker choosing among candidates)."""
        return self.stream and self.reranker is None and (self.strategy is None or self.strategy.streams)

    def to_delta_output(self) -> RequestOutput:
        """A streaming *delta*: each completion's :meth:`Sequence.stream_delta` (``delta=True``)."""
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.stream_delta() for s in sorted(self.seqs, key=lambda s: s.index)],
            finished=False,
            metrics=self.metrics,
            prompt_logprobs=self.prompt_logprobs,
            error=self.error,
            delta=True,
        )

    def to_output(self) -> RequestOutput:
        seqs = sorted(self.seqs, key=lambda s: s.index)
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=[s.to_output() for s in seqs],
            finished=self.finished,
            metrics=self.metrics,
            prompt_logprobs=self.prompt_logprobs,
            error=self.error,
            candidates=self.candidates,
        )
