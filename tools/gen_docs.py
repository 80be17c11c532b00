"""Regenerate generated documentation: docs/pipelines.md (the pipeline spec reference)."""

from pathlib import Path

from framework.spec import reference_markdown

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    target = ROOT / "docs" / "pipelines.md"
    target.write_text(reference_markdown())
    print(f"wrote {target}")
