"""What the engine returns: completions, per-request metrics, per-step stats."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CompletionOutput:
    """One generated completion of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None  # per token: {token_id: logprob} (sampled + top-N)
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    score: float | None = None  # beam search: the length-normalised beam score; reranked: the reranker's score
    # the model that sampled it, when a processor chose one per sample (output ensembling: the
    # main model's name or a member's alias; its cumulative_logprob and logprobs are that model's);
    # None otherwise (the main model)
    model: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Timestamps (time.perf_counter seconds) and derived latencies of one request."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.first_token_time is None or self.last_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    """The state of one request: its prompt and its completions so far (or final)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    # prompt_logprobs: per prompt token {token_id: logprob, top alternatives...}; None for the first
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # why the request failed after it was accepted (its completions finish with reason "error"),
    # e.g. its constraint did not compile in time; None otherwise
    error: str | None = None
    # a reranked request: every candidate the reranker ranked, best first, each with its score
    # (``outputs`` are the first ``n`` of them); None without a reranker
    candidates: list[CompletionOutput] | None = None
    # a partial output of a streaming request (``add_request(..., stream=True)``): each completion's
    # ``text``, ``token_ids`` and ``logprobs`` hold only what is new since the request's previous
    # output, so streaming costs O(new tokens) per step, not O(length). A request's final output
    # (``finished``) is always cumulative (``delta`` False).
    delta: bool = False


@dataclass(slots=True)
class StepStats:
    """What one engine step did (handed to ``on_step_finished`` observers)."""

    step: int
    num_running: int
    num_waiting: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_preempted: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_cache_hit_rate: float
    step_time: float
    finished_request_ids: list[str] = field(default_factory=list)
