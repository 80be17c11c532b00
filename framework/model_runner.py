"""Runs the model for one scheduled step: builds flat inputs, runs the forward, returns logits."""

from __future__ import annotations

import torch

from framework.kv_cache import KVCacheStorage
from framework.models.attention import AttentionMetadata
from framework.models.config import ModelConfig
from framework.scheduler import SchedulerOutput
from framework.sequence import Sequence


class ModelRunner:
    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, kv: KVCacheStorage, block_size: int, device: torch.device):
        self.model = model
        self.cfg = cfg
        self.kv = kv
        self.block_size = block_size
        self.device = device
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor | None]:
        """Compute the scheduled tokens. Returns the sequences whose next token is due (their
        computed tokens reached the end of their known tokens) and their logits ``[S, V]``."""
        self.kv.copy_blocks(sched.block_copies)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_lp: list[tuple[Sequence, int, int, int]] = []  # (seq, first row, first position, last position + 1)
        offset = 0
        for seq, n in sched.scheduled:
            start = seq.num_computed_tokens
            end = start + n
            plp = seq.request.prompt_logprobs
            if plp is not None and len(plp) < seq.num_prompt_tokens and start < seq.num_prompt_tokens - 1:
                prompt_lp.append((seq, offset, start, min(end, seq.num_prompt_tokens - 1)))
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            q_lens.append(n)
            ctx_lens.append(end)
            tables.append(table)
            offset += n
            if end == seq.num_tokens:
                sample_rows.append(offset - 1)
                sample_seqs.append(seq)
        meta = AttentionMetadata.build(
            q_lens, ctx_lens, tables, slot_mapping, self.group, bs, self.cfg.sliding_window
        ).to(self.device)
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids_t, pos_t, self.kv.layers, meta)
        for seq, row, first, last in prompt_lp:
            self._prompt_logprobs(seq, hidden[row : row + last - first], first)
        if not sample_rows:
            return [], None
        rows = hidden if len(sample_rows) == hidden.shape[0] else hidden[torch.tensor(sample_rows, device=self.device)]
        return sample_seqs, self.model.compute_logits(rows)

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, first: int) -> None:
        """Append the logprobs of prompt tokens ``first + 1 ...`` (predicted by the hidden states of
        positions ``first ...``) to the request's ``prompt_logprobs``, skipping any it already has
        (a recomputed sequence), with the request's top-N alternatives."""
        req = seq.request
        plp = req.prompt_logprobs
        assert plp is not None
        k = req.params.prompt_logprobs or 0
        lp = torch.log_softmax(self.model.compute_logits(hidden), dim=-1)
        targets = torch.tensor(seq.token_ids[first + 1 : first + 1 + hidden.shape[0]], device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
        top_v, top_i = (lp.topk(k, dim=-1) if k else (None, None))
        tl = targets.tolist()
        for r in range(hidden.shape[0]):
            if first + 1 + r != len(plp):
                continue  # already recorded before a preemption
            entry = {tl[r]: chosen[r]}
            if top_i is not None:
                for t, v in zip(top_i[r].tolist(), top_v[r].tolist()):
                    entry.setdefault(t, v)
            plp.append(entry)
