"""Build step that pyproject.toml cannot express: ship the top-level ``grammars/`` folder (the
source of the shipped lark grammars) inside the wheel as ``plugins/constraints/grammars/``.
Everything else is configured in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithGrammars(build_py):
    """``build_py`` that also copies ``grammars/*.lark`` into the built package tree."""

    def run(self) -> None:
        super().run()
        src = Path(__file__).resolve().parent / "grammars"
        dst = Path(self.build_lib) / "plugins" / "constraints" / "grammars"
        dst.mkdir(parents=True, exist_ok=True)
        for path in sorted(src.glob("*.lark")):
            self.copy_file(str(path), str(dst / path.name))


setup(cmdclass={"build_py": BuildPyWithGrammars})
