"""OpenAI-compatible HTTP server (``decodekit serve SPEC``; needs the ``[server]`` extra).

>>> from framework.pipeline import load_pipeline
>>> from framework.server import ServerConfig, ServerThread
>>> with ServerThread(load_pipeline("spec.yaml"), ServerConfig(port=0)) as srv:  # doctest: +SKIP
...     print(srv.url)

See docs/server.md for the endpoints, parameters and errors.
"""

from __future__ import annotations

from framework.server.app import ServerConfig, ServerState, create_app
from framework.server.runner import ServerThread, serve

__all__ = ["ServerConfig", "ServerState", "ServerThread", "create_app", "serve"]
