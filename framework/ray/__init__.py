"""Scale-out on Ray (the ``[ray]`` extra): batch runs on Ray Data, replicated serving on Ray Serve.

>>> import ray
>>> from framework.ray import PipelinePredictor
>>> ds = ray.data.from_items([{"id": "a", "prompt": "Once upon a time"}])  # doctest: +SKIP
>>> ds = ds.map_batches(PipelinePredictor, fn_constructor_kwargs={"spec": "spec.yaml"},
...                     batch_size=64, compute=ray.data.ActorPoolStrategy(size=2))  # doctest: +SKIP

* :class:`PipelinePredictor` — a stateful callable class for ``Dataset.map_batches``: each
  actor loads the pipeline once and runs every batch through its own engine (continuous
  batching inside the batch). Output rows carry ``record``: the JSON line ``decodekit run``
  writes, plus ``id``, ``text`` and ``error``.
* :func:`run_ray` — ``decodekit run SPEC --prompts FILE --output OUT --ray``: the same results
  file as the local run (fingerprinted, resumable, never truncated), written by the driver.
* :func:`serve_ray` — ``decodekit serve SPEC --ray --replicas N``: the OpenAI-compatible app
  behind a Ray Serve deployment, one engine per replica.

See docs/scale_out.md. Importing this package does not import Ray; its functions do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

_LAZY = {
    "PipelinePredictor": "framework.ray.batch",
    "RayRunOptions": "framework.ray.batch",
    "run_ray": "framework.ray.batch",
    "serve_ray": "framework.ray.serving",
    "build_serve_app": "framework.ray.serving",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'framework.ray' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)


if TYPE_CHECKING:  # pragma: no cover
    from framework.ray.batch import PipelinePredictor, RayRunOptions, run_ray
    from framework.ray.serving import build_serve_app, serve_ray

__all__ = ["PipelinePredictor", "RayRunOptions", "run_ray", "serve_ray", "build_serve_app"]
