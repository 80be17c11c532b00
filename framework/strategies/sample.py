"""The default strategy: sample one token per due sequence; ``n``/``best_of`` forks; jump-forward.

* **Forking**: a request with ``n > 1`` (or ``best_of``) runs one sequence through its prompt;
  when that sequence's first token is due it forks into ``num_samples`` sequences that share
  the prompt's KV blocks (copy-on-write) and sample their first tokens from the same logits.
* **Sampling**: every due row of every request goes through the processor chain and the
  sampler together (one batched call), then each sequence appends its token.
* **Jump-forward**: where a processor alone decides the next tokens (a grammar that allows
  exactly one token), they are appended without a forward pass choosing them — only tokens the
  grammar forces one at a time, never a re-tokenization — and computed next step as one chunk.
  Skipped for requests that want logprobs (forced tokens have none).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

from framework.strategies import DueRows

if TYPE_CHECKING:  # pragma: no cover
    from framework.engine_core import EngineCore
    from framework.sampling_params import SamplingParams
    from framework.sequence import Request, Sequence

JUMP_LIMIT = 32  # most forced tokens appended after one sampled token


class SampleStrategy:
    """Plain sampling (greedy when ``temperature == 0``)."""

    name = "sample"
    streams = True

    def __init__(self, core: "EngineCore"):
        self.core = core
        self.jump_forward = True  # benchmarks switch it off to measure its effect

    def claims(self, params: "SamplingParams") -> bool:
        return not params.use_beam_search

    def prepare(self, request: "Request") -> None:
        if request.params.num_samples == 1:
            request.forked = True  # nothing to fork: its one sequence is the output

    def on_ready(self, request: "Request", now: float) -> None:
        """Tokens a grammar forces before the first choice join the prompt's prefill."""
        p = request.params
        if p.num_samples != 1 or p.logprobs is not None or not self.jump_forward or not request.processors:
            return
        seq = request.seqs[0]
        self.core.chain.admit(seq)
        tokens, _ = self.core.chain.forced_tokens(seq, min(JUMP_LIMIT, p.max_tokens))
        if tokens:
            self.core.extend(seq, tokens, now)

    # -- per step --------------------------------------------------------------------------
    def after_forward(self, rows: DueRows, now: float) -> Iterable["Request"]:
        core = self.core
        seqs, logits = self._fork_for_n(rows.seqs, rows.logits)
        out = core.sample(seqs, logits)
        core.append_sampled(seqs, out, now)
        if self.jump_forward:
            forcing = core.chain.forcing
            for seq in seqs:
                if not seq.finished and seq.request.processors and any(u.name in forcing for u in seq.request.processors):
                    self.jump(seq, now)
        return {id(s.request): s.request for s in seqs}.values()

    def _fork_for_n(self, due: list["Sequence"], logits: torch.Tensor) -> tuple[list["Sequence"], torch.Tensor]:
        """A sequence whose request wants ``n > 1`` samples forks once its prompt is computed."""
        if all(s.request.forked for s in due):
            return due, logits
        rows: list[int] = []
        new_due: list["Sequence"] = []
        for i, seq in enumerate(due):
            req = seq.request
            rows.append(i)
            new_due.append(seq)
            if req.forked:
                continue
            req.forked = True
            self.core.chain.admit(seq)  # so the forks copy its processor state instead of rebuilding it
            for idx in range(1, req.params.num_samples):
                new_due.append(self.core.fork(seq, idx))
                rows.append(i)
        return new_due, logits.index_select(0, torch.tensor(rows, device=logits.device))

    # -- jump-forward ----------------------------------------------------------------------
    def jump(self, seq: "Sequence", now: float) -> None:
        """Append the tokens ``seq``'s processors force from here (they learn them through
        ``extend``); finish it if they say it must end (a complete grammar with no EOS)."""
        core = self.core
        p = seq.request.params
        tokens, end = core.chain.forced_tokens(seq, min(JUMP_LIMIT, p.max_tokens - seq.num_output_tokens))
        if end:
            core.finish_now(seq, "stop")
            return
        if not tokens or p.logprobs is not None:
            return
        core.extend(seq, tokens, now)
