"""Speculative decoding benchmark: draft model and prompt lookup against ordinary decoding.

Every cell runs the same prompts and settings twice in one process — ordinary decoding, then
with the drafter — and reports, for the speculative run: the measured acceptance rate ``a``
(accepted / drafted tokens), tokens per target forward (generated tokens / engine steps / batch), the
wall-clock speedup (tokens/s over the ordinary run's), and beside it the speedup predicted by
Leviathan et al. (2023), ``(1 - a^(g+1)) / ((1 - a)(g c + 1))``, with ``g`` the draft length and
``c`` the draft model's cost per forward relative to the target's, measured here as the ratio of
their ordinary decoding times per step at the same batch size (``c = 0`` for prompt lookup).

Parts (``--parts``, default all):

* ``demo``: the bundled ``demo`` (~6M) drafted by ``demo-draft`` (~0.9M), batch 1 and 16,
  temperature 0 and 0.8;
* ``lookup``: prompt lookup on input-grounded work at batch 1, greedy: JSON records re-emitted
  with edits, code continued from the prompt, a passage quoted back (target: >= 1.8x tokens/s);
* ``big``: the 40M random Llama of ``benchmarks/throughput.py`` (vocab 32000) drafted by a
  random model of the demo's size with the same vocabulary, and by prompt lookup — here the
  forward dominates the step. Random weights agree with nothing, so the draft model's
  acceptance is near zero: it shows the cost of speculating without the gain.

    python benchmarks/speculative.py --parts demo         # -> results/speculative-demo.txt
    python benchmarks/speculative.py --quick              # short lengths, seconds
    python benchmarks/speculative.py --parts lookup

The table is printed and written to ``--out`` (default ``benchmarks/results/speculative-<parts>.txt``;
one part per run keeps each under ~3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from framework import LLM, SamplingParams  # noqa: E402

DEMO_PROMPTS = [
    "Once upon a time", "The little dog", "She opened the door and", "In the morning the king",
    "The old man said", "It was a dark night", "The girl looked at", "A long time ago",
    "The cat", "He wanted to", "The sun was", "Tom and his friend", "One day a bird",
    "The teacher told the class", "When the rain stopped", "There was a small house",
]

RECORDS = "".join(
    f'{{"id": "P-{1000 + i}", "name": "{n}", "price": {p}, "category": "{c}", "in_stock": {s}}}\n'
    for i, (n, p, c, s) in enumerate([("Quiet Umbrella", "12.5", "home", "true"), ("Red Kettle", "30.0", "kitchen", "false"),
                                      ("Blue Lamp", "45.25", "home", "true"), ("Green Mug", "8.75", "kitchen", "true")])
)
LOOKUP_TASKS = {
    "json-records": (
        "Re-emit each record with in_stock set to false.\n" + RECORDS + "\n" + RECORDS.split("\n")[0][:40]
    ),
    "code": (
        "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
        "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n\n"
        "    def peek(self):\n        return self.items[-1]\n\n    def size(self):\n        return len(self.items)\n\n\n"
        "class Queue:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    ),
    "quote": (
        "The old man said: the sea is wide and the night is long, and the boat is small. "
        "The boy asked him again what he had said, and the old man said: the sea is wide and"
    ),
}

BIG = dict(  # a demo-size draft for the 40M target (same vocabulary)
    vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=6, num_attention_heads=8,
    num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
)


@dataclass
class Cell:
    part: str
    label: str
    batch: int
    temperature: float
    g: int
    base_tok_s: float = 0.0
    spec_tok_s: float = 0.0
    acceptance: float = 0.0
    tokens_per_forward: float = 0.0
    base_tokens_per_forward: float = 0.0
    c: float = 0.0
    identical: bool | None = None  # greedy: spec tokens == ordinary tokens

    @property
    def speedup(self) -> float:
        return self.spec_tok_s / self.base_tok_s if self.base_tok_s else 0.0

    @property
    def predicted(self) -> float:
        a, g, c = min(self.acceptance, 1 - 1e-9), self.g, self.c
        return (1 - a ** (g + 1)) / ((1 - a) * (g * c + 1))


def _timed(llm: LLM, prompts: list[Any], sp: SamplingParams) -> tuple[float, int, int, list[list[int]], dict]:
    """(wall s, generated tokens, engine steps, token ids, spec stats delta)."""
    before = llm.engine.stats()
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    wall = time.perf_counter() - t
    after = llm.engine.stats()
    ids = [list(c.token_ids) for o in outs for c in o.outputs]
    delta = {k: after[k] - before.get(k, 0) for k in after if k.startswith("spec_num")}
    assert llm.engine.check_all_free()
    return wall, sum(len(x) for x in ids), after["steps"] - before["steps"], ids, delta


def _repeat(llm: LLM, prompts: list[Any], sp: SamplingParams, repeats: int):
    """``repeats`` timed runs: (tokens/s of each, total tokens, total steps, first run's ids, summed spec stats)."""
    rates: list[float] = []
    toks = steps = 0
    first: list[list[int]] = []
    stats: dict = {}
    for r in range(repeats):
        wall, t, st, ids, d = _timed(llm, prompts, sp)
        rates.append(t / wall)
        toks, steps = toks + t, steps + st
        first = first or ids
        for k, v in d.items():
            stats[k] = stats.get(k, 0) + v
    return rates, toks, steps, first, stats


def _warm(llm: LLM, prompts: list[Any]) -> None:
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)


