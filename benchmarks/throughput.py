"""Throughput benchmark: decodekit vs Hugging Face transformers and llama.cpp on CPU.

For every model x dtype x batch size, the frameworks generate from the same random-initialised
checkpoint (llama.cpp: its GGUF conversion, ``gguf_convert.py``) and the same random prompts
(greedy, a fixed number of new tokens) and the script reports time to first token, time per
output token, generated tokens per second, and decodekit's throughput as a multiple of
transformers' and of llama.cpp's. dtype ``int8`` is decodekit's ``quantization: int8`` (bfloat16
activations) against llama.cpp's Q8_0; transformers has no int8 CPU path, so its cell is n/a.
The table is printed and written to ``--out`` with a header describing the machine. See
``benchmarks/README.md``.

    python benchmarks/throughput.py                       # full matrix (takes a while)
    python benchmarks/throughput.py --quick               # tiny model, seconds
    python benchmarks/throughput.py --models llama40m --dtypes float32 --batches 1 --gen-len 32

Checkpoints are written here with transformers (seeded, safetensors) and cached under
``benchmarks/.cache/``; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:  # gguf_convert
    sys.path.insert(0, str(HERE))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def _quiet_transformers() -> None:
    """No progress bars or advisory warnings from transformers in the benchmark output."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

# --------------------------------------------------------------------------- models
# Architectures of the benchmark checkpoints (random weights; only shapes matter for speed).
MODELS: dict[str, dict[str, Any]] = {
    "llama40m": dict(
        family="llama",
        description="Llama, hidden 512, 8 layers, 8 heads / 4 KV heads, untied embeddings",
        config=dict(
            vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
            tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2,
        ),
    ),
    "qwen05b": dict(
        family="qwen2",
        description="Qwen2.5-0.5B shapes: hidden 896, 24 layers, 14 heads / 2 KV heads, tied, qkv bias",
        config=dict(
            vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
            tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
            use_sliding_window=False, bos_token_id=151643, eos_token_id=151643,
        ),
    ),
    "tiny": dict(  # for --quick smoke tests
        family="llama",
        description="tiny Llama for smoke tests: hidden 64, 2 layers, 4 heads / 2 KV heads",
        config=dict(
            vocab_size=1024, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        ),
    ),
}
CHECKPOINT_SEED = 1234
CHECKPOINT_FORMAT = 1  # bump to invalidate every cached checkpoint

# Targets from the performance issue: decodekit tok/s as a multiple of llama.cpp's tok/s
# ((model, dtype or None for every dtype, batch)), and of transformers' tok/s ((model, batch)).
LLAMA_CPP_TARGETS: dict[tuple[str, str | None, int], float] = {
    ("llama40m", None, 1): 0.6,
    ("qwen05b", "bfloat16", 1): 0.8,  # moonshot 1.0x
    ("qwen05b", None, 16): 1.0,       # 16 concurrent requests vs llama.cpp's 16 sequences in one batch
    ("qwen05b", "int8", 1): 0.8,      # quantization int8 vs Q8_0
}
TARGETS: dict[tuple[str, int], float] = {
    ("llama40m", 1): 2.5,   # one request vs HF generate on one prompt
    ("llama40m", 16): 2.0,  # 16 concurrent requests vs HF static batch of 16
    ("qwen05b", 1): 1.3,
}

FRAMEWORKS = ("decodekit", "hf", "llama.cpp")
DTYPES = ("float32", "bfloat16", "int8")  # int8: decodekit quantization int8 / llama.cpp Q8_0
GGUF_FORMAT = 3  # bump when gguf_convert.py changes what it writes


def checkpoint_dir(cache: Path, name: str) -> Path:
    spec = MODELS[name]
    key = json.dumps([CHECKPOINT_FORMAT, CHECKPOINT_SEED, spec["family"], spec["config"]], sort_keys=True)
    return cache / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def ensure_checkpoint(cache: Path, name: str, log: Callable[[str], None]) -> Path:
    """Write the random-initialised checkpoint once (float32 safetensors); reuse it afterwards."""
    path = checkpoint_dir(cache, name)
    if (path / ".complete").is_file():
        return path
    import transformers

    _quiet_transformers()
    spec = MODELS[name]
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[spec["family"]]
    log(f"writing checkpoint {name} -> {path} ...")
    t0 = time.perf_counter()
    torch.manual_seed(CHECKPOINT_SEED)
    cfg = cfg_cls(**spec["config"])
    model = model_cls(cfg).to(torch.float32).eval()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    gc.collect()
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    log(f"  done in {time.perf_counter() - t0:.1f}s")
    return path


