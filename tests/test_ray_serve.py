"""``serve --ray``: the OpenAI-compatible app behind a Ray Serve deployment of two replicas on a
local Ray cluster started here (2 CPUs; the HTTP proxy on 127.0.0.1).

The reference is the one-process server (:class:`ServerThread`) on the same spec: the same
completions (greedy), the same error bodies. A replica killed under load is replaced while the
other keeps answering.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from ray import serve  # noqa: E402

from framework.ray.serving import APP_NAME, build_serve_app  # noqa: E402
from framework.server import ServerConfig, ServerThread  # noqa: E402

pytestmark = pytest.mark.ray
PROMPTS = ["Once upon a time", "The sea", "A king and a queen", "Stars over the road"]


def http(url: str, body: dict | None = None) -> tuple[int, str]:
    """(status, body text) of a GET, or of a POST of ``body`` as JSON."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def post_json(url: str, body: dict) -> tuple[int, dict]:
    status, text = http(url, body)
    return status, json.loads(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    path = tmp_path_factory.mktemp("ray_serve") / "spec.yaml"
    path.write_text("model: demo\nengine: {max_num_seqs: 8}\nsampling: {temperature: 0, max_tokens: 6}\n")
    return path


@pytest.fixture(scope="module")
def reference(spec):
    """What the one-process server answers."""
    from framework.pipeline import load_pipeline

    with ServerThread(load_pipeline(spec), ServerConfig(port=0, log_level="warning")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        texts = [client.completions.create(model="demo", prompt=p, max_tokens=6).choices[0].text for p in PROMPTS]
        bad = post_json(srv.url + "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": -3})
        unknown = post_json(srv.url + "/v1/completions", {"model": "nope", "prompt": "x"})
    assert bad[0] == 400 and unknown[0] == 404
    return {"texts": texts, "bad": bad, "unknown": unknown}


@pytest.fixture(scope="module")
def served(spec):
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, object_store_memory=96 * 2**20, include_dashboard=False, logging_level="warning")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_serve_app(spec, ServerConfig(log_level="warning"), replicas=2, cpus_per_replica=0.5),
              name=APP_NAME, route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def replica_actors() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and "DecodekitReplica" in a["name"])


def running_replicas() -> int:
    dep = serve.status().applications[APP_NAME].deployments["DecodekitReplica"]
    return dep.replica_states.get("RUNNING", 0)


def test_two_replicas_answer_like_one_process(served, reference):
    assert len(replica_actors()) == 2
    client = openai.OpenAI(base_url=served + "/v1", api_key="none", max_retries=0)
    texts = [client.completions.create(model="demo", prompt=p, max_tokens=6).choices[0].text for p in PROMPTS]
    assert texts == reference["texts"]
    chunks = client.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == reference["texts"][0]  # streaming through the proxy
    assert post_json(served + "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": -3}) == reference["bad"]
    assert post_json(served + "/v1/completions", {"model": "nope", "prompt": "x"}) == reference["unknown"]
    status, metrics = http(served + "/metrics")
    assert status == 200 and "decodekit_" in metrics


def test_a_replica_killed_under_load_is_replaced_and_the_other_keeps_serving(served, reference):
    client = openai.OpenAI(base_url=served + "/v1", api_key="none", max_retries=0, timeout=60)
    log: list[tuple[float, float, bool]] = []  # (start, end, ok) of every request
    stop = threading.Event()

    def load(i: int) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                out = client.completions.create(model="demo", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=6)
                ok = out.choices[0].text == reference["texts"][i % len(PROMPTS)]
            except openai.APIError:
                ok = False
            log.append((t0, time.monotonic(), ok))

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while sum(ok for *_, ok in log) < 6:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    victim = replica_actors()[0]
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    while running_replicas() == 2:  # until Serve notices (its health check, or a failed request)
        assert time.monotonic() < deadline + 60, "Serve did not notice the killed replica"
        time.sleep(0.05)
    while not (running_replicas() == 2 and victim not in replica_actors()):
        assert time.monotonic() < deadline + 180, "the killed replica was not replaced"
        time.sleep(0.1)
    replaced_at = time.monotonic()
    while sum(ok for t0, _, ok in log if t0 > replaced_at) < 6:
        assert time.monotonic() < deadline + 240
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(60)
    served_meanwhile = [ok for t0, end, ok in log if t0 > killed_at + 1.0 and end < replaced_at]
    after = [ok for t0, _, ok in log if t0 > replaced_at]
    failed = [(t0, end) for t0, end, ok in log if not ok]
    assert len(failed) <= len(threads) and all(t0 < killed_at + 1.0 for t0, _ in failed)  # only those caught by the kill
    assert all(after) and len(after) >= 6
    assert len(served_meanwhile) >= 1 and all(served_meanwhile)  # the survivor answered while the new one loaded
