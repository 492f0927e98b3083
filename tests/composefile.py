"""Read docker-compose.yml the way Compose does, so its services can run natively in tests.

Only what this project's compose files use is supported: YAML merge keys, ``${VAR}``,
``${VAR:-default}``, ``${VAR:?message}`` and ``$$`` interpolation, ``env_file`` (one file),
``environment`` as a mapping, and an override file merged over the main one (mappings
merged key by key, anything else replaced, as Compose merges ``environment`` and
``depends_on``). Variables come from one env file (Compose's ``--env-file``), never from the
test process's own environment, so a run is hermetic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
#: The override that makes the stack's RabbitMQ the broker.
RABBITMQ_FILE = ROOT / "docker-compose.rabbitmq.yml"

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_]\w*))"
)


def load_compose(path: Path = COMPOSE_FILE, *overrides: Path) -> dict[str, Any]:
    """The compose file as data, merge keys resolved, not yet interpolated.

    Each of ``overrides`` is merged over it in turn, as ``docker compose -f a -f b`` does.
    """
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    for override in overrides:
        data = merge(data, yaml.safe_load(override.read_text()))
    return data


def merge(base: Any, override: Any) -> Any:
    """``override`` over ``base``: mappings merged key by key, anything else replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return override


def dockerfile_env(path: Path = ROOT / "Dockerfile") -> dict[str, str]:
    """The ``ENV KEY=VALUE ...`` settings of a Dockerfile: part of every container's environment."""
    text = re.sub(r"\\\n", " ", path.read_text())
    values: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for item in line.split()[1:]:
                key, sep, value = item.partition("=")
                if not sep:
                    raise ValueError(f"Dockerfile: use ENV KEY=VALUE, not {line!r}")
                values[key] = value
    return values


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines; blank lines and ``#`` comments skipped, values taken literally."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        key, sep, value = text.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key.strip()):
            raise ValueError(f"{path.name}:{number}: not KEY=VALUE: {line!r}")
        values[key.strip()] = value
    return values


def interpolate(value: Any, variables: dict[str, str]) -> Any:
    """Compose's variable substitution over strings, lists and mappings."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("plain")
        op, arg = match.group("op"), match.group("arg") or ""
        current = variables.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op and op.endswith("-") and unset:
            return arg
        if op and op.endswith("?") and unset:
            raise ValueError(f"required variable {name} is missing: {arg}")
        return current or ""

    return _VAR.sub(substitute, value)


@dataclass
class Service:
    """One service as its container would see it: command, environment, healthcheck."""

    name: str
    command: list[str]
    environment: dict[str, str]
    healthcheck: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


def resolve(
    compose: dict[str, Any], env_file: Path, project_dir: Path = ROOT
) -> dict[str, Service]:
    """Every service, interpolated with ``env_file`` and given its container environment.

    A service's own ``env_file`` is found in ``project_dir``, as Compose does.
    """
    variables = read_env_file(env_file)
    services = {}
    for name, spec in compose["services"].items():
        spec = interpolate(spec, variables)
        environment: dict[str, str] = {}
        if "env_file" in spec:
            environment.update(read_env_file(project_dir / spec["env_file"]))
        environment.update({k: str(v) for k, v in (spec.get("environment") or {}).items()})
        test = (spec.get("healthcheck") or {}).get("test") or []
        services[name] = Service(
            name=name,
            command=[str(arg) for arg in spec.get("command") or []],
            environment=environment,
            healthcheck=[str(arg) for arg in test],
            raw=spec,
        )
    return services
