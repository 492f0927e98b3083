"""A real ``redis-server`` over TLS with a password, its certificate from a throwaway CA."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.services import ServiceProcess, free_port


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for 127.0.0.1: (ca.pem, server.pem, server.key)."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=sfox-tokens test CA", cwd=directory)  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
             cwd=directory)  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext",
             cwd=directory)  # fmt: skip
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


class TlsRedis:
    """``redis-server`` listening on TLS only, with ``requirepass``, in ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.password = "pw-" + secrets.token_urlsafe(24)
        self.port = free_port()
        self.ca, cert, key = make_certificates(directory)
        args = {
            "--port": "0",
            "--tls-port": str(self.port),
            "--tls-cert-file": str(cert),
            "--tls-key-file": str(key),
            "--tls-ca-cert-file": str(self.ca),
            "--tls-auth-clients": "no",
            "--requirepass": self.password,
            "--bind": "127.0.0.1",
            "--save": "",
            "--appendonly": "no",
            "--dir": str(directory),
        }
        command = [shutil.which("redis-server") or "redis-server"]
        for name, value in args.items():
            command += [name, value]
        self.process = ServiceProcess("redis-tls", command, directory)

    @property
    def url(self) -> str:
        """What an operator puts in CELERY_BROKER_URL for managed Redis."""
        return (
            f"rediss://:{self.password}@127.0.0.1:{self.port}/0"
            f"?ssl_cert_reqs=required&ssl_ca_certs={self.ca}"
        )

    def start(self, timeout: float = 20.0) -> TlsRedis:
        self.process.start()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if not self.process.alive() or time.monotonic() > deadline:
                    self.stop()
                    log = self.process.log()
                    raise RuntimeError(f"TLS redis-server did not answer:\n{log}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        self.process.stop()
