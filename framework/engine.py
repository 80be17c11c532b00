"""The engine's front end: requests in, one ``step()`` at a time, outputs out.

:class:`LLMEngine` validates and admits requests, holds those whose constraint is still
compiling, aborts, and collects outputs (running each finished request's reranker). The step
itself — schedule, one forward of every model, strategies turning logits into tokens — is
:class:`~framework.engine_core.EngineCore`.

A bad request is rejected in :meth:`LLMEngine.add_request` with :class:`InvalidRequestError`
before it touches any engine state, so it never disturbs the requests already running.
"""

from __future__ import annotations

import concurrent.futures
import gc
import itertools
import logging
import time
import weakref
from typing import Any

import torch
from pydantic import ValidationError

from framework.admission import PromptType, check_prompt, params_from, parse_prompt, resolve_device
from framework.companions import ModelPool, ModelSet
from framework.config import EngineConfig, default_num_threads
from framework.constraints import PROCESSOR_NAME as CONSTRAINT_PROCESSOR
from framework.constraints import ConstraintHandle, ConstraintProcessor
from framework.engine_core import EngineCore
from framework.errors import ConfigError, InvalidRequestError, PluginError
from framework.kv_cache import BlockManager, KVCacheStorage
from framework.kv_policy import KeepAll
from framework.model_runner import ModelRunner
from framework.models.loader import load_model
from framework.outputs import RequestMetrics, RequestOutput
from framework.plugins import PluginManager, get_plugin_manager, validate_plugin_options
from framework.processor_chain import ProcessorChain
from framework.processors import ProcessorSetup
from framework.rerankers import RerankerUse, rerank_finished
from framework.sampling_params import SamplingParams, format_validation_error
from framework.scheduler import Scheduler
from framework.sequence import Request, Sequence, SeqStatus

logger = logging.getLogger(__name__)

