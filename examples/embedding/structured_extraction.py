"""Structured extraction with decodekit embedded in a program: JSON Schema and pydantic models.

Every completion is JSON valid under the schema (the ``json_schema`` constraint), so it parses
straight into the pydantic model — no retry loop, no "please answer in JSON" prompt tricks::

    python examples/embedding/structured_extraction.py                 # the bundled demo model
    python examples/embedding/structured_extraction.py --model /path/to/hf-dir --max-tokens 200

The demo model is tiny: its records are well-formed and schema-valid, but not true to the
prompt. A real instruction model gives real answers with the same code.
"""

from __future__ import annotations

import argparse
import json
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from decodekit import LLM, SamplingParams


class Person(BaseModel):
    """What the model must return for each prompt (its JSON Schema constrains decoding).
    ``extra="forbid"`` makes the schema say ``additionalProperties: false``: without it any other
    key is valid JSON Schema-wise, and a model may spend its tokens on them."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=40)
    age: int = Field(ge=0, le=120)
    city: str = Field(max_length=30)
    role: Literal["engineer", "teacher", "artist", "doctor"]
    email: Optional[str] = Field(default=None, max_length=60)


REVIEW = {  # a plain JSON Schema works the same way
    "type": "object",
    "properties": {
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "summary": {"type": "string", "maxLength": 80},
        "tags": {"type": "array", "items": {"enum": ["price", "quality", "service"]}, "maxItems": 3},
    },
    "required": ["rating", "summary", "tags"],
    "additionalProperties": False,
}


def extract_people(llm: LLM, texts: list[str], max_tokens: int = 160, seed: int = 0) -> list[Person]:
    """One :class:`Person` per text, batched in one ``generate`` call."""
    params = SamplingParams(json_schema=Person.model_json_schema(), max_tokens=max_tokens, temperature=0.7, seed=seed)
    prompts = [f"{t}\nA person record in JSON:\n" for t in texts]
    return [Person.model_validate_json(out.outputs[0].text) for out in llm.generate(prompts, sampling_params=params)]


def rate_reviews(llm: LLM, texts: list[str], max_tokens: int = 120, seed: int = 0) -> list[dict]:
    params = SamplingParams(json_schema=REVIEW, max_tokens=max_tokens, temperature=0.7, seed=seed)
    outs = llm.generate([f"Review: {t}\nAs JSON:\n" for t in texts], sampling_params=params)
    return [json.loads(o.outputs[0].text) for o in outs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--max-tokens", type=int, default=160)
    args = ap.parse_args(argv)
    llm = LLM(args.model, kv_cache_memory="256MiB")
    people = extract_people(llm, ["Mia Costa, 42, is an engineer in Turin.", "Dr. Ben Chen (23) lives in Accra."],
                            args.max_tokens)
    for p in people:
        print(p.model_dump_json())
    for r in rate_reviews(llm, ["Great value, friendly staff.", "Slow delivery and the box was broken."]):
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
