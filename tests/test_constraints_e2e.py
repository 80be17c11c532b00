"""Constrained decoding end to end: SamplingParams -> engine -> outputs that parse and validate.

Most tests run on the tiny random checkpoint with a trained byte-level BPE tokenizer
(``text_model`` in conftest.py); a random model rarely closes a JSON string on its own, so those
tests nudge structural tokens with ``logit_bias`` (bias runs before the constraint stage, so the
grammar still decides what is allowed). Every output is replayed through a fresh grammar state:
a token the mask should have forbidden fails the test even when the output is cut by
``max_tokens``. The bundled ``demo`` model runs the jsonschemabench generations when it exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import lark
import pytest

from framework import LLM, SamplingParams
from framework.errors import InvalidRequestError
from plugins.constraints import compile_constraint, get_compiler
from plugins.constraints.frontends import shipped_grammars

DATA = Path(__file__).resolve().parent / "data" / "jsonschemabench"
DEMO_DIR = Path(__file__).resolve().parents[1] / "framework" / "demo" / "demo"
needs_demo = pytest.mark.skipif(not (DEMO_DIR / "config.json").is_file(), reason="bundled demo model not trained yet")

FAST_SCHEMAS = [
    "Glaiveai2K/Glaiveai2K---calculate_distance_97630804.json",
    "Glaiveai2K/Glaiveai2K---search_hotel_ddc91af0.json",
    "Github_easy/Github_easy---o71308.json",
    "Kubernetes/Kubernetes---kb_703_Normalized.json",
]

CLOSED = {  # every output is short and complete: enums, bounded integers, booleans, no extras
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tag": {"enum": ["red", "green", "blue"]},
    },
    "required": ["ok", "n", "tag"],
    "additionalProperties": False,
}


def _schema(rel: str) -> dict:
    return json.loads((DATA / rel).read_text())["schema"]


def _closed(schema):
    """A stricter copy: objects with ``properties`` and no ``additionalProperties`` get
    ``additionalProperties: false`` (outputs still validate against the original schema; a
    random model then reaches the required keys instead of inventing new ones)."""
    if isinstance(schema, list):
        return [_closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def llm(text_model):
    return LLM(str(text_model), seed=0)


def _structure_bias(tok, strength: float = 4.0) -> dict[int, float]:
    """Favour tokens that close strings and containers (and EOS) so random models finish."""
    table = tok.token_byte_table()
    want = {b'"', b"}", b"]", b'"}'}
    bias = {i: strength for i, b in enumerate(table) if b in want}
    for e in tok.eos_token_ids:
        bias[e] = strength + 2
    return bias


def _replays(compiled, token_ids: list[int]) -> bool:
    """Every token is one the grammar allowed, in order (EOS included)."""
    st = compiled.new_state()
    return all(st.advance(t) for t in token_ids)


def _free_blocks_unchanged(llm: LLM, before: int) -> None:
    eng = llm.engine
    assert not eng.has_unfinished_requests()
    assert eng.block_manager.num_free_blocks == before
    assert eng.processors.num_slots_in_use == 0


def test_closed_schema_outputs_validate(llm):
    tok = llm.tokenizer
    free = llm.engine.block_manager.num_free_blocks
    params = [SamplingParams(constraint={"json_schema": {"schema": CLOSED, "whitespace": "compact"}},
                             max_tokens=64, seed=s, temperature=1.0) for s in range(12)]
    outs = llm.generate(["Answer:"] * 12, params)
    cg = compile_constraint("json_schema", tok, {"schema": CLOSED, "whitespace": "compact"})
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), CLOSED)
        assert _replays(cg, c.token_ids)
    _free_blocks_unchanged(llm, free)


@pytest.mark.parametrize("rel", FAST_SCHEMAS)
def test_benchmark_schemas_never_leave_the_grammar(llm, rel):
    schema = _schema(rel)
    tok = llm.tokenizer
    free = llm.engine.block_manager.num_free_blocks
    bias = _structure_bias(tok)
    n = 4
    opts = {"schema": _closed(schema), "whitespace": "compact"}
    outs = llm.generate(["{"] * n, [SamplingParams(constraint={"json_schema": opts}, max_tokens=160, seed=s, logit_bias=bias)
                                    for s in range(n)])
    cg = compile_constraint("json_schema", tok, opts)
    done = 0
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason in ("stop", "length")
        assert _replays(cg, c.token_ids), c.text
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
            done += 1
        else:
            assert len(c.token_ids) == 160
    assert done >= 1  # structure bias makes most finish; each finished one validated above
    _free_blocks_unchanged(llm, free)


@pytest.mark.parametrize("name", sorted(shipped_grammars()))
def test_shipped_grammar_outputs_parse_with_lark(llm, name):
    tok = llm.tokenizer
    bias = {i: 3.0 for i, b in enumerate(tok.token_byte_table()) if b in (b")", b'"', b"]", b"(", b"</")}
    bias.update({e: 6.0 for e in tok.eos_token_ids})
    outs = llm.generate(["x"] * 8, [SamplingParams(grammar=name, max_tokens=120, seed=s, logit_bias=bias) for s in range(8)])
    parser = lark.Lark(shipped_grammars()[name].read_text(), parser="lalr", import_paths=[str(shipped_grammars()[name].parent)])
    cg = compile_constraint("grammar", tok, name)
    finished = 0
    for o in outs:
        c = o.outputs[0]
        assert _replays(cg, c.token_ids)
        if c.finish_reason == "stop":
            parser.parse(c.text)
            finished += 1
    assert finished >= 1, [o.outputs[0].finish_reason for o in outs]


def test_regex_choice_and_gbnf(llm):
    outs = llm.generate(["a", "b", "c"], [
        SamplingParams(regex=r"[0-9]{3}-[a-z]{2}", max_tokens=20, seed=1),
        SamplingParams(choice=["alpha", "beta", "gamma delta"], max_tokens=20, seed=2),
        SamplingParams(constraint={"gbnf": 'root ::= "x" [0-9]+ "y"'}, max_tokens=20, seed=3,
                       logit_bias={e: 5.0 for e in llm.tokenizer.eos_token_ids}),
    ])
    import re

    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[0].outputs[0].text)
    assert outs[1].outputs[0].text in ("alpha", "beta", "gamma delta")
    c = outs[2].outputs[0]
    # complete, or cut by max_tokens (the last tokens of the budget steer towards completing it)
    assert re.fullmatch(r"x[0-9]+y", c.text) or (c.finish_reason == "length" and re.fullmatch(r"x[0-9]*", c.text))


def test_max_tokens_before_the_grammar_completes_is_length(llm):
    out = llm.generate("Q", SamplingParams(json_schema=_schema(FAST_SCHEMAS[0]), max_tokens=3, seed=0))[0]
    c = out.outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 3
    with pytest.raises(ValueError):
        json.loads(c.text)


def _drive(engine, items: list[tuple[str, SamplingParams]]) -> list:
    """The engine's own API (as the server and ``decodekit run`` use it): add, step until done."""
    reqs = [engine.add_request(None, prompt, params) for prompt, params in items]
    done: dict[str, object] = {}
    while len(done) < len(reqs):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[r.request_id] for r in reqs]


