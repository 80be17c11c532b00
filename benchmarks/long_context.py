"""Long context on the demo model: attention sinks vs a plain sliding window vs dense attention.

Part ``ppl``: perplexity of ``demo`` on held-out Shakespeare scenes (the demo corpus's held-out
split, ``tools/demo_training/corpus.py``) concatenated to ``--tokens`` tokens (default 8x the
model's 1024-token context), evaluated token by token through the engine's own KV cache: the
text is teacher-forced one token per step by a logits processor (the reported log-probability
is the model's, before the forcing), under

* ``dense``: every block kept, the text cut into independent segments of ``--dense-ctx`` tokens
  (256: the demo was trained on 256-token windows, so dense attention is only sound that far,
  although its config allows 1024 positions);
* ``window``: the ``sliding_window`` policy (no sinks) with a cache of ``--cache`` tokens;
* ``sinks``: ``attention_sinks`` with ``--sinks`` sinks and the same cache size.

Expected shape (StreamingLLM, Xiao et al. 2023): ``window`` blows up once the first tokens leave
the cache, ``sinks`` stays close to ``dense``. (Measured on ``demo``: all three stay close; the
small model, trained on random 256-token windows, does not lean on its first tokens.)

Part ``gen``: one 20,000-token greedy generation under ``attention_sinks`` (4 sinks + 1020
window, the model's context): tokens/s and KV blocks held per 2,000-token slice — flat.

    python benchmarks/long_context.py                 # both parts
    python benchmarks/long_context.py --part ppl --tokens 4096
    python benchmarks/long_context.py --part attn,ppl --model /tmp/sinks/demo-sinks --cache 64

``--model``: a bundled LM or a model directory, e.g. ``demo-sinks`` from ``python
tools/train_demo.py --only demo-sinks --out /tmp/sinks`` (the draft's shape trained on windows that
always start with BOS, StreamingLLM's sink-token pretraining; not bundled: it learned no sink).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from pydantic import BaseModel, ConfigDict  # noqa: E402

from framework import LLM, SamplingParams  # noqa: E402
from framework.hookspecs import hookimpl  # noqa: E402
from framework.plugins import PluginManager  # noqa: E402


class _TeacherParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[int]


class Teacher:
    """Forces output token ``i`` to be ``tokens[i]`` (every other logit -inf)."""

    def __init__(self, setup):
        self.targets: dict[int, list[int]] = {}

    def add_request(self, slot, params, request):
        self.targets[slot] = params.tokens

    def remove(self, slot):
        self.targets.pop(slot, None)

    def apply(self, logits, ctx):
        for r, slot in enumerate(ctx.slots):
            tgt = self.targets[slot][ctx.num_output_tokens(r)]
            keep = logits[r, tgt].clone()
            logits[r].fill_(-math.inf)
            logits[r, tgt] = keep
        return logits


def plugin_manager() -> PluginManager:
    plugin = types.ModuleType("long_context_teacher")
    plugin.register_logits_processors = hookimpl(lambda register: register("teacher", Teacher, params=_TeacherParams))
    return PluginManager(extra_plugins=[plugin])


def heldout_text(tokenizer, n_tokens: int) -> list[int]:
    sys.path.insert(0, str(ROOT / "tools"))
    from demo_training import corpus

    bos = getattr(tokenizer, "bos_token_id", None)
    ids: list[int] = [] if bos is None else [bos]  # one document: a BOS only at the start
    for scene in corpus.shakespeare():
        if corpus.is_heldout("shakespeare", scene):
            enc = tokenizer.encode(scene)
            ids += enc[1:] if enc and enc[0] == bos else enc
            if len(ids) >= n_tokens:
                break
    if len(ids) < n_tokens:
        raise SystemExit(f"only {len(ids)} held-out tokens available (asked {n_tokens})")
    return ids[:n_tokens]


def forced_logprobs(llm: LLM, ids: list[int]) -> list[float]:
    """log P(ids[i] | ids[:i]) for i >= 1, one engine step per token."""
    params = SamplingParams(max_tokens=len(ids) - 1, temperature=0, ignore_eos=True, logprobs=0,
                            processors=[{"teacher": {"tokens": ids[1:]}}])
    out = llm.generate([{"prompt_token_ids": ids[:1]}], params)[0].outputs[0]
    assert out.token_ids == ids[1:]
    return [lp[t] for lp, t in zip(out.logprobs, out.token_ids)]


def dense_logprobs(llm: LLM, ids: list[int], ctx: int) -> list[float]:
    """Dense attention within the context: independent segments of ``ctx`` tokens, each one
    prefill whose prompt logprobs are the same numbers a token-by-token pass gives."""
    lps: list[float] = []
    for s in range(0, len(ids) - 1, ctx - 1):
        seg = ids[s : s + ctx]
        out = llm.generate([{"prompt_token_ids": seg}], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
        lps += [lp[t] for lp, t in zip(out.prompt_logprobs[1:], seg[1:])]
    return lps


def ppl(lps: list[float]) -> float:
    return math.exp(-sum(lps) / len(lps)) if lps else float("nan")


def model_dir(model: str) -> Path:
    """A model directory: a bundled model's by name, or ``model`` itself if it is a directory."""
    from framework.demo import demo_model_dir

    return Path(model) if Path(model).is_dir() else demo_model_dir(model)


