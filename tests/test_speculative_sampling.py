"""Exact speculative sampling, checked statistically against a brute-force reference.

A tiny random Llama with a 16-token vocabulary is the target. Its exact distribution over the
first four output tokens (all 16^4 continuations) is computed with Hugging Face transformers and
HF's own logits processors (repetition penalty, temperature, top-k), and the engine's draws —
ordinary sampling as a control, then speculative sampling with a draft that agrees well (the
target with slightly perturbed weights), one that agrees badly (the target with its output
layer negated) and prompt lookup (point-mass drafts) — are compared with it by a chi-square
goodness-of-fit test over >= 20k draws. With ``max_tokens=4`` and two draft tokens, token 1 is
sampled after the prefill and tokens 2-4 come out of verification (draft positions 0 and 1 and
the bonus token, or a residual draw), so the joint of tokens 2-4 tests every path of the
acceptance rule; the joint of tokens 1-3 is checked as well.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from framework import LLM, SamplingParams

V = 16
PROMPT = [3, 5, 7, 3, 5]  # a repeat, so prompt lookup finds drafts
N_REQ, N_PER = 160, 128  # 20480 draws
SETTINGS = {
    "plain": dict(temperature=1.0),
    "processed": dict(temperature=0.8, top_k=6, repetition_penalty=1.3),
}


def _write(path: Path, seed: int, base=None, noise: float = 0.0, negate_head: bool = False):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.3, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    if base is not None:
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
            if negate_head:
                model.lm_head.weight.neg_()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("spec_tiny")
    target = _write(root / "target", 0)
    _write(root / "good", 1, target, noise=0.02)
    _write(root / "bad", 2, target, negate_head=True)
    return {"root": root, "target": target}


def _exact(model, setting: dict) -> torch.Tensor:
    """[V, V, V, V] probability of the first four output tokens, by enumeration with HF."""
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                              TemperatureLogitsWarper, TopKLogitsWarper)

    procs = LogitsProcessorList()
    if setting.get("repetition_penalty", 1.0) != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(setting["repetition_penalty"]))
    if setting["temperature"] != 1.0:
        procs.append(TemperatureLogitsWarper(setting["temperature"]))
    if setting.get("top_k"):
        procs.append(TopKLogitsWarper(setting["top_k"]))
    conts = torch.tensor(list(itertools.product(range(V), repeat=3)))  # [V^3, 3]
    ids = torch.cat([torch.tensor(PROMPT).expand(len(conts), -1), conts], dim=1)
    with torch.no_grad():
        logits = model(ids).logits.float()  # [V^3, L+3, V]
    L = len(PROMPT)
    cond = []  # cond[k][row] = processed next-token distribution after prompt + k output tokens
    for k in range(4):
        pos = L - 1 + k
        scores = procs(ids[:, : pos + 1], logits[:, pos].clone())
        cond.append(scores.softmax(dim=-1))
    joint = cond[0][0].view(V, 1, 1, 1)
    joint = joint * cond[1].view(V, V, V, V)[:, 0, 0].view(V, V, 1, 1)
    joint = joint * cond[2].view(V, V, V, V)[:, :, 0].view(V, V, V, 1)
    joint = joint * cond[3].view(V, V, V, V)
    assert abs(float(joint.sum()) - 1.0) < 1e-4
    return joint.double()


def _chi2_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit; cells with an expected count under 5 are pooled into one."""
    from scipy.stats import chisquare

    counts, probs = counts.flatten().double(), probs.flatten().double()
    n = float(counts.sum())
    exp = probs * n
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    ex = torch.cat([exp[big], exp[~big].sum().view(1)])
    ex = ex * (obs.sum() / ex.sum())  # the pooled cell's rounding
    return float(chisquare(obs.numpy(), ex.numpy()).pvalue)


def _draw(llm: LLM, setting: dict) -> torch.Tensor:
    sp = SamplingParams(max_tokens=4, n=N_PER, ignore_eos=True, **setting)
    counts = torch.zeros(V, V, V, V, dtype=torch.long)
    for out in llm.generate([list(PROMPT)] * N_REQ, sp):
        for c in out.outputs:
            assert len(c.token_ids) == 4
            counts[tuple(c.token_ids)] += 1
    return counts


DRAFTERS = {
    "none": None,
    "good_draft": lambda root: {"draft_model": {"model": str(root / "good"), "num_tokens": 2}},
    "bad_draft": lambda root: {"draft_model": {"model": str(root / "bad"), "num_tokens": 2}},
    "prompt_lookup": lambda root: {"prompt_lookup": {"num_tokens": 2, "max_ngram": 2}},
}


