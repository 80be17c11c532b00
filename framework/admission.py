"""Admission checks: prompts parsed and validated before a request touches any engine state."""

from __future__ import annotations

from typing import Any

import torch

from framework.errors import InvalidRequestError
from framework.sampling_params import SamplingParams

PromptType = str | dict[str, Any] | list[int]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def params_from(value: SamplingParams | dict[str, Any] | None) -> SamplingParams:
    """Accept SamplingParams or a dict of its fields; errors become InvalidRequestError."""
    if value is None:
        return SamplingParams()
    if isinstance(value, SamplingParams):
        return value
    if not isinstance(value, dict):
        raise InvalidRequestError(f"sampling params must be SamplingParams or a dict, not {type(value).__name__}")
    return SamplingParams(**value)


def parse_prompt(prompt: PromptType, tokenizer: Any) -> tuple[str | None, list[int]]:
    """``(text or None, token ids)`` of a prompt: a string, ``{"prompt_token_ids": [...]}``
    (optionally with its ``prompt`` text) or a list of ids."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidRequestError("text prompts need a tokenizer; pass {'prompt_token_ids': [...]}")
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        return prompt, tokenizer.encode(prompt)
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids"}
        if unknown:
            raise InvalidRequestError(f"prompt has unknown field(s): {', '.join(sorted(unknown))}")
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidRequestError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        if "prompt" in prompt:
            return parse_prompt(prompt["prompt"], tokenizer)
    if isinstance(prompt, list):
        return parse_prompt({"prompt_token_ids": prompt}, tokenizer)
    raise InvalidRequestError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, not {type(prompt).__name__}")


def check_prompt(ids: list[int], params: SamplingParams, engine: Any) -> None:
    """Refuse a prompt the engine cannot run (InvalidRequestError naming the limit)."""
    if not ids:
        raise InvalidRequestError("prompt is empty (0 tokens)")
    vocab = engine.model_config.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
    if len(ids) >= engine.max_model_len:
        raise InvalidRequestError(
            f"prompt has {len(ids)} tokens; the model's context is {engine.max_model_len} tokens "
            f"(prompt + at least one generated token must fit)"
        )
    if not engine.config.enable_chunked_prefill and len(ids) > engine.config.max_num_batched_tokens:
        raise InvalidRequestError(
            f"prompt has {len(ids)} tokens, more than max_num_batched_tokens="
            f"{engine.config.max_num_batched_tokens} (enable chunked prefill or raise the budget)"
        )
    if params.stop and engine.tokenizer is None:
        raise InvalidRequestError("stop strings need a tokenizer")
    if not engine.has_constraints and params.constraint_spec() is not None:
        raise InvalidRequestError("constrained decoding is not available (no 'constraint' logits processor registered)")
