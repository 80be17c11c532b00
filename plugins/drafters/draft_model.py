"""The ``draft_model`` drafter: a small language model of the same vocabulary proposes tokens.

The draft model (``demo-draft`` by default, or any registered name, spec ``models:`` alias or
directory) runs as a *driven* companion (``setup.models.get(model, lockstep=False)``): every
request's sequences hold blocks in its own paged KV pool, which this drafter advances with
``Companion.extend`` and cuts back with ``Companion.truncate`` when the target rejects drafts.
Preemption and the end of a sequence free those blocks with the target's.

Per step, for the sequences asked: one forward catches the draft's KV up with the tokens the
target accepted since (the whole prompt the first time) and gives the distribution of the first
draft position; then one forward per further draft token, all batched across sequences. Greedy
requests draft the argmax; sampled requests draw from ``q = softmax(logits / temperature)``
(the request's temperature) and report ``q`` so the verifier can accept exactly. A seeded
request draws with its generator keyed by (seed, position) — the very noise the target's sampler
uses for that token — so its drafts are coupled to the target's own draws.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from framework.drafting import DraftProposal

if TYPE_CHECKING:  # pragma: no cover
    from framework.sampling_params import SamplingParams
    from framework.sequence import Sequence


class DraftModelDrafter:
    """Drafts with a small model that reads the target's tokens."""

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        __shorthand__ = "model"

        model: str = Field("demo-draft", description="draft model: registered name, models: alias or directory")
        num_tokens: int = Field(4, ge=1, le=64, description="draft tokens per step (the start value when adaptive)")
        adaptive: bool = Field(False, description="grow num_tokens by one when a draft is accepted whole, shrink by one otherwise")
        max_num_tokens: int = Field(8, ge=1, le=64, description="upper bound of the adaptive num_tokens")

    def __init__(self, setup: Any, params: "DraftModelDrafter.Params | None" = None):
        params = params or self.Params()
        if setup.models is None:
            raise ValueError("draft_model needs an engine (companion models)")
        self.params = params
        self.num_tokens = params.num_tokens
        self.adaptive = params.adaptive
        self.max_num_tokens = max(params.max_num_tokens, params.num_tokens)
        self.draft = setup.models.get(params.model, lockstep=False)
        if self.draft.kind != "lm":
            raise ValueError(f"draft model {params.model!r} is a scorer, not a language model")
        self.generator = torch.Generator().manual_seed(0x5EED)
        self._base: dict[int, int] = {}  # seq_id -> its length when the last draft was proposed
        self.num_forwards = 0

    def companions(self, params: "SamplingParams") -> list[Any]:
        """Every request holds blocks in the draft model's pool."""
        return [self.draft]

    # -- proposing ---------------------------------------------------------------------------
    def propose(self, seqs: list["Sequence"], num_tokens: list[int]) -> list[DraftProposal]:
        draft = self.draft
        pending: list[list[int]] = []
        for seq in seqs:
            done = draft.num_computed(seq)
            if done >= seq.num_tokens:  # never happens after accepted(); keep one token to feed
                draft.truncate(seq, seq.num_tokens - 1)
                done = seq.num_tokens - 1
            pending.append(seq.token_ids[done:])
        logits = draft.extend(seqs, pending)
        if logits is None:  # the draft pool is full: no drafts this step
            return [DraftProposal([]) for _ in seqs]
        self.num_forwards += 1
        out_tokens: list[list[int]] = [[] for _ in seqs]
        out_probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        live = list(range(len(seqs)))
        temps = torch.tensor([s.request.params.temperature for s in seqs], dtype=torch.float32)
        for t in range(max(num_tokens)):
            temp = temps[live].to(logits.device)
            greedy = temp == 0
            scaled = logits.float() / torch.where(greedy, torch.ones_like(temp), temp)[:, None]
            q = scaled.softmax(dim=-1)
            noise = torch.empty_like(q)
            for r, i in enumerate(live):
                # a seeded row draws the noise the target's sampler will draw for this position
                # (coupled draws: the draft agrees wherever q and p pick the same token)
                g = seqs[i].generator_at(seqs[i].num_tokens + t) or self.generator
                noise[r] = torch.empty(q.shape[1]).exponential_(generator=g).to(q.device)
            toks = torch.where(greedy, q.argmax(dim=-1), (q / noise).argmax(dim=-1)).tolist()
            nxt = []
            for r, i in enumerate(live):
                out_tokens[i].append(int(toks[r]))
                out_probs[i].append(q[r])
                if len(out_tokens[i]) < num_tokens[i]:
                    nxt.append(r)
            if not nxt:
                break
            live_next = [live[r] for r in nxt]
            logits = draft.extend([seqs[i] for i in live_next], [[out_tokens[i][-1]] for i in live_next])
            if logits is None:
                break
            self.num_forwards += 1
            live = live_next
        for seq in seqs:
            self._base[seq.seq_id] = seq.num_tokens
        return [DraftProposal(toks, torch.stack(pr) if pr else None) for toks, pr in zip(out_tokens, out_probs)]

    def accepted(self, seq: "Sequence", num_accepted: int) -> None:
        """Cut the draft's KV back to the tokens the target kept."""
        base = self._base.pop(seq.seq_id, None)
        if base is not None:
            self.draft.truncate(seq, base + num_accepted)

    def release(self, seq: "Sequence") -> None:
        """The sequence left (finished, preempted): its draft blocks go with the target's."""
        self._base.pop(seq.seq_id, None)

    def stats(self) -> dict[str, int]:
        return {"spec_draft_forwards": self.num_forwards}
