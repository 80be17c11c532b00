"""AVX-512 matrix-vector products for small batches on CPU, compiled on first use.

At batch 1-4, oneDNN and MKL spend most of a call on overhead for the small matrices of small
models (a 768x256 bf16 projection takes ~60-90 us where streaming its 0.4 MB takes a few). The
kernels here read each weight row once from memory for all ``N <= MAX_ROWS`` input rows, accumulate in
float32 with FMA (``_mm512_dpbf16_ps`` for bfloat16 weights) and split the output rows over
torch's OpenMP threads (the library links the ``libgomp`` torch has already loaded, so the thread
count is ``torch.get_num_threads()``).

The C source is compiled with the system compiler into ``~/.cache/decodekit/native`` (or
``$DECODEKIT_CACHE_DIR/native``) the first time it is needed and loaded with :mod:`ctypes`.
:func:`available` is False — and callers use their pure-torch path — when there is no compiler,
the CPU lacks AVX-512 (F, BW, VL, DQ), the build fails, ``DECODEKIT_NATIVE_GEMV=0`` is set, or the
kernel disagrees with ``F.linear`` on a probe. The bfloat16 kernels also need AVX512_BF16
(``vdpbf16ps``; compiled for that target alone, so the float32 kernels run on CPUs without it):
``available(torch.bfloat16)`` says whether they can be used.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

MAX_ROWS = 16  # input rows handled by the kernels (in groups of 4); larger batches use oneDNN

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>

/* y[n, m] = sum_k x[n, k] * W[m, k] (+ b[m]) for n < N (N <= 4), float32. */
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

void dk_gemv_f32(const float *x, int64_t N, int64_t K, const float *W, int64_t M,
                 const float *b, float *y) {
    const int64_t K16 = K & ~15LL;
    const __mmask16 tail = (__mmask16)((1u << (K - K16)) - 1u);
    #pragma omp parallel for schedule(static) if (M * K * N >= 32768)
    for (int64_t m = 0; m < M; m++) {
        const float *w = W + m * K;
        float bias = b ? b[m] : 0.0f;
        for (int64_t n0 = 0; n0 < N; n0 += 4) {
            const int nn = (int)(N - n0 < 4 ? N - n0 : 4);
            const float *xr = x + n0 * K;
            __m512 acc[4];
            for (int n = 0; n < 4; n++) acc[n] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K16; k += 16) {
                __m512 wv = _mm512_loadu_ps(w + k);
                for (int n = 0; n < nn; n++) acc[n] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr + n * K + k), acc[n]);
            }
            if (K16 < K) {
                __m512 wv = _mm512_maskz_loadu_ps(tail, w + K16);
                for (int n = 0; n < nn; n++) acc[n] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, xr + n * K + K16), acc[n]);
            }
            for (int n = 0; n < nn; n++) y[(n0 + n) * M + m] = hsum(acc[n]) + bias;
        }
    }
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u; __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  /* NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16; float f; __builtin_memcpy(&f, &u, 4); return f;
}

/* bfloat16 x, W, b, y; float32 accumulation with vdpbf16ps (pairs of k). */
__attribute__((target("avx512bf16"))) void dk_gemv_bf16(const uint16_t *x, int64_t N, int64_t K, const uint16_t *W, int64_t M,
                  const uint16_t *b, uint16_t *y) {
    const int64_t K32 = K & ~31LL;
    const int64_t rem = K - K32;
    const __mmask32 tail = rem ? (__mmask32)((1ull << rem) - 1ull) : 0;
    #pragma omp parallel for schedule(static) if (M * K * N >= 65536)
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *w = W + m * K;
        float bias = b ? bf16_to_f32(b[m]) : 0.0f;
        for (int64_t n0 = 0; n0 < N; n0 += 4) {
            const int nn = (int)(N - n0 < 4 ? N - n0 : 4);
            const uint16_t *xr = x + n0 * K;
            __m512 acc[4];
            for (int n = 0; n < 4; n++) acc[n] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K32; k += 32) {
                __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + k));
                for (int n = 0; n < nn; n++)
                    acc[n] = _mm512_dpbf16_ps(acc[n], wv, (__m512bh)_mm512_loadu_si512((const void *)(xr + n * K + k)));
            }
            if (rem) {
                __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(tail, (const void *)(w + K32));
                for (int n = 0; n < nn; n++)
                    acc[n] = _mm512_dpbf16_ps(acc[n], wv, (__m512bh)_mm512_maskz_loadu_epi16(tail, (const void *)(xr + n * K + K32)));
            }
            for (int n = 0; n < nn; n++) y[(n0 + n) * M + m] = f32_to_bf16(hsum(acc[n]) + bias);
        }
    }
}

/* RMSNorm of N rows of H: float32 y = x * rsqrt(mean(x^2) + eps) * w. */
void dk_rms_f32(const float *x, int64_t N, int64_t H, const float *w, float eps, float *y) {
    for (int64_t n = 0; n < N; n++) {
        const float *xr = x + n * H; float *yr = y + n * H;
        double ss = 0.0;
        for (int64_t i = 0; i < H; i++) ss += (double)xr[i] * xr[i];
        float inv = 1.0f / __builtin_sqrtf((float)(ss / H) + eps);
        for (int64_t i = 0; i < H; i++) yr[i] = xr[i] * inv * w[i];
    }
}

/* bfloat16, as transformers does it: normalise in float32, round to bf16, then scale by w in bf16. */
void dk_rms_bf16(const uint16_t *x, int64_t N, int64_t H, const uint16_t *w, float eps, uint16_t *y) {
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *xr = x + n * H; uint16_t *yr = y + n * H;
        double ss = 0.0;
        for (int64_t i = 0; i < H; i++) { float v = bf16_to_f32(xr[i]); ss += (double)v * v; }
        float inv = 1.0f / __builtin_sqrtf((float)(ss / H) + eps);
        for (int64_t i = 0; i < H; i++)
            yr[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[i]) * inv)) * bf16_to_f32(w[i]));
    }
}
"""

