"""Model pools and companion models: several models in one continuous batch, each with its own KV.

The engine holds one :class:`ModelPool` per model it runs: the main model (pool 0) and every
*companion* — a draft model, a contrastive amateur, a FUDGE classifier, a RAD reward model, an
HF directory. A pool is the model plus its own paged KV cache (block pool, prefix cache, storage)
and its :class:`~framework.model_runner.ModelRunner`.

A request that uses companions lists their pools in ``request.pools``; each of its sequences
holds a :class:`~framework.sequence.SeqKV` per pool. *Lockstep* companions compute exactly the
tokens the main model computes, in the same step: the scheduler reserves their blocks with the
main model's, preemption frees them together, forks share them copy-on-write, prefix caching
works per pool. After each forward the pool keeps the outputs at the rows whose next token is
due (logits for a language model, head outputs for a scorer), which processors read through
:class:`Companion` and their :class:`~framework.processors.StepContext`::

    classifier = setup.models.get("demo-sentiment")    # in a processor factory or prepare()
    raw = classifier.candidates(ctx, top_k_ids)         # [R, K, C]: prefix + each candidate
    logp = classifier.to_scores(raw, "positive")        # [R, K]

*Driven* pools (``lockstep=False``: a drafter's draft model) are advanced by their plugin with
:meth:`Companion.extend` and cut back with :meth:`Companion.truncate`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch

from framework.errors import ModelLoadError
from framework.kv_cache import BlockManager, KVCacheStorage
from framework.kv_policy import KeepAll, KVPolicy
from framework.model_runner import ForwardItem, ModelRunner
from framework.models.config import ModelConfig

if TYPE_CHECKING:  # pragma: no cover
    from framework.processors import StepContext
    from framework.sequence import Sequence, SeqKV

logger = logging.getLogger(__name__)

ModelKind = Literal["lm", "scorer"]
SCORER_ARCHITECTURE = "LlamaForSequenceClassification"


@dataclass(eq=False)
class ModelPool:
    """One model with its own paged KV cache."""

    index: int  # position in the engine's pool list (0: the main model)
    name: str  # how it was named: a registered name, an alias's target or a directory
    kind: ModelKind
    model: torch.nn.Module
    config: ModelConfig
    storage: KVCacheStorage
    bm: BlockManager
    runner: ModelRunner
    lockstep: bool = True
    policy: KVPolicy = field(default_factory=KeepAll)
    head: torch.Tensor | None = None  # scorer: [C, H] head weight
    spec: Any = None  # scorer: framework.models.scorer.ScorerSpec
    # outputs of the last forward at the rows whose next token was due: seq_id -> first row
    step_rows: dict[int, int] = field(default_factory=dict)
    step_out: torch.Tensor | None = None

    @property
    def block_size(self) -> int:
        return self.bm.block_size

    def outputs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states ``[N, H]`` -> logits ``[N, V]`` (LM) or head outputs ``[N, C]`` (scorer), float32."""
        if self.kind == "lm":
            return self.model.compute_logits(hidden)
        return torch.nn.functional.linear(hidden, self.head).float()

    def seq_kv(self, seq: "Sequence") -> "SeqKV":
        """``seq``'s blocks in this pool (its request must use the pool)."""
        return seq.kv[seq.request.pools.index(self)]

    def free(self, kv: "SeqKV") -> None:
        self.bm.free_table(kv.table)
        kv.reset()

    def rotate_keys(self, table: list[int], first: int, last: int, delta: int) -> bool:
        """Re-rotate the cached keys at cache positions ``[first, last)`` of ``table`` by ``delta``
        positions (RoPE), in every layer: what a KV policy that evicts from the middle does to the
        keys after the hole so they read as their new cache positions (``delta < 0``).

        Blocks in the range shared with another table (forks, prefix-cache hits) are first copied
        (copy-on-write), and every block in the range leaves the prefix cache: its keys no longer
        match its hash. False, with nothing changed, if the pool has no free block for a copy.
        The rotation is computed in float32 (keys stored in bf16/fp16 are rounded once per call).
        A model that does not use standard rotary embeddings provides ``rotate_keys(keys, delta)``
        (keys ``[..., head_dim]`` at any leading shape) itself.
        """
        if last <= first or delta == 0:
            return True
        bs = self.block_size
        copies = self.bm.copy_on_write(table, first, last)
        if copies is None:
            return False
        self.storage.copy_blocks(copies)
        lo, hi = first // bs, -(-last // bs)
        for b in table[lo:hi]:
            self.bm._unhash(b)
        k_caches = [k for k, _ in self.storage.layers]  # per layer [slots, n_kv, hd], contiguous
        dev = k_caches[0].device
        blocks = torch.tensor(table[lo:hi], dtype=torch.long, device=dev)
        slots = (blocks[:, None] * bs + torch.arange(bs, device=dev)).reshape(-1)[first - lo * bs : last - lo * bs]
        keys = torch.stack([k.index_select(0, slots) for k in k_caches])  # [L, n, n_kv, hd]
        custom = getattr(self.model, "rotate_keys", None)
        rotated = custom(keys, delta) if custom is not None else rope_rotate(keys, delta, self.config)
        for k, r in zip(k_caches, rotated.to(k_caches[0].dtype)):
            k.index_copy_(0, slots, r)
        return True


