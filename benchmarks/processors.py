"""Logits-processor overhead: the time a full processor chain adds to a decode step.

A batch of requests decodes with sampling, once without processors and once with the full chain
(repetition + frequency + presence penalties, temperature, top-k, top-p, min-p). For every decode
step where the whole batch is due, the script times the model forward (``ModelRunner.run``), the
processor chain (``ProcessorChain.apply`` + ``on_tokens``) and the sampler, and reports the
chain's added time (chain + the sampler's extra time) as a percentage of the forward time.
Target: under 10% at batch 64 on the demo model.

    python benchmarks/processors.py                        # the demo model
    python benchmarks/processors.py --model path/to/hf-dir # any local checkpoint

If the demo model is not available, a random checkpoint written by
``tools/make_random_checkpoint.py`` (under ``benchmarks/.cache/``) is used instead, and the
output says so. Results go to stdout and to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from framework import LLM, ModelLoadError, SamplingParams  # noqa: E402

CHAIN = dict(repetition_penalty=1.1, frequency_penalty=0.3, presence_penalty=0.3,
             temperature=0.8, top_k=50, top_p=0.95, min_p=0.05)
BASELINE = dict(temperature=1.0)
FALLBACK_DIR = HERE / ".cache" / "processors-random-demo-shape"
# the demo model's shape (tools/train_demo.py): hidden 256, 6 layers, 8 heads, MLP 704, vocab 4096
FALLBACK_ARGS = ["--hidden", "256", "--layers", "6", "--heads", "8", "--kv-heads", "8", "--intermediate", "704",
                 "--vocab", "4096", "--max-len", "1024", "--tie", "--no-tokenizer"]


def resolve_model(name: str) -> tuple[str, str]:
    """(model to load, a note for the report)."""
    from framework.models.loader import resolve_model_dir

    try:
        return str(resolve_model_dir(name)), ""
    except ModelLoadError as exc:
        if name != "demo":
            raise
        note = (f"the demo model is not available ({exc}); using a random checkpoint of the demo's shape "
                f"from tools/make_random_checkpoint.py at {FALLBACK_DIR.relative_to(ROOT)} instead")
        print(f"note: {note}", file=sys.stderr)
        if not (FALLBACK_DIR / "config.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "tools" / "make_random_checkpoint.py"), str(FALLBACK_DIR), *FALLBACK_ARGS],
                           check=True)
        return str(FALLBACK_DIR), note


class StepTimer:
    """Wraps the engine's forward, processor chain and sampler with timers, per step."""

    def __init__(self, engine, clock=time.perf_counter):
        self.engine = engine
        self.clock = clock
        self.steps: list[dict[str, float]] = []
        self.proc_times: dict[str, list[float]] = defaultdict(list)
        self._cur: dict[str, float] = {}
        self._wrap(engine.core.executor, "forward", "forward")
        self._wrap(engine.processors, "apply", "chain")
        self._wrap(engine.processors, "on_tokens", "chain")
        self._wrap(engine.sampler, "sample", "sampler")
        self._wrap(engine, "step", "step", outer=True)

    def _wrap(self, obj, attr: str, key: str, outer: bool = False) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            if outer:
                self._cur = {}
            t0 = self.clock()
            out = fn(*args, **kwargs)
            self._cur[key] = self._cur.get(key, 0.0) + self.clock() - t0
            if attr == "forward":
                self._cur["rows"] = len(out.seqs)
                self._cur["prefill"] = any(n > 1 for _, n in args[0].scheduled)
            if outer:
                self.steps.append(self._cur)
            return out

        setattr(obj, attr, timed)

    def wrap_processors(self, batch: int) -> None:
        """Time each processor's ``apply`` separately in full-batch steps (a profiling breakdown)."""
        for name, proc in self.engine.processors._instances.items():
            fn = proc.apply

            def timed(logits, ctx, _fn=fn, _name=name):
                t0 = self.clock()
                out = _fn(logits, ctx)
                if logits.shape[0] == batch:
                    self.proc_times[_name].append(self.clock() - t0)
                return out

            proc.apply = timed

    def decode_steps(self, batch: int) -> list[dict[str, float]]:
        return [s for s in self.steps if s.get("rows") == batch and not s.get("prefill")]