_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
          "-shared", "-fPIC"]
_LIB: Any = None
_TRIED = False
_DTYPES: frozenset[torch.dtype] = frozenset()  # the dtypes whose kernels passed the probe here
_LOCK = threading.Lock()


def _cache_dir() -> Path:
    env = os.environ.get("DECODEKIT_CACHE_DIR")
    if env is not None and env.strip().lower() not in ("", "off", "none", "0"):
        return Path(env).expanduser() / "native"
    if env is not None:
        return Path(tempfile.gettempdir()) / "decodekit-native"
    return Path.home() / ".cache" / "decodekit" / "native"


def _cpu_flags() -> set[str]:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("flags"):
                return set(ln.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_ok() -> bool:
    """AVX-512 F/BW/VL/DQ and FMA: what the float32 kernels (and the bf16 RMSNorm) need."""
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= _cpu_flags()


def _bf16_ok() -> bool:
    """AVX512_BF16 too: what the bfloat16 GEMV (vdpbf16ps) needs."""
    return _cpu_ok() and "avx512_bf16" in _cpu_flags()


def _build() -> Any:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None or not _cpu_ok():
        return None
    digest = hashlib.sha256((SOURCE + " ".join(_FLAGS)).encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    lib_path = out_dir / f"dk_gemv_{digest}.so"
    if not lib_path.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        src = out_dir / f"dk_gemv_{digest}.{os.getpid()}.c"
        tmp = out_dir / f"dk_gemv_{digest}.{os.getpid()}.so"
        src.write_text(SOURCE)
        try:
            subprocess.run([cc, *_FLAGS, "-o", str(tmp), str(src)], check=True, capture_output=True, timeout=120)
            os.replace(tmp, lib_path)
        finally:
            src.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    lib = ctypes.CDLL(str(lib_path))
    args = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
            ctypes.c_void_p]
    for fn in (lib.dk_gemv_f32, lib.dk_gemv_bf16):
        fn.restype = None
        fn.argtypes = args
    for fn in (lib.dk_rms_f32, lib.dk_rms_bf16):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p]
    return lib


def _probe(lib: Any, dtypes: tuple[torch.dtype, ...]) -> bool:
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        if dtype not in dtypes:
            continue
        for n, k, m in ((1, 256, 48), (3, 100, 17), (4, 37, 5), (7, 64, 9)):
            x = torch.randn(n, k, generator=g).to(dtype)
            w = torch.randn(m, k, generator=g).to(dtype)
            b = torch.randn(m, generator=g).to(dtype)
            got = _call(lib, x, w, b).float()
            want = F.linear(x.float(), w.float(), b.float())
            if not torch.allclose(got, want, atol=tol * k**0.5, rtol=tol):
                return False
        x = torch.randn(3, 40, generator=g).to(dtype)
        w = torch.randn(40, generator=g).to(dtype)
        if not torch.allclose(_rms(lib, x, w, 1e-5).float(), _rms_ref(x, w, 1e-5).float(), atol=tol * 4, rtol=tol):
            return False
    return True


def _rms_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return w * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def _rms(lib: Any, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    y = torch.empty_like(x)
    fn = lib.dk_rms_f32 if x.dtype == torch.float32 else lib.dk_rms_bf16
    fn(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], w.data_ptr(), eps, y.data_ptr())
    return y


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (float32, or bfloat16 the way transformers computes it);
    requires :func:`available` and ``x``, ``w`` of one dtype."""
    if not x.is_contiguous():
        x = x.contiguous()
    return _rms(_LIB, x, w, eps)


def library() -> Any:
    """The loaded kernels, or None when they cannot be used here."""
    global _LIB, _TRIED, _DTYPES
    if _TRIED:
        return _LIB
    with _LOCK:
        if not _TRIED:
            lib = None
            if os.environ.get("DECODEKIT_NATIVE_GEMV", "1").strip().lower() not in ("0", "off", "false", "no"):
                dtypes = (torch.float32, torch.bfloat16) if _bf16_ok() else (torch.float32,)
                try:
                    lib = _build()
                    if lib is not None and not _probe(lib, dtypes):
                        lib = None
                except (OSError, subprocess.SubprocessError, AttributeError):
                    lib = None
                _DTYPES = frozenset(dtypes) if lib is not None else frozenset()
            _LIB = lib
            _TRIED = True
    return _LIB


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernels for ``dtype`` (float32 or bfloat16) can be used on this machine."""
    return library() is not None and dtype in _DTYPES


def _call(lib: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    n, k = x.shape
    m = w.shape[0]
    y = torch.empty(n, m, dtype=x.dtype)
    fn = lib.dk_gemv_f32 if x.dtype == torch.float32 else lib.dk_gemv_bf16
    fn(x.data_ptr(), n, k, w.data_ptr(), m, None if b is None else b.data_ptr(), y.data_ptr())
    return y


def gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``x [N, K] @ w[M, K].T + b`` (float32 or bfloat16, all one dtype, CPU).
    Requires :func:`available`; inputs are made contiguous."""
    if not x.is_contiguous():
        x = x.contiguous()
    return _call(_LIB, x, w, b)
