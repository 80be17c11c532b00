"""Shared fixtures: tiny random-initialised Hugging Face checkpoints written with transformers.

Nothing is downloaded: transformers builds the models from configs, and the tokenizer used by
text-level tests is trained here on a few lines of text.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 320
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _config(family: str, **overrides):
    import transformers

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if family == "llama":  # llama3 rope scaling, untied
        cfg = transformers.LlamaConfig(
            **common,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
    elif family == "mistral":  # sliding window shorter than the test sequences
        cfg = transformers.MistralConfig(**common, sliding_window=24)
    elif family == "qwen2":  # q/k/v biases, tied embeddings
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    elif family == "qwen3":  # q/k norms, explicit head_dim != hidden / heads
        cfg = transformers.Qwen3Config(**common, head_dim=32)
    else:  # pragma: no cover
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_checkpoint(path: Path, family: str, seed: int = 0, **save_kwargs) -> Path:
    import transformers

    torch.manual_seed(seed)
    cfg = _config(family)
    cls = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
    }[family]
    model = cls(cfg).eval()
    if getattr(cfg, "attention_bias", False) or family == "qwen2":
        # default init zeroes biases; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    model.save_pretrained(path, **save_kwargs)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {fam: make_checkpoint(root / fam, fam) for fam in FAMILIES}


def train_bytelevel_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE tokenizer.json with <pad>, <s>, </s> as ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    text = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello world! Streaming text, stop strings and tokens.",
        "Once upon a time there was a tiny model that generated text.",
        "日本語のテキストと絵文字 🙂🚀 are here too.",
    ] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        '{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": false}'
    )


@pytest.fixture(scope="session")
def text_model(tmp_path_factory) -> Path:
    """A tiny llama checkpoint with a real (trained) tokenizer, for text-level tests."""
    path = make_checkpoint(tmp_path_factory.mktemp("text") / "llama", "llama", seed=3)
    train_bytelevel_tokenizer(path)
    return path


@pytest.fixture(autouse=True)
def _free_engines_between_tests():
    """Collect cyclic garbage after each test: engines a test left in a reference cycle (a
    patched method closing over its object) would otherwise hold their KV caches until the next
    full collection, which with the engine's frozen heap comes rarely."""
    yield
    gc.collect()
