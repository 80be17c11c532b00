"""Per-step cost of the engine on the bundled ``demo`` model at batch 1 (the overhead target).

Reports the median TPOT over 5 runs of 32 -> 128 tokens (greedy, length forced) per dtype, and a
cProfile split of one extra run: time in the projections (LinearKernel), norms, attention, the
rest of the model's forward, and everything outside the model (scheduler, executor, sampling,
detokenization). cProfile inflates small calls, so read the split as shares, not times.

    python benchmarks/step_overhead.py [--threads N] [--out benchmarks/results/step_overhead.txt]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from framework import LLM, SamplingParams  # noqa: E402
from framework.config import default_num_threads  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="default: the free cores")
    p.add_argument("--out", type=Path, default=HERE / "results" / "step_overhead.txt")
    args = p.parse_args()
    threads = args.threads or default_num_threads()
    lines = [f"demo batch 1, 32 -> 128 tokens, threads {threads}, torch {torch.__version__}"]
    for dtype in ("float32", "bfloat16"):
        llm = LLM(model="demo", dtype=dtype, num_threads=threads)
        params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
        llm.generate([{"prompt_token_ids": list(range(10, 42))}], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
        tpots = []
        for r in range(5):
            out = llm.generate([{"prompt_token_ids": list(range(50 + r, 82 + r))}], params, use_tqdm=False)
            tpots.append(out[0].metrics.tpot * 1e3)
        kind = llm.engine.model.linear.description if hasattr(llm, "engine") else "?"
        lines.append(f"{dtype}: TPOT median {statistics.median(tpots):.2f} ms (runs {', '.join(f'{t:.2f}' for t in tpots)}); linear kernel {kind}")
        prof = cProfile.Profile()
        prof.enable()
        llm.generate([{"prompt_token_ids": list(range(90, 122))}], params, use_tqdm=False)
        prof.disable()
        st = pstats.Stats(prof).stats  # type: ignore[attr-defined]

        def cum(pred) -> float:
            return sum(v[3] for k, v in st.items() if pred(k))

        total = cum(lambda k: k[2] == "step" and k[0].endswith("engine_core.py"))
        lin = cum(lambda k: k[2] == "__call__" and k[0].endswith("cpu_linear.py"))
        rms = cum(lambda k: k[2] == "_rms" and k[0].endswith("llama.py"))
        att = cum(lambda k: k[2] == "paged_attention")
        fwd = cum(lambda k: k[2] == "forward" and k[0].endswith("llama.py"))
        if total:
            lines.append(f"  profile split of the step: projections {lin / total:.0%}, norms {rms / total:.0%}, "
                         f"attention {att / total:.0%}, rest of forward {(fwd - lin - rms - att) / total:.0%}, "
                         f"outside the model {(total - fwd) / total:.0%}")
        del llm
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
