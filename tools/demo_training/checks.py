"""Checks run on the saved models: loader parity, sample generations, scorer sanity."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from framework.models.config import ModelConfig

from .lm import CausalLM
from .tokenizer import BOS

POSITIVE_LINE = "What a wonderful day, I love this beautiful place and my kind friends."
NEGATIVE_LINE = "What a terrible day, I hate this ugly place and my cruel enemies."
PROMPTS = (
    "Once upon a time",
    "HAMLET:\n",
    "Q: Tom has 12 apples and finds 7 more. How many apples does Tom have now?\nA:",
    "A person record in JSON:\n",
    "The for statement",
)


@torch.inference_mode()
def native_logits(model: torch.nn.Module, cfg: ModelConfig, ids: list[int]) -> torch.Tensor:
    """Logits ``[T, V]`` of the serving model for one sequence, through the paged KV cache."""
    from framework.kv_cache import KVCacheStorage
    from framework.models.attention import AttentionMetadata

    bs, T = 16, len(ids)
    n_blocks = -(-T // bs)
    kv = KVCacheStorage(cfg, n_blocks, bs, model.dtype, model.device)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    meta = AttentionMetadata.build([T], [T], [list(range(n_blocks))], list(range(T)), group, bs, cfg.sliding_window)
    hidden = model(torch.tensor(ids), torch.arange(T), kv.layers, meta)
    return model.compute_logits(hidden)


def load_training_model(model_dir: Path, cfg: ModelConfig) -> CausalLM:
    """The training module holding the saved (bf16-rounded) weights, in float32."""
    model = CausalLM(cfg)
    state = {k: v.float() for k, v in load_file(str(model_dir / "model.safetensors")).items()}
    if set(state) != set(model.model.expected_tensors()):
        raise RuntimeError(f"{model_dir}/model.safetensors: tensors differ from the model's: {sorted(set(state) ^ set(model.model.expected_tensors()))}")
    model.model.load_weights(state.items())
    return model.eval()


def check_lm_against_loader(
    model_dir: Path, cfg: ModelConfig, held: dict[str, torch.Tensor], log: Callable[[str], None], tol: float = 1e-3
) -> CausalLM:
    """Compare the training module's logits with ``framework.models.load_model``'s (fp32)."""
    from framework.models import load_model

    ours = load_training_model(model_dir, cfg)
    native, _, _ = load_model(model_dir, dtype="float32", device="cpu")
    stream = next(s for s in held.values() if s.numel() > 8)
    ids = stream[: min(160, stream.numel())].tolist()
    with torch.inference_mode():
        expected = ours(torch.tensor([ids]))[0]
    diff = float((native_logits(native, cfg, ids) - expected).abs().max())
    log(f"  loader check: framework.models.load_model logits vs training model over {len(ids)} tokens: "
        f"max abs diff {diff:.2e} (fp32)")
    if not diff < tol:
        raise SystemExit(f"error: {model_dir}: loader logits differ from the training model by {diff} (> {tol})")
    return ours


def sample_generations(model_dir: Path, log: Callable[[str], None], max_tokens: int = 40) -> None:
    from framework import LLM, SamplingParams

    llm = LLM(str(model_dir), device="cpu")
    greedy = llm.generate(list(PROMPTS), SamplingParams(max_tokens=max_tokens, temperature=0), use_tqdm=False)
    sampled = llm.generate(list(PROMPTS), SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=0),
                           use_tqdm=False)
    for prompt, g, s in zip(PROMPTS, greedy, sampled):
        log(f"  {prompt!r}")
        log(f"    greedy : {g.outputs[0].text!r}")
        log(f"    sampled: {s.outputs[0].text!r}")


def scorer_sanity(scorer, sp, log: Callable[[str], None]) -> None:
    """Score a clearly positive and a clearly negative line (full-line score)."""
    for text in (POSITIVE_LINE, NEGATIVE_LINE):
        ids = torch.tensor([[BOS, *sp.encode(text)]])
        s = float(scorer.prefix_scores(ids)[0, -1])
        shown = f"reward {s:.3f}" if scorer.kind == "reward" else f"log P(positive) {s:.3f}"
        log(f"  {text!r}: {shown}")