def count_params(path: Path) -> tuple[int, int]:
    """(total, embedding) parameter counts from the safetensors headers (tied weights counted once)."""
    from safetensors import safe_open

    total = embed = 0
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                n = 1
                for d in h.get_slice(k).get_shape():
                    n *= d
                total += n
                if "embed_tokens" in k or k == "lm_head.weight":
                    embed += n
    return total, embed


def make_prompts(model: str, batch: int, prompt_len: int, vocab: int, purpose: str, repeat: int = 0) -> list[list[int]]:
    """Deterministic random prompts; distinct per (model, batch, purpose, repeat) so that no run
    can reuse another run's KV blocks through decodekit's prefix cache."""
    seed = zlib.crc32(f"{model}/{batch}/{prompt_len}/{purpose}/{repeat}".encode())
    g = torch.Generator().manual_seed(seed)
    # skip the lowest ids (pad/bos/eos in these configs)
    return torch.randint(3, vocab, (batch, prompt_len), generator=g).tolist()


# --------------------------------------------------------------------------- results
@dataclass
class Row:
    model: str
    dtype: str
    batch: int
    framework: str
    ttft_ms: float | None = None
    ms_per_token: float | None = None
    tok_s: float | None = None
    wall_s: float | None = None
    agree: float | None = None  # decodekit: share of tokens equal to HF's greedy output (prefix match)
    error: str | None = None
    tokens: list[list[int]] | None = field(default=None, repr=False)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _check_lengths(outs: list[list[int]], batch: int, gen_len: int, who: str) -> None:
    if len(outs) != batch:
        raise RuntimeError(f"{who}: {len(outs)} outputs for {batch} requests")
    bad = [(i, len(t)) for i, t in enumerate(outs) if len(t) != gen_len]
    if bad:
        raise RuntimeError(f"{who}: wrong output length(s) (request, tokens): {bad[:8]} expected {gen_len} each")


# --------------------------------------------------------------------------- decodekit
def run_decodekit(args, name: str, path: Path, dtype: str, vocab: int, log) -> list[Row]:
    from framework import LLM, SamplingParams

    rows: list[Row] = []
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    quant = {"quantization": "int8", "dtype": "bfloat16"} if dtype == "int8" else {"dtype": dtype}
    llm = LLM(
        model=str(path), skip_tokenizer_init=True, **quant,
        max_num_seqs=max(args.batches), num_threads=args.threads,
    )
    log(f"  decodekit: loaded in {time.perf_counter() - t0:.1f}s")
    try:
        for batch in args.batches:
            row = Row(name, dtype, batch, "decodekit")
            rows.append(row)
            try:
                warm = make_prompts(name, batch, args.prompt_len, vocab, "warmup")
                llm.generate(
                    [{"prompt_token_ids": p} for p in warm],
                    SamplingParams(max_tokens=min(8, args.gen_len), temperature=0, ignore_eos=True),
                    use_tqdm=False,
                )
                params = SamplingParams(max_tokens=args.gen_len, temperature=0, ignore_eos=True)
                ttfts, tpots, walls, toks = [], [], [], []
                for r in range(args.repeats):
                    prompts = make_prompts(name, batch, args.prompt_len, vocab, "timed", r)
                    t = time.perf_counter()
                    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
                    wall = time.perf_counter() - t
                    tokens = [list(o.outputs[0].token_ids) for o in outs]
                    _check_lengths(tokens, batch, args.gen_len, "decodekit")
                    cached = sum(o.metrics.num_cached_tokens for o in outs)
                    if cached:
                        raise RuntimeError(f"decodekit: {cached} prompt tokens came from the prefix cache; timing invalid")
                    ttfts.append(statistics.fmean(o.metrics.ttft for o in outs))
                    if args.gen_len > 1:
                        tpots.append(statistics.fmean(o.metrics.tpot for o in outs))
                    walls.append(wall)
                    toks.append(sum(len(t) for t in tokens))
                    if r == 0:
                        row.tokens = tokens
                row.ttft_ms = _median(ttfts) * 1e3
                row.ms_per_token = _median(tpots) * 1e3 if tpots else None
                row.wall_s = _median(walls)
                row.tok_s = toks[0] / row.wall_s
                log(f"  decodekit batch {batch}: {fmt_row_short(row)}")
            except Exception as exc:  # keep going; the table shows the failure
                row.error = f"{type(exc).__name__}: {exc}"
                log(f"  decodekit batch {batch} FAILED:\n{traceback.format_exc()}")
    finally:
        del llm
        gc.collect()
    return rows


