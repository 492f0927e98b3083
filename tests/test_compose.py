"""docker-compose.yml: valid, shaped as operations need, and every service's command really starts.

There is no Docker engine here. So the file (and docker-compose.rabbitmq.yml over it) is
validated by Debian's ``docker-compose`` (``config -q``) and read structurally: each
service gets only the secrets it needs, an empty key or RabbitMQ password is refused, every
image names an exact version. Then each service's own command runs natively,
with the environment its container would get from ``.env.dev`` (the no-real-key dev
profile), against local Redis. The only substitutions are the ones a container network
makes unnecessary: host names become 127.0.0.1, Redis becomes the tests' database,
ports become free ones, and the worker gets a node name and a queue of its own.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis
import yaml

from tasks import mint_user_tokens
from tasks._settings import Settings
from tests.composefile import (
    RABBITMQ_FILE,
    ROOT,
    Service,
    dockerfile_env,
    interpolate,
    load_compose,
    read_env_file,
    resolve,
)
from tests.conftest import REDIS_URL
from tests.services import ServiceProcess, answers, free_port, http_get, run_text

DEV_ENV = ROOT / ".env.dev"
EXAMPLE_ENV = ROOT / ".env.example"
#: Services built from the project's Dockerfile.
PROJECT_SERVICES = ("worker", "beat", "flower", "fake-sfox")
#: The override file's arguments: RabbitMQ as the stack's broker.
WITH_RABBITMQ = ["-f", "docker-compose.yml", "-f", "docker-compose.rabbitmq.yml"]
#: Made-up values, distinct, so where each one lands can be told.
FAKE_KEY = "not-a-real-key-4f1c"
FAKE_RABBITMQ_PASSWORD = "notarealpassword7d2e"
#: Services that run Celery against the broker.
CELERY_SERVICES = ("worker", "beat", "flower")
DOCKER_COMPOSE = shutil.which("docker-compose")
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def compose():
    """docker-compose.yml as data."""
    return load_compose()


@pytest.fixture(scope="module")
def compose_rabbitmq():
    """docker-compose.yml with docker-compose.rabbitmq.yml over it, as data."""
    return load_compose(ROOT / "docker-compose.yml", RABBITMQ_FILE)


def filled_in(text: str, **values: str) -> str:
    """.env.example's text with ``NAME=`` (or ``# NAME=``) lines set to ``values``."""
    for name, value in values.items():
        text, count = re.subn(
            rf"^(?:# )?{name}=.*$", f"{name}={value}", text, count=1, flags=re.MULTILINE
        )
        assert count == 1, name
    return text


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the compose project with .env made from .env.example, as an operator would."""
    directory = tmp_path_factory.mktemp("compose-project")
    for name in ("docker-compose.yml", "docker-compose.rabbitmq.yml", "Dockerfile", ".env.dev"):
        shutil.copy(ROOT / name, directory / name)
    example = EXAMPLE_ENV.read_text()
    # .env.example as shipped, nothing filled in: Compose refuses it.
    (directory / ".env.unfilled").write_text(example)
    (directory / ".env").write_text(
        filled_in(example, SFOX_ENTERPRISE_API_KEY=FAKE_KEY, FLOWER_BASIC_AUTH="ops:not-real")
    )
    # The RabbitMQ variant: its password filled in too.
    (directory / ".env.rabbitmq").write_text(
        filled_in(
            example,
            SFOX_ENTERPRISE_API_KEY=FAKE_KEY,
            FLOWER_BASIC_AUTH="ops:not-real",
            RABBITMQ_PASSWORD=FAKE_RABBITMQ_PASSWORD,
        )
    )
    return directory


# -- the file, as Compose reads it ---------------------------------------------------------

needs_docker_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose is not installed (`apt-get install docker-compose`; .ci/run does it)",
)
VARIANTS = {
    "production": ([], ".env"),
    "dev": (["--env-file", ".env.dev", "--profile", "dev"], ".env.dev"),
    "rabbitmq": (["--env-file", ".env.rabbitmq", *WITH_RABBITMQ], ".env.rabbitmq"),
}


def docker_compose(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run docker-compose in ``project`` with no variable from the test's own environment."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(project)}
    return run_text([str(DOCKER_COMPOSE), *args], cwd=project, env=env)


@needs_docker_compose
@pytest.mark.parametrize("variant", VARIANTS)
def test_docker_compose_accepts_the_file(project, variant):
    """`docker-compose config -q` accepts the file: .env made from .env.example, and .env.dev."""
    args, _ = VARIANTS[variant]
    out = docker_compose(project, *args, "config", "-q")
    assert out.returncode == 0, out.stderr


@needs_docker_compose
@pytest.mark.parametrize("variant", VARIANTS)
def test_our_reading_matches_docker_compose(compose, compose_rabbitmq, project, variant):
    """The commands and environments run natively below are exactly what docker-compose resolves."""
    args, env_file = VARIANTS[variant]
    out = docker_compose(project, *args, "config")
    assert out.returncode == 0, out.stderr
    theirs = yaml.safe_load(out.stdout)["services"]
    ours = resolve(
        compose_rabbitmq if variant == "rabbitmq" else compose, project / env_file, project
    )
    assert set(theirs) == set(ours)

    def unescape(value):
        return str(value).replace("$$", "$")

    for name, service in ours.items():
        spec = theirs[name]
        assert [unescape(a) for a in spec.get("command", [])] == service.command, name
        env = {k: unescape("" if v is None else v) for k, v in spec.get("environment", {}).items()}
        assert env == service.environment, name
        assert [unescape(a) for a in spec["healthcheck"]["test"]] == service.healthcheck, name
        assert "env_file" not in spec, name


@needs_docker_compose
def test_an_empty_key_is_refused(project):
    """.env.example as shipped (no key): `config` fails, naming the setting and where to set it."""
    out = docker_compose(project, "--env-file", ".env.unfilled", "config", "-q")
    assert out.returncode != 0
    assert "set SFOX_ENTERPRISE_API_KEY in .env" in out.stderr, out.stderr
    assert "--env-file .env.dev" in out.stderr  # the way to a stack with no real key
    # Our reading refuses it the same way.
    with pytest.raises(ValueError, match="SFOX_ENTERPRISE_API_KEY"):
        resolve(load_compose(), project / ".env.unfilled", project)


@needs_docker_compose
@pytest.mark.parametrize("password", ["", None])
def test_an_empty_rabbitmq_password_is_refused(project, password):
    """With docker-compose.rabbitmq.yml, an empty or unset RABBITMQ_PASSWORD fails `config`."""
    text = filled_in(EXAMPLE_ENV.read_text(), SFOX_ENTERPRISE_API_KEY=FAKE_KEY)
    if password is not None:
        text = filled_in(text, RABBITMQ_PASSWORD=password)
    (project / ".env.no-password").write_text(text)
    out = docker_compose(project, "--env-file", ".env.no-password", *WITH_RABBITMQ, "config", "-q")
    assert out.returncode != 0
    assert "set RABBITMQ_PASSWORD in .env" in out.stderr, out.stderr
    # Without the RabbitMQ file the same .env is a valid Redis-brokered stack.
    out = docker_compose(project, "--env-file", ".env.no-password", "config", "-q")
    assert out.returncode == 0, out.stderr


#: Each secret, and the only services whose environment may carry it.
SECRETS = {
    FAKE_KEY: {"worker", "fake-sfox"},
    "ops:not-real": {"flower"},
    # RabbitMQ's own, and the broker URL of every Celery service.
    FAKE_RABBITMQ_PASSWORD: {"rabbitmq", "worker", "beat", "flower"},
}


@pytest.mark.parametrize("variant", ["production", "rabbitmq"])
def test_each_service_gets_only_the_secrets_it_needs(compose, compose_rabbitmq, project, variant):
    """The sFOX key reaches the workers (and the stand-in) only, Flower's password Flower only,
    RabbitMQ's password RabbitMQ and the broker URLs only; no service reads an env file whole."""
    source = compose_rabbitmq if variant == "rabbitmq" else compose
    env_file = project / VARIANTS[variant][1]
    services = resolve(source, env_file, project)
    seal_key = "bm90LWEtcmVhbC1zZWFsLWtleS1ub3QtYS1yZWFsLWs="
    (project / ".env.sealed").write_text(
        filled_in(env_file.read_text(), SFOX_TOKEN_SEAL_KEY=seal_key)
    )
    sealed = resolve(source, project / ".env.sealed", project)
    for name, service in services.items():
        assert "env_file" not in service.raw, name
        values = " ".join(service.environment.values())
        for secret, allowed in SECRETS.items():
            if secret in values:
                assert name in allowed, (name, secret)
        assert (seal_key in " ".join(sealed[name].environment.values())) == (name == "worker")
    worker = services["worker"].environment
    assert worker["SFOX_ENTERPRISE_API_KEY"] == FAKE_KEY
    assert services["flower"].environment["FLOWER_BASIC_AUTH"] == "ops:not-real"
    for name in ("beat", "flower", "redis"):
        assert not any(k.startswith("SFOX_ENTERPRISE") for k in services[name].environment), name
    assert set(services["flower"].environment) == {
        "CELERY_BROKER_URL",
        "CELERY_RESULT_BACKEND",
        "FLOWER_BASIC_AUTH",
        "FLOWER_PORT",
        "FLOWER_UNAUTHENTICATED_API",
    }
    assert set(services["beat"].environment) == {
        "CELERY_BROKER_URL",
        "CELERY_RESULT_BACKEND",
        "SFOX_NIGHTLY_CRON",
        "SFOX_NIGHTLY_ORDERS_FILE",
    }
    if variant == "rabbitmq":
        assert services["rabbitmq"].environment["RABBITMQ_DEFAULT_PASS"] == FAKE_RABBITMQ_PASSWORD


