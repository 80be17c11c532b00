"""Beam search as a decoding strategy (the search itself is :mod:`framework.beam_search`).

A beam request's ``num_beams`` sequences run in the continuous batch like any others. Each step
the strategy turns a beam's logits into processed log-probabilities (log-softmax, then the
request's processors, in Hugging Face's order) and parks them; once every running beam of the
request has its row for this length, :meth:`BeamSearch.step` picks the next beams, the chosen
parents are forked (KV blocks shared copy-on-write, processor state copied) and extended by
their token, and the old beams are dropped. Beams are detokenized once, when the search ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import torch

from framework.beam_search import BeamSearch
from framework.sequence import Sequence, SeqStatus
from framework.strategies import DueRows

if TYPE_CHECKING:  # pragma: no cover
    from framework.engine_core import EngineCore
    from framework.sampling_params import SamplingParams
    from framework.sequence import Request


@dataclass(slots=True)
class BeamState:
    search: BeamSearch
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> processed logprobs [V]


class BeamSearchStrategy:
    """``num_beams > 1``: outputs and scores identical to transformers' ``generate(num_beams=...)``."""

    name = "beam_search"
    streams = False

    def __init__(self, core: "EngineCore"):
        self.core = core

    def claims(self, params: "SamplingParams") -> bool:
        return params.use_beam_search

    def prepare(self, request: "Request") -> None:
        p = request.params
        core = self.core
        eos = (frozenset() if p.ignore_eos else core.eos_token_ids) | frozenset(p.stop_token_ids)
        n_prompt = len(request.prompt_token_ids)
        request.state = BeamState(BeamSearch(
            num_beams=p.num_beams, length_penalty=p.length_penalty, early_stopping=p.early_stopping,
            prompt_len=n_prompt, max_tokens=min(p.max_tokens, core.max_model_len - n_prompt), eos_token_ids=eos,
            num_return_sequences=p.num_return_sequences or 1,
        ))
        request.forked = True  # the search creates and drops beams itself
        request.seqs[0].detok = None  # beams are decoded once, when the search ends

    def on_preempt(self, seq: Sequence) -> None:
        seq.request.state.pending.pop(seq.seq_id, None)  # its logits come again when it is recomputed

    def after_forward(self, rows: DueRows, now: float) -> Iterable["Request"]:
        core = self.core
        logprobs = torch.log_softmax(rows.logits.float(), dim=-1)
        processed, _ = core.chain.apply(rows.seqs, logprobs)
        requests: dict[int, Request] = {}
        for i, seq in enumerate(rows.seqs):
            seq.request.state.pending[seq.seq_id] = processed[i].float().cpu()
            requests[id(seq.request)] = seq.request
        return [req for req in requests.values() if self._advance(req, now)]

    def _advance(self, req: "Request", now: float) -> bool:
        """Advance once every running beam has its log-probabilities for this length. Returns
        True when the request has something new to report (it finished)."""
        state: BeamState = req.state
        beams = list(req.seqs)
        if any(s.seq_id not in state.pending for s in beams):
            return False  # some beam is still computing (or was preempted): the others wait, parked
        rows = torch.stack([state.pending[s.seq_id] for s in beams])
        state.pending.clear()
        choices = state.search.step(rows)
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        core = self.core
        new: list[Sequence] = []
        for k, ch in enumerate(choices):
            child = core.fork(beams[ch.parent], k)
            core.chain.extend(child, [ch.token])
            child.token_ids.append(ch.token)
            child.cumulative_logprob = ch.score
            new.append(child)
        for s in beams:
            core.finish(s)
        if not state.search.done:
            req.seqs = new
            return False
        req.seqs = self._results(req)
        return True

    def _results(self, req: "Request") -> list[Sequence]:
        search = req.state.search
        stop_ids = set(req.params.stop_token_ids)
        tok = self.core.tokenizer
        done: list[Sequence] = []
        for k, h in enumerate(search.results()):
            last = h.token_ids[-1] if h.token_ids else None
            seq = Sequence(
                seq_id=self.core.new_seq_id(), request=req, index=k, token_ids=[*req.prompt_token_ids, *h.token_ids],
                num_prompt_tokens=len(req.prompt_token_ids), generator=None, status=SeqStatus.FINISHED,
                cumulative_logprob=h.sum_logprobs, score=h.score, kv=[],
            )
            seq.finish_reason = "stop" if last in search.eos_token_ids else "length"
            seq.stop_reason = last if last in stop_ids else None
            if tok is not None:
                seq.text = tok.decode(h.token_ids, skip_special_tokens=req.params.skip_special_tokens)
            done.append(seq)
        return done
