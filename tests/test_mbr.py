"""The ``mbr`` reranker and its utilities, against sacreBLEU, a brute force and ``mbrs``.

* each utility's ``score``/``pairwise`` equals ``sacrebleu``'s ``sentence_score``;
* ``exact`` picks the brute-force argmax with the brute-force expected utilities, and the same
  candidate and scores as ``mbrs``'s ``DecoderMBR`` for chrF and BLEU (uniform and logprob
  weights);
* ``aggregate`` equals a brute-force computation of its definition (expected n-gram counts of
  the references, scored with sacreBLEU's formulas), and ``mbrs``'s ``DecoderAggregateMBR``;
* ``pruning`` returns the exact choice in >= 95% of 200 random cases;
* options errors, the registry (a third-party utility), and the engine end to end.
"""

from __future__ import annotations

import enum
import importlib
import importlib.util
import math
import random
import sys
import types
from collections import Counter

import numpy as np
import pytest
import sacrebleu

from framework import LLM, SamplingParams
from framework.errors import InvalidRequestError
from framework.hookspecs import hookimpl
from framework.outputs import CompletionOutput
from framework.plugins import PluginManager
from framework.rerankers import RerankRequest
from plugins.rerankers.mbr import MBRReranker, aggregate_scores, exact_scores, pruning_mbr, reference_weights
from plugins.rerankers.utilities import Bleu, ChrF, ExactMatch, Ter

WORDS = ("the cat sat on a mat dog ran far away quickly slowly red blue house tree bird sang "
         "loud song, under over and then it was good.").split()


def _sentence(r: random.Random, base: list[str]) -> str:
    """A perturbation of ``base``: words dropped, swapped or replaced (MBR-like candidate lists)."""
    out = []
    for w in base:
        x = r.random()
        if x < 0.15:
            continue
        out.append(r.choice(WORDS) if x < 0.35 else w)
        if r.random() < 0.1:
            out.append(r.choice(WORDS))
    return " ".join(out) or r.choice(WORDS)


def _candidates(seed: int, n: int) -> list[str]:
    r = random.Random(seed)
    base = [r.choice(WORDS) for _ in range(r.randint(4, 14))]
    return [_sentence(r, base) for _ in range(n)]


def _req(texts, logps=None, **opts) -> RerankRequest:
    logps = logps or [-float(i) for i in range(len(texts))]
    cands = [CompletionOutput(i, t, [0] * 3, lp, None, "stop") for i, (t, lp) in enumerate(zip(texts, logps))]
    return RerankRequest("r", "", [], SamplingParams(n=len(texts)), MBRReranker.Params(**opts), cands)


# ----------------------------------------------------------------------------- utilities
@pytest.mark.parametrize("make,ref", [
    (lambda: ChrF(), lambda: sacrebleu.CHRF()),
    (lambda: ChrF(word_order=2), lambda: sacrebleu.CHRF(word_order=2)),
    (lambda: ChrF(lowercase=True, char_order=4), lambda: sacrebleu.CHRF(lowercase=True, char_order=4)),
    (lambda: Bleu(), lambda: sacrebleu.BLEU(effective_order=True)),
    (lambda: Bleu(smooth_method="floor", smooth_value=0.1), lambda: sacrebleu.BLEU(smooth_method="floor", smooth_value=0.1, effective_order=True)),
])
def test_utility_equals_sacrebleu_sentence_score(make, ref):
    u, metric = make(), ref()
    texts = _candidates(1, 12) + ["", "The Cat sat.", "a"]
    mat = u.pairwise(texts, texts)
    for i, h in enumerate(texts):
        for j, r in enumerate(texts):
            want = metric.sentence_score(h, [r]).score
            assert mat[i, j] == pytest.approx(want, abs=1e-9)
            assert u.score(h, r) == pytest.approx(want, abs=1e-9)


def test_ter_and_exact_match_utilities():
    texts = _candidates(2, 6)
    ter = sacrebleu.TER()
    for h in texts:
        for r in texts:
            assert Ter().score(h, r) == pytest.approx(-ter.sentence_score(h, [r]).score)
    em = ExactMatch()
    assert em.score(" a b ", "a b") == 1.0 and em.score("a", "A") == 0.0 and ExactMatch(lowercase=True).score("a", "A") == 1.0


# ----------------------------------------------------------------------------- exact
def _brute_force(texts, refs, weights, metric):
    exp = [sum(w * metric.sentence_score(h, [r]).score for r, w in zip(refs, weights)) for h in texts]
    return exp, max(range(len(texts)), key=lambda i: (exp[i], -i))