def test_bad_schema_fails_one_request_other_completes(llm):
    """A constraint that fails to compile after admission finishes that request alone, with
    finish reason "error" and the message in RequestOutput.error (the engine's contract); the
    offline LLM.generate raises it instead, as it does every other constraint error."""
    free = llm.engine.block_manager.num_free_blocks
    bad = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}  # meta-schema valid
    outs = _drive(llm.engine, [("x", SamplingParams(json_schema=bad, max_tokens=8)),
                               ("y", SamplingParams(max_tokens=8, ignore_eos=True, seed=0))])
    assert outs[0].outputs[0].finish_reason == "error"
    assert outs[0].error and "$defs" in outs[0].error and outs[0].outputs[0].token_ids == []
    assert outs[1].error is None and outs[1].outputs[0].finish_reason == "length"
    assert len(outs[1].outputs[0].token_ids) == 8
    _free_blocks_unchanged(llm, free)
    with pytest.raises(InvalidRequestError, match=r"\$defs"):
        llm.generate(["x", "y"], [SamplingParams(json_schema=bad, max_tokens=8), SamplingParams(max_tokens=8)])
    assert not llm.engine.has_unfinished_requests()
    _free_blocks_unchanged(llm, free)


def test_invalid_requests_are_rejected_before_touching_the_engine(llm):
    eng = llm.engine
    with pytest.raises(InvalidRequestError, match=r"#/properties/a/type"):
        eng.add_request(None, "x", SamplingParams(json_schema={"type": "object", "properties": {"a": {"type": "objekt"}}}))
    with pytest.raises(InvalidRequestError, match="at most one constraint"):
        SamplingParams(regex="a", choice=["b"])
    with pytest.raises(InvalidRequestError, match="unknown constraint|no_such"):
        eng.add_request(None, "x", SamplingParams(constraint={"no_such": {}}))
    with pytest.raises(InvalidRequestError, match="regex"):
        eng.add_request(None, "x", SamplingParams(regex="a(b"))
    with pytest.raises(InvalidRequestError, match="ignore_eos"):
        SamplingParams(regex="a+", ignore_eos=True)
    assert not eng.has_unfinished_requests() and not eng._compiling


