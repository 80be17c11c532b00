"""Logits processors against Hugging Face transformers' LogitsProcessor classes (the reference).

Each built-in processor runs batched, with different settings per row, on random float32 logits
and random token histories; each row must equal what the matching HF processor gives for that
row's settings: bitwise, including which tokens are masked to -inf.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from framework import InvalidRequestError, SamplingParams
from framework.plugins import PluginManager
from framework.processors import ProcessorChain, ProcessorSetup, RequestInfo, StepContext
from plugins.samplers import LOGITS_PROCESSORS
from plugins.samplers.bans import BadWords, MinTokens, NoRepeatNGram
from plugins.samplers.penalties import FrequencyPresencePenalty, LogitBias, RepetitionPenalty
from plugins.samplers.truncation import EpsilonCutoff, EtaCutoff, MinP, Temperature, TopK, TopP, Typical, topk_largest

hf = pytest.importorskip("transformers.generation.logits_process")

V = 1000
EOS = 2
NEG_INF = float("-inf")


def _logits(rows: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * scale


def _ids(rows: int, length: int, seed: int, high: int = V) -> torch.Tensor:
    return torch.randint(0, high, (rows, length), generator=torch.Generator().manual_seed(seed))


def _setup(tokenizer=None) -> ProcessorSetup:
    return ProcessorSetup(V, torch.device("cpu"), frozenset({EOS}), tokenizer)


def run(cls, params: list, logits: torch.Tensor, ids: torch.Tensor, prompt_len: int | None = None,
        sampling: SamplingParams | None = None) -> torch.Tensor:
    """Row r of ``logits`` processed with ``params[r]``, all rows in one batched ``apply``."""
    proc = cls(_setup())
    sampling = sampling or SamplingParams()
    rows = ids.tolist()
    n_prompt = len(rows[0]) if prompt_len is None else prompt_len
    for slot, p in enumerate(params):
        if hasattr(proc, "prepare"):
            p = proc.prepare(p, sampling)
        proc.add_request(slot, p, RequestInfo(rows[slot], n_prompt, sampling))
    ctx = StepContext.build(list(range(len(params))), rows, [n_prompt] * len(params))
    return proc.apply(logits.clone(), ctx)


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), "different tokens masked"
    assert torch.equal(ours, ref), f"max diff {(ours - ref).nan_to_num(0, 0, 0).abs().max()}"


def per_row_reference(make_hf, settings: list, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([make_hf(s)(ids, logits.clone())[r] for r, s in enumerate(settings)])


# --------------------------------------------------------------------------- temperature + truncation


def test_temperature_bitwise():
    temps = [0.5, 0.7, 1.3, 2.0, 0.01]
    x, ids = _logits(5, 0), _ids(5, 4, 0)
    ours = run(Temperature, [Temperature.Params(temperature=t) for t in temps], x, ids)
    assert_same(ours, per_row_reference(lambda t: hf.TemperatureLogitsWarper(t), temps, x, ids))


@pytest.mark.parametrize("keep", [1, 3, 60])
def test_top_k_bitwise(keep):
    ks = [1, 5, 50, 999, 1000, 4000]
    x, ids = _logits(len(ks), 1), _ids(len(ks), 4, 1)
    ours = run(TopK, [TopK.Params(top_k=k, min_tokens_to_keep=keep) for k in ks], x, ids)
    ref = per_row_reference(lambda k: hf.TopKLogitsWarper(k, min_tokens_to_keep=keep), ks, x, ids)
    assert_same(ours, ref)


@pytest.mark.parametrize("keep", [1, 7])
def test_top_p_bitwise(keep):
    ps = [0.05, 0.3, 0.8, 0.95, 0.999, 1.0]
    x, ids = _logits(len(ps), 2), _ids(len(ps), 4, 2)
    ours = run(TopP, [TopP.Params(top_p=p, min_tokens_to_keep=keep) for p in ps], x, ids)
    ref = per_row_reference(lambda p: hf.TopPLogitsWarper(p, min_tokens_to_keep=keep), ps, x, ids)
    assert_same(ours, ref)


def test_top_p_mixed_keep_per_row():
    settings = [(0.5, 1), (0.5, 9), (0.9, 2), (0.2, 30)]
    x, ids = _logits(4, 3), _ids(4, 4, 3)
    ours = run(TopP, [TopP.Params(top_p=p, min_tokens_to_keep=k) for p, k in settings], x, ids)
    ref = per_row_reference(lambda s: hf.TopPLogitsWarper(s[0], min_tokens_to_keep=s[1]), settings, x, ids)
    assert_same(ours, ref)


@pytest.mark.parametrize("top_k", [20, 100, 125, 126, 500])
def test_top_p_after_top_k_keeps_the_same_tokens(top_k):
    """After top-k, rows with few finite logits take the compact path (<= V/8 finite)."""
    ps = [0.1, 0.5, 0.9, 0.99]
    x, ids = _logits(len(ps), 4, scale=1.0), _ids(len(ps), 4, 4)
    kx = run(TopK, [TopK.Params(top_k=top_k)] * len(ps), x, ids)
    ours = run(TopP, [TopP.Params(top_p=p) for p in ps], kx, ids)
    ref = per_row_reference(lambda p: hf.TopPLogitsWarper(p), ps, hf.TopKLogitsWarper(top_k)(ids, x.clone()), ids)
    assert_same(ours, ref)


def test_top_p_compact_path_is_batch_invariant():
    """A row's result must not depend on how many finite logits its batch neighbours have."""
    x = _logits(3, 5, scale=1.0)
    ids = _ids(3, 4, 5)
    ks = [10, 40, 120]
    kx = torch.cat([run(TopK, [TopK.Params(top_k=k)], x[i : i + 1], ids[i : i + 1]) for i, k in enumerate(ks)])
    together = run(TopP, [TopP.Params(top_p=0.7)] * 3, kx, ids)
    for i in range(3):
        alone = run(TopP, [TopP.Params(top_p=0.7)], kx[i : i + 1], ids[i : i + 1])
        assert torch.equal(alone[0], together[i])


