"""tools/demo_training: the training-window sampler (plain windows and BOS-first windows)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from demo_training.lm import WindowSampler  # noqa: E402
from demo_training.tokenizer import BOS  # noqa: E402


def _streams() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name in ("a", "b"):
        s = torch.randint(4, 4096, (3000,), generator=gen, dtype=torch.int32)
        starts = torch.arange(0, 3000, 50) + torch.randint(0, 40, (60,), generator=gen)
        s[starts] = BOS  # documents (10-90 tokens) start at their BOS
        out[name] = s
    return out


def _is_slice(row: torch.Tensor, stream: torch.Tensor) -> bool:
    wins = stream.unfold(0, row.numel(), 1)  # every contiguous window of that length
    return bool((wins == row.to(stream.dtype)).all(1).any())


def test_plain_windows_are_contiguous_slices():
    streams = _streams()
    batch = WindowSampler(streams, {"a": 1.0, "b": 1.0}, 32, seed=1).batch(64)
    assert batch.shape == (64, 33)
    assert all(_is_slice(r, streams["a"]) or _is_slice(r, streams["b"]) for r in batch)
    assert (batch[:, 0] != BOS).any()  # position 0 is an arbitrary token


def test_bos_first_windows_start_with_one_bos_then_a_slice():
    streams = _streams()
    batch = WindowSampler(streams, {"a": 1.0, "b": 1.0}, 32, seed=1, bos_first=True).batch(256)
    assert batch.shape == (256, 33)
    assert (batch[:, 0] == BOS).all()
    assert (batch[:, 1] != BOS).all()  # a cut at a document start keeps its BOS once
    for r in batch:
        # either a document from its own BOS, or BOS + a slice cut anywhere
        assert any(_is_slice(r, s) or _is_slice(r[1:], s) for s in streams.values())
