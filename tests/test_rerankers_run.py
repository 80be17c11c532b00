"""Rerankers at the edges: ``decodekit run --all-candidates``, the server's ``reranker`` field
with ``n`` and streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sacrebleu

from framework.cli import main

SPEC = """model: demo
sampling: {temperature: 1.0, max_tokens: 10, seed: 3, n: 2, best_of: 6}
reranker: {mbr: {utility: chrf}}
"""


def _expected_chrf(texts: list[str]) -> list[float]:
    m = sacrebleu.CHRF()
    return [sum(m.sentence_score(h, [r]).score for r in texts) / len(texts) for h in texts]


def test_run_all_candidates_writes_every_ranked_candidate(tmp_path: Path, capsys):
    spec = tmp_path / "mbr.yaml"
    spec.write_text(SPEC)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\nYou will\n")
    out_all, out_best = tmp_path / "all.jsonl", tmp_path / "best.jsonl"
    assert main(["run", str(spec), "--prompts", str(prompts), "-o", str(out_all), "--all-candidates", "--no-progress"]) == 0
    assert main(["run", str(spec), "--prompts", str(prompts), "-o", str(out_best), "--no-progress"]) == 0
    rows = {r["id"]: r for r in map(json.loads, out_all.read_text().splitlines())}
    best = {r["id"]: r for r in map(json.loads, out_best.read_text().splitlines())}
    assert len(rows) == 2
    for rid, r in rows.items():
        cands = r["candidates"]
        assert len(cands) == 6 and [c["index"] for c in cands] == list(range(6))
        exp = _expected_chrf([c["text"] for c in cands])
        for c, e in zip(cands, exp):
            assert c["score"] == pytest.approx(e)
        assert [c["score"] for c in cands] == pytest.approx(sorted(exp, reverse=True))
        assert [o["text"] for o in r["outputs"]] == [c["text"] for c in cands[:2]]
        assert "candidates" not in best[rid]
        assert [o["text"] for o in best[rid]["outputs"]] == [o["text"] for o in r["outputs"]]  # seeded
    capsys.readouterr()
    assert main(["run", str(spec), "Once upon a time", "--all-candidates"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- sample") == 6 and "/6 (" in printed and "score" in printed


def test_resuming_with_all_candidates_toggled_is_refused_naming_the_flag(tmp_path: Path, capsys):
    spec = tmp_path / "mbr.yaml"
    spec.write_text(SPEC.replace("max_tokens: 10", "max_tokens: 3"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\n")
    base = ["run", str(spec), "--prompts", str(prompts), "--no-progress", "-o"]
    for first, second in ((["--all-candidates"], []), ([], ["--all-candidates"])):
        out = tmp_path / f"out{len(first)}.jsonl"
        assert main(base + [str(out)] + first) == 0
        written = out.read_text()
        assert json.loads(written)["fingerprint"]["all_candidates"] is bool(first)
        capsys.readouterr()
        assert main(base + [str(out)] + second) == 2
        err = capsys.readouterr().err
        was, now = ("with", "without") if first else ("without", "with")
        assert f"was written {was} --all-candidates" in err and f"this run is {now} --all-candidates" in err, err
        assert out.read_text() == written  # refused: nothing appended
        assert main(base + [str(out)] + first) == 0  # the same setting resumes (nothing left to do)
        assert "0 done, 1 skipped" in capsys.readouterr().err and out.read_text() == written
        assert main(base + [str(out)] + second + ["--overwrite"]) == 0
        (rec,) = map(json.loads, out.read_text().splitlines())
        assert ("candidates" in rec) is bool(second) and rec["fingerprint"]["all_candidates"] is bool(second)


def test_a_file_of_an_older_version_resumes_without_all_candidates(tmp_path: Path, capsys):
    """Records written before the fingerprint had ``all_candidates`` hold best-only records."""
    spec = tmp_path / "mbr.yaml"
    spec.write_text(SPEC.replace("max_tokens: 10", "max_tokens: 3"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Once upon a time\nYou will\n")
    out = tmp_path / "out.jsonl"
    base = ["run", str(spec), "--prompts", str(prompts), "--no-progress", "-o", str(out)]
    assert main(base) == 0
    old = [json.loads(x) for x in out.read_text().splitlines()][:1]
    del old[0]["fingerprint"]["all_candidates"]
    out.write_text(json.dumps(old[0]) + "\n")
    capsys.readouterr()
    assert main(base + ["--all-candidates"]) == 2
    assert "was written without --all-candidates" in capsys.readouterr().err
    assert main(base) == 0
    assert "1 done, 1 skipped" in capsys.readouterr().err


# ----------------------------------------------------------------------------- server
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from framework.pipeline import load_pipeline
    from framework.server import ServerConfig, ServerThread

    d = tmp_path_factory.mktemp("spec")
    (d / "spec.yaml").write_text("model: demo\nengine: {max_num_seqs: 8, kv_cache_memory: 64MiB}\n"
                                 "sampling: {max_tokens: 10, temperature: 1.0}\n")
    srv = ServerThread(load_pipeline(d / "spec.yaml"), ServerConfig(port=0, log_level="warning")).start()
    yield srv
    srv.stop()


def _client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_server_mbr_with_n_and_streaming(server):
    cl = _client(server)
    name = cl.models.list().data[0].id
    kw = dict(model=name, prompt="Once upon a time", max_tokens=10, temperature=1.0, seed=9)
    plain = cl.completions.create(n=5, **kw).choices
    ranked = cl.completions.create(n=5, extra_body={"reranker": {"mbr": {"utility": "chrf"}}}, **kw).choices
    texts = [c.text for c in plain]
    assert sorted(c.text for c in ranked) == sorted(texts)
    exp = dict(zip(texts, _expected_chrf(texts)))
    assert [exp[c.text] for c in ranked] == pytest.approx(sorted((exp[t] for t in texts), reverse=True))
    # streaming with a reranker: the final choices only, one delta each (docs/rerankers.md)
    stream = cl.completions.create(n=5, stream=True, extra_body={"reranker": {"mbr": {"utility": "chrf"}}}, **kw)
    got: dict[int, list[str]] = {}
    for chunk in stream:
        for ch in chunk.choices:
            if ch.text:
                got.setdefault(ch.index, []).append(ch.text)
    assert all(len(v) == 1 for v in got.values())
    assert ["".join(got.get(i, [""])) for i in range(5)] == [c.text for c in ranked]
    with pytest.raises(openai.BadRequestError) as ei:
        cl.completions.create(n=1, extra_body={"reranker": {"mbr": {}}}, **kw)
    assert "MBR chooses among several samples" in ei.value.body["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        cl.completions.create(n=3, extra_body={"reranker": {"mbr": {"utility": "rouge"}}}, **kw)
    assert "utility" in ei.value.body["message"]