@pytest.mark.parametrize("n,k", [(1000, 51), (4096, 21), (4099, 65), (300, 7), (64, 64), (9000, 3), (20001, 51), (32000, 65)])
def test_fast_topk_values_equal_torch_topk(n, k):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n))
    ties = torch.randint(0, 7, (5, n), generator=torch.Generator().manual_seed(k)).float()  # many ties
    for t in (x, ties, x.bfloat16().float()):
        values, ids = topk_largest(t, k)
        assert torch.equal(values, t.topk(k).values)
        assert torch.equal(t.gather(1, ids), values) and all(len(set(r)) == k for r in ids.tolist())


@pytest.mark.parametrize("k", [[5, 5, 5, 5], [3, 9, 60, 1]])
def test_top_k_with_ties_and_compact_followers_match_hf(k):
    """bf16-rounded logits have ties at the top-k boundary (the dense path keeps all of them);
    min-p after top-k works on the kept tokens only and keeps the same ones as HF."""
    x = (_logits(4, 21, scale=2.0).bfloat16().float())
    ids = _ids(4, 4, 21)
    kx = run(TopK, [TopK.Params(top_k=kk) for kk in k], x, ids)
    assert_same(kx, per_row_reference(lambda kk: hf.TopKLogitsWarper(kk), k, x, ids))
    if len(set(k)) == 1:
        assert (torch.isfinite(kx).sum(-1) > k[0]).any()  # a tie at the boundary: all kept
    proc_k, proc_m = TopK(_setup()), MinP(_setup())
    sp = SamplingParams()
    for slot, kk in enumerate(k):
        proc_k.add_request(slot, TopK.Params(top_k=kk), RequestInfo([1], 1, sp))
        proc_m.add_request(slot, MinP.Params(min_p=0.3, min_tokens_to_keep=2), RequestInfo([1], 1, sp))
    shared: dict = {}
    ctx = StepContext.build([0, 1, 2, 3], [[1]] * 4, [1] * 4, shared=shared)
    x2 = _logits(4, 22, scale=2.0)
    ours = proc_m.apply(proc_k.apply(x2.clone(), ctx), ctx)
    assert shared  # top-k handed its compact support on
    ref = per_row_reference(lambda kk: lambda i, t: hf.MinPLogitsWarper(0.3, min_tokens_to_keep=2)(i, hf.TopKLogitsWarper(kk)(i, t)), k, x2, ids)
    assert_same(ours, ref)


@pytest.mark.parametrize("keep", [1, 5])
def test_min_p_bitwise(keep):
    ps = [0.0, 0.02, 0.1, 0.3, 0.9, 1.0]
    x, ids = _logits(len(ps), 6), _ids(len(ps), 4, 6)
    ours = run(MinP, [MinP.Params(min_p=p, min_tokens_to_keep=keep) for p in ps], x, ids)
    ref = per_row_reference(lambda p: hf.MinPLogitsWarper(p, min_tokens_to_keep=keep), ps, x, ids)
    assert_same(ours, ref)