def test_compile_timeout_fails_only_that_request(llm, monkeypatch):
    free = llm.engine.block_manager.num_free_blocks
    monkeypatch.setattr(get_compiler(), "timeout_s", 0.05)
    slow = r"(a|b)*a(a|b){14}x[a-z]{1,300}" + str(os.getpid())  # uncached, slow to determinize
    outs = _drive(llm.engine, [("x", SamplingParams(regex=slow, max_tokens=5)), ("y", SamplingParams(max_tokens=5, seed=1))])
    assert outs[0].outputs[0].finish_reason == "error" and "time limit" in outs[0].error
    assert outs[1].outputs[0].finish_reason in ("stop", "length")
    _free_blocks_unchanged(llm, free)


def test_compiling_request_does_not_stall_the_batch(llm, monkeypatch):
    """While a grammar compiles, other requests keep stepping."""
    import concurrent.futures
    import threading

    from plugins.constraints.cache import CompilerService

    gate = threading.Event()
    svc = get_compiler()
    real = CompilerService.submit

    def slow_submit(self, kind, params, tokenizer, timeout_s=None):
        inner = real(self, kind, params, tokenizer, timeout_s)
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def finish():
            gate.wait(10)
            try:
                fut.set_result(inner.result())
            except Exception as exc:  # pragma: no cover
                fut.set_exception(exc)

        threading.Thread(target=finish, daemon=True).start()
        return fut

    monkeypatch.setattr(CompilerService, "submit", slow_submit)
    eng = llm.engine
    eng.add_request("held", "x", SamplingParams(choice=["yes", "no"], seed=0))
    eng.add_request("free", "y", SamplingParams(max_tokens=4, ignore_eos=True, seed=0))
    finished = []
    for _ in range(20):
        finished += [o.request_id for o in eng.step() if o.finished]
        if "free" in finished:
            break
    assert "free" in finished and "held" not in finished and "held" in eng._compiling
    gate.set()
    for _ in range(200):
        finished += [o.request_id for o in eng.step() if o.finished]
        if "held" in finished:
            break
    assert "held" in finished
    assert svc is get_compiler()


