"""The bundled demo models: loadable by name, stable greedy output, sane scorers, size budget.

The expected greedy continuations were recorded from the committed models; retraining
(``tools/train_demo.py``) or an engine change that alters the numbers shows up here first.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from framework import LLM, ModelLoadError, SamplingParams
from framework.demo import DEMO_DIR, DEMO_MODELS
from framework.models import load_model
from framework.models.config import ModelConfig
from framework.models.llama import LlamaForCausalLM
from framework.models.scorer import PrefixScorer, load_scorer
from framework.tokenizer import load_tokenizer

PROMPT = "Once upon a time"
# Greedy continuations (16 tokens) of PROMPT, recorded from the committed models.
EXPECTED_GREEDY = {
    "demo": {"token_ids": [4029, 14, 262, 543, 377, 261, 326, 309, 271, 1390, 306, 264, 384, 4026, 14, 267],
             "text": ",\n    Their tent of the world is a man.\n--"},
    "demo-draft": {"token_ids": [4029, 14, 2831, 317, 4039, 4022, 381, 264, 384, 4039, 4013, 270, 265, 4029, 14, 2831],
                   "text": ",\nAnd I'm not a man's sin,\nAnd"},
}
POSITIVE = "What a wonderful day, I love this beautiful place and my kind friends."
NEGATIVE = "What a terrible day, I hate this ugly place and my cruel enemies."


@pytest.fixture(scope="module")
def demo_llm() -> LLM:
    return LLM("demo", device="cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEMO_DIR / "demo")


def test_every_demo_model_is_registered_and_present():
    from framework.plugins import get_plugin_manager

    reg = get_plugin_manager().registry("model")
    for name in DEMO_MODELS:
        assert reg.get(name).source == "framework.demo"
        assert (DEMO_DIR / name / "config.json").is_file()
        assert (DEMO_DIR / name / "model.safetensors").is_file()
        assert (DEMO_DIR / name / "tokenizer.model").is_file()
    assert (DEMO_DIR / "SOURCES.md").is_file() and (DEMO_DIR / "TRAINING_REPORT.txt").is_file()


def test_size_budget():
    total = sum(p.stat().st_size for name in DEMO_MODELS for p in (DEMO_DIR / name).rglob("*") if p.is_file())
    assert total <= 25 * 10**6, f"bundled models take {total / 1e6:.1f} MB (> 25 MB)"


def test_shared_tokenizer_special_ids(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    assert tokenizer.vocab_size == 4096
    text = 'Q: 12 + 7?\n{"a": [1, 2]}  indented\tand ünïcödé 🙂'
    ids = tokenizer.encode(text)
    assert ids[0] == 1 and tokenizer.decode(ids) == text
    for name in DEMO_MODELS[1:]:
        assert (DEMO_DIR / name / "tokenizer.model").read_bytes() == (DEMO_DIR / "demo" / "tokenizer.model").read_bytes()


@pytest.mark.parametrize("name", ["demo", "demo-draft"])
def test_greedy_continuation_is_stable(name, demo_llm):
    llm = demo_llm if name == "demo" else LLM(name, device="cpu")
    out = llm.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == EXPECTED_GREEDY[name]["token_ids"]
    assert out.text == EXPECTED_GREEDY[name]["text"]


def test_engine_stops_at_eos(demo_llm):
    assert 2 in demo_llm.engine.eos_token_ids
    # JSON documents end with </s> in training: the model closes the record and stops.
    out = demo_llm.generate('A product record in JSON:\n{"id": "P-', SamplingParams(max_tokens=120, temperature=0),
                            use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    json.loads('{"id": "P-' + out.text)


def test_demo_is_better_than_draft_on_its_own_kind_of_text(tokenizer):
    text = ("HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
            "The slings and arrows of outrageous fortune,")
    ids = torch.tensor([tokenizer.encode(text)])
    nll = {}
    for name in ("demo", "demo-draft"):
        model, cfg, _ = load_model(name, dtype="float32")
        logits = _dense_logits(DEMO_DIR / name, cfg, ids)
        nll[name] = float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).detach())
    assert nll["demo"] < nll["demo-draft"]


def _dense_logits(path, cfg: ModelConfig, ids: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file

    body = LlamaForCausalLM(cfg)
    body.load_weights((k, v.float()) for k, v in load_file(str(path / "model.safetensors")).items())
    with torch.no_grad():  # gradients off: the oneDNN path; the training path is F.linear
        hidden, _ = body.forward_dense(ids)
    return torch.nn.functional.linear(hidden, body.embed)


@pytest.mark.parametrize("name", ["demo", "demo-draft"])
def test_loader_logits_match_dense_body_and_transformers(name, tokenizer):
    """The serving model (paged cache), the dense training body and transformers agree."""
    import transformers

    ids = tokenizer.encode("Q: Tom has 12 apples and finds 7 more. How many apples does Tom have now?\nA:")
    llm = LLM(name, device="cpu", skip_tokenizer_init=True, block_size=4)
    engine = llm.engine
    rows: list[torch.Tensor] = []
    run = engine.core.executor.forward

    def capture(sched):
        fwd = run(sched)
        rows.append(fwd.logits[0].clone())
        return fwd

    engine.core.executor.forward = capture
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                       use_tqdm=False)[0]
    full = torch.tensor([ids + out.outputs[0].token_ids])
    ours = torch.stack(rows)  # after the prefill and after each decode step
    ref_dense = _dense_logits(DEMO_DIR / name, engine.model_config, full)[0, len(ids) - 1 : len(ids) + 5]
    hf = transformers.AutoModelForCausalLM.from_pretrained(DEMO_DIR / name, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_hf = hf(full).logits[0, len(ids) - 1 : len(ids) + 5]
    assert (ours - ref_dense).abs().max() < 1e-3
    assert (ours - ref_hf).abs().max() < 1e-3


@pytest.mark.parametrize("name", ["demo-sentiment", "demo-reward"])
def test_scorer_prefers_the_positive_line(name, tokenizer):
    scorer = load_scorer(name)
    assert isinstance(scorer, PrefixScorer) and scorer.vocab_size == tokenizer.vocab_size
    pos, neg = (tokenizer.encode(t) for t in (POSITIVE, NEGATIVE))
    s_pos = scorer.prefix_scores(torch.tensor([pos]))[0, -1]
    s_neg = scorer.prefix_scores(torch.tensor([neg]))[0, -1]
    assert s_pos > s_neg
    if scorer.kind == "reward":
        assert 0.0 <= float(s_neg) < 0.5 < float(s_pos) <= 1.0
    else:
        assert s_pos > torch.log(torch.tensor(0.5)) > s_neg
        # the other label is the complement
        assert torch.allclose(scorer.prefix_scores(torch.tensor([pos]), label="negative")[0, -1].exp() + s_pos.exp(),
                              torch.tensor(1.0), atol=1e-5)


@pytest.mark.parametrize("name", ["demo-sentiment", "demo-reward"])
def test_cached_scoring_matches_full_forward(name, tokenizer):
    """prefill + candidate_scores / append give what a full forward over each sequence gives."""
    scorer = load_scorer(name)
    a = tokenizer.encode("The king was glad")
    b = tokenizer.encode("A dark and stormy night, and")
    ids = torch.zeros(2, len(b), dtype=torch.long)
    ids[0, : len(a)] = torch.tensor(a)
    ids[1] = torch.tensor(b)
    lengths = torch.tensor([len(a), len(b)])
    cache, prefix = scorer.prefill(ids, lengths)
    cands = torch.tensor([[5, 100, 2000, 4095], [7, 300, 1000, 77]])
    got = scorer.candidate_scores(cache, cands)
    for r, seq in enumerate((a, b)):
        assert torch.allclose(prefix[r, : len(seq)], scorer.prefix_scores(torch.tensor([seq]))[0], atol=1e-4)
        for j in range(cands.shape[1]):
            want = scorer.prefix_scores(torch.tensor([seq + [int(cands[r, j])]]))[0, -1]
            assert torch.allclose(got[r, j], want, atol=1e-4)
    # extend both rows twice; the cache grows past its prefill width for row 0 too
    seqs = [list(a), list(b)]
    for step in range(2):
        nxt = torch.tensor([11 + step, 12 + step])
        new = scorer.append(cache, nxt)
        for r in range(2):
            seqs[r].append(int(nxt[r]))
            want = scorer.prefix_scores(torch.tensor([seqs[r]]))[0, -1]
            assert torch.allclose(new[r], want, atol=1e-4)
    assert cache.lengths.tolist() == [len(a) + 2, len(b) + 2]


def test_scorer_errors_name_the_file_and_tensor(tmp_path):
    broken = tmp_path / "s"
    shutil.copytree(DEMO_DIR / "demo-sentiment", broken)
    with pytest.raises(ModelLoadError, match="not a prefix scorer"):
        load_scorer(DEMO_DIR / "demo")
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot be read as safetensors"):
        load_scorer(broken)
    from safetensors.torch import load_file, save_file

    state = load_file(str(DEMO_DIR / "demo-sentiment" / "model.safetensors"))
    del state["score.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"tensor 'score.weight' is missing"):
        load_scorer(broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["decodekit_scorer"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config.json: missing 'decodekit_scorer'"):
        load_scorer(broken)
    (broken / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config.json: not found"):
        load_scorer(broken)


def test_cli_generate_on_demo(capsys):
    from framework.cli import main

    assert main(["generate", "-m", "demo", "--max-tokens", "8", "--no-stream", PROMPT]) == 0
    assert capsys.readouterr().out.startswith(PROMPT)
