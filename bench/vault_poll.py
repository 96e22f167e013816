"""What one Vault poll costs the agent: the hand-built GET it had against hvac's public API.

``make bench-vault-poll`` (= ``.venv/bin/python bench/vault_poll.py``). It starts ``bao server
-dev`` on loopback (``tests/servers.py``), writes one KV v2 secret, and polls its metadata the
way the agent does, ``VaultSource.version()`` through a ``VaultConnection`` logged in with a
token, with three implementations of the connection's GET:

- **before**: the hand-built GET that ``agent/vault_client.py`` had (prepared once per path and
  token from hvac's adapter and session, sent straight through the session's HTTP adapter),
  kept here only, for the comparison;
- **now**: ``VaultConnection.get`` (hvac's ``RawAdapter.from_adapter`` on the client's session,
  ``stream=True`` and a bounded read);
- **hvac JSONAdapter** (reference): ``client.adapter.get``, hvac's default path, which reads
  the body whole (unbounded): what plain hvac costs.

The implementations take turns in rounds so that a drift of the machine touches each alike.
It reports the median and p90 wall time of one poll and the agent process's CPU time per poll
(``time.process_time``; the server runs in its own process). Numbers from a shared machine are
noisy: compare rows of one run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from agent.sources.vault import VaultSourceConfig  # noqa: E402
from agent.stores.vault import errors  # noqa: E402
from agent.stores.vault.connection import ERROR_BODY_BYTES, VaultConnection  # noqa: E402
from agent.stores.vault.settings import VaultAuth  # noqa: E402
from agent.stores.vault.source import VaultSource  # noqa: E402
from tests.servers import bao_server  # noqa: E402

PATH = "dvs/bench-poll"


class HandBuiltGet(VaultConnection):
    """The GET as ``agent/vault_client.py`` built it before: a request prepared from hvac's
    adapter internals (``base_uri``, ``session``) once per path and token, sent through the
    session's HTTP adapter. Bench only: the agent no longer reaches into hvac."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prepared: dict[str, tuple[str | None, requests.PreparedRequest]] = {}

    def get(self, path: str) -> dict[str, Any]:
        with self._lock:
            client = self._client
            cached = self._prepared.get(path)
            if cached is not None and cached[0] == self._token:
                prepared = cached[1]
            else:
                headers = {"X-Vault-Request": "true", "X-Vault-Token": self._token or ""}
                if self._auth.config.namespace:
                    headers["X-Vault-Namespace"] = self._auth.config.namespace
                url = f"{client.adapter.base_uri}/v1/{path}"
                request = requests.Request("GET", url, headers=headers)
                prepared = client.session.prepare_request(request)
                self._prepared[path] = (self._token, prepared)
            session = client.session
            response = session.get_adapter(prepared.url).send(
                prepared,
                stream=True,
                timeout=self._auth.timeout,
                verify=session.verify,
                cert=session.cert,
                proxies=session.proxies,
            )
            try:
                if response.is_redirect:
                    response.close()
                    body = client.adapter.get(f"/v1/{path}")
                elif response.status_code == 200:
                    body = self._parse(path, response)
                else:
                    data = response.raw.read(ERROR_BODY_BYTES, decode_content=True)
                    errors.raise_for_status(prepared.url, response, data)
            finally:
                response.close()
            return body if isinstance(body, dict) else {}


class JsonAdapterGet(VaultConnection):
    """hvac's default: the client's JSONAdapter, which reads the whole body (reference)."""

    def get(self, path: str) -> dict[str, Any]:
        with self._lock:
            body = self._client.adapter.get(f"/v1/{path}")
            return body if isinstance(body, dict) else {}


IMPLEMENTATIONS: dict[str, type[VaultConnection]] = {
    "before: hand-built GET (hvac adapter internals)": HandBuiltGet,
    "now: hvac RawAdapter.get, stream + bounded read": VaultConnection,
    "reference: hvac JSONAdapter.get (unbounded)": JsonAdapterGet,
}


def poller(kind: type[VaultConnection], address: str, token: str) -> VaultSource:
    auth = VaultAuth(address=address, config=VaultSourceConfig(auth_method="token"), timeout=5)
    connection = kind(auth, environ={"VAULT_TOKEN": token})
    return VaultSource(connection, VaultSourceConfig(path=PATH))


def measure(
    polls: dict[str, Callable[[], str]], count: int, rounds: int
) -> dict[str, tuple[list[float], float]]:
    """Per implementation: each poll's wall time (µs) and the CPU time (µs) per poll."""
    walls: dict[str, list[float]] = {name: [] for name in polls}
    cpu: dict[str, float] = dict.fromkeys(polls, 0.0)
    per_round = max(count // rounds, 1)
    for _ in range(rounds):
        for name, poll in polls.items():
            cpu_start = time.process_time_ns()
            for _ in range(per_round):
                start = time.perf_counter_ns()
                poll()
                walls[name].append((time.perf_counter_ns() - start) / 1000)
            cpu[name] += (time.process_time_ns() - cpu_start) / 1000
    return {name: (walls[name], cpu[name] / len(walls[name])) for name in polls}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=3000, help="polls per implementation")
    parser.add_argument("--rounds", type=int, default=15, help="turns the polls are split into")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="dvs-bench-poll-") as work,
        bao_server(Path(work)) as bao,
    ):
        root = bao.client()
        root.secrets.kv.v2.create_or_update_secret(
            path=PATH, secret={"client_id": "dvs", "client_secret": "bench"}, mount_point="secret"
        )
        sources = {
            name: poller(kind, bao.address, bao.root_token)
            for name, kind in IMPLEMENTATIONS.items()
        }
        versions = {name: source.version() for name, source in sources.items()}
        if len(set(versions.values())) != 1:
            raise SystemExit(f"the implementations disagree: {versions}")
        for source in sources.values():  # warm the pools and caches
            for _ in range(100):
                source.version()
        results = measure(
            {name: source.version for name, source in sources.items()}, args.polls, args.rounds
        )
        for source in sources.values():
            source.close()
    print(
        f"{args.polls} polls of KV v2 metadata per implementation, {args.rounds} rounds; "
        f"Python {platform.python_version()}, {platform.machine()}, Linux {platform.release()}"
    )
    print()
    print("| GET of the poll | median µs/poll | p90 µs/poll | CPU µs/poll | vs before (median) |")
    print("|---|---:|---:|---:|---:|")
    before = statistics.median(next(iter(results.values()))[0])
    for name, (walls, cpu) in results.items():
        median = statistics.median(walls)
        p90 = statistics.quantiles(walls, n=10)[-1]
        print(f"| {name} | {median:.0f} | {p90:.0f} | {cpu:.0f} | {median - before:+.0f} µs |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
