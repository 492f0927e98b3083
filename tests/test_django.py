"""The package inside a partner's Django project, installed from its wheel as a partner meets it.

The project is ``examples/django``: a Celery app configured from Django's settings
(``CELERY_`` namespace) that includes ``sfox_tokens``, PostgreSQL for its data,
django-celery-results for results, django-celery-beat for the schedule. It runs from a
copy outside the repository, with a venv of its own where the package's wheel (not an
editable install) sits beside Django, on a Redis and a database of this module's own.

Every partner process (``manage.py``, the worker and its pool, beat) runs with the
default-broker guard (:mod:`tests.partner_guard`): a connection to loopback port 6379
or 5672, which the partner never configured, or to anything off loopback, fails and is
logged, and each test ends by checking that log is empty.

The venv is new in every run, so nothing of an earlier run or build can leak into it:
uv (the test extra) builds the wheel and fills the venv from its package cache in a
couple of seconds; without uv, pip does it in about fifteen.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tasks.testing import FakeSfox
from tests.conftest import ENTERPRISE_KEY
from tests.partner_guard import guard_env, read_log, write_sitecustomize
from tests.redis_server import PrivateRedis
from tests.services import ServiceProcess, run_text

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "django"
#: What the partner installs beside the package's wheel.
PARTNER_REQUIREMENTS = (
    "django>=5.2,<6",
    "django-celery-results>=2.5",
    "django-celery-beat>=2.7",
    "psycopg[binary]>=3.1",
)
#: Marks the line a partner script prints its findings on.
RESULT = "SFOX-TEST-RESULT "
#: Defined first in every partner script: ``emit(obj)`` prints ``obj`` for the test.
PRELUDE = f"""\
import json as _json
import socket as _socket

def emit(obj):
    print({RESULT!r} + _json.dumps(obj), flush=True)

assert getattr(_socket, "_sfox_partner_guard", False), "the default-broker guard is not in place"
"""

FAN_OUT_USERS = [f"dep-{i:04d}" for i in range(320)]
NIGHTLY_USERS = [f"night-{i:03d}" for i in range(30)]
#: Users with a second order, told apart by ``order_ref``.
NIGHTLY_TWICE = NIGHTLY_USERS[:5]


# -- the wheel and the partner's venv -------------------------------------------------------


def _source_copy(destination: Path) -> Path:
    """The working tree's files (tracked and new, not ignored) copied to ``destination``.

    Building from a copy keeps ``build/`` and stale modules of an earlier build out of the
    wheel, and writes nothing into the repository.
    """
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    for name in filter(None, listing.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


def _clean_env() -> dict[str, str]:
    """This process's environment without what would point a child at the repository."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(name, None)
    return env


def _uv() -> str | None:
    """uv, from the test extra (beside this interpreter) or on PATH."""
    beside = Path(sys.executable).with_name("uv")
    return str(beside) if beside.exists() else shutil.which("uv")


def _step(what: str, argv: list[str], cwd: Path, timeout: float) -> None:
    done = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"


def _build_wheel(source: Path, out: Path) -> Path:
    uv = _uv()
    if uv:
        argv = [uv, "build", "--quiet", "--wheel", "--out-dir", out, source]
    else:
        argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", out, source]
    _step("building the wheel", argv, source.parent, 300)
    (wheel,) = out.glob("*.whl")
    return wheel


def _install_venv(venv: Path, wheel: Path) -> Path:
    """A new venv at ``venv`` with the wheel (not editable) and the partner's requirements.

    With uv, about a second from its package cache; else venv and pip.
    """
    python = venv / "bin" / "python"
    uv = _uv()
    if uv:
        _step(
            "uv venv", [uv, "venv", "--quiet", "--python", sys.executable, venv], venv.parent, 180
        )
        install = [uv, "pip", "install", "--quiet", "--python", python]
    else:
        _step("python -m venv", [sys.executable, "-m", "venv", venv], venv.parent, 180)
        install = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    _step(
        "installing into the partner venv",
        [*install, wheel, *PARTNER_REQUIREMENTS],
        venv.parent,
        600,
    )
    return python


@pytest.fixture(scope="module")
def partner_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a new venv outside the repository: the package's wheel and Django."""
    work = tmp_path_factory.mktemp("django-venv")
    wheel = _build_wheel(_source_copy(work / "src"), work / "dist")
    return _install_venv(work / "venv", wheel)


