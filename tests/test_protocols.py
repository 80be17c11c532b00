"""The core protocols as a third-party plugin author uses them: strategies with multi-token verify
steps, processor order, rollback/extend, rerankers (request-finish stage), KV policies, drafters."""

from __future__ import annotations

import types

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from framework import LLM, SamplingParams
from framework.errors import ConfigError, InvalidRequestError
from framework.hookspecs import hookimpl
from framework.plugins import PluginManager
from framework.rerankers import ScoredCandidate

from conftest import VOCAB


def _prompts(n, seed=0, lens=(5, 9, 14, 3, 7, 11)):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(3, VOCAB, (lens[i % len(lens)],), generator=g).tolist()} for i in range(n)]


def _ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def _pm(**hooks):
    plugin = types.ModuleType("test_plugin")
    for name, fn in hooks.items():
        setattr(plugin, name, hookimpl(fn))
    return PluginManager(load_entry_points=False, extra_plugins=[plugin])


# ------------------------------------------------------------------------------ strategies
class GuessingVerifier:
    """A toy speculative strategy: guess the next tokens by repeating the last ones, verify
    every guess in one forward (extra logits rows), accept greedily, cut the KV back."""

    name = "guess"
    streams = True
    stats = {"rows": 0, "accepted": 0, "rejected": 0}

    def __init__(self, core):
        self.core = core

    def claims(self, params):
        return params.temperature == 0 and not params.use_beam_search and params.n == 1

    def prepare(self, request):
        request.forked = True

    def before_schedule(self, seqs):
        for seq in seqs:
            if seq.num_computed_tokens == seq.num_tokens - 1 and not seq.draft:  # decoding
                left = seq.request.params.max_tokens - seq.num_output_tokens - 1
                seq.draft = seq.token_ids[-3:][: max(0, left)]

    def after_forward(self, rows, now):
        core = self.core
        for i, seq in enumerate(rows.seqs):
            start, count = rows.starts[i], rows.counts[i]
            best = rows.logits[start : start + count].argmax(dim=-1).tolist()
            draft = list(seq.draft)
            GuessingVerifier.stats["rows"] += count
            a = 0
            while a < len(draft) and draft[a] == best[a]:
                a += 1
            GuessingVerifier.stats["accepted"] += a
            GuessingVerifier.stats["rejected"] += len(draft) - a
            core.truncate_kv(seq, seq.num_tokens + a)  # the accepted drafts' KV stays
            core.extend(seq, draft[:a] + [best[a]], now)
        return [s.request for s in rows.seqs]


def test_a_plugin_strategy_verifies_several_tokens_per_forward_exactly(checkpoints):
    GuessingVerifier.stats = {"rows": 0, "accepted": 0, "rejected": 0}
    pm = _pm(register_strategies=lambda register: register("guess", GuessingVerifier))
    spec_llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, plugin_manager=pm, block_size=4, max_num_seqs=16)
    plain_llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, block_size=4)
    prompts = _prompts(12, seed=4)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=8, temperature=0.9, seed=5, ignore_eos=True)  # not claimed: plain sampling
    got = spec_llm.generate(prompts + prompts[:2], [params] * 12 + [sampled] * 2)
    ref = plain_llm.generate(prompts + prompts[:2], [params] * 12 + [sampled] * 2)
    assert _ids(got) == _ids(ref)  # exact: the drafts changed nothing but the number of forwards
    st = GuessingVerifier.stats
    assert st["rows"] > 12 * 20 // 2 and st["rejected"] > 0  # several rows per sequence were verified
    assert spec_llm.engine.check_all_free()
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 20 for o in got[:12])


# ------------------------------------------------------------------------------ processor order
class _Opt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AddSeven:
    """+10 on token 7."""

    def __init__(self, setup):
        pass

    def add_request(self, slot, params, request):
        pass

    def remove(self, slot):
        pass

    def apply(self, logits, ctx):
        logits[:, 7] += 10.0
        return logits


class Negate(AddSeven):
    """Flip every logit's sign."""

    def apply(self, logits, ctx):
        return -logits