@pytest.mark.parametrize("utility,metric", [("chrf", sacrebleu.CHRF()), ("bleu", sacrebleu.BLEU(effective_order=True))])
@pytest.mark.parametrize("weights", ["uniform", "logprob"])
def test_exact_equals_brute_force(utility, metric, weights):
    for seed in range(5):
        texts = _candidates(seed, 10)
        logps = [-random.Random(seed + i).uniform(1, 8) for i in range(10)]
        out = MBRReranker().select(_req(texts, logps, utility=utility, weights=weights))
        z = sum(math.exp(lp) for lp in logps)
        w = [math.exp(lp) / z for lp in logps] if weights == "logprob" else [0.1] * 10
        exp, best = _brute_force(texts, texts, w, metric)
        assert out[0].index == best
        assert sorted(c.index for c in out) == list(range(10))
        for c in out:
            assert c.score == pytest.approx(exp[c.index], abs=1e-9)
        assert [c.score for c in out] == sorted((c.score for c in out), reverse=True)


def test_separate_reference_samples():
    texts = _candidates(7, 9)
    out = MBRReranker().select(_req(texts, references=4))
    hyps, refs = texts[:5], texts[5:]
    exp, best = _brute_force(hyps, refs, [0.25] * 4, sacrebleu.CHRF())
    assert sorted(c.index for c in out) == list(range(5))  # references are not outputs
    assert out[0].index == best and out[0].score == pytest.approx(exp[best])


# ----------------------------------------------------------------------------- mbrs parity
def _load_mbrs():
    """``mbrs`` metrics/decoders without its neural metrics (COMET, BLEURT, BERTScore pull in
    other transformers versions): the packages' ``__init__`` is replaced by the modules we use."""
    if importlib.util.find_spec("mbrs") is None:
        pytest.skip("mbrs is not installed (pip install --no-deps mbrs; see .ci/run)")
    if "mbrs.decoders.mbr" in sys.modules:
        return sys.modules["mbrs.metrics"], sys.modules["mbrs.decoders"]
    root = importlib.util.find_spec("mbrs").submodule_search_locations[0]
    importlib.import_module("mbrs")
    for pkg, names in (("mbrs.metrics", ("base", "chrf", "bleu")),
                       ("mbrs.decoders", ("base", "mbr", "aggregate_mbr"))):
        mod = types.ModuleType(pkg)
        mod.__path__ = [f"{root}/{pkg.split('.')[1]}"]
        sys.modules[pkg] = mod
        for n in names:
            sub = importlib.import_module(f"{pkg}.{n}")
            for k, v in vars(sub).items():
                if not k.startswith("_"):
                    setattr(mod, k, v)
        if pkg == "mbrs.metrics":
            mod.Metrics = enum.Enum("Metrics", {"chrf": "chrf", "bleu": "bleu"})
    return sys.modules["mbrs.metrics"], sys.modules["mbrs.decoders"]


def _mbrs_metric(M, utility, **cfg):
    if utility == "chrf":
        return M.MetricChrF(M.MetricChrF.Config(**cfg))
    return M.MetricBLEU(M.MetricBLEU.Config(num_workers=1))


def _same_choice(out, ref) -> None:
    """The same candidate as mbrs — or, where mbrs's float32 scores tie at the top, one of the tied."""
    tied = [i for i, s in zip(ref.idx, ref.score) if s >= ref.score[0] - 1e-3]
    assert out[0].index in tied
    if len(tied) == 1:
        assert out[0].index == ref.idx[0]


@pytest.mark.parametrize("utility", ["chrf", "bleu"])
@pytest.mark.parametrize("weights", ["uniform", "logprob"])
def test_exact_matches_mbrs(utility, weights):
    import torch

    M, D = _load_mbrs()
    metric = _mbrs_metric(M, utility)
    for seed in range(4):
        texts = _candidates(100 + seed, 12)
        logps = [-random.Random(seed * 31 + i).uniform(1, 6) for i in range(12)]
        lp = torch.tensor(logps) if weights == "logprob" else None
        ref = D.DecoderMBR(D.DecoderMBR.Config(), metric).decode(texts, texts, nbest=12, reference_lprobs=lp)
        out = MBRReranker().select(_req(texts, logps, utility=utility, weights=weights))
        _same_choice(out, ref)
        mine = {c.index: c.score for c in out}
        for i, s in zip(ref.idx, ref.score):
            assert mine[i] == pytest.approx(s, abs=1e-3)  # mbrs computes in float32


