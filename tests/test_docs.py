"""The README and the docs say what the code does: every example in them runs.

Every ```python block of ``README.md`` and ``docs/**/*.md`` is an example, of one of
three kinds, told by its ``title="..."`` (the title Material shows above it):

- no title: a script. It runs as its own process, in the docs' world: the suite's Redis,
  a real worker consuming ``sfox`` and ``celery`` (the package's tasks and the partner
  project's), and the sFOX stand-in, which refuses the user ``client_account_2``;
- ``title="myapp/tasks.py"``: a module of the partner project the examples share. It is
  written into that project, imported, and loaded by the worker;
- ``title="conftest.py"`` or ``title="test_*.py"``: a pytest file. A page's pytest files
  run together as a suite of their own.

A block that needs a partner project the suite does not have (a Django project) is
preceded by ``<!-- compile-only: why -->`` and is only compiled. Shell commands of the
console script are checked against its ``--help``, and the README's configuration table
against the settings the package reads.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks._settings import Settings
from tests.workers import ROOT, WorkerProcess

DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
BIN = Path(sys.executable).parent
#: The user every example's stand-in refuses (404 "user not found"), as the README shows.
REFUSED = "client_account_2"
#: Most compile-only examples: each needs a reason, and there should be few.
MAX_COMPILE_ONLY = 3

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)(?P<info>.*)$")
_TITLE = re.compile(r'title="(?P<title>[^"]+)"')
_COMPILE_ONLY = re.compile(r"^<!--\s*compile-only:\s*(?P<why>.*?)\s*-->$")


@dataclass(frozen=True)
class Example:
    """One ```python block of a page."""

    page: Path
    line: int
    code: str
    title: str | None
    compile_only: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        if self.title is None:
            return "script"
        name = Path(self.title).name
        return "pytest" if name == "conftest.py" or name.startswith("test_") else "module"

    @property
    def module(self) -> str:
        """A module example's dotted name (``myapp/tasks.py``: ``myapp.tasks``)."""
        return ".".join(Path(self.title or "").with_suffix("").parts)


def fenced_blocks(page: Path) -> Iterator[tuple[int, str, str, str, str]]:
    """``(line, lang, info, body, line before)`` for every fenced block of ``page``."""
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        opened = _FENCE.match(lines[index])
        if not opened:
            index += 1
            continue
        end = lines.index("```", index + 1)
        before = next((t.strip() for t in reversed(lines[:index]) if t.strip()), "")
        body = "\n".join(lines[index + 1 : end]) + "\n"
        yield index + 1, opened["lang"], opened["info"], body, before
        index = end + 1


def examples() -> list[Example]:
    found = []
    for page in PAGES:
        for line, lang, info, body, before in fenced_blocks(page):
            if lang != "python":
                continue
            title = _TITLE.search(info)
            marker = _COMPILE_ONLY.match(before)
            found.append(
                Example(
                    page,
                    line,
                    body,
                    title["title"] if title else None,
                    marker["why"] if marker else None,
                )
            )
    return found


EXAMPLES = examples()
RUNNABLE = [e for e in EXAMPLES if e.compile_only is None]
SCRIPTS = [e for e in RUNNABLE if e.kind == "script"]
MODULES = [e for e in RUNNABLE if e.kind == "module"]
SUITES = sorted({e.page for e in RUNNABLE if e.kind == "pytest"})


def by_id(items: list[Example]) -> list[object]:
    return [pytest.param(e, id=e.id) for e in items]


# -- what there is ---------------------------------------------------------------------


def test_the_examples_are_found_and_few_are_compile_only():
    """Every kind of example is present; compile-only ones are rare and say why."""
    assert len(SCRIPTS) >= 10 and MODULES and SUITES, [e.id for e in EXAMPLES]
    compile_only = [e for e in EXAMPLES if e.compile_only is not None]
    assert len(compile_only) <= MAX_COMPILE_ONLY, [e.id for e in compile_only]
    assert all(e.compile_only for e in compile_only), "a compile-only marker needs a reason"
    titles = [e.title for e in RUNNABLE if e.kind == "module"]
    assert len(titles) == len(set(titles)), "two examples write the same module"


