"""Prefix scorers: causal classifiers (FUDGE) and reward models (RAD) that score every prefix.

A scorer directory is a Hugging Face ``LlamaForSequenceClassification`` checkpoint plus one
extra ``config.json`` field, ``decodekit_scorer`` (format: ``docs/demo_models.md``):

* ``config.json``: a Llama config with ``"architectures": ["LlamaForSequenceClassification"]``,
  ``id2label`` naming the head's outputs, and ``"decodekit_scorer": {"kind": "classifier"}``
  (head outputs are class logits; the score is ``log P(label | prefix)``) or
  ``{"kind": "reward"}`` (one output; the score is ``sigmoid(output)``, a reward in [0, 1]);
* ``model.safetensors``: the body's ``model.*`` tensors and the head ``score.weight``
  ``[num_labels, hidden]``;
* tokenizer files (the scorer reads token ids; it must share the language model's vocabulary).

Because the model is causal, one forward pass scores every prefix of a sequence, and a cached
prefix lets ``k`` candidate next tokens be scored together for the cost of ``k`` new positions.

>>> scorer = load_scorer("demo-sentiment")
>>> cache, s = scorer.prefill(ids)                 # ids [B, T] -> s [B, T]: score of each prefix
>>> cand = scorer.candidate_scores(cache, top_k)   # top_k [B, k] -> [B, k]: prefix + candidate
>>> scorer.append(cache, chosen)                   # chosen [B] -> [B]; the cache grows by one
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import ModelLoadError
from framework.models.config import ModelConfig
from framework.models.llama import LlamaForCausalLM
from framework.models.loader import _iter_tensors, _weight_files, resolve_dtype, resolve_model_dir

__all__ = ["KVCache", "PrefixScorer", "ScorerSpec", "load_scorer"]

ScorerKind = Literal["classifier", "reward"]


@dataclass(slots=True)
class KVCache:
    """Keys and values of every layer for a right-padded batch of prefixes.

    ``k[i]``/``v[i]``: ``[B, n_kv, capacity, head_dim]``; row ``b`` holds ``lengths[b]`` valid
    positions, the rest is padding that is masked out.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    lengths: torch.Tensor  # [B] long

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def ensure_capacity(self, n: int) -> None:
        """Grow every layer's buffers (doubling) so ``n`` positions fit."""
        if n <= self.capacity:
            return
        new = max(n, 2 * self.capacity)
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                grown = t.new_zeros(t.shape[0], t.shape[1], new, t.shape[3])
                grown[:, :, : t.shape[2]] = t
                buf[i] = grown

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A cache holding only ``rows`` (e.g. to fork or drop sequences)."""
        return KVCache([t[rows] for t in self.k], [t[rows] for t in self.v], self.lengths[rows].clone())
ARCHITECTURE = "LlamaForSequenceClassification"


@dataclass(frozen=True, slots=True)
class ScorerSpec:
    """What a scorer's head means: its kind, output labels, and the label scored by default."""

    kind: ScorerKind
    labels: tuple[str, ...]
    default_label: str

    @classmethod
    def from_config(cls, cfg: dict, source: str = "config.json") -> "ScorerSpec":
        meta = cfg.get("decodekit_scorer")
        if not isinstance(meta, dict):
            raise ModelLoadError(f"{source}: missing 'decodekit_scorer' (not a decodekit prefix scorer)")
        kind = meta.get("kind")
        if kind not in ("classifier", "reward"):
            raise ModelLoadError(f"{source}: decodekit_scorer.kind must be 'classifier' or 'reward', not {kind!r}")
        id2label = cfg.get("id2label") or {}
        try:
            labels = tuple(str(id2label[str(i)]) for i in range(len(id2label)))
        except KeyError:
            raise ModelLoadError(f"{source}: id2label keys must be 0..{len(id2label) - 1}") from None
        if kind == "reward" and len(labels) != 1:
            raise ModelLoadError(f"{source}: a reward scorer has exactly one output (id2label), got {len(labels)}")
        if kind == "classifier" and len(labels) < 2:
            raise ModelLoadError(f"{source}: a classifier needs at least two labels in id2label")
        default = meta.get("default_label", labels[-1])
        if default not in labels:
            raise ModelLoadError(f"{source}: decodekit_scorer.default_label {default!r} is not one of {list(labels)}")
        return cls(kind, labels, default)


