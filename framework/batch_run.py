"""``decodekit run``: a pipeline over a file of prompts, written as JSON lines as they finish.

* Prompts come from ``.txt`` (one per non-empty line; the id is the line number), ``.jsonl``
  (``{"id": ..., "prompt": ...}``, ``{"id": ..., "messages": [...]}`` or
  ``{"id": ..., "prompt_token_ids": [...]}``; the id defaults to the line number) or stdin
  (``-``, one prompt per line).
* Each finished request is appended to the output at once and flushed, so an interrupted run
  loses nothing; running the same command again generates only what is missing. What counts as
  done, and which files are refused, is :mod:`framework.results_file`'s business: results carry a
  fingerprint of the spec, overrides and prompt, failed requests are retried, and a file that is
  not a decodekit results file is never written into.
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
    prompt_token_ids: list[int] | None = None

    def display(self) -> Any:
        if self.prompt is not None:
            return self.prompt
        return self.messages if self.messages is not None else self.prompt_token_ids


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
            elif "prompt_token_ids" in obj:
                ids = obj["prompt_token_ids"]
                if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise ConfigError(f"{source}:{lineno}: prompt_token_ids must be a non-empty list of integers")
                rec = PromptRecord(id=rid, prompt_token_ids=ids)
            elif "messages" in obj:
                from framework.chat import validate_messages

                try:
                    rec = PromptRecord(id=rid, messages=validate_messages(obj["messages"]))
                except InvalidRequestError as exc:
                    raise ConfigError(f"{source}:{lineno}: {exc}") from None
            else:
                raise ConfigError(f"{source}:{lineno}: needs a string 'prompt', a 'messages' list or 'prompt_token_ids'")
        if rec.id in seen:
            raise ConfigError(f"{source}:{lineno}: duplicate id {rec.id!r}")
        seen.add(rec.id)
        records.append(rec)
    return records


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
    skipped_lines: list[int] = field(default_factory=list)  # lines of the output that were not records

    def add(self, out: RequestOutput) -> None:
        """Count one finished request (a failed one as failed)."""
        if out.error is not None:
            self.failed += 1
            return
        self.requests += 1
        self.prompt_tokens += len(out.prompt_token_ids)
        self.output_tokens += sum(len(c.token_ids) for c in out.outputs)
        if out.metrics.ttft is not None:
            self.ttft.append(out.metrics.ttft)
        if out.metrics.tpot is not None:
            self.tpot.append(out.metrics.tpot)

    def lines(self) -> list[str]:
        tps = self.output_tokens / self.seconds if self.seconds > 0 else 0.0
        out = [f"requests: {self.requests} done, {self.skipped} skipped (already in output), {self.failed} failed"]
        if self.skipped_lines:
            shown = ", ".join(map(str, self.skipped_lines[:10])) + (" ..." if len(self.skipped_lines) > 10 else "")
            out.append(f"warning: the output has {len(self.skipped_lines)} line(s) that are not result records "
                       f"(line {shown}): skipped, left as they are")
        if self.requests == 0:
            return out + ["tokens: none generated (every prompt was already in the output)" if self.skipped and not self.failed
                          else "tokens: none generated"]
        out.append(f"tokens: {self.prompt_tokens} prompt, {self.output_tokens} generated in {self.seconds:.1f} s ({tps:.1f} tok/s)")
        for name, xs in (("TTFT", self.ttft), ("TPOT", self.tpot)):
            if xs:
                p = _percentiles(xs)
                out.append(f"{name} ms: p50 {p[50] * 1e3:.1f}  p90 {p[90] * 1e3:.1f}  p99 {p[99] * 1e3:.1f}")
        return out


def _completion_record(c: Any, token_ids: bool) -> dict[str, Any]:
    return {
        "index": c.index,
        "text": c.text,
        **({"token_ids": list(c.token_ids)} if token_ids else {}),
        "finish_reason": c.finish_reason,
        "num_tokens": len(c.token_ids),
        "cumulative_logprob": c.cumulative_logprob,
        **({"score": c.score} if c.score is not None else {}),
        **({"model": c.model} if c.model is not None else {}),
    }


def result_record(rec: PromptRecord, out: RequestOutput, fingerprint: dict[str, Any] | None = None,
                  token_ids: bool = False, all_candidates: bool = False) -> dict[str, Any]:
    """The JSON line of one finished request (``token_ids``: include each output's token ids,
    as runs without a tokenizer do; ``all_candidates``: a reranked request also lists every
    candidate the reranker ranked, best first with its score, under ``candidates``). A request
    that failed after admission (its constraint did not compile) is an error record."""
    if out.error is not None:
        return error_record(rec, out.error, fingerprint)
    m = out.metrics
    cands = out.candidates if all_candidates and out.candidates is not None else None
    return {
        "id": rec.id,
        "prompt": rec.display(),
        **({"fingerprint": fingerprint} if fingerprint is not None else {}),
        "outputs": [_completion_record(c, token_ids) for c in out.outputs],
        **({"candidates": [_completion_record(c, token_ids) for c in cands]} if cands is not None else {}),
        "finish_reason": out.outputs[0].finish_reason if out.outputs else None,
        "prompt_tokens": len(out.prompt_token_ids),
        "output_tokens": sum(len(c.token_ids) for c in out.outputs),
        "timings": {"queue_s": m.queue_time, "ttft_s": m.ttft, "tpot_s": m.tpot, "e2e_s": m.e2e},
    }


def error_record(rec: PromptRecord, error: str, fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": rec.id, "prompt": rec.display(), **({"fingerprint": fingerprint} if fingerprint is not None else {}),
            "error": error}


def open_results(loaded, records: list[PromptRecord], output: str | Path, params: Any, *, overwrite: bool = False,
                 stdout: IO[str] | None = None, all_candidates: bool = False) -> tuple[Any, str]:
    """The results sink for ``output`` (``"-"``: standard output) and this run's fingerprint;
    ``loaded``: the run's :class:`~framework.spec.LoadedSpec` (no model needed: ``decodekit
    run`` refuses a bad output before it loads one); ``all_candidates``: the run writes every
    ranked candidate (``--all-candidates``; a file written with the other setting is refused).

    Raises:
        ConfigError: ``output`` is not a decodekit results file, or holds other results.
    """
    from framework.results_file import ResultsFile, StdoutResults, prompt_fingerprint, run_fingerprint

    spec = loaded.spec
    run = run_fingerprint(spec.model, str(spec.engine.dtype), params)
    if str(output) == "-":
        return StdoutResults(stdout or sys.stdout), run
    prompts = {r.id: prompt_fingerprint(r.display()) for r in records}
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    return ResultsFile.open(path, run, prompts, overwrite=overwrite, all_candidates=all_candidates), run


def run_records(pipeline, records: list[PromptRecord], output: str | Path | None = None, *, progress: bool | None = None,
                window: int | None = None, overrides: dict[str, Any] | None = None, overwrite: bool = False,
                stdout: IO[str] | None = None, opened: tuple[Any, str] | None = None,
                all_candidates: bool = False) -> RunSummary:
    """Generate every record not yet done in ``output``; append results as they finish.
    ``opened``: the ``(sink, fingerprint)`` of :func:`open_results` when the caller opened it;
    ``all_candidates``: records of reranked requests list every ranked candidate."""
    from framework.results_file import record_fingerprint

    params = pipeline.sampling_params(**(overrides or {}))
    if opened is None:
        if output is None:
            raise ValueError("run_records needs an output (or opened)")
        opened = open_results(pipeline.loaded, records, output, params, overwrite=overwrite, stdout=stdout,
                              all_candidates=all_candidates)
    sink, run = opened
    if getattr(sink, "all_candidates", all_candidates) != all_candidates:
        raise ValueError(f"the results file was opened with all_candidates={sink.all_candidates}, "
                         f"run_records was given all_candidates={all_candidates}")
    summary = RunSummary(skipped_lines=list(sink.skipped_lines))
    todo = [r for r in records if r.id not in sink.done]
    summary.skipped = len(records) - len(todo)
    engine = pipeline.engine
    window = window or max(4 * engine.config.max_num_seqs, 16)
    with_ids = pipeline.tokenizer is None  # no text without a tokenizer: the token ids are the output
    bar = _bar(len(todo), progress)
    t0 = time.perf_counter()
    it: Iterator[PromptRecord] = iter(todo)
    inflight: dict[str, PromptRecord] = {}

    def fp(rec: PromptRecord) -> dict[str, Any]:
        return record_fingerprint(run, rec.display(), all_candidates)

    def fill() -> None:
        while len(inflight) < window:
            rec = next(it, None)
            if rec is None:
                return
            rid = f"run-{rec.id}"
            try:
                engine.add_request(rid, _engine_prompt(pipeline, rec), params)
            except InvalidRequestError as exc:  # a bad prompt fails alone
                summary.failed += 1
                sink.write(error_record(rec, str(exc), fp(rec)))
                continue
            inflight[rid] = rec

    try:
        with sink:
            fill()
            while inflight:
                for out in engine.step():
                    if not out.finished or out.request_id not in inflight:
                        continue
                    rec = inflight.pop(out.request_id)
                    sink.write(result_record(rec, out, fp(rec), token_ids=with_ids, all_candidates=all_candidates))
                    summary.add(out)
                    if bar is not None:
                        el = time.perf_counter() - t0
                        bar.set_postfix_str(f"{summary.output_tokens / max(el, 1e-9):.0f} tok/s", refresh=False)
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


def _engine_prompt(pipeline, rec: PromptRecord) -> Any:
    from framework.chat import render_chat

    if rec.prompt is not None:
        return rec.prompt
    if rec.prompt_token_ids is not None:
        return {"prompt_token_ids": rec.prompt_token_ids}
    tok = pipeline.tokenizer
    if tok is None:
        raise InvalidRequestError("messages need a tokenizer (skip_tokenizer_init is set): give prompt_token_ids")
    return render_chat(tok, rec.messages or [])


def _bar(total: int, progress: bool | None):
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", dynamic_ncols=True)

