"""Build hook only (metadata lives in pyproject.toml): copy `config/` into the wheel as
``ilup_controller/data`` so an installed package can run its own demo; `config/` stays the
one source in the repository."""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfig(build_py):
    def run(self) -> None:
        super().run()
        source = Path(__file__).resolve().parent / "config"
        dest = Path(self.build_lib) / "ilup_controller" / "data"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(source, dest, ignore=shutil.ignore_patterns("*~", "*.pyc", "__pycache__"))


setup(cmdclass={"build_py": BuildPyWithConfig})