#: An exact version: three numbers, then an optional variant (``7.4.1-alpine``).
EXACT_TAG = re.compile(r"^\d+\.\d+\.\d+(?:-[a-z0-9.-]+)?$")


def test_every_image_names_an_exact_version(compose_rabbitmq):
    """No floating tag (``7-alpine``, ``latest``) for any third-party image, in compose or FROM."""
    images = [spec["image"] for spec in compose_rabbitmq["services"].values() if "image" in spec]
    images += [
        line.split()[1]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("FROM ")
    ]
    third_party = [image for image in images if not image.startswith("sfox-tokens:")]
    assert {image.split(":")[0] for image in third_party} == {"redis", "rabbitmq", "python"}
    for image in third_party:
        _, _, tag = image.partition(":")
        assert EXACT_TAG.match(tag), f"{image}: pin an exact version"


# -- the file's shape ----------------------------------------------------------------------


def test_services_are_the_whole_stack(compose, compose_rabbitmq):
    """redis, worker, beat and flower always run; the stand-in under the dev profile; RabbitMQ
    with docker-compose.rabbitmq.yml."""
    services = compose["services"]
    assert set(services) == {"redis", "worker", "beat", "flower", "fake-sfox"}
    assert services["fake-sfox"]["profiles"] == ["dev"]
    profiled = [name for name, spec in services.items() if "profiles" in spec]
    assert profiled == ["fake-sfox"]
    assert set(compose_rabbitmq["services"]) == {*services, "rabbitmq"}
    assert "profiles" not in compose_rabbitmq["services"]["rabbitmq"]


