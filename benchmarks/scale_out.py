"""Throughput of ``run --ray`` with 1 vs 2 actors, and the per-request cost Ray adds.

    python benchmarks/scale_out.py                         # 256 prompts x 16 tokens on the demo model
    python benchmarks/scale_out.py --prompts 400 --gen-len 32 --actors 1,2,4

One local Ray cluster (``--num-cpus``; no other machine contacted) serves every Ray row. Each row runs the
same prompts twice into fresh results files, all ``--prompts`` of them and the first quarter:

* ``local``: the single-process ``run`` (``run_records``), the model already loaded;
* ``ray xN``: ``run_ray`` with N actors. Its ``wall`` includes starting the actors and loading
  the model in each (seconds), so the per-request time is the slope between the two runs,
  ``(wall(all) - wall(quarter)) / (3/4 prompts)``, which the fixed start cost cancels out of;
  ``startup`` is what is left of ``wall(all)`` (the intercept).

``overhead/req`` = slope of ``ray x1`` - slope of ``local``: what Ray Data (serialising batches,
the actor calls, the driver writing rows as they come back) adds per request on top of the
engine. With more actors than free cores the engines share the CPU, so on a 2-core machine the
rows stay about flat. It prints the table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = "sea sky cat dog tree river king queen ship star moon road bread stone light".split()


def write_job(d: Path, n: int, gen_len: int, max_num_seqs: int) -> tuple[Path, Path]:
    spec = d / "spec.yaml"
    spec.write_text(f"model: demo\nengine: {{max_num_seqs: {max_num_seqs}}}\n"
                    f"sampling: {{temperature: 0.8, max_tokens: {gen_len}, ignore_eos: true, seed: 0}}\n")
    prompts = d / "prompts.jsonl"
    with prompts.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + i % 8))}) + "\n")
    return spec, prompts


def timed_ray(spec: Path, records, out: Path, actors: int, batch_size: int) -> tuple[float, int]:
    from framework.batch_run import open_results
    from framework.ray.batch import RayRunOptions, run_ray
    from framework.spec import load_spec

    loaded = load_spec(spec)
    opened = open_results(loaded, records, out, loaded.sampling_params())
    t0 = time.perf_counter()
    summary = run_ray(loaded, records, opened, RayRunOptions(replicas=actors, batch_size=batch_size), progress=False)
    wall = time.perf_counter() - t0
    assert summary.failed == 0 and summary.requests == len(records)
    return wall, summary.output_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=16)
    ap.add_argument("--actors", default="1,2")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per actor call")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale_out.txt"))
    args = ap.parse_args()

    import ray

    from framework.batch_run import read_prompts, run_records
    from framework.pipeline import Pipeline
    from framework.spec import load_spec

    rows: list[tuple[str, float, float, float]] = []  # name, wall (all prompts), startup, seconds per request
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        spec, prompts = write_job(d, args.prompts, args.gen_len, args.max_num_seqs)
        records = read_prompts(str(prompts))
        quarter = records[: max(1, len(records) // 4)]
        span = len(records) - len(quarter)
        pipe = Pipeline(load_spec(spec))
        walls = []
        for i, recs in enumerate((quarter, records)):
            t0 = time.perf_counter()
            run_records(pipe, recs, d / f"local{i}.jsonl", progress=False)
            walls.append(time.perf_counter() - t0)
        slope = (walls[1] - walls[0]) / span
        rows.append(("local", walls[1], walls[1] - slope * len(records), slope))
        del pipe
        ray.init(num_cpus=args.num_cpus, object_store_memory=128 * 2**20, include_dashboard=False, logging_level="warning")
        try:
            for n in [int(x) for x in args.actors.split(",")]:
                w0, _ = timed_ray(spec, quarter, d / f"q{n}.jsonl", n, args.batch_size)
                w1, _ = timed_ray(spec, records, d / f"ray{n}.jsonl", n, args.batch_size)
                slope = (w1 - w0) / span
                rows.append((f"ray x{n}", w1, w1 - slope * len(records), slope))
        finally:
            ray.shutdown()

    per_req_tokens = args.gen_len
    local_slope = rows[0][3]
    ray1 = next((r for r in rows if r[0] == "ray x1"), None)
    overhead = ray1[3] - local_slope if ray1 else float("nan")
    lines = [
        f"scale_out: {args.prompts} prompts x {args.gen_len} tokens (and the first quarter, for the slope), demo model, "
        f"batch size {args.batch_size}, max_num_seqs {args.max_num_seqs}, local Ray cluster of {args.num_cpus} CPUs, 1 CPU per actor",
        f"{'run':<8} {'wall s':>8} {'startup s':>10} {'ms/req':>8} {'tok/s (slope)':>14} {'tok/s (wall)':>13}",
    ]
    for name, wall, start, slope in rows:
        lines.append(f"{name:<8} {wall:8.2f} {start:10.2f} {slope * 1e3:8.2f} {per_req_tokens / max(slope, 1e-9):14.1f} "
                     f"{per_req_tokens * args.prompts / wall:13.1f}")
    lines.append(f"Ray overhead per request (ray x1 ms/req - local ms/req): {overhead * 1e3:.2f} ms")
    lines.append("On 2 cores, 2 actors share the CPU one engine already uses: throughput stays about flat "
                 "(more actors pay off with more free cores or nodes).")
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
