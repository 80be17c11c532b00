"""Greedy, temperature, top-k and top-p sampling for a whole batch at once.

Sampling uses the exponential race (Gumbel-max in disguise): ``argmax(p / E)`` with
``E ~ Exp(1)`` i.i.d. draws a token with probability ``p``. It needs no sort and no cumulative
sum for the draw itself, and each seeded row draws its noise from its own generator, so a
seeded request samples the same tokens whatever batch it is in.
"""

from __future__ import annotations

import torch

from framework.sampling import SamplerOutput, SamplingBatch

_NEG_INF = float("-inf")


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k and top-p sets. logits: [S, V]."""
    S, V = logits.shape
    use_k = bool((top_k > 0).any())
    use_p = bool((top_p < 1.0).any())
    if not (use_k or use_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if use_k:
        k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
        kth = sorted_logits.gather(1, (k - 1)[:, None])  # [S, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _NEG_INF)
    if use_p:
        probs = sorted_logits.softmax(dim=-1)
        # keep a token if the mass strictly before it is < top_p (the top token always stays)
        before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(before >= top_p[:, None], _NEG_INF)
    return torch.full_like(logits, _NEG_INF).scatter_(1, order, sorted_logits)


class BasicSampler:
    """The default sampler: greedy rows take the argmax; others temperature/top-k/top-p."""

    def sample(self, batch: SamplingBatch, logits: torch.Tensor) -> SamplerOutput:
        logprobs_all = logits.log_softmax(dim=-1)  # [S, V] under the unmodified model distribution
        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            dev = logits.device
            greedy = batch.temperature.to(dev) == 0
            temp = torch.where(greedy, 1.0, batch.temperature.to(dev))
            scaled = apply_top_k_top_p(logits / temp[:, None], batch.top_k.to(dev), batch.top_p.to(dev))
            probs = scaled.softmax(dim=-1)
            noise = torch.empty_like(probs)
            shared_rows = [i for i, g in enumerate(batch.generators) if g is None]
            if shared_rows:
                noise[shared_rows] = torch.empty(len(shared_rows), probs.shape[1]).exponential_(generator=batch.engine_generator).to(noise.device)
            for i, g in enumerate(batch.generators):
                if g is not None:
                    noise[i] = torch.empty(probs.shape[1]).exponential_(generator=g).to(noise.device)
            tokens = (probs / noise).argmax(dim=-1)
            if bool(greedy.any()):
                tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
        chosen = logprobs_all.gather(1, tokens[:, None])[:, 0]
        out = SamplerOutput(tokens=tokens, logprobs=chosen)
        if batch.max_logprobs > 0:
            out.top_logprobs, out.top_ids = logprobs_all.topk(batch.max_logprobs, dim=-1)
        return out
