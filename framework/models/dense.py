"""A plain, trainable Llama decoder body with Hugging Face parameter names.

The serving model (:mod:`framework.models.llama`) fuses and transposes weights and attends
through the paged KV cache. This module is the straightforward counterpart, used where a batch of
whole sequences is processed at once:

* ``tools/train_demo.py`` trains the bundled demo models with it (``state_dict()`` keys are the
  checkpoint's tensor names, so saving is one ``save_file`` call);
* the prefix scorers (:mod:`framework.models.scorer`) run on it, with a small per-row KV cache
  so candidates can be scored after a prefix without recomputing the prefix.

Supported: the plain Llama layout (no biases, no q/k norm, no sliding window), GQA, default /
linear / llama3 RoPE. Layouts beyond that are rejected by :func:`check_supported`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import ModelLoadError
from framework.models.config import ModelConfig
from framework.models.llama import rope_inv_freq, rotate_half

__all__ = ["DenseLlamaModel", "KVCache", "check_supported"]


def check_supported(cfg: ModelConfig, source: str = "config.json") -> None:
    """Raise :class:`ModelLoadError` for config features the dense body does not implement."""
    unsupported = [
        name
        for name, on in (
            ("attention_bias", cfg.attention_bias),
            ("mlp_bias", cfg.mlp_bias),
            ("q/k norm (qwen3)", cfg.qk_norm),
            ("sliding_window", cfg.sliding_window is not None),
        )
        if on
    ]
    if unsupported:
        raise ModelLoadError(f"{source}: not supported by the dense Llama body: {', '.join(unsupported)}")


@dataclass(slots=True)
class KVCache:
    """Keys and values of every layer for a right-padded batch of prefixes.

    ``k[i]``/``v[i]``: ``[B, n_kv, capacity, head_dim]``; row ``b`` holds ``lengths[b]`` valid
    positions, the rest is padding that is masked out.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    lengths: torch.Tensor  # [B] long

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def ensure_capacity(self, n: int) -> None:
        """Grow every layer's buffers (doubling) so ``n`` positions fit."""
        if n <= self.capacity:
            return
        new = max(n, 2 * self.capacity)
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                grown = t.new_zeros(t.shape[0], t.shape[1], new, t.shape[3])
                grown[:, :, : t.shape[2]] = t
                buf[i] = grown

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A cache holding only ``rows`` (e.g. to fork or drop sequences)."""
        return KVCache([t[rows] for t in self.k], [t[rows] for t in self.v], self.lengths[rows].clone())


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale after casting back, as transformers does for half precision.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj = nn.Linear(H, nh * hd, bias=False)
        self.k_proj = nn.Linear(H, nkv * hd, bias=False)
        self.v_proj = nn.Linear(H, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, H, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, H]
        cos: torch.Tensor,  # [B, T, hd] (or broadcastable)
        sin: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,  # [B, n_kv, P, hd] each
        mask: torch.Tensor | None,  # [B, 1, T, P + T] bool, True = attend; None = causal
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # out [B, T, H], new k, v [B, n_kv, T, hd]
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        keys, values = (k, v) if past is None else (torch.cat((past[0], k), 2), torch.cat((past[1], v), 2))
        if self.nkv != self.nh:
            rep = self.nh // self.nkv
            keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.hd)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, past, mask):
        a, k, v = self.self_attn(self.input_layernorm(h), cos, sin, past, mask)
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h)), k, v


class DenseLlamaModel(nn.Module):
    """Embedding, decoder layers, final norm: ``input_ids [B, T] -> hidden [B, T, H]``.

    Parameter names match a Hugging Face checkpoint's ``model.*`` tensors when this module is
    held as ``.model`` by its owner (the owner adds ``lm_head`` or a scoring head).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_supported(cfg)
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # A plain attribute, not a buffer: it must stay float32 when the module is cast to bf16.
        self._inv_freq = rope_inv_freq(cfg)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[..., hd]`` for integer ``positions`` (computed in fp32, then cast)."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions.to(torch.float32)[..., None] * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor | None = None,  # [B, T] or [T]; default 0..T-1
        past: KVCache | None = None,
        mask: torch.Tensor | None = None,  # [B, 1, T, P + T] bool; None = plain causal (no past)
        return_kv: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Final-normed hidden states, and (if ``return_kv``) each layer's new keys/values."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)
        if positions.dim() == 1:
            positions = positions[None]  # [1, T], shared by every row
        if past is not None and mask is None:
            raise ValueError("a mask is required when attending to a past cache")
        h = self.embed_tokens(input_ids)
        cos, sin = self.rope(positions, h.dtype)
        new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            layer_past = None if past is None else (past.k[i], past.v[i])
            h, k, v = layer(h, cos, sin, layer_past, mask)
            if return_kv:
                new_kv.append((k, v))
        return self.norm(h), (new_kv if return_kv else None)
