"""The sentiment prefix classifier (FUDGE) and the sentiment reward model (RAD).

Data: short *lines* (a sentence of a Shakespeare speech, of a fortune, of the Python docs, a
generated review) labelled with VADER's compound score ``c`` in [-1, 1] for the whole line.

* ``demo-sentiment`` (classifier): lines with ``c >= +THRESHOLD`` are positive, ``c <= -THRESHOLD``
  negative, the near-neutral rest is dropped; classes are balanced by subsampling. Trained with
  cross-entropy at *every prefix* (FUDGE: ``P(attribute | x_1..x_t)`` for each ``t``), the label
  of a prefix being the full line's.
* ``demo-reward`` (reward model): every line, target reward ``r = (c + 1) / 2`` in [0, 1]
  (exactly neutral lines, the vast majority, subsampled to a third of the set). The model predicts
  ``r_hat_t = sigmoid(head(h_t))`` at every prefix and is trained with the cumulative squared
  error of Reward-Augmented Decoding (Deng & Raffel, 2023): for a line of ``l`` tokens,
  ``sum_t t * (r_hat_t - r)^2 / (l (l + 1) / 2)`` -- later prefixes, which see more of the line,
  weigh more.

Both start from the trained ``demo-draft`` body (same shape), which already knows the vocabulary.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from framework.models.config import ModelConfig
from framework.models.scorer import PrefixScorer, ScorerSpec

from .tokenizer import BOS, PAD

THRESHOLD = 0.5  # |VADER compound| needed for a classifier label
MAX_TOKENS = 64  # lines longer than this (BOS included) are not used
BUCKETS = ((1, 4), (5, 8), (9, 16), (17, 32), (33, MAX_TOKENS))

_SENT = re.compile(r"(?<=[.!?;])\s+")


def split_lines(text: str, min_words: int = 3, max_words: int = 40) -> list[str]:
    """Sentences of ``text`` (split after . ! ? ;) with a sensible number of words."""
    out = []
    for s in _SENT.split(" ".join(text.split())):
        n = len(s.split())
        if min_words <= n <= max_words:
            out.append(s)
    return out


@dataclass(slots=True)
class Labelled:
    ids: list[int]  # BOS + line tokens
    compound: float


def label_lines(lines: list[str], sp, seed: int) -> list[Labelled]:
    """VADER-score and tokenize unique lines (dropping ones over MAX_TOKENS)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    uniq = sorted(set(lines))
    random.Random(seed).shuffle(uniq)
    encoded = sp.encode(uniq)
    out = []
    for text, ids in zip(uniq, encoded):
        if 2 <= len(ids) < MAX_TOKENS:
            out.append(Labelled([BOS, *ids], analyzer.polarity_scores(text)["compound"]))
    return out


def classifier_set(items: list[Labelled], seed: int) -> list[tuple[list[int], int]]:
    pos = [(x.ids, 1) for x in items if x.compound >= THRESHOLD]
    neg = [(x.ids, 0) for x in items if x.compound <= -THRESHOLD]
    n = min(len(pos), len(neg))
    r = random.Random(seed)
    data = r.sample(pos, n) + r.sample(neg, n)
    r.shuffle(data)
    return data