def rope_rotate(keys: torch.Tensor, delta: int, cfg: ModelConfig) -> torch.Tensor:
    """Keys ``[..., head_dim]`` roped at position ``p`` -> the same keys roped at ``p + delta``
    (the model's rotary frequencies, scaling included; rotate-half layout), in float32."""
    from framework.models.llama import rope_inv_freq, rotate_half

    angle = delta * rope_inv_freq(cfg).double()  # float64 angle: exact for any delta we meet
    emb = torch.cat((angle, angle)).to(keys.device)
    cos, sin = emb.cos().float(), emb.sin().float()
    k = keys.float()
    return k * cos + rotate_half(k) * sin


class Companion:
    """What a plugin holds of a companion model: its outputs for a step's rows, candidate
    scoring, and (driven pools) explicit advancing. Obtained from ``setup.models.get(ref)``."""

    def __init__(self, pool: ModelPool):
        self.pool = pool

    # -- what it is ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.pool.name

    @property
    def kind(self) -> ModelKind:
        return self.pool.kind

    @property
    def config(self) -> ModelConfig:
        return self.pool.config

    @property
    def labels(self) -> tuple[str, ...]:
        """Scorer outputs by name (``()`` for a language model)."""
        return tuple(self.pool.spec.labels) if self.pool.spec is not None else ()

    @property
    def scorer_kind(self) -> str | None:
        """``"classifier"`` or ``"reward"`` for a scorer, None for a language model."""
        return None if self.pool.spec is None else self.pool.spec.kind

    def label_index(self, label: str | int | None = None) -> int:
        """Index of a scorer output by name or position (None: the scorer's default label)."""
        spec = self.pool.spec
        if spec is None:
            raise ValueError(f"{self.name} is a language model, not a scorer")
        if label is None:
            label = spec.default_label
        if isinstance(label, int):
            if not 0 <= label < len(spec.labels):
                raise ValueError(f"label index {label} out of range for labels {list(spec.labels)}")
            return label
        if label not in spec.labels:
            raise ValueError(f"unknown label {label!r}; {self.name} has {list(spec.labels)}")
        return spec.labels.index(label)

    def to_scores(self, raw: torch.Tensor, label: str | int | None = None) -> torch.Tensor:
        """Scorer head outputs ``[..., C]`` -> scores ``[...]``: ``log P(label)`` (classifier) or
        ``sigmoid`` (reward, in [0, 1])."""
        raw = raw.float()
        if self.scorer_kind == "reward":
            return torch.sigmoid(raw[..., 0])
        return torch.log_softmax(raw, dim=-1)[..., self.label_index(label)]

    # -- lockstep outputs ----------------------------------------------------------------------
    def _rows(self, ctx: "StepContext", rows: Sequence[int] | None) -> torch.Tensor:
        pool = self.pool
        offsets = ctx.offsets or [0] * len(ctx)
        pick = range(len(ctx)) if rows is None else rows
        try:
            rows = [pool.step_rows[ctx.seqs[r].seq_id] + offsets[r] for r in pick]
        except KeyError:
            raise RuntimeError(f"companion {self.name!r} has no outputs for this step's rows "
                               "(is it declared by the processor's companions()?)") from None
        assert pool.step_out is not None
        return torch.tensor(rows, dtype=torch.long, device=pool.step_out.device)

    def outputs(self, ctx: "StepContext", rows: Sequence[int] | None = None) -> torch.Tensor:
        """This step's outputs at each row of ``ctx`` (or at ``rows`` of it): next-token logits
        ``[R, V]`` of a language model, or head outputs ``[R, C]`` of a scorer over each row's
        prefix."""
        if self.pool.step_out is None:
            raise RuntimeError(f"companion {self.name!r} produced no outputs this step")
        return self.pool.step_out.index_select(0, self._rows(ctx, rows))

    def logits(self, ctx: "StepContext", rows: Sequence[int] | None = None) -> torch.Tensor:
        """Next-token logits ``[R, V]`` of a language-model companion for the rows of ``ctx``."""
        if self.kind != "lm":
            raise ValueError(f"{self.name} is a scorer; use outputs() or candidates()")
        return self.outputs(ctx, rows)

    # -- candidate forward ---------------------------------------------------------------------
    def candidates(self, ctx: "StepContext", tokens: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Score ``tokens [R, K]`` as alternative next tokens of each row of ``ctx`` (or of
        ``rows`` of it) in one batched forward over this model's cache, committing nothing.
        Returns head outputs ``[R, K, C]`` (scorer) or logits ``[R, K, V]`` (language model)
        *after* each candidate."""
        pool = self.pool
        R, K = tokens.shape
        pick = range(len(ctx)) if rows is None else rows
        if len(pick) != R:
            raise ValueError(f"{R} rows of candidates for {len(pick)} rows of the context")
        tables, ctx_lens = [], []
        for r in pick:
            seq = ctx.seqs[r]
            kv = pool.seq_kv(seq)
            ctx_len = len(ctx.token_ids[r]) - kv.num_evicted
            if ctx_len > kv.cache_len():
                raise RuntimeError(f"companion {self.name!r} has not computed row {r}'s prefix")
            tables.append(kv.table)
            ctx_lens.append(ctx_len)
        hidden = pool.runner.forward_candidate_rows(tables, ctx_lens, tokens)
        out = pool.outputs(hidden)
        return out.view(R, K, out.shape[-1])

    # -- driven pools --------------------------------------------------------------------------
    def extend(self, seqs: list["Sequence"], tokens: list[list[int]]) -> torch.Tensor | None:
        """Append ``tokens[i]`` to ``seqs[i]``'s cache in this (driven) pool in one forward;
        returns the outputs after each sequence's last new token ``[S, V or C]``, or None if the
        pool has no room (nothing changed)."""
        pool = self.pool
        items, kvs, copies = [], [], []
        for seq, toks in zip(seqs, tokens):
            kv = pool.seq_kv(seq)
            lo = kv.cache_len()
            c = pool.bm.copy_on_write(kv.table, lo, lo + len(toks))
            if c is None or not pool.bm.ensure_slots(kv.table, lo + len(toks)):
                return None
            copies += c
            items.append(ForwardItem(kv.table, toks, lo, range(len(toks) - 1, len(toks))))
            kvs.append((kv, len(toks)))
        hidden = pool.runner.forward(items, copies)
        for kv, n in kvs:
            kv.num_computed += n
        return pool.outputs(hidden)

    def truncate(self, seq: "Sequence", num_tokens: int) -> None:
        """Forget everything of ``seq`` in this pool past its first ``num_tokens`` tokens."""
        kv = self.pool.seq_kv(seq)
        if num_tokens < kv.num_computed:
            kv.num_hashed = self.pool.bm.truncate(kv.table, num_tokens - kv.num_evicted, kv.num_hashed)
            kv.num_computed = num_tokens

    def num_computed(self, seq: "Sequence") -> int:
        """Tokens of ``seq`` whose KV this pool holds."""
        return self.pool.seq_kv(seq).num_computed

    # -- whole sequences (rerankers) -----------------------------------------------------------
    @torch.inference_mode()
    def score_sequences(self, token_ids: list[list[int]], max_batch_tokens: int = 8192) -> torch.Tensor:
        """Outputs after the last token of each sequence ``[N, C or V]``, computed through this
        pool's prefix cache with temporary blocks, in batched forwards of up to
        ``max_batch_tokens`` new tokens (as many sequences per forward as the free blocks hold).

        The longest common prefix of the sequences (a shared prompt) is computed once first, so
        the prefix cache serves it to every sequence of the batch."""
        if any(not ids for ids in token_ids):
            raise ValueError("cannot score an empty sequence")
        if not token_ids:
            return torch.zeros(0)
        bm = self.pool.bm
        lcp = _common_prefix_len(token_ids)
        if len(token_ids) > 1 and lcp > bm.block_size and bm.enable_prefix_caching:
            self._score_batch([token_ids[0][:lcp]])
        out: list[torch.Tensor] = []
        i = 0
        while i < len(token_ids):
            batch = [token_ids[i]]
            i += 1
            budget = len(batch[0])
            while i < len(token_ids) and budget + len(token_ids[i]) <= max_batch_tokens:
                batch.append(token_ids[i])
                budget += len(token_ids[i])
                i += 1
            out.append(self._score_batch(batch))
        return torch.cat(out)

    def _score_batch(self, batch: list[list[int]]) -> torch.Tensor:
        """One forward for as many of ``batch`` as the free blocks hold (the rest in further
        forwards); RuntimeError if one sequence alone does not fit."""
        pool, bm = self.pool, self.pool.bm
        results: list[torch.Tensor] = []
        k = 0
        while k < len(batch):
            tables: list[list[int]] = []
            items: list[ForwardItem] = []
            try:
                while k + len(items) < len(batch):
                    ids = batch[k + len(items)]
                    table: list[int] = []
                    cached = bm.allocate_prompt(table, ids)
                    if not bm.ensure_slots(table, len(ids)):
                        bm.free_table(table)
                        if not items:
                            raise RuntimeError(f"companion {self.name!r}: KV pool too small to score a "
                                               f"{len(ids)}-token sequence")
                        break
                    tables.append(table)
                    n = len(ids) - cached
                    items.append(ForwardItem(table, ids[cached:], cached, range(n - 1, n)))
                hidden = pool.runner.forward(items)
                for table, ids in zip(tables, batch[k : k + len(items)]):
                    bm.commit_full_blocks(table, ids, len(ids), 0)
                results.append(pool.outputs(hidden))
                k += len(items)
            finally:
                for table in tables:
                    bm.free_table(table)
        return torch.cat(results)


class ModelCatalog:
    """Companion models described offline, from their ``config.json`` only (no weights, no KV):
    what ``decodekit validate`` gives processors as ``ProcessorSetup.catalog`` so that
    companion-dependent options (an unknown classifier, a reward model where a classifier is
    wanted, a label the classifier lacks, another vocabulary) are checked without an engine.
    ``get(ref)`` returns a :class:`Companion` whose descriptive members work (``name``, ``kind``,
    ``config``, ``labels``, ``scorer_kind``, ``label_index``, ``to_scores``); it cannot run."""

    def __init__(self, main_config: ModelConfig, aliases: dict[str, str] | None = None, pm: Any = None):
        self.main_config = main_config
        self.aliases = dict(aliases or {})
        self.pm = pm
        self._by_path: dict[str, Companion] = {}

    def resolve(self, ref: str) -> Path:
        from framework.models.loader import resolve_model_dir

        return resolve_model_dir(self.aliases.get(ref, ref), self.pm)

    def get(self, ref: str | os.PathLike, *, lockstep: bool = True, num_blocks: int | None = None) -> Companion:
        """The description of ``ref``; ValueError (as :meth:`ModelSet.get`) for an unknown name,
        a broken scorer config or another vocabulary."""
        from types import SimpleNamespace

        from framework.models.scorer import ScorerSpec

        ref = str(ref)
        try:
            path = self.resolve(ref)
            key = str(path.resolve())
            comp = self._by_path.get(key)
            if comp is None:
                cfg = ModelConfig.from_dir(path)
                spec = ScorerSpec.from_config(cfg.raw, str(path / "config.json")) if cfg.architecture == SCORER_ARCHITECTURE else None
                comp = Companion(SimpleNamespace(name=ref, kind="lm" if spec is None else "scorer", config=cfg, spec=spec))  # type: ignore[arg-type]
                self._by_path[key] = comp
        except ModelLoadError as exc:
            raise ValueError(f"companion model {ref!r}: {exc}") from None
        if comp.config.vocab_size != self.main_config.vocab_size:
            raise ValueError(f"companion model {ref!r} ({path}) has a vocabulary of {comp.config.vocab_size} tokens; "
                             f"the main model has {self.main_config.vocab_size}: it must read the same token ids")
        return comp


def _common_prefix_len(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        j = 0
        while j < n and s[j] == first[j]:
            j += 1
        n = j
    return n


# ------------------------------------------------------------------------------------ loading
def _load_scorer_paged(path: Path, dtype: torch.dtype, device: torch.device, pm) -> tuple[torch.nn.Module, ModelConfig, torch.Tensor, Any]:
    """A prefix scorer (``docs/demo_models.md``) as the native paged model plus its head."""
    from framework.models.llama import LlamaForCausalLM
    from framework.models.loader import _iter_tensors, _weight_files
    from framework.models.scorer import ScorerSpec

    cfg = ModelConfig.from_dir(path)
    spec = ScorerSpec.from_config(cfg.raw, str(path / "config.json"))
    reg = pm.registry("model").entries.get("LlamaForCausalLM")
    if reg.factory is LlamaForCausalLM:
        model = reg.factory(cfg, dtype=dtype, device=device, lm_head=False)  # the head is score.weight
    else:
        model = reg.factory(cfg, dtype=dtype, device=device)
    expected = {k: v for k, v in model.expected_tensors().items() if k != "lm_head.weight"}
    expected["score.weight"] = (len(spec.labels), cfg.hidden_size)
    head: torch.Tensor | None = None

    def body():
        nonlocal head
        for name, t in _iter_tensors(_weight_files(path), expected):
            if name == "score.weight":
                head = t.to(device=device, dtype=dtype)
            else:
                yield name, t

    model.load_weights(body())
    assert head is not None
    return model.eval(), cfg, head, spec


class ModelSet:
    """The engine's pools, and companions by reference (alias, registered name or directory).

    ``get(ref)`` loads a companion the first time it is named, checks that it reads the main
    model's tokens (same vocabulary; same tokenizer when both directories have one), and gives
    it a KV pool: companions declared when the engine starts share the KV budget with the main
    model; one first named by a request gets as many blocks as the main pool, on top.
    """

    def __init__(self, engine: Any, aliases: dict[str, str] | None = None):
        self.engine = engine
        self.aliases = dict(aliases or {})
        self.pools: list[ModelPool] = []
        self._by_key: dict[tuple[str, bool], ModelPool] = {}
        self._modules: dict[str, tuple[Any, ...]] = {}  # loaded weights by directory, shared by pools
        self.declared_blocks: int | None = None  # KV blocks of each declared companion's pool
        self._declared: set[str] = set()  # directories of the companions declared at start

    @property
    def main(self) -> ModelPool:
        return self.pools[0]

    def add_pool(self, pool: ModelPool, key: tuple[str, bool] | None = None) -> ModelPool:
        self.pools.append(pool)
        if key is not None:
            self._by_key[key] = pool
        return pool

    def resolve(self, ref: str) -> Path:
        """The directory behind an alias, a registered name or a path; ModelLoadError if none."""
        from framework.models.loader import resolve_model_dir

        target = self.aliases.get(ref, ref)
        return resolve_model_dir(target, self.engine.pm)

    def preload(self, alias: str) -> ModelConfig:
        """Load a declared companion's weights now (its KV pool is made on first use, sized by
        :attr:`declared_blocks`). Raises ModelLoadError naming the alias."""
        try:
            path = self.resolve(alias)
        except ModelLoadError as exc:
            raise ModelLoadError(f"models.{alias}: {exc}") from None
        key = str(path.resolve())
        if key not in self._modules:
            self._modules[key] = self._load_module(alias, path)
        self._declared.add(key)
        return self._modules[key][1]

    def get(self, ref: str | os.PathLike, *, lockstep: bool = True, num_blocks: int | None = None) -> Companion:
        """The companion named ``ref`` (loaded on first use). Raises ValueError with a clear
        message for an unknown name, a model of another vocabulary or tokenizer."""
        ref = str(ref)
        try:
            path = self.resolve(ref)
        except ModelLoadError as exc:
            raise ValueError(f"companion model {ref!r}: {exc}") from None
        key = (str(path.resolve()), lockstep)
        pool = self._by_key.get(key)
        if pool is None:
            pool = self._load(ref, path, lockstep, num_blocks)
            self._by_key[key] = pool
        return Companion(pool)

    def _load(self, ref: str, path: Path, lockstep: bool, num_blocks: int | None) -> ModelPool:
        eng = self.engine
        loaded = self._modules.get(str(path.resolve()))
        if loaded is None:
            loaded = self._load_module(ref, path)
            self._modules[str(path.resolve())] = loaded
        model, cfg, kind, head, spec = loaded
        main_cfg = eng.model_config
        if cfg.vocab_size != main_cfg.vocab_size:
            raise ValueError(f"companion model {ref!r} ({path}) has a vocabulary of {cfg.vocab_size} tokens; "
                             f"the main model has {main_cfg.vocab_size}: it must read the same token ids")
        self._check_tokenizer(ref, path)
        bs = eng.config.block_size
        declared = self.declared_blocks if str(path.resolve()) in self._declared else None
        blocks = num_blocks or declared or eng.block_manager.num_blocks
        storage = KVCacheStorage(cfg, blocks, bs, model.dtype, eng.device)
        pool = ModelPool(
            index=len(self.pools), name=ref, kind=kind, model=model, config=cfg, storage=storage,
            bm=BlockManager(blocks, bs, eng.config.enable_prefix_caching),
            runner=ModelRunner(model, cfg, storage, bs, eng.device), lockstep=lockstep,
            policy=eng.new_kv_policy(), head=head, spec=spec,
        )
        logger.info("companion %s (%s, %s) loaded with %d KV blocks", ref, kind, path, blocks)
        self.pools.append(pool)
        return pool

    def _load_module(self, ref: str, path: Path) -> tuple[Any, ...]:
        from framework.models.loader import load_model

        eng = self.engine
        cfg = ModelConfig.from_dir(path)
        dtype = eng.dtype
        if cfg.architecture == SCORER_ARCHITECTURE:
            model, cfg, head, spec = _load_scorer_paged(path, dtype, eng.device, eng.pm)
            return model, cfg, "scorer", head, spec
        model, cfg, _ = load_model(path, dtype, eng.device, eng.pm)
        return model, cfg, "lm", None, None

    def _check_tokenizer(self, ref: str, path: Path) -> None:
        main_tok = self.engine.tokenizer
        if main_tok is None or path.resolve() == Path(self.engine.model_dir).resolve():
            return
        from framework.tokenizer import load_tokenizer

        try:
            tok = load_tokenizer(path, None, self.engine.pm)
        except Exception:  # no tokenizer files: the vocabulary size check is all we can do
            logger.warning("companion %s has no tokenizer; assuming it shares the main model's", ref)
            return
        if tok.token_byte_table() != main_tok.token_byte_table() or tok.special_ids != main_tok.special_ids:
            raise ValueError(f"companion model {ref!r} ({path}) uses a different tokenizer than the main model; "
                             "decodekit runs companions on the main model's token ids and never re-tokenizes")

    def check_all_free(self) -> bool:
        """Every block of every pool is free."""
        return all(p.bm.check_all_free() for p in self.pools)


__all__ = ["Companion", "ModelCatalog", "ModelPool", "ModelSet", "ModelKind"]
