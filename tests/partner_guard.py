"""A guard against default brokers, for the processes of a partner's app under test.

A partner's app configures its own broker. A connection to a broker it never
configured (Redis on ``localhost:6379``, Celery's default ``amqp://localhost:5672``)
means that something sent through another app than the partner's: the guard makes
such a connection fail loudly instead of quietly reaching whatever listens there.

This file is written out as ``sitecustomize.py`` into a directory of its own
(:func:`write_sitecustomize`), which goes first on the partner processes'
``PYTHONPATH``: every Python process started with it (a worker and its pool
processes, beat, a ``manage.py`` command, a script) wraps
``socket.socket.connect``, ``connect_ex`` and ``socket.create_connection`` so that
they refuse loopback addresses on the guarded ports. Each refusal raises
:class:`ConnectionRefusedError` and appends a line naming the address and the
process, with a short stack, to the file named by ``SFOX_GUARD_LOG`` (standard
error when unset). The test then asserts that file is empty.

Environment of the guarded processes:

- ``SFOX_GUARD_LOG``: the file refusals are appended to;
- ``SFOX_GUARD_PORTS``: the guarded ports, comma-separated (default ``6379,5672``);
- ``SFOX_GUARD_LOOPBACK_ONLY=1``: refuse every connection off loopback too, so that a
  test never reaches a real service (sFOX) whatever it was configured with.

Imported as ``tests.partner_guard`` it installs nothing: only as ``sitecustomize``.
Standard library only, since it runs inside any venv.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_PORTS",
    "GUARD_LOG_ENV",
    "GUARD_LOOPBACK_ONLY_ENV",
    "GUARD_PORTS_ENV",
    "guard_env",
    "install",
    "read_log",
    "write_sitecustomize",
]

GUARD_LOG_ENV = "SFOX_GUARD_LOG"
GUARD_PORTS_ENV = "SFOX_GUARD_PORTS"
GUARD_LOOPBACK_ONLY_ENV = "SFOX_GUARD_LOOPBACK_ONLY"
#: Redis's default port and AMQP's (Celery's default broker, ``amqp://guest@localhost//``).
DEFAULT_PORTS = (6379, 5672)
#: Set on the ``socket`` module once the guard is in place, for a process to check.
INSTALLED_FLAG = "_sfox_partner_guard"

_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", ""})


def write_sitecustomize(directory: Path) -> Path:
    """Write this module as ``sitecustomize.py`` into ``directory``; return ``directory``.

    Put ``directory`` first on the guarded processes' ``PYTHONPATH``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(Path(__file__).read_text())
    return directory


def guard_env(
    directory: Path,
    log: Path,
    *,
    ports: tuple[int, ...] = DEFAULT_PORTS,
    loopback_only: bool = True,
) -> dict[str, str]:
    """The environment entries that put the guard of ``directory`` in a process."""
    return {
        "PYTHONPATH": str(directory),
        GUARD_LOG_ENV: str(log),
        GUARD_PORTS_ENV: ",".join(str(p) for p in ports),
        GUARD_LOOPBACK_ONLY_ENV: "1" if loopback_only else "0",
    }


def read_log(log: Path) -> str:
    """What the guard refused so far ("" when nothing)."""
    try:
        return log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# -- the guard itself -------------------------------------------------------------------------


def _ports() -> frozenset[int]:
    text = os.environ.get(GUARD_PORTS_ENV, "").strip()
    if not text:
        return frozenset(DEFAULT_PORTS)
    return frozenset(int(p) for p in text.split(",") if p.strip())


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").split("%", 1)[0]
    if host.lower() in _LOCAL_NAMES:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return _resolves_to_loopback(host)
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    return address.is_loopback or address.is_unspecified


def _resolves_to_loopback(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return any(_is_loopback(str(info[4][0])) for info in infos if info[4])


def _refusal(address: Any, ports: frozenset[int], loopback_only: bool) -> str | None:
    """Why ``address`` is refused, or None when it may be reached."""
    if not isinstance(address, tuple) or len(address) < 2:
        return None  # AF_UNIX paths and the like
    host, port = address[0], address[1]
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    if port in ports and _is_loopback(host):
        return f"a default broker port on loopback ({host}:{port})"
    if loopback_only and not _is_loopback(host):
        return f"an address off loopback ({host}:{port})"
    return None


def _report(address: Any, reason: str) -> None:
    stack = "".join(traceback.format_stack(limit=40)[:-2])
    line = (
        f"{time.strftime('%H:%M:%S')} pid={os.getpid()} refused a connection to {reason}; "
        f"argv={sys.argv!r}\n{stack}\n"
    )
    path = os.environ.get(GUARD_LOG_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as log:
            log.write(line)
    else:
        sys.stderr.write("sfox partner guard: " + line)


def install() -> None:
    """Wrap ``socket`` so that every connection the guard forbids fails loudly."""
    if getattr(socket, INSTALLED_FLAG, False):
        return
    ports = _ports()
    loopback_only = os.environ.get(GUARD_LOOPBACK_ONLY_ENV, "") == "1"
    original_connect = socket.socket.connect
    original_connect_ex = socket.socket.connect_ex
    original_create_connection = socket.create_connection

    def check(address: Any) -> None:
        reason = _refusal(address, ports, loopback_only)
        if reason is not None:
            _report(address, reason)
            raise ConnectionRefusedError(f"sfox partner guard: refused {reason}")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        return original_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return original_connect_ex(self, address)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        check(address)
        return original_create_connection(address, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.create_connection = create_connection  # type: ignore[assignment]
    setattr(socket, INSTALLED_FLAG, True)


if __name__ == "sitecustomize":
    install()
