"""Guidance processors (plugins/guidance): fudge, rad, contrastive.

References:
* FUDGE and RAD: the scorer run alone, one full uncached forward per candidate on
  ``prefix + candidate`` (``PrefixScorer`` dense forward), the formulas of the papers applied to
  the logits the processor received;
* contrastive: the amateur run alone over the prefix (a fresh cache, one forward);
* cached == uncached (``cache: false``, the papers' reference implementation; for contrastive
  the amateur re-run on the whole prefix every step) over 50 steps,
  through preemption and n > 1.
The logits a processor gets and returns are recorded by probe processors listed around it.
"""

from __future__ import annotations

import shutil
import types

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from framework import LLM, SamplingParams
from framework.demo import DEMO_DIR
from framework.errors import InvalidRequestError
from framework.hookspecs import hookimpl
from framework.kv_cache import BlockManager, KVCacheStorage
from framework.model_runner import ForwardItem, ModelRunner
from framework.models.loader import load_model
from framework.models.scorer import load_scorer
from framework.plugins import PluginManager

NEG_INF = float("-inf")


class ProbeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tag: str = ""


class Probe:
    """Records (tag, prefix, logits) for each of its rows; leaves the logits alone."""

    records: dict[str, list] = {}

    def __init__(self, setup):
        self.params = {}

    def add_request(self, slot, params, request):
        self.params[slot] = params

    def remove(self, slot):
        self.params.pop(slot, None)

    def apply(self, logits, ctx):
        for r, slot in enumerate(ctx.slots):
            p = self.params[slot]
            Probe.records.setdefault(p.tag, []).append((tuple(ctx.token_ids[r]), logits[r].clone()))
        return logits


def _pm():
    plugin = types.ModuleType("guidance_probe")

    def register(register):
        register("probe_in", Probe, params=ProbeParams)
        register("probe_out", type("ProbeOut", (Probe,), {}), params=ProbeParams)

    plugin.register_logits_processors = hookimpl(register)
    return PluginManager(load_entry_points=False, extra_plugins=[plugin])


def _probed(tag: str, *procs: dict) -> list[dict]:
    return [{"probe_in": {"tag": tag}}, *procs, {"probe_out": {"tag": tag}}]


def _pairs(tag: str) -> list[tuple[tuple[int, ...], torch.Tensor, torch.Tensor]]:
    ins, outs = Probe.records[tag + "_in"], Probe.records[tag + "_out"]
    assert len(ins) == len(outs) and ins
    for (p, _), (q, _) in zip(ins, outs):
        assert p == q
    return [(p, zi, zo) for (p, zi), (_, zo) in zip(ins, outs)]


@pytest.fixture(scope="module")
def tok():
    from framework.tokenizer import load_tokenizer

    return load_tokenizer(DEMO_DIR / "demo")


@pytest.fixture(scope="module")
def scorers():
    return {"demo-sentiment": load_scorer("demo-sentiment"), "demo-reward": load_scorer("demo-reward")}


PROMPTS = ["Once upon a time there was a king who", "The weather today", "I hate the", "My dear friend, you are",
           "def main():\n"]


def _ids(tok, i):
    return {"prompt_token_ids": tok.encode(PROMPTS[i % len(PROMPTS)])}


def _one_by_one(scorer, prefix, cands) -> torch.Tensor:
    """[K, C]: the scorer's head after prefix + c, one full uncached forward per candidate."""
    with torch.no_grad():
        return torch.stack([scorer(torch.tensor([list(prefix) + [c]]))[0, -1] for c in cands])


def _check_masked(zo: torch.Tensor, ids: torch.Tensor, expected: torch.Tensor) -> None:
    finite = torch.isfinite(zo)
    assert int(finite.sum()) == len(ids)
    assert bool(finite[ids].all())
    assert (zo[ids] - expected).abs().max().item() < 1e-5


def _tagged(tag):
    return tag + "_in", tag + "_out"