@pytest.mark.parametrize("keep", [1, 4, 200])
def test_typical_bitwise(keep):
    ms = [0.05, 0.2, 0.5, 0.9, 0.99]
    x, ids = _logits(len(ms), 7), _ids(len(ms), 4, 7)
    ours = run(Typical, [Typical.Params(typical_p=m, min_tokens_to_keep=keep) for m in ms], x, ids)
    ref = per_row_reference(lambda m: hf.TypicalLogitsWarper(m, min_tokens_to_keep=keep), ms, x, ids)
    assert_same(ours, ref)


@pytest.mark.parametrize("cls,hf_cls", [(EpsilonCutoff, hf.EpsilonLogitsWarper), (EtaCutoff, hf.EtaLogitsWarper)])
@pytest.mark.parametrize("keep", [1, 3, 50])
def test_epsilon_and_eta_bitwise(cls, hf_cls, keep):
    eps = [1e-4, 3e-3, 2e-2, 0.2, 0.9]
    x, ids = _logits(len(eps), 8), _ids(len(eps), 4, 8)
    ours = run(cls, [cls.Params(epsilon=e, min_tokens_to_keep=keep) for e in eps], x, ids)
    ref = per_row_reference(lambda e: hf_cls(e, min_tokens_to_keep=keep), eps, x, ids)
    assert_same(ours, ref)
    assert (torch.isfinite(ours).sum(-1) >= keep).all()


def test_mixed_keep_per_row_for_min_p_typical_epsilon():
    x, ids = _logits(3, 9), _ids(3, 4, 9)
    keeps = [1, 6, 40]
    for cls, hf_cls, field, value in [
        (MinP, hf.MinPLogitsWarper, "min_p", 0.5),
        (Typical, hf.TypicalLogitsWarper, "typical_p", 0.3),
        (EpsilonCutoff, hf.EpsilonLogitsWarper, "epsilon", 0.05),
        (EtaCutoff, hf.EtaLogitsWarper, "epsilon", 0.05),
    ]:
        ours = run(cls, [cls.Params(**{field: value}, min_tokens_to_keep=k) for k in keeps], x, ids)
        ref = per_row_reference(lambda k: hf_cls(value, min_tokens_to_keep=k), keeps, x, ids)
        assert_same(ours, ref)


# --------------------------------------------------------------------------- penalties and bans


def test_repetition_penalty_bitwise():
    pens = [1.2, 0.8, 1.5, 3.0]
    x, ids = _logits(4, 10), _ids(4, 60, 10, high=200)  # repeats within the history
    ours = run(RepetitionPenalty, [RepetitionPenalty.Params(penalty=p) for p in pens], x, ids)
    assert_same(ours, per_row_reference(lambda p: hf.RepetitionPenaltyLogitsProcessor(p), pens, x, ids))


def test_frequency_and_presence_penalties_against_brute_force():
    settings = [(0.5, 0.0), (0.0, 1.5), (-1.0, 2.0), (2.0, -2.0)]
    x, ids = _logits(4, 11), _ids(4, 50, 11, high=40)
    prompt_len = 20
    ours = run(FrequencyPresencePenalty,
               [FrequencyPresencePenalty.Params(frequency_penalty=f, presence_penalty=p) for f, p in settings],
               x, ids, prompt_len=prompt_len)
    ref = x.clone().double()
    for r, (f, p) in enumerate(settings):
        out = ids[r, prompt_len:].tolist()
        for tok in set(out):
            ref[r, tok] -= f * out.count(tok) + p
    assert torch.allclose(ours.double(), ref, atol=1e-5, rtol=0)
    assert torch.equal(ours[:, 200:], x[:, 200:])  # tokens never generated are untouched


