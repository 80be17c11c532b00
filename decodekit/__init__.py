"""decodekit: LLM text generation where every decoding technique is a plugin.

The public package: a thin layer over the core runtime in :mod:`framework`, so the names people
expect work as they do in vLLM::

    from decodekit import LLM, SamplingParams

    llm = LLM(model="demo")
    outs = llm.generate(["Hello"], sampling_params=SamplingParams(max_tokens=16, temperature=0))

Every name in ``framework.__all__`` is available here (imported lazily: ``import decodekit``
does not import torch until a class that needs it is used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import framework as _framework
from framework import (
    ConfigError,
    DecodekitError,
    InvalidRequestError,
    ModelLoadError,
    PluginError,
    TokenizerError,
    __all__,
    __version__,
)


def __getattr__(name: str) -> Any:
    return getattr(_framework, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from framework import (  # noqa: F401
        LLM,
        AsyncEngine,
        CompletionOutput,
        EngineConfig,
        LLMEngine,
        Pipeline,
        RequestMetrics,
        RequestOutput,
        SamplingParams,
        SpecError,
        load_pipeline,
    )

__all__ = list(__all__)  # noqa: F811 - the same public names as framework
del TYPE_CHECKING, Any, annotations
