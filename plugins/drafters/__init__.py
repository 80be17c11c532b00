"""Built-in drafters for speculative decoding (``framework/drafting.py``).

``prompt_lookup``: n-gram lookup in the prompt and the output (no model, point-mass drafts).
``draft_model``: a small language model of the same vocabulary (``demo-draft``) running as a
driven companion with its own paged KV, cut back when drafts are rejected.

Both take ``num_tokens`` (draft length per step) and ``adaptive`` (grow the length by one when a
whole draft is accepted, shrink it by one otherwise, between 1 and ``max_num_tokens``).
"""

from __future__ import annotations

from framework.hookspecs import Register, hookimpl
from plugins.drafters.draft_model import DraftModelDrafter
from plugins.drafters.prompt_lookup import PromptLookupDrafter


@hookimpl
def register_drafters(register: Register) -> None:
    register("prompt_lookup", PromptLookupDrafter, params=PromptLookupDrafter.Params)
    register("draft_model", DraftModelDrafter, params=DraftModelDrafter.Params)


__all__ = ["DraftModelDrafter", "PromptLookupDrafter"]
