"""Paged attention over the block-structured KV cache, in plain PyTorch.

The forward pass works on a flat list of the step's new tokens ``[T]`` (decodes and prefill
chunks of many sequences mixed). Each token's K/V are written to its cache slot
(``slot_mapping``); attention then gathers every sequence's context from its slots into a padded
``[B, ctx]`` layout and runs one ``scaled_dot_product_attention`` for the whole batch.

GQA without repeating K/V: the ``g = n_heads / n_kv_heads`` query heads that share a KV head are
folded into the query-length axis, so queries are ``[B, n_kv, g * q, d]`` against keys
``[B, n_kv, ctx, d]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs about one step's batch (shared by all layers)."""

    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    ctx_slots: torch.Tensor  # [B * max_ctx] cache slot of each context position (padding -> 0)
    batch_size: int
    max_ctx: int
    max_q: int
    q_index: torch.Tensor | None  # [T] position of each token in the padded [B * max_q]; None if max_q == 1
    attn_mask: torch.Tensor | None  # [B, 1, g * max_q, max_ctx] bool, True = attend; None = attend all
    # candidate mode (build_candidates): B rows of `num_candidates` sibling queries each, which see
    # their row's cached prefix and themselves only; their K/V are never written to the cache
    num_candidates: int = 0

    @staticmethod
    def build(
        q_lens: list[int],
        ctx_lens: list[int],
        block_tables: list[list[int]],
        slot_mapping: list[int],
        group: int,
        block_size: int,
        sliding_window: int | None = None,
    ) -> "AttentionMetadata":
        """Build metadata from per-sequence query lengths (new tokens this step), context lengths
        (tokens in cache after this step, new ones included) and block tables."""
        B = len(q_lens)
        max_q = max(q_lens)
        max_ctx = max(ctx_lens)
        n_blocks = -(-max_ctx // block_size)
        bt = torch.tensor([t[:n_blocks] + [0] * (n_blocks - len(t[:n_blocks])) for t in block_tables], dtype=torch.long)
        # slot of every context position: block * block_size + offset; padding lands in block 0
        ctx_slots = (bt[:, :, None] * block_size + torch.arange(block_size)).view(B, -1)[:, :max_ctx].reshape(-1)
        uniform = max_q == 1 and min(ctx_lens) == max_ctx
        mask = None
        q_index = None
        if max_q > 1:
            q_index = torch.tensor(
                [i * max_q + j for i, ql in enumerate(q_lens) for j in range(ql)], dtype=torch.long
            )
        if not uniform or sliding_window is not None:
            qt = torch.tensor(q_lens)
            ct = torch.tensor(ctx_lens)
            j = torch.arange(max_q)
            q_pos = (ct - qt)[:, None] + j[None, :]  # [B, max_q] absolute position of each query
            k_pos = torch.arange(max_ctx)[None, None, :]
            m = k_pos <= q_pos[..., None]  # causal, and bounded by the sequence's own context
            if sliding_window is not None:
                m &= k_pos > (q_pos[..., None] - sliding_window)
            pad_q = j[None, :] >= qt[:, None]  # padded query rows: attend to slot 0 to avoid NaN
            m[..., 0] |= pad_q
            mask = m[:, None, None].expand(B, 1, group, max_q, max_ctx).reshape(B, 1, group * max_q, max_ctx)
        return AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long),
            ctx_slots=ctx_slots,
            batch_size=B,
            max_ctx=max_ctx,
            max_q=max_q,
            q_index=q_index,
            attn_mask=mask,
        )

    @staticmethod
    def build_candidates(
        ctx_lens: list[int],
        block_tables: list[list[int]],
        num_candidates: int,
        group: int,
        block_size: int,
        sliding_window: int | None = None,
    ) -> "AttentionMetadata":
        """Metadata for scoring ``num_candidates`` alternative next tokens per row: row ``b``'s
        candidates sit at cache position ``ctx_lens[b]`` and attend to ``[0, ctx_lens[b])`` and
        to themselves (not to each other). The query tokens are laid out row by row."""
        B, K = len(ctx_lens), num_candidates
        max_ctx = max(ctx_lens)
        n_blocks = -(-max_ctx // block_size)
        bt = torch.tensor([t[:n_blocks] + [0] * (n_blocks - len(t[:n_blocks])) for t in block_tables], dtype=torch.long)
        ctx_slots = (bt[:, :, None] * block_size + torch.arange(block_size)).view(B, -1)[:, :max_ctx].reshape(-1)
        ct = torch.tensor(ctx_lens)
        mask = None
        if min(ctx_lens) != max_ctx or sliding_window is not None:
            k_pos = torch.arange(max_ctx)[None, :]
            ctx_ok = k_pos < ct[:, None]  # [B, max_ctx]
            if sliding_window is not None:
                ctx_ok &= k_pos > (ct[:, None] - sliding_window)
            mask = ctx_ok[:, None, None, :]  # [B, 1, 1, max_ctx]: the prefix positions each row sees
        return AttentionMetadata(
            slot_mapping=torch.empty(0, dtype=torch.long), ctx_slots=ctx_slots, batch_size=B, max_ctx=max_ctx,
            max_q=K, q_index=None, attn_mask=mask, num_candidates=K,
        )

    def to(self, device: torch.device) -> "AttentionMetadata":
        if device.type == "cpu":
            return self
        return AttentionMetadata(
            self.slot_mapping.to(device, non_blocking=True),
            self.ctx_slots.to(device, non_blocking=True),
            self.batch_size,
            self.max_ctx,
            self.max_q,
            None if self.q_index is None else self.q_index.to(device, non_blocking=True),
            None if self.attn_mask is None else self.attn_mask.to(device, non_blocking=True),
            self.num_candidates,
        )


def paged_attention(
    q: torch.Tensor,  # [T, n_heads, d]
    k: torch.Tensor,  # [T, n_kv, d]
    v: torch.Tensor,  # [T, n_kv, d]
    k_cache: torch.Tensor,  # [num_slots, n_kv, d]
    v_cache: torch.Tensor,  # [num_slots, n_kv, d]
    meta: AttentionMetadata,
    scale: float,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:  # [T, n_heads * d]
    T, n_heads, d = q.shape
    n_kv = k.shape[1]
    g = n_heads // n_kv
    B, max_q = meta.batch_size, meta.max_q
    if meta.num_candidates:
        return _candidate_attention(q, k, v, k_cache, v_cache, meta, scale, compute_dtype)
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    # index_select on the flat slot list is far faster on CPU than advanced indexing
    K = k_cache.index_select(0, meta.ctx_slots).view(B, meta.max_ctx, n_kv, d).transpose(1, 2)  # [B, n_kv, ctx, d]
    V = v_cache.index_select(0, meta.ctx_slots).view(B, meta.max_ctx, n_kv, d).transpose(1, 2)
    if meta.q_index is None:
        qp = q.view(B, n_kv, g, d)  # q_len == 1: heads of a group are the query rows
    else:
        qp = q.new_zeros(B * max_q, n_heads, d)
        qp[meta.q_index] = q
        qp = qp.view(B, max_q, n_kv, g, d).permute(0, 2, 3, 1, 4).reshape(B, n_kv, g * max_q, d)
    if compute_dtype is not None and compute_dtype != q.dtype:
        out = F.scaled_dot_product_attention(
            qp.to(compute_dtype), K.to(compute_dtype), V.to(compute_dtype), attn_mask=meta.attn_mask, scale=scale
        ).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(qp, K, V, attn_mask=meta.attn_mask, scale=scale)
    if meta.q_index is None:
        return out.reshape(T, n_heads * d)
    out = out.view(B, n_kv, g, max_q, d).permute(0, 3, 1, 2, 4).reshape(B * max_q, n_heads * d)
    return out[meta.q_index]


def _candidate_attention(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, compute_dtype) -> torch.Tensor:
    """Candidate mode: ``K`` sibling queries per row over the row's cached prefix plus their own
    (uncached) key and value.

    Each row's prefix K/V is gathered once and shared by its ``K`` candidates (one
    ``[g * K, ctx]`` score matmul per row and KV head); the candidate's own key enters as one
    extra score ``q . k_self`` (no ``K x K`` block of masked-out siblings), joined to the prefix
    scores in one softmax: ``out = (sum_j e^{s_j} V_j + e^{s_self} v_self) / Z``."""
    T, n_heads, d = q.shape
    n_kv = k.shape[1]
    g = n_heads // n_kv
    B, K = meta.batch_size, meta.num_candidates
    dt = compute_dtype if compute_dtype is not None else q.dtype
    K_ctx = k_cache.index_select(0, meta.ctx_slots).view(B, meta.max_ctx, n_kv, d).transpose(1, 2).to(dt)  # [B, n_kv, ctx, d]
    V_ctx = v_cache.index_select(0, meta.ctx_slots).view(B, meta.max_ctx, n_kv, d).transpose(1, 2).to(dt)
    q5 = q.view(B, K, n_kv, g, d).to(dt)
    qp = q5.permute(0, 2, 3, 1, 4).reshape(B, n_kv, g * K, d)  # [B, n_kv, g*K, d]
    if meta.attn_mask is None:
        scores = torch.matmul(qp, K_ctx.transpose(-1, -2)).mul_(scale)  # [B, n_kv, g*K, ctx]
    else:  # the scaled scores plus 0 / -inf where a row's prefix ends, in one op
        bias = torch.zeros(meta.attn_mask.shape, dtype=dt, device=q.device).masked_fill_(~meta.attn_mask, float("-inf"))
        scores = torch.baddbmm(bias.expand(B, n_kv, 1, meta.max_ctx).reshape(B * n_kv, 1, meta.max_ctx),
                               qp.reshape(B * n_kv, g * K, d), K_ctx.transpose(-1, -2).reshape(B * n_kv, d, meta.max_ctx),
                               alpha=scale).view(B, n_kv, g * K, meta.max_ctx)
    k_own = k.view(B, K, n_kv, 1, d).to(dt)
    own = (q5 * k_own).sum(-1).mul_(scale).permute(0, 2, 3, 1).reshape(B, n_kv, g * K, 1)  # [B, n_kv, g*K, 1]
    m = torch.maximum(scores.amax(dim=-1, keepdim=True), own)
    p = scores.sub_(m).exp_()
    p_own = own.sub_(m).exp_()
    z = p.sum(dim=-1, keepdim=True).add_(p_own)
    v_own = v.view(B, K, n_kv, 1, d).to(dt).permute(0, 2, 3, 1, 4).expand(B, n_kv, g, K, d).reshape(B, n_kv, g * K, d)
    out = torch.matmul(p, V_ctx).addcmul_(p_own, v_own).div_(z)  # [B, n_kv, g*K, d]
    return out.to(q.dtype).view(B, n_kv, g, K, d).permute(0, 3, 1, 2, 4).reshape(T, n_heads * d)