def test_jump_forward_appends_forced_tokens_without_sampling(llm):
    eng = llm.engine
    schema = {"type": "object", "properties": {"answer_text": {"enum": ["yes please", "no thanks"]}},
              "required": ["answer_text"], "additionalProperties": False}
    p = SamplingParams(constraint={"json_schema": {"schema": schema, "whitespace": "compact"}}, temperature=0, max_tokens=40)
    sampled = []
    orig = eng.sampler.sample

    def counting(batch, logits):
        out = orig(batch, logits)
        sampled.append(len(out.tokens))
        return out

    eng.sampler.sample = counting
    try:
        eng.jump_forward = True
        fast = llm.generate("Q", p)[0].outputs[0]
        n_fast = sum(sampled)
        sampled.clear()
        eng.jump_forward = False
        slow = llm.generate("Q", p)[0].outputs[0]
        n_slow = sum(sampled)
    finally:
        eng.jump_forward = True
        del eng.sampler.sample
    assert fast.token_ids == slow.token_ids and fast.text == slow.text
    assert json.loads(fast.text)["answer_text"] in ("yes please", "no thanks")
    assert n_slow == len(slow.token_ids)
    assert n_fast < n_slow / 2  # only the enum choice (and EOS) needed a forward pass to choose


def test_n_samples_each_get_their_own_state(llm):
    free = llm.engine.block_manager.num_free_blocks
    out = llm.generate("pick", SamplingParams(choice=["apple pie", "banana", "cherry tart"], n=6, seed=5))[0]
    cg = compile_constraint("choice", llm.tokenizer, ["apple pie", "banana", "cherry tart"])
    assert len(out.outputs) == 6
    for c in out.outputs:
        assert c.text in ("apple pie", "banana", "cherry tart") and c.finish_reason == "stop"
        assert _replays(cg, c.token_ids)
    assert len({c.text for c in out.outputs}) >= 2
    _free_blocks_unchanged(llm, free)


def test_preemption_restores_grammar_state_from_tokens(text_model):
    schemas = [_schema(r) for r in FAST_SCHEMAS]
    prompts = [f"item {i}:" for i in range(6)]
    base = LLM(str(text_model), seed=0)
    bias = _structure_bias(base.tokenizer)
    params = [SamplingParams(json_schema=schemas[i % len(schemas)], max_tokens=48, temperature=0, logit_bias=bias)
              for i in range(len(prompts))]
    ref = [o.outputs[0].token_ids for o in base.generate(prompts, params)]
    small = LLM(str(text_model), seed=0, num_kv_blocks=14, block_size=4, max_num_seqs=6)
    got = [o.outputs[0].token_ids for o in small.generate(prompts, params)]
    assert small.engine.scheduler.num_preemptions > 0
    assert got == ref
    assert small.engine.block_manager.num_free_blocks == 14


def test_yaml_constraint_with_relative_schema_path(text_model, tmp_path):
    from framework.pipeline import load_pipeline

    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "closed.json").write_text(json.dumps(CLOSED))
    spec = tmp_path / "p.yaml"
    spec.write_text(f"model: {text_model}\nsampling: {{max_tokens: 64, seed: 0}}\n"
                    "constraint:\n  json_schema: schemas/closed.json\n")
    pipe = load_pipeline(spec)
    assert pipe.sampling_params().constraint_spec() == ("json_schema", {"schema_": CLOSED})  # inlined
    for o in pipe.generate(["a", "b"]):
        c = o.outputs[0]
        assert c.text.lstrip().startswith("{")
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), CLOSED)
    compact = tmp_path / "c.yaml"
    compact.write_text(f"model: {text_model}\nsampling: {{max_tokens: 64, seed: 0}}\n"
                       "constraint:\n  json_schema: {schema: schemas/closed.json, whitespace: compact}\n")
    for o in load_pipeline(compact).generate(["a", "b"]):
        jsonschema.validate(json.loads(o.outputs[0].text), CLOSED)
    inline = tmp_path / "q.yaml"
    inline.write_text(f"model: {text_model}\nsampling: {{max_tokens: 24}}\n"
                      "constraint:\n  choice: [left, right]\n")
    assert load_pipeline(inline).generate("go")[0].outputs[0].text in ("left", "right")


