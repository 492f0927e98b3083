"""The wheel's packages: ``tasks/`` installed as ``tasks`` and again as ``sfox_tokens``.

A project with a ``tasks`` module of its own (Celery's tutorial starts with one)
imports the package as ``sfox_tokens``; every import inside the package is
relative, so the same code runs under either name. Everything else about the
build is in pyproject.toml.
"""

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["tasks", "tasks.*"])

setup(
    packages=[*PACKAGES, *("sfox_tokens" + name[len("tasks") :] for name in PACKAGES)],
    package_dir={"sfox_tokens": "tasks"},
)