def test_guidance_processors_run_in_the_order_each_request_lists_them(checkpoints):
    def reg(register):
        register("add_seven", AddSeven, params=_Opt)
        register("negate", Negate, params=_Opt)

    llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, plugin_manager=_pm(register_logits_processors=reg))
    p = _prompts(1, seed=9)[0]
    base = dict(max_tokens=6, temperature=0, ignore_eos=True)
    a_then_n = SamplingParams(**base, processors=["add_seven", "negate"])
    n_then_a = SamplingParams(**base, processors=["negate", "add_seven"])
    solo = [_ids(llm.generate(p, x))[0][0] for x in (a_then_n, n_then_a)]
    assert solo[1] == [7] * 6  # -logits + 10 on token 7: it wins every step
    assert 7 not in solo[0]  # -(logit + 10): token 7 never wins
    both = _ids(llm.generate([p, p], [a_then_n, n_then_a]))  # one batch, two orders
    assert [b[0] for b in both] == solo


class CountingTokens:
    """Keeps, per slot, the tokens it was told about (on_tokens/extend/rollback), and checks it
    against the sequence at every step."""

    def __init__(self, setup):
        self.seen: dict[int, list[int]] = {}
        self.errors: list[str] = []

    def add_request(self, slot, params, request):
        self.seen[slot] = list(request.token_ids)

    def remove(self, slot):
        self.seen.pop(slot, None)

    def on_tokens(self, ctx, tokens):
        for slot, t in zip(ctx.slots, tokens.tolist()):
            self.seen[slot].append(t)

    def apply(self, logits, ctx):
        for slot, toks in zip(ctx.slots, ctx.token_ids):
            if self.seen[slot] != list(toks):
                self.errors.append(f"slot {slot}: {self.seen[slot][-4:]} vs {list(toks)[-4:]}")
        return logits


def test_on_tokens_state_follows_forced_tokens_forks_and_verify_steps(checkpoints):
    """A processor that only implements on_tokens stays in step through extend (replayed one
    token at a time), rollback (rebuilt from the tokens) and forks."""
    state = {}

    def factory(setup):
        state["p"] = CountingTokens(setup)
        return state["p"]

    pm = _pm(register_logits_processors=lambda register: register("counting", factory, params=_Opt),
             register_strategies=lambda register: register("guess", GuessingVerifier))
    llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, plugin_manager=pm, block_size=4)
    prompts = _prompts(4, seed=2)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, processors=["counting"]),
              SamplingParams(max_tokens=12, temperature=0.7, n=3, seed=1, ignore_eos=True, processors=["counting"])] * 2
    llm.generate(prompts, params)
    assert state["p"].errors == []
    assert llm.engine.check_all_free()


# ------------------------------------------------------------------------------ rerankers
class ShortestFirst:
    """Best = fewest tokens; counts its batched calls."""

    calls: list[int] = []

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        reverse: bool = False

    def __init__(self, setup):
        self.setup = setup

    def select_many(self, requests):
        ShortestFirst.calls.append(len(requests))
        out = []
        for r in requests:
            order = sorted(range(len(r.candidates)), key=lambda i: len(r.candidates[i].text), reverse=r.options.reverse)
            out.append([ScoredCandidate(i, -float(len(r.candidates[i].text))) for i in order])
        return out


def test_rerankers_choose_among_candidates_batched_per_step(text_model):
    ShortestFirst.calls = []
    pm = _pm(register_rerankers=lambda register: register("shortest", ShortestFirst, params=ShortestFirst.Params))
    llm = LLM(str(text_model), plugin_manager=pm)
    prompts = ["hello world", "the engine", "a b c"]
    params = SamplingParams(max_tokens=12, temperature=1.0, n=2, best_of=6, seed=0, ignore_eos=True, reranker={"shortest": {}})
    outs = llm.generate(prompts, params)
    plain = llm.generate(prompts, params.model_copy(update={"reranker": None, "best_of": None, "n": 6}))
    assert ShortestFirst.calls == [3]  # all three finished in the same step: one batched call
    for o, p in zip(outs, plain):
        lens = sorted(len(c.text) for c in p.outputs)
        assert [len(c.text) for c in o.outputs] == lens[:2]  # the same six candidates, shortest two first
        assert [c.index for c in o.outputs] == [0, 1] and all(c.score == -len(c.text) for c in o.outputs)
    # the built-in logprob reranker: best_of without a reranker, or named with options
    by_lp = llm.generate(prompts[0], params.model_copy(update={"reranker": {"logprob": {}}}))[0]
    lps = [c.cumulative_logprob for c in by_lp.outputs]
    assert lps == sorted(lps, reverse=True) and [c.score for c in by_lp.outputs] == lps
    with pytest.raises(InvalidRequestError, match="unknown reranker 'shortes'; did you mean 'shortest'"):
        llm.generate(prompts[0], params.model_copy(update={"reranker": {"shortes": {}}}))
    with pytest.raises(InvalidRequestError, match="reverse"):
        llm.generate(prompts[0], params.model_copy(update={"reranker": {"shortest": {"reverse": "x"}}}))
    assert llm.engine.check_all_free()


