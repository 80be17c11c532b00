"""Built-in rerankers (the request-finish stage, ``framework/rerankers.py``).

``logprob``: candidates by cumulative log-probability, highest first — what ``best_of`` has
always done (vLLM's semantics); it is the reranker of a ``best_of > n`` request that names none.

``self_consistency``: majority vote over answers extracted by a regex (Wang et al. 2023).
"""

from __future__ import annotations

from framework.hookspecs import Register, hookimpl
from plugins.rerankers.logprob import LogprobReranker
from plugins.rerankers.self_consistency import SelfConsistencyReranker


@hookimpl
def register_rerankers(register: Register) -> None:
    register("logprob", LogprobReranker, params=LogprobReranker.Params)
    register("self_consistency", SelfConsistencyReranker, params=SelfConsistencyReranker.Params)


__all__ = ["LogprobReranker", "SelfConsistencyReranker"]