# -- PostgreSQL and Redis of the module's own -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class Database:
    name: str
    user: str
    password: str


def _as_postgres(argv: list[str]) -> list[str]:
    """``argv`` run as the ``postgres`` superuser: through ``su`` as root, else over TCP."""
    if os.geteuid() == 0 and shutil.which("su"):
        return ["su", "postgres", "-c", shlex.join(argv)]
    return [argv[0], "-h", "127.0.0.1", "-U", "postgres", *argv[1:]]


def _postgres(argv: list[str], *, check: bool = True, timeout: float = 60) -> str:
    done = subprocess.run(
        _as_postgres(argv), cwd="/", capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@pytest.fixture(scope="module")
def partner_db() -> Iterator[Database]:
    """A role and a database of this run's own, dropped at the end whatever happened."""
    ready = subprocess.run(
        ["pg_isready", "-h", "127.0.0.1", "-p", "5432"], capture_output=True, timeout=30
    )
    if ready.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not answering on 127.0.0.1:5432")
        pytest.skip("PostgreSQL is not answering on 127.0.0.1:5432")
    db = Database(
        name=f"sfox_django_{secrets.token_hex(6)}",
        user=f"sfox_django_{secrets.token_hex(6)}",
        password=secrets.token_hex(16),
    )
    try:
        _postgres(
            [
                "psql",
                "-v",
                "ON_ERROR_STOP=1",
                "-qc",
                f"CREATE ROLE {db.user} LOGIN PASSWORD '{db.password}'",
            ]
        )
        _postgres(["createdb", "-O", db.user, db.name])
        yield db
    finally:
        _postgres(["dropdb", "--if-exists", "--force", db.name], check=False)
        _postgres(["dropuser", "--if-exists", db.user], check=False)


class PasswordRedis(PrivateRedis):
    """:class:`PrivateRedis` with a password and no persistence: the partner's broker."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.password = secrets.token_hex(16)
        self._protected = False

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port,
            password=self.password if self._protected else None,
            socket_timeout=5,
            socket_connect_timeout=2,
            # No retries: SHUTDOWN ends the connection, and a retry would wait for nothing.
            retry=Retry(NoBackoff(), 0),
        )

    def start(self, timeout: float = 10.0) -> PasswordRedis:
        super().start(timeout)
        client = self.client()
        client.config_set("appendonly", "no")
        client.config_set("requirepass", self.password)
        self._protected = True
        return self


@pytest.fixture(scope="module")
def partner_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasswordRedis]:
    server = PasswordRedis(tmp_path_factory.mktemp("django-redis"))
    try:
        yield server.start()
    finally:
        server.stop()


# -- the partner's project ------------------------------------------------------------------


@dataclasses.dataclass
class PartnerProject:
    """The copied project, its environment, and every process started for it."""

    python: Path
    directory: Path
    env: dict[str, str]
    guard_log: Path
    orders_file: Path
    db: Database
    redis: PasswordRedis
    fake: FakeSfox
    logs: Path
    processes: list[ServiceProcess] = dataclasses.field(default_factory=list)

    def manage(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return run_text(
            [self.python, "manage.py", *args], cwd=self.directory, env=self.env, timeout=timeout
        )

    def run(self, code: str, *, timeout: float = 120, env: dict[str, str] | None = None) -> Any:
        """Run ``code`` in the project's ``manage.py shell -c``; return what it ``emit``-ted."""
        script = PRELUDE + textwrap.dedent(code)
        done = run_text(
            [self.python, "manage.py", "shell", "-c", script],
            cwd=self.directory,
            env={**self.env, **(env or {})},
            timeout=timeout,
        )
        for line in reversed(done.stdout.splitlines()):
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT) :])
        raise AssertionError(
            f"the partner script exited {done.returncode} without a result\n"
            f"--- stdout ---\n{done.stdout[-3000:]}\n--- stderr ---\n{done.stderr[-6000:]}"
            + self.guard_report()
        )

    def celery(self, name: str, *args: str) -> ServiceProcess:
        """``celery -A partnerproj ARGS`` in the background, stopped with the project."""
        process = ServiceProcess(
            name,
            [str(self.python), "-m", "celery", "-A", "partnerproj", *args],
            self.logs,
            env=self.env,
            cwd=self.directory,
        )
        self.processes.append(process)
        return process.start()

    def sql(self, query: str) -> list[list[str]]:
        """Rows of ``query`` on the project's database, as the project's role."""
        out = run_text(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-U",
                self.db.user,
                "-d",
                self.db.name,
                "-v",
                "ON_ERROR_STOP=1",
                "-AtF",
                "\t",
                "-c",
                query,
            ],
            cwd=self.directory,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PGPASSWORD": self.db.password},
            timeout=30,
        )
        assert out.returncode == 0, f"psql failed: {out.stderr}"
        return [line.split("\t") for line in out.stdout.splitlines()]

    def guard_report(self) -> str:
        """The guard's first refusals, for a failure message ("" when none)."""
        text = read_log(self.guard_log)
        return f"\n--- default-broker guard (first refusals) ---\n{text[:6000]}" if text else ""

    def assert_no_default_broker(self) -> None:
        report = self.guard_report()
        assert not report, "a partner process connected where it was never configured to:" + report