def test_the_rabbitmq_variant_brokers_every_celery_service(compose_rabbitmq, project):
    """With docker-compose.rabbitmq.yml, worker, beat and flower use RabbitMQ; results in Redis."""
    services = resolve(compose_rabbitmq, project / ".env.rabbitmq", project)
    for name in CELERY_SERVICES:
        env = services[name].environment
        assert env["CELERY_BROKER_URL"] == f"amqp://sfox:{FAKE_RABBITMQ_PASSWORD}@rabbitmq:5672//"
        assert env["CELERY_RESULT_BACKEND"] == "redis://redis:6379/0"
        assert services[name].raw["depends_on"]["rabbitmq"] == {"condition": "service_healthy"}
    assert services["rabbitmq"].environment["RABBITMQ_DEFAULT_USER"] == "sfox"


def test_redis_never_evicts(compose):
    """Redis runs with maxmemory-policy noeviction, as Celery's Redis transport requires."""
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_exactly_one_beat(compose):
    """One service runs beat, unscaled; no worker embeds a second one with -B."""
    services = compose["services"]
    beats = [name for name, spec in services.items() if "beat" in (spec.get("command") or [])]
    assert beats == ["beat"]
    beat = services["beat"]
    assert "scale" not in beat
    assert (beat.get("deploy") or {}).get("replicas", 1) == 1
    worker = services["worker"]["command"]
    assert "worker" in worker and "-B" not in worker and "--beat" not in worker


