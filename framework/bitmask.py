"""Token bitmasks: one packed int32 word per 32 vocabulary ids, bit ``t % 32`` of word ``t // 32``.

The format vLLM, XGrammar and llguidance share. Constraint states fill them
(``fill_bitmask(bitmask, row)``) and the engine applies them to a batch of logits in one op.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["allocate_token_bitmask", "apply_token_bitmask_"]


def allocate_token_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """An all-allowed ``[batch_size, ceil(vocab_size / 32)]`` int32 bitmask."""
    return torch.full((batch_size, (vocab_size + 31) // 32), -1, dtype=torch.int32)


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, indices: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Set ``logits[i, t] = -inf`` wherever bit ``t`` of ``bitmask[i]`` is 0, in place, for the
    whole batch in one masked fill.

    Args:
        logits: ``[B, V]`` float logits (any device; V may exceed the tokenizer's vocabulary:
            ids past ``32 * bitmask.shape[1]`` are disallowed).
        bitmask: ``[B, W]`` int32 (rows aligned with ``logits``), or ``[len(indices), W]``.
        indices: rows of ``logits`` the bitmask rows apply to (default: all rows).
    """
    dev = logits.device
    if dev.type == "cpu" and logits.dtype in _NP_FLOATS and logits.dim() == 2 and bitmask.device.type == "cpu":
        return _apply_bitmask_numpy(logits, bitmask, indices)
    shifts = _SHIFTS.get(dev)
    if shifts is None:
        shifts = _SHIFTS[dev] = torch.arange(32, dtype=torch.int32, device=dev)
    bm = bitmask.to(dev, non_blocking=True)
    V = logits.shape[-1]
    allowed = ((bm.unsqueeze(-1) >> shifts) & 1).view(bm.shape[0], -1).bool()  # [B, 32W]
    if allowed.shape[1] >= V:
        allowed = allowed[:, :V]
    else:
        pad = torch.zeros(allowed.shape[0], V - allowed.shape[1], dtype=torch.bool, device=dev)
        allowed = torch.cat([allowed, pad], dim=1)
    if indices is None:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        idx = torch.as_tensor(indices, dtype=torch.long, device=dev)
        sub = logits.index_select(0, idx)
        sub.masked_fill_(~allowed, float("-inf"))
        logits.index_copy_(0, idx, sub)
    return logits


_NP_FLOATS = (torch.float32, torch.float64, torch.float16)


def _apply_bitmask_numpy(logits: torch.Tensor, bitmask: torch.Tensor, indices: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    """CPU path of :func:`apply_token_bitmask_`: unpack the disallowed bits with numpy and write
    ``-inf`` through a ``where`` copy (several times faster than expanding the bits with shifts)."""
    V = logits.shape[1]
    bm = np.ascontiguousarray(bitmask.numpy())
    n = min(V, bm.shape[1] * 32)
    dis = np.unpackbits((~bm).view(np.uint8), axis=1, count=n, bitorder="little").view(bool)
    out = logits if logits.is_contiguous() else logits.contiguous()
    arr = out.numpy()
    rows = range(arr.shape[0]) if indices is None else [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    if indices is None:
        np.copyto(arr[:, :n], -np.inf, where=dis)
        if n < V:
            arr[:, n:] = -np.inf
    else:
        for j, i in enumerate(rows):
            np.copyto(arr[i, :n], -np.inf, where=dis[j])
            if n < V:
                arr[i, n:] = -np.inf
    if out is not logits:
        logits.copy_(out)
    return logits
