"""The bundled demo models, registered by name through ``register_models``.

``demo`` (~6M-parameter Llama LM), ``demo-draft`` (~0.9M, same tokenizer: speculative-decoding
drafter, contrastive-decoding amateur), ``demo-sentiment`` (FUDGE prefix classifier) and
``demo-reward`` (RAD prefix reward model). Trained by ``tools/train_demo.py``; the data sources
and their licences are in ``SOURCES.md``, the training numbers in ``TRAINING_REPORT.txt`` and
the formats in ``docs/demo_models.md``.

>>> from framework import LLM
>>> llm = LLM(model="demo")
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from framework.errors import ModelLoadError
from framework.hookspecs import Register, hookimpl

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODELS: tuple[str, ...] = ("demo", "demo-draft", "demo-sentiment", "demo-reward")


def demo_model_dir(name: str) -> Path:
    """The directory of a bundled demo model; a clear error if it is not there."""
    path = DEMO_DIR / name
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"bundled model {name!r} is missing ({path}); regenerate it with: python tools/train_demo.py"
        )
    return path


def _factory(name: str) -> Callable[[], Path]:
    return lambda: demo_model_dir(name)


@hookimpl
def register_models(register: Register) -> None:
    for name in DEMO_MODELS:
        register(name, _factory(name))


__all__ = ["DEMO_DIR", "DEMO_MODELS", "demo_model_dir"]