@pytest.mark.parametrize("example", by_id(EXAMPLES))
def test_every_example_compiles(example: Example):
    """Every ```python block is valid Python, compile-only ones included."""
    compile(example.code, example.id, "exec")


def test_the_readme_is_a_front_door():
    """The README stays short: the rest lives in docs/, CHANGELOG.md and bench/README.md."""
    assert len(README.read_text().splitlines()) <= 250


@pytest.mark.parametrize("page", ["README.md", "CHANGELOG.md", "bench/README.md"])
def test_relative_links_outside_the_site_resolve(page: str):
    """Links in the pages the docs build does not check point at files that exist."""
    path = ROOT / page
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
        if "://" not in target:
            assert (path.parent / target).exists(), f"{page} links to {target}"


# -- the settings table ----------------------------------------------------------------

_READ = re.compile(r'(?:\bget|_env|_json_options)\(\s*"((?:SFOX|CELERY)_[A-Z0-9_]+)"')


def settings_rows() -> dict[str, tuple[str, str]]:
    """The README's configuration table: variable -> (meaning, default)."""
    text = README.read_text()
    table = text.split("[start:settings]", 1)[1].split("[end:settings]", 1)[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([A-Z0-9_]+)`", cells[0])
        defaults = re.findall(r"`([^`]+)`", cells[2])
        for position, name in enumerate(names):
            default = defaults[position] if len(defaults) == len(names) else cells[2]
            rows[name] = (cells[1], default)
    return rows


def test_the_settings_table_is_every_setting_the_package_reads():
    """Each setting the code looks up has a row, and each row is a setting of the code."""
    read = set()
    for source in ("tasks/_settings.py", "tasks/celeryconfig.py"):
        read |= set(_READ.findall((ROOT / source).read_text()))
    rows = settings_rows()
    compose_only = {name for name, (meaning, _) in rows.items() if "compose only" in meaning}
    assert read == set(rows) - compose_only
    compose = (ROOT / "docker-compose.yml").read_text()
    assert all(name in compose for name in compose_only)


#: Rows whose default the package's settings object holds, by attribute.
DEFAULTS = {
    "SFOX_API_URL": "api_url",
    "SFOX_TOKEN_RESULT_TTL": "result_ttl",
    "SFOX_TOKEN_BATCH_SIZE": "batch_size",
    "SFOX_MINT_CONCURRENCY": "mint_concurrency",
    "SFOX_RATE_LIMIT": "rate",
    "SFOX_RATE_LIMIT_PENALTY": "rate_limit_penalty",
    "SFOX_MAX_USER_IDS": "max_user_ids",
    "SFOX_CONNECT_TIMEOUT": "connect_timeout",
    "SFOX_READ_TIMEOUT": "read_timeout",
    "SFOX_RETRY_ATTEMPTS": "retry.attempts",
    "SFOX_RETRY_DEADLINE": "retry.deadline",
    "SFOX_RETRY_WAIT_INITIAL": "retry.wait_initial",
    "SFOX_RETRY_WAIT_MAX": "retry.wait_max",
    "SFOX_RETRY_INPROCESS_WAIT_MAX": "retry.inprocess_wait_max",
    "SFOX_RETRY_AFTER_MAX": "retry.retry_after_max",
    "SFOX_NIGHTLY_CRON": "nightly.cron",
    "SFOX_NIGHTLY_LEASE": "nightly.lease",
    "SFOX_NIGHTLY_RESEND_AFTER": "nightly.resend_after",
    "SFOX_QUEUE": "queue",
    "SFOX_TASK_TURN": "task_turn",
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_the_settings_table_states_the_defaults(name: str):
    """A row's default is the value the package resolves with nothing configured."""
    value: object = Settings.from_conf(None, {})
    for attribute in DEFAULTS[name].split("."):
        value = getattr(value, attribute)
    stated = settings_rows()[name][1]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert float(stated) == float(value), (stated, value)
    else:
        assert stated == str(value), (stated, value)


# -- the console script's commands -----------------------------------------------------

_COMMAND = re.compile(r"(?:^\s*(?:\$\s+)?|`)(sfox-tokens(?: [^`\n#<|]*)?)")


def shown_commands() -> list[tuple[str, str]]:
    """``(where, command)`` for every ``sfox-tokens ...`` the pages show."""
    found = []
    for page in [*PAGES, ROOT / "CHANGELOG.md"]:
        for number, line in enumerate(page.read_text().splitlines(), start=1):
            for command in _COMMAND.findall(line):
                found.append((f"{page.relative_to(ROOT)}:{number}", command.strip()))
    return found


def test_every_command_shown_is_one_the_script_has():
    """Each ``sfox-tokens`` command names a real subcommand and options it accepts."""
    helps: dict[str, str] = {}

    def help_of(*command: str) -> str:
        if command not in helps:
            out = subprocess.run(
                [str(BIN / "sfox-tokens"), *command, "--help"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 0, (command, out.stderr)
            helps[command] = out.stdout
        return helps[command]

    commands = shown_commands()
    assert len(commands) >= 20
    for where, command in commands:
        words = command.split()[1:]
        sub = words[0] if words and not words[0].startswith("-") else None
        if sub is not None:
            assert re.search(rf"^\s+{re.escape(sub)}\s", help_of(), re.M), (where, command)
        text = help_of(*([sub] if sub else []))
        for option in (w.split("=")[0] for w in words if w.startswith("--")):
            assert option in text, (where, command, option)


# -- the examples, run -----------------------------------------------------------------


@pytest.fixture(scope="module")
def partner_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The partner project the examples share: every module example, as a file."""
    project = tmp_path_factory.mktemp("partner")
    for example in MODULES:
        path = project / str(example.title)
        path.parent.mkdir(parents=True, exist_ok=True)
        for package in path.relative_to(project).parents:
            if str(package) != ".":
                (project / package / "__init__.py").touch()
        path.write_text(example.code)
    return project


def docs_env(project: Path) -> dict[str, str]:
    """The suite's environment (Redis, key, stand-in), with the partner project importable."""
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(project), str(ROOT)]),
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "/usr/bin:/bin")]),
    }


