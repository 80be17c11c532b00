"""Load a Llama-family model from a local Hugging Face directory (or a registered name).

Reads ``config.json`` and ``model.safetensors`` or a sharded ``model.safetensors.index.json``.
Every failure names the file and, where relevant, the tensor: unsupported architecture, missing
or corrupt file, missing tensor, unexpected tensor, shape mismatch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from framework.errors import ModelLoadError
from framework.models.config import ModelConfig

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# Tensors some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_model_dir(name_or_path: str | os.PathLike, plugin_manager=None) -> Path:
    """A local directory, or the directory a registered checkpoint name (e.g. ``demo``) points to."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from framework.plugins import get_plugin_manager, unknown_name_message

    pm = plugin_manager or get_plugin_manager()
    reg = pm.registry("model").entries.get(str(name_or_path))
    if reg is not None and not isinstance(reg.factory, type):
        return Path(reg.factory())
    names = [r.name for r in pm.registry("model") if not isinstance(r.factory, type)]
    if path.exists():
        raise ModelLoadError(f"{path}: not a directory (a model is a Hugging Face checkpoint directory)")
    raise ModelLoadError(
        f"model {str(name_or_path)!r}: no such directory, and "
        + unknown_name_message("model", str(name_or_path), names).replace("unknown model", "no registered model")
    )


def resolve_dtype(dtype: str | torch.dtype | None, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto`` keeps float32 on CPU (fastest there for small models) and the checkpoint's dtype on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(str(cfg.torch_dtype), torch.bfloat16) if cfg.torch_dtype else torch.bfloat16
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise ModelLoadError(f"dtype {dtype!r} is not supported (use one of: auto, float32, bfloat16, float16)") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from exc
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{f}: shard listed in {index.name} is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    if list(path.glob("*.bin")) or list(path.glob("*.pth")):
        raise ModelLoadError(f"{path}: only pickle weights (*.bin/*.pth) found; convert them to safetensors")
    raise ModelLoadError(f"{path}: no model.safetensors or model.safetensors.index.json")


def _iter_tensors(files: list[Path], expected: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, torch.Tensor]]:
    seen: dict[str, Path] = {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelLoadError(f"{f}: cannot be read as safetensors ({exc})") from exc
        with handle:
            for name in handle.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in expected:
                    raise ModelLoadError(f"{f}: unexpected tensor {name!r} for this architecture")
                if name in seen:
                    raise ModelLoadError(f"{f}: tensor {name!r} also appears in {seen[name]}")
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ModelLoadError(f"{f}: tensor {name!r} has shape {list(shape)}, expected {list(expected[name])}")
                try:
                    tensor = handle.get_tensor(name)
                except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                    raise ModelLoadError(f"{f}: tensor {name!r} is corrupt ({exc})") from exc
                seen[name] = f
                yield name, tensor
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{files[0].parent}: tensor {missing[0]!r} is missing{more}")


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    plugin_manager=None,
) -> tuple[torch.nn.Module, ModelConfig, Path]:
    """Build the registered architecture for a checkpoint and load its weights.

    Returns ``(model, config, directory)``.
    """
    from framework.plugins import get_plugin_manager

    pm = plugin_manager or get_plugin_manager()
    path = resolve_model_dir(name_or_path, pm)
    cfg = ModelConfig.from_dir(path)
    reg = pm.registry("model").entries.get(cfg.architecture)
    if reg is None or not isinstance(reg.factory, type):
        archs = sorted(r.name for r in pm.registry("model") if isinstance(r.factory, type))
        raise ModelLoadError(
            f"{path / 'config.json'}: architecture {cfg.architecture!r} is not supported "
            f"(supported: {', '.join(archs)})"
        )
    if cfg.mlp_bias:
        raise ModelLoadError(f"{path / 'config.json'}: mlp_bias=true is not supported")
    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, cfg, dev)
    model = reg.factory(cfg, dtype=torch_dtype, device=dev)
    files = _weight_files(path)
    model.load_weights(_iter_tensors(files, model.expected_tensors()))
    model.eval()
    return model, cfg, path
