"""Regenerate generated documentation: docs/pipelines.md (the pipeline spec reference)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, whatever else is installed

from framework.spec import reference_markdown  # noqa: E402

if __name__ == "__main__":
    target = ROOT / "docs" / "pipelines.md"
    target.write_text(reference_markdown())
    print(f"wrote {target}")
