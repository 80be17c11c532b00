"""``run --ray``: Ray Data batch runs on a local Ray cluster started here (2 CPUs,
no other machine contacted).

The reference is the single-process ``run`` of the same spec and seeds: the Ray run must give
every id exactly once with the same outputs, also when an actor dies mid-batch or the driver is
killed and the run repeated. Token-level outputs are compared exactly; cumulative logprobs to
float32 rounding (batch composition changes the matmul order, never the sampled tokens).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from framework.batch_run import PromptRecord, open_results, read_prompts, run_records  # noqa: E402
from framework.ray.batch import PipelinePredictor, RayRunOptions, run_ray  # noqa: E402
from framework.spec import load_spec  # noqa: E402

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
WORDS = "sea sky cat dog tree river king queen ship star moon road bread stone light".split()


class MarkingPredictor(PipelinePredictor):
    """Notes which process ran each batch; the first process to reach ``die_at_call`` calls
    (and only one, ever) exits mid-batch, after running part of it."""

    def __init__(self, *args, marks: str = "", die_at_call: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.marks, self.die_at_call, self.calls = Path(marks), die_at_call, 0

    def __call__(self, batch):
        self.calls += 1
        ids = [str(x) for x in batch["id"]]
        (self.marks / f"{os.getpid()}-{self.calls}-{ids[0]}").write_text("\n".join(ids))
        if self.die_at_call and self.calls == self.die_at_call:
            try:
                fd = os.open(self.marks / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.close(fd)
                super().__call__({k: v[: len(ids) // 2] for k, v in batch.items()})  # half the work, then die
                os._exit(1)
        return super().__call__(batch)


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors need MarkingPredictor


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=96 * 2**20, include_dashboard=False, logging_level="warning")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A 200-prompt spec (sampled with a seed) and its single-process reference results."""
    d = tmp_path_factory.mktemp("ray_batch")
    spec = d / "spec.yaml"
    spec.write_text("model: demo\nengine: {max_num_seqs: 16}\nsampling: {temperature: 0.9, top_p: 0.95, max_tokens: 4, seed: 11}\n")
    prompts = d / "prompts.jsonl"
    with prompts.open("w") as f:
        for i in range(200):
            text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 6))
            f.write(json.dumps({"id": f"p{i}", "prompt": text}) + "\n")
    from framework.pipeline import Pipeline

    loaded = load_spec(spec)
    ref_path = d / "reference.jsonl"
    summary = run_records(Pipeline(loaded), read_prompts(str(prompts)), ref_path, progress=False)
    assert summary.requests == 200 and summary.failed == 0
    return {"dir": d, "spec": spec, "prompts": prompts, "reference": by_id(ref_path)}


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def by_id(path: Path) -> dict[str, dict]:
    got = rows(path)
    ids = [r["id"] for r in got]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: r for r in got}


def assert_same(got: dict[str, dict], ref: dict[str, dict]) -> None:
    assert sorted(got) == sorted(ref)
    for rid, r in got.items():
        e = ref[rid]
        assert r["fingerprint"] == e["fingerprint"] and r["prompt"] == e["prompt"], rid
        assert [(o["text"], o["finish_reason"], o["num_tokens"]) for o in r["outputs"]] == \
            [(o["text"], o["finish_reason"], o["num_tokens"]) for o in e["outputs"]], rid
        for o, p in zip(r["outputs"], e["outputs"]):
            assert o["cumulative_logprob"] == pytest.approx(p["cumulative_logprob"], rel=1e-4, abs=1e-4), rid


def ray_run(job, output: Path, records: list[PromptRecord] | None = None, **kw):
    loaded = load_spec(job["spec"])
    records = records if records is not None else read_prompts(str(job["prompts"]))
    opened = open_results(loaded, records, output, loaded.sampling_params())
    options = RayRunOptions(replicas=2, batch_size=kw.pop("batch_size", 20), cpus_per_actor=1)
    return run_ray(loaded, records, opened, options, progress=False, **kw)


def test_two_actors_one_killed_mid_batch_match_the_single_process_run(cluster, job):
    marks = job["dir"] / "marks"
    marks.mkdir()
    out = job["dir"] / "two_actors.jsonl"
    summary = ray_run(job, out, predictor=MarkingPredictor,
                      predictor_kwargs={"marks": str(marks), "die_at_call": 2})
    assert (marks / "killed").exists()  # an actor did die mid-batch
    assert summary.requests == 200 and summary.failed == 0
    assert_same(by_id(out), job["reference"])  # nothing lost, nothing twice, same outputs
    pids = {p.name.split("-")[0] for p in marks.iterdir() if p.name != "killed"}
    assert len(pids) >= 3  # two actors, and the one that died came back as a new process