@pytest.fixture(scope="module")
def partner(
    partner_python: Path,
    partner_db: Database,
    partner_redis: PasswordRedis,
    fake_sfox_server: FakeSfox,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PartnerProject]:
    """The project copied outside the repository and migrated, with the guard in place."""
    fake_sfox_server.reset()
    fake_sfox_server.configure(
        latency=0.0, rate_limit=None, rate_window=10.0, rate_penalty=60.0, shuffle=True
    )
    base = tmp_path_factory.mktemp("django-partner")
    directory = base / "project"
    shutil.copytree(
        EXAMPLE, directory, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "celerybeat*")
    )
    guard_log = base / "guard.log"
    guard_log.touch()
    orders_file = base / "orders.csv"
    env = {
        "PATH": f"{partner_python.parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(base),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "partnerproj.settings",
        "DJANGO_SECRET_KEY": secrets.token_urlsafe(40),
        "PARTNER_DB_NAME": partner_db.name,
        "PARTNER_DB_USER": partner_db.user,
        "PARTNER_DB_PASSWORD": partner_db.password,
        "PARTNER_DB_HOST": "127.0.0.1",
        "PARTNER_DB_PORT": "5432",
        "PARTNER_REDIS_URL": partner_redis.url,
        "PARTNER_SFOX_API_URL": fake_sfox_server.url,
        "SFOX_ENTERPRISE_API_KEY": ENTERPRISE_KEY,
        "SFOX_NIGHTLY_ORDERS_FILE": str(orders_file),
        **guard_env(write_sitecustomize(base / "guard"), guard_log),
    }
    project = PartnerProject(
        python=partner_python,
        directory=directory,
        env=env,
        guard_log=guard_log,
        orders_file=orders_file,
        db=partner_db,
        redis=partner_redis,
        fake=fake_sfox_server,
        logs=base,
    )
    try:
        _check_guard(project)
        migrated = project.manage("migrate", "--no-input")
        assert migrated.returncode == 0, (
            f"manage.py migrate failed:\n{migrated.stdout}\n{migrated.stderr}"
            + project.guard_report()
        )
        yield project
    finally:
        for process in reversed(project.processes):
            process.stop()


def _check_guard(project: PartnerProject) -> None:
    """The guard is in every partner process: a default broker and the outside are refused."""
    probe = textwrap.dedent(
        """
        import socket
        refused = []
        for address in [("localhost", 6379), ("127.0.0.1", 5672), ("::1", 6379),
                        ("192.0.2.1", 443)]:
            try:
                socket.create_connection(address, timeout=1).close()
            except ConnectionRefusedError as exc:
                refused.append("sfox partner guard" in str(exc))
        print(refused)
        """
    )
    done = run_text(
        [project.python, "-c", probe], cwd=project.directory, env=project.env, timeout=30
    )
    assert done.stdout.strip() == "[True, True, True, True]", done.stdout + done.stderr
    logged = read_log(project.guard_log)
    for address in ("localhost:6379", "127.0.0.1:5672", "::1:6379", "192.0.2.1:443"):
        assert address in logged, logged
    project.guard_log.write_text("")