def test_logit_bias_bitwise():
    biases = [{5: 3.5, 17: -100.0}, {}, {999: 0.25, 0: -1.0, 5: 7.0}]
    x, ids = _logits(3, 12), _ids(3, 4, 12)
    ours = run(LogitBias, [LogitBias.Params(bias=b) for b in biases], x, ids)
    for r, b in enumerate(biases):
        ref = hf.SequenceBiasLogitsProcessor([[[t], v] for t, v in b.items()])(ids, x.clone())[r] if b else x[r]
        assert_same(ours[r : r + 1], ref[None])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_bitwise(n):
    x, ids = _logits(4, 13), _ids(4, 40, 13, high=6)  # a tiny alphabet: many repeated n-grams
    ours = run(NoRepeatNGram, [NoRepeatNGram.Params(size=n)] * 4, x, ids)
    assert_same(ours, hf.NoRepeatNGramLogitsProcessor(n)(ids, x.clone()))
    assert torch.isinf(ours).any()


def test_bad_words_bitwise_only_where_the_next_token_completes_one():
    ids = torch.tensor([[7, 8, 9, 10, 11], [1, 2, 3, 4, 5], [11, 3, 4, 9, 10]])
    words = [[42], [10, 11, 77], [9, 10, 12], [5, 13], [4, 9, 10, 14], [3, 99]]
    x = _logits(3, 14)
    ours = run(BadWords, [BadWords.Params(token_ids=words)] * 3, x, ids)
    assert_same(ours, hf.NoBadWordsLogitsProcessor(words)(ids, x.clone()))
    banned = [set(torch.isinf(ours[r]).nonzero()[:, 0].tolist()) for r in range(3)]
    assert banned == [{42, 77}, {42, 13}, {42, 12, 14}]


def test_min_tokens_bitwise():
    x, ids = _logits(1, 15), _ids(1, 12, 15)
    for prompt_len, min_new in [(10, 3), (10, 2), (8, 5)]:
        ours = run(MinTokens, [MinTokens.Params(min_tokens=min_new)], x, ids, prompt_len=prompt_len)
        ref = hf.MinNewTokensLengthLogitsProcessor(prompt_len, min_new, [EOS])(ids, x.clone())
        assert_same(ours, ref)
    # stop_token_ids are masked too; EOS is not when ignore_eos
    sp = SamplingParams(min_tokens=4, stop_token_ids=[7, 9], ignore_eos=True)
    ours = run(MinTokens, [MinTokens.from_sampling_params(sp)], x, ids, prompt_len=10, sampling=sp)
    assert set(torch.isinf(ours[0]).nonzero()[:, 0].tolist()) == {7, 9}


# --------------------------------------------------------------------------- state across steps


@pytest.mark.parametrize("cls,params", [
    (RepetitionPenalty, RepetitionPenalty.Params(penalty=1.3)),
    (FrequencyPresencePenalty, FrequencyPresencePenalty.Params(frequency_penalty=0.4, presence_penalty=0.3)),
    (NoRepeatNGram, NoRepeatNGram.Params(size=2)),
    (NoRepeatNGram, NoRepeatNGram.Params(size=3)),
])
def test_incremental_state_equals_state_built_from_tokens(cls, params):
    """Prompt, then tokens fed through on_tokens (and a fork midway) == admitting the whole
    history at once (what happens when a preempted sequence resumes)."""
    sp = SamplingParams()
    prompt = _ids(1, 10, 16, high=8)[0].tolist()
    gen = _ids(1, 12, 17, high=8)[0].tolist()
    live = cls(_setup())
    history = list(prompt)
    slot = 3
    live.add_request(slot, params, RequestInfo(history, len(prompt), sp))
    for i, tok in enumerate(gen):
        live.on_tokens(StepContext.build([slot], [history], [len(prompt)]), torch.tensor([tok]))
        history.append(tok)
        if i == 5:  # fork into slot 0 and drop the original
            live.fork(slot, 0)
            live.remove(slot)
            slot = 0
    fresh = cls(_setup())
    fresh.add_request(1, params, RequestInfo(list(history), len(prompt), sp))
    x = _logits(1, 18)
    a = live.apply(x.clone(), StepContext.build([slot], [history], [len(prompt)]))
    b = fresh.apply(x.clone(), StepContext.build([1], [history], [len(prompt)]))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- the chain


def _seq(chain: ProcessorChain, sp: SamplingParams, tokens: list[int], n_prompt: int):
    return SimpleNamespace(slot=None, token_ids=tokens, num_prompt_tokens=n_prompt,
                           request=SimpleNamespace(params=sp, processors=chain.resolve(sp)))


def _chain(tokenizer=None) -> ProcessorChain:
    return ProcessorChain(PluginManager(load_entry_points=False).registry("logits_processor"), _setup(tokenizer))


