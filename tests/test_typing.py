"""The public API is typed for users: ``mypy --strict`` with Celery's stubs sees its types.

``tests/typing/api.py`` is written as a user writes it and must pass; ``tests/typing/wrong.py``
holds wrong uses, each of which must be reported (so the check cannot pass vacuously). Both
are checked in a throwaway venv with ``mypy`` and ``celery-types`` and the package installed
from a copy of its sources (never in the project's venv: the package's own ``mypy`` run is
made without Celery's stubs), from outside the repository, so mypy reads the installed
package and its ``py.typed``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sources import copy_sources

HERE = Path(__file__).parent / "typing"
#: What the build reads; everything else in the working tree is left out of the copy.
UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(UV is None, reason="uv is needed to make the typing venv"),
]


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def typing_venv(tmp_path_factory) -> Path:
    """A venv with mypy, celery-types and the package (not editable): its ``bin`` directory."""
    source = copy_sources(tmp_path_factory.mktemp("source"))
    venv = tmp_path_factory.mktemp("typing") / "venv"
    made = run(UV, "venv", "--quiet", "--python", sys.executable, venv)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = run(
        UV, "pip", "install", "--quiet", "--python", python, "mypy", "celery-types", source
    )
    if installed.returncode != 0:
        pytest.skip(f"cannot install mypy and celery-types (offline?): {installed.stderr[-500:]}")
    return venv / "bin"


def mypy_strict(bin_dir: Path, workdir: Path, name: str) -> tuple[int, str]:
    shutil.copy(HERE / name, workdir / name)
    out = run(bin_dir / "mypy", "--strict", "--no-incremental", name, cwd=workdir)
    return out.returncode, out.stdout + out.stderr


def test_api_as_a_user_writes_it_is_typed(typing_venv, tmp_path):
    """``mint_user_tokens.delay([...]).get()`` is a MintResult, ``unseal`` gives ``str``..."""
    code, output = mypy_strict(typing_venv, tmp_path, "api.py")
    assert code == 0, output
    assert "Success: no issues found in 1 source file" in output


def test_wrong_uses_are_reported(typing_venv, tmp_path):
    """Each line of wrong.py marked ``# error`` is an error, and no other line is."""
    code, output = mypy_strict(typing_venv, tmp_path, "wrong.py")
    expected = {
        number
        for number, line in enumerate((HERE / "wrong.py").read_text().splitlines(), 1)
        if "# error" in line
    }
    reported = {int(n) for n in re.findall(r"^wrong\.py:(\d+): error:", output, re.MULTILINE)}
    assert code == 1, output
    assert expected and reported == expected, output
    assert 'expression has type "MintResult", variable has type "int"' in output