def reward_set(items: list[Labelled], seed: int) -> list[tuple[list[int], float]]:
    r = random.Random(seed)
    polar = [(x.ids, (x.compound + 1) / 2) for x in items if x.compound != 0]
    neutral = [(x.ids, 0.5) for x in items if x.compound == 0]
    data = polar + r.sample(neutral, min(len(neutral), len(polar) // 2))
    r.shuffle(data)
    return data


def pad_batch(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to ``[B, T]``; returns ids and lengths ``[B]``."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])


def prefix_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """``[B, T]`` True at positions 1..len-1: prefixes holding at least one real token."""
    pos = torch.arange(T, device=lengths.device)[None, :]
    return (pos >= 1) & (pos < lengths[:, None])


def classifier_loss(model: PrefixScorer, batch: list[tuple[list[int], int]]) -> torch.Tensor:
    dev = model.score.weight.device
    ids, lengths = pad_batch([s for s, _ in batch])
    ids, lengths = ids.to(dev), lengths.to(dev)
    labels = torch.tensor([y for _, y in batch], device=dev)
    logits = model(ids).float()  # [B, T, 2]
    mask = prefix_mask(lengths, ids.shape[1])
    target = labels[:, None].expand_as(mask)
    return F.cross_entropy(logits[mask], target[mask])


def rad_loss(pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Cumulative squared error of RAD, averaged over lines.

    ``pred [B, T]`` predicted reward of every prefix, ``target [B]``, ``lengths [B]`` (BOS
    included). Prefix ``t`` (``t`` real tokens, 1..l) weighs ``t / (l (l + 1) / 2)``.
    """
    T = pred.shape[1]
    t = torch.arange(T, dtype=pred.dtype, device=pred.device)[None, :]  # position p holds the prefix of p real tokens
    l = (lengths - 1).to(pred.dtype)[:, None]
    w = torch.where(prefix_mask(lengths, T), t / (l * (l + 1) / 2), torch.zeros((), dtype=pred.dtype, device=pred.device))
    return ((pred - target[:, None]) ** 2 * w).sum(1).mean()


def reward_loss(model: PrefixScorer, batch: list[tuple[list[int], float]]) -> torch.Tensor:
    dev = model.score.weight.device
    ids, lengths = pad_batch([s for s, _ in batch])
    ids, lengths = ids.to(dev), lengths.to(dev)
    target = torch.tensor([y for _, y in batch], dtype=torch.float32, device=dev)
    pred = torch.sigmoid(model(ids).float()[..., 0])
    return rad_loss(pred, target, lengths)


def new_scorer(cfg: ModelConfig, kind: str, init_from: torch.nn.Module, seed: int) -> PrefixScorer:
    spec = (ScorerSpec("classifier", ("negative", "positive"), "positive") if kind == "classifier"
            else ScorerSpec("reward", ("reward",), "reward"))
    torch.manual_seed(seed)
    scorer = PrefixScorer(cfg, spec)
    scorer.model.load_weights((k, v.detach()) for k, v in init_from.hf_tensors().items())
    scorer.requires_grad_(True)
    torch.nn.init.normal_(scorer.score.weight, 0.0, 0.02)
    return scorer


def scorer_config(base: dict, kind: str, threshold: float = THRESHOLD) -> dict:
    """``config.json`` of a scorer: the Llama config of its body plus the head's meaning."""
    cfg = {k: v for k, v in base.items() if k not in ("architectures", "tie_word_embeddings")}
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    cfg["tie_word_embeddings"] = False
    if kind == "classifier":
        cfg.update(id2label={"0": "negative", "1": "positive"}, label2id={"negative": 0, "positive": 1},
                   problem_type="single_label_classification")
        cfg["decodekit_scorer"] = {
            "kind": "classifier", "default_label": "positive",
            "description": "FUDGE prefix classifier: P(label | prefix) of the sentiment of the whole line; "
                           f"trained on lines with |VADER compound| >= {threshold}, every prefix.",
        }
    else:
        cfg.update(id2label={"0": "reward"}, label2id={"reward": 0}, problem_type="regression")
        cfg["decodekit_scorer"] = {
            "kind": "reward", "default_label": "reward", "activation": "sigmoid",
            "description": "RAD reward model: sigmoid(head) predicts (VADER compound + 1) / 2 of the whole "
                           "line from every prefix; trained with the position-weighted cumulative MSE.",
        }
    return cfg


def _bucket(n_tokens: int) -> str | None:
    for lo, hi in BUCKETS:
        if lo <= n_tokens <= hi:
            return f"{lo}-{hi}"
    return None


@torch.inference_mode()
def classifier_accuracy(model: PrefixScorer, data: list[tuple[list[int], int]], batch_size: int = 128) -> dict[str, float]:
    """Accuracy against the VADER label by prefix length (real tokens) and at the full line."""
    hits: dict[str, list[int]] = {}
    for j in range(0, len(data), batch_size):
        chunk = data[j : j + batch_size]
        ids, lengths = pad_batch([s for s, _ in chunk])
        pred = model(ids).argmax(-1)  # [B, T]
        for i, (_, y) in enumerate(chunk):
            L = int(lengths[i])
            for p in range(1, L):
                b = _bucket(p)
                h = hits.setdefault(b, [0, 0])
                h[0] += int(pred[i, p] == y)
                h[1] += 1
            h = hits.setdefault("full line", [0, 0])
            h[0] += int(pred[i, L - 1] == y)
            h[1] += 1
    order = [f"{lo}-{hi}" for lo, hi in BUCKETS] + ["full line"]
    return {k: hits[k][0] / hits[k][1] for k in order if k in hits}


@torch.inference_mode()
def reward_errors(model: PrefixScorer, data: list[tuple[list[int], float]], batch_size: int = 128) -> dict[str, float]:
    """Held-out MSE at the full line, the RAD cumulative loss, and the predict-the-mean baseline."""
    sq, cum, n = 0.0, 0.0, 0
    mean = sum(y for _, y in data) / len(data)
    base = sum((y - mean) ** 2 for _, y in data) / len(data)
    for j in range(0, len(data), batch_size):
        chunk = data[j : j + batch_size]
        ids, lengths = pad_batch([s for s, _ in chunk])
        target = torch.tensor([y for _, y in chunk], dtype=torch.float32)
        pred = torch.sigmoid(model(ids).float()[..., 0])
        last = pred[torch.arange(len(chunk)), lengths - 1]
        sq += float(((last - target) ** 2).sum())
        cum += float(rad_loss(pred, target, lengths)) * len(chunk)
        n += len(chunk)
    return {"mse_full_line": sq / n, "rad_cumulative_mse": cum / n, "baseline_mse_predict_mean": base}