# --------------------------------------------------------------------------- transformers
def run_hf(args, name: str, path: Path, dtype: str, vocab: int, log) -> list[Row]:
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    rows: list[Row] = []
    if dtype == "int8":
        return [Row(name, dtype, b, "hf", error="not measured: transformers has no int8 CPU generation path")
                for b in args.batches]
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()
    log(f"  hf: loaded in {time.perf_counter() - t0:.1f}s (attn_implementation={model.config._attn_implementation})")
    eos = MODELS[name]["config"].get("eos_token_id")

    def generate(ids: torch.Tensor, n: int) -> tuple[float, torch.Tensor]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids),
                max_new_tokens=n, min_new_tokens=n, do_sample=False,
                pad_token_id=0, eos_token_id=eos,
            )
        return time.perf_counter() - t, out[:, ids.shape[1]:]

    try:
        for batch in args.batches:
            row = Row(name, dtype, batch, "hf")
            rows.append(row)
            try:
                warm = torch.tensor(make_prompts(name, batch, args.prompt_len, vocab, "warmup"))
                generate(warm, min(8, args.gen_len))
                ttfts, tpots, walls = [], [], []
                for r in range(args.repeats):
                    ids = torch.tensor(make_prompts(name, batch, args.prompt_len, vocab, "timed", r))
                    t1, _ = generate(ids, 1)
                    tn, out = generate(ids, args.gen_len)
                    tokens = out.tolist()
                    _check_lengths(tokens, batch, args.gen_len, "hf")
                    ttfts.append(t1)
                    if args.gen_len > 1:
                        tpots.append((tn - t1) / (args.gen_len - 1))
                    walls.append(tn)
                    if r == 0:
                        row.tokens = tokens
                row.ttft_ms = _median(ttfts) * 1e3
                row.ms_per_token = _median(tpots) * 1e3 if tpots else None
                row.wall_s = _median(walls)
                row.tok_s = batch * args.gen_len / row.wall_s
                log(f"  hf batch {batch}: {fmt_row_short(row)}")
            except Exception as exc:
                row.error = f"{type(exc).__name__}: {exc}"
                log(f"  hf batch {batch} FAILED:\n{traceback.format_exc()}")
    finally:
        del model
        gc.collect()
    return rows


def gguf_file(path: Path, dtype: str) -> Path:
    """The GGUF conversion of checkpoint ``path`` (written once, next to the checkpoint)."""
    from gguf_convert import convert

    gtype = "q8_0" if dtype == "int8" else dtype
    out = path / f"model-{gtype}-v{GGUF_FORMAT}.gguf"
    if not out.is_file():
        tmp = out.with_suffix(".tmp")
        convert(path, tmp, gtype)
        tmp.rename(out)
    return out


def llama_cpp_kv_type(dtype: str) -> str:
    """llama.cpp's KV cache type: f32 for float32 runs (decodekit and HF keep f32 K/V too; llama.cpp's
    default f16 cache flips near-ties of the random weights), else llama.cpp's default f16 (the
    same size as decodekit's bfloat16 cache)."""
    return "f32" if dtype == "float32" else "f16"


