"""Beam search, step by step, with the exact semantics of Hugging Face transformers.

The engine runs a beam request's ``num_beams`` sequences in the continuous batch like any other
sequences; after each step that gives logits for all of them, :meth:`BeamSearch.step` picks the
next beams from the ``num_beams x V`` candidates, records finished hypotheses and says whether
the search is over. The engine then forks the chosen parents (their KV blocks are shared,
copy-on-write) and drops the others.

Semantics follow transformers' vectorised beam search (v4.50+): scores are sums of processed
log-probabilities; the top ``max(2, 1 + n_eos) * num_beams`` candidates are considered; a
candidate that ends (EOS, or the length limit) becomes a finished hypothesis only if it ranks
among the first ``num_beams`` candidates, scored ``sum_logprobs / generated_len ** length_penalty``;
``early_stopping`` True stops once ``num_beams`` hypotheses are finished, False stops when the best
running beam (scored at the current length) cannot beat the worst finished one, ``"never"``
scores it at the maximum length when ``length_penalty > 0``. The float32 tensor arithmetic
mirrors transformers' so scores and tie-breaks agree exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_NEG = -1.0e9


@dataclass(slots=True)
class Hypothesis:
    """A finished beam: its output tokens (EOS included), normalised score and log-probability sum."""

    token_ids: list[int]
    score: float
    sum_logprobs: float


@dataclass(slots=True)
class BeamChoice:
    """One beam for the next step: continue ``parent`` (a row of the step's input) with ``token``."""

    parent: int
    token: int
    score: float  # sum of processed log-probabilities so far


@dataclass
class BeamSearch:
    """The search state of one request."""

    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    prompt_len: int
    max_tokens: int
    eos_token_ids: frozenset[int]
    num_return_sequences: int = 1
    cur_len: int = field(init=False)
    running_scores: torch.Tensor = field(init=False)  # [nb] float32
    running_tokens: list[list[int]] = field(init=False)  # output tokens of each running beam
    finished_scores: torch.Tensor = field(init=False)  # [nb] float32 (-1e9 = empty slot)
    finished: list[Hypothesis | None] = field(init=False)
    is_finished: torch.Tensor = field(init=False)  # [nb] bool
    improvable: bool = field(init=False, default=True)
    done: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        nb = self.num_beams
        self.cur_len = self.prompt_len
        self.max_length = self.prompt_len + self.max_tokens
        self.running_scores = torch.zeros(nb, dtype=torch.float32)
        self.running_scores[1:] = _NEG  # all beams start as copies of the prompt; only one counts
        self.running_tokens = [[] for _ in range(nb)]
        self.finished_scores = torch.full((nb,), _NEG, dtype=torch.float32)
        self.finished = [None] * nb
        self.is_finished = torch.zeros(nb, dtype=torch.bool)
        self.beams_to_keep = max(2, 1 + len(self.eos_token_ids)) * nb
        self._eos = torch.tensor(sorted(self.eos_token_ids), dtype=torch.int64)

    @property
    def started(self) -> bool:
        return self.cur_len > self.prompt_len

    def step(self, logprobs: torch.Tensor) -> list[BeamChoice]:
        """Advance by one token. ``logprobs``: ``[R, V]`` processed log-probabilities of the running
        beams in order (``R == 1`` on the first step: the prompt). Returns the next running beams
        (``num_beams`` of them) unless the search is over (then ``[]``, and :attr:`done` is set)."""
        nb = self.num_beams
        logprobs = logprobs.float().cpu()
        if logprobs.shape[0] != nb:
            assert not self.started and logprobs.shape[0] == 1
            logprobs = logprobs.expand(nb, -1)
        V = logprobs.shape[1]
        acc = (logprobs + self.running_scores[:, None]).reshape(-1)  # [nb * V]
        top_lp, top_idx = torch.topk(acc, k=self.beams_to_keep)
        parents = top_idx // V
        tokens = top_idx % V
        hits = torch.isin(tokens, self._eos) if self._eos.numel() else torch.zeros_like(tokens, dtype=torch.bool)
        if self.cur_len + 1 >= self.max_length:
            hits = torch.ones_like(hits)

        # the best unfinished candidates continue
        run_lp = top_lp + hits.to(torch.float32) * _NEG
        nxt = torch.topk(run_lp, k=nb)[1]
        new_scores = run_lp[nxt]

        # candidates that finished among the first num_beams join the hypotheses if they rank
        top_mask = torch.zeros(self.beams_to_keep, dtype=torch.bool)
        top_mask[:nb] = True
        just_done = hits & top_mask
        cand = top_lp / ((self.cur_len + 1 - self.prompt_len) ** self.length_penalty)
        full = bool(self.is_finished.all()) and self.early_stopping is True
        cand = cand + float(full) * _NEG
        cand = cand + float(not self.improvable) * _NEG
        cand = cand + (~just_done) * _NEG
        merged_scores = torch.cat((self.finished_scores, cand))
        merged_done = torch.cat((self.is_finished, just_done))
        keep = torch.topk(merged_scores, k=nb)[1]
        new_finished: list[Hypothesis | None] = []
        for j in keep.tolist():
            if j < nb:
                new_finished.append(self.finished[j])
            else:
                c = j - nb
                if bool(merged_done[j]):
                    p, t = int(parents[c]), int(tokens[c])
                    new_finished.append(Hypothesis(self.running_tokens[p] + [t], float(merged_scores[j]), float(top_lp[c])))
                else:
                    new_finished.append(None)
        self.finished_scores = merged_scores[keep]
        self.is_finished = merged_done[keep]
        self.finished = new_finished

        choices = [BeamChoice(int(parents[c]), int(tokens[c]), float(new_scores[i])) for i, c in enumerate(nxt.tolist())]
        self.running_tokens = [self.running_tokens[ch.parent] + [ch.token] for ch in choices]
        self.running_scores = new_scores.clone()
        self.cur_len += 1

        # can a running beam still beat the worst finished hypothesis?
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.max_length - self.prompt_len
        else:
            best_len = self.cur_len - self.prompt_len
        best_possible = self.running_scores[:1] / (best_len**self.length_penalty)
        worst = torch.where(self.is_finished, torch.min(self.finished_scores), torch.tensor(_NEG))
        self.improvable = self.improvable and bool(torch.any(best_possible > worst))
        open_beam = not (bool(self.is_finished.all()) and self.early_stopping is True)
        can_continue = not bool(hits.all())
        if not (self.improvable and open_beam and can_continue):
            self.done = True
            return []
        return choices

    def results(self) -> list[Hypothesis]:
        """The best hypotheses, best first (``num_return_sequences`` of them)."""
        out = [h for h in self.finished[: self.num_return_sequences] if h is not None]
        return out
