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
        offset = 0
        for seq, n in sched.scheduled:
            start = seq.num_computed_tokens
            end = start + n
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
        if not sample_rows:
            return [], None
        rows = hidden if len(sample_rows) == hidden.shape[0] else hidden[torch.tensor(sample_rows, device=self.device)]
        return sample_seqs, self.model.compute_logits(rows)
