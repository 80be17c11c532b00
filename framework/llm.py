"""Offline API shaped like vLLM's: ``LLM(model=...).generate(prompts, sampling_params)``."""

from __future__ import annotations

import sys
from typing import Any, Iterator, Sequence

from framework.engine import LLMEngine, PromptType
from framework.errors import InvalidRequestError
from framework.outputs import RequestOutput
from framework.sampling_params import SamplingParams

Messages = Sequence[dict[str, Any]]


class LLM:
    """Generate from a local Hugging Face directory or a registered model name.

    ``LLM(model, dtype="auto", device="auto", **engine_args)``; engine arguments are the fields
    of :class:`framework.config.EngineConfig` (``max_num_seqs``, ``kv_cache_memory`` ...).
    ``models={"alias": "name-or-dir"}`` loads companion models now (they share the KV budget);
    ``drafter={"name": {options}}`` turns on speculative decoding with a registered drafter.
    ``skip_tokenizer_init=True`` loads no tokenizer (for model directories without tokenizer
    files): prompts are then token ids (``{"prompt_token_ids": [...]}`` or a list of ints) and
    completions carry ``token_ids`` with empty ``text``.
    """

    def __init__(self, model: str, *, skip_tokenizer_init: bool = False, models: dict[str, str] | None = None,
                 drafter: dict[str, Any] | str | None = None, **engine_args: Any):
        if skip_tokenizer_init:
            engine_args["skip_tokenizer_init"] = True
        self.engine = LLMEngine(model, models=models, drafter=drafter, **engine_args)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | dict[str, Any] | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in prompt order.

        ``prompts``: a string, ``{"prompt_token_ids": [...]}``, a list of token ids, or a list
        of any of these. ``sampling_params``: one SamplingParams (or dict of its fields) for
        all, or one per prompt.

        Raises:
            InvalidRequestError: a prompt or its parameters are invalid, including a constraint
                (``json_schema``, ``regex``, ``grammar``, ``choice``, ``constraint``) that does
                not compile — whether the cheap checks at admission catch it (regex syntax, the
                JSON Schema meta-schema) or the compilation does (an undefined lark rule, a
                ``$ref`` that does not resolve, an unsupported keyword in strict mode, a time
                limit). Every request is validated, and every constraint compiled, before any
                request runs; on an error none ran and the engine is as it was.
        """
        prompts = _prompt_list(prompts)
        if sampling_params is None or isinstance(sampling_params, (SamplingParams, dict)):
            plist = [sampling_params] * len(prompts)
        else:
            plist = list(sampling_params)
            if len(plist) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(plist)} sampling params")
        return self._run(list(zip(prompts, plist)), use_tqdm)

    def chat(
        self,
        messages: Messages | Sequence[Messages],
        sampling_params: SamplingParams | dict[str, Any] | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Answer one conversation (``[{"role": ..., "content": ...}, ...]``) or a list of them,
        rendered with the tokenizer's chat template (a plain ``role: content`` one for models
        without a template), as ``/v1/chat/completions`` does. One output per conversation."""
        from framework.chat import render_chat

        tok = self.engine.tokenizer
        if tok is None:
            raise InvalidRequestError("chat() needs a tokenizer (the engine was started with skip_tokenizer_init)")
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = list(messages)  # type: ignore[arg-type]
        prompts: list[PromptType] = []
        for conv in conversations:
            text = render_chat(tok, list(conv), add_generation_prompt)  # type: ignore[arg-type]
            # a template writes its own special tokens (BOS ...); the plain default does not
            ids = tok.encode(text, add_special_tokens=not getattr(tok, "chat_template", None))
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, items: list[tuple[PromptType, Any]], use_tqdm: bool | None) -> list[RequestOutput]:
        from framework.constraints import wait_for_constraints

        engine = self.engine
        ids: list[str] = []
        reqs = []
        try:
            for prompt, p in items:
                req = engine.add_request(None, prompt, p)
                ids.append(req.request_id)
                reqs.append(req)
            wait_for_constraints(reqs)  # a constraint that does not compile raises here, like a bad parameter
        except BaseException:
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

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | dict[str, Any] | None = None) -> Iterator[str]:
        """Yield text deltas of one completion as they are generated (other requests in the
        engine keep running). Stop strings are never leaked: text that could start one is held
        back until it is known not to. One completion only: ``n > 1`` (or ``best_of``, beams
        returning several sequences) is refused — use :meth:`generate` for several samples.

        Raises:
            InvalidRequestError: as :meth:`generate`, and for ``n > 1``.
        """
        from framework.constraints import wait_for_constraints
        from framework.engine import params_from

        params = params_from(sampling_params)
        if params.n > 1 or (params.num_return_sequences or 1) > 1:
            raise InvalidRequestError(f"stream() yields one completion, but n={params.n} (num_return_sequences="
                                      f"{params.num_return_sequences or 1}) asks for several: use generate(), "
                                      "which returns every sample, or set n=1")
        engine = self.engine
        req = engine.add_request(None, prompt, params, stream=True)
        rid = req.request_id
        sent = 0
        try:
            wait_for_constraints([req])
            while True:
                for out in engine.step():
                    if out.request_id != rid:
                        continue
                    text = out.outputs[0].text
                    if out.delta:  # partial outputs carry only their new text
                        if text:
                            yield text
                            sent += len(text)
                    elif len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    if out.finished:
                        return
        finally:
            engine.abort_request(rid)  # no-op when finished; frees blocks if the consumer stops early


def _prompt_list(prompts: Any) -> list[PromptType]:
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _progress(total: int, use_tqdm: bool | None):
    if use_tqdm is None:
        use_tqdm = sys.stderr.isatty() and total > 1
    if not use_tqdm:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="req", dynamic_ncols=True)
