"""Built-in rerankers (the request-finish stage, ``framework/rerankers.py``) and MBR utilities.

``logprob``: candidates by cumulative log-probability, highest first — what ``best_of`` has
always done (vLLM's semantics); it is the reranker of a ``best_of > n`` request that names none.

``self_consistency``: majority vote over answers extracted by a regex (Wang et al. 2023).

``mbr``: minimum Bayes risk over the samples (exact, aggregate, confidence-based pruning) with a
registered utility (``register_utilities``: ``chrf``, ``bleu``, ``ter``, ``exact_match``).

``best_of_n``: candidates by a reward model's score (a companion) or by log-probability.

``ensemble`` (a logits processor): some of a request's samples drawn from other language
models, pooled for the reranker (output ensembling, MBR across models).
"""

from __future__ import annotations

from framework.hookspecs import Register, hookimpl
from plugins.rerankers.best_of_n import BestOfNReranker
from plugins.rerankers.ensemble import EnsembleParams, EnsembleSources
from plugins.rerankers.logprob import LogprobReranker
from plugins.rerankers.mbr import MBRReranker
from plugins.rerankers.self_consistency import SelfConsistencyReranker
from plugins.rerankers.utilities import BUILTIN_UTILITIES


@hookimpl
def register_rerankers(register: Register) -> None:
    register("logprob", LogprobReranker, params=LogprobReranker.Params)
    register("self_consistency", SelfConsistencyReranker, params=SelfConsistencyReranker.Params)
    register("mbr", MBRReranker, params=MBRReranker.Params)
    register("best_of_n", BestOfNReranker, params=BestOfNReranker.Params)


@hookimpl
def register_logits_processors(register: Register) -> None:
    register("ensemble", EnsembleSources, params=EnsembleParams)


@hookimpl
def register_utilities(register: Register) -> None:
    for name, cls in BUILTIN_UTILITIES.items():
        register(name, cls, params=cls.Params)


__all__ = ["BestOfNReranker", "EnsembleSources", "LogprobReranker", "MBRReranker", "SelfConsistencyReranker"]
