"""The output of ``decodekit run --prompts``: a JSON-lines results file that runs can resume.

Users' files are sacred, so the file is opened with care:

* A path that does not exist, or an empty file, starts a new results file.
* An existing file is used only if it is a decodekit results file: its first non-blank line is a
  result record (an object with ``id``, ``prompt`` and ``outputs`` or ``error``). Anything else
  is refused (:class:`~framework.errors.ConfigError`, exit status 2) and left untouched, even
  with ``overwrite``.
* Each record carries a ``fingerprint``: ``run`` (a hash of the model, the engine dtype and the
  complete sampling parameters: the spec's sampling, processors and constraint — with its
  schema's contents — and the ``--set`` overrides) and ``prompt`` (a hash of the prompt text,
  messages or token ids). A record counts as done only if both match this run; a file that
  holds results of another spec or overrides, or another prompt under the same id (a ``.txt``
  prompts file whose lines moved), is refused — or, with ``overwrite``, started afresh.
* The fingerprint's ``all_candidates`` says what shape the records have: ``true`` when the run
  had ``--all-candidates`` (a reranked request's record also lists every ranked candidate),
  ``false`` (or absent, in files of older versions) otherwise. It is not part of ``run`` (it
  changes no output) but a record counts as done only if it matches too: resuming with the flag
  toggled would mix two record shapes in one file, so it is refused with a message naming the
  flag — or, with ``overwrite``, started afresh.
* A record with ``error`` is not done: the next run retries it and appends the new line (the
  last line of an id is the one that counts).
* A line that is blank or not a record in the middle of the file is reported and skipped — the
  results after it count as usual. Only a torn *last* line (no newline at the end, and not
  parsable: what a killed run leaves) is cut off.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from framework.errors import ConfigError

__all__ = ["ResultsFile", "StdoutResults", "run_fingerprint", "prompt_fingerprint", "record_fingerprint",
           "is_result_record"]


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_fingerprint(model: str, dtype: str, params: Any) -> str:
    """What decides a run's outputs, apart from the prompt: the model, the dtype and every
    sampling parameter (``params``: the SamplingParams of the run, overrides applied)."""
    sampling = params.model_dump(mode="json") if hasattr(params, "model_dump") else params
    return _digest({"v": 1, "model": model, "dtype": dtype, "sampling": sampling})


def prompt_fingerprint(prompt: Any) -> str:
    """The hash of one prompt (its text, messages or token ids)."""
    return _digest(prompt)


def record_fingerprint(run: str, prompt: Any, all_candidates: bool = False) -> dict[str, Any]:
    """The ``fingerprint`` of one record: the ``run`` fingerprint, the hash of its ``prompt`` and
    whether the run wrote ``all_candidates``."""
    return {"run": run, "prompt": prompt_fingerprint(prompt), "all_candidates": bool(all_candidates)}


def _flag(on: bool) -> str:
    return "with --all-candidates" if on else "without --all-candidates"


def is_result_record(obj: Any) -> bool:
    return isinstance(obj, dict) and "id" in obj and "prompt" in obj and ("outputs" in obj or "error" in obj)


@dataclass(slots=True)
class ResultsFile:
    """A results file opened for appending, with what it already holds.

    ``done``: ids whose last record succeeded with this run's fingerprint. ``skipped_lines``:
    1-based numbers of the lines that were not records (reported, kept in the file).
    ``all_candidates``: whether this run's records list every ranked candidate.
    """

    path: Path
    run: str
    all_candidates: bool = False
    done: set[str] = field(default_factory=set)
    retried: set[str] = field(default_factory=set)  # ids whose last record is an error
    skipped_lines: list[int] = field(default_factory=list)
    _f: IO[str] | None = None

    @classmethod
    def open(cls, path: Path, run: str, prompts: dict[str, str], *, overwrite: bool = False,
             all_candidates: bool = False) -> "ResultsFile":
        """Open ``path`` for this run. ``prompts``: id -> prompt fingerprint of every record
        of the prompts file; ``all_candidates``: whether this run writes every ranked candidate.

        Raises:
            ConfigError: the file is not a decodekit results file, or holds results of another
                run, other prompts or the other ``--all-candidates`` setting (without ``overwrite``).
        """
        rf = cls(path, run, bool(all_candidates))
        if path.is_dir():
            raise ConfigError(f"{path}: --output is a directory")
        data = path.read_bytes() if path.exists() else b""
        if not data.strip():
            rf._f = path.open("w" if data else "a", encoding="utf-8")  # empty (or whitespace only): ours to fill
            return rf
        records, keep, complete_tail = rf._scan(data)
        if overwrite:
            rf.done.clear()
            rf.retried.clear()
            rf.skipped_lines.clear()
            rf._f = path.open("w", encoding="utf-8")
            return rf
        rf._check_matches(records, prompts)
        if keep < len(data):  # a torn last line: cut it off (it is ours: the lines before are records)
            with path.open("r+b") as f:
                f.truncate(keep)
        rf._f = path.open("a", encoding="utf-8")
        if not complete_tail and keep == len(data) and not data.endswith(b"\n"):
            rf._f.write("\n")  # the last record lacks its newline: end it before appending
        return rf

    def _scan(self, data: bytes) -> tuple[dict[str, dict[str, Any]], int, bool]:
        """Parse ``data``: (last record by id, bytes to keep, whether the data ends cleanly).
        Refuses data whose first non-blank line is not a record."""
        records: dict[str, dict[str, Any]] = {}
        pos = 0
        first = True
        lineno = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            end = len(data) if nl < 0 else nl
            raw = data[pos:end]
            lineno += 1
            try:
                obj = json.loads(raw) if raw.strip() else None
            except ValueError:
                obj = None
            if nl < 0 and obj is None and not first:  # a torn last line
                return records, pos, False
            if obj is None or not is_result_record(obj):
                if first and raw.strip():
                    raise ConfigError(f"{self.path}: not a decodekit results file (line {lineno} is not a result record); "
                                      "refusing to write into it: give another --output")
                self.skipped_lines.append(lineno)
            else:
                first = False
                records[str(obj["id"])] = obj
            pos = end + 1
        if first:  # nothing but blank lines
            raise ConfigError(f"{self.path}: not a decodekit results file; refusing to write into it: give another --output")
        return records, len(data), data.endswith(b"\n")

    def _check_matches(self, records: dict[str, dict[str, Any]], prompts: dict[str, str]) -> None:
        for rid, obj in records.items():
            fp = obj.get("fingerprint") if isinstance(obj.get("fingerprint"), dict) else {}
            if fp.get("run") != self.run:
                why = "has no fingerprint (written by an older decodekit)" if not fp else \
                    "holds results of another spec, model or --set overrides"
                raise ConfigError(f"{self.path}: {why} (id {rid!r}); give another --output, or --overwrite to start it afresh")
            if bool(fp.get("all_candidates", False)) != self.all_candidates:
                was = bool(fp.get("all_candidates", False))
                raise ConfigError(f"{self.path}: was written {_flag(was)} (id {rid!r}) and this run is {_flag(self.all_candidates)}: "
                                  "resuming would mix records with and without 'candidates'; run it again "
                                  f"{_flag(was)}, give another --output, or --overwrite to start it afresh")
            if rid in prompts and fp.get("prompt") != prompts[rid]:
                raise ConfigError(f"{self.path}: id {rid!r} was generated for another prompt (the prompts file changed; "
                                  "in a .txt file ids are line numbers); give another --output, or --overwrite to start it afresh")
            if "error" in obj:
                self.retried.add(rid)
            else:
                self.done.add(rid)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it (an interrupted run loses nothing)."""
        assert self._f is not None
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StdoutResults:
    """``--output -``: records go to standard output as they finish (nothing to resume)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.done: set[str] = set()
        self.retried: set[str] = set()
        self.skipped_lines: list[int] = []

    def write(self, record: dict[str, Any]) -> None:
        self.stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.stream.flush()

    def close(self) -> None:
        pass

    def __enter__(self) -> "StdoutResults":
        return self

    def __exit__(self, *exc: object) -> None:
        pass
