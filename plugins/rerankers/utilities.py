"""MBR utilities: how alike a hypothesis is to a (pseudo-)reference, higher is better.

Utilities are plugins of their own kind (``utility``, hook ``register_utilities``), so a third
party adds one the way the built-ins below are added; the ``mbr`` reranker looks its
``utility:`` option up in that registry. ``factory(**params)`` returns an object with:

* ``score(hyp: str, ref: str) -> float`` (required): the utility of ``hyp`` against ``ref``;
* ``pairwise(hyps, refs) -> numpy [H, R]`` (optional): every pair at once (default: ``score``
  in a loop) — the built-ins cache each text's n-grams so a pair costs one match count;
* for MBR's ``aggregate`` method (optional): ``features(text)``, ``aggregate(features,
  weights)`` (the weighted mean of the references' features: expected n-gram counts) and
  ``score_aggregate(hyp_features, aggregated) -> float``. A utility without them serves
  ``exact`` and ``pruning`` only.

Built-ins use sacreBLEU's own n-gram extraction and scoring formulas (``chrf``, ``bleu``,
``ter``); their ``score`` equals ``sacrebleu``'s ``sentence_score(hyp, [ref]).score``
(``ter``: its negation, so higher is better). ``exact_match`` is 1.0 for equal strings.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class Utility:
    """Base class with the default ``pairwise`` (``score`` in a loop). Not required: any object
    with ``score`` is a utility."""

    name = "utility"

    def score(self, hyp: str, ref: str) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def pairwise(self, hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        """``[len(hyps), len(refs)]`` utilities."""
        return np.array([[self.score(h, r) for r in refs] for h in hyps], dtype=np.float64).reshape(len(hyps), len(refs))


def pairwise(utility: Any, hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
    """``utility.pairwise`` when it has one, else ``score`` per pair."""
    fn = getattr(utility, "pairwise", None)
    if fn is not None:
        return np.asarray(fn(hyps, refs), dtype=np.float64).reshape(len(hyps), len(refs))
    return Utility.pairwise(utility, hyps, refs)


def supports_aggregate(utility: Any) -> bool:
    return all(callable(getattr(utility, a, None)) for a in ("features", "aggregate", "score_aggregate"))


def _mean_counters(bags: Sequence[Counter], weights: Sequence[float]) -> Counter:
    out: Counter = Counter()
    for bag, w in zip(bags, weights):
        if w:
            for g, c in bag.items():
                out[g] += w * c
    return out


# ------------------------------------------------------------------------------------- chrF
class ChrF(Utility):
    """sacreBLEU's chrF (``word_order: 2`` is chrF++)."""

    name = "chrf"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        char_order: int = Field(6, ge=1, le=10, description="character n-gram order")
        word_order: int = Field(0, ge=0, le=4, description="word n-gram order (2: chrF++)")
        beta: int = Field(2, ge=1, description="recall weight")
        lowercase: bool = False
        whitespace: bool = Field(False, description="count whitespace inside character n-grams")
        eps_smoothing: bool = False

    def __init__(self, **params: Any):
        from sacrebleu.metrics.chrf import CHRF

        self.params = self.Params(**params)
        self.metric = CHRF(**self.params.model_dump())
        self._cache: dict[str, list[Counter]] = {}

    def features(self, text: str) -> list[Counter]:
        """Per order, the n-gram counts sacreBLEU extracts (cached per text)."""
        f = self._cache.get(text)
        if f is None:
            if len(self._cache) > 65536:
                self._cache.clear()
            seg = self.metric._preprocess_segment(text)
            f = self._cache[text] = self.metric._extract_reference_info([seg])["ref_ngrams"][0]
        return f

    def _stats(self, hyp: list[Counter], ref: list[Counter]) -> list[float]:
        stats: list[float] = []
        for h, r in zip(hyp, ref):
            stats.extend(self.metric._get_match_statistics(h, r))
        return stats

    def score(self, hyp: str, ref: str) -> float:
        return self.metric._compute_f_score(self._stats(self.features(hyp), self.features(ref)))

    def pairwise(self, hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        hf = [self.features(h) for h in hyps]
        rf = [self.features(r) for r in refs]
        return np.array([[self.metric._compute_f_score(self._stats(h, r)) for r in rf] for h in hf],
                        dtype=np.float64).reshape(len(hyps), len(refs))

    def aggregate(self, features: Sequence[list[Counter]], weights: Sequence[float]) -> list[Counter]:
        """Expected n-gram counts of the references, order by order (Vamvas & Sennrich 2024)."""
        return [_mean_counters([f[i] for f in features], weights) for i in range(self.metric.order)]

    def score_aggregate(self, hyp: list[Counter], aggregated: list[Counter]) -> float:
        return self.metric._compute_f_score(self._stats(hyp, aggregated))


# ------------------------------------------------------------------------------------- BLEU
class _Length(float):
    """An expected (fractional) reference length that sacreBLEU's ``BLEUScore`` can print with
    ``:d`` (the aggregate method's brevity penalty uses the expected length)."""

    def __format__(self, spec: str) -> str:
        return float.__format__(self, spec.replace("d", "g"))


class Bleu(Utility):
    """sacreBLEU's sentence BLEU (``effective_order`` on, as sacreBLEU recommends per sentence)."""

    name = "bleu"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        tokenize: str = Field("13a", description="sacreBLEU tokenizer")
        smooth_method: Literal["exp", "floor", "add-k", "none"] = "exp"
        smooth_value: float | None = None
        max_ngram_order: int = Field(4, ge=1, le=9)
        lowercase: bool = False
        effective_order: bool = True

    def __init__(self, **params: Any):
        from sacrebleu.metrics.bleu import BLEU

        self.params = self.Params(**params)
        self.metric = BLEU(**self.params.model_dump())
        self._cache: dict[str, tuple[Counter, int]] = {}

    def features(self, text: str) -> tuple[Counter, int]:
        """(n-gram counts of every order, length in tokens), as sacreBLEU extracts them."""
        f = self._cache.get(text)
        if f is None:
            from sacrebleu.metrics.helpers import extract_all_word_ngrams

            if len(self._cache) > 65536:
                self._cache.clear()
            f = self._cache[text] = extract_all_word_ngrams(self.metric._preprocess_segment(text), 1,
                                                            self.metric.max_ngram_order)
        return f

    def _from_stats(self, hyp: tuple[Counter, int], ref_ngrams: Counter, ref_len: float) -> float:
        order = self.metric.max_ngram_order
        correct, total = [0.0] * order, [0.0] * order
        for g, c in hyp[0].items():
            n = len(g) - 1
            total[n] += c
            rc = ref_ngrams.get(g)
            if rc:
                correct[n] += min(c, rc)
        return self.metric.compute_bleu(correct, total, hyp[1], ref_len, smooth_method=self.metric.smooth_method,
                                        smooth_value=self.metric.smooth_value,
                                        effective_order=self.metric.effective_order, max_ngram_order=order).score

    def score(self, hyp: str, ref: str) -> float:
        r = self.features(ref)
        return self._from_stats(self.features(hyp), r[0], r[1])

    def pairwise(self, hyps: Sequence[str], refs: Sequence[str]) -> np.ndarray:
        hf = [self.features(h) for h in hyps]
        rf = [self.features(r) for r in refs]
        return np.array([[self._from_stats(h, r[0], r[1]) for r in rf] for h in hf],
                        dtype=np.float64).reshape(len(hyps), len(refs))

    def aggregate(self, features: Sequence[tuple[Counter, int]], weights: Sequence[float]) -> tuple[Counter, float]:
        """Expected n-gram counts and expected length of the references (DeNero et al. 2009)."""
        return _mean_counters([f[0] for f in features], weights), _Length(sum(w * f[1] for f, w in zip(features, weights)))

    def score_aggregate(self, hyp: tuple[Counter, int], aggregated: tuple[Counter, float]) -> float:
        return self._from_stats(hyp, aggregated[0], aggregated[1])


# -------------------------------------------------------------------------------------- TER
class Ter(Utility):
    """Negated sacreBLEU TER (an edit rate: lower is better, so the utility is ``-TER``)."""

    name = "ter"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        normalized: bool = False
        no_punct: bool = False
        asian_support: bool = False
        case_sensitive: bool = False

    def __init__(self, **params: Any):
        from sacrebleu.metrics.ter import TER

        self.params = self.Params(**params)
        self.metric = TER(**self.params.model_dump())

    def score(self, hyp: str, ref: str) -> float:
        return -self.metric.sentence_score(hyp, [ref]).score


# ------------------------------------------------------------------------------ exact match
class ExactMatch(Utility):
    """1.0 when the texts are equal (after ``strip``, optionally case-folded), else 0.0: MBR with
    it is a (weighted) majority vote over whole outputs."""

    name = "exact_match"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        strip: bool = True
        lowercase: bool = False

    def __init__(self, **params: Any):
        self.params = self.Params(**params)

    def features(self, text: str) -> str:
        t = text.strip() if self.params.strip else text
        return t.lower() if self.params.lowercase else t

    def score(self, hyp: str, ref: str) -> float:
        return float(self.features(hyp) == self.features(ref))

    def aggregate(self, features: Sequence[str], weights: Sequence[float]) -> Counter:
        out: Counter = Counter()
        for f, w in zip(features, weights):
            out[f] += w
        return out

    def score_aggregate(self, hyp: str, aggregated: Counter) -> float:
        return float(aggregated.get(hyp, 0.0))


BUILTIN_UTILITIES = {"chrf": ChrF, "bleu": Bleu, "ter": Ter, "exact_match": ExactMatch}

__all__ = ["Bleu", "ChrF", "ExactMatch", "Ter", "Utility", "BUILTIN_UTILITIES", "pairwise", "supports_aggregate"]
