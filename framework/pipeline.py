"""Assemble a pipeline from a spec: ``load_pipeline("spec.yaml").generate(prompts)``."""

from __future__ import annotations

import os
from pathlib import Path
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
