"""Logits processors in the engine: HF generate parity end to end, batch invariance with mixed
settings, preemption, n > 1, abort, bad requests, bad words and min_tokens on real text."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, VOCAB
from framework import LLM, InvalidRequestError, SamplingParams
from plugins.samplers.bans import tokenize_bad_words


def _prompts(n: int, seed: int, lo: int = 4, hi: int = 40, high: int = VOCAB) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(3, high, (L,), generator=g).tolist() for L in lens]


def _ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def _no_leaks(llm) -> None:
    chain = llm.engine.processors
    assert chain.num_slots_in_use == 0
    assert all(not users for users in chain._users.values())
    assert llm.engine.block_manager.check_all_free()


def _hf_greedy(path, prompts, new_tokens: int, **kwargs) -> list[list[int]]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    refs = []
    for p in prompts:
        with torch.no_grad():
            g = hf.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, pad_token_id=0, **kwargs)
        refs.append(g[0, len(p):].tolist())
    return refs


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_with_repetition_penalty_matches_transformers(checkpoints, family):
    prompts = _prompts(3, seed=1, lo=5, hi=30)
    refs = _hf_greedy(checkpoints[family], prompts, 32, repetition_penalty=1.3)
    llm = LLM(str(checkpoints[family]), skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=32, min_tokens=32, temperature=0, repetition_penalty=1.3)
    assert _ids(llm.generate([{"prompt_token_ids": p} for p in prompts], params)) == [[r] for r in refs]
    plain = llm.generate({"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    assert plain[0].outputs[0].token_ids != refs[0]  # the penalty changed something
    _no_leaks(llm)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("n", [2, 3])
def test_greedy_with_no_repeat_ngram_matches_transformers(checkpoints, family, n):
    prompts = _prompts(3, seed=2, lo=5, hi=30)
    refs = _hf_greedy(checkpoints[family], prompts, 40, no_repeat_ngram_size=n)
    llm = LLM(str(checkpoints[family]), skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=40, min_tokens=40, temperature=0, no_repeat_ngram_size=n)
    assert _ids(llm.generate([{"prompt_token_ids": p} for p in prompts], params)) == [[r] for r in refs]
    _no_leaks(llm)


def test_greedy_with_penalties_bans_and_bias_matches_transformers(checkpoints):
    path = checkpoints["mistral"]
    prompts = _prompts(2, seed=3, lo=10, hi=30)
    free = LLM(str(path), skip_tokenizer_init=True).generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    a, b = free[0].outputs[0].token_ids[:2]
    bad = [[a], [b, free[1].outputs[0].token_ids[0]]]
    refs = _hf_greedy(path, prompts, 20, repetition_penalty=1.2, no_repeat_ngram_size=3,
                      bad_words_ids=bad, sequence_bias={(7,): 1.5, (9,): -2.0})
    llm = LLM(str(path), skip_tokenizer_init=True)
    params = SamplingParams(max_tokens=20, min_tokens=20, temperature=0, repetition_penalty=1.2,
                            no_repeat_ngram_size=3, bad_words_ids=bad, logit_bias={7: 1.5, 9: -2.0})
    assert _ids(llm.generate([{"prompt_token_ids": p} for p in prompts], params)) == [[r] for r in refs]


MIXED = [
    dict(temperature=0.9, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2, frequency_penalty=0.5,
         presence_penalty=0.3, seed=11),
    dict(temperature=0, no_repeat_ngram_size=2, bad_words_ids=[[5], [6, 7]], logit_bias={8: 3.0}),
    dict(temperature=1.1, typical_p=0.8, epsilon_cutoff=0.001, eta_cutoff=0.002, min_tokens_to_keep=3, seed=12),
    dict(temperature=0.7, seed=13, min_tokens=5, stop_token_ids=[10, 11]),
    dict(temperature=0),
    dict(temperature=1.0, seed=14),
]


def _mixed_params(i: int, max_tokens: int = 20) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **MIXED[i % len(MIXED)])


def test_batch_invariance_with_mixed_processor_settings(checkpoints):
    path = str(checkpoints["qwen3"])
    llm = LLM(path, skip_tokenizer_init=True, enable_chunked_prefill=True, max_num_batched_tokens=64)
    prompts = [{"prompt_token_ids": p} for p in _prompts(18, seed=4)]
    params = [_mixed_params(i, 12 + i) for i in range(18)]
    together = _ids(llm.generate(prompts, params))
    for i in (0, 1, 2, 3, 7, 8):
        alone = _ids(llm.generate(prompts[i], params[i]))
        assert alone[0] == together[i], i
    # the same requests in a different order, with a different engine
    order = list(range(18))[::-1]
    again = _ids(LLM(path, skip_tokenizer_init=True).generate([prompts[i] for i in order], [params[i] for i in order]))
    assert [again[order.index(i)] for i in range(18)] == together
    _no_leaks(llm)


def test_preemption_with_processors_gives_same_outputs(checkpoints):
    path = str(checkpoints["llama"])
    prompts = [{"prompt_token_ids": p} for p in _prompts(12, seed=5, lo=30, hi=60)]
    params = [_mixed_params(i, 36) for i in range(12)]
    ref = _ids(LLM(path, skip_tokenizer_init=True).generate(prompts, params))
    llm = LLM(path, skip_tokenizer_init=True, block_size=8, num_kv_blocks=30, max_num_batched_tokens=64)
    assert _ids(llm.generate(prompts, params)) == ref
    assert llm.engine.stats()["num_preemptions"] > 0
    _no_leaks(llm)


def test_n_samples_each_keep_their_own_state(checkpoints):
    llm = LLM(str(checkpoints["qwen2"]), skip_tokenizer_init=True)
    prompt = {"prompt_token_ids": _prompts(1, seed=6, lo=20, hi=21, high=12)[0]}
    out = llm.generate(prompt, SamplingParams(n=4, max_tokens=30, temperature=1.0, seed=3, ignore_eos=True,
                                              no_repeat_ngram_size=2, frequency_penalty=0.5))[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    n_prompt = len(prompt["prompt_token_ids"])
    for c in out.outputs:
        full = prompt["prompt_token_ids"] + c.token_ids
        for j in range(n_prompt, len(full)):  # no generated token completes a bigram seen before
            assert (full[j - 1], full[j]) not in set(zip(full[: j - 1], full[1:j]))
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, repetition_penalty=1.5)
    one = llm.generate(prompt, greedy)[0].outputs[0].token_ids
    two = llm.generate(prompt, greedy.model_copy(update={"n": 2}))[0]
    assert [c.token_ids for c in two.outputs] == [one, one]
    _no_leaks(llm)


def test_abort_releases_processor_state(checkpoints):
    llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True)
    engine = llm.engine
    for i, p in enumerate(_prompts(3, seed=7)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, _mixed_params(i, 30))
    for _ in range(4):
        engine.step()
    assert engine.processors.num_slots_in_use == 3
    engine.abort_request("r1")
    assert engine.processors.num_slots_in_use == 2
    while engine.has_unfinished_requests():
        engine.step()
    _no_leaks(llm)


@pytest.mark.parametrize("params,message", [
    ({"logit_bias": {VOCAB: 1.0}}, rf"logit_bias: token id\(s\) \[{VOCAB}\] outside the vocabulary \[0, {VOCAB}\)"),
    ({"bad_words": ["x"]}, "bad_words: bad words need a tokenizer"),
    ({"bad_words_ids": [[1, VOCAB + 1]]}, "outside the vocabulary"),
    ({"min_tokens": 3, "max_tokens": 2}, r"min_tokens \(3\) must not exceed max_tokens \(2\)"),
    ({"processors": ["nope"]}, "unknown logits processor 'nope'"),
    ({"presence_penalty": 9}, "presence_penalty: Input should be less than or equal to 2"),
])
def test_bad_processor_values_are_rejected_and_engine_keeps_serving(checkpoints, params, message):
    llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True)
    engine = llm.engine
    good = _mixed_params(0, 10)
    prompt = {"prompt_token_ids": _prompts(1, 8)[0]}
    ref = _ids(llm.generate(prompt, good))
    engine.add_request("good", prompt, good)
    engine.step()
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request("bad", prompt, params)
    assert set(engine.requests) == {"good"}
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert _ids(outs) == ref
    _no_leaks(llm)


def test_logit_bias_and_min_tokens(checkpoints):
    llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True)
    prompt = {"prompt_token_ids": _prompts(1, 9)[0]}
    forced = llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0, logit_bias={17: 100.0}))[0]
    assert forced.outputs[0].token_ids == [17] * 6
    free = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0].token_ids
    stop = free[1]
    early = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop]))[0].outputs[0]
    assert early.token_ids == free[: free.index(stop) + 1] and early.finish_reason == "stop"
    late = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop], min_tokens=6))[0].outputs[0]
    assert stop not in late.token_ids[:6] and len(late.token_ids) >= 6
    # EOS is masked too: with every logit but EOS banned, min_tokens still makes it generate
    eos_only = {t: -100.0 for t in range(VOCAB) if t != 2}
    out = llm.generate(prompt, SamplingParams(max_tokens=10, temperature=0, min_tokens=4, logit_bias=eos_only))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == 2 and out.finish_reason == "stop"


@pytest.fixture(scope="module")
def text_llm(text_model):
    return LLM(str(text_model))


def test_min_tokens_defers_stop_strings(text_llm):
    tok = text_llm.tokenizer
    prompt = "Once upon a time"
    for seed in range(30):  # a sample whose first few tokens hold a printable 2-character string
        base = dict(max_tokens=30, temperature=1.0, seed=seed, ignore_eos=True)
        ids = text_llm.generate(prompt, SamplingParams(**base))[0].outputs[0].token_ids
        head = tok.decode(ids[:4])
        stops = [head[i : i + 2] for i in range(len(head) - 1) if head[i : i + 2].isalnum()]
        if stops:
            break
    else:  # pragma: no cover
        pytest.fail("no printable text in 30 samples")
    early = text_llm.generate(prompt, SamplingParams(**base, stop=[stops[0]]))[0].outputs[0]
    assert early.finish_reason == "stop" and len(early.token_ids) <= 4
    late = text_llm.generate(prompt, SamplingParams(**base, stop=[stops[0]], min_tokens=10))[0].outputs[0]
    assert len(late.token_ids) >= 10 and late.token_ids[:10] == ids[:10]


def test_bad_words_tokenized_like_vllm_and_never_generated(text_llm):
    tok = text_llm.tokenizer
    words = ["quick brown", " fox", "The", "lazy", "time"]
    expected = []
    for w in words:  # vLLM's rule: the word, and the word after a space if that is another token sequence of the same length
        plain = tok.encode(w.lstrip(), add_special_tokens=False)
        spaced = tok.encode(" " + w.lstrip(), add_special_tokens=False)
        expected += [plain] + ([spaced] if spaced[0] != plain[0] and len(spaced) == len(plain) else [])
    assert tokenize_bad_words(tok, words) == expected
    assert len(expected) > len(words)  # some words have a distinct mid-text form
    prompt = "The quick brown fox jumps over the lazy dog. The"
    base = dict(max_tokens=40, temperature=1.0, seed=5, ignore_eos=True)
    free = text_llm.generate(prompt, SamplingParams(**base))[0].outputs[0].token_ids
    # words the random model produced, as single tokens (with or without a leading space)
    words = list(dict.fromkeys(w for w in (tok.decode([t]).strip() for t in free) if len(w) > 1 and w.isalpha()))[:3]
    assert words, tok.decode(free)
    sequences = tokenize_bad_words(tok, words)
    contains = lambda out, s: any(out[i : i + len(s)] == s for i in range(len(out)))  # noqa: E731
    assert any(contains(free, s) for s in sequences)
    banned = text_llm.generate(prompt, SamplingParams(**base, bad_words=words))[0].outputs[0]
    for s in sequences:
        assert not contains(banned.token_ids, s), (s, banned.text)
    assert len(banned.token_ids) == 40
    _no_leaks(text_llm)


def test_third_party_processor_from_a_plugin(checkpoints):
    """The example of docs/plugins.md: registered through the hook, named per request."""
    import types

    from pydantic import BaseModel, ConfigDict

    from framework.hookspecs import hookimpl
    from framework.plugins import PluginManager

    class BoostParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        token: int
        amount: float = 1.0

    class Boost:
        def __init__(self, setup):
            self.amount = torch.zeros(256, device=setup.device)
            self.token = torch.zeros(256, dtype=torch.long, device=setup.device)

        def add_request(self, slot, params, request):
            self.amount[slot], self.token[slot] = params.amount, params.token

        def remove(self, slot):
            pass

        def apply(self, logits, ctx):
            rows = torch.arange(len(ctx), device=logits.device)
            logits[rows, self.token[ctx.slot_index]] += self.amount[ctx.slot_index]
            return logits

    plugin = types.ModuleType("boost_plugin")
    plugin.register_logits_processors = hookimpl(lambda register: register("boost", Boost, params=BoostParams))
    pm = PluginManager(load_entry_points=False, extra_plugins=[plugin])
    llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, plugin_manager=pm)
    prompts = [{"prompt_token_ids": p} for p in _prompts(2, seed=10)]
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = _ids(llm.generate(prompts[1], plain))
    boosted = plain.model_copy(update={"processors": [{"boost": {"token": 17, "amount": 100.0}}]})
    outs = _ids(llm.generate(prompts, [boosted, plain]))
    assert outs == [[[17] * 8], ref[0]]
    with pytest.raises(InvalidRequestError, match="boost params: tokn: unknown field"):
        llm.generate(prompts[0], SamplingParams(processors=[{"boost": {"token": 1, "tokn": 2}}]))
    _no_leaks(llm)
