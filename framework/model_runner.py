"""Runs one model over a list of items: the flat-batch forward behind every pool of the engine.

The runner knows nothing of sequences or requests. An item is a piece of work on one block
table: compute ``tokens`` at cache positions ``start ...`` (their K/V are written to the table's
slots) and return the final hidden states of the positions asked for in ``outputs``. One call
batches every item of a step (decodes, prefill chunks, several draft tokens of one sequence to
verify), so asking for outputs at several positions of an item gives the logits of every draft
position in one forward::

    items = [ForwardItem(table, [t0], start=41, outputs=range(1)),          # a decode
             ForwardItem(table2, prompt[:64], start=0, outputs=range(0)),   # a prefill chunk
             ForwardItem(table3, [t, d1, d2, d3], start=90, outputs=range(4))]  # verify 3 drafts
    hidden = runner.forward(items)          # [1 + 0 + 4, H], in item order

:meth:`ModelRunner.forward_candidates` scores ``K`` alternative next tokens per row over a
cached prefix without writing anything to the cache (FUDGE, RAD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framework.kv_cache import KVCacheStorage
from framework.models.attention import AttentionMetadata
from framework.models.config import ModelConfig


@dataclass(slots=True)
class ForwardItem:
    """Compute ``tokens`` at cache positions ``start, start + 1, ...`` of ``table``.

    ``outputs``: positions (indexes into ``tokens``) whose final hidden states are returned.
    The item's queries attend to cache positions ``[0, start + len(tokens))``.
    """

    table: list[int]
    tokens: list[int]
    start: int
    outputs: range


@dataclass(slots=True)
class CandidateItem:
    """``K`` alternative tokens at cache position ``ctx_len`` after the cached prefix
    ``[0, ctx_len)`` of ``table``; each sees the prefix and itself, never its siblings."""

    table: list[int]
    ctx_len: int
    tokens: list[int]


class ModelRunner:
    """Builds flat inputs and attention metadata for a model and its KV storage."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, kv: KVCacheStorage, block_size: int, device: torch.device):
        self.model = model
        self.cfg = cfg
        self.kv = kv
        self.block_size = block_size
        self.device = device
        self.group = cfg.num_attention_heads // cfg.num_key_value_heads
        self._sliding_window = cfg.sliding_window

    @torch.inference_mode()
    def forward(self, items: list[ForwardItem], block_copies: list[tuple[int, int]] | None = None) -> torch.Tensor:
        """Run every item in one forward; returns ``[sum(len(item.outputs)), H]`` hidden states."""
        if block_copies:
            self.kv.copy_blocks(block_copies)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        q_lens: list[int] = []
        ctx_lens: list[int] = []
        tables: list[list[int]] = []
        out_rows: list[int] = []
        offset = 0
        for it in items:
            n = len(it.tokens)
            start, end = it.start, it.start + n
            table = it.table
            input_ids.extend(it.tokens)
            positions.extend(range(start, end))
            slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            q_lens.append(n)
            ctx_lens.append(end)
            tables.append(table)
            out_rows.extend(range(offset + it.outputs.start, offset + it.outputs.stop))
            offset += n
        meta = AttentionMetadata.build(q_lens, ctx_lens, tables, slot_mapping, self.group, bs, self._sliding_window).to(self.device)
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids_t, pos_t, self.kv.layers, meta)
        if len(out_rows) == hidden.shape[0]:
            return hidden
        return hidden.index_select(0, torch.tensor(out_rows, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def forward_candidates(self, items: list[CandidateItem]) -> torch.Tensor:
        """Hidden states ``[sum(K_i), H]`` of every candidate token (item order, then candidate
        order). Nothing is written to the cache."""
        k = len(items[0].tokens)
        if any(len(it.tokens) != k for it in items):  # ragged: one call per distinct K
            return torch.cat([self.forward_candidates([it]) for it in items])
        ids = torch.tensor([t for it in items for t in it.tokens], dtype=torch.long, device=self.device).view(len(items), k)
        return self.forward_candidate_rows([it.table for it in items], [it.ctx_len for it in items], ids)

    @torch.inference_mode()
    def forward_candidate_rows(self, tables: list[list[int]], ctx_lens: list[int], tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_candidates` for ``B`` rows of ``K`` candidates each given as one
        ``tokens [B, K]`` tensor: row ``b``'s candidates sit after the cached prefix
        ``[0, ctx_lens[b])`` of ``tables[b]``. Returns ``[B * K, H]`` (row-major); no per-candidate
        Python work, no device-to-host copy."""
        B, k = tokens.shape
        meta = AttentionMetadata.build_candidates(ctx_lens, tables, k, self.group, self.block_size, self._sliding_window).to(self.device)
        ids_t = tokens.reshape(-1).to(device=self.device, dtype=torch.long)
        pos_t = torch.tensor(ctx_lens, dtype=torch.long, device=self.device).repeat_interleave(k)
        return self.model(ids_t, pos_t, self.kv.layers, meta)