def run_llama_cpp(args, name: str, path: Path, dtype: str, vocab: int, log) -> list[Row]:
    """llama.cpp (llama-cpp-python's C API, ``llama_cpp_batch.py``) on a GGUF conversion of the
    same checkpoint (int8: Q8_0), same prompts, greedy, same thread count. Batch B is B sequences
    in one context, decoded together: one llama_batch for all prompts, then one token per sequence
    per step. TTFT is the prompt pass of the whole batch; ms/token is (t(N) - t(1)) / (N - 1)."""
    from llama_cpp_batch import LlamaCppBatch

    rows: list[Row] = []
    t0 = time.perf_counter()
    gguf_path = gguf_file(path, dtype)
    log(f"  llama.cpp: {gguf_path.name} ready in {time.perf_counter() - t0:.1f}s")
    for batch in args.batches:
        row = Row(name, dtype, batch, "llama.cpp")
        rows.append(row)
        try:
            with LlamaCppBatch(gguf_path, n_seq=batch, n_ctx_seq=args.prompt_len + args.gen_len + 8,
                               threads=args.threads, kv_type=llama_cpp_kv_type(dtype)) as lc:
                lc.generate(make_prompts(name, batch, args.prompt_len, vocab, "warmup"), min(8, args.gen_len))
                ttfts, tpots, walls = [], [], []
                for r in range(args.repeats):
                    prompts = make_prompts(name, batch, args.prompt_len, vocab, "timed", r)
                    t1, tn, out = lc.generate(prompts, args.gen_len)
                    _check_lengths(out, batch, args.gen_len, "llama.cpp")
                    ttfts.append(t1)
                    if args.gen_len > 1:
                        tpots.append((tn - t1) / (args.gen_len - 1))
                    walls.append(tn)
                    if r == 0:
                        row.tokens = out
            row.ttft_ms = _median(ttfts) * 1e3
            row.ms_per_token = _median(tpots) * 1e3 if tpots else None
            row.wall_s = _median(walls)
            row.tok_s = batch * args.gen_len / row.wall_s
            log(f"  llama.cpp batch {batch}: {fmt_row_short(row)}")
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"
            log(f"  llama.cpp batch {batch} FAILED:\n{traceback.format_exc()}")
        gc.collect()
    return rows


def llama_cpp_status() -> str | None:
    """None when llama_cpp is not importable, else its version."""
    try:
        import llama_cpp  # type: ignore[import-not-found]
    except Exception:
        return None
    return str(getattr(llama_cpp, "__version__", "unknown version"))


