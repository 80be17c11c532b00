"""The default sampler: greedy rows take the argmax, the others draw from softmax(logits).

Temperature, top-k, top-p and the other truncations are logits processors (see
``plugins/samplers/truncation.py``) that have run before the sampler, so it only draws.

Sampling uses the exponential race (Gumbel-max in disguise): ``argmax(p / E)`` with
``E ~ Exp(1)`` i.i.d. draws a token with probability ``p``. It needs no sort and no cumulative
sum, and each seeded row draws its noise from its own generator, so a seeded request samples the
same tokens whatever batch it is in.
"""

from __future__ import annotations

import torch

from framework.sampling import SamplerOutput, SamplingBatch


class BasicSampler:
    """Greedy or random draws for a whole batch; logprobs under the unprocessed model."""

    def sample(self, batch: SamplingBatch, logits: torch.Tensor) -> SamplerOutput:
        model = batch.model_logits if batch.model_logits is not None else logits
        logprobs_all = model.log_softmax(dim=-1)  # [S, V] under the unmodified model distribution
        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            probs = logits.softmax(dim=-1)
            noise = torch.empty_like(probs)
            shared_rows = [i for i, g in enumerate(batch.generators) if g is None]
            if shared_rows:
                noise[shared_rows] = torch.empty(len(shared_rows), probs.shape[1]).exponential_(generator=batch.engine_generator).to(noise.device)
            for i, g in enumerate(batch.generators):
                if g is not None:
                    noise[i] = torch.empty(probs.shape[1]).exponential_(generator=g).to(noise.device)
            tokens = (probs / noise).argmax(dim=-1)
            greedy = batch.greedy.to(logits.device)
            if bool(greedy.any()):
                tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
        chosen = logprobs_all.gather(1, tokens[:, None])[:, 0]
        out = SamplerOutput(tokens=tokens, logprobs=chosen)
        if batch.max_logprobs > 0:
            out.top_logprobs, out.top_ids = logprobs_all.topk(batch.max_logprobs, dim=-1)
        return out
