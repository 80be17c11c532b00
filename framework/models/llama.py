"""Native PyTorch Llama family: llama (incl. llama3 rope scaling), mistral, qwen2, qwen3.

One implementation covers the family; the differences are config flags: q/k/v biases (qwen2),
per-head q/k RMSNorm (qwen3), sliding-window attention (mistral), tied embeddings, GQA.

Weights keep Hugging Face's ``[out, in]`` layout, with q/k/v and gate/up fused into one matrix
each. Projections go through a :class:`~framework.models.cpu_linear.LinearKernel`: on CPU
oneDNN's linear (on weights prepacked once for bfloat16), or weight-only int8
(:meth:`LlamaForCausalLM.quantize`); elsewhere ``F.linear``.

The same layers serve every use: :meth:`LlamaForCausalLM.forward` over the paged KV cache (the
engine, companions, paged prefix scorers) and :meth:`LlamaForCausalLM.forward_dense` over whole
batches with SDPA (training in ``tools/demo_training``, the standalone
:class:`~framework.models.scorer.PrefixScorer`); :meth:`hf_tensors` writes checkpoints back out.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from framework.errors import ModelLoadError
from framework.models.attention import AttentionMetadata, paged_attention
from framework.models.config import ModelConfig
from framework.models import native_gemv
from framework.models.cpu_linear import choose_kernel


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with linear or llama3 scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    rtype = rs.get("rope_type", rs.get("type"))
    factor = float(rs["factor"])
    if rtype == "linear":
        return inv_freq / factor
    # llama3 (Llama 3.1 report): long wavelengths are slowed by `factor`, short ones kept,
    # and the band in between interpolated smoothly.
    low_ff = float(rs.get("low_freq_factor", 1.0))
    high_ff = float(rs.get("high_freq_factor", 4.0))
    old_len = float(rs.get("original_max_position_embeddings", 8192))
    low_wavelen = old_len / low_ff
    high_wavelen = old_len / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaForCausalLM(nn.Module):
    """Llama-family decoder. ``forward`` takes the step's flat tokens and returns hidden states."""

    def __init__(
        self, cfg: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", lm_head: bool = True
    ):
        """``lm_head=False``: no output projection (a scorer body whose head lives elsewhere);
        tied embeddings keep theirs, since it is the embedding itself."""
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        H, L = cfg.hidden_size, cfg.num_hidden_layers
        nh, nkv, hd, inter = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
        self.q_size, self.kv_size = nh * hd, nkv * hd
        self.scale = hd**-0.5
        kw = dict(dtype=dtype, device=self.device)
        e = torch.empty
        self.embed = nn.Parameter(e(cfg.vocab_size, H, **kw), requires_grad=False)
        if cfg.tie_word_embeddings:
            self.lm_head = self.embed
        else:
            self.lm_head = nn.Parameter(e(cfg.vocab_size, H, **kw), requires_grad=False) if lm_head else None
        self.norm = nn.Parameter(e(H, **kw), requires_grad=False)
        self.layers = nn.ModuleList()
        for _ in range(L):
            layer = nn.Module()
            layer.in_norm = nn.Parameter(e(H, **kw), requires_grad=False)
            layer.post_norm = nn.Parameter(e(H, **kw), requires_grad=False)
            layer.qkv = nn.Parameter(e(self.q_size + 2 * self.kv_size, H, **kw), requires_grad=False)
            layer.qkv_b = nn.Parameter(e(self.q_size + 2 * self.kv_size, **kw), requires_grad=False) if cfg.attention_bias else None
            layer.o = nn.Parameter(e(H, self.q_size, **kw), requires_grad=False)
            # qwen2 has q/k/v biases only; llama/qwen3 with attention_bias also bias o_proj
            layer.o_b = nn.Parameter(e(H, **kw), requires_grad=False) if cfg.attention_bias and cfg.model_type != "qwen2" else None
            layer.q_norm = nn.Parameter(e(hd, **kw), requires_grad=False) if cfg.qk_norm else None
            layer.k_norm = nn.Parameter(e(hd, **kw), requires_grad=False) if cfg.qk_norm else None
            layer.gate_up = nn.Parameter(e(2 * inter, H, **kw), requires_grad=False)
            layer.down = nn.Parameter(e(H, inter, **kw), requires_grad=False)
            self.layers.append(layer)
        inv_freq = rope_inv_freq(cfg)
        self._inv_freq32 = inv_freq  # a plain attribute: stays float32 when the module is cast
        self._rope_len = 0
        self.register_buffer("inv_freq", inv_freq.to(self.device), persistent=False)
        self._ensure_rope(min(cfg.max_position_embeddings, 4096))
        # bf16/fp16 attention on CPU is several times slower than fp32: compute it in fp32 there.
        self.attn_dtype = torch.float32 if self.device.type == "cpu" and dtype != torch.float32 else None
        # projections: the fastest working kernel here (prepacked bf16 oneDNN, fp32 oneDNN, int8
        # weight-only after quantize(), F.linear elsewhere); see framework/models/cpu_linear.py
        self.linear = choose_kernel(dtype, self.device)
        self._native_rms = self.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and native_gemv.available(dtype)

    def quantize(self, mode: str | None) -> None:
        """Weight-only quantization of every projection and the output head (``'int8'``: one
        scale per output row, bfloat16 activations; ``None``: no-op). The float weights stay."""
        if mode is None:
            return
        self.linear = choose_kernel(self.dtype, self.device, mode)

    # ------------------------------------------------------------------------------ rope
    def _ensure_rope(self, n: int) -> None:
        if n <= self._rope_len:
            return
        n = max(n, 2 * self._rope_len)
        freqs = torch.outer(torch.arange(n, device=self.device, dtype=torch.float32), self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(self.dtype)  # [n, hd]
        self.sin = emb.sin().to(self.dtype)
        self._rope_len = n

    # ------------------------------------------------------------------------------ forward
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self._native_rms and x.dtype == w.dtype and x.shape[0] <= 16 and not torch.is_grad_enabled():
            return native_gemv.rms_norm(x, w, self.cfg.rms_norm_eps)  # a few rows: one C call
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, self.cfg.rms_norm_eps)
        # half precision: normalise in fp32, cast back, then scale (as transformers does)
        return w * F.rms_norm(x.float(), (x.shape[-1],), None, self.cfg.rms_norm_eps).to(x.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v): [slots, n_kv, hd]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, H] final-normed hidden states
        cfg = self.cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        T = input_ids.shape[0]
        self._ensure_rope(int(positions.max()) + 1)
        cos = self.cos[positions][:, None, :]  # [T, 1, hd]
        sin = self.sin[positions][:, None, :]
        h = F.embedding(input_ids, self.embed)
        linear = self.linear
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            q, k, v = self._qkv(layer, self._rms(h, layer.in_norm), cos, sin, linear)
            a = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale, self.attn_dtype)
            h = self._mlp(layer, h + linear(a, layer.o, layer.o_b), linear)
        return self._rms(h, self.norm)

    # ------------------------------------------------------------------------------ one layer
    def _qkv(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, linear) -> tuple[torch.Tensor, ...]:
        """Normed ``x [N, H]`` -> roped ``q [N, nh, hd]``, roped ``k [N, nkv, hd]``, ``v [N, nkv, hd]``."""
        cfg = self.cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        N = x.shape[0]
        qkv = linear(x, layer.qkv, layer.qkv_b)
        v = qkv[:, self.q_size + self.kv_size :].view(N, nkv, hd)
        if layer.q_norm is None:
            qk = qkv[:, : self.q_size + self.kv_size].view(N, nh + nkv, hd)
        else:
            q = self._rms(qkv[:, : self.q_size].view(N, nh, hd), layer.q_norm)
            k = self._rms(qkv[:, self.q_size : self.q_size + self.kv_size].view(N, nkv, hd), layer.k_norm)
            qk = torch.cat((q, k), dim=1)
        qk = qk * cos + rotate_half(qk) * sin  # rope on q and k heads at once
        q, k = qk.split((nh, nkv), dim=1)
        return q, k, v

    def _mlp(self, layer: nn.Module, h: torch.Tensor, linear) -> torch.Tensor:
        """The residual stream after the layer's SwiGLU block: ``h + mlp(norm(h))``."""
        g, u = linear(self._rms(h, layer.post_norm), layer.gate_up).chunk(2, dim=-1)
        return h + linear(F.silu(g) * u, layer.down)

    # ------------------------------------------------------------------------------ dense forward
    def forward_dense(
        self,
        input_ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor | None = None,  # [B, T] or [T]; default 0..T-1
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,  # per layer k, v [B, n_kv, P, hd]
        mask: torch.Tensor | None = None,  # [B, 1, T, P + T] bool, True = attend; None = causal, no past
        return_kv: bool = False,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """The same layers over a batch of whole sequences, attending with SDPA instead of the paged
        cache: final-normed hidden ``[B, T, H]`` and (``return_kv``) each layer's new keys/values
        ``[B, n_kv, T, hd]`` (roped). Differentiable when gradients are on (training uses it, after
        ``requires_grad_(True)``); prefix scorers run on it with their own small caches.
        """
        cfg = self.cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        B, T = input_ids.shape
        dev = input_ids.device
        if positions is None:
            positions = torch.arange(T, device=dev)
        positions = positions.expand(B, T) if positions.dim() == 1 else positions
        if past is not None and mask is None:
            raise ValueError("a mask is required when attending to a past cache")
        if mask is None and cfg.sliding_window is not None and T > cfg.sliding_window:
            i = torch.arange(T, device=dev)
            mask = ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < cfg.sliding_window))[None, None].expand(B, 1, T, T)
        h = F.embedding(input_ids, self.embed)
        if self._inv_freq32.device != dev:
            self._inv_freq32 = self._inv_freq32.to(dev)
        freqs = positions.reshape(-1).to(torch.float32)[:, None] * self._inv_freq32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [B*T, 1, hd]
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        # oneDNN's linear has no autograd: plain F.linear while training
        linear = F.linear if torch.is_grad_enabled() else self.linear
        h = h.reshape(B * T, -1)
        new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, self._rms(h, layer.in_norm), cos, sin, linear)
            q, k, v = (t.view(B, T, -1, hd).transpose(1, 2) for t in (q, k, v))  # [B, heads, T, hd]
            if return_kv:
                new_kv.append((k, v))
            keys, values = (k, v) if past is None else (torch.cat((past[i][0], k), 2), torch.cat((past[i][1], v), 2))
            if nkv != nh:
                keys, values = keys.repeat_interleave(nh // nkv, 1), values.repeat_interleave(nh // nkv, 1)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None, scale=self.scale)
            h = self._mlp(layer, h + linear(a.transpose(1, 2).reshape(B * T, nh * hd), layer.o, layer.o_b), linear)
        return self._rms(h, self.norm).view(B, T, -1), (new_kv if return_kv else None)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.embed.dtype

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, H] -> [N, V] float32
        return self.linear(hidden, self.lm_head).float()

    # ------------------------------------------------------------------------------ weights
    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Hugging Face tensor names this model needs, with their shapes."""
        cfg = self.cfg
        H, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        out: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (cfg.vocab_size, H),
            "model.norm.weight": (H,),
        }
        if not cfg.tie_word_embeddings and self.lm_head is not None:
            out["lm_head.weight"] = (cfg.vocab_size, H)
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (H,)
            out[p + "post_attention_layernorm.weight"] = (H,)
            out[p + "self_attn.q_proj.weight"] = (self.q_size, H)
            out[p + "self_attn.k_proj.weight"] = (self.kv_size, H)
            out[p + "self_attn.v_proj.weight"] = (self.kv_size, H)
            out[p + "self_attn.o_proj.weight"] = (H, self.q_size)
            if layer.qkv_b is not None:
                out[p + "self_attn.q_proj.bias"] = (self.q_size,)
                out[p + "self_attn.k_proj.bias"] = (self.kv_size,)
                out[p + "self_attn.v_proj.bias"] = (self.kv_size,)
            if layer.o_b is not None:
                out[p + "self_attn.o_proj.bias"] = (H,)
            if layer.q_norm is not None:
                out[p + "self_attn.q_norm.weight"] = (hd,)
                out[p + "self_attn.k_norm.weight"] = (hd,)
            out[p + "mlp.gate_proj.weight"] = (inter, H)
            out[p + "mlp.up_proj.weight"] = (inter, H)
            out[p + "mlp.down_proj.weight"] = (H, inter)
        return out

    def hf_tensors(self) -> dict[str, torch.Tensor]:
        """This model's weights under Hugging Face names and layouts (views of the fused
        tensors; the inverse of :meth:`load_weights`). A tied head is not listed separately."""
        q, kv, inter = self.q_size, self.kv_size, self.cfg.intermediate_size
        out = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        if not self.cfg.tie_word_embeddings and self.lm_head is not None:
            out["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            parts = {
                "input_layernorm.weight": layer.in_norm,
                "post_attention_layernorm.weight": layer.post_norm,
                "self_attn.q_proj.weight": layer.qkv[:q],
                "self_attn.k_proj.weight": layer.qkv[q : q + kv],
                "self_attn.v_proj.weight": layer.qkv[q + kv :],
                "self_attn.o_proj.weight": layer.o,
                "mlp.gate_proj.weight": layer.gate_up[:inter],
                "mlp.up_proj.weight": layer.gate_up[inter:],
                "mlp.down_proj.weight": layer.down,
            }
            if layer.qkv_b is not None:
                parts.update({"self_attn.q_proj.bias": layer.qkv_b[:q], "self_attn.k_proj.bias": layer.qkv_b[q : q + kv],
                              "self_attn.v_proj.bias": layer.qkv_b[q + kv :]})
            if layer.o_b is not None:
                parts["self_attn.o_proj.bias"] = layer.o_b
            if layer.q_norm is not None:
                parts.update({"self_attn.q_norm.weight": layer.q_norm, "self_attn.k_norm.weight": layer.k_norm})
            out.update({p + k: v for k, v in parts.items()})
        return out

    @torch.no_grad()
    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face tensors (name, tensor) into the fused, transposed layout.

        The loader has already checked names and shapes against :meth:`expected_tensors`.
        """
        q, kv = self.q_size, self.kv_size
        inter = self.cfg.intermediate_size
        for name, t in tensors:
            t = t.to(device=self.device, dtype=self.dtype)
            if name == "model.embed_tokens.weight":
                self.embed.copy_(t)
            elif name == "lm_head.weight" and self.lm_head is not None:
                self.lm_head.copy_(t)
            elif name == "model.norm.weight":
                self.norm.copy_(t)
            elif name.startswith("model.layers."):
                idx, rest = name[len("model.layers."):].split(".", 1)
                layer = self.layers[int(idx)]
                dst = {
                    "input_layernorm.weight": lambda: layer.in_norm,
                    "post_attention_layernorm.weight": lambda: layer.post_norm,
                    "self_attn.q_proj.weight": lambda: layer.qkv[:q],
                    "self_attn.k_proj.weight": lambda: layer.qkv[q : q + kv],
                    "self_attn.v_proj.weight": lambda: layer.qkv[q + kv :],
                    "self_attn.q_proj.bias": lambda: layer.qkv_b[:q],
                    "self_attn.k_proj.bias": lambda: layer.qkv_b[q : q + kv],
                    "self_attn.v_proj.bias": lambda: layer.qkv_b[q + kv :],
                    "self_attn.o_proj.weight": lambda: layer.o,
                    "self_attn.o_proj.bias": lambda: layer.o_b,
                    "self_attn.q_norm.weight": lambda: layer.q_norm,
                    "self_attn.k_norm.weight": lambda: layer.k_norm,
                    "mlp.gate_proj.weight": lambda: layer.gate_up[:inter],
                    "mlp.up_proj.weight": lambda: layer.gate_up[inter:],
                    "mlp.down_proj.weight": lambda: layer.down,
                }.get(rest)
                if dst is None:
                    raise ModelLoadError(f"unexpected tensor {name!r}")
                target = dst()
                target.copy_(t)
            else:
                raise ModelLoadError(f"unexpected tensor {name!r}")
