"""Built-in samplers (registered through ``register_samplers``)."""

from __future__ import annotations

from framework.hookspecs import hookimpl
from plugins.samplers.basic import BasicSampler


@hookimpl
def register_samplers(register) -> None:
    register("default", BasicSampler)
