"""Train the demo SentencePiece BPE tokenizer and write its Hugging Face side files.

Recipe in the style of the Llama 2 tokenizer: BPE, byte fallback (any UTF-8 text round-trips),
identity normalisation and no whitespace squashing (code and JSON indentation survive), a dummy
prefix space, digits split one per token (arithmetic), whitespace-only pieces allowed (indents).
Newlines are not in the training sentences (SentencePiece trains on lines), so ``"\\n"`` is the byte
piece ``<0x0A>``.

Special ids: ``<pad>`` 0, ``<s>`` 1 (BOS, added to every encoded prompt), ``</s>`` 2 (EOS, ends
every training document, so generation stops there), ``<unk>`` 3 (unused thanks to byte fallback).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_PIECES = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}


def train_tokenizer(docs: Iterable[str], out_dir: Path, vocab_size: int, seed: int, max_sentences: int = 400_000) -> Path:
    """Train on (a seeded sample of) the documents' lines; returns the ``tokenizer.model`` path."""
    import sentencepiece as spm

    lines = [ln for doc in docs for ln in doc.split("\n") if ln.strip()]
    rng = random.Random(seed)
    if len(lines) > max_sentences:
        lines = rng.sample(lines, max_sentences)
    else:
        rng.shuffle(lines)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "tokenizer"
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=8192,
        shuffle_input_sentence=False,  # already shuffled with our seed
        pad_id=PAD, bos_id=BOS, eos_id=EOS, unk_id=UNK,
        pad_piece="<pad>", bos_piece="<s>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=2,
        minloglevel=2,
    )
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)  # human-readable copy, not needed
    return prefix.with_suffix(".model")


def tokenizer_side_files(max_len: int) -> dict[str, dict]:
    """``tokenizer_config.json``, ``special_tokens_map.json`` and ``generation_config.json`` contents."""
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    added = {
        str(i): {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, piece in ((PAD, "<pad>"), (BOS, "<s>"), (EOS, "</s>"), (UNK, "<unk>"))
    }
    return {
        "tokenizer_config.json": {
            **specials,
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": added,
            "clean_up_tokenization_spaces": False,
            "legacy": False,
            "model_max_length": max_len,
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
        },
        "special_tokens_map.json": specials,
        "generation_config.json": {"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD},
    }


def write_tokenizer_files(model_file: Path, out_dir: Path, max_len: int) -> None:
    """Copy ``tokenizer.model`` and the side files into a model directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if model_file.resolve() != (out_dir / "tokenizer.model").resolve():
        (out_dir / "tokenizer.model").write_bytes(model_file.read_bytes())
    for name, content in tokenizer_side_files(max_len).items():
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n")