@pytest.fixture(scope="module")
def partner_worker(partner: PartnerProject) -> Iterator[ServiceProcess]:
    """``celery -A partnerproj worker -Q celery,sfox``: the project's tasks and sFOX's."""
    worker = partner.celery(
        "worker",
        "worker",
        "-Q",
        "celery,sfox",
        "-l",
        "INFO",
        "-c",
        "2",
        "-n",
        f"partner-{secrets.token_hex(3)}@%h",
        "--without-gossip",
        "--without-mingle",
    )
    try:
        worker.wait_for(lambda: " ready." in worker.log(), 90, "the worker to be ready")
        yield worker
    finally:
        worker.stop()


# -- the scenarios, in order ----------------------------------------------------------------


def test_the_partner_runs_the_installed_wheel_not_the_repository(partner: PartnerProject) -> None:
    """``sfox_tokens`` comes from the venv's site-packages; nothing of the repository shows."""
    seen = partner.run(
        f"""
        import importlib.util, sys
        import sfox_tokens
        emit({{
            "file": sfox_tokens.__file__,
            "celeryconfig": importlib.util.find_spec("celeryconfig") is not None,
            "repo_on_path": [p for p in sys.path if p.startswith({str(ROOT)!r})],
            "editable": [repr(f) for f in sys.meta_path if "editable" in repr(f).lower()],
        }})
        """
    )
    assert "site-packages" in seen["file"] and not seen["file"].startswith(str(ROOT)), seen
    assert seen["repo_on_path"] == [] and seen["editable"] == [], seen
    # The contract: the package puts no top-level celeryconfig module on anyone's path.
    assert not seen["celeryconfig"], "a top-level celeryconfig is importable in the partner venv"
    checked = partner.manage("makemigrations", "--check", "--dry-run")
    assert checked.returncode == 0, f"migrations differ from the models:\n{checked.stdout}"
    partner.assert_no_default_broker()


def test_ping_after_importing_the_package_goes_through_the_partners_app(
    partner: PartnerProject, partner_worker: ServiceProcess
) -> None:
    """Importing ``sfox_tokens`` leaves the project's app current; its own task still runs."""
    seen = partner.run(
        """
        import celery
        from celery import _state
        from payments.tasks import ping
        import sfox_tokens
        emit({
            "current_app": celery.current_app.main,
            "default_app": getattr(_state.default_app, "main", None),
            "ping_app": ping.s().app.main,
            "mint_app": sfox_tokens.mint_user_tokens.app.main,
            "pong": ping.delay().get(timeout=30),
        })
        """
    )
    assert seen["current_app"] == "partnerproj", seen
    assert seen["default_app"] in (None, "partnerproj"), seen
    assert seen["ping_app"] == "partnerproj", seen
    assert seen["mint_app"] == "partnerproj", seen
    assert seen["pong"] == "pong"
    log = partner_worker.log()
    for name in ("payments.ping", "payments.deposit", "sfox.mint_user_tokens"):
        assert name in log, f"{name} is not registered on the partner's worker"
    partner.assert_no_default_broker()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_mint_from_the_django_process(
    partner: PartnerProject, partner_worker: ServiceProcess
) -> None:
    """Two sealed tokens come back; ``unseal`` in the Django process opens the stand-in's."""
    seen = partner.run(
        """
        import hashlib
        import sfox_tokens
        result = sfox_tokens.mint_user_tokens.delay(["u1", "u2"]).get(timeout=60)
        emit({
            "result": result,
            "opened": {
                entry["partner_user_id"]: hashlib.sha256(
                    sfox_tokens.unseal(entry["token"]).encode()
                ).hexdigest()
                for entry in result["tokens"]
            },
        })
        """
    )
    result = seen["result"]
    assert [t["partner_user_id"] for t in result["tokens"]] == ["u1", "u2"], result
    assert result["failed"] == []
    issued = {_digest(token): user for token, (user, _) in partner.fake.issued_tokens.items()}
    for entry in result["tokens"]:
        user = entry["partner_user_id"]
        assert issued.get(seen["opened"][user]) == user, f"{user}'s token is not the stand-in's"
        assert entry["token"] not in partner.fake.issued_tokens  # sealed, not the plaintext
    partner.assert_no_default_broker()


