"""Write a random-initialised Llama-family checkpoint (Hugging Face layout) with a tokenizer.

Until the bundled demo models land, this gives a model to run the engine on without downloading
anything. The weights are random, so the text is gibberish; speed and plumbing are real.

    python tools/make_random_checkpoint.py OUT_DIR [--hidden 256 --layers 4 --vocab 2048 ...]

The tokenizer is a byte-level BPE trained (with the `tokenizers` library) on the project's own
Markdown files; ids 0, 1, 2 are <pad>, <s>, </s>.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


def train_tokenizer(out: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    files = [str(p) for p in sorted(ROOT.rglob("*.md")) if ".git" not in p.parts]
    tok.train(files, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": True}, indent=2))
    return tok.get_vocab_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--model-type", default="llama", choices=["llama", "mistral", "qwen2", "qwen3"])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=2048, help="vocabulary size (the tokenizer may end up smaller)")
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    ap.add_argument("--no-tokenizer", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from framework.models.config import ModelConfig
    from framework.models.llama import LlamaForCausalLM

    args.out.mkdir(parents=True, exist_ok=True)
    vocab = args.vocab if args.no_tokenizer else max(train_tokenizer(args.out, args.vocab), 3)
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    cfg = {
        "architectures": [arch[args.model_type]], "model_type": args.model_type,
        "vocab_size": vocab, "hidden_size": args.hidden, "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads, "head_dim": args.hidden // args.heads,
        "max_position_embeddings": args.max_len, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": args.tie, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "torch_dtype": "float32",
    }
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2))
    shapes = LlamaForCausalLM(ModelConfig.from_dict(cfg), device="meta").expected_tensors()
    g = torch.Generator().manual_seed(args.seed)
    tensors = {
        name: (torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.05)
        for name, shape in shapes.items()
    }
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})
    n = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.out} ({n / 1e6:.1f}M parameters, vocab {vocab})")


if __name__ == "__main__":
    main()
