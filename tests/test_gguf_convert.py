"""benchmarks/gguf_convert.py + benchmarks/llama_cpp_batch.py against transformers.

The throughput benchmark's llama.cpp column is only a fair reference if llama.cpp runs the same
network: on an f32 conversion of a small random checkpoint (Llama, and Qwen2 with q/k/v biases
and tied embeddings), llama.cpp's greedy tokens must equal HF ``generate``'s, for several
sequences decoded together in one context. Q8_0 is checked against its definition (blocks of 32
weights, one scale each, error at most half a quantization step) and by the logits it gives.
Skipped without llama-cpp-python / gguf (the benchmark extra); slow-marked (~10 s in all):
``pytest -m slow tests/test_gguf_convert.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gguf_convert import convert  # noqa: E402
from llama_cpp_batch import LlamaCppBatch  # noqa: E402

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
ARCHS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False)),
}


def _checkpoint(tmp_path: Path, arch: str) -> tuple[Path, torch.nn.Module]:
    cfg_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(7)
    model = model_cls(cfg_cls(**COMMON, **extra)).float().eval()
    if arch == "qwen2":  # HF initialises biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(tmp_path / arch, safe_serialization=True)
    return tmp_path / arch, model


def _hf_greedy(model: torch.nn.Module, prompts: list[list[int]], n: int) -> list[list[int]]:
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
            outs.append(out[0, len(p):].tolist())
    return outs


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_llama_cpp_greedy_equals_hf_f32(tmp_path: Path, arch: str) -> None:
    src, model = _checkpoint(tmp_path, arch)
    if arch == "qwen2":
        from safetensors.torch import load_file

        assert "lm_head.weight" not in load_file(str(src / "model.safetensors"))  # tied
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, COMMON["vocab_size"], (k,), generator=g).tolist() for k in (9, 17, 5)]
    n = 20
    want = _hf_greedy(model, prompts, n)
    gguf_path = convert(src, tmp_path / f"{arch}.gguf", "float32")
    import llama_cpp

    with LlamaCppBatch(gguf_path, n_seq=len(prompts), n_ctx_seq=64, threads=1, n_batch=16, kv_type="f32") as lc:
        _, _, got = lc.generate(prompts, n)  # three sequences together, prompt pass over two batches
        _, _, alone = lc.generate(prompts[1:2], n)
        # logits of the last step (position len + n - 2): tokens can agree while the rope base is off
        ptr = llama_cpp.llama_get_logits_ith(lc.ctx, 0)
        lc_logits = np.ctypeslib.as_array(ptr, shape=(lc.n_vocab,)).copy()
    assert got == want
    assert alone == want[1:2]
    with torch.inference_mode():
        hf_logits = model(torch.tensor([prompts[1] + want[1][:-1]])).logits[0, -1].numpy()
    assert np.abs(lc_logits - hf_logits).max() < 1e-3 * np.abs(hf_logits).max()


def test_q8_0_blocks_and_logits(tmp_path: Path) -> None:
    import gguf

    src, model = _checkpoint(tmp_path, "qwen2")
    path = convert(src, tmp_path / "q8.gguf", "q8_0")
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    ref = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    t = tensors["blk.1.ffn_down.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    deq = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(ref.shape)
    step = np.abs(ref.reshape(-1, 32)).max(axis=1) / 127  # one scale per block of 32 weights
    err = np.abs(deq - ref).reshape(-1, 32)
    # half a step, plus the f16 rounding of the scale (relative 2^-11) times |q| <= 127
    assert (err <= step[:, None] * (0.5 + 127 / 2048) + 1e-8).all()
    assert err.max() > 0  # it is quantized

    # logits of the first generated position: Q8_0 close to HF f32 (not equal)
    import llama_cpp

    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, COMMON["vocab_size"], (12,), generator=g).tolist()
    with torch.inference_mode():
        want = model(torch.tensor([prompt])).logits[0, -1].numpy()
    with LlamaCppBatch(path, n_seq=1, n_ctx_seq=32, threads=1) as lc:
        lc.generate([prompt], 1)
        ptr = llama_cpp.llama_get_logits_ith(lc.ctx, len(prompt) - 1)
        got = np.ctypeslib.as_array(ptr, shape=(lc.n_vocab,)).copy()
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < rel < 0.05, rel