# ----------------------------------------------------------------------------- demo model
def _bench_schemas() -> list[tuple[str, dict]]:
    out = []
    for sub in sorted(p for p in DATA.iterdir() if p.is_dir()):
        for f in sorted(sub.glob("*.json")):
            out.append((f"{sub.name}/{f.name}", json.loads(f.read_text())["schema"]))
    return out


def _demo_generations(count: int, max_tokens: int) -> tuple[int, int]:
    llm = LLM("demo", seed=0)
    free = llm.engine.block_manager.num_free_blocks
    schemas = _bench_schemas()[:: max(1, len(_bench_schemas()) // count)][:count]
    params, kept = [], []
    for name, schema in schemas:
        try:
            compile_constraint("json_schema", llm.tokenizer, schema)
        except Exception:
            continue  # rejected schemas are counted by test_constraints_json_schema's coverage
        kept.append((name, schema))
        params.append(SamplingParams(json_schema=schema, max_tokens=max_tokens, seed=len(params), temperature=0.8))
    outs = llm.generate([f"JSON for {n.split('---')[-1][:-5]}: " for n, _ in kept], params)
    completed = 0
    for (name, schema), o in zip(kept, outs):
        c = o.outputs[0]
        assert c.finish_reason in ("stop", "length"), (name, o.error)
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.text), schema)
            completed += 1
    _free_blocks_unchanged(llm, free)
    return completed, len(kept)


@needs_demo
def test_demo_model_schema_outputs_validate_fast():
    completed, total = _demo_generations(12, 192)
    assert total >= 10 and completed >= 1


@needs_demo
@pytest.mark.slow
def test_demo_model_200_generations_validate():
    completed, total = _demo_generations(200, 384)
    assert total >= 190 and completed >= 1


def test_overlap_mode_leaves_unknown_masks_to_the_processor(llm):
    """constraint_overlap (on for accelerators): jump-forward only follows masks already known,
    the processor computes the rest; outputs stay valid."""
    eng = llm.engine
    tok = llm.tokenizer
    opts = {"schema": CLOSED, "whitespace": "compact"}
    cg = compile_constraint("json_schema", tok, opts)
    eng.constraint_overlap = True
    try:
        outs = llm.generate(["x"] * 4, [SamplingParams(constraint={"json_schema": opts}, max_tokens=64, seed=s) for s in range(4)])
    finally:
        eng.constraint_overlap = False
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop" and _replays(cg, c.token_ids)
        jsonschema.validate(json.loads(c.text), CLOSED)


def test_grammar_end_wins_over_min_tokens(llm):
    """min_tokens bans EOS where the grammar allows only EOS: the grammar decides (no row is
    left with nothing to sample), with and without jump-forward."""
    eng = llm.engine
    for jump in (True, False):
        eng.jump_forward = jump
        try:
            out = llm.generate("x", SamplingParams(choice=["abc"], min_tokens=6, max_tokens=10, seed=0))[0].outputs[0]
        finally:
            eng.jump_forward = True
        assert out.text == "abc" and out.finish_reason == "stop"


def test_prefetched_masks_give_the_same_outputs(llm):
    """With ``constraint_prefetch`` the next masks are computed on a worker thread while the
    forward runs; sampled outputs (seeded) are token for token those of the plain path."""
    eng = llm.engine
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
              "required": ["name", "age"]}
    params = [SamplingParams(json_schema=schema, max_tokens=48, temperature=0.9, seed=s) for s in range(6)]
    params += [SamplingParams(regex=r"[a-z]{2,6}-[0-9]{3}", max_tokens=16, temperature=0.9, seed=7),
               SamplingParams(max_tokens=12, temperature=0.9, seed=8)]  # an unconstrained row in the batch
    prompts = [f"Record {i}: " for i in range(len(params))]
    plain = [o.outputs[0] for o in llm.generate(prompts, params)]
    eng.constraint_prefetch = True
    try:
        pre = [o.outputs[0] for o in llm.generate(prompts, params)]
    finally:
        eng.constraint_prefetch = False
    assert [o.token_ids for o in pre] == [o.token_ids for o in plain]
    assert eng._constraints._pending is None and not eng._constraints.states