def part_ppl(args, lines: list[str]) -> None:
    common = dict(device="cpu", dtype="float32", block_size=args.block_size, num_kv_blocks=4096,
                  plugin_manager=plugin_manager(), max_num_seqs=1)
    dense = LLM(args.model, **common)
    ids = heldout_text(dense.tokenizer, args.tokens)
    ctx = args.dense_ctx
    t = time.perf_counter()
    dense_lps = dense_logprobs(dense, ids, ctx)
    dense_time = time.perf_counter() - t
    max_len = dense.engine.max_model_len
    del dense
    caches = [int(c) for c in str(args.cache).split(",")]
    lines.append(f"perplexity of {args.model} on {len(ids)} held-out Shakespeare tokens (BOS + scenes; the model's "
                 f"context is {max_len}, trained on random 256-token windows"
                 f"{', each starting with BOS' if Path(args.model).name == 'demo-sinks' else ''}); "
                 f"dense: independent segments of {ctx} tokens "
                 f"({dense_time:.0f} s); window / sinks: token by token through the engine's cache "
                 f"(sinks: {args.sinks}, block_size {args.block_size})")
    for cache in caches:
        runs: dict[str, list[float]] = {"dense": dense_lps}
        times: dict[str, float] = {}
        for name, policy in (("window", {"sliding_window": {"window": cache}}),
                             ("sinks", {"attention_sinks": {"num_sinks": args.sinks, "window": cache - args.sinks}})):
            llm = LLM(args.model, kv_policy=policy, **common)
            t = time.perf_counter()
            runs[name] = forced_logprobs(llm, ids)
            times[name] = time.perf_counter() - t
            assert llm.engine.block_manager.check_all_free()
            del llm
        step = 1024
        bins = [(0, cache), (cache, step)] + [(a, min(a + step, len(ids) - 1)) for a in range(step, len(ids) - 1, step)]
        lines.append("")
        lines.append(f"cache {cache} tokens")
        lines.append(f"{'tokens':>13} | {'dense':>8} | {'window':>8} | {'sinks':>8}")
        lines.append("-" * 46)
        for a, b in bins:
            if b <= a:
                continue
            lines.append(f"{a:>6}-{b:<6} | " + " | ".join(f"{ppl(runs[k][a:b]):8.2f}" for k in ("dense", "window", "sinks")))
        lines.append(f"{'all':>13} | " + " | ".join(f"{ppl(runs[k]):8.2f}" for k in ("dense", "window", "sinks")))
        lines.append("time (s)      |          | " + " | ".join(f"{times[k]:8.1f}" for k in ("window", "sinks")))
        sys.stdout.write("\n".join(lines[-len(bins) - 6:]) + "\n")
        sys.stdout.flush()
    lines.append("(dense restarts every segment: its first tokens have little context)")
    lines.append("")