def test_chain_matches_hf_processor_list():
    sp = SamplingParams(
        temperature=0.7, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3, no_repeat_ngram_size=2,
        logit_bias={3: 2.0, 4: -1.0}, bad_words_ids=[[5], [6, 7]], min_tokens=3, max_tokens=20,
    )
    ids = _ids(1, 30, 19, high=50)
    ids[0, -1] = 6
    x = _logits(1, 19, scale=2.0)
    ref_list = hf.LogitsProcessorList([
        hf.SequenceBiasLogitsProcessor([[[3], 2.0], [[4], -1.0]]),
        hf.RepetitionPenaltyLogitsProcessor(1.3),
        hf.NoRepeatNGramLogitsProcessor(2),
        hf.NoBadWordsLogitsProcessor([[5], [6, 7]]),
        hf.MinNewTokensLengthLogitsProcessor(28, 3, [EOS]),
        hf.TemperatureLogitsWarper(0.7),
        hf.TopKLogitsWarper(40),
        hf.TopPLogitsWarper(0.9),
        hf.MinPLogitsWarper(0.02),
    ])
    ref = ref_list(ids, x.clone())
    chain = _chain()
    seq = _seq(chain, sp, ids[0].tolist(), 28)
    assert [u.name for u in seq.request.processors] == [
        "logit_bias", "repetition_penalty", "no_repeat_ngram", "bad_words", "min_tokens",
        "temperature", "top_k", "top_p", "min_p",
    ]
    ours, plan = chain.apply([seq], x)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    assert torch.isfinite(ours).sum() > 1


def test_chain_rows_without_processors_are_untouched_and_state_is_released():
    chain = _chain()
    x = _logits(4, 20)
    plain = SamplingParams()
    seqs = [
        _seq(chain, plain, [1, 2, 3], 3),
        _seq(chain, SamplingParams(repetition_penalty=1.5, top_k=3), [1, 2, 3], 3),
        _seq(chain, SamplingParams(temperature=0), [4, 5], 2),
        _seq(chain, SamplingParams(temperature=0, frequency_penalty=1.0), [4, 5], 2),
    ]
    ours, plan = chain.apply(seqs, x)
    assert torch.equal(ours[0], x[0]) and torch.equal(ours[2], x[2])
    assert not torch.equal(ours[1], x[1])
    assert torch.equal(ours[3], x[3])  # nothing generated yet: no frequency penalty
    assert [s.slot for s in seqs] == [None, 0, None, 1]
    chain.on_tokens(plan, torch.tensor([9, 9, 9, 9]))
    for s in seqs:
        s.token_ids.append(9)
    ours, _ = chain.apply(seqs, x)
    assert ours[3, 9] == x[3, 9] - 1.0
    for s in seqs:
        chain.release(s)
    assert chain.num_slots_in_use == 0
    assert all(not users for users in chain._users.values())
    none, plan = chain.apply(seqs[::2], x[:2])  # no processor in use: the logits come back as they are
    assert none is x[:2] or torch.equal(none, x[:2])
    assert plan is None


def test_greedy_requests_skip_temperature_and_truncation():
    chain = _chain()
    greedy = chain.resolve(SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.1, typical_p=0.5, repetition_penalty=1.2))
    assert [u.name for u in greedy] == ["repetition_penalty"]
    assert chain.resolve(SamplingParams()) == ()


def test_every_builtin_is_registered_with_a_strict_params_model():
    reg = PluginManager(load_entry_points=False).registry("logits_processor")
    for name, cls in LOGITS_PROCESSORS.items():
        entry = reg.get(name)
        assert entry.factory is cls and entry.params is cls.Params
        assert cls.Params.model_config.get("extra") == "forbid"