def test_every_service_restarts_and_reports_health(compose):
    """Each service has a restart policy and a healthcheck."""
    for name, spec in compose["services"].items():
        assert spec.get("restart") in ("unless-stopped", "always", "on-failure"), name
        assert spec.get("healthcheck", {}).get("test"), name


def test_project_services_build_the_image(compose):
    """The project's services build its Dockerfile; none reads an env file whole."""
    for name in PROJECT_SERVICES:
        spec = compose["services"][name]
        assert spec["build"] == ".", name
        assert "env_file" not in spec, name
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies a missing {source}"


def test_celery_services_use_the_stack_redis(compose, project):
    """worker, beat and flower default to the stack's own Redis as broker and result backend."""
    services = resolve(compose, project / ".env", project)
    for name in CELERY_SERVICES:
        env = services[name].environment
        assert env["CELERY_BROKER_URL"] == env["CELERY_RESULT_BACKEND"] == "redis://redis:6379/0"


def test_workers_expose_their_metrics_to_the_stack_only(compose):
    """Every worker serves metrics on a port exposed to the stack's network, never published."""
    worker = compose["services"]["worker"]
    port = worker["environment"]["SFOX_METRICS_PORT"]
    assert Settings.from_conf({"sfox_metrics_port": port}, {}).metrics_port == int(port)
    assert worker["expose"] == [port]
    assert "ports" not in worker
    for name in ("beat", "flower"):
        assert "SFOX_METRICS_PORT" not in compose["services"][name].get("environment", {})


def test_flower_is_never_left_unauthenticated(compose):
    """Flower's credentials come from its environment only; its API stays closed; loopback only."""
    flower = compose["services"]["flower"]
    script = " ".join(flower["command"])
    assert "--basic-auth" not in script  # a password on the command line shows in `ps`
    assert "FLOWER_BASIC_AUTH" in script and "exit 2" in script
    assert flower["environment"]["FLOWER_UNAUTHENTICATED_API"] == "false"
    assert (
        interpolate(flower["environment"]["FLOWER_BASIC_AUTH"], {"FLOWER_BASIC_AUTH": "a:b"})
        == "a:b"
    )
    for mapping in flower["ports"]:
        assert mapping.startswith("127.0.0.1:"), mapping


def test_example_env_holds_no_secret(compose):
    """.env.example targets production, leaves the key and Flower's password empty."""
    example = read_env_file(EXAMPLE_ENV)
    assert example["SFOX_API_URL"] == "https://api.sfox.com"
    assert example["SFOX_ENTERPRISE_API_KEY"] == ""
    assert example["FLOWER_BASIC_AUTH"] == ""
    assert "SFOX_PLAIN_HTTP_HOSTS" not in example


def test_dev_env_points_the_workers_at_the_stand_in(compose):
    """Under .env.dev, the workers talk to fake-sfox with the key the stand-in accepts."""
    services = resolve(compose, DEV_ENV)
    stand_in_key = services["fake-sfox"].environment["SFOX_ENTERPRISE_API_KEY"]
    assert stand_in_key
    env = services["worker"].environment
    assert env["SFOX_API_URL"] == "http://fake-sfox:8900"
    assert env["SFOX_ENTERPRISE_API_KEY"] == stand_in_key
    settings = Settings.from_conf(
        {
            "sfox_api_url": env["SFOX_API_URL"],
            "sfox_plain_http_hosts": env["SFOX_PLAIN_HTTP_HOSTS"],
        },
        {},
    )
    assert settings.api_url == "http://fake-sfox:8900"
    for name in ("beat", "flower"):
        assert "SFOX_ENTERPRISE_API_KEY" not in services[name].environment, name
    assert read_env_file(DEV_ENV)["COMPOSE_PROFILES"] == "dev"


def test_secrets_stay_out_of_git_and_the_image():
    """git ignores .env, not the committed examples; the build context leaves out .env, .venv."""

    def ignored(name):
        return subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT).returncode == 0

    assert ignored(".env")
    assert not ignored(".env.example") and not ignored(".env.dev")
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in dockerignore and ".venv" in dockerignore


def test_readme_documents_every_compose_variable():
    """Every variable .env.example and .env.dev set is in the README."""
    readme = (ROOT / "README.md").read_text()
    names = set(read_env_file(DEV_ENV))
    names |= set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", EXAMPLE_ENV.read_text(), re.MULTILINE))
    assert "SFOX_TOKEN_SEAL_KEY" in names  # commented-out settings count too
    for name in sorted(names):
        assert f"`{name}`" in readme, name


