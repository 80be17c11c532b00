"""Did-you-mean for field names, including the names other libraries use for the same thing.

People arrive with vLLM's, Hugging Face's and OpenAI's vocabulary (``max_new_tokens``,
``gpu_memory_utilization``, ``guided_json`` ...). Every place that rejects an unknown field —
SamplingParams, EngineConfig, a pipeline spec's keys, a server request — words the error the
same way, pointing at the decodekit name::

    unknown field 'max_new_tokens'; decodekit calls it 'max_tokens'
    unknown field 'temperatur'; did you mean 'temperature'?
"""

from __future__ import annotations

import difflib
from typing import Iterable

__all__ = ["FOREIGN_NAMES", "field_hint", "unknown_field_message", "register_fields", "known_fields"]

FOREIGN_NAMES: dict[str, str] = {
    # Hugging Face generate() / text-generation-inference
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "max_length": "max_tokens (output tokens; the context is the engine's max_model_len)",
    "do_sample": "temperature (temperature: 0 is greedy, > 0 samples)",
    "stop_sequences": "stop",
    "stop_strings": "stop",
    "random_seed": "seed",
    "num_beam_groups": "num_beams (diverse beam search is not built in)",
    "eos_token_id": "stop_token_ids",
    "top_n_tokens": "logprobs",
    "return_full_text": "echo (server completions) or the prompt in RequestOutput.prompt",
    "decoder_input_details": "prompt_logprobs",
    "details": "logprobs",
    # vLLM
    "gpu_memory_utilization": "kv_cache_memory (an engine option: a size such as '2GiB', or num_kv_blocks)",
    "swap_space": "kv_cache_memory (an engine option; preempted sequences are recomputed, not swapped)",
    "use_beam_search": "num_beams",
    "guided_json": "json_schema (server: response_format, or guided_json as an alias)",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar (a lark grammar) or constraint: {gbnf: ...}",
    "structured_outputs": "json_schema / regex / choice / grammar",
    "tensor_parallel_size": "device (one device per engine)",
    "enforce_eager": "device (nothing to disable on CPU)",
    "trust_remote_code": "model (only local Llama-family directories load; no code is run)",
    "tokenizer_mode": "tokenizer (a registered tokenizer name)",
    "max_model_length": "max_model_len",
    "max_seq_len": "max_model_len",
    "context_length": "max_model_len",
    "num_threads_per_worker": "num_threads",
    # OpenAI / others
    "max_completion_tokens": "max_tokens",
    "top_logprobs": "logprobs",
    "stop_token": "stop_token_ids",
}
"""Names other libraries use -> what decodekit calls it (a hint, shown after 'decodekit calls it')."""

_FIELDS: dict[str, tuple[str, ...]] = {}


def register_fields(title: str, names: Iterable[str]) -> None:
    """Record the field names of the pydantic model titled ``title`` (its class name), so an
    unknown field in its validation errors gets a did-you-mean (see
    :func:`framework.sampling_params.format_validation_error`)."""
    _FIELDS[title] = tuple(names)


def known_fields(title: str | None) -> tuple[str, ...]:
    return _FIELDS.get(title or "", ())


def field_hint(name: str, known: Iterable[str], elsewhere: dict[str, Iterable[str]] | None = None) -> str:
    """``"; did you mean 'x'?"``, ``"; decodekit calls it 'x'"``, ``"; it belongs in 'engine'"``
    or ``""``. ``elsewhere``: other sections' field names, by section name."""
    for section, names in (elsewhere or {}).items():
        if name in set(names):
            return f"; it belongs in {section!r}"
    foreign = FOREIGN_NAMES.get(name)
    if foreign is not None:
        target, _, rest = foreign.partition(" ")
        return f"; decodekit calls it {target!r}" + (f" {rest}" if rest else "")
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.7)
    if close:
        return f"; did you mean {close[0]!r}?"
    for section, names in (elsewhere or {}).items():
        close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.8)
        if close:
            return f"; did you mean {close[0]!r} (in {section!r})?"
    return ""


def unknown_field_message(name: str, known: Iterable[str], elsewhere: dict[str, Iterable[str]] | None = None) -> str:
    """``unknown field 'max_new_tokens'; decodekit calls it 'max_tokens'``."""
    return f"unknown field {name!r}{field_hint(name, known, elsewhere)}"