def run_once(llm: LLM, params: dict, args, seed: int) -> StepTimer:
    engine = llm.engine
    timer = StepTimer(engine, time.thread_time if args.clock == "cpu" else time.perf_counter)
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    prompts = [{"prompt_token_ids": torch.randint(3, vocab, (args.prompt_len,), generator=g).tolist()}
               for _ in range(args.batch)]
    sp = [SamplingParams(max_tokens=args.gen_len, ignore_eos=True, seed=seed * 1000 + i, **params) for i in range(args.batch)]
    for i, (p, s) in enumerate(zip(prompts, sp)):
        engine.add_request(f"{seed}-{i}", p, s)
    timer.wrap_processors(args.batch)
    while engine.has_unfinished_requests():
        engine.step()
    # undo the wrappers (instance attributes shadow the class methods)
    for obj, attr in ((engine.core.executor, "forward"), (engine.processors, "apply"), (engine.processors, "on_tokens"),
                      (engine.sampler, "sample"), (engine, "step")):
        obj.__dict__.pop(attr, None)
    for proc in engine.processors._instances.values():
        proc.__dict__.pop("apply", None)
    return timer


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="registered model name or local HF directory (default: demo)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each configuration; step times are pooled")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: elapsed time; cpu: the engine thread's CPU time, robust to other load "
                         "on the machine but meaningful only with --threads 1")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "processors.txt")
    args = ap.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu counts only the calling thread: use it with --threads 1")

    model, note = resolve_model(args.model)
    llm = LLM(model, skip_tokenizer_init=True, num_threads=args.threads, dtype=args.dtype,
              max_num_seqs=args.batch, max_num_batched_tokens=max(2048, args.prompt_len))
    engine = llm.engine
    mc = engine.model_config
    print(f"model {model}: vocab {mc.vocab_size}, hidden {mc.hidden_size}, {mc.num_hidden_layers} layers, "
          f"{engine.dtype}, {args.threads} threads", file=sys.stderr)

    # warm-up, then alternate the two configurations so drift in machine load hits both alike
    run_once(llm, CHAIN, argparse.Namespace(**{**vars(args), "gen_len": 4}), seed=999)
    base_steps: list[dict] = []
    chain_steps: list[dict] = []
    per_proc: dict[str, list[float]] = defaultdict(list)
    for r in range(args.repeats):
        base_steps += run_once(llm, BASELINE, args, seed=2 * r).decode_steps(args.batch)
        t = run_once(llm, CHAIN, args, seed=2 * r + 1)
        chain_steps += t.decode_steps(args.batch)
        for k, v in t.proc_times.items():
            per_proc[k] += v
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)

    ms = lambda steps, key: 1e3 * med([s.get(key, 0.0) for s in steps])  # noqa: E731
    fwd_b, fwd_c = ms(base_steps, "forward"), ms(chain_steps, "forward")
    chain = ms(chain_steps, "chain")
    samp_b, samp_c = ms(base_steps, "sampler"), ms(chain_steps, "sampler")
    step_b, step_c = ms(base_steps, "step"), ms(chain_steps, "step")
    added = chain + max(samp_c - samp_b, 0.0)  # a faster sampler with the chain is noise: not counted
    pct = 100.0 * added / fwd_c

    lines = [
        "# decodekit logits-processor overhead (benchmarks/processors.py)",
        f"# date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"# machine: {platform.processor() or platform.machine()}, nproc {os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f} (at the end), threads {args.threads}, clock {args.clock}",
        f"# python {platform.python_version()}, torch {torch.__version__}",
        f"# model: {args.model} -> {model}" + (f"  [{note}]" if note else ""),
        f"#   vocab {mc.vocab_size}, hidden {mc.hidden_size}, layers {mc.num_hidden_layers}, dtype {engine.dtype}",
        f"# workload: batch {args.batch}, prompt {args.prompt_len}, {args.gen_len} new tokens, {args.repeats} repeats; "
        f"medians over {len(chain_steps)} (chain) / {len(base_steps)} (baseline) decode steps with the whole batch due",
        f"# chain: {', '.join(f'{k}={v}' for k, v in CHAIN.items())}",
        f"# baseline: {', '.join(f'{k}={v}' for k, v in BASELINE.items())} (sampling, no processor)",
        "",
        f"{'per decode step (ms, median)':<36}{'baseline':>10}{'chain':>10}",
        f"{'forward (ModelRunner.run)':<36}{fwd_b:>10.3f}{fwd_c:>10.3f}",
        f"{'processor chain (apply + on_tokens)':<36}{0.0:>10.3f}{chain:>10.3f}",
        f"{'sampler':<36}{samp_b:>10.3f}{samp_c:>10.3f}",
        f"{'whole step':<36}{step_b:>10.3f}{step_c:>10.3f}",
        "",
        "processor breakdown (ms per step, median):",
        *[f"  {k:<28}{1e3 * med(v):>8.3f}" for k, v in per_proc.items()],
        "",
        f"added time per step: {added:.3f} ms = chain {chain:.3f} + sampler difference {max(samp_c - samp_b, 0.0):.3f} "
        f"(measured {samp_c - samp_b:+.3f})",
        f"added time / forward time: {pct:.1f}%  (target < 10%: {'met' if pct < 10 else 'MISSED'})",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
