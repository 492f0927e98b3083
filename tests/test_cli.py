"""The ``sfox-tokens`` console script, run as an operator would: a real process each time.

Exit codes: 0 all went well, 1 the job ran but something failed, 2 bad usage or
configuration. Errors are one line on stderr.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from tasks import mint_user_tokens
from tasks.cli.check import probe_broker
from tasks.sealing import derive_seal_key
from tests.conftest import ENTERPRISE_KEY, REDIS_URL
from tests.services import ServiceProcess, answers, free_port, http_get, run_text
from tests.workers import ROOT, WorkerProcess

SCRIPT = Path(sys.executable).with_name("sfox-tokens")
COMMANDS = ["mint", "check", "unseal", "demo", "fake-sfox"]


def run(*args: str, stdin: str = "", env: dict[str, str] | None = None, timeout: float = 60):
    """Run the console script with the tests' environment (plus ``env``)."""
    return run_text(
        [str(SCRIPT), *args],
        stdin=stdin,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def dead_redis() -> str:
    """A Redis URL nobody answers."""
    return f"redis://127.0.0.1:{free_port()}/0"


def assert_one_line_error(out, code: int) -> None:
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sfox-tokens"), out.stderr
    assert out.stdout == ""


# -- usage ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command):
    """`--help` works for the script and for each subcommand, exit 0."""
    out = run(*([command] if command else []), "--help")
    assert out.returncode == 0, out.stderr
    assert f"usage: sfox-tokens{' ' + command if command else ''}" in out.stdout


def test_no_command_prints_help_and_exits_2():
    """Without a subcommand the script lists the commands on stderr and exits 2."""
    out = run()
    assert out.returncode == 2
    for command in COMMANDS:
        assert command in out.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["nosuch"],
        ["mint"],
        ["mint", "--bogus", "u1"],
        ["mint", "u1", "--file", "ids.txt"],
        ["mint", "--file", "/nonexistent/ids.txt"],
        ["mint", "--per-task", "0", "u1"],
        ["mint", "--per-task", "many", "u1"],
        ["mint", "--timeout", "-1", "u1"],
        ["mint", "x" * 300],
        ["check", "--timeout", "0"],
        ["unseal", "extra"],
        ["demo", "--users", "1"],
    ],
)
def test_bad_arguments_exit_2_with_one_line(args):
    """Bad usage is refused before anything runs: exit 2, one line on stderr, nothing on stdout."""
    assert_one_line_error(run(*args), 2)


def test_user_id_file_errors_name_the_line(tmp_path):
    """An unusable line in --file is reported with the file's name and line number."""
    ids = tmp_path / "ids.txt"
    ids.write_text("# users\nu1\n\n" + "y" * 300 + "\n")
    out = run("mint", "--file", str(ids))
    assert_one_line_error(out, 2)
    assert "ids.txt:4:" in out.stderr


def test_missing_key_is_a_configuration_error():
    """Minting in-process without an enterprise key exits 2, naming the variable."""
    out = run("mint", "--local", "u1", env={"SFOX_ENTERPRISE_API_KEY": ""})
    assert_one_line_error(out, 2)
    assert "SFOX_ENTERPRISE_API_KEY" in out.stderr


# -- mint ----------------------------------------------------------------------------


def test_mint_on_the_workers_shows_a_masked_table(worker, fake_sfox):
    """A mint through the workers lists every user with expiry and outcome; tokens are masked."""
    fake_sfox.refuse("cli-ghost", status=404, message="user not found")
    out = run("mint", "cli-u1", "cli-ghost", "cli-u2")
    assert out.returncode == 1, out.stderr  # one user got no token
    rows = [line.split() for line in out.stdout.splitlines()]
    assert rows[0] == ["user", "expires", "outcome", "token"]
    assert [r[0] for r in rows[2:5]] == ["cli-u1", "cli-ghost", "cli-u2"]
    assert rows[2][2] == "minted" and rows[2][3].startswith("••••")
    assert "refused (404: user not found)" in out.stdout
    assert "2 minted, 1 not, of 3 users; 1 task on the workers" in out.stdout
    issued = list(fake_sfox.issued_tokens)
    assert len(issued) == 2
    for token in [*issued, ENTERPRISE_KEY]:
        assert token not in out.stdout + out.stderr


