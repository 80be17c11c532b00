"""Engine configuration (validated with pydantic; unknown fields are errors)."""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: int | str) -> int:
    """``1073741824``, ``"1GiB"``, ``"512 MB"`` -> bytes."""
    if isinstance(value, int):
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"cannot parse size {value!r} (examples: 512MiB, 2GiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def default_num_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


class EngineConfig(BaseModel):
    """How the engine runs: device, precision, batch limits, KV-cache budget."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    device: str = Field("auto", description="'auto' (CUDA if available, else CPU), 'cpu', 'cuda', 'cuda:1' ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto': float32 on CPU, the checkpoint's dtype (or bfloat16) on GPU"
    )
    max_num_seqs: int = Field(64, ge=1, description="most sequences in the running batch")
    max_num_batched_tokens: int = Field(2048, ge=1, description="token budget of one step (prefill + decode)")
    max_model_len: int | None = Field(None, ge=1, description="longest prompt + output; default: the model's")
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block")
    kv_cache_memory: int | str = Field("1GiB", validate_default=True, description="KV-cache budget in bytes or with a unit ('512MiB')")
    num_kv_blocks: int | None = Field(None, ge=1, description="exact number of KV blocks (overrides kv_cache_memory)")
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_threads: int | None = Field(None, ge=1, description="CPU threads for torch; default: the free cores")
    quantization: Literal["int8"] | None = Field(
        None, description="'int8': weight-only int8 projections on CPU (one scale per output row, bfloat16 "
        "activations; dtype auto becomes bfloat16); default: none")
    seed: int = Field(0, description="seed of the engine's generator for requests without their own seed")
    sampler: str = Field("default", description="registered sampler name")
    tokenizer: str | None = Field(None, description="registered tokenizer name; default: detected from the model dir")
    kv_policy: dict[str, Any] | str | None = Field(
        None, description="a registered KV policy, {name: {options}} or name (default: keep every block)")
    skip_tokenizer_init: bool = Field(
        False, description="load no tokenizer (model directories without tokenizer files): prompts are token ids "
        "({prompt_token_ids: [...]}), outputs carry token_ids and empty text; stop strings and constraints need one")
    freeze_gc: bool = Field(
        True,
        description="after loading, move every live object to the garbage collector's permanent generation "
        "(gc.freeze): full collections while decoding then scan only what decoding made, not the whole heap "
        "(torch alone makes one cost ~100 ms)",
    )

    @field_validator("kv_cache_memory")
    @classmethod
    def _size(cls, v: int | str) -> int:
        n = parse_size(v)
        if n <= 0:
            raise ValueError("must be positive")
        return n


def _register() -> None:
    from framework.names import register_fields

    register_fields("EngineConfig", EngineConfig.model_fields)


_register()
