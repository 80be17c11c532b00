"""The default sampler against analytic distributions (chi-square) and per-row seeding."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from framework import SamplingParams
from framework.sampling import SamplingBatch
from plugins.samplers.basic import BasicSampler, apply_top_k_top_p


def _expected(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Brute force: sort, keep top-k, keep the smallest prefix with mass >= top_p, renormalise."""
    p = (logits / temperature).softmax(-1).double()
    order = p.argsort(descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    mass = 0.0
    for rank, idx in enumerate(order.tolist()):
        if top_k and rank >= top_k:
            break
        if mass >= top_p:
            break
        keep[idx] = True
        mass += p[idx].item()
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 6, 0.7)])
def test_sampled_frequencies_match_truncated_distribution(temperature, top_k, top_p):
    V, N = 12, 20000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 1.5
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    gen = torch.Generator().manual_seed(123)
    batch = SamplingBatch.build([params] * N, [None] * N, gen)
    tokens = BasicSampler().sample(batch, logits.expand(N, V).clone()).tokens
    counts = torch.bincount(tokens, minlength=V).double()
    exp = _expected(logits, temperature, top_k, top_p)
    assert counts[exp == 0].sum() == 0  # nothing outside the kept set
    kept = exp > 0
    p_value = chisquare(counts[kept].numpy(), (exp[kept] * N).numpy()).pvalue
    assert p_value > 0.001, p_value


def test_top_k_top_p_mask_per_row():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 0.0, 5.0]])
    out = apply_top_k_top_p(logits, torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.7, 0.5]))
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
    batch = SamplingBatch.build(params, [None, torch.Generator().manual_seed(1), None], torch.Generator())
    out = BasicSampler().sample(batch, logits)
    assert out.tokens[0] == logits[0].argmax() and out.tokens[2] == logits[2].argmax()
    ref = logits.log_softmax(-1)
    assert torch.equal(out.logprobs, ref.gather(1, out.tokens[:, None])[:, 0])
    assert out.top_ids.shape == (3, 2) and torch.equal(out.top_ids[0], ref[0].topk(2).indices)
