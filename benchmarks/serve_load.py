"""Load test of ``decodekit serve``: many concurrent streaming clients on loopback.

    python benchmarks/serve_load.py                       # demo model if present, else a random checkpoint
    python benchmarks/serve_load.py --model /path/to/hf-dir --clients 64 --requests 500

A server is started as a subprocess (``decodekit serve``) on a free 127.0.0.1 port; this
process runs ``--clients`` concurrent clients (plain asyncio HTTP, so the client side costs
little CPU) that send ``--requests`` streaming completions with mixed prompt and output lengths.
A tenth of them (``--disconnect-fraction``) hang up after a few chunks. Everything is bounded:
request count, per-request timeout and ``--max-seconds`` overall; only loopback is contacted.

Checks, for every request that stayed:

* HTTP 200, every SSE event valid JSON, ``data: [DONE]`` at the end, ``finish_reason: length``;
* the streamed token count (``logprobs.tokens``) equals ``max_tokens`` and ``usage``, and the
  ``text_offset`` of each token continues the previous one (no delta lost or repeated);
* the concatenated text equals the text of the same request sent alone before the load
  (greedy decoding, so any other request's output leaking in shows up).

After the load, ``/metrics`` must show no request in flight and every KV block free. It prints
and writes (``--out``) p50/p99 TTFT (client-side, to the first streamed token), throughput and
the failure counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABORTED = 'decodekit_requests_total{finish_reason="abort"}'
WORDS = ("the quick brown fox jumps over a lazy dog while streams of tokens flow through "
         "blocks caches batches engines and servers under load every second").split()


# ---------------------------------------------------------------------------- a tiny HTTP client
class HTTPError(Exception):
    pass


async def post_stream(port: int, path: str, body: dict, hang_up_after: int | None = None, timeout: float = 120.0):
    """POST ``body``; yields SSE ``data`` payloads (str). With ``hang_up_after``, closes the
    connection after that many events."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        payload = json.dumps(body).encode()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout)
        status = int(status_line.split()[1])
        headers = {}
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if line in (b"\r\n", b""):
                break
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        if status != 200:
            rest = await asyncio.wait_for(reader.read(), timeout)
            raise HTTPError(f"HTTP {status}: {rest[-300:]!r}")
        assert headers.get("transfer-encoding") == "chunked", headers
        buf = b""
        events = 0
        while True:
            size_line = await asyncio.wait_for(reader.readline(), timeout)
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                return
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), timeout)
            buf += chunk[:-2]
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                assert event.startswith(b"data: "), event[:80]
                yield event[6:].decode()
                events += 1
                if hang_up_after is not None and events >= hang_up_after:
                    return
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


async def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            out[k] = float(v)
    return out


# ---------------------------------------------------------------------------- the workload
@dataclass(slots=True)
class Job:
    index: int
    prompt: str
    max_tokens: int
    hang_up_after: int | None  # None: stays to the end


@dataclass(slots=True)
class Result:
    job: Job
    ok: bool = False
    error: str = ""
    text: str = ""
    ttft: float | None = None
    tokens: int = 0
    e2e: float = 0.0


def make_jobs(n: int, kinds: int, disconnect_fraction: float, rng: random.Random) -> tuple[list[Job], list[tuple[str, int]]]:
    """``kinds`` distinct (prompt, max_tokens) pairs of mixed lengths; ``n`` jobs over them."""
    lengths_in = [4, 16, 48, 120, 250]
    lengths_out = [8, 24, 64, 128, 200]
    kinds_list = []
    for k in range(kinds):
        words = [rng.choice(WORDS) for _ in range(lengths_in[k % len(lengths_in)] + rng.randint(0, 8))]
        kinds_list.append((f"[{k}] " + " ".join(words), lengths_out[(k * 3 + 1) % len(lengths_out)]))
    jobs = []
    n_hang = round(n * disconnect_fraction)
    hang = set(rng.sample(range(n), n_hang))
    for i in range(n):
        prompt, max_tokens = kinds_list[rng.randrange(kinds)]
        jobs.append(Job(i, prompt, max_tokens, rng.randint(1, 4) if i in hang else None))
    return jobs, kinds_list