def _run(llm, reqs):
    """reqs: (id, prompt, params) -> {id: RequestOutput}; steps the engine to the end."""
    eng = llm.engine
    for rid, prompt, sp in reqs:
        eng.add_request(rid, prompt, sp)
    out = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o
    assert eng.check_all_free()
    return out


def _fix_tags(procs):
    """probe params get the _in/_out suffixes."""
    out = []
    for p in procs:
        (name, opts), = p.items()
        if name == "probe_in":
            opts = {"tag": opts["tag"] + "_in"}
        elif name == "probe_out":
            opts = {"tag": opts["tag"] + "_out"}
        out.append({name: opts})
    return out


# ---------------------------------------------------------------------------------- exactness
def test_fudge_and_rad_equal_one_forward_per_candidate_in_a_mixed_batch(tok, scorers):
    Probe.records = {}
    llm = LLM("demo", plugin_manager=_pm(), block_size=4)
    sp = lambda procs, **kw: SamplingParams(max_tokens=kw.pop("max_tokens", 10), ignore_eos=True,
                                           processors=_fix_tags(procs), **{"temperature": 0, **kw})
    reqs = [
        ("fudge", _ids(tok, 0), sp(_probed("fudge", {"fudge": {"strength": 4.0, "top_k": 8}}))),
        ("fudge_neg", _ids(tok, 1), sp(_probed("fudge_neg", {"fudge": {"target": "negative", "strength": 2.0, "top_k": 6}}),
                                       temperature=0.9, seed=5, n=2)),
        ("fudge_two", _ids(tok, 2), sp(_probed("fudge_two", {"fudge": {"strength": 1.0, "top_k": 5, "attributes": [
            {"classifier": "demo-sentiment", "target": "negative", "strength": 0.5}]}}))),
        ("rad", _ids(tok, 3), sp(_probed("rad", {"rad": {"beta": 30.0, "top_k": 7}}))),
        ("rad_inv", _ids(tok, 4), sp(_probed("rad_inv", {"rad": {"beta": 10.0, "top_k": 5, "inverse": True}}),
                                     repetition_penalty=1.3)),
        ("plain", _ids(tok, 0), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)),
    ]
    out = _run(llm, reqs)
    sent, reward = scorers["demo-sentiment"], scorers["demo-reward"]
    checks = {"fudge": (8, [(1, 4.0)]), "fudge_neg": (6, [(0, 2.0)]), "fudge_two": (5, [(1, 1.0), (0, 0.5)])}
    for tag, (K, terms) in checks.items():
        pairs = _pairs(tag)
        assert len(pairs) == (20 if tag == "fudge_neg" else 10)
        for prefix, zi, zo in pairs:
            top = zi.topk(K).indices
            raw = _one_by_one(sent, prefix, top.tolist())
            d = raw[:, 1] - raw[:, 0]  # the paper's binary form: logsigmoid(d), log(1 - sigmoid(d))
            expected = zi[top] + sum(w * (F.logsigmoid(d) if label == 1 else torch.log1p(-torch.sigmoid(d))) for label, w in terms)
            _check_masked(zo, top, expected)
    for tag, (K, beta, inverse) in {"rad": (7, 30.0, False), "rad_inv": (5, 10.0, True)}.items():
        for prefix, zi, zo in _pairs(tag):
            top = zi.topk(K).indices
            r = torch.sigmoid(_one_by_one(reward, prefix, top.tolist())[:, 0]).clamp(0, 1)
            expected = zi[top] + beta * ((1 - r) if inverse else r)
            _check_masked(zo, top, expected)
    # the rows of the batch mate are untouched: the plain request equals itself alone
    alone = LLM("demo").generate([_ids(tok, 0)], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert out["plain"].outputs[0].token_ids == alone.outputs[0].token_ids
    # guidance changed something (else the check above proves little)
    assert out["fudge"].outputs[0].token_ids != alone.outputs[0].token_ids


def _alone(name, prefix):
    model, cfg, _ = _MODELS.setdefault(name, load_model(name))
    kv = KVCacheStorage(cfg, 64, 16, model.dtype, torch.device("cpu"))
    bm = BlockManager(64, 16)
    table: list[int] = []
    assert bm.ensure_slots(table, len(prefix))
    hidden = ModelRunner(model, cfg, kv, 16, torch.device("cpu")).forward([ForwardItem(table, list(prefix), 0, range(len(prefix) - 1, len(prefix)))])
    return model.compute_logits(hidden)[0]


_MODELS: dict = {}


def test_contrastive_equals_the_amateur_run_alone_in_a_mixed_batch(tok):
    Probe.records = {}
    llm = LLM("demo", plugin_manager=_pm(), block_size=4)
    settings = {
        "cd": {"alpha": 0.1, "beta": 0.5},
        "cd_li": {"alpha": 0.05, "scoring": "li", "amateur_temperature": 0.5},
        "cd_wide": {"alpha": 0.0, "beta": 1.0},
    }
    reqs = [(tag, _ids(tok, i), SamplingParams(max_tokens=10, temperature=0 if i != 1 else 0.8, seed=2, n=1 if i != 1 else 2,
                                               ignore_eos=True, processors=_fix_tags(_probed(tag, {"contrastive": opts}))))
            for i, (tag, opts) in enumerate(settings.items())]
    reqs.append(("fudge", _ids(tok, 3), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, processors=[{"fudge": {"top_k": 10}}])))
    _run(llm, reqs)
    for tag, opts in settings.items():
        alpha, beta, t = opts["alpha"], opts.get("beta", 0.5), opts.get("amateur_temperature", 1.0)
        for prefix, zi, zo in _pairs(tag):
            s_exp = torch.log_softmax(zi, -1)
            s_ama = torch.log_softmax(_alone("demo-draft", prefix) / t, -1)
            p = s_exp.exp()
            head = p >= alpha * p.max()
            score = s_exp - s_ama if opts.get("scoring") == "li" else (1 + beta) * s_exp - beta * s_ama
            assert torch.equal(torch.isfinite(zo), head)
            assert (zo[head] - score[head]).abs().max().item() < 1e-5


