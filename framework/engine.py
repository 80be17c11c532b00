"""The engine: requests in, one ``step()`` at a time, outputs out.

``step()`` is the unit of work: schedule (continuous batching) -> one model forward for every
scheduled token -> sample one token for each sequence whose next token is due -> advance,
detokenize, check stops -> return the outputs of requests that finished (and, for streaming
requests, of those that progressed).

A bad request is rejected in :meth:`LLMEngine.add_request` with :class:`InvalidRequestError`
before it touches any engine state, so it never disturbs the requests already running.
"""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import logging
import time
from typing import Any

import torch
from pydantic import ValidationError

from framework.config import EngineConfig, default_num_threads
from framework.constraints import PROCESSOR_NAME as CONSTRAINT_PROCESSOR
from framework.constraints import ConstraintHandle, ConstraintProcessor
from framework.errors import ConfigError, InvalidRequestError
from framework.kv_cache import BlockManager, KVCacheStorage
from framework.model_runner import ModelRunner
from framework.models.loader import load_model
from framework.outputs import RequestMetrics, RequestOutput, StepStats
from framework.plugins import PluginManager, get_plugin_manager
from framework.beam_search import BeamSearch
from framework.processors import ProcessorChain, ProcessorSetup
from framework.sampling import SamplingBatch
from framework.sampling_params import SamplingParams, format_validation_error
from framework.scheduler import Scheduler
from framework.sequence import Request, Sequence, SeqStatus

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any] | list[int]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def params_from(value: SamplingParams | dict[str, Any] | None) -> SamplingParams:
    """Accept SamplingParams or a dict of its fields; errors become InvalidRequestError."""
    if value is None:
        return SamplingParams()
    if isinstance(value, SamplingParams):
        return value
    if not isinstance(value, dict):
        raise InvalidRequestError(f"sampling params must be SamplingParams or a dict, not {type(value).__name__}")
    return SamplingParams(**value)


