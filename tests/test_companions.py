"""Companion models in the continuous batch: lockstep KV, candidate forwards, driven pools.

References: each companion's logits are checked against the same model run alone over the same
tokens (a fresh cache, one forward) and against transformers; candidate scores against one
full uncached forward of the scorer per candidate.
"""

from __future__ import annotations

import types

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from framework import LLM, SamplingParams
from framework.demo import DEMO_DIR
from framework.hookspecs import hookimpl
from framework.kv_cache import BlockManager, KVCacheStorage
from framework.model_runner import ForwardItem, ModelRunner
from framework.models.loader import load_model
from framework.plugins import PluginManager
from framework.sequence import Request, Sequence, SeqKV


class ProbeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str = "demo-draft"
    top_k: int = 0  # > 0: also score the top-k candidates with the companion


class Probe:
    """Records what a companion gives for each row: its lockstep outputs and, with top_k, its
    candidate outputs. Leaves the logits alone."""

    records: list = []

    def __init__(self, setup):
        self.setup = setup
        self.params = {}

    def companions(self, params):
        return [self.setup.models.get(params.model)]

    def add_request(self, slot, params, request):
        self.params[slot] = params

    def remove(self, slot):
        self.params.pop(slot, None)

    def apply(self, logits, ctx):
        p = self.params[ctx.slots[0]]
        comp = self.setup.models.get(p.model)
        out = comp.outputs(ctx)
        cand = None
        if p.top_k:
            top = logits.topk(p.top_k, dim=-1).indices
            cand = (top, comp.candidates(ctx, top))
        for r in range(len(ctx)):
            Probe.records.append((tuple(ctx.token_ids[r]), out[r].clone(),
                                  None if cand is None else (cand[0][r].tolist(), cand[1][r].clone())))
        return logits


def _pm():
    plugin = types.ModuleType("probe_plugin")
    plugin.register_logits_processors = hookimpl(lambda register: register("probe", Probe, params=ProbeParams))
    return PluginManager(load_entry_points=False, extra_plugins=[plugin])


def _alone(name: str, prefix: tuple[int, ...]) -> torch.Tensor:
    """The model run alone over ``prefix``: a fresh cache, one forward, logits after the last token."""
    model, cfg, _ = _MODELS.setdefault(name, load_model(name))
    kv = KVCacheStorage(cfg, 64, 16, model.dtype, torch.device("cpu"))
    bm = BlockManager(64, 16)
    table: list[int] = []
    assert bm.ensure_slots(table, len(prefix))
    hidden = ModelRunner(model, cfg, kv, 16, torch.device("cpu")).forward([ForwardItem(table, list(prefix), 0, range(len(prefix) - 1, len(prefix)))])
    return model.compute_logits(hidden)[0]


_MODELS: dict = {}


@pytest.fixture(scope="module")
def demo_tok():
    from framework.tokenizer import load_tokenizer

    return load_tokenizer(DEMO_DIR / "demo")


def _prompts(tok):
    texts = ["Once upon a time there was a king who", "The for statement", "A person record in JSON:\n",
             "Q: Tom has 12 apples and finds 7 more. How many apples does Tom have now?\nA:"]
    return [tok.encode(t) for t in texts]


