"""KV policies: which KV blocks a sequence keeps as it grows, and where attention and RoPE see them.

The engine calls a pool's policy after every forward that computed tokens of a sequence
(:meth:`KVPolicy.after_compute`). The default, :class:`KeepAll`, keeps every block: token ``i``
sits at cache position ``i`` and generation ends at the model's context length. A policy may
instead evict whole blocks from the middle of the block table (attention sinks + a recent
window, as in StreamingLLM), freeing them to the pool:

* it drops blocks with ``pool.bm.release_blocks(kv.table, indices)`` (they leave the prefix
  cache) and adds the tokens it dropped to ``kv.num_evicted``;
* from then on token ``i`` (after the kept head) sits at cache position ``i - kv.num_evicted``:
  the runner writes new tokens there and passes *cache positions* to the model, so RoPE and
  attention see a contiguous cache; keys already cached were rotated for their old position, so
  a policy that evicts must re-rotate the keys it keeps after the hole (``ModelPool.rotate_keys``),
  or the model must store keys before RoPE;
* ``unbounded = True`` lets sequences grow past ``max_model_len`` (memory per sequence stays
  bounded by the policy instead).

Policies are chosen per engine (``EngineConfig.kv_policy``) through the ``kv_policy`` registry
(``register_kv_policies``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from framework.companions import ModelPool
    from framework.sequence import SeqKV


@runtime_checkable
class KVPolicy(Protocol):
    """Decides, after each forward, which of a sequence's KV blocks stay in a pool."""

    unbounded: bool
    """True if sequences may grow past ``max_model_len`` under this policy."""

    def after_compute(self, kv: "SeqKV", pool: "ModelPool") -> None:
        """``kv.num_computed`` just grew; evict blocks if the policy wants (see module doc)."""
        ...


class KeepAll:
    """The default policy: every block stays; cache position == token position."""

    unbounded = False

    def after_compute(self, kv: "SeqKV", pool: "ModelPool") -> None:
        return None


__all__ = ["KVPolicy", "KeepAll"]


from framework.hookspecs import Register, hookimpl  # noqa: E402


@hookimpl
def register_kv_policies(register: Register) -> None:
    register("keep_all", KeepAll)
