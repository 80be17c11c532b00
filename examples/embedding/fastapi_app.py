"""A small FastAPI app that serves structured output from decodekit running in-process.

Not the OpenAI-compatible server (``decodekit serve``): your own endpoint, your own pydantic
models, the engine inside your process. One :class:`~decodekit.AsyncEngine` owns the model on a
background thread; requests from the event loop share its continuously batched steps::

    pip install -e ".[server]"
    python examples/embedding/fastapi_app.py --port 8001            # the bundled demo model
    curl -s localhost:8001/contacts -H 'content-type: application/json' \\
         -d '{"text": "Mia Costa, engineer in Turin, mia@example.com"}'

Every ``/contacts`` response is a valid ``Contact``: decoding is constrained by its JSON Schema.
"""

from __future__ import annotations

import argparse
import uuid
from contextlib import asynccontextmanager
from typing import AsyncIterator, Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from decodekit import LLM, AsyncEngine, InvalidRequestError, SamplingParams


class Contact(BaseModel):
    """The structured output: its JSON Schema constrains every completion."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=40)
    email: str = Field(max_length=60)
    city: str = Field(max_length=30)
    kind: Literal["customer", "supplier", "partner"]


class ContactRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=2000)
    max_tokens: int = Field(120, ge=8, le=512)
    seed: int | None = None


def create_app(model: str = "demo", **engine_args) -> FastAPI:
    """The app; the model loads when it starts (lifespan) and the engine stops with it."""
    holder: dict[str, AsyncEngine] = {}
    schema = Contact.model_json_schema()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        llm = LLM(model, **engine_args)
        aengine = holder["engine"] = AsyncEngine(llm.engine)
        aengine.start()
        try:
            yield
        finally:
            await aengine.shutdown()

    app = FastAPI(title="contacts", lifespan=lifespan)

    @app.post("/contacts", response_model=Contact)
    async def contacts(req: ContactRequest) -> Contact:
        params = SamplingParams(json_schema=schema, max_tokens=req.max_tokens, temperature=0.7, seed=req.seed)
        prompt = f"{req.text}\nThe contact as JSON:\n"
        try:
            out = await holder["engine"].generate(f"contact-{uuid.uuid4().hex}", prompt, params)
        except InvalidRequestError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        text = out.outputs[0].text
        try:
            return Contact.model_validate_json(text)
        except ValidationError:  # only when max_tokens ran out before the JSON closed
            raise HTTPException(status_code=422, detail=f"the output was cut at max_tokens={req.max_tokens}: {text!r}") from None

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args(argv)
    uvicorn.run(create_app(args.model), host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
