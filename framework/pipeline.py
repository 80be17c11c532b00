"""Assemble a pipeline from a spec: ``load_pipeline("spec.yaml").generate(prompts)``."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Sequence

from framework.engine import PromptType
from framework.outputs import RequestOutput
from framework.sampling_params import SamplingParams
from framework.spec import LoadedSpec, load_spec


class Pipeline:
    """A loaded model plus the spec's decoding recipe.

    Sampling parameters come from the spec's ``sampling`` section and its plugin sections;
    each call may override any SamplingParams field (``pipe.generate(p, temperature=0)``).
    """

    def __init__(self, loaded: LoadedSpec, **engine_overrides: Any):
        from framework.llm import LLM

        self.loaded = loaded
        self.spec = loaded.spec
        self.default_params = loaded.sampling_params()  # fail before the model loads
        engine_args = self.spec.engine.model_dump(exclude_unset=True)
        engine_args.update(engine_overrides)
        drafter = None if loaded.drafter is None else {loaded.drafter.name: loaded.drafter.options}
        self.llm = LLM(loaded.model_path, models=loaded.models, drafter=drafter, **engine_args)

    @property
    def engine(self):
        return self.llm.engine

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    def sampling_params(self, **overrides: Any) -> SamplingParams:
        """The spec's sampling parameters with ``overrides`` applied."""
        return self.loaded.sampling_params(**overrides) if overrides else self.default_params

    def generate(self, prompts: PromptType | Sequence[PromptType], *, use_tqdm: bool | None = None, **overrides: Any) -> list[RequestOutput]:
        """Run prompts to completion; one :class:`RequestOutput` per prompt, in order."""
        return self.llm.generate(prompts, self.sampling_params(**overrides), use_tqdm=use_tqdm)

    def stream(self, prompt: PromptType, **overrides: Any) -> Iterator[str]:
        """Yield text deltas of one completion."""
        return self.llm.stream(prompt, self.sampling_params(**overrides))


def load_pipeline(path: str | os.PathLike, **engine_overrides: Any) -> Pipeline:
    """Validate the spec at ``path`` (raising :class:`framework.spec.SpecError` with file:line
    messages) and load its model."""
    return Pipeline(load_spec(Path(path)), **engine_overrides)


def validate_pipeline(path: str | os.PathLike, *, plugin_manager: Any = None) -> LoadedSpec:
    """Check a spec as ``decodekit run`` would admit its requests, without loading the model:
    :func:`framework.spec.load_spec` (structure, names, options, paths, duplicate keys), then,
    with the model's ``config.json`` and tokenizer only, the per-request checks of every
    logits processor (bad words tokenize, token ids in the vocabulary ...) and the compilation
    of the spec's constraint (an invalid regex or JSON Schema, an undefined grammar rule).

    Raises:
        SpecError: every problem, each at the file:line of the section at fault.
    """
    from framework.spec import SpecError, SpecIssue, _Located, _marks

    loaded = load_spec(Path(path), plugin_manager=plugin_manager)
    problem = _admission_problem(loaded, plugin_manager)
    if problem is None:
        return loaded
    section, message = problem
    import yaml

    node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    raise SpecError(loaded.source, [_Located(_marks(node)).issue(section, message)])


def _option_path(message: str) -> tuple:
    """The option a processor's message names first (``"target: unknown label"`` -> ``("target",)``,
    ``"attributes[1].classifier: ..."`` -> ``("attributes", 1, "classifier")``), or ``()``."""
    import re

    head = message.split(":", 1)[0].strip() if ":" in message else ""
    if not re.fullmatch(r"[A-Za-z_]\w*(\[\d+\](\.[A-Za-z_]\w*)?)*", head):
        return ()
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"\[(\d+)\]\.?", head) if t)


def _admission_problem(loaded: LoadedSpec, plugin_manager: Any) -> tuple[tuple, str] | None:
    """``(spec path, message)`` of the first check the engine's admission would fail."""
    import torch

    from framework.constraints import PROCESSOR_NAME, wait_for_constraints
    from framework.errors import DecodekitError
    from framework.models.config import ModelConfig
    from framework.models.loader import resolve_model_dir
    from framework.plugins import get_plugin_manager
    from framework.processors import ProcessorChain, ProcessorSetup

    pm = plugin_manager or get_plugin_manager()
    params = loaded.sampling_params()
    engine = loaded.spec.engine
    try:
        model_dir = resolve_model_dir(loaded.model_path, pm)
        cfg = ModelConfig.from_dir(model_dir)
        tokenizer = None
        if not engine.skip_tokenizer_init:
            from framework.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(model_dir, engine.tokenizer, pm)
    except DecodekitError as exc:
        return ("model",), str(exc)
    eos = set(getattr(tokenizer, "eos_token_ids", ()) or ())
    if isinstance(cfg.eos_token_id, int):
        eos.add(cfg.eos_token_id)
    from framework.companions import ModelCatalog

    catalog = ModelCatalog(cfg, loaded.models, pm)  # companions described from their config.json
    chain = ProcessorChain(pm.registry("logits_processor"),
                           ProcessorSetup(cfg.vocab_size, torch.device("cpu"), frozenset(eos), tokenizer, catalog=catalog))
    if PROCESSOR_NAME in pm.registry("logits_processor"):
        chain.instance(PROCESSOR_NAME).bind(pm)
    if params.constraint_spec() is not None and tokenizer is None:
        return ("engine", "skip_tokenizer_init"), "constrained decoding needs the tokenizer (skip_tokenizer_init is set)"
    try:
        uses = chain.resolve(params)
        wait_for_constraints([SimpleNamespace(processors=uses)])
    except DecodekitError as exc:
        msg = str(exc)
        if msg.startswith("constraint: "):
            msg = msg.removeprefix("constraint: ")
            if loaded.constraint is not None:
                return ("constraint", loaded.constraint.name), msg
            field = next((f for f in ("json_schema", "regex", "grammar", "choice") if f in loaded.spec.sampling), "")
            return ("sampling", field) if field else ("sampling",), msg
        for i, ref in enumerate(loaded.processors):
            if msg.startswith(f"{ref.name}:") or f" {ref.name!r} " in msg:
                return ("processors", i, ref.name) + _option_path(msg.removeprefix(f"{ref.name}: ")), msg
        return ("sampling",), msg
    return None
