"""Replicated serving on Ray Serve: ``decodekit serve SPEC --ray --replicas N``.

Each replica is a Ray actor that loads the pipeline and builds the very ASGI app of
``decodekit serve`` (:func:`framework.server.create_app`) around its own engine; Ray Serve's
HTTP proxy spreads requests over the replicas. Endpoints, errors, limits and the API key are the
app's, so they behave as with one process; ``/metrics`` and ``/health`` answer for the replica
that takes the request. A replica that dies (or whose engine thread stopped: the health check)
is replaced by Serve while the others keep serving; requests that were on it fail.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ray import serve

from framework.server.app import ServerConfig

__all__ = ["DecodekitReplica", "build_serve_app", "serve_ray", "APP_NAME"]

APP_NAME = "decodekit"


@serve.ingress()  # the app is built per replica, around that replica's engine
class DecodekitReplica:
    """One replica: a pipeline, its engine and the server app over them."""

    def __init__(self, spec: str, config: ServerConfig, engine_overrides: dict[str, Any] | None = None):
        from framework.pipeline import Pipeline
        from framework.spec import load_spec

        self.config = config
        self.pipeline = Pipeline(load_spec(Path(spec)), **(engine_overrides or {}))
        self._asgi: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        from framework.server import create_app

        self._asgi = create_app(self.pipeline, self.config)  # ("app" is the Serve wrapper's own attribute)
        return self._asgi

    def check_health(self) -> None:
        """Serve's periodic check: a replica whose engine thread stopped is unhealthy (replaced)."""
        if self._asgi is not None and not self._asgi.state.server.aengine.is_running:
            raise RuntimeError("the engine thread is not running")


def build_serve_app(spec: str | os.PathLike, config: ServerConfig | None = None, *, replicas: int = 1,
                    cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
                    engine_overrides: dict[str, Any] | None = None) -> Any:
    """The bound Serve application (for ``serve.run``) of ``replicas`` engines over ``spec``.

    Each replica accepts up to ``max_num_seqs + max_queue`` requests at once, so the app's own
    queue decides when to answer 429, as with one process."""
    from framework.spec import load_spec

    config = config or ServerConfig()
    loaded = load_spec(Path(spec))  # spec errors here, before any actor starts
    ongoing = loaded.spec.engine.max_num_seqs + config.max_queue
    deployment = serve.deployment(
        DecodekitReplica, name="DecodekitReplica", num_replicas=replicas, max_ongoing_requests=ongoing,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        health_check_period_s=2.0, health_check_timeout_s=30.0,
    )
    return deployment.bind(str(Path(spec).resolve()), config, engine_overrides)


def serve_ray(spec: str | os.PathLike, config: ServerConfig | None = None, *, replicas: int = 1, address: str | None = None,
              cpus_per_replica: float = 1.0, gpus_per_replica: float | None = None, blocking: bool = True) -> None:
    """Start (or join) a Ray cluster, run the app on Serve at ``config.host:config.port`` and, with
    ``blocking``, wait until interrupted, then delete the app (and shut down a local cluster)."""
    import ray

    from framework.ray.batch import connect
    from framework.spec import load_spec

    config = config or ServerConfig()
    started = connect(address)
    try:
        if gpus_per_replica is None:
            device = str(load_spec(Path(spec)).spec.engine.device)
            gpus_per_replica = 1.0 if device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        from framework.ray.batch import check_resources

        check_resources(replicas, cpus_per_replica, gpus_per_replica, joined=bool(address) or not started, what="replica")
        serve.start(http_options={"host": config.host, "port": config.port})
        app = build_serve_app(spec, config, replicas=replicas, cpus_per_replica=cpus_per_replica,
                              gpus_per_replica=gpus_per_replica)
        serve.run(app, name=APP_NAME, route_prefix="/")
        if not blocking:
            started = False  # the caller owns the running app
            return
        print(f"decodekit: serving {spec} on http://{config.host}:{config.port} with {replicas} Ray Serve replica(s)", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        if started:
            serve.delete(APP_NAME)
            serve.shutdown()
            ray.shutdown()