# ----------------------------------------------------------------------- cached == uncached
@pytest.mark.parametrize("name,opts", [("fudge", {"strength": 4.0, "top_k": 8}), ("rad", {"beta": 20.0, "top_k": 10}),
                                       ("contrastive", {"alpha": 0.1, "beta": 0.5})])
def test_cached_equals_uncached_over_50_steps_through_preemption_and_n2(tok, name, opts):
    def outputs(cache: bool, **engine):
        llm = LLM("demo", block_size=4, **engine)
        g = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, processors=[{name: {**opts, "cache": cache}}])
        s = SamplingParams(max_tokens=50, temperature=1.0, seed=11, n=2, ignore_eos=True, processors=[{name: {**opts, "cache": cache}}])
        reqs = [(f"g{i}", _ids(tok, i), g) for i in range(2)] + [(f"s{i}", _ids(tok, i + 2), s) for i in range(1)]
        out = _run(llm, reqs)
        return {k: [c.token_ids for c in v.outputs] for k, v in out.items()}, llm.engine.scheduler.num_preemptions

    ref, _ = outputs(False)
    cached, _ = outputs(True)
    tight, preemptions = outputs(True, num_kv_blocks=40, max_num_batched_tokens=16)
    assert preemptions > 0
    assert cached == ref
    assert tight == ref
    assert all(len(t) == 50 for v in ref.values() for t in v)


def test_contrastive_through_preemption_and_forks(tok):
    def outputs(**engine):
        llm = LLM("demo", block_size=4, **engine)
        s = SamplingParams(max_tokens=40, temperature=0.8, seed=4, n=2, ignore_eos=True, processors=[{"contrastive": {}}])
        out = _run(llm, [(f"s{i}", _ids(tok, i), s) for i in range(3)])
        return {k: [c.token_ids for c in v.outputs] for k, v in out.items()}, llm.engine.scheduler.num_preemptions

    ref, _ = outputs()
    tight, preemptions = outputs(num_kv_blocks=30, max_num_batched_tokens=16)
    assert preemptions > 0 and tight == ref


