"""Running the server: ``serve`` (blocking, for ``decodekit serve``) and :class:`ServerThread`
(in-process, on a free loopback port: tests, benchmarks, notebooks).

Shutdown is graceful either way (SIGINT/SIGTERM for ``serve``, :meth:`ServerThread.stop`):
the listening socket closes at once and ``/health`` turns 503; requests in flight get
``shutdown_timeout`` seconds to finish; the rest are aborted (a stream ends with an error event
and ``data: [DONE]``, a waiting client gets a 503) and their KV blocks return to the pool; once
the connections are closed the app's lifespan stops and joins the engine thread. uvicorn's own
graceful-shutdown timeout (which cancels connection tasks mid-response) is only a backstop, a few
seconds later.
"""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from typing import Any

import uvicorn

from framework.server.app import ServerConfig, ServerState, create_app

_BACKSTOP_S = 5.0  # uvicorn cancels connection tasks this long after our own drain deadline


def _uvicorn_config(app: Any, config: ServerConfig, **kw: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=config.host, port=config.port, log_level=config.log_level, lifespan="on",
        timeout_graceful_shutdown=math.ceil(max(0.0, config.shutdown_timeout) + _BACKSTOP_S), **kw,
    )


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the engine when shutdown begins.

    uvicorn's shutdown closes the listening sockets and then waits for open connections; alone,
    it would cancel the tasks of streams still running at its timeout, cutting responses off
    mid-chunk. Here the async engine is drained at the same time: requests in flight get
    ``shutdown_timeout`` seconds, the rest end cleanly (error event + ``[DONE]``, or 503), so
    the connections close before uvicorn's timeout.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.ensure_future(self.state.aengine.drain(self.state.config.shutdown_timeout))
        try:
            await super().shutdown(sockets)  # closes the sockets now, waits for connections
        finally:
            if not drain.done():
                drain.cancel()


def serve(pipeline: Any, config: ServerConfig | None = None) -> None:
    """Serve ``pipeline`` until interrupted (SIGINT/SIGTERM shut it down gracefully)."""
    config = config or ServerConfig()
    app = create_app(pipeline, config)
    DrainingServer(_uvicorn_config(app, config), app.state.server).run()


class ServerThread:
    """The server in a background thread of this process::

        with ServerThread(pipeline, ServerConfig(api_key="k")) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k")
    """

    def __init__(self, pipeline: Any, config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        self.app = create_app(pipeline, self.config)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((self.config.host, self.config.port))  # port 0: a free one
        self.port: int = self._sock.getsockname()[1]
        self.server = DrainingServer(_uvicorn_config(self.app, self.config, log_config=None), self.app.state.server)
        self._thread = threading.Thread(target=self._run, name="decodekit-server", daemon=True)
        self._error: BaseException | None = None

    @property
    def state(self) -> ServerState:
        """The app's :class:`~framework.server.app.ServerState` (engine, metrics)."""
        return self.app.state.server

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"the server failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not start in time")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        """Shut down gracefully and join the server thread."""
        self.server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