def llama_cpp_system_info() -> str:
    """llama.cpp's own summary of the CPU features its build uses (AVX512, ...)."""
    try:
        import llama_cpp  # type: ignore[import-not-found]

        return llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except Exception as exc:  # pragma: no cover
        return f"unavailable ({type(exc).__name__})"


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean over requests of (length of the common prefix) / (output length)."""
    shares = []
    for x, y in zip(a, b):
        n = 0
        for u, v in zip(x, y):
            if u != v:
                break
            n += 1
        shares.append(n / max(1, len(x)))
    return statistics.fmean(shares)


# --------------------------------------------------------------------------- report
def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def fmt_row_short(r: Row) -> str:
    return f"TTFT {_f(r.ttft_ms, '.1f')} ms, {_f(r.ms_per_token, '.2f')} ms/token, {_f(r.tok_s, '.1f')} tok/s"


def ratio(row: Row, rows: list[Row]) -> float | None:
    hf = next((r for r in rows if (r.model, r.dtype, r.batch, r.framework) == (row.model, row.dtype, row.batch, "hf")), None)
    if hf is None or hf.tok_s is None or row.tok_s is None:
        return None
    return row.tok_s / hf.tok_s


def ratio_lcpp(row: Row, rows: list[Row]) -> float | None:
    lc = next((r for r in rows if (r.model, r.dtype, r.batch, r.framework) == (row.model, row.dtype, row.batch, "llama.cpp")), None)
    if lc is None or lc.tok_s is None or row.tok_s is None:
        return None
    return row.tok_s / lc.tok_s


def render_table(rows: list[Row]) -> list[str]:
    head = ["model", "dtype", "batch", "framework", "TTFT ms", "ms/token", "tok/s", "vs HF", "vs llama.cpp", "same as HF"]
    body = []
    for r in rows:
        if r.error:
            body.append([r.model, r.dtype, str(r.batch), r.framework,
                         "n/a" if r.error.startswith("not measured") else "FAILED", "", "", "", "", ""])
            continue
        q = ratio(r, rows)
        ql = ratio_lcpp(r, rows)
        body.append([
            r.model, r.dtype, str(r.batch), r.framework,
            _f(r.ttft_ms, ".1f"), _f(r.ms_per_token, ".2f"), _f(r.tok_s, ".1f"),
            "-" if q is None else f"{q:.2f}x",
            "-" if ql is None else f"{ql:.2f}x",
            "-" if r.agree is None else f"{r.agree * 100:.0f}%",
        ])
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    right = {2, 4, 5, 6, 7, 8, 9}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for r, b in zip(rows, body):
        key = (r.model, r.dtype, r.batch)
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(line(b))
    errors = [r for r in rows if r.error and not r.error.startswith("not measured")]
    if errors:
        out.append("")
        out.append("failures:")
        out.extend(f"  {r.model} {r.dtype} batch {r.batch} {r.framework}: {r.error}" for r in errors)
    return out


def render_targets(rows: list[Row], args: argparse.Namespace) -> list[str]:
    out = []
    note = ""
    if (args.prompt_len, args.gen_len) != (128, 128):
        note = f" [workload {args.prompt_len}->{args.gen_len} tokens, the targets are for 128->128]"
    for r in rows:
        target = TARGETS.get((r.model, r.batch))
        if r.framework != "decodekit" or target is None or r.dtype == "int8":  # HF has no int8 cell
            continue
        q = ratio(r, rows)
        verdict = "not measured" if q is None else ("met" if q >= target else "MISSED")
        got = "-" if q is None else f"{q:.2f}x"
        out.append(f"  {r.model} {r.dtype} batch {r.batch}: {got} HF tok/s (target >= {target}x) {verdict}{note}")
    for r in rows:
        target = LLAMA_CPP_TARGETS.get((r.model, r.dtype, r.batch), LLAMA_CPP_TARGETS.get((r.model, None, r.batch)))
        if r.framework != "decodekit" or target is None:
            continue
        q = ratio_lcpp(r, rows)
        verdict = "not measured" if q is None else ("met" if q >= target else "MISSED")
        got = "-" if q is None else f"{q:.2f}x"
        out.append(f"  {r.model} {r.dtype} batch {r.batch}: {got} llama.cpp tok/s (target >= {target}x) {verdict}{note}")
    return (["targets (decodekit tok/s / HF or llama.cpp tok/s):"] + out) if out else []


def machine_header(args, llama_cpp: str | None, model_info: list[str]) -> list[str]:
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import framework

        dk_version = framework.__version__
    except Exception:  # pragma: no cover
        dk_version = "?"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count()
    lines = [
        "decodekit throughput benchmark (benchmarks/throughput.py)",
        f"date: {_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine: {platform.system()} {platform.machine()}, {cpu}, nproc {os.cpu_count()} "
        f"(usable {affinity}), load average {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"software: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, decodekit {dk_version}, "
        f"llama.cpp {'(llama_cpp ' + llama_cpp + ')' if llama_cpp else 'not installed'}",
        *([f"llama.cpp system info: {llama_cpp_system_info()}"] if llama_cpp else []),
        f"threads: {args.threads} (torch.set_num_threads)",
        f"workload: prompt {args.prompt_len} tokens -> {args.gen_len} new tokens, greedy, length forced "
        f"(decodekit ignore_eos, HF min_new_tokens); random token prompts; "
        f"median of {args.repeats} timed run(s) after 1 warm-up",
        "models (random weights):",
        *model_info,
        "columns: TTFT = time to first token (decodekit: mean of request metrics; HF: generate with "
        "max_new_tokens=1); ms/token = time per output token after the first (decodekit: mean TPOT; "
        "HF: (t(N) - t(1)) / (N - 1)); tok/s = generated tokens / wall time of the whole run; "
        "vs HF = tok/s / HF tok/s; vs llama.cpp = tok/s / llama.cpp tok/s (GGUF conversion of the same "
        "checkpoint, benchmarks/gguf_convert.py; llama.cpp TTFT = prompt pass of the whole batch, ms/token = "
        "(t(N) - t(1)) / (N - 1), batch B = B sequences in one context decoded together; KV cache f32 for "
        "float32, else llama.cpp's default f16); "
        "int8 = decodekit quantization int8 (bfloat16 activations, one scale per output row) vs llama.cpp Q8_0 "
        "(one scale per 32 weights); same as HF = share of the greedy tokens matching HF's "
        "(common prefix; a sanity check, float rounding can flip near-ties of random weights)",
    ]
    return lines


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    def csv(s: str) -> list[str]:
        return [x.strip() for x in s.split(",") if x.strip()]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=csv, default=None, help=f"comma list of {', '.join(MODELS)} (default: llama40m,qwen05b; --quick: tiny)")
    p.add_argument("--dtypes", type=csv, default=list(DTYPES),
                   help="comma list of float32, bfloat16, int8 (decodekit quantization int8 vs llama.cpp Q8_0) "
                   "(default: all three)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in csv(s)], default=[1, 16], help="concurrent requests / HF batch sizes (default: 1,16)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 128; --quick: 16)")
    p.add_argument("--gen-len", type=int, default=None, help="new tokens per request (default 128; --quick: 8)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for both frameworks (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell; the median is reported (default 1)")
    p.add_argument("--frameworks", type=csv, default=list(FRAMEWORKS), help="comma list of decodekit, hf, llama.cpp (default: all)")
    p.add_argument("--out", type=Path, default=None, help="result text file (default benchmarks/results/throughput.txt; --quick: throughput-quick.txt)")
    p.add_argument("--cache-dir", type=Path, default=HERE / ".cache", help="where checkpoints are written (default benchmarks/.cache)")
    p.add_argument("--quick", action="store_true", help="tiny model and short lengths: a smoke test that runs in seconds")
    args = p.parse_args(argv)
    if args.models is None:
        args.models = ["tiny"] if args.quick else ["llama40m", "qwen05b"]
    if args.prompt_len is None:
        args.prompt_len = 16 if args.quick else 128
    if args.gen_len is None:
        args.gen_len = 8 if args.quick else 128
    if args.out is None:
        args.out = HERE / "results" / ("throughput-quick.txt" if args.quick else "throughput.txt")
    args.frameworks = ["llama.cpp" if f.replace(".", "").lower() == "llamacpp" else f.lower() for f in args.frameworks]
    for what, vals, allowed in (("model", args.models, MODELS), ("framework", args.frameworks, FRAMEWORKS),
                                ("dtype", args.dtypes, DTYPES)):
        bad = [v for v in vals if v not in allowed]
        if bad:
            p.error(f"unknown {what}(s) {', '.join(bad)}; choose from {', '.join(allowed)}")
    if not args.batches or min(args.batches) < 1:
        p.error("--batches must be positive integers")
    if args.prompt_len < 1 or args.gen_len < 1 or args.threads < 1 or args.repeats < 1:
        p.error("--prompt-len, --gen-len, --threads and --repeats must be >= 1")
    for m in args.models:
        limit = MODELS[m]["config"]["max_position_embeddings"]
        if args.prompt_len + args.gen_len > limit:
            p.error(f"{m}: prompt + generated tokens ({args.prompt_len + args.gen_len}) exceed its context ({limit})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.set_num_threads(args.threads)
    llama_cpp = llama_cpp_status() if "llama.cpp" in args.frameworks else None
    if "llama.cpp" in args.frameworks and llama_cpp is None:
        print("llama.cpp: not installed (pip install llama-cpp-python); column skipped")

    rows: list[Row] = []
    model_info: list[str] = []
    for name in args.models:
        spec = MODELS[name]
        path = ensure_checkpoint(args.cache_dir, name, log)
        total, embed = count_params(path)
        model_info.append(f"  {name}: {spec['description']}; {total / 1e6:.1f}M parameters "
                          f"({(total - embed) / 1e6:.1f}M without embeddings), vocab {spec['config']['vocab_size']}")
        vocab = spec["config"]["vocab_size"]
        for dtype in args.dtypes:
            log(f"{name} {dtype}:")
            got: list[Row] = []
            if "decodekit" in args.frameworks:
                got += run_decodekit(args, name, path, dtype, vocab, log)
            if "hf" in args.frameworks:
                got += run_hf(args, name, path, dtype, vocab, log)
            if "llama.cpp" in args.frameworks and llama_cpp is not None:
                try:
                    got += run_llama_cpp(args, name, path, dtype, vocab, log)
                except Exception as exc:
                    got += [Row(name, dtype, b, "llama.cpp", error=f"{type(exc).__name__}: {exc}") for b in args.batches]
                    log(f"  llama.cpp FAILED:\n{traceback.format_exc()}")
            for r in got:
                if r.framework in ("decodekit", "llama.cpp") and r.tokens is not None:
                    hf = next((h for h in got if h.framework == "hf" and h.batch == r.batch and h.tokens is not None), None)
                    if hf is not None:
                        r.agree = prefix_agreement(r.tokens, hf.tokens)
            for r in got:
                r.tokens = None  # free
            order = {f: i for i, f in enumerate(FRAMEWORKS)}
            rows += sorted(got, key=lambda r: (r.batch, order[r.framework]))
            gc.collect()

    lines = machine_header(args, llama_cpp, model_info) + [""] + render_table(rows)
    targets = render_targets(rows, args)
    if targets:
        lines += [""] + targets
    text = "\n".join(lines) + "\n"
    print()
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\nwritten to {args.out}")
    notes = sorted({f"  {r.framework} {r.model} batch {r.batch}: {r.error}" for r in rows if r.error and r.error.startswith("not measured")})
    if notes:
        text += "\nnot measured:\n" + "\n".join(notes) + "\n"
        args.out.write_text(text)
        print("\n".join(notes))
    return 1 if any(r.error and not r.error.startswith("not measured") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