def test_failed_requests_are_retried_by_the_next_run_and_nothing_is_truncated(cluster, job, capsys):
    from framework.cli import main

    prompts = job["dir"] / "retry.jsonl"
    p1 = json.loads(job["prompts"].read_text().splitlines()[1])
    prompts.write_text(json.dumps({"id": "p0", "prompt_token_ids": [1, 10**9]}) + "\n" + json.dumps(p1) + "\n")
    out_dir = job["dir"] / "retry_out"  # a directory: DIR/results.jsonl
    argv = ["run", str(job["spec"]), "--prompts", str(prompts), "--output", f"{out_dir}/", "--ray",
            "--replicas", "2", "--no-progress"]
    assert main(argv) == 1  # p0's token id is out of the vocabulary
    assert "1 done, 0 skipped (already in output), 1 failed" in capsys.readouterr().err
    out = out_dir / "results.jsonl"
    first = out.read_text()
    assert "error" in by_id(out)["p0"]
    assert_same({"p1": by_id(out)["p1"]}, {"p1": job["reference"]["p1"]})
    assert main(argv) == 1
    assert "0 done, 1 skipped (already in output), 1 failed" in capsys.readouterr().err  # p0 tried again
    assert out.read_text().startswith(first)  # appended, never rewritten
    assert len(rows(out)) == 3 and rows(out)[-1]["id"] == "p0" and "error" in rows(out)[-1]


def test_all_candidates_records_are_the_local_runs(cluster, job, capsys):
    """``--all-candidates`` on Ray writes the local run's records, candidates and all; the flag is
    in the fingerprint there too (a resume with it toggled is refused before any actor starts)."""
    from framework.cli import main
    from framework.pipeline import Pipeline

    spec = job["dir"] / "mbr.yaml"
    spec.write_text("model: demo\nengine: {max_num_seqs: 16}\n"
                    "sampling: {temperature: 1.0, max_tokens: 4, seed: 5, n: 2, best_of: 4}\n"
                    "reranker: {mbr: {utility: chrf}}\n")
    prompts = job["dir"] / "mbr_prompts.jsonl"
    prompts.write_text("".join(job["prompts"].read_text().splitlines(keepends=True)[:6]))
    ref_path = job["dir"] / "mbr_reference.jsonl"
    run_records(Pipeline(load_spec(spec)), read_prompts(str(prompts)), ref_path, progress=False, all_candidates=True)
    ref = by_id(ref_path)
    out = job["dir"] / "mbr_ray.jsonl"
    argv = ["run", str(spec), "--prompts", str(prompts), "--output", str(out), "--ray", "--replicas", "1",
            "--batch-size", "3", "--no-progress"]
    assert main(argv + ["--all-candidates"]) == 0
    got = by_id(out)
    assert_same(got, ref)
    for rid, r in got.items():
        assert r["fingerprint"]["all_candidates"] is True
        e = ref[rid]["candidates"]
        assert len(r["candidates"]) == 4
        assert [(c["index"], c["text"], c["num_tokens"]) for c in r["candidates"]] == \
            [(c["index"], c["text"], c["num_tokens"]) for c in e], rid
        assert [c["score"] for c in r["candidates"]] == pytest.approx([c["score"] for c in e]), rid
    capsys.readouterr()
    assert main(argv) == 2
    assert "was written with --all-candidates" in capsys.readouterr().err


def test_a_killed_driver_then_a_rerun_loses_and_duplicates_nothing(cluster, job):
    out = job["dir"] / "driver_killed.jsonl"
    subset = job["dir"] / "subset.jsonl"
    subset.write_text("".join(job["prompts"].read_text().splitlines(keepends=True)[:80]))
    cmd = [sys.executable, "-c", "import sys; from framework.cli import main; sys.exit(main(sys.argv[1:]))",
           "run", str(job["spec"]), "--prompts", str(subset), "--output", str(out), "--ray", "--ray-address", cluster,
           "--replicas", "2", "--batch-size", "5", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not (out.exists() and out.read_text().count("\n") >= 10):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the driver wrote nothing"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    partial = out.read_text().split("\n")[:-1]  # whole lines (the last may be torn)
    assert 10 <= len(partial) < 80  # killed mid-run
    summary = ray_run(job, out, read_prompts(str(subset)))
    assert summary.skipped == len(partial) and summary.requests == 80 - len(partial)
    ref = {k: v for k, v in job["reference"].items() if int(k[1:]) < 80}
    assert_same(by_id(out), ref)


def test_a_pool_that_cannot_fit_a_local_cluster_is_refused(cluster):
    from framework.errors import ConfigError
    from framework.ray.batch import check_resources

    check_resources(2, 1, 0, joined=False)  # fits the 2 CPUs
    with pytest.raises(ConfigError, match=r"--replicas 3 x 1 CPU per actor needs 3 CPUs; the cluster has 2 .*--cpus-per-actor"):
        check_resources(3, 1, 0, joined=False)
    with pytest.raises(ConfigError, match=r"needs 1 GPUs; the cluster has 0 .*--gpus-per-replica"):
        check_resources(1, 0.5, 1, joined=False, what="replica")
    check_resources(3, 1, 0, joined=True)  # a joined cluster may grow: a warning only


def test_an_actor_that_cannot_start_fails_the_run_with_its_error(cluster, job):
    from framework.errors import ConfigError

    out = job["dir"] / "refused.jsonl"
    with pytest.raises(ConfigError, match=r"differ from the driver's .*\(in a Ray actor\)"):
        ray_run(job, out, read_prompts(str(job["prompts"]))[:4], predictor_kwargs={"run": "another-run"})
    assert out.read_text() == ""  # nothing written