# -- each service's command, natively --------------------------------------------------------


def localize(value: str, ports: dict[str, int], beat_dir: Path) -> str:
    """What a container network resolves, resolved for this host."""
    return (
        value.replace("redis://redis:6379/0", REDIS_URL)
        .replace("fake-sfox:8900", f"127.0.0.1:{ports['fake-sfox']}")
        .replace("127.0.0.1:8900", f"127.0.0.1:{ports['fake-sfox']}")
        .replace("0.0.0.0", "127.0.0.1")
        .replace("/var/lib/sfox-beat", str(beat_dir))
    )


class NativeStack:
    """The dev stack's services, each started from its compose command and environment."""

    def __init__(self, compose, log_dir: Path) -> None:
        self.services = resolve(compose, DEV_ENV)
        self.log_dir = log_dir
        self.beat_dir = log_dir / "beat"
        self.beat_dir.mkdir()
        self.ports = {"fake-sfox": free_port(), "flower": free_port(), "metrics": free_port()}
        self.node = f"compose-{uuid.uuid4().hex[:8]}"
        self.queue = self.node
        self.processes: dict[str, ServiceProcess] = {}

    def environment(self, service: Service) -> dict[str, str]:
        env = {
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(self.log_dir),
            "LANG": "C.UTF-8",
            "HOSTNAME": self.node,
            **dockerfile_env(),
        }
        env.update(
            {k: localize(v, self.ports, self.beat_dir) for k, v in service.environment.items()}
        )
        if service.name == "flower":
            env.update(FLOWER_PORT=str(self.ports["flower"]), FLOWER_ADDRESS="127.0.0.1")
        if "SFOX_METRICS_PORT" in env:
            env["SFOX_METRICS_PORT"] = str(self.ports["metrics"])
        if service.name == "beat":
            # A schedule that cannot come due while the test watches (the nightly entry reads it).
            later = datetime.now(timezone.utc) + timedelta(hours=12)
            env["SFOX_NIGHTLY_CRON"] = f"{later.minute} {later.hour} * * *"
        return env

    def command(self, service: Service) -> list[str]:
        args = [localize(arg, self.ports, self.beat_dir) for arg in service.command]
        if service.name == "fake-sfox":
            args[args.index("--port") + 1] = str(self.ports["fake-sfox"])
        if service.name == "worker":
            # celery@$HOSTNAME is the container's node name; a queue of its own keeps the
            # tests' other workers from taking its tasks.
            args += ["-n", f"celery@{self.node}", "-Q", self.queue]
        return args

    def healthcheck(self, name: str) -> list[str]:
        service = self.services[name]
        kind, *rest = service.healthcheck
        rest = [localize(arg, self.ports, self.beat_dir) for arg in rest]
        return ["sh", "-c", rest[0]] if kind == "CMD-SHELL" else rest

    def start(self, name: str) -> ServiceProcess:
        service = self.services[name]
        process = ServiceProcess(
            name,
            self.command(service),
            self.log_dir,
            env=self.environment(service),
            cwd=self.log_dir,
        )
        self.processes[name] = process.start()
        return process

    def url(self, name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()


@pytest.fixture(scope="module")
def stack(compose, redis_client, tmp_path_factory):
    """fake-sfox, worker, beat and flower from the dev profile, running natively."""
    native = NativeStack(compose, tmp_path_factory.mktemp("native-stack"))
    try:
        fake = native.start("fake-sfox")
        fake.wait_for(lambda: answers(native.url("fake-sfox", "/_fake/health")), 30, "health")
        for name in ("worker", "beat", "flower"):
            native.start(name)
        native.processes["worker"].wait_for(
            lambda: " ready." in native.processes["worker"].log(), 60, "ready"
        )
        native.processes["beat"].wait_for(
            lambda: (
                "beat: Starting..." in native.processes["beat"].log()
                and "maxinterval ->" in native.processes["beat"].log()
            ),
            30,
            "start",
        )
        native.processes["flower"].wait_for(
            lambda: answers(native.url("flower", "/healthcheck")), 30, "HTTP"
        )
        yield native
    finally:
        native.stop()


@pytest.mark.slow
def test_every_service_command_starts(stack):
    """Each service's own command and environment start and keep running against local Redis."""
    time.sleep(1.0)  # a crash just after start-up would show now
    for name, process in stack.processes.items():
        assert process.alive(), f"{name} exited:\n{process.log()}"
    worker_log = stack.processes["worker"].log()
    assert f"celery@{stack.node} ready." in worker_log
    assert "sfox.mint_user_tokens" in worker_log  # the task is registered
    # .env.dev's SFOX_API_URL, the stand-in (here on loopback), is what the worker uses.
    assert f"sFOX at {stack.url('fake-sfox', '')};" in worker_log


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fake-sfox", "worker", "beat", "flower"])
def test_every_healthcheck_passes(stack, name):
    """Each service's compose healthcheck, run natively beside it, reports healthy."""
    service = stack.services[name]
    out = subprocess.run(
        stack.healthcheck(name),
        env=stack.environment(service),
        cwd=stack.log_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_dev_worker_mints_through_the_stand_in(stack):
    """With .env.dev's settings the worker mints from the stand-in: URL and key line up."""
    result = mint_user_tokens.apply_async((["dev-user-1", "dev-user-2"],), queue=stack.queue).get(
        timeout=30
    )
    assert [t["partner_user_id"] for t in result["tokens"]] == ["dev-user-1", "dev-user-2"]
    stats = http_get(stack.url("fake-sfox", "/_fake/stats")).json()
    assert stats["tokens_issued"] == 2
    assert stats["status_counts"] == {"201": 1}


@pytest.mark.slow
def test_dev_worker_serves_its_metrics(stack):
    """The worker's compose environment turns its metrics on: they count the mint above."""
    stack.processes["worker"].wait_for(
        lambda: "serving Prometheus metrics" in stack.processes["worker"].log(), 30, "metrics"
    )
    text = http_get(f"http://127.0.0.1:{stack.ports['metrics']}/metrics").text
    assert "sfox_tokens_minted_total" in text
    assert "dev-user" not in text


@pytest.mark.slow
def test_native_flower_answers_only_with_its_credentials(stack):
    """Flower answers its API with .env.dev's credentials, and 401 without or with wrong ones."""
    user_password = stack.services["flower"].environment["FLOWER_BASIC_AUTH"]
    url = stack.url("flower", "/api/workers")
    assert http_get(url).status == 401
    assert http_get(url, auth="dev:wrong").status == 401
    assert http_get(stack.url("flower", "/"), auth=None).status == 401
    response = http_get(url, auth=user_password)
    assert response.status == 200, response.text
    assert isinstance(response.json(), dict)


@pytest.mark.slow
def test_native_beat_keeps_its_schedule_and_sends_nothing(stack):
    """Beat keeps its schedule file where the volume is mounted and sends no task at start-up."""
    log = stack.processes["beat"].log()
    assert f"db -> {stack.beat_dir}/celerybeat-schedule" in log
    assert list(stack.beat_dir.glob("celerybeat-schedule*"))
    assert "Sending due task" not in log


def test_flower_refuses_to_start_without_credentials(compose, project, tmp_path):
    """With .env from .env.example (no FLOWER_BASIC_AUTH) Flower's command exits 2, saying why."""
    service = resolve(compose, project / ".env", project)["flower"]
    for credentials in ("", "no-colon", ":password"):
        env = {
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
            "HOME": str(tmp_path),
            **service.environment,
            "FLOWER_BASIC_AUTH": credentials,
            "CELERY_BROKER_URL": REDIS_URL,
        }
        out = subprocess.run(
            service.command, env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path
        )
        assert out.returncode == 2, (credentials, out.stderr)
        assert "FLOWER_BASIC_AUTH=user:password" in out.stderr


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_command_runs_with_noeviction(compose, project, tmp_path):
    """The redis service's command starts a Redis with noeviction and append-only persistence."""
    service = resolve(compose, project / ".env", project)["redis"]
    port = free_port()
    args = [*service.command, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    process = ServiceProcess("redis", args, tmp_path, cwd=tmp_path).start()
    try:
        client = redis.Redis(port=port)
        process.wait_for(lambda: answers_redis(client), 15, "PING")
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        _kind, cli, *args = service.healthcheck
        out = subprocess.run(
            [cli, "-p", str(port), *args], capture_output=True, text=True, timeout=10
        )
        assert out.returncode == 0 and "PONG" in out.stdout
    finally:
        process.stop()


def answers_redis(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
