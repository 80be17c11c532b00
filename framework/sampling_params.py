"""Per-request generation parameters, named as users know them from vLLM and HF."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from framework.errors import InvalidRequestError


def format_validation_error(exc: ValidationError, what: str) -> str:
    """``invalid sampling params: top_p: Input should be less than or equal to 1``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or what
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc}: {msg}")
    return f"invalid {what}: " + "; ".join(parts)


class SamplingParams(BaseModel):
    """What to generate for one request. ``temperature=0`` means greedy.

    Unknown fields are errors (``extra="forbid"``); out-of-range values raise
    :class:`~framework.errors.InvalidRequestError` (a ``ValueError``) naming the field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidRequestError(format_validation_error(exc, "sampling params")) from None

    n: int = Field(1, ge=1, le=128, description="completions to return; they share the prompt's KV blocks")
    max_tokens: int = Field(16, ge=1, description="most tokens to generate")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus: smallest set with probability >= top_p")
    seed: int | None = Field(None, description="per-request seed: same output alone or in any batch")
    stop: list[str] = Field(default_factory=list, description="stop strings, matched on the detokenized text")
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="return this many top logprobs per token")
    skip_special_tokens: bool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: object) -> object:
        return [v] if isinstance(v, str) else ([] if v is None else v)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @model_validator(mode="after")
    def _seed_range(self) -> "SamplingParams":
        if self.seed is not None and not (-(2**63) <= self.seed < 2**64):
            raise ValueError("seed must fit in 64 bits")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