@pytest.mark.parametrize("utility", ["chrf", "bleu"])
def test_aggregate_matches_mbrs(utility):
    M, D = _load_mbrs()
    # mbrs's fastchrf path aggregates differently (per-reference statistics); its sacreBLEU path
    # is the expected-n-gram-count definition implemented here
    metric = _mbrs_metric(M, utility, **({"fastchrf": False} if utility == "chrf" else {}))
    for seed in range(4):
        texts = _candidates(200 + seed, 12)
        ref = D.DecoderAggregateMBR(D.DecoderAggregateMBR.Config(), metric).decode(texts, texts, nbest=12)
        out = MBRReranker().select(_req(texts, utility=utility, method="aggregate"))
        _same_choice(out, ref)
        mine = {c.index: c.score for c in out}
        for i, s in zip(ref.idx, ref.score):
            assert mine[i] == pytest.approx(s, abs=1e-3)


# ----------------------------------------------------------------------------- aggregate
def _char_ngrams(text: str, n: int) -> Counter:
    s = "".join(text.split())
    return Counter(s[i:i + n] for i in range(len(s) - n + 1))


def _f(metric: sacrebleu.CHRF, hyp: str, bags: list[Counter]) -> float:
    stats = []
    for n, bag in enumerate(bags, start=1):
        h = _char_ngrams(hyp, n)
        stats += [sum(h.values()) if bag else 0, sum(bag.values()), sum(min(c, bag[g]) for g, c in h.items() if g in bag)]
    return metric._compute_f_score(stats)


@pytest.mark.parametrize("weights", ["uniform", "logprob"])
def test_aggregate_chrf_equals_brute_force_definition(weights):
    metric = sacrebleu.CHRF()
    for seed in range(6):
        texts = _candidates(300 + seed, 9)
        logps = [-random.Random(seed + 7 * i).uniform(0, 5) for i in range(9)]
        w = reference_weights(logps, weights)
        bags = []
        for n in range(1, 7):  # expected character n-gram counts, the slow way
            bag: Counter = Counter()
            for r, wr in zip(texts, w):
                for g, c in _char_ngrams(r, n).items():
                    bag[g] += wr * c
            bags.append(bag)
        want = [_f(metric, h, bags) for h in texts]
        got = aggregate_scores(ChrF(), texts, texts, w)
        np.testing.assert_allclose(got, want, atol=1e-9)


def test_aggregate_bleu_equals_brute_force_definition():
    metric = sacrebleu.BLEU(effective_order=True)
    tok = metric.tokenizer
    for seed in range(6):
        texts = _candidates(400 + seed, 9)
        w = np.full(9, 1 / 9)
        toks = [tok(t).split() for t in texts]
        bag: Counter = Counter()
        for ts, wr in zip(toks, w):
            for n in range(1, 5):
                for i in range(len(ts) - n + 1):
                    bag[tuple(ts[i:i + n])] += wr
        exp_len = sum(len(ts) * wr for ts, wr in zip(toks, w))
        for h, hs in zip(texts, toks):
            correct, total = [0.0] * 4, [0.0] * 4
            hc = Counter(tuple(hs[i:i + n]) for n in range(1, 5) for i in range(len(hs) - n + 1))
            for g, c in hc.items():
                total[len(g) - 1] += c
                correct[len(g) - 1] += min(c, bag.get(g, 0.0))
            # sacreBLEU's BLEU formula with the expected length as the reference length
            want = metric.compute_bleu(correct, total, len(hs), 0, smooth_method="exp", effective_order=True).score
            if len(hs) < exp_len:
                want *= math.exp(1 - exp_len / len(hs))
            got = aggregate_scores(Bleu(), [h], texts, w)[0]
            assert got == pytest.approx(want, abs=1e-9)


def test_aggregate_with_one_reference_is_exact():
    texts = _candidates(9, 8)
    for u in (ChrF(), Bleu(), ExactMatch()):
        for r in texts:
            np.testing.assert_allclose(aggregate_scores(u, texts, [r], np.ones(1)), exact_scores(u, texts, [r], np.ones(1)), atol=1e-9)


def test_exact_match_mbr_is_a_majority_vote():
    texts = ["b", "a", "b", "c", "a", "b"]
    out = MBRReranker().select(_req(texts, utility="exact_match", method="aggregate"))
    assert out[0].index == 0 and out[0].score == pytest.approx(0.5)
    assert [c.index for c in out] == [0, 2, 5, 1, 4, 3]