def test_with_user_tokens_reaches_every_user_once(
    partner: PartnerProject, partner_worker: ServiceProcess
) -> None:
    """320 users in chunks of 50 into ``payments.deposit``: one row per user, one run each."""
    seen = partner.run(
        f"""
        import dataclasses, time
        import sfox_tokens
        from payments.tasks import deposit
        users = {FAN_OUT_USERS!r}
        canvas = sfox_tokens.with_user_tokens(users, deposit.s("run-1"), chunk_size=50)
        canvas.apply_async()
        deadline = time.monotonic() + 150
        progress = sfox_tokens.run_progress(canvas.run_id)
        while not progress.finished and time.monotonic() < deadline:
            time.sleep(0.5)
            progress = sfox_tokens.run_progress(canvas.run_id)
        emit({{
            "run_id": canvas.run_id,
            "progress": dataclasses.asdict(progress),
            "finished": progress.finished,
        }})
        """,
        timeout=200,
    )
    assert seen["finished"], f"the run did not finish: {seen}\n{partner_worker.log()[-4000:]}"
    assert seen["progress"]["total"] == len(FAN_OUT_USERS), seen
    rows = partner.sql("SELECT user_id, attempts FROM payments_deposit WHERE run_tag = 'run-1'")
    users = Counter(user for user, _ in rows)
    assert sorted(users) == sorted(FAN_OUT_USERS), (
        f"missing: {sorted(set(FAN_OUT_USERS) - set(users))[:10]}, "
        f"unexpected: {sorted(set(users) - set(FAN_OUT_USERS))[:10]}"
    )
    assert set(users.values()) == {1}
    twice = [user for user, attempts in rows if attempts != "1"]
    assert twice == [], f"the deposit task ran more than once for {twice[:10]}"
    partner.assert_no_default_broker()


def _write_orders(path: Path) -> int:
    """The nightly file: a market buy for every user, a limit sell more for a few."""
    rows = ["user_id,side,currency_pair,algorithm_id,quantity,amount,price,order_ref"]
    rows += [f"{user},buy,btcusd,100,,25,,nightly-btc" for user in NIGHTLY_USERS]
    rows += [f"{user},sell,ethusd,201,0.5,,3100.25,nightly-eth" for user in NIGHTLY_TWICE]
    path.write_text("\n".join(rows) + "\n")
    return len(rows) - 1


def _nightly_results(partner: PartnerProject) -> list[tuple[str, Any]]:
    rows = partner.sql(
        "SELECT status, result FROM django_celery_results_taskresult"
        " WHERE task_name = 'sfox.run_nightly_orders' ORDER BY id"
    )
    results = []
    for status, text in rows:
        try:
            value = json.loads(text) if text else None
        except ValueError:
            value = text
        results.append((status, value))
    return results


def _summaries(partner: PartnerProject, status: str) -> list[dict[str, Any]]:
    return [
        value
        for state, value in _nightly_results(partner)
        if state == "SUCCESS" and isinstance(value, dict) and value.get("status") == status
    ]


def test_nightly_run_fired_by_a_django_celery_beat_row(
    partner: PartnerProject, partner_worker: ServiceProcess
) -> None:
    """A PeriodicTask row and beat's DatabaseScheduler: each order placed once, fired twice."""
    expected = _write_orders(partner.orders_file)
    created = partner.run(
        """
        from django_celery_beat.models import IntervalSchedule, PeriodicTask
        every, _ = IntervalSchedule.objects.get_or_create(
            every=3, period=IntervalSchedule.SECONDS
        )
        task, _ = PeriodicTask.objects.update_or_create(
            name="sfox nightly orders",
            defaults={"task": "sfox.run_nightly_orders", "interval": every, "enabled": True},
        )
        emit({"id": task.id})
        """
    )
    assert created["id"]
    beat = partner.celery(
        "beat",
        "beat",
        "-S",
        "django_celery_beat.schedulers:DatabaseScheduler",
        "-l",
        "INFO",
        "--max-interval",
        "1",
    )
    users = set(NIGHTLY_USERS)

    def ours() -> list[Any]:
        return [order for order in partner.fake.orders if order.user_id in users]

    try:
        beat.wait_for(lambda: len(ours()) >= expected, 120, f"{expected} orders at the stand-in")
        beat.wait_for(
            lambda: _summaries(partner, "done"), 60, "the run's summary in django-celery-results"
        )
        # Beat fires again every 3 s: a second trigger for the date does nothing.
        beat.wait_for(lambda: _summaries(partner, "skipped"), 30, "a second firing, skipped")
    finally:
        beat.stop()
    assert "sfox.run_nightly_orders" in beat.log()
    (summary,) = _summaries(partner, "done")
    assert summary["orders"] == expected and summary["placed"] == expected, summary
    assert summary["users"] == len(NIGHTLY_USERS), summary
    assert summary["failed_orders"] == 0 and summary["skipped_rows"] == [], summary
    placed = Counter(order.client_order_id for order in ours())
    assert len(placed) == expected and set(placed.values()) == {1}, placed
    by_user = Counter(order.user_id for order in ours())
    assert all(by_user[u] == (2 if u in NIGHTLY_TWICE else 1) for u in NIGHTLY_USERS), by_user
    assert partner.fake.duplicate_order_attempts == 0
    statuses = {state for state, _ in _nightly_results(partner)}
    assert "FAILURE" not in statuses, _nightly_results(partner)
    partner.assert_no_default_broker()


