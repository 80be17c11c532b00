"""Processors + the default sampler against analytic distributions (chi-square), per-row seeding."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from framework import SamplingParams
from framework.plugins import PluginManager
from framework.processors import ProcessorChain, ProcessorSetup, RequestInfo, StepContext
from framework.sampling import SamplingBatch
from plugins.samplers.basic import BasicSampler


def _process(params: SamplingParams, logits: torch.Tensor) -> torch.Tensor:
    """Every row of ``logits`` [N, V] through the processors ``params`` turn on (one shared slot)."""
    N, V = logits.shape
    chain = ProcessorChain(PluginManager(load_entry_points=False).registry("logits_processor"),
                           ProcessorSetup(V, torch.device("cpu"), frozenset({2})))
    out = logits.clone()
    for use in chain.resolve(params):
        proc = chain.instance(use.name)
        proc.add_request(0, use.params, RequestInfo([1], 1, params))
        out = proc.apply(out, StepContext.build([0] * N, [[1]] * N, [1] * N))
    return out


def _expected(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Brute force, one truncation after the other as HF applies them, each on the distribution
    the previous one left (renormalised): keep the top k; keep the smallest most-likely prefix
    with mass >= top_p; keep tokens at least min_p times as likely as the most likely one."""
    p = (logits.double() / temperature).softmax(-1)
    order = p.argsort(descending=True).tolist()
    if top_k:
        p[order[top_k:]] = 0.0
        p /= p.sum()
    mass = 0.0
    for idx in order:
        if mass >= top_p:
            p[idx] = 0.0
        mass += p[idx].item()
    p /= p.sum()
    p[p < min_p * p.max()] = 0.0
    return p / p.sum()


@pytest.mark.parametrize("V,temperature,top_k,top_p,min_p", [
    (12, 1.0, 0, 1.0, 0.0), (12, 0.7, 5, 1.0, 0.0), (12, 1.3, 0, 0.8, 0.0), (12, 1.0, 6, 0.7, 0.0),
    (12, 1.0, 0, 1.0, 0.15), (12, 0.8, 8, 0.9, 0.05),
    (800, 0.9, 10, 0.85, 0.02),  # top-p over the few logits top-k left (the compact path)
])
def test_sampled_frequencies_match_truncated_distribution(V, temperature, top_k, top_p, min_p):
    N = 20000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 1.5
    if V > 12:
        logits[:12] += 4.0  # a head of likely tokens, a long tail
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    gen = torch.Generator().manual_seed(123)
    batch = SamplingBatch.build([params] * N, [None] * N, gen)
    raw = logits.expand(N, V).clone()
    processed = _process(params, raw)
    batch.model_logits = raw
    tokens = BasicSampler().sample(batch, processed).tokens
    counts = torch.bincount(tokens, minlength=V).double()
    exp = _expected(logits, temperature, top_k, top_p, min_p)
    assert counts[exp == 0].sum() == 0  # nothing outside the kept set
    kept = exp > 0
    assert kept.sum() > 1
    p_value = chisquare(counts[kept].numpy(), (exp[kept] * N).numpy()).pvalue
    assert p_value > 0.001, p_value


def test_top_k_top_p_mask_per_row():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 5.0]])
    rows = [SamplingParams(top_k=2), SamplingParams(top_p=0.7), SamplingParams(top_p=0.5)]
    out = torch.cat([_process(p, logits[i : i + 1]) for i, p in enumerate(rows)])
    assert torch.isfinite(out).tolist() == [[True, True, False, False], [True, True, False, False], [False, False, False, True]]


def test_seeded_rows_ignore_their_neighbours():
    V = 50
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=1.0, seed=5)
    def draw(batch_rows):
        gens = [torch.Generator().manual_seed(5) if i == 0 else None for i in range(batch_rows)]
        rows = torch.cat([logits[:1], torch.randn(batch_rows - 1, V)]) if batch_rows > 1 else logits[:1]
        batch = SamplingBatch.build([p] * batch_rows, gens, torch.Generator().manual_seed(batch_rows))
        return [BasicSampler().sample(batch, rows).tokens[0].item() for _ in range(1)]
    assert draw(1) == draw(4) == draw(9)


def test_greedy_rows_take_argmax_and_logprobs_are_model_logprobs():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0.5, seed=1), SamplingParams(temperature=0)]
    processed = logits.clone()
    processed[2, logits[2].argmax()] = -1e9  # e.g. a penalty: greedy follows the processed logits
    batch = SamplingBatch.build(params, [None, torch.Generator().manual_seed(1), None], torch.Generator(), model_logits=logits)
    out = BasicSampler().sample(batch, processed)
    assert out.tokens[0] == logits[0].argmax() and out.tokens[2] == processed[2].argmax()
    ref = logits.log_softmax(-1)  # logprobs are the model's, before processing
    assert torch.equal(out.logprobs, ref.gather(1, out.tokens[:, None])[:, 0])
    assert out.top_ids.shape == (3, 2) and torch.equal(out.top_ids[0], ref[0].topk(2).indices)