# ---------------------------------------------------------------------------- composition
def test_guidance_composes_with_a_regex_constraint_and_penalties(tok):
    """The grammar mask applies to the guided distribution: every output matches the regex and
    every chosen token is one the guidance processors kept."""
    import re

    Probe.records = {}
    llm = LLM("demo", plugin_manager=_pm())
    procs = _fix_tags(_probed("g", {"fudge": {"strength": 4.0, "top_k": 200}}, {"contrastive": {"alpha": 0.01}}))
    sp = SamplingParams(max_tokens=12, temperature=0, processors=procs, constraint={"regex": {"pattern": "[a-z ]+"}},
                        repetition_penalty=1.2)
    outs = llm.generate([_ids(tok, i) for i in range(3)], sp)
    full = {}
    for i, o in enumerate(outs):
        assert re.fullmatch("[a-z ]+", o.outputs[0].text), o.outputs[0].text
        full[i] = tuple(_ids(tok, i)["prompt_token_ids"]) + tuple(o.outputs[0].token_ids)
    assert llm.engine.check_all_free()
    # each chosen token survived guidance (the mask narrowed the guided distribution, never the
    # reverse: no token guidance masked is ever chosen)
    checked = 0
    for prefix, zi, zo in _pairs("g"):
        seq = next(f for f in full.values() if f[:len(prefix)] == prefix and len(f) > len(prefix))
        chosen = seq[len(prefix)]
        assert torch.isfinite(zo[chosen])
        checked += 1
    assert checked >= 12


# ------------------------------------------------------------------------------ bad input
def test_bad_options_are_clear_errors_naming_the_field_and_the_engine_goes_on(tok, tmp_path):
    from conftest import train_bytelevel_tokenizer

    other = tmp_path / "other-tok"
    shutil.copytree(DEMO_DIR / "demo-sentiment", other)
    (other / "tokenizer.model").unlink()
    train_bytelevel_tokenizer(other)
    llm = LLM("demo")
    eng = llm.engine
    bad = [
        ({"fudge": {"classifier": "no-such-model"}}, ["fudge", "classifier", "no-such-model"]),
        ({"fudge": {"target": "happy"}}, ["fudge", "target", "happy", "negative", "positive"]),
        ({"fudge": {"top_k": 0}}, ["fudge", "top_k"]),
        ({"fudge": {"classifier": "demo-reward"}}, ["fudge", "classifier", "reward"]),
        ({"fudge": {"classifier": "demo-draft"}}, ["fudge", "classifier", "language model"]),
        ({"fudge": {"attributes": [{"classifier": "demo-sentiment", "target": 7}]}}, ["attributes[0].target", "7"]),
        ({"fudge": {"classifier": str(other)}}, ["fudge", "classifier", "different tokenizer"]),
        ({"rad": {"reward_model": "demo-sentiment"}}, ["rad", "reward_model", "classifier"]),
        ({"rad": {"top_k": -3}}, ["rad", "top_k"]),
        ({"contrastive": {"amateur": "demo-reward"}}, ["contrastive", "amateur", "scorer"]),
        ({"contrastive": {"alpha": 2}}, ["contrastive", "alpha"]),
    ]
    eng.add_request("ok", _ids(tok, 0), SamplingParams(max_tokens=8, temperature=0, processors=[{"fudge": {"top_k": 10}}]))
    for proc, words in bad:
        with pytest.raises(InvalidRequestError) as e:
            eng.add_request("bad", _ids(tok, 1), SamplingParams(max_tokens=8, processors=[proc]))
        for w in words:
            assert w in str(e.value), (w, str(e.value))
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            done[o.request_id] = o
    assert done["ok"].finished and len(done["ok"].outputs[0].token_ids) == 8
    assert eng.check_all_free()


