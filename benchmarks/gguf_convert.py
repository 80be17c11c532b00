"""Write a benchmark checkpoint (Llama architecture, HF safetensors) as GGUF for llama.cpp.

Only what ``benchmarks/throughput.py`` needs: the ``llama`` architecture, f32 or bf16 tensors
(norms stay f32), a placeholder vocabulary of ``vocab_size`` tokens (prompts are token ids).
q/k projections are permuted from Hugging Face's rotate-half rope layout to GGML's interleaved
one, as llama.cpp's own converter does; the script's agreement column checks the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert_llama(src: Path, dst: Path, dtype: str) -> Path:
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"{src}: only llama checkpoints are converted (got {cfg.get('model_type')!r})")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    H, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    V = cfg["vocab_size"]
    w = gguf.GGUFWriter(str(dst), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(H // nh)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if dtype == "bfloat16" else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(V)])
    w.add_token_scores([0.0] * V)
    types = [gguf.TokenType.NORMAL] * V
    for i in (0, 1, 2):
        types[i] = gguf.TokenType.CONTROL
    w.add_token_types(types)
    w.add_bos_token_id(cfg.get("bos_token_id", 1))
    w.add_eos_token_id(cfg.get("eos_token_id", 2))
    w.add_add_bos_token(False)

    def put(name: str, t: torch.Tensor, norm: bool = False) -> None:
        t = t.float()
        if norm or dtype == "float32":
            w.add_tensor(name, t.numpy().astype(np.float32))
        else:
            raw = t.bfloat16().view(torch.int16).numpy().view(np.uint16)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)

    put("token_embd.weight", tensors["model.embed_tokens.weight"])
    put("output_norm.weight", tensors["model.norm.weight"], norm=True)
    put("output.weight", tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]))
    for i in range(L):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", tensors[p + "input_layernorm.weight"], norm=True)
        put(f"blk.{i}.ffn_norm.weight", tensors[p + "post_attention_layernorm.weight"], norm=True)
        put(f"blk.{i}.attn_q.weight", _permute(tensors[p + "self_attn.q_proj.weight"], nh))
        put(f"blk.{i}.attn_k.weight", _permute(tensors[p + "self_attn.k_proj.weight"], nkv))
        put(f"blk.{i}.attn_v.weight", tensors[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", tensors[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_gate.weight", tensors[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", tensors[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", tensors[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
