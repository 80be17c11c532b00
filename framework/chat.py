"""Chat prompts: render ``messages`` with the tokenizer's Jinja chat template.

Templates run in Jinja's sandbox. A tokenizer without a template gets a plain default:
each message as ``<role>: <content>`` on its own line, then ``assistant:`` to answer.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

from framework.errors import InvalidRequestError

DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(msg: str) -> None:
        raise TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def validate_messages(messages: Any) -> list[dict[str, str]]:
    """Check ``[{"role": ..., "content": ...}, ...]`` and return it."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with string 'role' and 'content'")
    return messages


def render_chat(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text for ``messages`` under ``tokenizer.chat_template`` (or the default)."""
    from jinja2.exceptions import TemplateError

    messages = validate_messages(list(messages))
    template = getattr(tokenizer, "chat_template", None) or DEFAULT_TEMPLATE
    special = {}
    for name in ("bos_token", "eos_token"):
        tid = getattr(tokenizer, name + "_id", None)
        if tid is not None:
            try:
                special[name] = tokenizer.convert_ids_to_tokens([tid])[0]
            except Exception:  # noqa: BLE001 - a missing special token just renders empty
                special[name] = ""
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)
    except TemplateError as exc:
        raise InvalidRequestError(f"chat template failed: {exc}") from None
