"""CPU kernels behind the model's projections and norms, checked against F.linear / F.rms_norm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from framework.models import native_gemv
from framework.models.cpu_linear import LinearKernel, choose_kernel, kernel_works, quantize_int8

needs_native = pytest.mark.skipif(not native_gemv.available(), reason="no AVX-512 compiler/CPU here")


@needs_native
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("n,k,m", [(1, 256, 768), (3, 100, 17), (4, 37, 5), (8, 1376, 512), (16, 64, 33)])
def test_native_gemv_matches_float64_reference(dtype, tol, n, k, m):
    if not native_gemv.available(dtype):
        pytest.skip(f"no native {dtype} kernel on this CPU")
    g = torch.Generator().manual_seed(n * 1000 + k)
    x, w, b = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(m, generator=g)
    xd, wd, bd = x.to(dtype), w.to(dtype), b.to(dtype)
    got = native_gemv.gemv(xd, wd, bd).double()
    ref = F.linear(xd.double(), wd.double(), bd.double())
    assert got.shape == (n, m)
    # float32: accumulation-order error only; bf16: one final rounding to bf16 (2^-8 relative)
    assert torch.allclose(got, ref, atol=tol * k**0.5, rtol=tol)
    no_bias = native_gemv.gemv(xd, wd).double()
    assert torch.allclose(no_bias, F.linear(xd.double(), wd.double()), atol=tol * k**0.5, rtol=tol)


@needs_native
def test_native_gemv_non_contiguous_input():
    x = torch.randn(6, 64)[::2]  # stride 2 rows
    w = torch.randn(10, 64)
    assert torch.allclose(native_gemv.gemv(x, w), F.linear(x, w), atol=1e-5)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rms_norm_matches_transformers_formula(dtype):
    if not native_gemv.available(dtype):
        pytest.skip(f"no native {dtype} kernel on this CPU")
    x = torch.randn(5, 896).to(dtype)
    w = (torch.rand(896) + 0.5).to(dtype)
    got = native_gemv.rms_norm(x, w, 1e-6)
    if dtype == torch.float32:
        want = F.rms_norm(x, (896,), w, 1e-6)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    else:  # transformers: normalise in fp32, cast, scale in bf16
        want = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        assert (got.float() - want.float()).abs().max() <= 2 ** -7 * want.float().abs().max()


def test_packed_bf16_is_bit_identical_and_tracks_in_place_updates():
    if not kernel_works("onednn-packed", torch.bfloat16):
        pytest.skip("no bf16 oneDNN here")
    k = LinearKernel("onednn-packed", torch.bfloat16)
    x = torch.randn(24, 64).bfloat16()  # above every native row limit: the packed path
    w = torch.randn(40, 64).bfloat16()
    with torch.inference_mode():
        plain = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        assert torch.equal(k(x, w), plain)
        w.mul_(2)  # in-place change: the packed copy is remade
        assert torch.equal(k(x, w), torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))


def test_int8_weight_only_against_dequantized_reference():
    if not kernel_works("int8", torch.bfloat16):
        pytest.skip("no _weight_int8pack_mm here")
    w = torch.randn(48, 128)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6
    k = choose_kernel(torch.bfloat16, torch.device("cpu"), "int8")
    x = torch.randn(5, 128).bfloat16()
    b = torch.randn(48).bfloat16()
    with torch.inference_mode():
        got = k(x, w.bfloat16(), b).float()
    want = F.linear(x.float(), q.float() * s.bfloat16().float()[:, None], b.float())
    # bf16 activations and output: errors of a few bf16 ulps of the row sums (|y| ~ 10-25 here)
    assert torch.allclose(got, want, atol=0.3, rtol=0.02)
    assert (got - want).abs().mean() < 0.1


def test_bad_quantization_names_the_field():
    with pytest.raises(ValueError, match="quantization"):
        choose_kernel(torch.float32, torch.device("cpu"), "int4")
    with pytest.raises(ValueError, match="quantization 'int8'"):
        choose_kernel(torch.float32, torch.device("cpu"), "int8")


def test_fallback_when_native_disabled(monkeypatch):
    """No native library: the chosen kernel still computes F.linear (pure-torch/oneDNN path)."""
    monkeypatch.setattr(native_gemv, "_LIB", None)
    monkeypatch.setattr(native_gemv, "_TRIED", True)
    k = choose_kernel(torch.float32, torch.device("cpu"))
    assert k.native_rows == 0
    x, w = torch.randn(2, 32), torch.randn(7, 32)
    with torch.inference_mode():
        assert torch.allclose(k(x, w), F.linear(x, w), atol=1e-5)


def test_engine_int8_quantization_tracks_the_float_model():
    """``quantization: int8`` on the demo model: next-token logits of a prompt stay close to the
    bf16 model's (same argmax on most prompts); float32 + int8 is a config error naming the field."""
    if not kernel_works("int8", torch.bfloat16):
        pytest.skip("no _weight_int8pack_mm here")
    from framework import LLM, ConfigError, SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    prompts = [{"prompt_token_ids": list(range(10 + 7 * i, 40 + 7 * i))} for i in range(6)]
    ref = LLM(model="demo", dtype="bfloat16").generate(prompts, params, use_tqdm=False)
    q = LLM(model="demo", quantization="int8").generate(prompts, params, use_tqdm=False)
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(ref, q))
    assert same >= 4
    for a, b in zip(ref, q):  # the int8 model's top token is among the float model's top 5
        assert b.outputs[0].token_ids[0] in a.outputs[0].logprobs[0]
    with pytest.raises(ConfigError, match="quantization"):
        LLM(model="demo", dtype="float32", quantization="int8")
