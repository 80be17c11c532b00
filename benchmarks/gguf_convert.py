"""Write a benchmark checkpoint (HF safetensors, Llama or Qwen2 architecture) as GGUF for llama.cpp.

Only what ``benchmarks/throughput.py`` needs: the ``llama`` and ``qwen2`` architectures, f32, bf16
or Q8_0 matrices (norms and biases stay f32), a placeholder vocabulary of ``vocab_size`` tokens
(prompts are token ids). For ``llama``, q/k projections are permuted from Hugging Face's
rotate-half rope layout to GGML's interleaved one, as llama.cpp's own converter does; ``qwen2``
uses llama.cpp's NEOX (rotate-half) rope, so its q/k stay as they are, and its q/k/v biases are
written. Tied embeddings are written once (``token_embd``; llama.cpp's qwen2 reuses it as the
output head). Q8_0 is what llama.cpp's converter writes for ``--outtype q8_0``: every matrix in
blocks of 32 weights with one f16 scale (``gguf.quants``). ``tests/test_gguf_convert.py``
checks that llama.cpp's greedy output on an f32 conversion equals transformers'.

    python benchmarks/gguf_convert.py CHECKPOINT_DIR OUT.gguf --dtype q8_0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

DTYPES = ("float32", "bfloat16", "q8_0")
ARCHITECTURES = ("llama", "qwen2")


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def convert(src: Path, dst: Path, dtype: str) -> Path:
    """Convert the checkpoint directory ``src`` to the GGUF file ``dst``; ``dtype`` is one of
    ``float32``, ``bfloat16`` or ``q8_0`` (the matrices; norms and biases are always f32)."""
    import gguf
    from safetensors.torch import load_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    cfg = json.loads((Path(src) / "config.json").read_text())
    arch = cfg.get("model_type")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{src}: model_type {arch!r} is not converted (only {', '.join(ARCHITECTURES)})")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    H, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    V = cfg["vocab_size"]
    w = gguf.GGUFWriter(str(dst), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_dimension_count(cfg.get("head_dim") or H // nh)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}  # transformers >= 5 nests rope_theta here
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{src}: rope_type {rope.get('rope_type')!r} is not converted (only 'default')")
    w.add_rope_freq_base(float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))))
    w.add_file_type({
        "float32": gguf.LlamaFileType.ALL_F32,
        "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype])
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

    def put(name: str, t: torch.Tensor, f32: bool = False) -> None:
        a = t.float().numpy().astype(np.float32)
        if f32 or dtype == "float32" or a.ndim != 2:
            w.add_tensor(name, a)
        elif dtype == "bfloat16":
            raw = t.float().bfloat16().view(torch.int16).numpy().view(np.uint16)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        elif a.shape[-1] % 32:  # q8_0 needs rows of whole blocks; llama.cpp's converter falls back to f16
            w.add_tensor(name, a.astype(np.float16))
        else:  # q8_0: byte array; the writer derives the element shape from it
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    qk = (lambda t, n: _permute(t, n)) if arch == "llama" else (lambda t, n: t)
    put("token_embd.weight", tensors["model.embed_tokens.weight"])
    put("output_norm.weight", tensors["model.norm.weight"], f32=True)
    if "lm_head.weight" in tensors:
        put("output.weight", tensors["lm_head.weight"])
    elif arch == "llama":  # tied: llama.cpp's llama also falls back to token_embd, but be explicit
        put("output.weight", tensors["model.embed_tokens.weight"])
    for i in range(L):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", tensors[p + "input_layernorm.weight"], f32=True)
        put(f"blk.{i}.ffn_norm.weight", tensors[p + "post_attention_layernorm.weight"], f32=True)
        put(f"blk.{i}.attn_q.weight", qk(tensors[p + "self_attn.q_proj.weight"], nh))
        put(f"blk.{i}.attn_k.weight", qk(tensors[p + "self_attn.k_proj.weight"], nkv))
        put(f"blk.{i}.attn_v.weight", tensors[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", tensors[p + "self_attn.o_proj.weight"])
        for proj, n in (("q", nh), ("k", nkv), ("v", None)):
            b = tensors.get(p + f"self_attn.{proj}_proj.bias")
            if b is not None:
                b = qk(b, n) if n is not None else b
                put(f"blk.{i}.attn_{proj}.bias", b, f32=True)
        if p + "self_attn.o_proj.bias" in tensors:
            raise ValueError(f"{src}: o_proj bias is not converted")
        put(f"blk.{i}.ffn_gate.weight", tensors[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", tensors[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", tensors[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(dst)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("dst", type=Path, help="GGUF file to write")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="matrix type (default float32)")
    args = p.parse_args(argv)
    convert(args.src, args.dst, args.dtype)
    print(f"written {args.dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