def request_body(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logprobs": 0, "ignore_eos": True, "stream_options": {"include_usage": True}}


async def run_job(port: int, model: str, job: Job, timeout: float) -> Result:
    res = Result(job)
    t0 = time.perf_counter()
    offset = 0
    done = False
    usage = None
    finish = None
    try:
        async for data in post_stream(port, "/v1/completions", request_body(model, job.prompt, job.max_tokens),
                                      job.hang_up_after, timeout):
            if data == "[DONE]":
                done = True
                continue
            if done:
                raise AssertionError("data after [DONE]")
            ev = json.loads(data)
            if "error" in ev:
                raise AssertionError(f"error event: {ev['error']}")
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev["choices"]:
                assert ch["index"] == 0
                lp = ch.get("logprobs")
                if lp and lp["tokens"]:
                    if res.ttft is None:
                        res.ttft = time.perf_counter() - t0
                    if lp["text_offset"][0] != offset:
                        raise AssertionError(f"text_offset jumps from {offset} to {lp['text_offset'][0]}")
                    offset = lp["text_offset"][-1] + len(lp["tokens"][-1])
                    res.tokens += len(lp["tokens"])
                res.text += ch["text"]
                if ch.get("finish_reason"):
                    finish = ch["finish_reason"]
        res.e2e = time.perf_counter() - t0
        if job.hang_up_after is None:
            if not done:
                raise AssertionError("no [DONE]")
            if finish != "length":
                raise AssertionError(f"finish_reason {finish!r}")
            if res.tokens != job.max_tokens or not usage or usage["completion_tokens"] != job.max_tokens:
                raise AssertionError(f"{res.tokens} tokens streamed, usage {usage}, max_tokens {job.max_tokens}")
        res.ok = True
    except Exception as exc:  # noqa: BLE001 - counted and reported
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def load(port: int, model: str, jobs: list[Job], clients: int, timeout: float, max_seconds: float) -> tuple[list[Result], float]:
    queue: asyncio.Queue[Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    results: list[Result] = []
    deadline = time.monotonic() + max_seconds

    async def client() -> None:
        while not queue.empty() and time.monotonic() < deadline:
            job = queue.get_nowait()
            results.append(await run_job(port, model, job, timeout))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return results, time.perf_counter() - t0


# ---------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_dir(arg: str | None, workdir: Path) -> str:
    if arg:
        return arg
    if (ROOT / "framework" / "demo" / "demo" / "config.json").is_file():
        return "demo"
    out = workdir / "random-model"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, str(ROOT / "tools" / "make_random_checkpoint.py"), str(out)], check=True,
                   stdout=subprocess.DEVNULL, cwd=ROOT, env=env)
    return str(out)