def _ms_per_step(llm: LLM, prompts: list[Any], gen: int) -> float:
    wall, _, steps, _, _ = _timed(llm, prompts, SamplingParams(max_tokens=gen, temperature=0, ignore_eos=True))
    return wall / steps


def run_pair(part: str, label: str, model: str, drafter: dict, prompts: list[Any], batch: int, temperature: float,
             gen: int, c: float, engine_kw: dict, ignore_eos: bool = True, repeats: int = 3) -> Cell:
    g = int(next(iter(drafter.values())).get("num_tokens", 4))
    cell = Cell(part, label, batch, temperature, g, c=c)
    sp = SamplingParams(max_tokens=gen, temperature=temperature, ignore_eos=ignore_eos, seed=None)
    ps = (prompts * ((batch + len(prompts) - 1) // len(prompts)))[:batch]
    base = LLM(model, max_num_seqs=max(16, batch), **engine_kw)
    _warm(base, ps)
    rates, toks, steps, base_ids, _ = _repeat(base, ps, sp, repeats)
    cell.base_tok_s, cell.base_tokens_per_forward = statistics.median(rates), toks / steps / batch
    del base
    gc.collect()
    spec = LLM(model, max_num_seqs=max(16, batch), drafter=drafter, **engine_kw)
    _warm(spec, ps)
    rates, toks, steps, spec_ids, d = _repeat(spec, ps, sp, repeats)
    cell.spec_tok_s, cell.tokens_per_forward = statistics.median(rates), toks / steps / batch
    cell.acceptance = d["spec_num_accepted_tokens"] / d["spec_num_draft_tokens"] if d["spec_num_draft_tokens"] else 0.0
    if temperature == 0:
        cell.identical = spec_ids == base_ids
    del spec
    gc.collect()
    return cell


def cost_ratio(target: str, draft: str, prompts: list[Any], batch: int, gen: int, engine_kw: dict) -> float:
    """Draft forward time / target forward time (ordinary greedy decoding, same batch)."""
    ps = (prompts * ((batch + len(prompts) - 1) // len(prompts)))[:batch]
    times = []
    for m in (draft, target):
        llm = LLM(m, max_num_seqs=max(16, batch), **engine_kw)
        _warm(llm, ps)
        times.append(_ms_per_step(llm, ps, gen))
        del llm
        gc.collect()
    return times[0] / times[1]


def big_checkpoints(cache: Path, log) -> tuple[Path, Path]:
    import shutil

    import transformers

    from benchmarks.throughput import ensure_checkpoint

    target = ensure_checkpoint(cache, "llama40m", log)
    draft = cache / "demo-size-32k-random"
    if not (draft / ".complete").is_file():
        torch.manual_seed(4321)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BIG)).eval()
        tmp = draft.with_name(draft.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / ".complete").write_text("ok\n")
        shutil.rmtree(draft, ignore_errors=True)
        tmp.rename(draft)
    return target, draft


def render(cells: list[Cell], header: list[str]) -> str:
    lines = list(header) + [""]
    cols = (f"{'part':<7}{'workload':<22}{'batch':>5}{'temp':>6}{'g':>3}{'c':>7}{'accept':>8}{'tok/fwd':>9}"
            f"{'base tok/s':>12}{'spec tok/s':>12}{'speedup':>9}{'predicted':>11}{'greedy ==':>11}")
    lines += [cols, "-" * len(cols)]
    for x in cells:
        same = "" if x.identical is None else ("yes" if x.identical else "NO")
        lines.append(f"{x.part:<7}{x.label:<22}{x.batch:>5}{x.temperature:>6.1f}{x.g:>3}{x.c:>7.3f}{x.acceptance:>8.3f}"
                     f"{x.tokens_per_forward:>9.2f}{x.base_tok_s:>12.1f}{x.spec_tok_s:>12.1f}{x.speedup:>8.2f}x"
                     f"{x.predicted:>10.2f}x{same:>11}")
    lines += ["", "accept: accepted / drafted tokens; tok/fwd: generated tokens per sequence per target forward (engine step; base 1.00);",
              "speedup: spec tok/s / ordinary tok/s in the same run; predicted: (1 - a^(g+1)) / ((1 - a)(g c + 1));",
              "greedy ==: speculative tokens identical to ordinary greedy decoding."]
    look = [x for x in cells if x.part == "lookup"]
    if look:
        ok = [x for x in look if x.speedup >= 1.8]
        lines.append(f"prompt lookup target >= 1.8x tokens/s at batch 1: met on {len(ok)}/{len(look)} workloads "
                     f"({', '.join(f'{x.label} {x.speedup:.2f}x' for x in look)})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="demo,lookup,big", help="comma list of demo, lookup, big")
    p.add_argument("--gen-len", type=int, default=None, help="new tokens per request (default 96; --quick 24)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cache-dir", type=Path, default=HERE / ".cache")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    gen = args.gen_len or (24 if args.quick else 96)
    out = args.out or HERE / "results" / f"speculative{'-quick' if args.quick else ''}-{'-'.join(parts)}.txt"
    torch.set_num_threads(args.threads)
    kw = dict(dtype=args.dtype, num_threads=args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    cells: list[Cell] = []
    t0 = time.perf_counter()
    if "demo" in parts:
        for batch in (1, 16):
            c = cost_ratio("demo", "demo-draft", DEMO_PROMPTS, batch, gen // 2, kw)
            log(f"demo batch {batch}: c = {c:.3f}")
            for temp in (0.0, 0.8):
                for g in (2, 4):
                    cell = run_pair("demo", f"demo-draft g={g}", "demo", {"draft_model": {"model": "demo-draft", "num_tokens": g}},
                                    DEMO_PROMPTS, batch, temp, gen, c, kw)
                    cells.append(cell)
                    log(render([cell], []).splitlines()[3])
            cells.append(run_pair("demo", "prompt_lookup g=4", "demo", {"prompt_lookup": {"num_tokens": 4}},
                                  DEMO_PROMPTS, batch, 0.0, gen, 0.0, kw))
            log(render([cells[-1]], []).splitlines()[3])
    if "lookup" in parts:
        for name, prompt in LOOKUP_TASKS.items():
            for g in (4, 8):
                cell = run_pair("lookup", f"{name} g={g}", "demo", {"prompt_lookup": {"num_tokens": g, "max_ngram": 3}},
                                [prompt], 1, 0.0, gen * 2, 0.0, kw, ignore_eos=False)
                cells.append(cell)
                log(render([cell], []).splitlines()[3])
    if "big" in parts:
        target, draft = big_checkpoints(args.cache_dir, log)
        bkw = dict(kw, skip_tokenizer_init=True)
        g_ = torch.Generator().manual_seed(7)
        prompts = [{"prompt_token_ids": torch.randint(3, 32000, (64,), generator=g_).tolist()} for _ in range(16)]
        bgen = max(16, gen // 3)
        for batch in (1, 16):
            c = cost_ratio(str(target), str(draft), prompts, batch, bgen // 2, bkw)
            log(f"big batch {batch}: c = {c:.3f}")
            for temp in (0.0, 0.8):
                cell = run_pair("big", "random demo-size g=4", str(target), {"draft_model": {"model": str(draft), "num_tokens": 4}},
                                prompts, batch, temp, bgen, c, bkw)
                cells.append(cell)
                log(render([cell], []).splitlines()[3])
            cell = run_pair("big", "prompt_lookup g=4", str(target), {"prompt_lookup": {"num_tokens": 4}},
                            prompts, batch, 0.0, bgen, 0.0, bkw)
            cells.append(cell)
            log(render([cell], []).splitlines()[3])
    header = [
        "# decodekit speculative decoding (benchmarks/speculative.py)",
        f"# date: {_dt.datetime.now().isoformat(timespec='seconds')}",
        f"# machine: {platform.machine()}, nproc {os.cpu_count()}, load average {os.getloadavg()[0]:.2f} (at the end), "
        f"threads {args.threads}, dtype {args.dtype}",
        f"# python {platform.python_version()}, torch {torch.__version__}",
        f"# command: python benchmarks/speculative.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        f"# new tokens per request: demo {gen} (ignore_eos), lookup up to {gen * 2} (stops at EOS), big {max(16, gen // 3)}; "
        f"medians of 3 timed runs per cell; total {time.perf_counter() - t0:.0f} s",
    ]
    text = render(cells, header)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