class PrefixScorer(nn.Module):
    """A causal Llama body with a per-position head: scores every prefix of a token sequence.

    *Scores* are what guidance adds or compares: for a classifier ``log P(label | prefix)``
    (``label`` defaults to ``spec.default_label``, e.g. ``"positive"``); for a reward model the
    predicted reward in [0, 1]. Padding is on the right; the score at position ``t`` covers tokens
    ``0..t`` (position 0 is usually BOS).

    The body is the serving model (:class:`~framework.models.llama.LlamaForCausalLM`, without an
    LM head) run through its dense forward; :meth:`checkpoint_tensors` gives the
    ``LlamaForSequenceClassification`` tensors (``model.*``, ``score.weight``).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        spec: ScorerSpec,
        directory: Path | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        self.cfg = cfg
        self.spec = spec
        self.directory = directory
        self.model = LlamaForCausalLM(cfg, dtype=dtype, device=device, lm_head=False)
        self.score = nn.Linear(cfg.hidden_size, len(spec.labels), bias=False, dtype=dtype, device=device)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Hugging Face ``LlamaForSequenceClassification`` names -> tensors (views)."""
        out = {k: v for k, v in self.model.hf_tensors().items() if k != "lm_head.weight"}
        out["score.weight"] = self.score.weight
        return out

    @property
    def kind(self) -> ScorerKind:
        return self.spec.kind

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def label_index(self, label: str | int | None = None) -> int:
        """Index of a head output by name or position (``None``: the default label)."""
        if label is None:
            label = self.spec.default_label
        if isinstance(label, int):
            if not 0 <= label < len(self.spec.labels):
                raise ValueError(f"label index {label} out of range for labels {list(self.spec.labels)}")
            return label
        try:
            return self.spec.labels.index(label)
        except ValueError:
            raise ValueError(f"unknown label {label!r}; this scorer has {list(self.spec.labels)}") from None

    # ------------------------------------------------------------------------------ raw outputs
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, num_labels]
        """Raw head outputs for every prefix (class logits, or the reward before the sigmoid)."""
        hidden, _ = self.model.forward_dense(input_ids)
        return self.score(hidden)

    def to_scores(self, raw: torch.Tensor, label: str | int | None = None) -> torch.Tensor:  # [..., C] -> [...]
        """Head outputs -> scores: ``log_softmax[label]`` (classifier) or ``sigmoid`` (reward)."""
        raw = raw.float()
        if self.spec.kind == "reward":
            return torch.sigmoid(raw[..., 0])
        return F.log_softmax(raw, dim=-1)[..., self.label_index(label)]

    # ------------------------------------------------------------------------------ scoring API
    @torch.inference_mode()
    def prefix_scores(self, input_ids: torch.Tensor, label: str | int | None = None) -> torch.Tensor:
        """Score of every prefix: ``input_ids [B, T]`` (right-padded) -> ``[B, T]``."""
        return self.to_scores(self(input_ids), label)

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None, label: str | int | None = None
    ) -> tuple[KVCache, torch.Tensor]:
        """Run right-padded prefixes ``[B, T]`` (``lengths [B]`` real tokens each; default ``T``).

        Returns the cache for :meth:`candidate_scores` / :meth:`append` and the score of every
        prefix ``[B, T]`` (entries past a row's length are meaningless).
        """
        B, T = input_ids.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=input_ids.device)
        if int(lengths.min()) < 1:
            raise ValueError("every prefix needs at least one token (e.g. BOS)")
        hidden, kv = self.model.forward_dense(input_ids, return_kv=True)
        assert kv is not None
        cache = KVCache([k for k, _ in kv], [v for _, v in kv], lengths.to(torch.long).clone())
        return cache, self.to_scores(self.score(hidden), label)

    def _step(self, cache: KVCache, tokens: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run ``tokens [B, k]`` as k independent one-token continuations of each cached prefix."""
        B, k = tokens.shape
        dev = tokens.device
        P = cache.capacity
        positions = cache.lengths[:, None].expand(B, k)
        past_ok = torch.arange(P, device=dev)[None, :] < cache.lengths[:, None]  # [B, P]
        own = torch.eye(k, dtype=torch.bool, device=dev)  # a candidate sees itself, not its siblings
        mask = torch.cat((past_ok[:, None, :].expand(B, k, P), own.expand(B, k, k)), dim=-1)[:, None]
        past = list(zip(cache.k, cache.v))
        hidden, kv = self.model.forward_dense(tokens, positions, past=past, mask=mask, return_kv=True)
        assert kv is not None
        return self.score(hidden), kv

    @torch.inference_mode()
    def candidate_scores(self, cache: KVCache, candidates: torch.Tensor, label: str | int | None = None) -> torch.Tensor:
        """Score of ``prefix + c`` for each candidate: ``candidates [B, k]`` -> ``[B, k]``.

        One forward over ``B * k`` new positions; the cache is not changed.
        """
        raw, _ = self._step(cache, candidates)
        return self.to_scores(raw, label)

    @torch.inference_mode()
    def append(self, cache: KVCache, tokens: torch.Tensor, label: str | int | None = None) -> torch.Tensor:
        """Extend every cached prefix by one token (``tokens [B]``); returns the new scores ``[B]``."""
        raw, kv = self._step(cache, tokens[:, None])
        cache.ensure_capacity(int(cache.lengths.max()) + 1)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        for i, (k, v) in enumerate(kv):
            cache.k[i][rows, :, cache.lengths] = k[:, :, 0]
            cache.v[i][rows, :, cache.lengths] = v[:, :, 0]
        cache.lengths += 1
        return self.to_scores(raw[:, 0], label)


def load_scorer(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = "auto",
    plugin_manager=None,
) -> PrefixScorer:
    """Load a prefix scorer from a directory or a registered name (``demo-sentiment``, ``demo-reward``).

    ``dtype="auto"``: float32 on CPU, the checkpoint's dtype on GPU. Errors name the file (and
    tensor): missing config or weights, not a scorer, unsupported layout, missing, unexpected,
    misshapen or corrupt tensors.
    """
    path = resolve_model_dir(name_or_path, plugin_manager)
    cfg = ModelConfig.from_dir(path)
    source = str(path / "config.json")
    if cfg.architecture != ARCHITECTURE:
        raise ModelLoadError(f"{source}: architecture {cfg.architecture!r} is not a prefix scorer (expected {ARCHITECTURE})")
    spec = ScorerSpec.from_config(cfg.raw, source)
    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, cfg, dev)
    scorer = PrefixScorer(cfg, spec, path, dtype=torch_dtype, device=dev)
    expected = {name: tuple(t.shape) for name, t in scorer.checkpoint_tensors().items()}
    tensors = dict(_iter_tensors(_weight_files(path), expected))  # checks names, shapes, corruption
    with torch.no_grad():
        scorer.score.weight.copy_(tensors.pop("score.weight"))
    scorer.model.load_weights(tensors.items())
    return scorer.eval()
