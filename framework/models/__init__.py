"""Model architectures and loading.

Built-in architectures register through the same ``register_models`` hook as third-party ones.
"""

from __future__ import annotations

from framework.hookspecs import hookimpl
from framework.models.attention import AttentionMetadata
from framework.models.config import ModelConfig
from framework.models.llama import LlamaForCausalLM
from framework.models.loader import load_model, resolve_model_dir

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@hookimpl
def register_models(register) -> None:
    # One native implementation serves the whole family; config flags select the differences.
    for arch in ARCHITECTURES:
        register(arch, LlamaForCausalLM)


__all__ = ["AttentionMetadata", "LlamaForCausalLM", "ModelConfig", "load_model", "resolve_model_dir"]
