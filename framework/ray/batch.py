"""Batch runs on Ray Data: ``decodekit run SPEC --prompts FILE --output OUT --ray``.

The prompts become a Ray Dataset; ``map_batches`` hands each batch to a
:class:`PipelinePredictor` actor (a pool of ``replicas`` of them, each loading the pipeline once
and running its own engine: the batch's requests are continuously batched inside it). The
driver alone writes the results file, one record as each finished row reaches it, through the
same :mod:`framework.results_file` as the local run. So:

* the output schema, fingerprints and refusals are the local run's;
* re-running resumes: ids already written are skipped, failed ones (``error`` records) retried;
* an actor that dies mid-batch is restarted by Ray Data and the batch re-run on it (outputs are
  only written when a whole batch comes back, and the driver drops an id it has already
  written in this run, so nothing is lost or duplicated);
* a driver killed mid-run leaves at most a torn last line, which the next run cuts off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterable

from framework.batch_run import PromptRecord, RunSummary, _bar, error_record, run_records
from framework.errors import ConfigError, DecodekitError

__all__ = ["PipelinePredictor", "RayRunOptions", "run_ray", "connect", "require_ray"]

PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")


def require_ray() -> Any:
    """Import Ray (with Ray Data), or explain which extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError("--ray needs the ray extra: pip install 'decodekit[ray]'") from None
    return ray