async def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        try:
            if (await get(port, "/health"))[0] == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the server did not become ready")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def main_async(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        workdir = Path(tmp)
        model = model_dir(args.model, workdir)
        spec = workdir / "spec.yaml"
        spec.write_text(f"model: {model}\nengine: {{max_num_seqs: {args.max_num_seqs}, kv_cache_memory: {args.kv_cache}}}\n"
                        "sampling: {temperature: 0}\n")
        port = free_port()
        cmd = [sys.executable, "-m", "framework.cli", "serve", str(spec), "--host", "127.0.0.1", "--port", str(port),
               "--max-queue", str(args.requests), "--log-level", "warning", "--model-name", "bench"]
        proc = subprocess.Popen(cmd, cwd=ROOT)
        try:
            await wait_ready(port, proc)
            jobs, kinds = make_jobs(args.requests, args.kinds, args.disconnect_fraction, rng)
            # references: each kind alone (the same greedy request, no other load)
            reference = {}
            for prompt, max_tokens in kinds:
                r = await run_job(port, "bench", Job(-1, prompt, max_tokens, None), args.timeout)
                if not r.ok:
                    raise RuntimeError(f"reference request failed: {r.error}")
                reference[(prompt, max_tokens)] = r.text
            m0 = parse_metrics((await get(port, "/metrics"))[1])
            load_start = os.getloadavg()[0]
            results, wall = await load(port, "bench", jobs, args.clients, args.timeout, args.max_seconds)
            # wait for the aborted requests to be cleaned up
            deadline = time.monotonic() + 15
            while True:
                m1 = parse_metrics((await get(port, "/metrics"))[1])
                if (m1["decodekit_num_requests_active"] == 0 and m1["decodekit_kv_blocks_used"] == 0) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            load_end = os.getloadavg()[0]
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()

    stayed = [r for r in results if r.job.hang_up_after is None]
    left = [r for r in results if r.job.hang_up_after is not None]
    failed = [r for r in stayed if not r.ok]
    corrupted = [r for r in stayed if r.ok and r.text != reference[(r.job.prompt, r.job.max_tokens)]]
    ttfts = [r.ttft for r in stayed if r.ok and r.ttft is not None]
    gen_tokens = m1["decodekit_generation_tokens_total"] - m0["decodekit_generation_tokens_total"]
    streamed_tokens = sum(r.tokens for r in stayed if r.ok)
    steps = m1["decodekit_engine_steps_total"] - m0["decodekit_engine_steps_total"]
    lines = [
        f"decodekit serve load test: model {model if args.model or model == 'demo' else 'random checkpoint (tools/make_random_checkpoint.py)'}, "
        f"max_num_seqs {args.max_num_seqs}, {os.cpu_count()} CPUs (load average {load_start:.1f} at start, "
        f"{load_end:.1f} at end: other processes share them)",
        f"clients {args.clients}, requests sent {len(results)}/{args.requests} "
        f"({len(left)} hung up early, {len(stayed)} stayed), wall {wall:.1f} s",
        f"failed (stayed): {len(failed)}    corrupted (stayed, text != solo reference): {len(corrupted)}",
        f"KV blocks at the end: {int(m1['decodekit_kv_blocks_free'])} free of {int(m1['decodekit_kv_blocks_total'])} "
        f"(used {int(m1['decodekit_kv_blocks_used'])}), requests in flight {int(m1['decodekit_num_requests_active'])}",
        f"TTFT (client, to first token): p50 {percentile(ttfts, 0.5) * 1000:.0f} ms, p99 {percentile(ttfts, 0.99) * 1000:.0f} ms",
        f"throughput: {gen_tokens / wall:.0f} generated tok/s (server counter, incl. hung-up requests), "
        f"{streamed_tokens / wall:.0f} streamed tok/s to clients that stayed, {len(stayed) / wall:.2f} completed req/s",
        f"aborted by disconnect (server counter): {int(m1.get(ABORTED, 0) - m0.get(ABORTED, 0))}; "
        f"mean tokens generated per engine step (batch fill): {gen_tokens / max(1.0, steps):.1f}",
    ]
    for r in (failed + corrupted)[:5]:
        lines.append(f"  example problem (job {r.job.index}): {r.error or 'text differs from the solo reference'}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report + "\n")
    all_free = m1["decodekit_kv_blocks_used"] == 0 and m1["decodekit_num_requests_active"] == 0
    return 0 if not failed and not corrupted and all_free and len(results) == args.requests else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir or registered name (default: demo, else a random checkpoint)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--disconnect-fraction", type=float, default=0.1)
    ap.add_argument("--kinds", type=int, default=20, help="distinct (prompt, max_tokens) pairs")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--kv-cache", default="256MiB")
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    ap.add_argument("--max-seconds", type=float, default=900.0, help="no new request after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.txt"))
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