def test_streaming_is_off_for_reranked_requests(text_model):
    llm = LLM(str(text_model))
    eng = llm.engine
    eng.add_request("r", "hello world", SamplingParams(max_tokens=8, n=1, best_of=3, seed=0), stream=True)
    partial = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            partial.append(out.finished)
    assert partial == [True]  # one output: the final choice


# ------------------------------------------------------------------------------ KV policy, drafters
class CountingPolicy:
    unbounded = False
    calls = 0

    def __init__(self, every: int = 1):
        self.every = every

    def after_compute(self, kv, pool):
        CountingPolicy.calls += 1


class _Every(BaseModel):
    model_config = ConfigDict(extra="forbid")
    every: int = 1


def test_kv_policy_is_resolved_from_the_registry_and_called(checkpoints):
    CountingPolicy.calls = 0
    pm = _pm(register_kv_policies=lambda register: register("counting", CountingPolicy, params=_Every))
    llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, plugin_manager=pm, kv_policy={"counting": {"every": 2}})
    llm.generate(_prompts(2), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert CountingPolicy.calls >= 2 * 5
    with pytest.raises(ValueError, match="every"):
        LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, plugin_manager=pm, kv_policy={"counting": {"every": "x"}})


class EchoDrafter:
    """Proposes nothing; remembers how it was built."""

    built: list = []

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid")
        num_tokens: int = 4

    def __init__(self, setup, params):
        EchoDrafter.built.append((setup.vocab_size, params.num_tokens))

    def propose(self, seqs, num_tokens):
        return []

    def accepted(self, seq, n):
        pass


def test_drafter_is_built_from_the_registry_once_per_engine(checkpoints):
    EchoDrafter.built = []
    pm = _pm(register_drafters=lambda register: register("echo", EchoDrafter, params=EchoDrafter.Params))
    llm = LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, plugin_manager=pm, drafter={"echo": {"num_tokens": 3}})
    assert EchoDrafter.built == [(VOCAB, 3)] and isinstance(llm.engine.core.drafter, EchoDrafter)
    with pytest.raises(ConfigError, match="unknown drafter 'ecco'; did you mean 'echo'"):
        LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, plugin_manager=pm, drafter={"ecco": {}})
    with pytest.raises(ConfigError, match="num_tokens"):
        LLM(str(checkpoints["llama"]), skip_tokenizer_init=True, plugin_manager=pm, drafter={"echo": {"num_tokens": "x"}})


# ------------------------------------------------------------------------------ constraint rollback
def test_constraint_rollback_then_readvance_gives_identical_masks():
    from framework.processors import RequestInfo

    llm = LLM("demo")
    proc = llm.engine.processors.instance("constraint")
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"enum": ["a", "bc"]}}},
              "required": ["name", "tags"]}
    handle = proc.prepare(("json_schema", schema), SamplingParams())
    handle.future.result(timeout=60)
    prompt = llm.tokenizer.encode("A record:")
    proc.add_request(0, handle, RequestInfo(prompt, len(prompt), SamplingParams()))
    words = (llm.tokenizer.vocab_size + 31) // 32
    bm = torch.zeros((1, words), dtype=torch.int32)
    g = torch.Generator().manual_seed(0)

    def mask():
        proc.fill([0], bm)
        return bm[0].clone()

    def allowed(m):
        bits = ((m[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten().bool()
        return torch.nonzero(bits).flatten().tolist()

    masks, tokens = [mask()], []
    for _ in range(25):
        choices = [t for t in allowed(masks[-1]) if t not in llm.engine.eos_token_ids]
        tok = choices[int(torch.randint(len(choices), (1,), generator=g))]
        proc.extend(0, [tok], None)
        tokens.append(tok)
        masks.append(mask())
    for n in (1, 5, 12):
        proc.rollback(0, n)
        assert torch.equal(mask(), masks[-1 - n])
        for k, tok in enumerate(tokens[len(tokens) - n :]):
            proc.extend(0, [tok], None)
            assert torch.equal(mask(), masks[len(tokens) - n + k + 1])
    proc.remove(0)
