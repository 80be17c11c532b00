"""Greedy generation for several sequences at once in llama.cpp (llama-cpp-python's C API).

``Llama`` (the high-level class) runs one sequence at a time, so the throughput benchmark drives
llama.cpp itself: one context with ``n_seq_max`` sequences (each its own KV stream, llama.cpp's
default), one ``llama_batch`` holding every prompt (token ``j`` of prompt ``i`` has ``seq_id i``
and position ``j``; logits only for each prompt's last token), then one batch per step with one
token per live sequence, each picked by llama.cpp's greedy sampler from that sequence's logits.
This is the scheme of llama.cpp's ``batched`` example, with a distinct prompt per sequence.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

_LOG_CB = None  # keeps the ctypes callback alive


def _silence(llama_cpp) -> None:
    global _LOG_CB
    if _LOG_CB is None:
        _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


class LlamaCppBatch:
    """A GGUF model in one llama.cpp context that decodes up to ``n_seq`` sequences together.

    ``n_ctx_seq`` is the most tokens (prompt + generated) of one sequence; ``threads`` is used for
    both the prompt pass and decoding; ``kv_type`` is the KV cache's element type (``"f16"``,
    llama.cpp's default, or ``"f32"``). Call :meth:`close` (or use ``with``) to free the context."""

    def __init__(self, gguf_path: str | Path, n_seq: int, n_ctx_seq: int, threads: int,
                 n_batch: int = 2048, kv_type: str = "f16", quiet: bool = True) -> None:
        import llama_cpp  # type: ignore[import-not-found]

        self._l = l = llama_cpp
        if quiet:
            _silence(l)
        l.llama_backend_init()
        self.n_seq = n_seq
        self.n_ctx_seq = n_ctx_seq
        mp = l.llama_model_default_params()
        self.model = l.llama_model_load_from_file(str(gguf_path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cp = l.llama_context_default_params()
        cp.n_ctx = n_seq * n_ctx_seq
        cp.n_seq_max = n_seq
        cp.n_batch = n_batch
        cp.n_ubatch = min(512, n_batch)
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.no_perf = True
        kv = {"f16": l.GGML_TYPE_F16, "f32": l.GGML_TYPE_F32}.get(kv_type)
        if kv is None:
            raise ValueError(f"kv_type: {kv_type!r} is not 'f16' or 'f32'")
        cp.type_k = cp.type_v = kv
        self.ctx = l.llama_init_from_model(self.model, cp)
        if not self.ctx:
            l.llama_model_free(self.model)
            raise RuntimeError("llama.cpp could not create a context")
        self.n_batch = n_batch
        self.n_vocab = l.llama_vocab_n_tokens(l.llama_model_get_vocab(self.model))
        self.batch = l.llama_batch_init(max(n_batch, n_seq), 0, 1)
        self.sampler = l.llama_sampler_init_greedy()

    # ------------------------------------------------------------------ internals
    def _fill(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, seq_id, wants logits)."""
        b = self.batch
        for k, (tok, pos, seq, out) in enumerate(items):
            b.token[k] = tok
            b.pos[k] = pos
            b.n_seq_id[k] = 1
            b.seq_id[k][0] = seq
            b.logits[k] = out
        b.n_tokens = len(items)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        self._fill(items)
        rc = self._l.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(items)} tokens")

    # ------------------------------------------------------------------ API
    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> tuple[float, float, list[list[int]]]:
        """Greedy ``max_new_tokens`` for each prompt (no stop on EOS), all sequences together.
        Returns (seconds to the first token of every sequence, seconds in all, tokens)."""
        n = len(prompts)
        if not 1 <= n <= self.n_seq:
            raise ValueError(f"prompts: {n} sequences, this context holds 1..{self.n_seq}")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.n_ctx_seq:
            raise ValueError(f"prompts: {longest} tokens in a sequence, the context holds {self.n_ctx_seq}")
        l = self._l
        l.llama_memory_clear(l.llama_get_memory(self.ctx), True)
        t0 = time.perf_counter()
        # prompt pass: every prompt in batches of at most n_batch tokens; logits at each last token
        items = [(tok, j, i, j == len(p) - 1) for i, p in enumerate(prompts) for j, tok in enumerate(p)]
        first: list[int] = [0] * n
        for s in range(0, len(items), self.n_batch):
            chunk = items[s:s + self.n_batch]
            self._decode(chunk)
            for k, (_, _, seq, out) in enumerate(chunk):
                if out:
                    first[seq] = l.llama_sampler_sample(self.sampler, self.ctx, k)
        t_first = time.perf_counter() - t0
        outs = [[t] for t in first]
        for step in range(1, max_new_tokens):
            self._decode([(outs[i][-1], len(prompts[i]) + step - 1, i, True) for i in range(n)])
            for i in range(n):
                outs[i].append(l.llama_sampler_sample(self.sampler, self.ctx, i))
        return t_first, time.perf_counter() - t0, outs

    def close(self) -> None:
        l = self._l
        if getattr(self, "sampler", None):
            l.llama_sampler_free(self.sampler)
            self.sampler = None
        if getattr(self, "batch", None) is not None:
            l.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            l.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            l.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "LlamaCppBatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
