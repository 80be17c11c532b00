"""The embedding examples (examples/embedding/) run on the demo model and do what they say:
the extraction script's records validate against their pydantic models / JSON Schema, and the
FastAPI app answers concurrent requests with valid Contacts (served in-process by uvicorn)."""

from __future__ import annotations

import http.client
import importlib.util
import json
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "embedding"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # pydantic resolves the models' annotations through it
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_structured_extraction_script(capsys):
    mod = _load("structured_extraction")
    assert mod.main(["--max-tokens", "160"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    for line in lines[:2]:
        person = mod.Person.model_validate_json(line)  # raises if the output broke the model
        assert 0 <= person.age <= 120 and person.role in ("engineer", "teacher", "artist", "doctor")
    for line in lines[2:]:
        jsonschema.validate(json.loads(line), mod.REVIEW)


def test_fastapi_app_serves_valid_structured_output():
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    mod = _load("fastapi_app")
    app = mod.create_app("demo", kv_cache_memory="64MiB")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
            time.sleep(0.05)

        def post(body: dict) -> tuple[int, dict]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            conn.request("POST", "/contacts", body=json.dumps(body), headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = json.loads(resp.read())
            conn.close()
            return resp.status, data

        bodies = [{"text": f"Contact number {i}: Mia Costa in Turin", "seed": i} for i in range(4)]
        with ThreadPoolExecutor(4) as pool:  # concurrent requests share the engine's batch
            results = list(pool.map(post, bodies))
        for status, data in results:
            assert status == 200, data
            contact = mod.Contact.model_validate(data)
            assert contact.kind in ("customer", "supplier", "partner")
        status, err = post({"text": "x", "max_tokens": 0})
        assert status == 422  # the request model rejects it; the engine never saw it
    finally:
        server.should_exit = True
        thread.join(timeout=60)