def test_processors_named_in_sampling_params():
    chain = _chain()
    uses = chain.resolve(SamplingParams(processors=[{"top_k": {"top_k": 4}}, {"repetition_penalty": {"penalty": 1.1}}, "frequency_presence_penalty"]))
    assert [(u.name, u.params.model_dump()) for u in uses] == [  # in chain order, not listed order
        ("repetition_penalty", {"penalty": 1.1}),
        ("frequency_presence_penalty", {"frequency_penalty": 0.0, "presence_penalty": 0.0}),
        ("top_k", {"top_k": 4, "min_tokens_to_keep": 1}),
    ]
    with pytest.raises(InvalidRequestError, match=r"top_k params: top_k: Field required"):
        chain.resolve(SamplingParams(processors=["top_k"]))
    with pytest.raises(InvalidRequestError, match=r"repetition_penalty params: penalty: Input should be greater than 0"):
        chain.resolve(SamplingParams(processors=[{"repetition_penalty": {"penalty": -1}}]))
    with pytest.raises(InvalidRequestError, match=r"top_k params: top_k: Field required; tok: unknown field"):
        chain.resolve(SamplingParams(processors=[{"top_k": {"tok": 4}}]))
    with pytest.raises(InvalidRequestError, match=r"unknown logits processor 'top_kk'; did you mean 'top_k'"):
        chain.resolve(SamplingParams(processors=["top_kk"]))
    with pytest.raises(InvalidRequestError, match=r"'top_k' is set twice"):
        chain.resolve(SamplingParams(top_k=3, processors=[{"top_k": {"top_k": 4}}]))


@pytest.mark.parametrize("kwargs,message", [
    ({"logit_bias": {V + 3: 1.0}}, rf"logit_bias: token id\(s\) \[{V + 3}\] outside the vocabulary \[0, {V}\)"),
    ({"bad_words_ids": [[1, V]]}, rf"bad_words: token id\(s\) \[{V}\] outside the vocabulary"),
    ({"bad_words": ["hello"]}, r"bad_words: bad words need a tokenizer"),
    ({"min_tokens": 2, "stop_token_ids": [V + 1]}, r"min_tokens: token id\(s\) \[1001\] outside the vocabulary"),
])
def test_request_checks_that_need_the_model(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        _chain().resolve(SamplingParams(**kwargs))


@pytest.mark.parametrize("kwargs,message", [
    ({"min_p": 1.5}, "min_p: Input should be less than or equal to 1"),
    ({"typical_p": 0.0}, "typical_p: Input should be greater than 0"),
    ({"epsilon_cutoff": 1.0}, "epsilon_cutoff: Input should be less than 1"),
    ({"eta_cutoff": -0.1}, "eta_cutoff: Input should be greater than or equal to 0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty: Input should be greater than 0"),
    ({"frequency_penalty": 2.5}, "frequency_penalty: Input should be less than or equal to 2"),
    ({"presence_penalty": -3}, "presence_penalty: Input should be greater than or equal to -2"),
    ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size: Input should be greater than or equal to 0"),
    ({"logit_bias": {1: 101}}, r"logit_bias: bias 101.0 for token 1 is outside \[-100, 100\]"),
    ({"logit_bias": {-1: 1}}, "logit_bias: token id -1 is negative"),
    ({"bad_words": [""]}, "bad_words: bad words must not be empty"),
    ({"bad_words_ids": [[]]}, "bad_words_ids: a bad word token sequence must not be empty"),
    ({"min_tokens": 30, "max_tokens": 10}, r"min_tokens \(30\) must not exceed max_tokens \(10\)"),
    ({"min_tokens_to_keep": 0}, "min_tokens_to_keep: Input should be greater than or equal to 1"),
    ({"processors": [{"a": {}, "b": {}}]}, "each processor entry names one processor"),
])
def test_bad_sampling_values_are_typed_errors(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_chain_fork_copies_state():
    """A fork (beam search, n > 1 after the first token) continues with the parent's state."""
    chain = _chain()
    sp = SamplingParams(repetition_penalty=1.4, frequency_penalty=0.7, no_repeat_ngram_size=2, top_k=30)
    parent = _seq(chain, sp, _ids(1, 20, 23, high=30)[0].tolist(), 20)
    x = _logits(2, 24)
    _, plan = chain.apply([parent], x[:1])
    for tok in (4, 9, 4):
        chain.on_tokens(plan, torch.tensor([tok]))
        parent.token_ids.append(tok)
        _, plan = chain.apply([parent], x[:1])
    child = SimpleNamespace(slot=None, token_ids=list(parent.token_ids), num_prompt_tokens=20, request=parent.request)
    chain.fork(parent, child)
    assert child.slot is not None and child.slot != parent.slot
    both = chain.apply([parent, child], torch.cat([x[:1], x[:1]]))[0].clone()  # valid until the next apply
    assert torch.equal(both[0], both[1])
    fresh = _seq(chain, sp, list(parent.token_ids), 20)  # the same state built from the tokens
    again, _ = chain.apply([fresh], x[:1])
    assert torch.equal(again[0], both[0])
    for s in (parent, child, fresh):
        chain.release(s)
    assert chain.num_slots_in_use == 0
