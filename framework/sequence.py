"""Request and sequence state.

A :class:`Request` is what a user submitted; it owns one :class:`Sequence` per completion
(``n`` of them after its prompt is prefilled: they fork from the first and share its KV blocks).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from framework.outputs import CompletionOutput, RequestMetrics, RequestOutput
from framework.sampling_params import SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from framework.beam_search import BeamSearch
    from framework.processors import ProcessorUse
    from framework.tokenizer import IncrementalDetokenizer


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


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
    num_computed_tokens: int = 0
    num_hashed_blocks: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    text: str = ""
    streamed_len: int = 0  # characters of `text` already handed to a streaming consumer
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    slot: int | None = None  # logits-processor slot while running (framework.processors)
    score: float | None = None  # beam search: the finished hypothesis' length-normalised score

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

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
        )


@dataclass(slots=True, eq=False)
class Request:
    """A submitted prompt with its parameters, completions and metrics."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    stream: bool = False
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # n > 1: siblings created after the prompt's prefill
    processors: tuple["ProcessorUse", ...] = ()  # resolved logits processors, in the order they run
    beam: "BeamSearch | None" = None  # beam search state (num_beams > 1); seqs are the running beams
    beam_pending: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> processed logprobs
    prompt_logprobs: list[dict[int, float] | None] | None = None  # prompt_logprobs: one entry per prompt token
    error: str | None = None  # set when the request failed after admission (finish reason "error")

    @property
    def finished(self) -> bool:
        return (self.forked or self.params.num_samples == 1) and all(s.finished for s in self.seqs)

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
        )