# ----------------------------------------------------------------------------- pruning
def test_pruning_returns_the_exact_choice_in_95_percent_of_200_cases():
    rng = random.Random(5)
    agree = 0
    u = ChrF()
    for case in range(200):
        n = rng.choice([16, 24, 32, 48])
        texts = _candidates(1000 + case, n)
        w = np.full(n, 1 / n)
        exact = exact_scores(u, texts, texts, w)
        _, order = pruning_mbr(u, texts, texts, w, [8, 16, 32], 0.99, 200, case, same=True)
        agree += int(np.argmax(exact) == order[0] or exact[order[0]] == exact.max())
        assert sorted(order) == list(range(n))
    assert agree >= 190, agree


def test_pruning_scores_survivors_on_all_references():
    texts = _candidates(11, 20)
    u = ChrF()
    w = np.full(20, 0.05)
    exact = exact_scores(u, texts, texts, w)
    scores, order = pruning_mbr(u, texts, texts, w, [4, 8], 0.9, 100, 0, same=True)
    assert scores[order[0]] == pytest.approx(exact[order[0]])


# ----------------------------------------------------------------------------- options, registry
def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="schedule"):
        MBRReranker.Params(schedule=[8, 4])
    with pytest.raises(ValueError, match="references"):
        MBRReranker.Params(references=0)


class _Length:
    """A third-party utility: closeness in length."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def score(self, hyp: str, ref: str) -> float:
        return -self.scale * abs(len(hyp) - len(ref))


class _Plugin:
    @staticmethod
    @hookimpl
    def register_utilities(register):
        from pydantic import BaseModel, ConfigDict

        class P(BaseModel):
            model_config = ConfigDict(extra="forbid")
            scale: float = 1.0

        register("length", _Length, params=P)


def test_third_party_utility_through_the_registry(text_model):
    pm = PluginManager(load_entry_points=False, extra_plugins=[_Plugin()])
    assert "length" in pm.registry("utility")
    llm = LLM(str(text_model), plugin_manager=pm)
    params = SamplingParams(n=5, max_tokens=12, temperature=1.0, seed=0, reranker={"mbr": {"utility": "length"}})
    outs = llm.generate("Q:", params, use_tqdm=False)[0].outputs
    texts = [o.text for o in outs]
    exp = [np.mean([-abs(len(h) - len(r)) for r in texts]) for h in texts]
    assert [o.score for o in outs] == pytest.approx(exp)
    assert exp == sorted(exp, reverse=True)
    with pytest.raises(InvalidRequestError, match="aggregate"):
        llm.generate("Q:", SamplingParams(n=3, max_tokens=4, reranker={"mbr": {"utility": "length", "method": "aggregate"}}))
    with pytest.raises(InvalidRequestError, match="scale"):
        llm.generate("Q:", SamplingParams(n=3, max_tokens=4, reranker={"mbr": {"utility": "length", "utility_options": {"scale": "x"}}}))


def test_engine_errors_and_end_to_end(text_model):
    llm = LLM(str(text_model))
    with pytest.raises(InvalidRequestError, match="utility.*'chrf'"):
        llm.generate("Q:", SamplingParams(n=3, max_tokens=4, reranker={"mbr": {"utility": "chrff"}}))
    with pytest.raises(InvalidRequestError, match="n: MBR chooses among several samples"):
        llm.generate("Q:", SamplingParams(n=1, max_tokens=4, reranker="mbr"))
    with pytest.raises(InvalidRequestError, match="references"):
        llm.generate("Q:", SamplingParams(n=3, best_of=4, max_tokens=4, reranker={"mbr": {"references": 2}}))
    with pytest.raises(InvalidRequestError, match="method"):
        llm.generate("Q:", SamplingParams(n=3, max_tokens=4, reranker={"mbr": {"method": "fast"}}))
    base = dict(max_tokens=16, temperature=1.0, seed=4)
    plain = llm.generate("Q:", SamplingParams(n=6, **base), use_tqdm=False)[0].outputs
    ranked = llm.generate("Q:", SamplingParams(n=2, best_of=6, reranker={"mbr": {"utility": "bleu"}}, **base),
                          use_tqdm=False)[0].outputs
    texts = [o.text for o in plain]
    exp, best = _brute_force(texts, texts, [1 / 6] * 6, sacrebleu.BLEU(effective_order=True))
    assert len(ranked) == 2 and ranked[0].text == texts[best]
    assert ranked[0].score == pytest.approx(exp[best])
    assert ranked[1].score <= ranked[0].score
