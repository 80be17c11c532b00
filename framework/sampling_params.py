"""Per-request generation parameters, named as users know them from vLLM and HF."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from framework.errors import InvalidRequestError

_FLOAT32_MAX = 3.4028234663852886e38


def format_validation_error(exc: ValidationError, what: str, model: type[BaseModel] | None = None) -> str:
    """``invalid sampling params: top_p: Input should be less than or equal to 1``. An unknown
    top-level field gets a did-you-mean against ``model``'s fields (default: the fields
    registered for the model the error is about, :func:`framework.names.register_fields`)."""
    from framework.names import field_hint, known_fields

    known = tuple(model.model_fields) if model is not None else known_fields(exc.title)
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field" + (field_hint(str(err["loc"][-1]), known) if len(err["loc"]) == 1 else "")
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"invalid {what}: " + "; ".join(parts)


CONSTRAINT_FIELDS = ("json_schema", "regex", "grammar", "choice", "constraint")
"""SamplingParams fields that select a constraint (at most one may be set)."""


class SamplingParams(BaseModel):
    """What to generate for one request. ``temperature=0`` means greedy.

    The logits-processing fields turn on built-in logits processors (``plugins/samplers``), which
    run in Hugging Face transformers' order: logit_bias, repetition_penalty, frequency/presence
    penalties, no_repeat_ngram_size, bad_words, min_tokens, (``processors`` named here), then for
    sampled requests temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff.

    Unknown fields are errors (``extra="forbid"``); out-of-range values raise
    :class:`~framework.errors.InvalidRequestError` (a ``ValueError``) naming the field. Checks
    that need the model (token ids within the vocabulary, tokenizing ``bad_words``) run when the
    engine accepts the request.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            err = InvalidRequestError(format_validation_error(exc, "sampling params"))
            err.validation_errors = exc.errors()  # structured, for callers that point at a field
            raise err from None

    n: int = Field(1, ge=1, le=128, description="completions to return; they share the prompt's KV blocks")
    max_tokens: int = Field(16, ge=1, description="most tokens to generate")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus: smallest set with probability >= top_p")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="drop tokens less likely than min_p x the top token's probability; 0 = off")
    typical_p: float = Field(1.0, gt=0.0, le=1.0, description="locally typical sampling mass; 1 = off")
    epsilon_cutoff: float = Field(0.0, ge=0.0, lt=1.0, description="drop tokens with probability < epsilon; 0 = off")
    eta_cutoff: float = Field(0.0, ge=0.0, lt=1.0, description="eta sampling: entropy-dependent cutoff; 0 = off")
    min_tokens_to_keep: int = Field(1, ge=1, description="top-k/top-p/min-p/typical/epsilon/eta never keep fewer tokens")
    repetition_penalty: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="CTRL-style, over prompt + output; 1 = off")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI-style: minus penalty x count in the output")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI-style: minus penalty if in the output")
    no_repeat_ngram_size: int = Field(0, ge=0, description="never repeat an n-gram of this size (prompt + output); 0 = off")
    logit_bias: dict[int, float] | None = Field(None, description="token id -> bias added to its logit, in [-100, 100]")
    bad_words: list[str] = Field(default_factory=list, description="words/phrases never generated (tokenized per request)")
    bad_words_ids: list[list[int]] = Field(default_factory=list, description="token sequences never generated")
    min_tokens: int = Field(0, ge=0, description="generate at least this many tokens: EOS and stop_token_ids are "
                            "masked and stop strings not checked until then")
    processors: list[dict[str, dict[str, Any] | None]] = Field(
        default_factory=list, description="more registered logits processors: [{name: {options}}] or [name]"
    )
    seed: int | None = Field(None, description="per-request seed: same output alone or in any batch")
    stop: list[str] = Field(default_factory=list, description="stop strings, matched on the detokenized text")
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = Field(None, ge=0, le=20, description="return this many top logprobs per token")
    prompt_logprobs: int | None = Field(None, ge=0, le=20, description="return the logprob of each prompt token "
                                        "(and this many top alternatives); disables prefix-cache reuse for the request")
    best_of: int | None = Field(None, ge=1, le=128, description="sample this many completions (>= n) and return the n "
                                "with the highest cumulative logprob")
    num_beams: int = Field(1, ge=1, le=64, description="beam search with this many beams (1 = off)")
    length_penalty: float = Field(1.0, allow_inf_nan=False, description="beam score = sum of logprobs / "
                                  "generated_length ** length_penalty")
    early_stopping: bool | Literal["never"] = Field(False, description="beam search: True stops when num_beams "
                                                    "hypotheses are done; False when no running beam can beat them "
                                                    "(HF heuristic); 'never' when none can at max length")
    num_return_sequences: int | None = Field(None, ge=1, description="beam search: how many beams to return, best "
                                             "first (<= num_beams; default 1)")
    skip_special_tokens: bool = True
    # constrained decoding (framework/constraints.py, plugins/constraints): at most one of these
    json_schema: dict[str, Any] | bool | str | None = Field(
        None, description="output is JSON valid under this JSON Schema (object, JSON text or .json path)")
    regex: str | None = Field(None, description="output matches this regular expression (Python re, anchored)")
    grammar: str | None = Field(None, description="output parses with this lark grammar (inline text, a shipped "
                                "name such as 'json', or a .lark path)")
    choice: list[str] | None = Field(None, description="output is exactly one of these strings")
    constraint: dict[str, Any] | None = Field(
        None, description="any registered constraint: {name: params} (e.g. {gbnf: 'root ::= ...'})")
    reranker: dict[str, Any] | str | None = Field(
        None, description="a registered reranker choosing the n outputs among the num_samples candidates: "
        "{name: {options}} or name (best_of > n without one: 'logprob')")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: object) -> object:
        return [v] if isinstance(v, str) else ([] if v is None else v)

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        for tok, bias in (v or {}).items():
            if tok < 0:
                raise ValueError(f"token id {tok} is negative")
            if not -100.0 <= bias <= 100.0:  # also rejects nan
                raise ValueError(f"bias {bias} for token {tok} is outside [-100, 100]")
        return v

    @field_validator("bad_words")
    @classmethod
    def _bad_words_nonblank(cls, v: list[str]) -> list[str]:
        if any(not w.strip() for w in v):
            raise ValueError("bad words must not be empty or blank")
        return v

    @field_validator("bad_words_ids")
    @classmethod
    def _bad_words_ids_valid(cls, v: list[list[int]]) -> list[list[int]]:
        for seq in v:
            if not seq:
                raise ValueError("a bad word token sequence must not be empty")
            if any(t < 0 for t in seq):
                raise ValueError(f"negative token id in {seq}")
        return v

    @field_validator("processors", mode="before")
    @classmethod
    def _processor_entries(cls, v: object) -> object:
        if not isinstance(v, list):
            return v
        out = []
        for entry in v:
            if isinstance(entry, str):  # a bare name: default options
                entry = {entry: {}}
            if isinstance(entry, dict) and len(entry) != 1:
                raise ValueError(f"each processor entry names one processor, got {sorted(entry)}")
            out.append(entry)
        return out

    @model_validator(mode="after")
    def _cross_field(self) -> "SamplingParams":
        if self.seed is not None and not (-(2**63) <= self.seed < 2**64):
            raise ValueError("seed must fit in 64 bits")
        for name, value in self:  # tensors are float32: a larger value would overflow inside a step
            if isinstance(value, float) and not abs(value) <= _FLOAT32_MAX:
                raise ValueError(f"{name}: {value} is not a finite float32 value")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.num_beams > 1:
            self._check_beam_search()
        elif self.num_return_sequences not in (None, 1):
            raise ValueError("num_return_sequences > 1 needs beam search (num_beams > 1); use n for samples")
        self._check_constraint()
        if isinstance(self.reranker, dict) and len(self.reranker) != 1:
            raise ValueError(f"reranker names one registered reranker: {{name: options}}, got {sorted(self.reranker)}")
        return self

    def _check_constraint(self) -> None:
        given = [f for f in CONSTRAINT_FIELDS if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one constraint (got {', '.join(given)})")
        if self.constraint is not None and len(self.constraint) != 1:
            raise ValueError(f"constraint names one registered constraint: {{name: params}}, got {sorted(self.constraint)}")
        if given and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with a constraint (the grammar decides where the output ends)")

    def constraint_spec(self) -> tuple[str, Any] | None:
        """``(registered constraint name, params)`` this request asks for, or None.

        ``json_schema=S`` is ``("json_schema", S)`` and likewise for ``regex``, ``grammar`` and
        ``choice``; ``constraint={name: params}`` is ``(name, params)``. Params are validated by
        the constraint's own model when the engine accepts the request.
        """
        for f in ("json_schema", "regex", "grammar", "choice"):
            v = getattr(self, f)
            if v is not None:
                return f, v
        if self.constraint is not None:
            ((name, params),) = self.constraint.items()
            return str(name), params
        return None

    def _check_beam_search(self) -> None:
        if self.num_return_sequences is not None and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        if self.n > 1 or (self.best_of or 1) > 1:
            raise ValueError("beam search returns num_return_sequences beams: n > 1 and best_of > 1 are not allowed with num_beams > 1")
        sampling = {"temperature": self.temperature not in (0.0, 1.0), "top_k": self.top_k > 0, "top_p": self.top_p < 1.0,
                    "min_p": self.min_p > 0.0, "typical_p": self.typical_p < 1.0, "epsilon_cutoff": self.epsilon_cutoff > 0.0,
                    "eta_cutoff": self.eta_cutoff > 0.0}
        bad = [k for k, on in sampling.items() if on]
        if bad:
            raise ValueError(f"beam search is deterministic: {', '.join(bad)} cannot be used with num_beams > 1")
        if self.stop:
            raise ValueError("stop strings are not supported with beam search (use stop_token_ids)")
        if any(getattr(self, f) is not None for f in CONSTRAINT_FIELDS):
            raise ValueError("constrained decoding cannot be combined with beam search (num_beams > 1)")
        if self.reranker is not None:
            raise ValueError("a reranker cannot be combined with beam search (beams come back best first)")
        if self.logprobs is not None:
            raise ValueError("logprobs are not returned by beam search (each output carries its score)")

    @property
    def num_samples(self) -> int:
        """Sequences sampled for this request: ``best_of`` if set, else ``n`` (1 with beam search:
        the beams are managed by the search)."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def use_beam_search(self) -> bool:
        return self.num_beams > 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _register() -> None:
    from framework.names import register_fields

    register_fields("SamplingParams", SamplingParams.model_fields)


_register()
