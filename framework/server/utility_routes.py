"""vLLM's utility endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /version``.

Shaped as vLLM serves them, so its clients and scripts work unchanged:

* ``POST /tokenize`` ``{"prompt": "text", "add_special_tokens": true}`` or
  ``{"messages": [...], "add_generation_prompt": true}`` (rendered with the chat template, as
  ``/v1/chat/completions`` does) -> ``{"count", "max_model_len", "tokens"}``;
* ``POST /detokenize`` ``{"tokens": [ids]}`` -> ``{"prompt": "text"}``;
* ``GET /version`` -> ``{"version": "0.1.0"}``.

They sit behind ``--api-key`` like ``/v1``; errors are 400s naming the field.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, StrictInt

from framework.errors import InvalidRequestError
from framework.server.errors import bad_request
from framework.server.protocol import chat_messages, parse_body


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[StrictInt]


def add_utility_routes(app: FastAPI, state: Any, auth: Any) -> None:
    """Register the three routes on ``app`` (``state``: the server's ``ServerState``)."""

    @app.post("/tokenize", dependencies=[Depends(auth)])
    async def tokenize(request: Request) -> dict[str, Any]:
        req: TokenizeRequest = parse_body(await request.body(), TokenizeRequest)
        state.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give either prompt or messages", param="prompt")
        tok = state.tokenizer
        if req.messages is not None:
            from framework.chat import render_chat

            try:
                text = render_chat(tok, chat_messages(req.messages), req.add_generation_prompt)
            except InvalidRequestError as exc:
                raise bad_request(str(exc), param="messages") from None
            add_special = req.add_special_tokens and not state.has_chat_template
        else:
            text, add_special = req.prompt, req.add_special_tokens
        try:
            ids = tok.encode(text, add_special_tokens=add_special)
        except Exception as exc:  # noqa: BLE001 - whatever the tokenizer rejects is bad input
            raise bad_request(f"could not be tokenized: {exc}", param="prompt") from None
        return {"count": len(ids), "max_model_len": state.engine.max_model_len, "tokens": ids}

    @app.post("/detokenize", dependencies=[Depends(auth)])
    async def detokenize(request: Request) -> dict[str, Any]:
        req: DetokenizeRequest = parse_body(await request.body(), DetokenizeRequest)
        state.check_model(req.model)
        vocab = state.engine.model_config.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"tokens: token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        try:
            text = state.tokenizer.decode(req.tokens, skip_special_tokens=False)
        except Exception as exc:  # noqa: BLE001 - e.g. an id the model has but its tokenizer lacks
            raise bad_request(f"tokens could not be decoded: {exc}", param="tokens") from None
        return {"prompt": text}

    @app.get("/version", dependencies=[Depends(auth)])
    async def version() -> dict[str, str]:
        from framework import __version__

        return {"version": __version__}
