"""Guidance processors in miniature reproductions of their papers, on the bundled demo models.

* FUDGE (Yang & Klein 2021) with ``demo-sentiment``: the share of positive continuations, judged
  by VADER (an external lexicon judge, not the classifier that steers), for strength 0, 1, 4, 8
  (positive target) and 4 (negative target);
* RAD (Deng & Raffel 2023) with ``demo-reward``: the same for beta 0, 10, 50 and inverse 10, 50;
* perplexity of every row's outputs under ``demo`` (the generator alone, the continuation given
  the prompt);
* contrastive decoding (``demo`` vs ``demo-draft``) against greedy and nucleus (top-p 0.95):
  repetition rate (share of repeated 4-grams in each output) and distinct-2 / distinct-3;
* cost: tokens/s of guided decoding as a ratio of unguided decoding at batch 1 and 16, for the
  cached processors and for the uncached reference (``cache: false``: the scorer re-run over the
  whole prefix + each candidate every step, as the papers' code does).

    python benchmarks/guidance.py                    # 200 prompts, 24 new tokens
    python benchmarks/guidance.py --prompts 50 --skip-cost
    python benchmarks/guidance.py --skip-quality     # rerun the cost section only: the other
                                                     # sections of --out are kept

The prompts are built from fixed templates (seeded); sampling uses per-request seeds, so a
rerun prints the same quality numbers. Results go to stdout and to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from framework import LLM, SamplingParams  # noqa: E402

SUBJECTS = ["The movie", "My neighbour", "The food", "This book", "The weather", "Our teacher", "The new phone",
            "The hotel", "My brother", "The city", "The concert", "The game", "Her dog", "The old car", "The garden",
            "The meeting", "The trip", "The little girl", "The king", "The shop"]
OPENINGS = ["was", "is", "made me feel", "seemed", "turned out to be", "looked", "always", "never", "today was",
            "last night was"]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` fixed prompts: subject x opening, shuffled with ``seed``."""
    all_ = [f"{s} {o}" for s in SUBJECTS for o in OPENINGS]
    random.Random(seed).shuffle(all_)
    return (all_ * (n // len(all_) + 1))[:n]


def generate(llm: LLM, prompts: list[str], processors: list[dict], *, max_tokens: int, **kw) -> list[tuple[list[int], list[int], str]]:
    tok = llm.engine.tokenizer
    reqs = [{"prompt_token_ids": tok.encode(p)} for p in prompts]
    params = [SamplingParams(max_tokens=max_tokens, ignore_eos=True, processors=processors, **{**kw, **({"seed": i} if "seed" in kw else {})})
              for i in range(len(prompts))]
    outs = llm.generate(reqs, params)
    return [(r["prompt_token_ids"], list(o.outputs[0].token_ids), o.outputs[0].text) for r, o in zip(reqs, outs)]


class Judge:
    """VADER compound score: positive when >= 0.05 (the lexicon's own convention)."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.sia = SentimentIntensityAnalyzer()

    def rate(self, texts: list[str]) -> tuple[float, float]:
        scores = [self.sia.polarity_scores(t)["compound"] for t in texts]
        return sum(s >= 0.05 for s in scores) / len(scores), sum(scores) / len(scores)


class Perplexity:
    """Perplexity of continuations under the generator alone (dense float32 forward)."""

    def __init__(self, name: str = "demo") -> None:
        from framework.models.loader import load_model

        self.model, _, _ = load_model(name)

    @torch.inference_mode()
    def __call__(self, rows: list[tuple[list[int], list[int], str]]) -> float:
        nll, n = 0.0, 0
        for prompt, out, _ in rows:
            ids = torch.tensor([prompt + out])
            hidden, _ = self.model.forward_dense(ids)
            logits = self.model.compute_logits(hidden[0])
            lp = torch.log_softmax(logits[len(prompt) - 1:-1], -1)
            nll -= lp.gather(1, torch.tensor(out)[:, None]).sum().item()
            n += len(out)
        return math.exp(nll / n)


def ngram_stats(rows: list[tuple[list[int], list[int], str]]) -> tuple[float, float, float]:
    """(mean share of repeated 4-grams per output, distinct-2, distinct-3 over all outputs)."""
    rep = []
    grams: dict[int, list[tuple[int, ...]]] = {2: [], 3: []}
    for _, out, _ in rows:
        g4 = [tuple(out[i:i + 4]) for i in range(len(out) - 3)]
        rep.append(1 - len(set(g4)) / len(g4) if g4 else 0.0)
        for k in grams:
            grams[k] += [tuple(out[i:i + k]) for i in range(len(out) - k + 1)]
    dist = {k: len(set(v)) / max(1, len(v)) for k, v in grams.items()}
    return sum(rep) / len(rep), dist[2], dist[3]


def tokens_per_s(llm: LLM, prompts: list[str], processors: list[dict], batch: int, max_tokens: int, repeats: int = 3) -> float:
    """Best of ``repeats`` timed runs (the least disturbed by other processes on the machine)."""
    generate(llm, prompts[:batch], processors, max_tokens=4, temperature=0)  # warm up (loads companions)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        generate(llm, prompts[:batch], processors, max_tokens=max_tokens, temperature=0)
        best = min(best, time.perf_counter() - t)
    return batch * max_tokens / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "guidance.txt")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    prompts = make_prompts(a.prompts)
    lines: list[str] = [f"# benchmarks/guidance.py  {_dt.datetime.now():%Y-%m-%d %H:%M}  {platform.processor() or platform.machine()}  "
                        f"torch threads {torch.get_num_threads()}",
                        f"# {a.prompts} prompts, {a.max_tokens} new tokens each, demo generator"]

    def emit(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    llm = LLM("demo", max_num_seqs=256)
    if not a.skip_quality:
        judge, ppl = Judge(), Perplexity()
        emit("\n## Attribute control (sampling, temperature 1.0, seed = prompt index); judge: VADER compound >= 0.05")
        emit(f"{'setting':44s} {'positive':>9s} {'mean comp':>10s} {'ppl(demo)':>10s}")
        runs = [("unguided", [])]
        runs += [(f"fudge target=positive strength={s}, top_k 50", [{"fudge": {"strength": s, "top_k": 50}}]) for s in (0.0, 1.0, 4.0, 8.0)]
        runs += [("fudge target=negative strength=4, top_k 50", [{"fudge": {"target": "negative", "strength": 4.0, "top_k": 50}}])]
        runs += [(f"rad beta={b}, top_k 20", [{"rad": {"beta": b, "top_k": 20}}]) for b in (0.0, 10.0, 50.0)]
        runs += [(f"rad inverse beta={b}, top_k 20", [{"rad": {"beta": b, "top_k": 20, "inverse": True}}]) for b in (10.0, 50.0)]
        for label, procs in runs:
            rows = generate(llm, prompts, procs, max_tokens=a.max_tokens, temperature=1.0, seed=0)
            pos, comp = judge.rate([p + t for p, (_, _, t) in zip(prompts, rows)])
            emit(f"{label:44s} {pos:9.3f} {comp:10.3f} {ppl(rows):10.2f}")
        emit("\n## Degeneration (repeated 4-grams per output; distinct-n over all outputs)")
        emit(f"{'decoding':44s} {'rep-4':>7s} {'dist-2':>7s} {'dist-3':>7s} {'ppl(demo)':>10s}")
        dec = [("greedy", [], {"temperature": 0}), ("nucleus top_p 0.95", [], {"temperature": 1.0, "top_p": 0.95, "seed": 0}),
               ("contrastive greedy alpha 0.1 beta 0.5 (obrien)", [{"contrastive": {}}], {"temperature": 0}),
               ("contrastive greedy alpha 0.1 (li)", [{"contrastive": {"scoring": "li"}}], {"temperature": 0})]
        for label, procs, kw in dec:
            rows = generate(llm, prompts, procs, max_tokens=2 * a.max_tokens, **kw)
            rep, d2, d3 = ngram_stats(rows)
            emit(f"{label:44s} {rep:7.3f} {d2:7.3f} {d3:7.3f} {ppl(rows):10.2f}")
    if not a.skip_cost:
        emit("\n## Cost: tokens/s (greedy, 32 new tokens, best of 3 runs), ratio to unguided decoding at the same batch")
        emit(f"{'processor':40s} {'batch 1':>10s} {'ratio':>6s} {'batch 16':>10s} {'ratio':>6s}")
        settings = [("unguided", []), ("fudge top_k 50", [{"fudge": {"top_k": 50}}]),
                    ("fudge top_k 50, uncached reference", [{"fudge": {"top_k": 50, "cache": False}}]),
                    ("rad top_k 20", [{"rad": {"top_k": 20}}]),
                    ("rad top_k 20, uncached reference", [{"rad": {"top_k": 20, "cache": False}}]),
                    ("contrastive", [{"contrastive": {}}]),
                    ("contrastive, uncached reference", [{"contrastive": {"cache": False}}])]
        base: dict[int, float] = {}
        for label, procs in settings:
            cells = []
            for batch in (1, 16):
                tps = tokens_per_s(llm, prompts, procs, batch, 32)
                base.setdefault(batch, tps)
                cells.append(f"{tps:10.1f} {tps / base[batch]:6.2f}")
            emit(f"{label:40s} {' '.join(cells)}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if a.skip_quality and not a.skip_cost and a.out.exists():  # keep the quality sections, replace the cost one
        old = a.out.read_text()
        head, cost = old.split("\n## Cost", 1)[0], text.split("\n## Cost", 1)[1]
        text = f"{head}\n{lines[0].replace('# ', '# cost section rerun: ', 1)}\n## Cost{cost}"
    a.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