class LLMEngine:
    """Continuous-batching generation engine over one model."""

    def __init__(
        self,
        model: str,
        config: EngineConfig | None = None,
        *,
        plugin_manager: PluginManager | None = None,
        skip_tokenizer_init: bool = False,
        **engine_args: Any,
    ):
        if config is None:
            try:
                config = EngineConfig(**engine_args)
            except ValidationError as exc:
                raise ConfigError(format_validation_error(exc, "engine config")) from None
        elif engine_args:
            config = config.model_copy(update=engine_args)
        self.config = config
        self.pm = plugin_manager or get_plugin_manager()
        torch.set_num_threads(config.num_threads or default_num_threads())
        self.device = resolve_device(config.device)
        self.model, self.model_config, self.model_dir = load_model(model, config.dtype, self.device, self.pm)
        self.dtype = self.model.dtype
        self.tokenizer = None
        if not skip_tokenizer_init:
            from framework.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.model_dir, config.tokenizer, self.pm)
        mc = self.model_config
        bs = config.block_size
        num_blocks = config.num_kv_blocks or KVCacheStorage.num_blocks_for_budget(mc, int(config.kv_cache_memory), bs, self.dtype)
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, num_blocks * bs)
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.kv = KVCacheStorage(mc, num_blocks, bs, self.dtype, self.device)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill)
        self.runner = ModelRunner(self.model, mc, self.kv, bs, self.device)
        self.sampler = self.pm.get("sampler", config.sampler).factory()
        self.eos_token_ids: frozenset[int] = self._eos_ids()
        self.processors = ProcessorChain(
            self.pm.registry("logits_processor"),
            ProcessorSetup(mc.vocab_size, self.device, self.eos_token_ids, self.tokenizer),
        )
        self.generator = torch.Generator().manual_seed(config.seed)
        # constrained decoding (framework/constraints.py): the processor that owns grammar states,
        # and the sequences waiting for their grammar to compile (outside the scheduler)
        self._constraints: ConstraintProcessor | None = None
        if CONSTRAINT_PROCESSOR in self.pm.registry("logits_processor"):
            self._constraints = self.processors.instance(CONSTRAINT_PROCESSOR)
            self._constraints.bind(self.pm)
        self._compiling: dict[str, Sequence] = {}
        self.jump_forward = True  # append grammar-forced tokens without a forward pass to choose them
        # on an accelerator the forward runs asynchronously: a mask not known yet is left to the
        # constraint processor, which computes it while the next forward runs (jump-forward then
        # only follows masks already known)
        self.constraint_overlap = self.device.type != "cpu"
        # on CPU the forward blocks this thread: with constraint_prefetch the next masks are
        # computed on a worker thread meanwhile (torch releases the GIL inside its kernels)
        self.constraint_prefetch = False
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._req_ids = itertools.count()
        self.step_count = 0
        self.num_prefill_tokens = 0  # prompt (and recomputed) tokens run through the model
        self.num_generated_tokens = 0
        if config.freeze_gc:
            # the heap is mostly what loading made (torch, the model, the tokenizer) and stays:
            # keep full collections, which a grammar's caches trigger as they grow, off it
            gc.collect()
            gc.freeze()

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.eos_token_ids)
        eos = self.model_config.eos_token_id
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
        return frozenset(ids)

    # ------------------------------------------------------------------------ requests
    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("text prompts need a tokenizer; pass {'prompt_token_ids': [...]}")
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids"}
            if unknown:
                raise InvalidRequestError(f"prompt has unknown field(s): {', '.join(sorted(unknown))}")
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                    raise InvalidRequestError("prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
        if isinstance(prompt, list):
            return self._prompt_ids({"prompt_token_ids": prompt})
        raise InvalidRequestError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, not {type(prompt).__name__}")

    def add_request(
        self,
        request_id: str | None,
        prompt: PromptType,
        params: SamplingParams | dict[str, Any] | None = None,
        *,
        stream: bool = False,
        arrival_time: float | None = None,
    ) -> Request:
        """Validate and queue a request. Raises InvalidRequestError (engine state unchanged)."""
        params = params_from(params)
        text, ids = self._prompt_ids(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty (0 tokens)")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len} tokens "
                f"(prompt + at least one generated token must fit)"
            )
        if not self.config.enable_chunked_prefill and len(ids) > self.config.max_num_batched_tokens:
            raise InvalidRequestError(
                f"prompt has {len(ids)} tokens, more than max_num_batched_tokens="
                f"{self.config.max_num_batched_tokens} (enable chunked prefill or raise the budget)"
            )
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer")
        request_id = str(next(self._req_ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if self._constraints is None and params.constraint_spec() is not None:
            raise InvalidRequestError("constrained decoding is not available (no 'constraint' logits processor registered)")
        if params.use_beam_search and params.constraint_spec() is not None:
            raise InvalidRequestError("constrained decoding cannot be combined with beam search (num_beams > 1)")
        processors = self.processors.resolve(params)  # per-request checks (vocab, bad words, constraint ...)
        req = Request(
            request_id, text, ids, params,
            RequestMetrics(arrival_time=arrival_time or time.perf_counter(), num_prompt_tokens=len(ids)),
            stream=stream, processors=processors,
        )
        if params.use_beam_search:
            eos = (frozenset() if params.ignore_eos else self.eos_token_ids) | frozenset(params.stop_token_ids)
            req.beam = BeamSearch(
                num_beams=params.num_beams, length_penalty=params.length_penalty,
                early_stopping=params.early_stopping, prompt_len=len(ids),
                max_tokens=min(params.max_tokens, self.max_model_len - len(ids)), eos_token_ids=eos,
                num_return_sequences=params.num_return_sequences or 1,
            )
            req.forked = True  # the search creates and drops beams itself
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        seq = self._new_seq(req, 0)
        if req.beam is not None:
            seq.detok = None  # beams are decoded once, when the search ends
        self.requests[request_id] = req
        if self._constraint_handle(req) is not None:
            self._compiling[request_id] = seq  # scheduled once its grammar is compiled (step())
        else:
            self.scheduler.add(seq)
        self.pm.emit("on_request_added", request=req)
        return req

    def _new_seq(self, req: Request, index: int, parent: Sequence | None = None) -> Sequence:
        p = req.params
        gen = None
        if p.seed is not None:
            gen = torch.Generator().manual_seed((p.seed + index) % 2**64)
        detok = None
        if self.tokenizer is not None:
            from framework.tokenizer import IncrementalDetokenizer

            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, p.skip_special_tokens)
        seq = Sequence(
            seq_id=next(self._seq_ids), request=req, index=index,
            token_ids=list(req.prompt_token_ids), num_prompt_tokens=len(req.prompt_token_ids),
            generator=gen, detok=detok, logprobs=[] if p.logprobs is not None else None,
        )
        if parent is not None:
            seq.block_table = self.block_manager.fork(parent.block_table)
            seq.num_computed_tokens = parent.num_computed_tokens
            seq.num_hashed_blocks = parent.num_hashed_blocks
        req.seqs.append(seq)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks. Returns its final output (None if unknown)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self._compiling.pop(request_id, None)
        now = time.perf_counter()
        for seq in req.seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
                self.processors.release(seq)
                seq.status = SeqStatus.FINISHED
                seq.finish_reason = "abort"
        req.forked = True
        req.metrics.finished_time = now
        out = req.to_output()
        self.pm.emit("on_request_finished", output=out)
        return out

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ------------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        if self._constraints is not None:
            self._constraints.wait()  # a prefetch still running from a step that sampled nothing
        early = self._poll_compiling() if self._compiling else []
        sched = self.scheduler.schedule()
        for seq in sched.preempted:  # recomputed later: re-added to its processors from its tokens
            self.processors.release(seq)
            if seq.request.beam is not None:  # its logits come again when it is recomputed
                seq.request.beam_pending.pop(seq.seq_id, None)
        if sched.empty:
            return early
        for seq, _ in sched.scheduled:
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = t0
                seq.request.metrics.num_cached_tokens = seq.num_computed_tokens
        if self.constraint_prefetch and self._constraints is not None:
            self._constraints.prefetch()
        due, logits = self.runner.run(sched)
        bm = self.block_manager
        for seq, n in sched.scheduled:
            seq.num_computed_tokens += n
            seq.num_hashed_blocks = bm.commit_full_blocks(seq.block_table, seq.token_ids, seq.num_computed_tokens, seq.num_hashed_blocks)
        self.num_prefill_tokens += sched.num_prefill_tokens
        touched: dict[str, Request] = {}
        if due:
            assert logits is not None
            due, logits = self._fork_for_n(due, logits)
            beam_rows = [i for i, s in enumerate(due) if s.request.beam is not None]
            if beam_rows:  # beam search scores processed log-probabilities (HF order)
                logits = logits.clone()
                rows_t = torch.tensor(beam_rows, device=logits.device)
                logits[rows_t] = torch.log_softmax(logits[rows_t].float(), dim=-1).to(logits.dtype)
            processed, plan = self.processors.apply(due, logits)
            now = time.perf_counter()
            sample_rows = [i for i, s in enumerate(due) if s.request.beam is None]
            tokens_t = torch.zeros(len(due), dtype=torch.long, device=logits.device)
            if sample_rows:
                s_due = due if not beam_rows else [due[i] for i in sample_rows]
                idx = None if not beam_rows else torch.tensor(sample_rows, device=logits.device)
                s_proc = processed if idx is None else processed[idx]
                s_logits = logits if idx is None else logits[idx]
                batch = SamplingBatch.build(
                    [s.request.params for s in s_due], [s.generator for s in s_due], self.generator,
                    model_logits=None if processed is logits else s_logits,
                )
                out = self.sampler.sample(batch, s_proc)
                if idx is None:
                    tokens_t = out.tokens
                else:
                    tokens_t[idx] = out.tokens.to(tokens_t.device)
            # processors learn the new tokens before any sequence finishes (and releases its
            # slot); beam rows get a placeholder: their state is dropped in _beam_step (the new
            # beams are re-admitted from their tokens)
            self.processors.on_tokens(plan, tokens_t)
            if sample_rows:
                tokens = out.tokens.tolist()
                lps = out.logprobs.tolist()
                top_ids = out.top_ids.tolist() if out.top_ids is not None else None
                top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
                for i, seq in enumerate(s_due):
                    top = None
                    if seq.logprobs is not None and top_ids is not None:
                        k = seq.request.params.logprobs or 0
                        top = dict(zip(top_ids[i][:k], top_lps[i][:k]))
                    self._append_token(seq, tokens[i], lps[i], top, now)
                    touched[seq.request.request_id] = seq.request
            if sample_rows and self._constraints is not None and self._constraints.states:
                for seq in s_due:  # grammar states have advanced: append forced tokens
                    if not seq.finished and seq.slot in self._constraints.states:
                        self._jump_forward(seq, now)
            beam_reqs: dict[str, Request] = {}
            for i in beam_rows:
                seq = due[i]
                seq.request.beam_pending[seq.seq_id] = processed[i].float().cpu()
                beam_reqs[seq.request.request_id] = seq.request
            for rid, req in beam_reqs.items():
                if self._beam_step(req, now):
                    touched[rid] = req
        self.num_generated_tokens += len(due)
        outputs = early + self._collect_outputs(touched)
        self.step_count += 1
        if self.pm.listens["on_step_finished"]:
            self.pm.emit("on_step_finished", stats=self._step_stats(sched, time.perf_counter() - t0, outputs))
        return outputs

    # ------------------------------------------------------------------------ constraints
    @staticmethod
    def _constraint_handle(req: Request) -> ConstraintHandle | None:
        for use in req.processors:
            if use.name == CONSTRAINT_PROCESSOR:
                return use.params
        return None

    def _poll_compiling(self) -> list[RequestOutput]:
        """Schedule the requests whose grammar is ready; fail those whose compilation failed or
        timed out (they never held KV blocks). With nothing else to run, wait a little for a
        compilation instead of spinning."""
        if not self.scheduler.has_work:
            futs = [h.future for s in self._compiling.values() if (h := self._constraint_handle(s.request)) is not None]
            concurrent.futures.wait(futs, timeout=0.02, return_when=concurrent.futures.FIRST_COMPLETED)
        now_m = time.monotonic()
        touched: dict[str, Request] = {}
        for rid, seq in list(self._compiling.items()):
            handle = self._constraint_handle(seq.request)
            assert handle is not None
            if not handle.done(now_m):
                continue
            del self._compiling[rid]
            req = seq.request
            err = handle.error()
            if err is not None:
                logger.info("request %s failed: %s", rid, err)
                req.error = err
                req.forked = True
                for s in req.seqs:
                    s.status = SeqStatus.FINISHED
                    s.finish_reason = "error"
                touched[rid] = req
                continue
            if req.params.num_samples == 1 and not req.params.use_beam_search:
                self._initial_jump_forward(seq, handle)
            if seq.finished:  # the grammar forced the whole output (or max_tokens)
                touched[rid] = req
            else:
                self.scheduler.add(seq)
        return self._collect_outputs(touched) if touched else []

    def _initial_jump_forward(self, seq: Sequence, handle: ConstraintHandle) -> None:
        """Tokens the grammar forces before the first choice join the prompt's prefill."""
        p = seq.request.params
        if p.logprobs is not None or not self.jump_forward:
            return
        state = handle.compiled.new_state()
        forced = state.forced_tokens(min(32, p.max_tokens))
        if forced:
            now = time.perf_counter()
            for tok in forced:
                if seq.finished or not state.advance(tok):
                    break
                self._append_token(seq, tok, 0.0, None, now)
                self.num_generated_tokens += 1

    def _jump_forward(self, seq: Sequence, now: float) -> None:
        """After ``seq`` sampled a token: append the tokens its grammar forces from here (no
        forward pass chooses them; the next step computes their KV as one chunk). Skipped when
        the request wants logprobs (forced tokens have none). A grammar that is complete with no
        EOS token to end it (a tokenizer without one) finishes the sequence."""
        assert self._constraints is not None
        state = self._constraints.states[seq.slot]  # type: ignore[index]
        p = seq.request.params
        if self.constraint_overlap:
            peek = getattr(state, "peek_allowed_mask", None)
            if peek is not None and peek() is None:
                return
        allowed = getattr(state, "allowed_mask", None)
        if allowed is not None and allowed() == 0:
            seq.finish_reason = "stop"
            if seq.detok is not None:
                seq.text += seq.detok.flush()
            self._finish_seq(seq)
            return
        if p.logprobs is not None or not self.jump_forward:
            return
        forced = state.forced_tokens(min(32, p.max_tokens - seq.num_output_tokens))
        if not forced:
            return
        for tok in forced:
            if seq.finished or not state.advance(tok):
                break
            self._append_token(seq, tok, 0.0, None, now)
            self.num_generated_tokens += 1
        if not seq.finished and any(
            u.name != CONSTRAINT_PROCESSOR and hasattr(self.processors.instance(u.name), "on_tokens") for u in seq.request.processors
        ):
            # processors that track tokens through on_tokens never saw the forced ones: rebuild
            # them from the sequence's tokens when it is next due (as after a preemption)
            self.processors.release(seq)

    def _fork_for_n(self, due: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """A request with n > 1 forks into n sequences once its prompt is computed; all share the
        prompt's KV blocks and sample their first tokens from the same logits row."""
        if all(s.request.forked or s.request.params.num_samples == 1 for s in due):
            return due, logits
        rows: list[int] = []
        new_due: list[Sequence] = []
        for i, seq in enumerate(due):
            req = seq.request
            rows.append(i)
            new_due.append(seq)
            if req.forked or req.params.num_samples == 1:
                continue
            req.forked = True
            for idx in range(1, req.params.num_samples):
                child = self._new_seq(req, idx, parent=seq)
                self.scheduler.add_running(child)
                rows.append(i)
                new_due.append(child)
        return new_due, logits[torch.tensor(rows, device=logits.device)]

    def _append_token(self, seq: Sequence, tok: int, lp: float, top: dict[int, float] | None, now: float) -> None:
        req = seq.request
        p = req.params
        seq.token_ids.append(tok)
        seq.cumulative_logprob += lp
        if seq.logprobs is not None:
            entry = {tok: lp}
            if top:
                entry.update(top)
            seq.logprobs.append(entry)
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        if seq.detok is not None:
            seq.text += seq.detok.add(tok)
        n_out = seq.num_output_tokens
        reason: str | None = None
        if tok in self.eos_token_ids and not p.ignore_eos:
            reason = "stop"
        elif tok in p.stop_token_ids:
            reason, seq.stop_reason = "stop", tok
        elif n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None and seq.detok is not None:
            seq.text += seq.detok.flush()
        if p.stop and n_out >= p.min_tokens and self._check_stop_strings(seq):  # none before min_tokens (vLLM)
            reason = "stop"
        if reason is not None:
            seq.finish_reason = reason
            self._finish_seq(seq)

    def _beam_step(self, req: Request, now: float) -> bool:
        """Advance a beam request once every running beam has its log-probabilities for this
        length; fork the chosen parents (KV blocks shared, copy-on-write) and drop the old beams.
        Returns True when the request has something new to report (it finished)."""
        bs = req.beam
        assert bs is not None
        beams = list(req.seqs)
        if any(s.seq_id not in req.beam_pending for s in beams):
            return False  # some beam is still computing (or was preempted): the others wait, parked
        rows = torch.stack([req.beam_pending[s.seq_id] for s in beams])
        req.beam_pending.clear()
        choices = bs.step(rows)
        m = req.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        new: list[Sequence] = []
        for k, ch in enumerate(choices):
            parent = beams[ch.parent]
            child = Sequence(
                seq_id=next(self._seq_ids), request=req, index=k, token_ids=[*parent.token_ids, ch.token],
                num_prompt_tokens=parent.num_prompt_tokens, generator=None,
            )
            child.block_table = self.block_manager.fork(parent.block_table)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_hashed_blocks = parent.num_hashed_blocks
            child.cumulative_logprob = ch.score
            self.scheduler.add_running(child)
            new.append(child)
        for s in beams:
            self._finish_seq(s)
        if not bs.done:
            req.seqs = new
            return False
        stop_ids = set(req.params.stop_token_ids)
        done: list[Sequence] = []
        for k, h in enumerate(bs.results()):
            last = h.token_ids[-1] if h.token_ids else None
            seq = Sequence(
                seq_id=next(self._seq_ids), request=req, index=k, token_ids=[*req.prompt_token_ids, *h.token_ids],
                num_prompt_tokens=len(req.prompt_token_ids), generator=None, status=SeqStatus.FINISHED,
                cumulative_logprob=h.sum_logprobs, score=h.score,
            )
            seq.finish_reason = "stop" if last in bs.eos_token_ids else "length"
            seq.stop_reason = last if last in stop_ids else None
            if self.tokenizer is not None:
                seq.text = self.tokenizer.decode(h.token_ids, skip_special_tokens=req.params.skip_special_tokens)
            done.append(seq)
        req.seqs = done
        return True

    def _check_stop_strings(self, seq: Sequence) -> bool:
        p = seq.request.params
        text = seq.text
        # only the new text (plus an overlap of the longest stop string) can hold a new match
        lo = max(0, seq.streamed_len - max(len(s) for s in p.stop))
        hit: tuple[int, str] | None = None
        for s in p.stop:
            idx = text.find(s, lo)
            if idx >= 0 and (hit is None or idx < hit[0]):
                hit = (idx, s)
        if hit is None:
            return False
        idx, s = hit
        seq.text = text[: idx + len(s)] if p.include_stop_str_in_output else text[:idx]
        seq.stop_reason = s
        return True

    def _finish_seq(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self.processors.release(seq)
        seq.status = SeqStatus.FINISHED

    def _collect_outputs(self, touched: dict[str, Request]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        now = time.perf_counter()
        for rid, req in touched.items():
            if req.finished:
                if req.params.best_of is not None and req.params.best_of > req.params.n:
                    self._keep_best(req)
                del self.requests[rid]
                req.metrics.finished_time = now
                req.metrics.num_output_tokens = max(s.num_output_tokens for s in req.seqs)
                out = req.to_output()
                self.pm.emit("on_request_finished", output=out)
                outputs.append(out)
            elif req.stream and req.beam is None and req.params.num_samples == req.params.n:
                req.metrics.num_output_tokens = max(s.num_output_tokens for s in req.seqs)
                out = req.to_output()
                for c, s in zip(out.outputs, sorted(req.seqs, key=lambda s: s.index)):
                    c.text = self._stream_safe_text(s)
                outputs.append(out)
            if not req.finished or req.stream:
                for s in req.seqs:
                    s.streamed_len = len(s.text)
        return outputs

    @staticmethod
    def _keep_best(req: Request) -> None:
        """best_of: keep the n completions with the highest cumulative logprob (best first)."""
        best = sorted(req.seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: req.params.n]
        for k, s in enumerate(best):
            s.index = k
        req.seqs = best

    @staticmethod
    def _stream_safe_text(seq: Sequence) -> str:
        """Text that can be shown now: a possible stop-string prefix at the end is held back."""
        stops = seq.request.params.stop
        if seq.finished or not stops:
            return seq.text
        hold = max(len(s) for s in stops) - 1
        return seq.text[: max(0, len(seq.text) - hold)]

    # ------------------------------------------------------------------------ stats
    def _step_stats(self, sched, dt: float, outputs: list[RequestOutput]) -> StepStats:
        return StepStats(
            step=self.step_count,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_prefill_tokens=sched.num_prefill_tokens,
            num_decode_tokens=sched.num_decode_tokens,
            num_preempted=len(sched.preempted),
            kv_blocks_used=self.block_manager.num_used_blocks,
            kv_blocks_free=self.block_manager.num_free_blocks,
            prefix_cache_hit_rate=self.block_manager.stats.hit_rate,
            step_time=dt,
            finished_request_ids=[o.request_id for o in outputs if o.finished],
        )

    def stats(self) -> dict[str, float | int]:
        """Counters since start: tokens, preemptions, KV usage, prefix-cache hit rate."""
        bm = self.block_manager
        return {
            "steps": self.step_count,
            "num_prefill_tokens": self.num_prefill_tokens,
            "num_generated_tokens": self.num_generated_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "prefix_cache_queries": bm.stats.queries,
            "prefix_cache_hits": bm.stats.hits,
            "prefix_cache_hit_rate": bm.stats.hit_rate,
        }
