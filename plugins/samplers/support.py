"""The compact form of truncated logits, and a fast exact top-k.

After top-k (or a constraint mask) a row of logits has few finite entries. A :class:`Support`
lists them (values and token ids) so that the truncations that follow work on ``[R, W]``
instead of ``[R, V]``; processors hand it on through the step's shared scratch space
(``StepContext.shared``), valid only for the exact tensor, unmodified, that it describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from framework.processors import StepContext

_NEG_INF = float("-inf")

_BLOCK = 8


def topk_largest(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k)`` ([R, n] -> values, ids, descending), faster for ``k`` much smaller than ``n``.

    Split each row into blocks of 8 (strided, so the block maxima are one vectorised ``amax``);
    the k blocks with the largest maxima hold k entries at least as large as every entry outside
    them, so the top k values are found among those ``8k`` candidates (recursively for the block
    maxima). The values equal ``torch.topk``'s exactly; among equal values the ids may differ.
    """
    R, n = x.shape
    if n < 8192 or n <= _BLOCK * k:  # torch.topk is as quick on short rows (measured on CPU, 2 threads)
        return x.topk(k, dim=-1)
    nb = n // _BLOCK
    maxima = x[:, : nb * _BLOCK].view(R, _BLOCK, nb).amax(dim=1)  # block b = {b + j * nb}
    _, blocks = topk_largest(maxima, k)
    cols = (blocks[:, :, None] + torch.arange(_BLOCK, device=x.device) * nb).reshape(R, k * _BLOCK)
    if nb * _BLOCK < n:  # the last few entries are candidates too
        cols = torch.cat([cols, torch.arange(nb * _BLOCK, n, device=x.device).expand(R, -1)], dim=1)
    values, j = x.gather(1, cols).topk(k, dim=-1)
    return values, cols.gather(1, j)


@dataclass(slots=True)
class Support:
    """The finite entries of a logits tensor ``[R, V]`` as ``[R, W]`` values and token ids
    (``-inf`` values pad rows with fewer than ``W``); every other entry is ``-inf``."""

    logits: torch.Tensor  # the tensor described
    version: int  # its ``_version`` when described (an in-place change invalidates the support)
    values: torch.Tensor  # [R, W]
    ids: torch.Tensor  # [R, W] int64
    ascending: bool  # values sorted ascending (ties by token id); else descending as from topk

    KEY: ClassVar[str] = "truncation.support"

    @classmethod
    def of(cls, logits: torch.Tensor, ctx: StepContext) -> "Support | None":
        s = ctx.shared.get(cls.KEY)
        if s is not None and s.logits is logits and s.version == logits._version:
            return s
        return None

    @classmethod
    def covering(cls, logits: torch.Tensor, width: int) -> "Support":
        """The support of ``logits`` whose rows have at most ``width`` finite entries."""
        values, ids = topk_largest(logits, max(1, min(width, logits.shape[-1])))  # descending, -inf padding
        return cls(logits, logits._version, values, ids, ascending=False)

    def publish(self, ctx: StepContext) -> None:
        self.version = self.logits._version
        ctx.shared[self.KEY] = self

    def sort_ascending(self) -> None:
        """Ascending values, ties by token id: an order that does not depend on the batch."""
        if self.ascending:
            return
        values, ids = self.values.flip(-1), self.ids.flip(-1)  # from topk: descending
        if bool(((values[:, 1:] == values[:, :-1]) & (values[:, 1:] > _NEG_INF)).any()):
            ids, order = ids.sort(dim=-1)  # equal finite values: order them by token id
            values, order2 = values.gather(1, order).sort(dim=-1, stable=True)
            ids = ids.gather(1, order2)
        self.values, self.ids, self.ascending = values, ids, True

    def drop(self, remove: torch.Tensor) -> None:
        """Mask entries ``remove`` ([R, W]) in the logits and in the support."""
        self.values = self.values.masked_fill(remove, _NEG_INF)
        self.logits.scatter_(1, self.ids, self.values)

    def protect_top(self, remove: torch.Tensor, keep: torch.Tensor, kmax: int, same: bool) -> None:
        """Never drop a row's ``keep`` most likely entries."""
        width = remove.shape[-1]
        if same:
            if self.ascending:
                remove[:, max(width - kmax, 0):] = False
            else:
                remove[:, :kmax] = False
            return
        pos = torch.arange(width, device=remove.device)[None, :]
        remove &= (pos < (width - keep)[:, None]) if self.ascending else (pos >= keep[:, None])


def compact_limit(vocab_size: int) -> int:
    """Rows with at most this many finite logits take the compact path (0: never)."""
    return vocab_size // 8 if vocab_size >= 512 else 0