# 15-35 s each on a shared core: the well-agreeing draft with processors (penalty, temperature,
# top-k) runs by default, the rest (the control and the badly-agreeing draft) with -m slow
FAST = {("good_draft", "processed")}
CASES = [pytest.param(d, s, marks=() if (d, s) in FAST else pytest.mark.slow, id=f"{d}-{s}")
         for d in DRAFTERS for s in SETTINGS]


@pytest.mark.parametrize(("drafter", "setting"), CASES)
def test_speculative_sampling_matches_the_exact_distribution(tiny, drafter, setting):
    root = tiny["root"]
    d = DRAFTERS[drafter]
    llm = LLM(str(root / "target"), skip_tokenizer_init=True, dtype="float32", max_num_seqs=512, seed=11,
              drafter=None if d is None else d(root))
    exact = _exact(tiny["target"], SETTINGS[setting])
    counts = _draw(llm, SETTINGS[setting])
    assert int(counts.sum()) == N_REQ * N_PER >= 20_000
    p_first = _chi2_p(counts.sum(dim=3), exact.sum(dim=3))  # tokens 1-3
    p_verified = _chi2_p(counts.sum(dim=0), exact.sum(dim=0))  # tokens 2-4: drafted, drafted, bonus
    assert p_first > 1e-3 and p_verified > 1e-3, (p_first, p_verified)
    assert llm.engine.check_all_free()
    st = llm.engine.stats()
    if d is not None:
        assert st["spec_num_draft_tokens"] > 0.5 * N_REQ * N_PER  # drafts were really verified
        rate = st["spec_acceptance_rate"]
        if drafter == "good_draft":
            assert rate > 0.7, rate
        elif drafter == "bad_draft":
            assert rate < 0.3, rate


def test_acceptance_rate_is_the_expected_overlap(tiny):
    """With one draft token per step, P(accept) = E[sum_x min(p(x), q(x))] exactly."""
    import transformers

    root = tiny["root"]
    draft = transformers.LlamaForCausalLM.from_pretrained(root / "bad").eval()
    target = tiny["target"]
    ids = torch.tensor([PROMPT + [t] for t in range(V)])
    with torch.no_grad():
        p1 = target(torch.tensor([PROMPT])).logits[0, -1].softmax(-1)
        p2 = target(ids).logits[:, -1].softmax(-1)
        q2 = draft(ids).logits[:, -1].softmax(-1)
    want = float((p1 * torch.minimum(p2, q2).sum(-1)).sum())
    llm = LLM(str(root / "target"), skip_tokenizer_init=True, dtype="float32", max_num_seqs=512, seed=5,
              drafter={"draft_model": {"model": str(root / "bad"), "num_tokens": 1}})
    n = N_REQ * N_PER
    llm.generate([list(PROMPT)] * N_REQ, SamplingParams(max_tokens=3, n=N_PER, ignore_eos=True, temperature=1.0))
    st = llm.engine.stats()
    # one draft (for token 2) per sequence, but for the few the step's token budget dropped
    assert 0.99 * n <= st["spec_num_draft_tokens"] <= n
    n = st["spec_num_draft_tokens"]
    sd = (want * (1 - want) / n) ** 0.5
    assert abs(st["spec_acceptance_rate"] - want) < 4.5 * sd, (st["spec_acceptance_rate"], want)


def test_seeded_requests_reproduce(tiny):
    root = tiny["root"]
    llm = LLM(str(root / "target"), skip_tokenizer_init=True, dtype="float32",
              drafter={"draft_model": {"model": str(root / "good"), "num_tokens": 3}})
    sp = SamplingParams(max_tokens=24, temperature=0.9, seed=1234, ignore_eos=True)
    alone = llm.generate([list(PROMPT)], sp)[0].outputs[0].token_ids
    others = SamplingParams(max_tokens=20, temperature=1.0, ignore_eos=True)
    batch = llm.generate([[4, 4, 6]] * 3 + [list(PROMPT)] + [[9, 8]] * 3, [others] * 3 + [sp] + [others] * 3)
    assert batch[3].outputs[0].token_ids == alone
    assert llm.generate([list(PROMPT)], sp)[0].outputs[0].token_ids == alone
    assert llm.engine.check_all_free()


