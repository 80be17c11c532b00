"""Built-in drafters for speculative decoding (``framework/drafting.py``)."""

from __future__ import annotations

from framework.hookspecs import Register, hookimpl


@hookimpl
def register_drafters(register: Register) -> None:
    """No built-in drafter yet."""
