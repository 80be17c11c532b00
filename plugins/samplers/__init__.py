"""Built-in samplers and logits processors (registered through the same hooks as plugins).

The logits processors run in this order (Hugging Face transformers' order; frequency/presence
penalties, which HF lacks, right after the repetition penalty as in vLLM):

==========================  ===========================  =========================================
processor                   SamplingParams fields        stage
==========================  ===========================  =========================================
logit_bias                  logit_bias                   BIAS
repetition_penalty          repetition_penalty           PENALTY
frequency_presence_penalty  frequency_penalty,           PENALTY
                            presence_penalty
no_repeat_ngram             no_repeat_ngram_size         BAN
bad_words                   bad_words, bad_words_ids     BAN
min_tokens                  min_tokens                   BAN
(third-party processors)    processors                   GUIDANCE (default)
temperature                 temperature                  TEMPERATURE
top_k                       top_k, min_tokens_to_keep    TRUNCATION
top_p                       top_p, min_tokens_to_keep    TRUNCATION
min_p                       min_p, min_tokens_to_keep    TRUNCATION
typical_p                   typical_p, ...               TRUNCATION
epsilon_cutoff              epsilon_cutoff, ...          TRUNCATION
eta_cutoff                  eta_cutoff, ...              TRUNCATION
==========================  ===========================  =========================================

Temperature and the truncations are off for greedy requests (``temperature=0``), as in HF.
Then the ``default`` sampler draws (greedy rows take the argmax).
"""

from __future__ import annotations

from framework.hookspecs import hookimpl
from plugins.samplers.bans import BadWords, MinTokens, NoRepeatNGram
from plugins.samplers.basic import BasicSampler
from plugins.samplers.penalties import FrequencyPresencePenalty, LogitBias, RepetitionPenalty
from plugins.samplers.truncation import EpsilonCutoff, EtaCutoff, MinP, Temperature, TopK, TopP, Typical

LOGITS_PROCESSORS = {
    "logit_bias": LogitBias,
    "repetition_penalty": RepetitionPenalty,
    "frequency_presence_penalty": FrequencyPresencePenalty,
    "no_repeat_ngram": NoRepeatNGram,
    "bad_words": BadWords,
    "min_tokens": MinTokens,
    "temperature": Temperature,
    "top_k": TopK,
    "top_p": TopP,
    "min_p": MinP,
    "typical_p": Typical,
    "epsilon_cutoff": EpsilonCutoff,
    "eta_cutoff": EtaCutoff,
}
"""The built-in logits processors by registered name, in the order they run."""


@hookimpl
def register_samplers(register) -> None:
    register("default", BasicSampler)


@hookimpl
def register_logits_processors(register) -> None:
    for name, cls in LOGITS_PROCESSORS.items():
        register(name, cls, params=cls.Params)
