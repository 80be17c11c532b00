"""Rerankers on the demo model: self-consistency vs k, MBR vs sampling, aggregate vs exact MBR.

Problems are the demo corpus's own held-out arithmetic word problems (``tools/demo_training``:
the documents ``is_heldout`` kept out of training, minus any question that also occurs in a
training document), prompted as ``Q: <question>\\nA:``. Everything is seeded.

0. **Dev split** (choosing the sampling setting without looking at the test problems): 80
   fresh problems from the corpus's generator (another seed; none in training or the test set),
   10 samples each at every setting of ``DEV_SETTINGS`` (temperature, top_p); self-consistency
   accuracy at k = 1, 5, 10 with count and logprob weighting. The rule (highest accuracy at
   k = 10) picks the setting the test parts then sample with (so ``dev`` runs first).
1. **Self-consistency**: 20 samples per problem (the dev pick); accuracy of the majority
   answer over the first k samples for k in {1, 5, 10, 20} — and, to lower the variance, over
   every disjoint block of k of the 20 samples (20/k blocks per problem), with count and with
   logprob weighting; greedy as a row.
2. **MBR vs sampling**: of the same 20 candidates, the one chosen by MBR (chrF; exact and
   aggregate) against a random sample (the first) and the highest-logprob candidate: chrF of
   the choice against the problem's reference worked answer (sentence mean and corpus chrF),
   and the accuracy of its answer.
3. **Aggregate vs exact (and pruning)**: 128 samples for each of 8 prompts, split into disjoint
   lists of N in {8, 32, 128}; how often each method picks the exact choice (or one with the
   same expected utility), and the time it takes (a fresh utility each list: no cached n-grams);
   then every pruning setting of ``PRUNING_SETTINGS`` on 200 random lists of N = 32.

Generation is the slow part (~430 tokens/s on 2 CPU cores), so it runs in parts that each fit in
about two minutes and cache their samples (``--cache``); the report needs all three::

    python benchmarks/rerankers.py --part dev      # the dev split: every setting of DEV_SETTINGS
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
# Sampling settings tried on the DEV split (fresh problems, never the test ones): (temperature, top_p)
DEV_SETTINGS = ((0.4, 1.0), (0.6, 1.0), (0.8, 1.0), (0.8, 0.9))
DEV_SEED, DEV_PROBLEMS, DEV_SAMPLES = 7, 80, 10
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


def dev_problems(n: int) -> list[tuple[str, str, str]]:
    """``n`` fresh problems of the same form for choosing the sampling settings: drawn from the
    corpus's problem generator with another seed, minus any question of a training document or
    of the held-out test problems (so the test problems are never looked at to tune anything)."""
    import random

    from tools.demo_training import corpus, synthetic

    docs = synthetic.generated_documents(0, 0, 11000)["arithmetic"]
    seen = {p.split("\nA:")[0] for d in docs for p in d.split("\n\n")}  # training and held-out questions
    r = random.Random(DEV_SEED)
    out: list[tuple[str, str, str]] = []
    while len(out) < n:
        q, _, a = synthetic.word_problem(r).partition("\nA:")
        if q in seen:
            continue
        seen.add(q)
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
    keep = lambda s: [[o.text, o.cumulative_logprob, len(o.token_ids)] for o in s.outputs]  # noqa: E731
    if part == "dev":
        devs = dev_problems(args.dev_problems)
        prompts = [p for p, _, _ in devs]
        greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48, stop=["\n"]), use_tqdm=False)
        rows = {f"devg:{i}": g.outputs[0].text for i, g in enumerate(greedy)}
        for temp, top_p in DEV_SETTINGS:
            samp = llm.generate(prompts, SamplingParams(n=DEV_SAMPLES, temperature=temp, top_p=top_p, max_tokens=48,
                                                        seed=0, stop=["\n"]), use_tqdm=False)
            rows.update({f"dev{temp}/{top_p}:{i}": keep(s) for i, s in enumerate(samp)})
    elif part.startswith("sc"):
        lo, hi = args.slice
        chunk = problems[lo:hi]
        prompts = [p for p, _, _ in chunk]
        temp, top_p = args.setting
        samp = llm.generate(prompts, SamplingParams(n=args.samples, temperature=temp, top_p=top_p, max_tokens=48, seed=0,
                                                    stop=["\n"]), use_tqdm=False)
        greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48, stop=["\n"]), use_tqdm=False)
        rows = {str(lo + i): {"samples": keep(s), "greedy": g.outputs[0].text, "setting": list(args.setting)}
                for i, (s, g) in enumerate(zip(samp, greedy))}
    else:
        prompts = [p for p, _, _ in problems[-4:]] + TIMING_PROMPTS_TEXT
        samp = llm.generate(prompts, SamplingParams(n=args.timing_samples, temperature=1.0, max_tokens=32, seed=1,
                                                    stop=["\n"]), use_tqdm=False)
        rows = {f"t{i}": {"prompt": p, "samples": [[o.text, o.cumulative_logprob, len(o.token_ids)] for o in s.outputs]}
                for i, (p, s) in enumerate(zip(prompts, samp))}
    dt = time.perf_counter() - t0
    toks = sum(r[2] for v in rows.values() if not isinstance(v, str)
               for r in (v["samples"] if isinstance(v, dict) else v))
    print(f"part {part}: {len(rows)} prompts, {toks} tokens in {dt:.0f} s ({toks / dt:.0f} tok/s)")
    return rows


# ----------------------------------------------------------------------------- analysis
def _cands(samples) -> list[CompletionOutput]:
    return [CompletionOutput(i, t, [0] * n, lp, None, "stop") for i, (t, lp, n) in enumerate(samples)]


def sc_blocks(samples: list, gold: str, k: int, weighting: str = "count") -> list[bool]:
    """Whether self-consistency over each disjoint block of ``k`` of ``samples`` is right."""
    sc = SelfConsistencyReranker()
    opts = SelfConsistencyReranker.Params(weighting=weighting)
    out = []
    for b in range(len(samples) // k):
        block = samples[b * k:(b + 1) * k]
        req = RerankRequest("r", "", [], None, opts, _cands(block))
        out.append(answer(block[sc.select(req)[0].index][0]) == gold)
    return out


def self_consistency_table(problems, cache, n_problems: int, samples: int) -> list[str]:
    rows = []
    greedy = np.mean([answer(cache[str(i)]["greedy"]) == problems[i][2] for i in range(n_problems)])
    rows.append(("greedy", "-", f"{100 * greedy:.1f}", "-", "-", "-"))
    for k in [k for k in KS if k <= samples]:
        first, blocks, lp_blocks = [], [], []
        for i in range(n_problems):
            s = cache[str(i)]["samples"]
            b = sc_blocks(s, problems[i][2], k)
            first.append(b[0])
            blocks += b
            lp_blocks += sc_blocks(s, problems[i][2], k, "logprob")
        # fraction of problems where the correct answer is among the k samples (an upper bound)
        oracle = np.mean([any(answer(t) == problems[i][2] for t, _, _ in cache[str(i)]["samples"][:k])
                          for i in range(n_problems)])
        se = lambda xs: 100 * np.std(xs) / np.sqrt(len(xs))  # noqa: E731
        rows.append((f"self-consistency k={k}", f"{len(blocks)}", f"{100 * np.mean(first):.1f}",
                     f"{100 * np.mean(blocks):.1f} +- {se(blocks):.1f}", f"{100 * np.mean(lp_blocks):.1f} +- {se(lp_blocks):.1f}",
                     f"{100 * oracle:.1f}"))
    head = ("chooser", "cases", "acc % (first k)", "acc % (all blocks of k)", "logprob-weighted acc % (all blocks)",
            "any of k correct %")
    return _table(head, rows)


def sc_diagnosis(problems, cache, n_problems: int, samples: int) -> list[str]:
    """Why self-consistency does (not) beat greedy: at k = all samples, greedy vs the vote per
    problem, and the votes' make-up (the share of the samples holding the gold answer, and the
    share of the winning answer)."""
    sc = SelfConsistencyReranker()
    cells = Counter()
    gold_share, win_share = [], []
    for i in range(n_problems):
        s = cache[str(i)]["samples"][:samples]
        gold = problems[i][2]
        req = RerankRequest("r", "", [], None, SelfConsistencyReranker.Params(), _cands(s))
        sc_ok = answer(s[sc.select(req)[0].index][0]) == gold
        g_ok = answer(cache[str(i)]["greedy"]) == gold
        cells[g_ok, sc_ok] += 1
        votes = Counter(a for a in (answer(t) for t, _, _ in s) if a is not None)
        gold_share.append(votes.get(gold, 0) / len(s))
        win_share.append(max(votes.values()) / len(s) if votes else 0.0)
    rows = [("greedy right", str(cells[True, True]), str(cells[True, False])),
            ("greedy wrong", str(cells[False, True]), str(cells[False, False]))]
    out = _table((f"{n_problems} problems, k={samples}", "vote right", "vote wrong"), rows)
    gs, ws = np.array(gold_share), np.array(win_share)
    out += ["", f"mean share of the samples with the gold answer: {100 * gs.mean():.1f}% (the per-sample accuracy); "
                f"the gold answer holds a plurality in {100 * np.mean(gs >= ws - 1e-12):.1f}% of the problems and "
                f"at least one sample in {100 * np.mean(gs > 0):.1f}%; where the vote is wrong, the winning answer "
                f"holds {100 * ws[gs < ws - 1e-12].mean():.1f}% of the samples and the gold one "
                f"{100 * gs[gs < ws - 1e-12].mean():.1f}%."]
    return out


def dev_table(cache, n_dev: int) -> tuple[list[str], tuple[float, float]]:
    """Every sampling setting tried on the dev split, and the one the rule picks: the highest
    self-consistency accuracy at k = 10 (the better of count and logprob weighting; ties: the
    higher accuracy at k = 5)."""
    devs = dev_problems(n_dev)
    greedy = np.mean([answer(cache[f"devg:{i}"]) == devs[i][2] for i in range(n_dev)])
    rows = [("greedy", "-", "-", "-", "-", "-", f"{100 * greedy:.1f}")]
    best, best_key = None, None
    for temp, top_p in DEV_SETTINGS:
        s = [cache[f"dev{temp}/{top_p}:{i}"] for i in range(n_dev)]
        acc = {}
        for k in (1, 5, 10):
            for wt in ("count", "logprob"):
                acc[k, wt] = 100 * np.mean([x for i in range(n_dev) for x in sc_blocks(s[i], devs[i][2], k, wt)])
        oracle = 100 * np.mean([any(answer(t) == devs[i][2] for t, _, _ in s[i][:10]) for i in range(n_dev)])
        key = (max(acc[10, "count"], acc[10, "logprob"]), max(acc[5, "count"], acc[5, "logprob"]))
        if best_key is None or key > best_key:
            best, best_key = (temp, top_p), key
        rows.append((f"T={temp} top_p={top_p}", f"{acc[1, 'count']:.1f}", f"{acc[5, 'count']:.1f}", f"{acc[5, 'logprob']:.1f}",
                     f"{acc[10, 'count']:.1f}", f"{acc[10, 'logprob']:.1f}", f"any of 10: {oracle:.1f}"))
    head = ("setting", "k=1 acc %", "k=5 count %", "k=5 logprob %", "k=10 count %", "k=10 logprob %", "greedy / oracle %")
    return _table(head, rows), best


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
                schedule, alpha, boot = TIMING_PRUNING
                _, order = pruning_mbr(ChrF(), lst, lst, w, list(schedule), alpha, boot, b, same=True)
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


# (schedule, alpha, bootstrap) of confidence-based pruning tried on random lists of N = 32
PRUNING_SETTINGS = (
    ((8, 16, 32, 64), 0.99, 200),
    ((8, 16, 32, 64), 0.99, 1000),
    ((8, 16, 32, 64), 0.999, 1000),
    ((16, 32, 64), 0.99, 200),
    ((16, 32, 64), 0.999, 1000),
    ((12, 24, 48), 0.99, 500),
)


TIMING_PRUNING = PRUNING_SETTINGS[0]  # the setting of the timing table


def pruning_table(cache, n: int = 32, lists_per_prompt: int = 25) -> list[str]:
    """Pruning settings vs exact MBR on many random lists of ``n`` (drawn, seeded, from each
    timing prompt's samples): the agreement rate (ties count) and the mean time."""
    prompts = [k for k in cache if k.startswith("t")]
    rng = np.random.default_rng(0)
    lists = []
    for key in prompts:
        texts = [t for t, _, _ in cache[key]["samples"]]
        for _ in range(lists_per_prompt):
            lists.append([texts[j] for j in rng.choice(len(texts), size=n, replace=False)])
    w = np.full(n, 1.0 / n)
    exact, t_exact = [], 0.0
    for lst in lists:
        t = time.perf_counter()
        exact.append(exact_scores(ChrF(), lst, lst, w))
        t_exact += time.perf_counter() - t
    rows = [("exact", "-", "-", f"{1e3 * t_exact / len(lists):.1f}", "1.00", "100")]
    for schedule, alpha, boot in PRUNING_SETTINGS:
        agree, spent = 0, 0.0
        for c, (lst, ex) in enumerate(zip(lists, exact)):
            t = time.perf_counter()
            _, order = pruning_mbr(ChrF(), lst, lst, w, list(schedule), alpha, boot, c, same=True)
            spent += time.perf_counter() - t
            agree += int(ex[order[0]] >= ex.max() - 1e-9)
        rows.append((",".join(map(str, schedule)), f"{alpha}", str(boot), f"{1e3 * spent / len(lists):.1f}",
                     f"{spent / t_exact:.2f}", f"{100 * agree / len(lists):.1f}"))
    return _table(("pruning schedule", "alpha", "bootstrap", "ms per list", "time / exact", "agrees %"), rows)


def _table(head, rows) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    return [fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["dev", "sc0", "sc1", "timing"], help="generate one part into the cache")
    ap.add_argument("--report", action="store_true", help="write the tables from the cache")
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--dev-problems", type=int, default=DEV_PROBLEMS, help="problems of the dev split")
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
    parts = ["dev", "sc0", "sc1", "timing"] if args.quick else ([args.part] if args.part else [])
    for part in parts:
        if part.startswith("sc"):
            if f"devg:{args.dev_problems - 1}" not in cache:
                raise SystemExit("the test parts sample with the dev split's pick: run --part dev first")
            args.setting = dev_table(cache, args.dev_problems)[1]
            print(f"part {part}: the dev split picks temperature {args.setting[0]}, top_p {args.setting[1]}")
        args.slice = (0, half) if part == "sc0" else (half, args.problems)
        cache.update(generate(part, problems, args))
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache))
    if not (args.report or args.quick):
        return
    missing = [i for i in range(args.problems) if str(i) not in cache]
    if missing or not any(k.startswith("t") for k in cache) or f"devg:{args.dev_problems - 1}" not in cache:
        raise SystemExit(f"the cache lacks {len(missing)} problems, the dev or the timing part: run the parts first")
    dev_lines, picked = dev_table(cache, args.dev_problems)
    used = {tuple(cache[str(i)].get("setting", (0.8, 1.0))) for i in range(args.problems)}
    note = (f"the dev rule picks T={picked[0]} top_p={picked[1]}; the test samples below use it" if used == {picked} else
            f"WARNING: the dev rule picks T={picked[0]} top_p={picked[1]} but the test samples were drawn at "
            f"{sorted(used)}: rerun sc0 and sc1")
    temp, top_p = sorted(used)[0]
    import platform

    import torch

    lines = [
        "# Rerankers on the demo model (benchmarks/rerankers.py)",
        f"# {args.problems} held-out arithmetic word problems of the demo corpus (unseen in training), prompt 'Q: ...\\nA:'",
        f"# samples: temperature {temp}, top_p {top_p}, 20 per problem, seed 0; greedy: temperature 0; "
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s) for the MBR timings",
        "",
        f"## Dev split: {args.dev_problems} fresh problems (generator seed {DEV_SEED}; none in training or in the test set), "
        f"{DEV_SAMPLES} samples each per setting",
        *dev_lines,
        "",
        f"rule: the highest self-consistency accuracy at k=10 (either weighting; ties: k=5). {note}.",
        "",
        "## Self-consistency: accuracy of the majority answer vs k (test: the held-out problems)",
        *self_consistency_table(problems, cache, args.problems, args.samples),
        "",
        "### Why: greedy vs the vote over all 20 samples, per problem",
        *sc_diagnosis(problems, cache, args.problems, args.samples),
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
        f"pruning: schedule {', '.join(map(str, TIMING_PRUNING[0]))} references, alpha {TIMING_PRUNING[1]}, "
        f"{TIMING_PRUNING[2]} bootstrap resamples.",
        "",
        "## Pruning settings vs exact MBR (chrF): 200 random lists of N = 32 (25 per timing prompt, seeded)",
        *pruning_table(cache),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("rerankers-quick.txt" if args.quick else "rerankers.txt"))
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