class LLMEngine:
    """Continuous-batching generation engine over one main model and its companions.

    ``models`` maps aliases to companion models (registered names or directories) loaded now,
    sharing the KV budget with the main model; ``drafter`` is ``{name: {options}}`` of a
    registered drafter (speculative decoding).
    """

    def __init__(
        self,
        model: str,
        config: EngineConfig | None = None,
        *,
        plugin_manager: PluginManager | None = None,
        skip_tokenizer_init: bool = False,
        models: dict[str, str] | None = None,
        drafter: dict[str, Any] | str | None = None,
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
        dtype = config.dtype
        if config.quantization == "int8" and dtype == "auto":
            dtype = "bfloat16"  # int8 weights run with bfloat16 activations
        self.model, self.model_config, self.model_dir = load_model(model, dtype, self.device, self.pm)
        self.model_name = str(model)  # as the caller named it (a registered name or a directory)
        if config.quantization is not None:
            quantize = getattr(self.model, "quantize", None)
            if quantize is None:
                raise ConfigError(f"quantization: model {type(self.model).__name__} does not support quantization")
            try:
                quantize(config.quantization)
            except ValueError as exc:
                raise ConfigError(f"quantization: {exc}") from None
        self.dtype = self.model.dtype
        self.tokenizer = None
        if not (skip_tokenizer_init or config.skip_tokenizer_init):
            from framework.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.model_dir, config.tokenizer, self.pm)
        eos_token_ids = self._eos_ids()
        self.models = ModelSet(weakref.proxy(self), models)  # weak: no reference cycle survives gc.freeze()
        self._build_pools()
        self.processors = ProcessorChain(
            self.pm.registry("logits_processor"),
            ProcessorSetup(self.model_config.vocab_size, self.device, eos_token_ids, self.tokenizer, self.models),
        )
        self.core = EngineCore(
            models=self.models, scheduler=self.scheduler, chain=self.processors,
            sampler=self.pm.get("sampler", config.sampler).factory(), tokenizer=self.tokenizer,
            eos_token_ids=eos_token_ids, max_model_len=self.max_model_len, seed=config.seed,
        )
        core = weakref.proxy(self.core)  # strategies hold the core weakly: no cycle through it
        self.core.strategies = [reg.factory(core) for reg in self.pm.registry("strategy")]
        self._rerankers: dict[str, Any] = {}
        self._constraints: ConstraintProcessor | None = None
        if CONSTRAINT_PROCESSOR in self.pm.registry("logits_processor"):
            self._constraints = self.processors.instance(CONSTRAINT_PROCESSOR)
            self._constraints.bind(self.pm)
        self.core.drafter = self._build_drafter(drafter)
        self._compiling: dict[str, Sequence] = {}  # waiting for their grammar to compile (outside the scheduler)
        self.requests: dict[str, Request] = {}
        self._req_ids = itertools.count()
        if config.freeze_gc:
            # the heap is mostly what loading made (torch, the model, the tokenizer) and stays:
            # keep full collections, which a grammar's caches trigger as they grow, off it.
            # Unfreeze first so garbage frozen by an earlier engine of this process (an engine
            # dropped in a reference cycle) is collected now rather than kept for good.
            gc.unfreeze()
            gc.collect()
            gc.freeze()

    # ------------------------------------------------------------------------ setup
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

    def _build_pools(self) -> None:
        """The main model's pool and the KV budget: declared companions share it block for block."""
        cfg, mc, bs = self.config, self.model_config, self.config.block_size
        size = torch.empty((), dtype=self.dtype).element_size()
        per_block = mc.kv_bytes_per_token(size) * bs
        declared = [self.models.preload(alias) for alias in self.models.aliases]
        per_block += sum(c.kv_bytes_per_token(size) * bs for c in declared)
        num_blocks = cfg.num_kv_blocks or max(1, int(cfg.kv_cache_memory) // per_block)
        self.models.declared_blocks = num_blocks
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, num_blocks * bs)
        self.block_manager = BlockManager(num_blocks, bs, cfg.enable_prefix_caching)
        self.kv = KVCacheStorage(mc, num_blocks, bs, self.dtype, self.device)
        main = ModelPool(0, self.model_name, "lm", self.model, mc, self.kv, self.block_manager,
                         ModelRunner(self.model, mc, self.kv, bs, self.device), policy=self.new_kv_policy())
        self.models.add_pool(main)
        self.scheduler = Scheduler(self.block_manager, cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.enable_chunked_prefill)

    def new_kv_policy(self) -> Any:
        """A fresh instance of the configured KV policy (one per pool)."""
        ref = self.config.kv_policy
        if ref is None:
            return KeepAll()
        (name, options), = (ref.items() if isinstance(ref, dict) else [(ref, None)])
        try:
            reg = self.pm.get("kv_policy", name)
            opts = validate_plugin_options(f"kv_policy {name}", reg.params, options)
        except (ValueError, PluginError) as exc:
            raise ConfigError(str(exc)) from None
        return reg.factory(**(opts if isinstance(opts, dict) else opts.model_dump()))

    def _build_drafter(self, ref: dict[str, Any] | str | None) -> Any:
        if ref is None:
            return None
        (name, options), = (ref.items() if isinstance(ref, dict) else [(ref, None)])
        try:
            reg = self.pm.get("drafter", name)
            return reg.factory(self.processors.setup, validate_plugin_options(f"drafter {name}", reg.params, options))
        except (ValueError, PluginError) as exc:
            raise ConfigError(str(exc)) from None

    @property
    def has_constraints(self) -> bool:
        """Whether constrained decoding is available (the core's constraint processor is registered)."""
        return self._constraints is not None

    # ------------------------------------------------------------------------ compatibility
    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Token ids that end generation (the tokenizer's and the model config's)."""
        return self.core.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: frozenset[int]) -> None:
        self.core.eos_token_ids = frozenset(ids)

    @property
    def sampler(self) -> Any:
        return self.core.sampler

    @property
    def generator(self) -> torch.Generator:
        return self.core.generator

    @property
    def jump_forward(self) -> bool:
        return all(getattr(s, "jump_forward", True) for s in self.core.strategies)

    @jump_forward.setter
    def jump_forward(self, on: bool) -> None:
        for s in self.core.strategies:
            if hasattr(s, "jump_forward"):
                s.jump_forward = on

    @property
    def constraint_prefetch(self) -> bool:
        return self._constraints is not None and self._constraints.prefetch_enabled

    @constraint_prefetch.setter
    def constraint_prefetch(self, on: bool) -> None:
        if self._constraints is not None:
            self._constraints.prefetch_enabled = on

    # ------------------------------------------------------------------------ requests
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
        text, ids = parse_prompt(prompt, self.tokenizer)
        check_prompt(ids, params, self)
        request_id = str(next(self._req_ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        strategy = self._strategy_for(params)
        reranker = self._resolve_reranker(params)
        processors = self.processors.resolve(params)  # per-request checks (vocab, bad words, constraint ...)
        companions = self.processors.companions(processors)
        drafter_models = getattr(self.core.drafter, "companions", None)
        for c in (drafter_models(params) if drafter_models is not None else ()):  # driven draft models
            if all(c.pool is not o.pool for o in companions):
                companions.append(c)
        pools = (self.models.main, *(c.pool for c in companions))
        req = Request(
            request_id, text, ids, params,
            RequestMetrics(arrival_time=arrival_time or time.perf_counter(), num_prompt_tokens=len(ids)),
            stream=stream, processors=processors, pools=pools, strategy=strategy, reranker=reranker,
        )
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        seq = self.core.new_sequence(req, 0)
        strategy.prepare(req)
        self.requests[request_id] = req
        if self._constraint_handle(req) is not None:
            self._compiling[request_id] = seq  # scheduled once its grammar is compiled (step())
        else:
            self._start(req, seq)
        self.pm.emit("on_request_added", request=req)
        return req

    def _strategy_for(self, params: SamplingParams) -> Any:
        for strategy in reversed(self.core.strategies):  # plugins before the built-ins
            if strategy.claims(params):
                return strategy
        raise InvalidRequestError("no decoding strategy accepts these sampling params")

    def _resolve_reranker(self, params: SamplingParams) -> RerankerUse | None:
        ref = params.reranker
        if ref is None:
            if params.best_of is None or params.best_of <= params.n:
                return None
            ref = {"logprob": None}
        (name, options), = (ref.items() if isinstance(ref, dict) else [(ref, None)])
        registry = self.pm.registry("reranker")
        if name not in registry:
            from framework.plugins import unknown_name_message

            raise InvalidRequestError(unknown_name_message("reranker", name, registry.names()))
        reg = registry.get(name)
        try:
            opts = validate_plugin_options(f"reranker {name}", reg.params, options)
            inst = self._rerankers.get(name)
            if inst is None:
                inst = self._rerankers[name] = reg.factory(self.processors.setup)
            prepare = getattr(inst, "prepare", None)
            if prepare is not None:
                opts = prepare(opts, params)
        except InvalidRequestError:
            raise
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(str(exc) if str(exc).startswith("reranker") else f"reranker {name}: {exc}") from None
        return RerankerUse(name, opts, inst)

    def _start(self, req: Request, seq: Sequence) -> None:
        on_ready = getattr(req.strategy, "on_ready", None)
        if on_ready is not None:
            on_ready(req, time.perf_counter())
        if seq.finished:  # e.g. a grammar forced the whole output
            return
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks. Returns its final output (None if unknown)."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self._compiling.pop(request_id, None)
        for seq in req.seqs:
            if not seq.finished:
                self.core.finish(seq)
                seq.finish_reason = "abort"
        req.forked = True
        req.metrics.finished_time = time.perf_counter()
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
        """One engine step: admit compiled requests, run the core step, collect outputs."""
        t0 = time.perf_counter()
        early = self._poll_compiling() if self._compiling else []
        touched = self.core.step(t0)
        outputs = early + self._collect_outputs(touched) if touched else early
        if self.pm.listens["on_step_finished"]:
            done = [o.request_id for o in outputs if o.finished]
            self.pm.emit("on_step_finished", stats=self.core.step_stats(time.perf_counter() - t0, done))
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
        touched: list[Request] = []
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
                touched.append(req)
                continue
            self._start(req, seq)
            if seq.finished:  # the grammar forced the whole output (or max_tokens)
                touched.append(req)
        return self._collect_outputs(touched) if touched else []

    # ------------------------------------------------------------------------ outputs
    def _collect_outputs(self, touched: list[Request]) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        now = time.perf_counter()
        done = [r.finished for r in touched]
        rerank_finished([r for r, d in zip(touched, done) if d and r.reranker is not None and r.error is None])
        for req, finished in zip(touched, done):
            if finished:
                del self.requests[req.request_id]
                req.metrics.finished_time = now
                req.metrics.num_output_tokens = max((s.num_output_tokens for s in req.seqs), default=0)
                out = req.to_output()
                self.pm.emit("on_request_finished", output=out)
                outputs.append(out)
            elif req.streams_partial and req.params.num_samples == req.params.n:
                req.metrics.num_output_tokens = max(s.num_output_tokens for s in req.seqs)
                outputs.append(req.to_delta_output())  # only what is new: O(1) per token
        return outputs

    # ------------------------------------------------------------------------ stats
    @property
    def step_count(self) -> int:
        return self.core.step_count

    @property
    def num_prefill_tokens(self) -> int:
        return self.core.num_prefill_tokens

    @property
    def num_generated_tokens(self) -> int:
        return self.core.num_generated_tokens

    def check_all_free(self) -> bool:
        """Every KV block of every pool (main model and companions) is free."""
        return self.models.check_all_free()

    def stats(self) -> dict[str, float | int]:
        """Counters since start: tokens, preemptions, KV usage, prefix-cache hit rate."""
        bm = self.block_manager
        out: dict[str, float | int] = {
            "steps": self.core.step_count,
            "num_prefill_tokens": self.core.num_prefill_tokens,
            "num_generated_tokens": self.core.num_generated_tokens,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_used": bm.num_used_blocks,
            "prefix_cache_queries": bm.stats.queries,
            "prefix_cache_hits": bm.stats.hits,
            "prefix_cache_hit_rate": bm.stats.hit_rate,
        }
        for pool in self.models.pools[1:]:
            out[f"companion_{pool.index}_kv_blocks_used"] = pool.bm.num_used_blocks
        for strategy in self.core.strategies:  # e.g. speculative decoding's acceptance counters
            strategy_stats = getattr(strategy, "stats", None)
            if strategy_stats is not None:
                out.update(strategy_stats())
        drafter_stats = getattr(self.core.drafter, "stats", None)
        if drafter_stats is not None:
            out.update(drafter_stats())
        return out