def connect(address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` ("auto": the one ``ray start`` runs on this machine),
    or start a private local one (contacting no other machine); nothing happens when Ray is already initialised
    (a user's own ``ray.init``). Returns whether this call started the connection (then the
    caller shuts it down)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=False,
                 logging_level=logging.WARNING)
    return True


class _ListSink:
    """A results sink that keeps records in memory (one batch's worth, inside an actor)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.done: set[str] = set()
        self.retried: set[str] = set()
        self.skipped_lines: list[int] = []

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def close(self) -> None:
        pass

    def __enter__(self) -> "_ListSink":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _plain(x: Any) -> Any:
    """numpy arrays and scalars (what Ray Data batches hold) as plain Python values."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def request_of(rec: PromptRecord) -> dict[str, Any]:
    """The prompt part of a record, as the ``request`` column carries it."""
    if rec.prompt is not None:
        return {"prompt": rec.prompt}
    if rec.messages is not None:
        return {"messages": rec.messages}
    return {"prompt_token_ids": rec.prompt_token_ids}


def _row_record(row: dict[str, Any]) -> PromptRecord | tuple[str, str]:
    """A batch row as a PromptRecord, or why it is not one. Rows hold either ``request`` (a JSON
    object with one of the prompt fields: what :func:`run_ray` sends) or the fields as columns;
    a bad row gives ``(id, why)``."""
    from framework.chat import validate_messages
    from framework.errors import InvalidRequestError

    rid = row.get("id")
    rid = uuid.uuid4().hex if rid is None else str(rid)
    fields = row
    if row.get("request") is not None:
        try:
            fields = json.loads(row["request"])
        except (TypeError, ValueError):
            return rid, "request: not a JSON object"
    present = [f for f in PROMPT_FIELDS if fields.get(f) is not None]
    if len(present) != 1:
        return rid, f"needs exactly one of {', '.join(PROMPT_FIELDS)} (got {', '.join(present) or 'none'})"
    name = present[0]
    value = fields[name]
    if name == "prompt":
        if not isinstance(value, str):
            return rid, "prompt: must be a string"
        return PromptRecord(id=rid, prompt=value)
    if name == "prompt_token_ids":
        if not isinstance(value, list) or not value or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return rid, "prompt_token_ids: must be a non-empty list of integers"
        return PromptRecord(id=rid, prompt_token_ids=value)
    try:
        return PromptRecord(id=rid, messages=validate_messages(value))
    except InvalidRequestError as exc:
        return rid, str(exc)


class PipelinePredictor:
    """A Ray Data callable class: ``ds.map_batches(PipelinePredictor, fn_constructor_kwargs=
    {"spec": "spec.yaml"}, compute=ray.data.ActorPoolStrategy(size=N), batch_size=B)``.

    Each actor loads the pipeline once (the spec and the files it names must be readable at
    the same path on every node). A batch's rows carry ``id`` and one of ``prompt``,
    ``messages``, ``prompt_token_ids`` (or ``request``: those as a JSON object); the output
    rows are ``id``, ``record`` (the JSON line ``decodekit run`` writes for it), ``text`` (the
    first output's text) and ``error`` (``None`` unless the request failed). A bad row fails
    alone, as an error record; so does the rest of a batch whose engine raised.

    Args:
        spec: path of the pipeline spec.
        overrides: SamplingParams fields over the spec's (``--set``).
        engine_overrides: EngineConfig fields over the spec's ``engine`` section.
        run: the run fingerprint the driver computed; an actor whose spec, model or overrides
            give another one refuses to start (a node with another spec file at that path).
        all_candidates: records of reranked requests list every ranked candidate
            (``--all-candidates``), as the local run writes them.
    """

    def __init__(self, spec: str | os.PathLike, overrides: dict[str, Any] | None = None,
                 engine_overrides: dict[str, Any] | None = None, run: str | None = None,
                 all_candidates: bool = False):
        from framework.pipeline import Pipeline
        from framework.results_file import run_fingerprint
        from framework.spec import load_spec

        loaded = load_spec(Path(spec))
        self.overrides = dict(overrides or {})
        self.all_candidates = bool(all_candidates)
        self.params = loaded.sampling_params(**self.overrides)
        self.run = run_fingerprint(loaded.spec.model, str(loaded.spec.engine.dtype), self.params)
        if run is not None and run != self.run:
            raise ConfigError(f"{spec}: this worker's spec, model or overrides differ from the driver's "
                              "(give every node the same spec file)")
        self.pipeline = Pipeline(loaded, **(engine_overrides or {}))

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from framework.results_file import record_fingerprint

        columns = {k: _plain(v) for k, v in batch.items()}
        n = len(next(iter(columns.values()))) if columns else 0
        sink = _ListSink()
        records: list[PromptRecord] = []
        for i in range(n):
            rec = _row_record({k: v[i] for k, v in columns.items()})
            if isinstance(rec, PromptRecord):
                records.append(rec)
            else:
                rid, why = rec
                sink.write({"id": rid, "prompt": None, "fingerprint": record_fingerprint(self.run, None, self.all_candidates),
                            "error": why})
        try:
            run_records(self.pipeline, records, progress=False, overrides=self.overrides, opened=(sink, self.run),
                        all_candidates=self.all_candidates)
        except Exception as exc:  # noqa: BLE001 - the batch's unfinished requests fail, the actor lives on
            finished = {r["id"] for r in sink.records}
            for rec in records:
                if rec.id not in finished:
                    fp = record_fingerprint(self.run, rec.display(), self.all_candidates)
                    sink.write(error_record(rec, f"engine error: {type(exc).__name__}: {exc}", fp))
        out = sink.records
        first = [r.get("outputs") or [{}] for r in out]
        return {
            "id": np.array([str(r["id"]) for r in out], dtype=object),
            "record": np.array([json.dumps(r, ensure_ascii=False) for r in out], dtype=object),
            "text": np.array([f[0].get("text") for f in first], dtype=object),
            "error": np.array([r.get("error") for r in out], dtype=object),
        }


@dataclass(slots=True)
class RayRunOptions:
    """How ``run --ray`` uses the cluster.

    ``replicas``: actors (each its own engine); ``batch_size``: prompts per ``map_batches``
    call; ``cpus_per_actor`` / ``gpus_per_actor``: resources each actor reserves (GPUs: ``None``
    = one per actor when the cluster has GPUs and the spec's device is not ``cpu``, else none);
    ``num_cpus`` / ``object_store_memory``: the size of a local cluster this run starts.
    """

    address: str | None = None
    replicas: int = 1
    batch_size: int = 64
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = None

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {self.replicas}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")


def _count(summary: RunSummary, rec: dict[str, Any]) -> None:
    """Add one record (as the driver reads it back) to the run's summary."""
    if "error" in rec:
        summary.failed += 1
        return
    summary.requests += 1
    summary.prompt_tokens += int(rec.get("prompt_tokens") or 0)
    summary.output_tokens += int(rec.get("output_tokens") or 0)
    t = rec.get("timings") or {}
    if t.get("ttft_s") is not None:
        summary.ttft.append(t["ttft_s"])
    if t.get("tpot_s") is not None:
        summary.tpot.append(t["tpot_s"])


def _gpus(loaded, options: RayRunOptions) -> float:
    if options.gpus_per_actor is not None:
        return options.gpus_per_actor
    import ray

    if str(loaded.spec.engine.device) == "cpu":
        return 0.0
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def check_resources(replicas: int, cpus: float, gpus: float, *, joined: bool, what: str = "actor") -> None:
    """Refuse a pool that cannot fit: on a local cluster it would wait for resources forever (a
    joined cluster may autoscale, so there it is only a warning)."""
    import ray

    have = ray.cluster_resources()
    for name, each, option in (("CPU", cpus, f"--cpus-per-{what}"), ("GPU", gpus, f"--gpus-per-{what}")):
        need = replicas * each
        if need > have.get(name, 0.0) + 1e-9:
            msg = (f"--replicas {replicas} x {each:g} {name} per {what} needs {need:g} {name}s; the cluster has "
                   f"{have.get(name, 0.0):g} (lower --replicas or {option})")
            if not joined:
                raise ConfigError(msg)
            logging.getLogger("decodekit").warning("%s; waiting for the cluster to grow", msg)


def run_ray(loaded, records: list[PromptRecord], opened: tuple[Any, str], options: RayRunOptions | None = None, *,
            overrides: dict[str, Any] | None = None, progress: bool | None = None,
            predictor: type = PipelinePredictor, predictor_kwargs: dict[str, Any] | None = None,
            all_candidates: bool = False) -> RunSummary:
    """Generate every record not yet done in the opened results sink on a Ray cluster.

    ``loaded``: the run's LoadedSpec; ``opened``: ``(sink, run fingerprint)`` of
    :func:`framework.batch_run.open_results`; ``predictor``: the callable class (a subclass of
    :class:`PipelinePredictor`) the actors run, with ``predictor_kwargs`` added to its
    constructor's arguments; ``all_candidates``: records of reranked requests list every ranked
    candidate (``--all-candidates``; ``opened`` must have been opened with the same setting).
    """
    options = options or RayRunOptions()
    sink, run = opened
    if getattr(sink, "all_candidates", all_candidates) != all_candidates:
        sink.close()
        raise ValueError(f"the results file was opened with all_candidates={sink.all_candidates}, "
                         f"run_ray was given all_candidates={all_candidates}")
    summary = RunSummary(skipped_lines=list(sink.skipped_lines))
    todo = [r for r in records if r.id not in sink.done]
    summary.skipped = len(records) - len(todo)
    if not todo:
        sink.close()
        return summary
    try:
        started = connect(options.address, num_cpus=options.num_cpus, object_store_memory=options.object_store_memory)
    except BaseException:
        sink.close()
        raise
    bar = _bar(len(todo), progress)
    t0 = time.perf_counter()
    try:
        import ray

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts requests
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        blocks = max(1, math.ceil(len(todo) / options.batch_size))
        ds = ray.data.from_items([{"id": r.id, "request": json.dumps(request_of(r), ensure_ascii=False)} for r in todo],
                                 override_num_blocks=blocks)
        size = min(options.replicas, blocks)  # no idle actors
        gpus = _gpus(loaded, options)
        check_resources(size, options.cpus_per_actor, gpus, joined=bool(options.address) or not started)
        ds = ds.map_batches(
            predictor, batch_size=options.batch_size, batch_format="numpy",
            fn_constructor_kwargs={"spec": str(Path(loaded.source).resolve()), "overrides": dict(overrides or {}), "run": run,
                                  "all_candidates": all_candidates, **(predictor_kwargs or {})},
            compute=ray.data.ActorPoolStrategy(size=size), num_cpus=options.cpus_per_actor, num_gpus=gpus,
        )
        with sink:
            _drain(ds.iter_rows(), sink, summary, bar, t0)
    except DecodekitError:
        raise
    except Exception as exc:  # Ray's errors wrap ours: surface the user error when there is one
        cause = _user_error(exc)
        if cause is not None:
            raise cause from None
        raise
    finally:
        sink.close()  # (a no-op when the run got through)
        if bar is not None:
            bar.close()
        summary.seconds = time.perf_counter() - t0
        if started:
            ray.shutdown()
    return summary


def _drain(rows: Iterable[dict[str, Any]], sink: Any, summary: RunSummary, bar: Any, t0: float) -> None:
    written: set[str] = set()
    for row in rows:
        rid = str(row["id"])
        if rid in written:  # a batch delivered twice (a retried task): the first copy counts
            continue
        rec = json.loads(row["record"])
        sink.write(rec)
        written.add(rid)
        _count(summary, rec)
        if bar is not None:
            bar.set_postfix_str(f"{summary.output_tokens / max(time.perf_counter() - t0, 1e-9):.0f} tok/s", refresh=False)
            bar.update(1)


_WRAPPED = re.compile(r"framework\.errors\.(\w+): (.+)")


def _user_error(exc: BaseException) -> DecodekitError | None:
    """The decodekit error a Ray exception wraps (an actor's failed constructor: Ray passes it
    on as text), if any, as the same class, marked as coming from an actor."""
    import framework.errors as errors

    cur: BaseException | None = exc
    for _ in range(10):
        if cur is None:
            break
        if isinstance(cur, DecodekitError):
            return cur
        found = _WRAPPED.findall(str(cur) + "\n" + str(getattr(cur, "error_msg", "")))
        if found:
            name, message = found[-1]
            cls = getattr(errors, name, None)
            if isinstance(cls, type) and issubclass(cls, DecodekitError):
                return cls(f"{message.strip()} (in a Ray actor)")
        cur = cur.__cause__ or cur.__context__
    return None


def open_output(loaded, records: list[PromptRecord], output: str, params: Any, *, overwrite: bool = False,
                stdout: IO[str] | None = None, all_candidates: bool = False) -> tuple[Any, str]:
    """:func:`framework.batch_run.open_results`, where ``output`` may also be a directory
    (an existing one, or a path ending in ``/``): the results go to ``DIR/results.jsonl``."""
    from framework.batch_run import open_results

    if output != "-" and (Path(output).is_dir() or output.endswith(("/", os.sep))):
        output = str(Path(output) / "results.jsonl")
    return open_results(loaded, records, output, params, overwrite=overwrite, stdout=stdout,
                        all_candidates=all_candidates)
