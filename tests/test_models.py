"""Native model vs transformers: logits through the paged cache, greedy generation, loading errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import FAMILIES, VOCAB, make_checkpoint
from framework import LLM, ModelLoadError, SamplingParams

PROMPT_LENS = (7, 19, 33)


def _hf(path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompts(seed: int, lens=PROMPT_LENS) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [2048, 8], ids=["whole-prefill", "chunked-prefill"])
def test_logits_match_transformers_through_paged_cache(checkpoints, family, chunk):
    """Prefill + 20 decode steps for 3 sequences of different lengths batched together: every
    next-token logits row equals transformers' full forward over the same tokens."""
    llm = LLM(str(checkpoints[family]), skip_tokenizer_init=True, block_size=4, max_num_batched_tokens=chunk)
    engine = llm.engine
    captured: dict[int, list[torch.Tensor]] = {}
    run = engine.core.executor.forward

    def capture(sched):
        fwd = run(sched)
        for i, seq in enumerate(fwd.seqs):
            captured.setdefault(seq.seq_id, []).append(fwd.logits[i].clone())
        return fwd

    engine.core.executor.forward = capture
    prompts = _prompts(1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=21, temperature=0, ignore_eos=True))
    hf = _hf(checkpoints[family])
    seq_ids = sorted(captured)
    assert len(seq_ids) == 3
    for prompt, out, sid in zip(prompts, outs, seq_ids):
        full = prompt + out.outputs[0].token_ids
        with torch.no_grad():
            ref = hf(torch.tensor([full])).logits[0]
        ours = torch.stack(captured[sid])  # 21 rows: after prefill and after each of 20 decodes
        assert ours.shape[0] == 21
        expected = ref[len(prompt) - 1 : len(prompt) + 20]
        diff = (ours - expected).abs().max().item()
        assert diff < 1e-4, f"{family}: max abs diff {diff}"
    assert engine.block_manager.check_all_free()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(checkpoints, family):
    prompts = _prompts(2, (5, 12, 30))
    hf = _hf(checkpoints[family])
    refs = []
    for p in prompts:
        with torch.no_grad():
            g = hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        refs.append(g[0, len(p):].tolist())
    llm = LLM(str(checkpoints[family]), skip_tokenizer_init=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for out, ref in zip(outs, refs):
        assert out.outputs[0].token_ids == ref
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(checkpoints, dtype):
    prompts = [{"prompt_token_ids": p} for p in _prompts(3)]
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    ref = LLM(str(checkpoints["qwen2"]), skip_tokenizer_init=True).generate(prompts, params)
    llm = LLM(str(checkpoints["qwen2"]), skip_tokenizer_init=True, dtype=dtype)
    assert llm.engine.model.weight_dtype == getattr(torch, dtype)
    half = llm.generate(prompts, params)
    for a, b in zip(ref, half):
        la, lb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        common = set(la) & set(lb)
        assert len(common) >= 3
        assert max(abs(la[t] - lb[t]) for t in common) < 0.05


def test_sharded_checkpoint_loads_identically(tmp_path, checkpoints):
    path = make_checkpoint(tmp_path / "sharded", "llama", max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 2
    prompts = [{"prompt_token_ids": p} for p in _prompts(4)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    a = LLM(str(path), skip_tokenizer_init=True).generate(prompts, params)
    b = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True).generate(prompts, params)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


@pytest.fixture
def broken(tmp_path, checkpoints):
    path = tmp_path / "broken"
    shutil.copytree(checkpoints["llama"], path)
    return path


def _load(path):
    return LLM(str(path), skip_tokenizer_init=True)


def test_unsupported_architecture_is_named(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config.json: architecture 'GPT2LMHeadModel' is not supported.*LlamaForCausalLM"):
        _load(broken)


def test_missing_config_and_weights(broken, tmp_path):
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model.safetensors"):
        _load(broken)
    with pytest.raises(ModelLoadError, match=r"no such directory"):
        _load(tmp_path / "nowhere")
    (broken / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config.json: not found"):
        _load(broken)


def test_corrupt_weights_file_is_named(broken):
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"model.safetensors: cannot be read as safetensors"):
        _load(broken)


def test_shape_mismatch_names_file_and_tensor(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"model.safetensors: tensor 'model.layers.0.mlp.\w+_proj.weight' has shape \[\d+, \d+\], expected"):
        _load(broken)


def test_missing_tensor_is_named(broken):
    from safetensors.torch import load_file, save_file

    f = broken / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"tensor 'model.layers.1.self_attn.k_proj.weight' is missing"):
        _load(broken)


def test_unsupported_rope_scaling_is_named(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"rope_scaling type 'yarn' is not supported"):
        _load(broken)


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_forward_matches_transformers_and_trains(checkpoints, family):
    """The one Llama implementation serves whole-batch use too (training, standalone scorers):
    ``forward_dense`` equals transformers for every family, gives the same numbers with gradients
    on (the F.linear path training takes) and off (oneDNN), back-propagates into the fused
    weights, and ``hf_tensors`` round-trips the checkpoint exactly."""
    from framework.models import load_model
    from framework.models.llama import LlamaForCausalLM
    from safetensors.torch import load_file

    model, cfg, _ = load_model(str(checkpoints[family]), dtype="float32")
    ids = torch.tensor(_prompts(5, (17, 17)))
    with torch.no_grad():
        ref = _hf(checkpoints[family])(ids).logits
        hidden, _ = model.forward_dense(ids)
    diff = (model.compute_logits(hidden.reshape(-1, hidden.shape[-1])).view_as(ref) - ref).abs().max().item()
    assert diff < 1e-4, f"{family}: max abs diff {diff}"

    trainable = LlamaForCausalLM(cfg)
    trainable.load_weights(model.hf_tensors().items())
    trainable.requires_grad_(True)
    h_grad, _ = trainable.forward_dense(ids)
    assert (h_grad.detach() - hidden).abs().max().item() < 1e-4
    h_grad.float().pow(2).mean().backward()
    assert all(layer.qkv.grad is not None and layer.qkv.grad.abs().sum() > 0 for layer in trainable.layers)

    saved = load_file(str(checkpoints[family] / "model.safetensors"))
    exported = model.hf_tensors()
    if cfg.tie_word_embeddings:
        saved.pop("lm_head.weight", None)
    assert set(exported) == set(saved)
    assert all(torch.equal(exported[k], saved[k].float()) for k in saved)
