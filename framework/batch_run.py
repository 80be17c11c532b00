"""``decodekit run``: a pipeline over a file of prompts, written as JSON lines as they finish.

* Prompts come from ``.txt`` (one per non-empty line; the id is the line number), ``.jsonl``
  (``{"id": ..., "prompt": ...}`` or ``{"id": ..., "messages": [...]}``; the id defaults to the
  line number) or stdin (``-``, one prompt per line).
* Each finished request is appended to the output at once and flushed, so an interrupted run
  loses nothing; running the same command again skips the ids already written (a torn last line
  left by a kill is dropped first).
* Requests are fed to the engine in a bounded window so memory stays flat on huge files.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

from framework.errors import ConfigError, InvalidRequestError
from framework.outputs import RequestOutput


@dataclass(slots=True)
class PromptRecord:
    id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None

    def display(self) -> Any:
        return self.prompt if self.prompt is not None else self.messages


def read_prompts(path: str, fmt: str | None = None, stdin: IO[str] | None = None) -> list[PromptRecord]:
    """Read prompt records; errors name the file and line."""
    if path == "-":
        lines = (stdin or sys.stdin).read().splitlines()
        source = "<stdin>"
        fmt = fmt or "txt"
    else:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: prompts file not found")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        source = path
        fmt = fmt or ("jsonl" if p.suffix in (".jsonl", ".json") else "txt")
    records: list[PromptRecord] = []
    seen: set[str] = set()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if fmt == "txt":
            rec = PromptRecord(id=str(lineno), prompt=line)
        else:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{source}:{lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{source}:{lineno}: each line must be a JSON object")
            rid = str(obj.get("id", lineno))
            if "prompt" in obj and isinstance(obj["prompt"], str):
                rec = PromptRecord(id=rid, prompt=obj["prompt"])
            elif "messages" in obj:
                from framework.chat import validate_messages

                try:
                    rec = PromptRecord(id=rid, messages=validate_messages(obj["messages"]))
                except InvalidRequestError as exc:
                    raise ConfigError(f"{source}:{lineno}: {exc}") from None
            else:
                raise ConfigError(f"{source}:{lineno}: needs a string 'prompt' or a 'messages' list")
        if rec.id in seen:
            raise ConfigError(f"{source}:{lineno}: duplicate id {rec.id!r}")
        seen.add(rec.id)
        records.append(rec)
    return records


def done_ids(output: Path) -> set[str]:
    """Ids already in ``output``; a torn (unterminated or unparsable) last line is cut off."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    ids: set[str] = set()
    good = 0
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break  # unterminated last line: written partly when the run was killed
        try:
            ids.add(str(json.loads(data[pos:nl])["id"]))
        except (ValueError, KeyError, TypeError):
            break
        pos = good = nl + 1
    if good < len(data):
        with output.open("r+b") as f:
            f.truncate(good)
    return ids


def _percentiles(xs: list[float], qs=(50, 90, 99)) -> dict[int, float]:
    if not xs:
        return {q: math.nan for q in qs}
    s = sorted(xs)
    return {q: s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))] for q in qs}


@dataclass(slots=True)
class RunSummary:
    requests: int = 0
    skipped: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)

    def lines(self) -> list[str]:
        tps = self.output_tokens / self.seconds if self.seconds > 0 else 0.0
        t = _percentiles(self.ttft)
        o = _percentiles(self.tpot)
        return [
            f"requests: {self.requests} done, {self.skipped} skipped (already in output), {self.failed} failed",
            f"tokens: {self.prompt_tokens} prompt, {self.output_tokens} generated in {self.seconds:.1f} s ({tps:.1f} tok/s)",
            "TTFT ms: p50 {:.1f}  p90 {:.1f}  p99 {:.1f}".format(*(t[q] * 1e3 for q in (50, 90, 99))),
            "TPOT ms: p50 {:.1f}  p90 {:.1f}  p99 {:.1f}".format(*(o[q] * 1e3 for q in (50, 90, 99))),
        ]


def result_record(rec: PromptRecord, out: RequestOutput) -> dict[str, Any]:
    m = out.metrics
    return {
        "id": rec.id,
        "prompt": rec.display(),
        "outputs": [
            {
                "index": c.index,
                "text": c.text,
                "finish_reason": c.finish_reason,
                "num_tokens": len(c.token_ids),
                "cumulative_logprob": c.cumulative_logprob,
                **({"score": c.score} if c.score is not None else {}),
            }
            for c in out.outputs
        ],
        "finish_reason": out.outputs[0].finish_reason if out.outputs else None,
        "prompt_tokens": len(out.prompt_token_ids),
        "output_tokens": sum(len(c.token_ids) for c in out.outputs),
        "timings": {"queue_s": m.queue_time, "ttft_s": m.ttft, "tpot_s": m.tpot, "e2e_s": m.e2e},
    }


def run_records(pipeline, records: list[PromptRecord], output: Path, *, progress: bool | None = None,
                window: int | None = None, overrides: dict[str, Any] | None = None) -> RunSummary:
    """Generate every record not yet in ``output``; append results as they finish."""
    from framework.chat import render_chat

    summary = RunSummary()
    done = done_ids(output)
    todo = [r for r in records if r.id not in done]
    summary.skipped = len(records) - len(todo)
    engine = pipeline.engine
    params = pipeline.sampling_params(**(overrides or {}))
    window = window or max(4 * engine.config.max_num_seqs, 16)
    output.parent.mkdir(parents=True, exist_ok=True)
    bar = _bar(len(todo), progress)
    t0 = time.perf_counter()
    it: Iterator[PromptRecord] = iter(todo)
    inflight: dict[str, PromptRecord] = {}
    try:
        with output.open("a", encoding="utf-8") as f:
            def fill() -> None:
                while len(inflight) < window:
                    rec = next(it, None)
                    if rec is None:
                        return
                    prompt = rec.prompt if rec.prompt is not None else render_chat(pipeline.tokenizer, rec.messages or [])
                    rid = f"run-{rec.id}"
                    try:
                        engine.add_request(rid, prompt, params)
                    except InvalidRequestError as exc:  # a bad prompt fails alone
                        summary.failed += 1
                        f.write(json.dumps({"id": rec.id, "prompt": rec.display(), "error": str(exc)}, ensure_ascii=False) + "\n")
                        f.flush()
                        continue
                    inflight[rid] = rec

            fill()
            while inflight:
                for out in engine.step():
                    if not out.finished or out.request_id not in inflight:
                        continue
                    rec = inflight.pop(out.request_id)
                    f.write(json.dumps(result_record(rec, out), ensure_ascii=False) + "\n")
                    f.flush()
                    summary.requests += 1
                    summary.prompt_tokens += len(out.prompt_token_ids)
                    n_out = sum(len(c.token_ids) for c in out.outputs)
                    summary.output_tokens += n_out
                    if out.metrics.ttft is not None:
                        summary.ttft.append(out.metrics.ttft)
                    if out.metrics.tpot is not None:
                        summary.tpot.append(out.metrics.tpot)
                    if bar is not None:
                        el = time.perf_counter() - t0
                        bar.set_postfix_str(f"{summary.output_tokens / el:.0f} tok/s", refresh=False)
                        bar.update(1)
                fill()
    except BaseException:
        for rid in list(inflight):
            engine.abort_request(rid)
        raise
    finally:
        if bar is not None:
            bar.close()
        summary.seconds = time.perf_counter() - t0
    return summary


def _bar(total: int, progress: bool | None):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", dynamic_ncols=True)