def part_attn(args, lines: list[str]) -> None:
    """Does the model have attention sinks? Per layer, the attention mass that queries 64-255 of a
    dense 256-token window put on key position 0 (and on 1-3), with the window starting at BOS
    and at an arbitrary token, read from Hugging Face transformers' eager attention on the demo
    checkpoint (not through the engine: the engine does not expose attention weights)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir(args.model)), torch_dtype=torch.float32,
                                             attn_implementation="eager").eval()
    llm = LLM(args.model, device="cpu", dtype="float32", num_kv_blocks=64)
    ids = heldout_text(llm.tokenizer, 4096)
    del llm
    starts = {"BOS": [0], "mid-text": list(range(512, 3584, 384))}
    lines.append(f"attention mass on the first key positions ({args.model}, dense 256-token windows, queries 64-255, "
                 "mean over heads); uniform attention would give ~0.007 per position")
    lines.append(f"{'window start':>12} | {'layer':>5} | {'pos 0':>6} | {'pos 1-3':>7} | {'max other':>9}")
    lines.append("-" * 52)
    for name, offs in starts.items():
        acc = None
        for o in offs:
            x = torch.tensor([ids[o : o + 256]])
            with torch.no_grad():
                att = model(x, output_attentions=True).attentions  # per layer [1, H, T, T]
            rows = torch.stack([a[0, :, 64:, :].mean(0) for a in att])  # [L, 192, T]
            acc = rows if acc is None else acc + rows
        acc = acc / len(offs)
        for layer in range(acc.shape[0]):
            m = acc[layer].mean(0)  # mean over queries: [T]
            lines.append(f"{name:>12} | {layer:>5} | {m[0].item():6.3f} | {m[1:4].sum().item():7.3f} | "
                         f"{m[4:].max().item():9.3f}")
    lines.append("")


def part_gen(args, lines: list[str]) -> None:
    """One long greedy generation as a *streaming* request (its partial outputs are consumed, as
    a server would): tokens/s and KV blocks held per slice, and per-step host time (the engine
    step minus the transformer forward, timed by forward hooks on the model) over its first
    5,000 tokens: steps 1-500 vs 4501-5000, the ratio the issue asks to be <= 1.2."""
    llm = LLM(args.model, device="cpu", dtype="float32", num_kv_blocks=4096, max_num_seqs=1,
              kv_policy={"attention_sinks": {"num_sinks": 4, "window": args.window, "evict_blocks": args.evict_blocks}})
    eng = llm.engine
    model = eng.models.main.runner.model
    fwd_ms: list[float] = []
    t_fwd = [0.0]
    model.register_forward_pre_hook(lambda m, a: t_fwd.__setitem__(0, time.perf_counter()))
    model.register_forward_hook(lambda m, a, o: fwd_ms.append((time.perf_counter() - t_fwd[0]) * 1e3))
    llm.generate("JULIET.", SamplingParams(max_tokens=args.warmup, temperature=0, ignore_eos=True))  # warm up
    fwd_ms.clear()
    eng.add_request("g", "ROMEO.", SamplingParams(max_tokens=args.gen_tokens, temperature=0, ignore_eos=True),
                    stream=True)
    slice_ = 2000
    rows, t0, n0, peak = [], time.perf_counter(), 0, 0
    step_ms: list[float] = []
    streamed = 0
    base = eng.core.num_generated_tokens
    while eng.has_unfinished_requests():
        ts = time.perf_counter()
        for out in eng.step():
            streamed += len(out.outputs[0].token_ids) if out.delta else 0
        step_ms.append((time.perf_counter() - ts) * 1e3)
        n = eng.core.num_generated_tokens - base
        peak = max(peak, eng.block_manager.num_used_blocks)
        if n - n0 >= slice_ or not eng.has_unfinished_requests():
            dt = time.perf_counter() - t0
            rows.append((n, (n - n0) / dt, eng.block_manager.num_used_blocks, peak))
            t0, n0, peak = time.perf_counter(), n, 0
    assert eng.block_manager.check_all_free()
    assert len(fwd_ms) == len(step_ms), (len(fwd_ms), len(step_ms))
    host = [s - f for s, f in zip(step_ms, fwd_ms)]
    lines.append(f"{args.gen_tokens}-token greedy streaming generation, attention_sinks 4 + {args.window} "
                 f"(block_size 16, evict_blocks {args.evict_blocks}), "
                 f"{args.model} context {eng.max_model_len}; {streamed} tokens streamed as deltas")
    lines.append(f"{'tokens':>8} | {'tok/s':>7} | {'blocks held':>11} | {'peak in slice':>13}")
    lines.append("-" * 50)
    for n, tps, held, pk in rows:
        lines.append(f"{n:>8} | {tps:7.1f} | {held:>11} | {pk:>13}")

    def mean(xs: list[float]) -> float:
        return sum(xs) / max(1, len(xs))

    lines.append(f"{'ms/step':>18} | {'steps 1-500':>11} | {'4501-5000':>9} | {'ratio':>5} | {'last 500':>8}")
    full = (args.window + 20 + 500) // 500 * 500  # the first 500-step slice with the cache full
    for name, xs in (("host (step - fwd)", host), ("forward", fwd_ms), ("whole step", step_ms)):
        a, b = mean(xs[1:501]), mean(xs[4501:5001])
        lines.append(f"{name:>18} | {a:11.3f} | {b:9.3f} | {b / a:5.2f} | {mean(xs[-500:]):8.3f}")
    lines.append(f"{'cache full':>18} | steps {full + 1}-{full + 500} vs the last 500: " + ", ".join(
        f"{name} {mean(xs[-500:]) / mean(xs[full + 1 : full + 501]):.2f}x"
        for name, xs in (("host", host), ("forward", fwd_ms), ("step", step_ms))))
    lines.append(f"(step 0 is the prefill; until the cache holds its ~{args.window + 4} tokens every step attends to, "
                 "and builds attention metadata for, more of them; after that the step is flat)")
    lines.append("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", help="ppl, attn, gen, all, or a comma-separated list of parts")
    ap.add_argument("--model", default="demo", help="a bundled language model (demo, demo-draft) or a model directory")
    ap.add_argument("--tokens", type=int, default=8 * 1024 + 1)
    ap.add_argument("--cache", default="64,256", help="KV tokens kept by window / sinks (comma-separated sizes)")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--dense-ctx", type=int, default=256,
                    help="dense segments (demo was trained on 256-token windows; positions past it are untrained)")
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--gen-tokens", type=int, default=20_000)
    ap.add_argument("--window", type=int, default=1020, help="gen: attention_sinks window")
    ap.add_argument("--evict-blocks", type=int, default=1, help="gen: attention_sinks evict_blocks")
    ap.add_argument("--warmup", type=int, default=1100,
                    help="tokens of a warm-up generation first (every attention length up to the cache's once)")
    ap.add_argument("--out", default=str(HERE / "results" / "long_context.txt"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    parts = {"ppl", "attn", "gen"} if args.part == "all" else set(args.part.split(","))
    if not parts <= {"ppl", "attn", "gen"}:
        ap.error(f"--part: unknown part(s) {sorted(parts - {'ppl', 'attn', 'gen'})}; choose from ppl, attn, gen, all")
    model_flag = "" if args.model == "demo" else f" --model {args.model}"
    lines = [f"# benchmarks/long_context.py --part {args.part}{model_flag}  ({_dt.date.today()}, "
             f"{platform.processor() or platform.machine()}, 1 thread)", ""]
    if "ppl" in parts:
        part_ppl(args, lines)
    if "attn" in parts:
        part_attn(args, lines)
    if "gen" in parts:
        part_gen(args, lines)
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