def test_eager_mode_mints_in_the_calling_process(partner: PartnerProject) -> None:
    """``CELERY_TASK_ALWAYS_EAGER``: a mint runs in the Django process, on Redis and the key."""
    seen = partner.run(
        """
        import hashlib
        from celery import current_app
        import sfox_tokens
        outcome = sfox_tokens.mint_user_tokens.delay(["e1"])
        result = outcome.get(timeout=60)
        emit({
            "eager": current_app.conf.task_always_eager,
            "type": type(outcome).__name__,
            "result": result,
            "opened": hashlib.sha256(
                sfox_tokens.unseal(result["tokens"][0]["token"]).encode()
            ).hexdigest(),
        })
        """,
        env={"PARTNER_CELERY_EAGER": "1"},
    )
    assert seen["eager"] is True and seen["type"] == "EagerResult", seen
    assert [t["partner_user_id"] for t in seen["result"]["tokens"]] == ["e1"], seen
    issued = {_digest(token): user for token, (user, _) in partner.fake.issued_tokens.items()}
    assert issued.get(seen["opened"]) == "e1"
    partner.assert_no_default_broker()


def _redis_text(client: redis.Redis) -> str:
    """Every key and value, with the base64 bodies of Celery's messages decoded."""
    parts: list[bytes] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        values: list[bytes] = []
        if kind == "string":
            values = [client.get(key) or b""]
        elif kind == "list":
            values = client.lrange(key, 0, -1)
        elif kind == "hash":
            values = [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == "set":
            values = list(client.smembers(key))
        elif kind == "zset":
            values = [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            values = [repr(client.xrange(key)).encode()]
        parts.append(key)
        for value in values:
            parts.append(value)
            parts.extend(_decoded_bodies(value))
    return b"\n".join(parts).decode("utf-8", "replace")


def _decoded_bodies(value: bytes) -> list[bytes]:
    """The decoded bodies of the kombu messages inside ``value`` (JSON), if any."""
    try:
        data = json.loads(value)
    except ValueError:
        return []
    found: list[bytes] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            body = item.get("body")
            encoding = (item.get("properties") or {}).get("body_encoding")
            if isinstance(body, str) and encoding == "base64":
                with contextlib.suppress(ValueError):
                    found.append(base64.b64decode(body))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def test_no_secret_in_the_database_redis_or_logs(
    partner: PartnerProject, partner_worker: ServiceProcess
) -> None:
    """The key, every plaintext token and the passwords are nowhere the partner keeps data."""
    tokens = partner.fake.issued_tokens
    assert len(tokens) >= 2 + len(FAN_OUT_USERS), "the scenarios above minted too few tokens"
    secrets_ = {
        "the enterprise key": ENTERPRISE_KEY,
        "the Redis password": partner.redis.password,
        "the database password": partner.db.password,
    }
    secrets_ |= {f"{user}'s plaintext token": token for token, (user, _) in tokens.items()}
    dump = _postgres(["pg_dump", "--data-only", "--no-owner", partner.db.name], timeout=120)
    assert "run-1" in dump and "dep-0000" in dump  # the dump holds the partner's rows
    places = {
        "the PostgreSQL database": dump,
        "Redis": _redis_text(partner.redis.client()),
        "the worker's log": partner_worker.log(),
    }
    for process in partner.processes:
        places[f"the {process.name}'s log"] = process.log()
    leaks = [
        f"{what} in {where}"
        for where, text in places.items()
        for what, secret in secrets_.items()
        if secret in text
    ]
    assert leaks == [], leaks[:20]
    partner.assert_no_default_broker()