def test_mint_reveal_prints_the_plaintext_tokens(worker, fake_sfox):
    """With --reveal each minted user's plaintext token is printed; exit 0 when all got one."""
    out = run("mint", "--reveal", "cli-r1", "cli-r2")
    assert out.returncode == 0, out.stderr
    issued = {user: token for token, (user, _) in fake_sfox.issued_tokens.items()}
    for user in ("cli-r1", "cli-r2"):
        row = next(line for line in out.stdout.splitlines() if line.startswith(user))
        assert row.split()[-1] == issued[user]
    assert "do not store them" in out.stderr


def test_reveal_without_the_seal_key_mints_nothing(fake_sfox):
    """--reveal on a host that cannot open tokens is refused before a single token is minted."""
    out = run("mint", "--reveal", "cli-n1", env={"SFOX_ENTERPRISE_API_KEY": ""})
    assert_one_line_error(out, 2)
    assert "SFOX_TOKEN_SEAL_KEY" in out.stderr
    assert fake_sfox.count() == 0


def test_long_list_is_split_into_tasks_with_progress(worker, fake_sfox, tmp_path):
    """A list over --per-task goes out as several mint tasks; --progress draws a bar on stderr."""
    ids = tmp_path / "ids.csv"
    ids.write_text("user_id,note\n" + "".join(f"cli-s{i},x\n" for i in range(25)))
    out = run("mint", "--file", str(ids), "--per-task", "10", "--progress")
    assert out.returncode == 0, out.stderr
    assert "25 minted, 0 not, of 25 users; 3 tasks on the workers" in out.stdout
    assert "minting [" in out.stderr and "25/25 users" in out.stderr
    assert len(fake_sfox.issued_tokens) == 25


def test_mint_local_needs_no_broker(fake_sfox, redis_client):
    """--local mints in the process itself: no worker, and a broker that does not even answer."""
    out = run(
        "mint",
        "--local",
        "cli-l1",
        "cli-l2",
        env={"CELERY_BROKER_URL": dead_redis(), "SFOX_LIMITER_URL": REDIS_URL},
    )
    assert out.returncode == 0, out.stderr
    assert "2 minted, 0 not, of 2 users; in this process" in out.stdout
    assert fake_sfox.count("/v1/enterprise/user-tokens") == 1


