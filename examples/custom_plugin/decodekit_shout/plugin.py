"""The `shout` logits processor: favour tokens that start with an upper-case letter.

It shows the whole plugin surface: a pydantic Params model (validated from YAML before any
model loads), a factory receiving the engine's setup once, per-row parameters kept in a tensor
indexed by slot, and one tensor op per step for every row that uses it.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from framework.hookspecs import hookimpl


class ShoutParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bonus: float = Field(2.0, ge=0.0, le=100.0, description="added to the logit of upper-case-initial tokens")


class Shout:
    """Adds ``bonus`` to upper-case-initial tokens, per row."""

    def __init__(self, setup) -> None:
        self.device = setup.device
        mask = torch.zeros(setup.vocab_size, dtype=torch.bool)
        if setup.tokenizer is not None:
            for i, b in enumerate(setup.tokenizer.token_byte_table()):
                text = b.decode("utf-8", "ignore").lstrip()
                mask[i] = bool(text) and text[0].isupper()
        self.mask = mask.to(self.device)
        self.bonus = torch.zeros(0, device=self.device)

    def add_request(self, slot: int, params: ShoutParams, request) -> None:
        if slot >= self.bonus.numel():
            grown = torch.zeros(max(2 * self.bonus.numel(), slot + 1), device=self.device)
            grown[: self.bonus.numel()] = self.bonus
            self.bonus = grown
        self.bonus[slot] = params.bonus

    def remove(self, slot: int) -> None:
        self.bonus[slot] = 0.0

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:  # [R, V], only this processor's rows
        return logits + self.bonus[ctx.slot_index][:, None] * self.mask


@hookimpl
def register_logits_processors(register) -> None:
    from decodekit_shout.blend import Blend, BlendParams

    register("shout", Shout, params=ShoutParams)
    register("blend", Blend, params=BlendParams)
