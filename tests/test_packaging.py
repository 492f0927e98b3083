"""The package as a partner receives it: the sdist and wheel build cleanly and render on PyPI,
and the stand-in's ``--help`` describes every option it has.

The build runs from a copy of the project's sources in a temporary directory, so it leaves
nothing behind in the working tree (setuptools writes ``*.egg-info`` and ``build/`` beside
the sources it builds).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import redis

from tests.conftest import REDIS_URL
from tests.sources import copy_sources

BIN = Path(sys.executable).parent
#: What the build reads; everything else in the working tree is left out of the copy.


def have(module: str) -> bool:
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    return out.returncode == 0


needs_build_tools = pytest.mark.skipif(
    not (have("build") and have("twine")),
    reason="build and twine are in the `test` extra: pip install -e '.[test]'",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """``(dist directory, build output)`` of ``python -m build`` over a copy of the sources."""
    source = copy_sources(tmp_path_factory.mktemp("source"))
    dist = tmp_path_factory.mktemp("dist")
    env = dict(os.environ)
    # A developer's PYTHONDONTWRITEBYTECODE makes setuptools say "byte-compiling is disabled":
    # a warning about this shell, not about the package.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    output = out.stdout + out.stderr
    assert out.returncode == 0, output
    return dist, output


@needs_build_tools
def test_sdist_and_wheel_build_without_warnings(built):
    """`python -m build` makes both, and says no warning (deprecations included) on the way."""
    dist, output = built
    names = sorted(path.name for path in dist.iterdir())
    assert len(names) == 2, names
    assert names[0].endswith(".whl") and names[1].endswith(".tar.gz"), names
    warnings = [line for line in output.splitlines() if re.search(r"warn|deprecat", line, re.I)]
    assert not warnings, "\n".join(warnings)


@needs_build_tools
def test_twine_check_passes(built):
    """`twine check --strict` accepts both: the README renders as the long description."""
    dist, _ = built
    files = sorted(str(path) for path in dist.iterdir())
    out = subprocess.run(
        [str(BIN / "twine"), "check", "--strict", *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("PASSED") == 2, out.stdout


@needs_build_tools
def test_wheel_carries_both_names_and_their_data(built):
    """The wheel holds ``tasks`` and ``sfox_tokens``, each with py.typed and the Lua scripts."""
    dist, _ = built
    (wheel,) = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("tasks", "sfox_tokens"):
        assert f"{package}/py.typed" in names, package
        assert any(n.startswith(f"{package}/") and n.endswith(".lua") for n in names), package
    assert not any(n.startswith(("tests/", "bench/")) for n in names)


def options_and_help(text: str) -> dict[str, str]:
    """Each option of an argparse ``--help`` and the description beside or below it."""
    section = text.split("options:", 1)[1]
    found: dict[str, str] = {}
    current: str | None = None
    for line in section.splitlines():
        match = re.match(r"^  (-[-\w]+(?:[ ,][^ ].*?)?)(?:\s{2,}(?P<help>.*))?$", line)
        if match and line.startswith("  -"):
            current = re.findall(r"--[\w-]+|-\w\b", match.group(1))[-1]
            found[current] = (match.group("help") or "").strip()
        elif current and line.strip():
            found[current] = (found[current] + " " + line.strip()).strip()
    return found


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "tasks.testing", "--help"],
        [str(BIN / "sfox-tokens"), "fake-sfox", "--help"],
    ],
    ids=["python -m tasks.testing", "sfox-tokens fake-sfox"],
)
def test_fake_sfox_help_describes_every_option(command):
    """Every option of the stand-in's ``--help`` has a description, and the defaults say so."""
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    options = options_and_help(out.stdout)
    for option in ("--host", "--port", "--rate-window", "--rate-penalty", "--max-batch"):
        assert option in options, option
    assert "--token-ttl" in options
    undescribed = [option for option, text in options.items() if not text]
    assert not undescribed, out.stdout


def test_demo_on_a_broker_leaves_nothing_without_a_ttl():
    """`demo --broker redis://…/7` deletes its private queue and bindings; what else it wrote
    (the limiter's log, the run's bookkeeping) expires. The suite's CELERY_BROKER_URL (another
    database) is in the demo's environment: --broker wins over it."""
    url = re.sub(r"/\d+$", "/7", REDIS_URL)
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        out = subprocess.run(
            [str(BIN / "sfox-tokens"), "demo", "--broker", url, "--users", "4"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        queue = re.search(r"private queue (sfox-demo-\w+)", out.stdout)
        assert queue, out.stdout
        keys = {key.decode(): client.pttl(key) for key in client.scan_iter()}
        assert any(key.startswith("sfox:mint-run:") for key in keys), keys  # it ran here
        assert not [key for key in keys if key.startswith("_kombu.")], keys
        assert not [key for key in keys if queue.group(1) in key], keys
        assert not [key for key in keys if key.startswith("celery-task-meta-")], keys
        # Every key left expires by itself (-1: no TTL; -2: gone since the scan, as the
        # limiter's pace may be a second after its last slot).
        assert not [key for key, ttl in keys.items() if ttl == -1], keys
    finally:
        client.flushdb()