@pytest.fixture(scope="module")
def docs_worker(fake_sfox_server, redis_client, partner_project, tmp_path_factory):
    """``celery -A tasks worker -I <the partner project>``, on ``sfox`` and ``celery``."""
    proc = WorkerProcess(
        name="docs",
        log_dir=tmp_path_factory.mktemp("docs-worker"),
        env=docs_env(partner_project),
        include=",".join(e.module for e in MODULES),
        queues="sfox,celery",
        loglevel="INFO",
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def docs_world(fake_sfox, docs_worker, partner_project):
    """The stand-in refuses ``client_account_2``; the worker runs; the project is there."""
    fake_sfox.refuse(REFUSED)
    return partner_project


def run_python(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 240):
    out = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return out, f"exit {out.returncode}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"


@pytest.mark.parametrize("example", by_id(MODULES))
def test_module_example_imports(example: Example, partner_project: Path):
    """A module of the partner project imports cleanly."""
    out, shown = run_python(
        ["-c", f"import {example.module}"], ROOT, docs_env(partner_project), timeout=60
    )
    assert out.returncode == 0, shown


@pytest.mark.parametrize("example", by_id(SCRIPTS))
def test_script_example_runs(example: Example, docs_world: Path, tmp_path: Path, docs_worker):
    """A script example runs to its end, from the repository's root, as a user would."""
    script = tmp_path / "example.py"
    script.write_text(example.code)
    out, shown = run_python([str(script)], ROOT, docs_env(docs_world))
    assert out.returncode == 0, f"{shown}\n--- worker\n{docs_worker.log()[-4000:]}"


@pytest.mark.parametrize("page", [pytest.param(p, id=str(p.relative_to(ROOT))) for p in SUITES])
def test_pytest_examples_pass(page: Path, docs_world: Path, tmp_path: Path):
    """A page's conftest.py and test files pass as a suite of their own."""
    for example in (e for e in RUNNABLE if e.kind == "pytest" and e.page == page):
        (tmp_path / str(example.title)).write_text(example.code)
    out, shown = run_python(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider"],
        tmp_path,
        {
            **docs_env(docs_world),
            "PYTEST_ADDOPTS": "",
        },
    )
    assert out.returncode == 0, shown
