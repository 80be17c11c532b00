"""Every hook a decodekit plugin can implement.

decodekit uses `pluggy <https://pluggy.readthedocs.io>`_. A plugin is a module (or object) with
functions decorated by :data:`hookimpl` whose names match the specs below. Built-in techniques
register through exactly these hooks; a third-party package exposes its module under the
entry-point group ``decodekit``::

    # pyproject.toml of your package
    [project.entry-points.decodekit]
    my_plugin = "my_package.plugin"

There are two kinds of hooks:

* **Registration hooks** (``register_*``) are called once, when the plugin manager starts. Each
  receives a ``register(name, factory, *, params=None)`` callable. ``name`` is what users write
  in YAML specs and ``SamplingParams``; ``factory`` builds the object the engine uses on its hot
  path; ``params`` is an optional pydantic model (``extra="forbid"``) describing the options the
  factory accepts, so specs can be validated before any model loads. Registering a name that
  another plugin already registered for the same kind is an error naming both plugins.
* **Event hooks** (``on_*``) are called by the engine for observers (metrics, logging, tracing).
  They are dispatched only when at least one plugin implements them, and never per token.

The engine never calls through pluggy per token: objects built from registered factories are
called directly through small protocols (see ``framework.tokenizer.Tokenizer``,
``framework.sampling.Sampler`` ...), once per step for the whole batch.

Set ``DECODEKIT_TRACE_HOOKS=1`` to log every hook call with its arguments and duration.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from framework.outputs import RequestOutput, StepStats
    from framework.sequence import Request

PROJECT_NAME = "decodekit"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marker for hook specifications (used only in this module)."""

hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Decorator for plugin hook implementations: ``@hookimpl def register_samplers(register): ...``"""


class Register(Protocol):
    """The callable every registration hook receives.

    ``register(name, factory, *, params=None)``: ``name`` must be unique per kind across all
    loaded plugins; ``params`` is an optional pydantic model of the factory's keyword options.
    """

    def __call__(self, name: str, factory: Any, *, params: type | None = None) -> None: ...


# --------------------------------------------------------------------------- registration hooks


@hookspec
def register_tokenizers(register: Register) -> None:
    """Register tokenizer implementations.

    ``factory`` is a class (or callable) with a ``from_dir(path: pathlib.Path) -> Tokenizer``
    classmethod and a ``can_load(path: pathlib.Path) -> bool`` classmethod. When a model
    directory is loaded without naming a tokenizer, the first registered tokenizer whose
    ``can_load`` returns True is used (built-ins: ``hf`` for ``tokenizer.json``, then
    ``sentencepiece`` for ``tokenizer.model``). The returned object must satisfy the
    ``framework.tokenizer.Tokenizer`` protocol, including ``token_bytes`` — the exact byte string
    each token contributes to the output, which constrained decoding relies on.

    Example::

        @hookimpl
        def register_tokenizers(register):
            register("tiktoken", TiktokenTokenizer)
    """


@hookspec
def register_models(register: Register) -> None:
    """Register model architectures and named checkpoints.

    Two kinds of factory are accepted:

    * a ``torch.nn.Module`` subclass implementing the model contract
      ``framework.models.protocol.CausalLM``, registered under the Hugging Face
      ``architectures`` string it serves (e.g. ``"LlamaForCausalLM"``). It is constructed as
      ``factory(config: ModelConfig, dtype=torch.dtype, device=torch.device)`` and provides
      ``expected_tensors() -> {name: shape}``, ``load_weights(iterable of (name, tensor))``,
      ``forward(input_ids [T], positions [T], kv_caches, meta: AttentionMetadata) -> hidden [T, H]``
      (the step's flat tokens; K/V written to and read from the paged cache through ``meta``),
      ``compute_logits(hidden [N, H]) -> [N, V] float32`` and a ``dtype`` attribute;
    * a zero-argument callable returning a local directory (``pathlib.Path``) holding a Hugging
      Face checkpoint, registered under a short name users can write instead of a path
      (e.g. ``"demo"``).

    Example::

        @hookimpl
        def register_models(register):
            register("my-tiny", lambda: Path(__file__).parent / "weights")
    """


@hookspec
def register_samplers(register: Register) -> None:
    """Register samplers: the step that turns processed logits into tokens.

    ``factory(**params)`` returns an object with
    ``sample(batch: SamplingBatch, logits: Tensor[B, V]) -> SamplerOutput`` that handles every
    row of the batch at once. ``logits`` have been through the logits processors (temperature
    and truncation included); ``batch.model_logits`` holds the unprocessed ones for logprobs
    (None when no processor ran); ``batch.greedy`` marks rows to take the argmax of.
    """


@hookspec
def register_logits_processors(register: Register) -> None:
    """Register batch-level logits processors (penalties, bans, truncation, guidance such as
    FUDGE or contrastive decoding).

    ``factory(setup: framework.processors.ProcessorSetup)`` is called once per engine, the first
    time a request uses the processor (``setup`` has ``vocab_size``, ``device``,
    ``eos_token_ids`` and the ``tokenizer``). ``params`` is the pydantic model of the per-request
    options (``extra="forbid"``); requests name the processor in
    ``SamplingParams(processors=[{name: {options}}])`` (or a YAML spec's ``processors:``), and
    the factory may map ``SamplingParams`` fields onto it with a classmethod
    ``from_sampling_params(params) -> Params | None``. The object serves every request that
    uses it; each running sequence holds a *slot* (a small reused integer) and the object keeps
    per-slot state, ideally in slot-indexed tensors:

    * ``add_request(slot, params, request: RequestInfo)`` — a sequence starts or resumes
      running (``request.token_ids``: prompt + tokens so far; after preemption it is re-added
      from them, so build state from the tokens, not from history the engine no longer sends);
    * ``remove(slot)`` — finished, aborted or preempted;
    * ``apply(logits: Tensor[R, V], ctx: StepContext) -> Tensor[R, V]`` — once per step, with
      only the ``R`` rows that use the processor (``ctx.slots``, ``ctx.slot_index``,
      ``ctx.token_ids``); it may modify ``logits`` in place; rows of other requests are never
      touched;
    * optional: ``prepare(params, sampling_params) -> params`` (per-request checks needing the
      model or tokenizer, run when the request is added; raise ``ValueError``),
      ``on_tokens(ctx, tokens: Tensor[R])`` after sampling, ``fork(src_slot, dst_slot)``,
      ``models(ctx) -> [str | None]`` (a *source* processor that replaces rows' logits by
      another model's names that model per row: the rows' logprobs then come from its output
      and the candidates carry the name), and a ``stage`` attribute
      (``framework.processors.Stage``; default ``GUIDANCE``).

    Processors run by stage, then in registration order, whatever the batch holds. See
    ``framework/processors.py`` and the built-ins in ``plugins/samplers/``.
    """


@hookspec
def register_constraints(register: Register) -> None:
    """Register constraint compilers (grammars, JSON Schema, regex, choice lists).

    ``factory(tokenizer, **params)`` compiles the constraint and returns an object whose
    ``new_state()`` gives a per-sequence state with ``fill_bitmask(bitmask, row)``,
    ``advance(token) -> bool``, ``rollback(n)``, ``forced_tokens()`` and ``is_accepting()``.
    Requests select one with ``SamplingParams(constraint={name: params})``; the engine compiles
    it off its thread (``framework/constraints.py``). Optional attributes of the factory:
    ``submit(tokenizer, params) -> concurrent.futures.Future`` (validate now, compile in the
    background) and ``timeout_s``.
    """


@hookspec
def register_rerankers(register: Register) -> None:
    """Register rerankers that choose among a request's finished candidates (MBR,
    self-consistency, best-of-n ...).

    ``factory(setup: framework.processors.ProcessorSetup)`` is called once per engine, the first
    time a request names the reranker (``setup.models`` gives companion models, e.g. a reward
    model); ``params`` is the pydantic model of the per-request options. The object implements
    ``select(request: framework.rerankers.RerankRequest) -> list[ScoredCandidate]`` (best
    first; ``request.candidates`` are the finished ``CompletionOutput``s, ``request.options``
    the validated options) and optionally ``select_many(requests) -> list[list[...]]`` to score
    every request that finished in the same step at once, and ``prepare(options, sampling) ->
    options`` for per-request checks (raise ``ValueError``). See ``framework/rerankers.py``.
    """


@hookspec
def register_utilities(register: Register) -> None:
    """Register utilities for minimum Bayes risk rerankers (``mbr``'s ``utility:`` option).

    ``factory(**params)`` returns an object with ``score(hyp: str, ref: str) -> float`` (higher
    is better) and optionally ``pairwise(hyps, refs) -> [H, R]`` and, for the linear-time
    ``aggregate`` method, ``features(text)``, ``aggregate(features, weights)`` and
    ``score_aggregate(hyp_features, aggregated)``; ``params`` validates the options. Built-ins:
    ``chrf``, ``bleu``, ``ter``, ``exact_match`` (``plugins/rerankers/utilities.py``).
    """


@hookspec
def register_drafters(register: Register) -> None:
    """Register drafters for speculative decoding.

    ``factory(setup: framework.processors.ProcessorSetup, params)`` is called once per engine
    with the spec's ``drafter:`` options (validated by ``params`` if registered). The object
    implements ``propose(seqs, num_tokens) -> list[framework.drafting.DraftProposal]`` (draft
    tokens per sequence and the distribution each was drawn from, or None for a point-mass
    drafter) and ``accepted(seq, num_accepted)``; a draft model is a *driven* companion
    (``setup.models.get(ref, lockstep=False)``) with its own paged KV. See
    ``framework/drafting.py``.
    """


@hookspec
def register_strategies(register: Register) -> None:
    """Register decoding strategies: how a request's sequences turn logits into tokens.

    ``factory(core: framework.engine_core.EngineCore)`` is called once per engine. The object
    implements ``claims(params) -> bool`` (asked in reverse registration order: plugins before
    the built-in ``beam_search`` and ``sample``), ``prepare(request)``, ``after_forward(rows:
    DueRows, now) -> requests that progressed``, a ``streams`` flag and optionally
    ``on_ready``, ``before_schedule(seqs)``, ``on_preempt(seq)``, ``on_draft_dropped(seq)``. It
    uses the core's services (``core.sample``, ``core.append_sampled``, ``core.fork``,
    ``core.finish`` ...). See ``framework/strategies/__init__.py``.
    """


@hookspec
def register_kv_policies(register: Register) -> None:
    """Register KV policies: which KV blocks a sequence keeps as it grows (attention sinks,
    sliding windows) and at which cache positions attention and RoPE see them.

    ``factory(**options)`` returns an object implementing ``framework.kv_policy.KVPolicy``
    (``unbounded`` flag, ``after_compute(kv, pool)``); the engine's ``kv_policy`` setting names
    one (``{name: {options}}``), one instance per pool.
    """


@hookspec
def register_commands(register: Register) -> None:
    """Register extra ``decodekit`` sub-commands.

    ``factory`` is a ``click.Command`` (or group); ``name`` is the sub-command's name.

    Example::

        @hookimpl
        def register_commands(register):
            @click.command()
            def hello():
                click.echo("hi")
            register("hello", hello)
    """


@hookspec
def register_routes(register: Register) -> None:
    """Register extra HTTP routes of ``decodekit serve``.

    ``factory`` is a ``fastapi.APIRouter``, or a callable ``factory(state) -> APIRouter`` given
    the server's :class:`framework.server.ServerState` (``state.aengine``, ``state.engine``,
    ``state.tokenizer``, ``state.metrics``). The routes are added beside the built-in ones (a
    path that clashes with one is an error) and, with ``--api-key``, need the key like ``/v1``.

    Example::

        @hookimpl
        def register_routes(register):
            router = fastapi.APIRouter()

            @router.get("/v1/hello")
            async def hello():
                return {"hello": "world"}

            register("hello", router)
    """


# --------------------------------------------------------------------------------- event hooks


@hookspec
def on_request_added(request: "Request") -> None:
    """Called once when the engine accepts a request (after validation, before scheduling).

    ``request`` carries ``request_id``, ``prompt_token_ids`` and ``params``. Do not mutate it.
    """


@hookspec
def on_step_finished(stats: "StepStats") -> None:
    """Called after every engine step with that step's ``StepStats``: number of running and
    waiting requests, tokens scheduled (prefill and decode), KV blocks used/free, prefix-cache
    hits and the step's wall time in seconds. Keep it cheap: it runs on the engine thread.
    """


@hookspec
def on_request_finished(output: "RequestOutput") -> None:
    """Called once when a request finishes (stopped, hit its length limit or was aborted), with
    its final ``RequestOutput`` including ``metrics`` (queue time, TTFT, TPOT)."""


HOOK_NAMES: tuple[str, ...] = tuple(
    name for name, obj in list(globals().items()) if callable(obj) and hasattr(obj, PROJECT_NAME + "_spec")
)
"""Names of every hook specification defined in this module."""

RegisterFn = Callable[..., None]
