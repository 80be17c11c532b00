"""Rerankers on the demo model: self-consistency vs k, MBR vs sampling, aggregate vs exact MBR.

Problems are the demo corpus's own held-out arithmetic word problems (``tools/demo_training``:
the documents ``is_heldout`` kept out of training, minus any question that also occurs in a
training document), prompted as ``Q: <question>\\nA:``. Everything is seeded.

1. **Self-consistency**: 20 samples per problem (temperature 0.8); accuracy of the majority
   answer over the first k samples for k in {1, 5, 10, 20} — and, to lower the variance, over
   every disjoint block of k of the 20 samples (20/k blocks per problem); greedy as a row.
2. **MBR vs sampling**: of the same 20 candidates, the one chosen by MBR (chrF; exact and
   aggregate) against a random sample (the first) and the highest-logprob candidate: chrF of
   the choice against the problem's reference worked answer (sentence mean and corpus chrF),
   and the accuracy of its answer.
3. **Aggregate vs exact (and pruning)**: 128 samples for each of 8 prompts, split into disjoint
   lists of N in {8, 32, 128}; how often each method picks the exact choice (or one with the
   same expected utility), and the time it takes (a fresh utility each list: no cached n-grams).

Generation is the slow part (~430 tokens/s on 2 CPU cores), so it runs in parts that each fit in
about two minutes and cache their samples (``--cache``); the report needs all three::

    python benchmarks/rerankers.py --part sc0      # problems 0-99, 20 samples each + greedy
    python benchmarks/rerankers.py --part sc1      # problems 100-199
    python benchmarks/rerankers.py --part timing   # 8 prompts x 128 samples
    python benchmarks/rerankers.py --report        # tables -> benchmarks/results/rerankers.txt

``--problems 40 --quick`` shrinks everything for a smoke run (all parts and the report at once).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from framework.outputs import CompletionOutput  # noqa: E402
from framework.rerankers import RerankRequest  # noqa: E402
from plugins.rerankers.mbr import MBRReranker, aggregate_scores, exact_scores, pruning_mbr  # noqa: E402
from plugins.rerankers.self_consistency import SelfConsistencyReranker  # noqa: E402
from plugins.rerankers.utilities import ChrF  # noqa: E402

PATTERN = re.compile(r"The answer is (-?[0-9]+)")
KS = (1, 5, 10, 20)
TIMING_PROMPTS_TEXT = ["You will", "To be, or not to be", "The quality of mercy is", "Once upon a time"]


def heldout_problems() -> list[tuple[str, str, str]]:
    """(prompt, reference worked answer, answer) of every held-out problem not seen in training."""
    from tools.demo_training import corpus, synthetic

    docs = synthetic.generated_documents(0, 0, 11000)["arithmetic"]  # the trained corpus's slice (seed 0)
    train_q = {p.split("\nA:")[0] for d in docs if not corpus.is_heldout("arithmetic", d) for p in d.split("\n\n")}
    out = []
    for d in docs:
        if not corpus.is_heldout("arithmetic", d):
            continue
        for p in d.split("\n\n"):
            q, _, a = p.partition("\nA:")
            if q in train_q:
                continue
            out.append((q + "\nA:", a, PATTERN.findall(a)[-1]))
    return out


def answer(text: str) -> str | None:
    found = PATTERN.findall(text)
    return found[-1] if found else None


# ----------------------------------------------------------------------------- generation
def generate(part: str, problems: list, args) -> dict:
    from framework import LLM, SamplingParams

    llm = LLM("demo", max_num_seqs=256)
    t0 = time.perf_counter()
    if part.startswith("sc"):
        lo, hi = args.slice
        chunk = problems[lo:hi]
        prompts = [p for p, _, _ in chunk]
        samp = llm.generate(prompts, SamplingParams(n=args.samples, temperature=0.8, max_tokens=48, seed=0, stop=["\n"]),
                            use_tqdm=False)
        greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48, stop=["\n"]), use_tqdm=False)
        rows = {str(lo + i): {"samples": [[o.text, o.cumulative_logprob, len(o.token_ids)] for o in s.outputs],
                              "greedy": g.outputs[0].text} for i, (s, g) in enumerate(zip(samp, greedy))}
    else:
        prompts = [p for p, _, _ in problems[-4:]] + TIMING_PROMPTS_TEXT
        samp = llm.generate(prompts, SamplingParams(n=args.timing_samples, temperature=1.0, max_tokens=32, seed=1,
                                                    stop=["\n"]), use_tqdm=False)
        rows = {f"t{i}": {"prompt": p, "samples": [[o.text, o.cumulative_logprob, len(o.token_ids)] for o in s.outputs]}
                for i, (p, s) in enumerate(zip(prompts, samp))}
    dt = time.perf_counter() - t0
    toks = sum(r[2] for v in rows.values() for r in v["samples"])
    print(f"part {part}: {len(rows)} prompts, {toks} tokens in {dt:.0f} s ({toks / dt:.0f} tok/s)")
    return rows


# ----------------------------------------------------------------------------- analysis
def _cands(samples) -> list[CompletionOutput]:
    return [CompletionOutput(i, t, [0] * n, lp, None, "stop") for i, (t, lp, n) in enumerate(samples)]


def self_consistency_table(problems, cache, n_problems: int, samples: int) -> list[str]:
    sc = SelfConsistencyReranker()
    opts = SelfConsistencyReranker.Params()
    rows = []
    greedy = np.mean([answer(cache[str(i)]["greedy"]) == problems[i][2] for i in range(n_problems)])
    rows.append(("greedy", "-", f"{100 * greedy:.1f}", "-", "-"))
    for k in [k for k in KS if k <= samples]:
        first, blocks = [], []
        for i in range(n_problems):
            s = cache[str(i)]["samples"]
            for b in range(samples // k):
                block = s[b * k:(b + 1) * k]
                req = RerankRequest("r", "", [], None, opts, _cands(block))
                ok = answer(block[sc.select(req)[0].index][0]) == problems[i][2]
                blocks.append(ok)
                if b == 0:
                    first.append(ok)
        # fraction of problems where the correct answer is among the k samples (an upper bound)
        oracle = np.mean([any(answer(t) == problems[i][2] for t, _, _ in cache[str(i)]["samples"][:k])
                          for i in range(n_problems)])
        se = 100 * np.std(blocks) / np.sqrt(len(blocks))
        rows.append((f"self-consistency k={k}", f"{len(blocks)}", f"{100 * np.mean(first):.1f}",
                     f"{100 * np.mean(blocks):.1f} +- {se:.1f}", f"{100 * oracle:.1f}"))
    head = ("chooser", "cases", "acc % (first k)", "acc % (all blocks of k)", "any of k correct %")
    return _table(head, rows)


def mbr_table(problems, cache, n_problems: int) -> list[str]:
    import sacrebleu

    mbr = MBRReranker()
    choosers = {
        "random sample (the first)": lambda s: 0,
        "highest logprob": lambda s: int(np.argmax([lp for _, lp, _ in s])),
        "MBR chrF exact": lambda s: mbr.select(RerankRequest("r", "", [], None, MBRReranker.Params(), _cands(s)))[0].index,
        "MBR chrF aggregate": lambda s: mbr.select(RerankRequest("r", "", [], None, MBRReranker.Params(method="aggregate"),
                                                                 _cands(s)))[0].index,
        "MBR BLEU exact": lambda s: mbr.select(RerankRequest("r", "", [], None, MBRReranker.Params(utility="bleu"),
                                                             _cands(s)))[0].index,
        "self-consistency": lambda s: SelfConsistencyReranker().select(
            RerankRequest("r", "", [], None, SelfConsistencyReranker.Params(), _cands(s)))[0].index,
    }
    chrf = sacrebleu.CHRF()
    rows = []
    for name, choose in choosers.items():
        hyps, refs, acc = [], [], []
        for i in range(n_problems):
            s = cache[str(i)]["samples"]
            text = s[choose(s)][0]
            hyps.append(text.strip())
            refs.append(problems[i][1].strip())
            acc.append(answer(text) == problems[i][2])
        sent = np.mean([chrf.sentence_score(h, [r]).score for h, r in zip(hyps, refs)])
        corpus = chrf.corpus_score(hyps, [refs]).score
        rows.append((name, f"{sent:.2f}", f"{corpus:.2f}", f"{100 * np.mean(acc):.1f}"))
    return _table(("choice among the samples", "chrF vs reference (mean)", "corpus chrF", "answer acc %"), rows)


def timing_table(cache) -> list[str]:
    rows = []
    prompts = [k for k in cache if k.startswith("t")]
    total = len(cache[prompts[0]]["samples"])
    for n in (8, 32, 128):
        if n > total:
            continue
        res = {"exact": [], "aggregate": [], "pruning": []}
        agree = {"aggregate": 0, "pruning": 0}
        cases = 0
        for key in prompts:
            texts = [t for t, _, _ in cache[key]["samples"]]
            for b in range(total // n):
                lst = texts[b * n:(b + 1) * n]
                w = np.full(n, 1.0 / n)
                t = time.perf_counter()
                ex = exact_scores(ChrF(), lst, lst, w)
                res["exact"].append(time.perf_counter() - t)
                t = time.perf_counter()
                ag = aggregate_scores(ChrF(), lst, lst, w)
                res["aggregate"].append(time.perf_counter() - t)
                t = time.perf_counter()
                _, order = pruning_mbr(ChrF(), lst, lst, w, [8, 16, 32, 64], 0.99, 200, b, same=True)
                res["pruning"].append(time.perf_counter() - t)
                best = ex.max()
                agree["aggregate"] += int(ex[int(np.argmax(ag))] >= best - 1e-9)
                agree["pruning"] += int(ex[order[0]] >= best - 1e-9)
                cases += 1
        te, ta, tp = (1e3 * np.mean(res[m]) for m in ("exact", "aggregate", "pruning"))
        rows.append((str(n), str(cases), f"{te:.1f}", f"{ta:.2f}", f"{te / ta:.0f}x",
                     f"{100 * agree['aggregate'] / cases:.0f}", f"{tp:.1f}", f"{100 * agree['pruning'] / cases:.0f}"))
    return _table(("N", "lists", "exact ms", "aggregate ms", "exact/aggregate", "aggregate agrees %",
                   "pruning ms", "pruning agrees %"), rows)


def _table(head, rows) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["sc0", "sc1", "timing"], help="generate one part into the cache")
    ap.add_argument("--report", action="store_true", help="write the tables from the cache")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="every part and the report in one go (use with --problems 40)")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "decodekit-rerankers-samples.json"),
                    help="where the parts keep their samples")
    ap.add_argument("--out", default=None, help="default benchmarks/results/rerankers.txt (--quick: rerankers-quick.txt)")
    args = ap.parse_args()
    args.samples = 20
    args.timing_samples = 32 if args.quick else 128
    problems = heldout_problems()
    assert len(problems) >= args.problems + 4, len(problems)
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    half = args.problems // 2
    parts = ["sc0", "sc1", "timing"] if args.quick else ([args.part] if args.part else [])
    for part in parts:
        args.slice = (0, half) if part == "sc0" else (half, args.problems)
        cache.update(generate(part, problems, args))
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache))
    if not (args.report or args.quick):
        return
    missing = [i for i in range(args.problems) if str(i) not in cache]
    if missing or not any(k.startswith("t") for k in cache):
        raise SystemExit(f"the cache lacks {len(missing)} problems or the timing part: run the parts first")
    import platform

    import torch

    lines = [
        "# Rerankers on the demo model (benchmarks/rerankers.py)",
        f"# {args.problems} held-out arithmetic word problems of the demo corpus (unseen in training), prompt 'Q: ...\\nA:'",
        f"# samples: temperature 0.8, 20 per problem, seed 0; greedy: temperature 0; torch {torch.__version__}, "
        f"{platform.machine()}",
        "",
        "## Self-consistency: accuracy of the majority answer vs k",
        *self_consistency_table(problems, cache, args.problems, args.samples),
        "",
        "## MBR vs sampling: the chosen candidate (of the 20) against the reference worked answer",
        *mbr_table(problems, cache, args.problems),
        "",
        f"## Aggregate vs exact MBR (chrF): {sum(k.startswith('t') for k in cache)} prompts x "
        f"{len(next(v for k, v in cache.items() if k.startswith('t'))['samples'])} samples (temperature 1.0), "
        "split into disjoint lists of N",
        *timing_table(cache),
        "",
        "agrees: the method's choice has the exact MBR's maximal expected utility (ties count).",
        "pruning: schedule 8, 16, 32, 64 references, alpha 0.99, 200 bootstrap resamples.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("rerankers-quick.txt" if args.quick else "rerankers.txt"))
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