# --------------------------------------------------------------------------------- server
def test_server_extra_body_guidance_matches_the_library_and_names_bad_fields(tmp_path, tok):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    from framework.pipeline import load_pipeline
    from framework.server import ServerConfig, ServerThread

    spec = tmp_path / "spec.yaml"
    spec.write_text("model: demo\nengine: {max_num_seqs: 8, kv_cache_memory: 64MiB}\nsampling: {max_tokens: 10, temperature: 0}\n")
    srv = ServerThread(load_pipeline(spec), ServerConfig(port=0, log_level="warning")).start()
    try:
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        model = cl.models.list().data[0].id
        procs = [{"rad": {"beta": 30.0, "top_k": 10}}, {"fudge": {"strength": 2.0, "top_k": 20}}]
        r = cl.completions.create(model=model, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                  extra_body={"processors": procs, "ignore_eos": True})
        want = LLM("demo").generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, processors=procs))
        assert r.choices[0].text == want[0].outputs[0].text
        with pytest.raises(openai.BadRequestError) as ei:
            cl.completions.create(model=model, prompt=PROMPTS[0], extra_body={"processors": [{"fudge": {"target": "happy"}}]})
        assert "target" in ei.value.body["message"] and "happy" in ei.value.body["message"]
        r = cl.completions.create(model=model, prompt=PROMPTS[1], max_tokens=4, extra_body={"processors": [{"contrastive": {}}], "ignore_eos": True})
        assert r.usage.completion_tokens == 4  # the server goes on serving
    finally:
        srv.stop()


# ------------------------------------------------------------------- offline validation
@pytest.mark.parametrize("options,line,path,words", [
    ("fudge: {classifier: no-such-model}", 3, "processors[0].fudge.classifier", ["no-such-model", "registered"]),
    ("fudge:\n      classifier: demo-reward", 4, "processors[0].fudge.classifier", ["reward model, not a classifier"]),
    ("fudge:\n      classifier: demo-sentiment\n      target: joyful", 5, "processors[0].fudge.target",
     ["unknown label 'joyful'", "negative", "positive"]),
    ("fudge:\n      attributes:\n        - {classifier: demo-sentiment}\n        - {classifier: s, target: 7}", 6,
     "processors[0].fudge.attributes[1].target", ["label index 7 out of range"]),
    ("rad: {reward_model: s}", 3, "processors[0].rad.reward_model", ["classifier model, not a reward"]),
    ("contrastive: {amateur: demo-reward}", 3, "processors[0].contrastive.amateur", ["prefix scorer", "not a language model"]),
])
def test_validate_reports_companion_errors_offline_at_the_field(tmp_path, options, line, path, words):
    """``decodekit validate`` checks companion-dependent options from the models' config.json
    (registered names, spec ``models:`` aliases): the error names the file, the line of the
    field and the field."""
    from framework.pipeline import validate_pipeline
    from framework.spec import SpecError

    spec = tmp_path / "g.yaml"
    spec.write_text(f"model: demo\nprocessors:\n  - {options}\nmodels:\n  s: demo-sentiment\n")
    with pytest.raises(SpecError) as exc:
        validate_pipeline(spec)
    (issue,) = exc.value.issues
    assert (issue.path, issue.line) == (path, line), str(exc.value)
    msg = str(exc.value)
    assert msg.startswith(f"{spec}:{line}:") and all(w in msg for w in words), msg
    ok = tmp_path / "ok.yaml"
    ok.write_text("model: demo\nmodels:\n  s: demo-sentiment\nprocessors:\n"
                  "  - fudge: {classifier: s, target: negative, attributes: [{classifier: demo-sentiment, target: 1}]}\n"
                  "  - rad: {reward_model: demo-reward}\n  - contrastive: {amateur: demo-draft}\n")
    assert [p.name for p in validate_pipeline(ok).processors] == ["fudge", "rad", "contrastive"]