def test_mint_with_a_dead_broker_exits_1_in_one_line():
    """When the broker does not answer, mint says so in one line and exits 1."""
    url = dead_redis()
    out = run("mint", "u1", env={"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url})
    assert_one_line_error(out, 1)
    assert f"the broker {url} does not answer" in out.stderr


@pytest.fixture
def lonely_redis(tmp_path):
    """A Redis of this test's own, on which no worker listens."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    process = ServiceProcess("redis", args, tmp_path, cwd=tmp_path).start()
    url = f"redis://127.0.0.1:{port}/0"
    process.wait_for(lambda: probe_broker(url, 1) is None, 15, "PING")
    yield url
    process.stop()


def test_mint_with_no_worker_exits_1_in_one_line(lonely_redis):
    """When no worker answers a ping, mint says how to start one instead of waiting forever."""
    out = run("mint", "u1", env={"CELERY_BROKER_URL": lonely_redis})
    assert_one_line_error(out, 1)
    assert "no worker answered" in out.stderr and "--local" in out.stderr


# -- unseal --------------------------------------------------------------------------


def test_unseal_reads_sealed_tokens_on_stdin(worker, fake_sfox):
    """Sealed tokens piped in, one a line, come out as the plaintext sFOX issued, in order."""
    result = mint_user_tokens.delay(["cli-x1", "cli-x2"]).get(timeout=30)
    sealed = [entry["token"] for entry in result["tokens"]]
    out = run("unseal", stdin="\n".join(sealed) + "\n")
    assert out.returncode == 0, out.stderr
    issued = {user: token for token, (user, _) in fake_sfox.issued_tokens.items()}
    assert out.stdout.splitlines() == [issued["cli-x1"], issued["cli-x2"]]


@pytest.mark.parametrize(("stdin", "code"), [("not-a-sealed-token\n", 1), ("", 2), ("\n  \n", 2)])
def test_unseal_refuses_bad_input_in_one_line(stdin, code):
    """A token that does not open exits 1, empty stdin exits 2; nothing reaches stdout."""
    assert_one_line_error(run("unseal", stdin=stdin), code)


def test_unseal_with_the_wrong_key_prints_nothing(worker, fake_sfox):
    """A token sealed under another key is refused, saying which setting to check."""
    sealed = mint_user_tokens.delay(["cli-k1"]).get(timeout=30)["tokens"][0]["token"]
    out = run("unseal", stdin=sealed, env={"SFOX_TOKEN_SEAL_KEY": derive_seal_key("other")})
    assert_one_line_error(out, 1)
    assert "SFOX_TOKEN_SEAL_KEY" in out.stderr


# -- check ---------------------------------------------------------------------------


def check_lines(out) -> dict[str, str]:
    """The check's verdicts: name -> status."""
    verdicts = {}
    for line in out.stdout.splitlines():
        parts = line.split(None, 1)
        if parts and parts[0] in ("ok", "FAIL", "skip"):
            name = line[6:16].strip()
            verdicts[name] = parts[0]
    return verdicts


def test_check_against_the_stand_in_passes_without_sending_the_key(fake_sfox, redis_client):
    """Every check passes against local Redis and the stand-in; sFOX gets one keyless HEAD."""
    out = run("check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert check_lines(out) == {
        name: "ok"
        for name in ("settings", "broker", "backend", "api key", "sFOX", "seal key", "rate limit")
    }
    assert "all 7 checks passed" in out.stdout
    (request,) = fake_sfox.requests_log
    assert (request.method, request.path, request.auth) == ("HEAD", "/", "none")
    assert not fake_sfox.issued_tokens
    for secret in (ENTERPRISE_KEY, derive_seal_key(ENTERPRISE_KEY)):
        assert secret not in out.stdout + out.stderr


def test_check_against_a_dead_broker_fails(fake_sfox):
    """A broker, backend and limiter that do not answer each FAIL; the rest still report; exit 1."""
    url = dead_redis()
    out = run(
        "check",
        "--timeout",
        "2",
        env={"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url, "SFOX_LIMITER_URL": url},
    )
    assert out.returncode == 1
    verdicts = check_lines(out)
    assert verdicts["broker"] == verdicts["backend"] == verdicts["rate limit"] == "FAIL"
    assert verdicts["api key"] == verdicts["sFOX"] == verdicts["seal key"] == "ok"
    assert f"{url} does not answer" in out.stdout
    assert "4 of 7 checks passed" in out.stdout


def test_check_names_each_bad_setting(fake_sfox, redis_client):
    """A bad rate, a bad seal key and no enterprise key each FAIL with what to fix."""
    out = run(
        "check",
        env={
            "SFOX_RATE_LIMIT": "fast",
            "SFOX_TOKEN_SEAL_KEY": "not-a-fernet-key",
            "SFOX_ENTERPRISE_API_KEY": "",
        },
    )
    assert out.returncode == 1
    verdicts = check_lines(out)
    for name in ("settings", "rate limit", "seal key", "api key"):
        assert verdicts[name] == "FAIL", name
    assert verdicts["broker"] == verdicts["sFOX"] == "ok"
    assert "SFOX_RATE_LIMIT='fast'" in out.stdout
    assert "not a Fernet key" in out.stdout
    assert "not-a-fernet-key" not in out.stdout


def test_check_fails_when_sfox_does_not_answer(redis_client):
    """An sFOX URL where nothing listens is a FAIL for the sFOX check alone."""
    url = f"http://127.0.0.1:{free_port()}"
    out = run("check", "--timeout", "2", env={"SFOX_API_URL": url})
    assert out.returncode == 1
    verdicts = check_lines(out)
    assert verdicts.pop("sFOX") == "FAIL"
    assert set(verdicts.values()) == {"ok"}
    assert f"{url} does not answer" in out.stdout


class _ProbeTarget(BaseHTTPRequestHandler):
    """A server that knows GET only: http.server answers any HEAD with 501."""

    #: Every request: (method, path, headers).
    seen: ClassVar[list[tuple[str, str, dict[str, str]]]] = []

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        if parsed:
            self.seen.append((self.command, self.path, dict(self.headers)))
        return parsed

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _answering(status: int) -> type[_ProbeTarget]:
    class Answering(_ProbeTarget):
        seen: ClassVar[list[tuple[str, str, dict[str, str]]]] = []

        def do_HEAD(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Answering


@pytest.mark.parametrize(
    ("handler", "status", "verdict"),
    [
        (type("NoHead", (_ProbeTarget,), {"seen": []}), 501, "ok"),
        (_answering(404), 404, "ok"),
        (_answering(503), 503, "FAIL"),
    ],
    ids=["no-HEAD-501", "404", "503"],
)
def test_check_reads_any_answer_but_down_as_reachable(redis_client, handler, status, verdict):
    """A server without HEAD (501) or one answering 404 is reachable; 503 is down.

    Either way the check shows the status it got, and the one request it sent
    carries no key and no Authorization header.
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        out = run("check", "--timeout", "5", env={"SFOX_API_URL": url})
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    verdicts = check_lines(out)
    assert verdicts.pop("sFOX") == verdict, out.stdout
    assert set(verdicts.values()) == {"ok"}, out.stdout
    assert out.returncode == (0 if verdict == "ok" else 1)
    (line,) = [line for line in out.stdout.splitlines() if line[6:16].strip() == "sFOX"]
    assert f"HTTP {status} to an unauthenticated HEAD /" in line
    ((method, path, headers),) = handler.seen
    assert (method, path) == ("HEAD", "/")
    assert "authorization" not in {name.lower() for name in headers}
    assert ENTERPRISE_KEY not in repr(headers)


# -- fake-sfox -----------------------------------------------------------------------


def test_fake_sfox_serves_the_stand_in_with_its_switches(tmp_path):
    """`sfox-tokens fake-sfox` serves the stand-in with the options it was given, until SIGTERM."""
    port = free_port()
    process = ServiceProcess(
        "fake-sfox",
        [str(SCRIPT), "fake-sfox", "--port", str(port), "--refuse", "u9", "--fail-every", "3"],
        tmp_path,
        cwd=ROOT,
    ).start()
    try:
        process.wait_for(lambda: answers(f"http://127.0.0.1:{port}/_fake/health"), 20, "health")
        stats = http_get(f"http://127.0.0.1:{port}/_fake/stats").json()
        assert stats["refused"] == ["u9"] and stats["config"]["fail_every"] == 3
    finally:
        assert process.stop() == 0


# -- one-line errors -----------------------------------------------------------------


def stderr_lines(out) -> list[str]:
    lines = out.stderr.strip().splitlines()
    assert all(line.startswith("sfox-tokens: ") for line in lines), out.stderr
    return lines


def test_mint_local_with_sfox_refusing_says_so_once(redis_client):
    """sFOX refusing connections: host and port in one line, once; the retry is announced."""
    port = free_port()
    out = run(
        "mint",
        "--local",
        "cli-x1",
        "cli-x2",
        env={
            "SFOX_API_URL": f"http://127.0.0.1:{port}",
            "SFOX_LIMITER_URL": REDIS_URL,
            "SFOX_RETRY_ATTEMPTS": "3",
        },
    )
    assert out.returncode == 1, out.stderr
    assert out.stdout == ""  # no table of the same error in every row
    first, retrying, last = stderr_lines(out)
    assert "no broker or worker" in first and "SFOX_LIMITER_URL" in first
    assert f"cannot reach sFOX at http://127.0.0.1:{port} (connection refused)" in retrying
    assert "retrying, up to 3 attempts" in retrying
    assert last.startswith(
        f"sfox-tokens: cannot reach sFOX at http://127.0.0.1:{port} (connection refused) "
        "after 3 attempts in "
    )
    assert ENTERPRISE_KEY not in out.stderr


def test_mint_local_names_a_silent_limiter_redis_and_stops_fast():
    """--local names the limiter's Redis (password masked) and gives up in seconds."""
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    out = run("mint", "--local", "cli-y1", env={"SFOX_LIMITER_URL": url}, timeout=30)
    assert out.returncode == 1, out.stderr
    named, failed = stderr_lines(out)
    masked = url.replace("s3cret-pw", "**")
    assert masked in named and "SFOX_LIMITER_URL" in named
    assert f"the rate limiter's Redis at {masked}" in failed
    assert "does not answer within 3 s" in failed and "SFOX_LIMITER_URL=memory://" in failed
    assert "s3cret-pw" not in out.stderr


def test_mint_local_with_a_memory_limiter_needs_no_redis(fake_sfox):
    """SFOX_LIMITER_URL=memory:// mints with this process's own budget, and says so."""
    dead = dead_redis()
    out = run(
        "mint",
        "--local",
        "cli-m1",
        env={"SFOX_LIMITER_URL": "memory://", "CELERY_BROKER_URL": dead},
    )
    assert out.returncode == 0, out.stderr
    assert "SFOX_LIMITER_URL=memory://" in out.stderr
    assert "1 minted, 0 not, of 1 user; in this process" in out.stdout


@pytest.mark.parametrize("variable", ["CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"])
def test_a_broker_url_that_is_no_url_is_one_line_exit_2(variable):
    """`rediss//...` (no colon) is refused before any lookup, naming the setting and source."""
    out = run("mint", "u1", env={variable: "rediss//:s3cret@redis.example:6380/0"})
    assert_one_line_error(out, 2)
    assert f"{variable}='rediss//:**@redis.example:6380/0'" in out.stderr
    assert f"from {variable} in this process's environment" in out.stderr
    assert "expected SCHEME://" in out.stderr and "s3cret" not in out.stderr


def test_check_names_a_broker_url_that_is_no_url(fake_sfox, redis_client):
    out = run("check", env={"CELERY_BROKER_URL": "rediss//redis.example:6380/0"})
    assert out.returncode == 1
    assert check_lines(out)["broker"] == "FAIL"
    assert "CELERY_BROKER_URL='rediss//redis.example:6380/0'" in out.stdout


@pytest.fixture
def keyless_worker(fake_sfox_server, redis_client, tmp_path):
    """A worker of its own queue, started with no enterprise key."""
    proc = WorkerProcess(
        "keyless",
        tmp_path,
        env={"SFOX_ENTERPRISE_API_KEY": "", "SFOX_API_URL": fake_sfox_server.url},
        queues="cli-keyless",
        concurrency=1,
    )
    proc.start()
    yield "cli-keyless"
    proc.stop()


def test_a_key_missing_on_the_workers_is_one_line_exit_2(keyless_worker, fake_sfox):
    """The workers' configuration error is said once, in one line, exit 2."""
    out = run("mint", "--queue", keyless_worker, "--per-task", "2", "k1", "k2", "k3", "k4")
    assert_one_line_error(out, 2)
    assert "the workers cannot mint: no sFOX enterprise API key" in out.stderr
    assert "SFOX_ENTERPRISE_API_KEY" in out.stderr and len(out.stderr) < 200
    assert fake_sfox.count() == 0


def test_a_key_missing_only_here_says_why_tokens_are_sealed(worker, fake_sfox):
    """The workers mint; this host cannot mask them and says so once; exit 0."""
    out = run("mint", "cli-h1", "cli-h2", env={"SFOX_ENTERPRISE_API_KEY": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("(sealed)") == 2
    (line,) = stderr_lines(out)
    assert "no seal key" in line and "SFOX_TOKEN_SEAL_KEY" in line
    assert "SFOX_ENTERPRISE_API_KEY" in line


def test_progress_through_the_workers_moves_per_batch(worker, fake_sfox):
    """A mint of 1,000 users in one task shows progress between 0 and 1,000."""
    fake_sfox.configure(latency=0.3)  # under the tests' 0.5 s read timeout
    ids = [f"cli-p{i}" for i in range(1000)]
    out = run("mint", "--progress", *ids, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "1000 minted, 0 not, of 1000 users; 1 task on the workers" in out.stdout
    shown = {int(m) for m in re.findall(r"(\d+)/1000 users", out.stderr)}
    assert shown & set(range(1, 1000)), out.stderr
    assert 1000 in shown
