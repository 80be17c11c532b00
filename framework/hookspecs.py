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

    * a ``torch.nn.Module`` subclass implementing ``framework.models.CausalLM``, registered under
      the Hugging Face ``architectures`` string it serves (e.g. ``"LlamaForCausalLM"``); it is
      constructed as ``factory(config: framework.models.ModelConfig)`` and must provide
      ``load_weights(tensors)``;
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
    ``sample(batch: SamplingBatch, logits: Tensor[B, V]) -> (tokens: Tensor[B], logprobs)``
    that handles every row of the batch at once (per-row settings are tensors in ``batch``).
    """


@hookspec
def register_logits_processors(register: Register) -> None:
    """Register logits processors (penalties, guidance such as FUDGE or contrastive decoding).

    ``factory(**params)`` returns an object with ``add_request(slot, params)``,
    ``remove(slot)``, ``apply(logits: Tensor[B, V], ctx) -> Tensor[B, V]`` over the whole batch
    and optionally ``on_tokens(ctx, tokens: Tensor[B])`` after sampling. Processors run in the
    order the request lists them.
    """


@hookspec
def register_constraints(register: Register) -> None:
    """Register constraint compilers (grammars, JSON Schema, regex, choice lists).

    ``factory(tokenizer, **params)`` compiles the constraint and returns an object whose
    ``new_state()`` gives a per-sequence state with ``fill_bitmask(row)``, ``advance(token)``,
    ``rollback(n)``, ``forced_tokens()`` and ``is_accepting()``.
    """


@hookspec
def register_rerankers(register: Register) -> None:
    """Register rerankers that choose among a request's finished candidates.

    ``factory(**params)`` returns an object with
    ``select(request, candidates) -> list[(candidate, score)]`` ordered best first
    (MBR, self-consistency, best-of-n ...).
    """


@hookspec
def register_drafters(register: Register) -> None:
    """Register drafters for speculative decoding.

    ``factory(**params)`` returns an object with ``propose(batch) -> list[list[int]]``, one list
    of draft tokens per sequence; the engine verifies them with the target model.
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