# ------------------------------------------------------------------------- under a grammar constraint
CHARS = list("abc0123456789")  # ids 3..15; 0-2 are <pad>, <s>, </s>
REGEX = r"[abc][0-9][abc][0-9]+"  # tokens 1-4: letter, digit, letter, digit (never accepting before 4)
CONSTRAINED = dict(temperature=0.9, repetition_penalty=1.2)
CPROMPT = [3, 6, 4, 7, 5, 8, 3, 6, 4]  # "a0b1c2a0b": every letter recurs, followed by a digit (lookup drafts)


def _write_tokenizer(path: Path) -> None:
    """A word-level tokenizer.json whose 13 ordinary tokens are single characters."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(CHARS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(path / "tokenizer.json"))


def _allowed(k: int) -> torch.Tensor:
    """[V] bool: the tokens REGEX allows as output token ``k`` (0-based) — by hand, for k < 4."""
    chars = "abc" if k % 2 == 0 else "0123456789"
    return torch.tensor([i >= 3 and CHARS[i - 3] in chars for i in range(V)])


def _exact_constrained(model) -> torch.Tensor:
    """[V, V, V, V] probability of the first four output tokens under repetition penalty,
    temperature and the REGEX mask, by enumeration with HF."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper

    procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(CONSTRAINED["repetition_penalty"]),
                                 TemperatureLogitsWarper(CONSTRAINED["temperature"])])
    conts = torch.tensor(list(itertools.product(range(V), repeat=3)))
    ids = torch.cat([torch.tensor(CPROMPT).expand(len(conts), -1), conts], dim=1)
    with torch.no_grad():
        logits = model(ids).logits.float()
    L = len(CPROMPT)
    cond = []
    for k in range(4):
        scores = procs(ids[:, : L + k], logits[:, L - 1 + k].clone())
        cond.append(scores.masked_fill(~_allowed(k), float("-inf")).softmax(dim=-1))
    joint = cond[0][0].view(V, 1, 1, 1)
    joint = joint * cond[1].view(V, V, V, V)[:, 0, 0].view(V, V, 1, 1)
    joint = joint * cond[2].view(V, V, V, V)[:, :, 0].view(V, V, V, 1)
    joint = joint * cond[3].view(V, V, V, V)
    joint = torch.nan_to_num(joint)  # rows after a disallowed prefix are never reached
    assert abs(float(joint.sum()) - 1.0) < 1e-4
    return joint.double()


# ~7 s (prompt lookup, default) and ~11 s (the draft model, -m slow) on a quiet core
@pytest.mark.parametrize("drafter", [pytest.param("good_draft", marks=pytest.mark.slow), "prompt_lookup"])
def test_constrained_speculative_sampling_matches_the_exact_distribution(tiny, drafter, tmp_path):
    """A regex constraint masks p at every draft position (grammar state advanced by the tokens
    accepted before it only): speculative draws of tokens 1-3 and 2-4 follow the constrained,
    processed distribution."""
    import shutil

    root = tiny["root"]
    target = tmp_path / "target"
    shutil.copytree(root / "target", target)
    _write_tokenizer(target)
    llm = LLM(str(target), dtype="float32", max_num_seqs=512, seed=13, drafter=DRAFTERS[drafter](root))
    exact = _exact_constrained(tiny["target"])
    sp = SamplingParams(max_tokens=4, n=N_PER, regex=REGEX, **CONSTRAINED)  # EOS is masked before token 5
    counts = torch.zeros(V, V, V, V, dtype=torch.long)
    for out in llm.generate([{"prompt_token_ids": list(CPROMPT)}] * N_REQ, sp, use_tqdm=False):
        for c in out.outputs:
            assert len(c.token_ids) == 4 and all(_allowed(k)[t] for k, t in enumerate(c.token_ids))
            counts[tuple(c.token_ids)] += 1
    assert int(counts.sum()) == N_REQ * N_PER >= 20_000
    p_first = _chi2_p(counts.sum(dim=3), exact.sum(dim=3))  # tokens 1-3
    p_verified = _chi2_p(counts.sum(dim=0), exact.sum(dim=0))  # tokens 2-4: drafted, drafted, bonus
    assert p_first > 1e-3 and p_verified > 1e-3, (p_first, p_verified)
    st = llm.engine.stats()
    assert st["spec_num_draft_tokens"] > 0.5 * N_REQ * N_PER and st["spec_num_accepted_tokens"] > 0.05 * N_REQ * N_PER
    assert llm.engine.check_all_free()
