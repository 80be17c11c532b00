"""The model contract: what the engine needs of a registered architecture.

An architecture registers through ``register_models`` under the Hugging Face ``architectures``
string it serves; the engine builds it as ``factory(config, dtype=..., device=...)``, loads its
weights, and from then on only calls the methods below. Companion models (drafts, amateurs,
scorers) use the same contract.
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch

from framework.models.attention import AttentionMetadata


@runtime_checkable
class CausalLM(Protocol):
    """A decoder that runs the engine's flat, paged batches."""

    dtype: torch.dtype  # the weights' dtype (the KV cache uses it too)

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor name it needs, with its shape (the loader checks files against it)."""
        ...

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (already checked against :meth:`expected_tensors`) into the model."""
        ...

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] the step's new tokens, all sequences concatenated
        positions: torch.Tensor,  # [T] cache position of each (RoPE uses it)
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v): [slots, n_kv, head_dim]
        meta: AttentionMetadata,  # slot of each new token, context slots and masks per sequence
    ) -> torch.Tensor:  # [T, H] final-normed hidden states
        """Write each new token's K/V to its slot (``meta.slot_mapping``; none in candidate mode)
        and attend over each sequence's cached context; see ``framework/models/attention.py``."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` hidden states -> ``[N, V]`` float32 logits."""
        ...


__all__ = ["CausalLM"]
