"""Prometheus metrics of the server, in the text exposition format (no client library needed).

Histograms and counters are fed by the engine thread (through :class:`ServerMetrics`, an
:class:`~framework.async_engine.EngineObserver`) and by the HTTP layer; gauges are read from the
engine's published :class:`~framework.async_engine.EngineSnapshot` when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import TYPE_CHECKING

from framework.async_engine import EngineObserver
from framework.outputs import RequestOutput

if TYPE_CHECKING:  # pragma: no cover
    from framework.async_engine import AsyncEngine

PREFIX = "decodekit"

# seconds; covers a tiny model on CPU (sub-millisecond steps) up to slow first tokens under load
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                   0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class Histogram:
    """A cumulative Prometheus histogram (thread-safe)."""

    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name = name
        self.help = help_text
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        if math.isnan(value):
            return
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def quantile(self, q: float) -> float:
        """An upper bound of the ``q`` quantile (the bucket edge it falls in); nan when empty."""
        with self._lock:
            counts, total = list(self._counts), self._count
        if not total:
            return math.nan
        rank, acc = q * total, 0
        for edge, c in zip(self.buckets + (math.inf,), counts):
            acc += c
            if acc >= rank:
                return edge
        return math.inf

    def render(self) -> list[str]:
        with self._lock:
            counts, total, s = list(self._counts), self._count, self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for edge, c in zip(self.buckets, counts):
            acc += c
            lines.append(f'{self.name}_bucket{{le="{_num(edge)}"}} {acc}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {total}')
        lines.append(f"{self.name}_sum {_num(s)}")
        lines.append(f"{self.name}_count {total}")
        return lines


class Counter:
    """A monotonically increasing counter, optionally with one label (thread-safe)."""

    def __init__(self, name: str, help_text: str, label: str | None = None):
        self.name = name
        self.help = help_text
        self.label = label
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, label_value: str = "") -> None:
        with self._lock:
            self._values[label_value] = self._values.get(label_value, 0.0) + amount

    def value(self, label_value: str = "") -> float:
        return self._values.get(label_value, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        if self.label is None:
            lines.append(f"{self.name} {_num(items[0][1] if items else 0.0)}")
        else:
            lines += [f'{self.name}{{{self.label}="{_escape(k)}"}} {_num(v)}' for k, v in items]
        return lines


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_SPEC_HELP = {
    "spec_num_drafts": "sequence-steps that verified a draft",
    "spec_num_draft_tokens": "draft tokens proposed and verified",
    "spec_num_accepted_tokens": "draft tokens accepted",
    "spec_num_emitted_tokens": "tokens appended by verification steps",
    "spec_num_verify_steps": "target forwards that verified at least one draft",
    "spec_draft_forwards": "draft-model forwards",
    "spec_acceptance_rate": "accepted / drafted tokens",
    "spec_mean_accepted_length": "accepted tokens per verified draft",
}


def _gauge(name: str, help_text: str, value: float) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_num(value)}"]


class ServerMetrics(EngineObserver):
    """Every metric the server exports; also the engine thread's observer."""

    def __init__(self) -> None:
        p = PREFIX
        self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Time from arrival to the first generated token.")
        self.tpot = Histogram(f"{p}_time_per_output_token_seconds", "Mean time per output token after the first, per request.")
        self.itl = Histogram(f"{p}_inter_token_latency_seconds", "Time between consecutive tokens of a request.")
        self.e2e = Histogram(f"{p}_e2e_request_latency_seconds", "Time from arrival to the end of a request.")
        self.prompt_tokens = Counter(f"{p}_prompt_tokens_total", "Prompt tokens of accepted requests.")
        self.generation_tokens = Counter(f"{p}_generation_tokens_total", "Tokens generated.")
        self.requests = Counter(f"{p}_requests_total", "Requests that ended, by finish reason.", "finish_reason")
        self.http = Counter(f"{p}_http_responses_total", "HTTP responses of the API routes, by status code.", "status")

    # --- engine thread ---------------------------------------------------------------------
    def on_added(self, request_id: str, num_prompt_tokens: int) -> None:
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_first_token(self, ttft: float) -> None:
        self.ttft.observe(ttft)

    def on_tokens(self, itl: float) -> None:
        self.itl.observe(itl)

    def on_finished(self, output: RequestOutput, reason: str) -> None:
        m = output.metrics
        self.generation_tokens.inc(sum(len(c.token_ids) for c in output.outputs))
        if m.tpot is not None:
            self.tpot.observe(m.tpot)
        if m.e2e is not None:
            self.e2e.observe(m.e2e)
        if reason == "finished":
            for c in output.outputs:
                self.requests.inc(1, c.finish_reason or "unknown")
        else:
            self.requests.inc(1, reason)

    # --- scrape ----------------------------------------------------------------------------
    def render(self, engine: "AsyncEngine") -> str:
        """The whole exposition text."""
        s = engine.snapshot
        p = PREFIX
        lines: list[str] = []
        lines += _gauge(f"{p}_num_requests_waiting", "Requests waiting for a place in the batch (queue length).", engine.queue_length())
        lines += _gauge(f"{p}_num_requests_running", "Sequences in the running batch.", s.num_running)
        lines += _gauge(f"{p}_num_requests_active", "Requests accepted and not yet finished.", engine.num_active)
        lines += _gauge(f"{p}_kv_blocks_total", "KV-cache blocks in the pool.", s.kv_blocks_total)
        lines += _gauge(f"{p}_kv_blocks_used", "KV-cache blocks held by sequences.", s.kv_blocks_used)
        lines += _gauge(f"{p}_kv_blocks_free", "KV-cache blocks free (cached prefix blocks included).", s.kv_blocks_free)
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        lines += _gauge(f"{p}_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", usage)
        lines += _gauge(f"{p}_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up.", s.prefix_cache_hit_rate)
        lines += [f"# HELP {p}_prefix_cache_queries_total Prompt tokens looked up in the prefix cache.",
                  f"# TYPE {p}_prefix_cache_queries_total counter", f"{p}_prefix_cache_queries_total {s.prefix_cache_queries}",
                  f"# HELP {p}_prefix_cache_hits_total Prompt tokens found in the prefix cache.",
                  f"# TYPE {p}_prefix_cache_hits_total counter", f"{p}_prefix_cache_hits_total {s.prefix_cache_hits}",
                  f"# HELP {p}_num_preemptions_total Sequences preempted (recomputed later).",
                  f"# TYPE {p}_num_preemptions_total counter", f"{p}_num_preemptions_total {s.num_preemptions}",
                  f"# HELP {p}_engine_steps_total Engine steps run.",
                  f"# TYPE {p}_engine_steps_total counter", f"{p}_engine_steps_total {s.steps}"]
        for key, value in sorted(s.speculative.items()):  # only when the engine has a drafter
            if key.endswith(("_rate", "_length")):
                lines += _gauge(f"{p}_{key}", f"Speculative decoding: {_SPEC_HELP.get(key, key)}.", value)
            else:
                name = f"{p}_{key}_total"
                lines += [f"# HELP {name} Speculative decoding: {_SPEC_HELP.get(key, key)}.",
                          f"# TYPE {name} counter", f"{name} {_num(value)}"]
        for metric in (self.prompt_tokens, self.generation_tokens, self.requests, self.http,
                       self.ttft, self.tpot, self.itl, self.e2e):
            lines += metric.render()
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` from exposition text (for tests and the load benchmark)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out
