"""Built-in guidance processors (``Stage.GUIDANCE``): steer a generator with companion models.

==============  ==========================================  ======================================
processor       companion                                    effect
==============  ==========================================  ======================================
fudge           prefix classifier (``demo-sentiment``)       top-k + strength * log P(label | x, v)
rad             prefix reward model (``demo-reward``)        top-k + beta * reward(x, v)
contrastive     amateur language model (``demo-draft``)      (1+beta) log p_exp - beta log p_ama
==============  ==========================================  ======================================

They are selected per request (``SamplingParams(processors=[{"fudge": {...}}])``, a spec's
``processors:`` list, the server's ``processors`` extra body), compose with each other in the
order listed, with penalties (which run before them) and with constraints (whose mask runs
after them, on the guided distribution). See ``docs/guidance.md``.
"""

from __future__ import annotations

from framework.hookspecs import Register, hookimpl
from plugins.guidance.contrastive import Contrastive
from plugins.guidance.fudge import Fudge
from plugins.guidance.rad import Rad

GUIDANCE_PROCESSORS = {"fudge": Fudge, "rad": Rad, "contrastive": Contrastive}


@hookimpl
def register_logits_processors(register: Register) -> None:
    for name, cls in GUIDANCE_PROCESSORS.items():
        register(name, cls, params=cls.Params)


__all__ = ["Contrastive", "Fudge", "Rad", "GUIDANCE_PROCESSORS"]
