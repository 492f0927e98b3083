"""The project's own sources, copied for a build that must not write into the working tree."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: What a build of the package reads.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "tasks")


def copy_sources(destination: Path) -> Path:
    """Copy what the build reads into ``destination``; return ``destination``."""
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name,
                destination / name,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        else:
            shutil.copy(ROOT / name, destination / name)
    return destination
