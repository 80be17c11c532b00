"""Offline API shaped like vLLM's: ``LLM(model=...).generate(prompts, params)``."""

from __future__ import annotations

import sys
from typing import Any, Iterator, Sequence

from framework.engine import LLMEngine, PromptType
from framework.outputs import RequestOutput
from framework.sampling_params import SamplingParams


class LLM:
    """Generate from a local Hugging Face directory or a registered model name.

    ``LLM(model, dtype="auto", device="auto", **engine_args)``; engine arguments are the fields
    of :class:`framework.config.EngineConfig` (``max_num_seqs``, ``kv_cache_memory`` ...).
    ``models={"alias": "name-or-dir"}`` loads companion models now (they share the KV budget);
    ``drafter={"name": {options}}`` turns on speculative decoding with a registered drafter.
    """

    def __init__(self, model: str, *, skip_tokenizer_init: bool = False, models: dict[str, str] | None = None,
                 drafter: dict[str, Any] | str | None = None, **engine_args: Any):
        self.engine = LLMEngine(model, skip_tokenizer_init=skip_tokenizer_init, models=models, drafter=drafter, **engine_args)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        ``prompts``: a string, ``{"prompt_token_ids": [...]}``, or a list of either.
        ``params``: one SamplingParams for all, or one per prompt.
        All requests are validated before any is queued, so a bad one leaves the engine untouched.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None or isinstance(params, (SamplingParams, dict)):
            plist = [params] * len(prompts)
        else:
            plist = list(params)
            if len(plist) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        engine = self.engine
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, plist):
                ids.append(engine.add_request(None, prompt, p).request_id)
        except Exception:
            for rid in ids:  # leave the engine as it was
                engine.abort_request(rid)
            raise
        pending = set(ids)
        results: dict[str, RequestOutput] = {}
        bar = _progress(len(ids), use_tqdm)
        try:
            while pending:
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        results[out.request_id] = out
                        pending.discard(out.request_id)
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            for rid in pending:
                engine.abort_request(rid)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [results[rid] for rid in ids]

    def stream(self, prompt: PromptType, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one completion as they are generated (other requests in the
        engine keep running). Stop strings are never leaked: text that could start one is held
        back until it is known not to."""
        engine = self.engine
        rid = engine.add_request(None, prompt, params, stream=True).request_id
        sent = 0
        try:
            while True:
                for out in engine.step():
                    if out.request_id != rid:
                        continue
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    if out.finished:
                        return
        finally:
            engine.abort_request(rid)  # no-op when finished; frees blocks if the consumer stops early


def _progress(total: int, use_tqdm: bool | None):
    if use_tqdm is None:
        use_tqdm = sys.stderr.isatty() and total > 1
    if not use_tqdm:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="req", dynamic_ncols=True)
