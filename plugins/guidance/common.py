"""Shared parts of the guidance processors: companion look-up with field-naming errors, the
per-batch-composition plan of candidate rows, and the uncached reference scorer.

A guidance processor keeps each slot's validated options in a dict and derives, once per batch
composition (``StepContext.cache``), the grouping of its rows: rows with the same candidate
count ``K`` share one ``topk``; rows with the same scorer share one candidate forward.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from framework.processors import ProcessorSetup, RequestInfo, StepContext

NEG_INF = float("-inf")


def companion_for(setup: ProcessorSetup, field: str, ref: str, *, kind: str, scorer_kind: str | None = None) -> Any:
    """``setup.models.get(ref)``, checked to be a ``kind`` (``"lm"`` or ``"scorer"``) and, for a
    scorer, a ``scorer_kind`` (``"classifier"`` / ``"reward"``). ValueError naming ``field``."""
    models = setup.models if setup.models is not None else setup.catalog  # catalog: offline validation
    if models is None:
        raise ValueError(f"{field}: guidance needs an engine with companion models (setup.models is None)")
    try:
        comp = models.get(ref)
    except ValueError as exc:
        raise ValueError(f"{field}: {exc}") from None
    if comp.kind != kind:
        what = "a language model" if comp.kind == "lm" else f"a prefix scorer ({comp.scorer_kind})"
        want = "a language model" if kind == "lm" else f"a prefix scorer ({scorer_kind})"
        raise ValueError(f"{field}: {ref!r} is {what}, not {want}")
    if scorer_kind is not None and comp.scorer_kind != scorer_kind:
        raise ValueError(f"{field}: {ref!r} is a {comp.scorer_kind} model, not a {scorer_kind} "
                         f"(labels {list(comp.labels)})")
    return comp


class GuidanceBase:
    """Per-slot options and the bookkeeping every guidance processor shares.

    Subclasses implement :meth:`apply`; options are immutable pydantic models, so ``fork`` and
    ``rollback`` are trivial (the state is the options; the companions' KV is the engine's)."""

    def __init__(self, setup: ProcessorSetup) -> None:
        self.setup = setup
        self.params: dict[int, Any] = {}

    def add_request(self, slot: int, params: Any, request: RequestInfo) -> None:
        self.params[slot] = params

    def remove(self, slot: int) -> None:
        self.params.pop(slot, None)

    def fork(self, src_slot: int, dst_slot: int) -> None:
        self.params[dst_slot] = self.params[src_slot]

    def extend(self, slot: int, tokens: list[int], request: RequestInfo) -> None:
        """Nothing to track: the companions compute appended tokens in lockstep."""

    def rollback(self, slot: int, n: int) -> None:
        """Nothing to undo (the engine truncates the companions' KV with the main model's)."""

    def row_params(self, ctx: StepContext) -> list[Any]:
        return [self.params[s] for s in ctx.slots]

    def cached(self, ctx: StepContext, name: str, build: Callable[[], Any]) -> Any:
        """A value derived from ``ctx.slots`` (valid while the batch composition lasts)."""
        key = (id(self), name)
        v = ctx.cache.get(key)
        if v is None:
            v = ctx.cache[key] = build()
        return v


def group_rows(keys: Iterable[Any]) -> dict[Any, list[int]]:
    """Row indices by key, keys in first-seen order."""
    out: dict[Any, list[int]] = {}
    for r, k in enumerate(keys):
        out.setdefault(k, []).append(r)
    return out


def rows_tensor(rows: list[int], total: int, device: torch.device) -> torch.Tensor | None:
    """``rows`` as an index tensor, or None when they are every row in order."""
    if rows == list(range(total)):
        return None
    return torch.tensor(rows, dtype=torch.long, device=device)


class UncachedScorer:
    """The papers' reference scoring: the scorer re-run over the whole ``prefix + candidate``
    for every candidate, every step (one batched dense forward of ``K`` sequences per row), with
    no cache. For checks and for the benchmarks' cost comparison (``cache: false``)."""

    def __init__(self, setup: ProcessorSetup) -> None:
        self.setup = setup
        self._scorers: dict[str, Any] = {}

    def get(self, ref: str) -> Any:
        from framework.models.scorer import load_scorer

        models = self.setup.models
        assert models is not None
        path = str(models.resolve(ref).resolve())
        sc = self._scorers.get(path)
        if sc is None:
            eng = models.engine
            sc = self._scorers[path] = load_scorer(path, device=self.setup.device, dtype=eng.dtype, plugin_manager=eng.pm)
        return sc

    @torch.inference_mode()
    def candidates(self, ref: str, ctx: StepContext, tokens: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Head outputs ``[len(rows), K, C]`` after each candidate of each row."""
        scorer = self.get(ref)
        out = []
        for i, r in enumerate(rows):
            prefix = torch.tensor(list(ctx.token_ids[r]), dtype=torch.long, device=tokens.device)
            K = tokens.shape[1]
            full = torch.cat((prefix[None, :].expand(K, -1), tokens[i][:, None]), dim=1)
            out.append(scorer(full)[:, -1].float())
        return torch.stack(out)


class UncachedLM:
    """The reference for a language-model companion (``contrastive``'s ``cache: false``): the
    model re-run over each row's whole prefix every step (a dense forward, no cache), giving
    the next-token logits after it. For checks and for the benchmarks' cost comparison."""

    def __init__(self, setup: ProcessorSetup) -> None:
        self.setup = setup
        self._models: dict[str, Any] = {}

    def get(self, ref: str) -> Any:
        from framework.models.loader import load_model

        models = self.setup.models
        assert models is not None
        path = str(models.resolve(ref).resolve())
        m = self._models.get(path)
        if m is None:
            eng = models.engine
            m, _, _ = load_model(path, eng.dtype, self.setup.device, eng.pm)
            if not hasattr(m, "forward_dense"):
                raise ValueError(f"{ref!r}: its model class has no dense forward, so it cannot run uncached (cache: false)")
            self._models[path] = m
        return m

    @torch.inference_mode()
    def logits(self, ref: str, ctx: StepContext, rows: list[int]) -> torch.Tensor:
        """Next-token logits ``[len(rows), V]`` (float32) after each row's whole prefix."""
        model = self.get(ref)
        out = []
        for r in rows:
            ids = torch.tensor([list(ctx.token_ids[r])], dtype=torch.long, device=self.setup.device)
            hidden, _ = model.forward_dense(ids)
            out.append(model.compute_logits(hidden[0, -1:])[0])
        return torch.stack(out)
