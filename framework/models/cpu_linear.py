"""Linear layers for inference on CPU: ``x [N, in] @ w[out, in].T + b`` with prepacked weights.

The model keeps its weights as plain ``[out, in]`` parameters (Hugging Face layout, used by
training, ``forward_dense`` and ``hf_tensors``). :class:`LinearKernel` computes the same product
from a copy of each weight laid out for the fastest kernel this torch build has for the dtype,
made on first use and remade whenever the weight is modified in place (``Tensor._version``):

- ``onednn-packed`` (bfloat16): oneDNN's linear on a weight reordered once into its blocked
  layout (``mkldnn._reorder_linear_weight``). Bit-identical to the unpacked oneDNN call and about
  1.7x faster at batch 1-16 (the unpacked call reorders the weight on every call).
- ``onednn`` (float32): oneDNN's linear on the plain weight (streams fp32 weights ~1.5-2x faster
  than ``F.linear``'s MKL path at batch 1-16).
- ``int8``: weight-only int8 (symmetric, one scale per output row) through torch's
  ``_weight_int8pack_mm``; activations stay bfloat16. About 4x less weight traffic than fp32.
- ``torch``: ``F.linear``, the pure-torch fallback (GPU, float16, builds without oneDNN).

On top of the float kernels, batches of at most ``NATIVE_ROWS[dtype]`` rows (decode steps of
a few sequences) go to the AVX-512 GEMV of :mod:`framework.models.native_gemv` when it could be
compiled here: 2-3x faster than oneDNN on small models, where per-call overhead dominates.

:func:`choose_kernel` picks the first that works here and agrees with ``F.linear`` on a probe.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from framework.models import native_gemv

KERNELS = ("onednn-packed", "onednn", "int8", "torch")
# Largest batch the native GEMV takes per dtype: beyond it oneDNN's blocked kernels win
# (measured on the 40M and demo shapes, 1-2 threads, AVX-512 EPYC; benchmarks/README.md).
NATIVE_ROWS: dict[torch.dtype, int] = {torch.float32: 8, torch.bfloat16: 4}
# small float32 weights (at most SMALL_WEIGHT elements) keep the native GEMV up to SMALL_ROWS rows:
# there oneDNN's per-call overhead dominates (demo's 9-token verify steps: prompt lookup g=8 1.53x ->
# 1.88x on code, 1.19x -> 1.50x on quotation), while all 16 rows native on llama40m's projections
# cost 5% at batch 16 (563 vs 596 tok/s; benchmarks/speculative.py --parts lookup, throughput.py)
SMALL_ROWS, SMALL_WEIGHT = 16, 1 << 19


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``w ~= q * scale[:, None]``; returns ``(q int8, scale float32)``."""
    w32 = w.detach().float()
    scale = (w32.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def _version(w: torch.Tensor) -> int:
    """In-place modification counter (inference tensors have none: they cannot change)."""
    try:
        return w._version
    except RuntimeError:
        return -1


class LinearKernel:
    """``x @ w.T + b`` for one model, with per-weight packed copies cached by identity."""

    def __init__(self, name: str, dtype: torch.dtype, native_rows: int = 0):
        """``native_rows``: batches of at most this many rows use the AVX-512 GEMV of
        :mod:`framework.models.native_gemv` (0: never)."""
        if name not in KERNELS:
            raise ValueError(f"unknown linear kernel {name!r} (choose from {', '.join(KERNELS)})")
        self.name = name
        self.dtype = dtype
        self.native_rows = native_rows
        self.small_rows = SMALL_ROWS if native_rows and dtype == torch.float32 else 0
        self._packed: dict[int, tuple[torch.Tensor, int, Any]] = {}

    @property
    def description(self) -> str:
        return self.name + (f" (native AVX-512 GEMV up to {self.native_rows} rows)" if self.native_rows else "")

    def clear(self) -> None:
        """Drop every packed copy (they are remade on next use)."""
        self._packed.clear()

    def _pack(self, w: torch.Tensor) -> Any:
        with torch.no_grad():
            if self.name == "onednn-packed":
                return torch.ops.mkldnn._reorder_linear_weight(w.detach(), 1)
            if self.name == "int8":
                q, s = quantize_int8(w)
                return q, s.to(self.dtype)
        return None

    def packed(self, w: torch.Tensor) -> Any:
        """The packed copy of ``w`` (made now if missing or stale)."""
        entry = self._packed.get(id(w))
        version = _version(w)
        if entry is None or entry[0] is not w or entry[1] != version:
            entry = (w, version, self._pack(w))
            self._packed[id(w)] = entry
        return entry[2]

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        n = x.shape[0]
        if (n <= self.native_rows or (n <= self.small_rows and w.numel() <= SMALL_WEIGHT)) \
                and x.dim() == 2 and x.dtype == w.dtype and not torch.is_grad_enabled():
            return native_gemv.gemv(x, w, b)
        name = self.name
        if name == "onednn":
            return _onednn(x, w, b)
        if name == "torch" or torch.is_grad_enabled():
            return F.linear(x, w, b)
        p = self.packed(w)
        if name == "onednn-packed":
            return _onednn(x, p, b)
        q, s = p
        y = torch.ops.aten._weight_int8pack_mm(x.to(s.dtype), q, s)
        return y if b is None else y + b


_PROBED: dict[tuple[str, torch.dtype], bool] = {}


def kernel_works(name: str, dtype: torch.dtype) -> bool:
    """Whether kernel ``name`` runs for ``dtype`` in this torch build on this CPU and agrees with
    ``F.linear`` on a small probe (bf16 oneDNN needs AVX-512 or AMX; int8 needs the int8-pack op)."""
    key = (name, dtype)
    ok = _PROBED.get(key)
    if ok is not None:
        return ok
    ok = False
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(3, 64, generator=g), torch.randn(24, 64, generator=g), torch.randn(24, generator=g))
        if name == "torch":
            ok = True
        elif name in ("onednn", "onednn-packed"):
            if name == "onednn-packed" and dtype != torch.bfloat16:
                ok = False
            else:
                xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
                k = LinearKernel(name, dtype)
                with torch.inference_mode():
                    got = k(xd, wd, bd).float()
                tol = 1e-4 if dtype == torch.float32 else 5e-2
                ok = bool(torch.backends.mkldnn.is_available()) and torch.allclose(
                    got, F.linear(xd, wd, bd).float(), atol=tol * 8, rtol=tol
                )
        elif name == "int8" and dtype == torch.bfloat16:
            k = LinearKernel(name, dtype)
            with torch.inference_mode():
                got = k(x.to(dtype), w, b.to(dtype)).float()
            ok = torch.allclose(got, F.linear(x, w, b), atol=0.5, rtol=0.05)
    except (RuntimeError, AttributeError, NotImplementedError, TypeError):
        ok = False
    _PROBED[key] = ok
    return ok


def choose_kernel(dtype: torch.dtype, device: torch.device, quantization: str | None = None) -> LinearKernel:
    """The fastest working kernel for ``dtype`` on ``device``; ``quantization='int8'`` asks for
    weight-only int8 (CPU, bfloat16 activations) and raises if this build cannot do it."""
    if quantization == "int8":
        if device.type != "cpu" or dtype != torch.bfloat16 or not kernel_works("int8", dtype):
            raise ValueError("quantization 'int8' needs the CPU, bfloat16 activations and torch's _weight_int8pack_mm")
        return LinearKernel("int8", dtype)
    if quantization is not None:
        raise ValueError(f"quantization {quantization!r} is not supported (use 'int8' or none)")
    if device.type == "cpu":
        rows = 0
        if dtype in NATIVE_ROWS and native_gemv.available(dtype):
            rows = NATIVE_ROWS[dtype]
        if dtype == torch.bfloat16 and kernel_works("onednn-packed", dtype):
            return LinearKernel("onednn-packed", dtype, rows)
        if dtype in (torch.float32, torch.bfloat16) and kernel_works("onednn", dtype):
            return LinearKernel("onednn", dtype, rows)
        return LinearKernel("torch", dtype, rows)
    return LinearKernel("torch", dtype)
