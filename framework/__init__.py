"""decodekit core runtime: the public API.

>>> from framework import LLM, SamplingParams
>>> llm = LLM(model="path/to/hf-dir")
>>> out = llm.generate(["Hello"], SamplingParams(max_tokens=16, temperature=0))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from framework.errors import (
    ConfigError,
    DecodekitError,
    InvalidRequestError,
    ModelLoadError,
    PluginError,
    TokenizerError,
)

__version__ = "0.1.0"

_LAZY = {
    "LLM": "framework.llm",
    "LLMEngine": "framework.engine",
    "AsyncEngine": "framework.async_engine",
    "EngineConfig": "framework.config",
    "SamplingParams": "framework.sampling_params",
    "RequestOutput": "framework.outputs",
    "CompletionOutput": "framework.outputs",
    "RequestMetrics": "framework.outputs",
    "Pipeline": "framework.pipeline",
    "load_pipeline": "framework.pipeline",
    "SpecError": "framework.spec",
}


def __getattr__(name: str) -> Any:  # import heavy modules (torch) only when used
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'framework' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)


if TYPE_CHECKING:  # pragma: no cover
    from framework.async_engine import AsyncEngine
    from framework.config import EngineConfig
    from framework.engine import LLMEngine
    from framework.llm import LLM
    from framework.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from framework.pipeline import Pipeline, load_pipeline
    from framework.sampling_params import SamplingParams
    from framework.spec import SpecError

__all__ = [
    "LLM",
    "LLMEngine",
    "AsyncEngine",
    "EngineConfig",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "RequestMetrics",
    "Pipeline",
    "load_pipeline",
    "SpecError",
    "ConfigError",
    "DecodekitError",
    "InvalidRequestError",
    "ModelLoadError",
    "PluginError",
    "TokenizerError",
]