def test_companion_logits_equal_the_model_alone_through_chunking_preemption_forks_and_abort(demo_tok):
    Probe.records = []
    llm = LLM("demo", plugin_manager=_pm(), block_size=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=8)
    eng = llm.engine
    probe = [{"probe": {"model": "demo-draft"}}]
    prompts = _prompts(demo_tok)
    eng.add_request("greedy", {"prompt_token_ids": prompts[0]}, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, processors=probe))
    eng.add_request("forks", {"prompt_token_ids": prompts[1]}, SamplingParams(max_tokens=24, temperature=0.8, n=2, seed=3, ignore_eos=True, processors=probe))
    eng.add_request("aborted", {"prompt_token_ids": prompts[2]}, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, processors=probe))
    eng.add_request("plain", {"prompt_token_ids": prompts[3]}, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for _ in range(12):
        eng.step()
    eng.abort_request("aborted")
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.scheduler.num_preemptions > 0  # the tiny pools forced recomputation
    assert eng.check_all_free()  # every block of the main and the companion pool
    assert len(Probe.records) > 60
    for prefix, logits, _ in Probe.records:  # float32 rounding only: batch shapes differ
        ref = _alone("demo-draft", prefix)
        assert torch.allclose(logits, ref, rtol=1e-5, atol=1e-5), (logits - ref).abs().max().item()
    # and against transformers, on a sample of prefixes
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(DEMO_DIR / "demo-draft", dtype=torch.float32).eval()
    for prefix, logits, _ in Probe.records[::15]:
        with torch.no_grad():
            ref = hf(torch.tensor([prefix])).logits[0, -1]
        assert (logits - ref).abs().max().item() < 1e-4


def test_candidate_forward_equals_separate_full_forwards(demo_tok):
    from framework.models.scorer import load_scorer

    Probe.records = []
    llm = LLM("demo", plugin_manager=_pm(), block_size=4)
    prompts = [{"prompt_token_ids": p} for p in _prompts(demo_tok)[:3]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, processors=[{"probe": {"model": "demo-sentiment", "top_k": 5}}])
    llm.generate(prompts, params)
    assert llm.engine.check_all_free()
    scorer = load_scorer("demo-sentiment")
    assert len(Probe.records) == 18
    for prefix, prefix_raw, (cands, raw) in Probe.records:
        full = torch.tensor([list(prefix) + [c] for c in cands])
        with torch.no_grad():
            ref = scorer(full)[:, -1]  # [K, C]: the head after each candidate, one full forward each
            ref_prefix = scorer(torch.tensor([list(prefix)]))[0, -1]
        assert (raw - ref).abs().max().item() < 1e-5
        assert (prefix_raw - ref_prefix).abs().max().item() < 1e-5


def _driven_seq(eng, companion, tokens):
    req = Request("t", None, list(tokens), SamplingParams(), None, pools=(eng.models.main, companion.pool))
    return Sequence(0, req, 0, list(tokens), len(tokens), None, kv=[SeqKV(), SeqKV()])


def test_truncate_then_reappend_gives_the_logits_of_never_having_appended(demo_tok):
    llm = LLM("demo", block_size=4)
    eng = llm.engine
    draft = eng.models.get("demo-draft", lockstep=False)
    prompt = _prompts(demo_tok)[0]
    a = _driven_seq(eng, draft, prompt)
    b = _driven_seq(eng, draft, prompt)
    draft.extend([a, b], [prompt, prompt])
    wrong = [5, 6, 7, 8, 9, 10]  # crosses a block boundary
    draft.extend([a], [wrong])
    assert draft.num_computed(a) == len(prompt) + 6
    draft.truncate(a, len(prompt) + 1)  # keep the first wrong token, drop five
    assert draft.num_computed(a) == len(prompt) + 1
    got = draft.extend([a], [[42, 43]])
    draft.extend([b], [[5]])
    ref = draft.extend([b], [[42, 43]])
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(got[0], _alone("demo-draft", tuple(prompt + [5, 42, 43])), atol=1e-5)
    for s in (a, b):
        draft.pool.free(s.kv[1])
    assert eng.check_all_free()


def test_block_truncate_unhashes_a_partial_block():
    bm = BlockManager(8, 4)
    table: list[int] = []
    toks = list(range(10, 22))  # 12 tokens: 3 full blocks
    assert bm.ensure_slots(table, 12)
    hashed = bm.commit_full_blocks(table, toks, 12, 0)
    assert hashed == 3 and len(bm.match_prefix(toks + [99])) == 3
    hashed = bm.truncate(table, 6, hashed)  # the second block is no longer full
    assert hashed == 1 and len(table) == 2
    assert len(bm.match_prefix(toks + [99])) == 1  # its old content is no longer served
    bm.free_table(table)
    assert bm.check_all_free()
