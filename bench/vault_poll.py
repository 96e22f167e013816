"""What one Vault version poll costs: the agent's bounded GET vs hvac's high-level call.

Issue 11 replaced the poll's hand-built GET (which reached into hvac's adapter internals) by
hvac's public API: a ``RawAdapter`` made from the client's adapter
(``hvac.adapters.Adapter.from_adapter``) that shares its session, asked to stream, the body read
up to 1 MiB (:meth:`agent.stores.vault.connection.VaultConnection.get`). This bench measures,
in one run against one OpenBao dev server, N polls of a KV v2 secret's metadata each way:

- ``VaultConnection.get`` inside ``call``: what the agent's poll does (bounded, streamed);
- ``client.secrets.kv.v2.read_secret_metadata`` through ``VaultConnection.call``: hvac's own
  high-level call (JSON adapter, whole body read), the baseline.

Rounds alternate the two (ABAB...) so that the machine's drift falls on both; it reports the
median and p90 microseconds per poll and the ratio to the baseline. Never asserted: the numbers
of a shared machine are noisy (bench/README.md).

    .venv/bin/python bench/vault_poll.py [--polls 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.stores.vault.connection import VaultConnection  # noqa: E402
from agent.stores.vault.settings import VaultAuth  # noqa: E402
from tests.servers import bao_server  # noqa: E402

PATH = "bench/poll"


def timed(poll: Callable[[], Any], polls: int) -> list[float]:
    """Microseconds of each of ``polls`` calls."""
    out = []
    for _ in range(polls):
        started = time.perf_counter_ns()
        poll()
        out.append((time.perf_counter_ns() - started) / 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=2000, help="polls per way and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="dvs-bench-vault-") as tmp,
        bao_server(Path(tmp)) as bao,
    ):
        root = bao.client()
        root.secrets.kv.v2.create_or_update_secret(
            path=PATH, secret={"client_id": "dvs", "client_secret": "s"}, mount_point="secret"
        )
        token_file = Path(tmp) / "token"
        token_file.write_text(bao.root_token)
        auth = VaultAuth(address=bao.address, auth_method="token", token_file=str(token_file))
        connection = VaultConnection(auth, environ={})
        ways: dict[str, Callable[[], Any]] = {
            "VaultConnection.get (the poll)": lambda: connection.call(
                lambda client: connection.get(f"secret/metadata/{PATH}"), what="poll"
            ),
            "hvac read_secret_metadata (baseline)": lambda: connection.call(
                lambda client: client.secrets.kv.v2.read_secret_metadata(
                    path=PATH, mount_point="secret"
                ),
                what="read metadata",
            ),
        }
        for poll in ways.values():  # warm up: login, connection pool, imports
            timed(poll, 50)
        samples: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, poll in ways.items():
                samples[name] += timed(poll, args.polls)
        connection.close()
    baseline = statistics.median(samples["hvac read_secret_metadata (baseline)"])
    print(f"{args.rounds} rounds x {args.polls} polls per way, OpenBao dev server on loopback\n")
    print("| poll | median µs | p90 µs | vs baseline |")
    print("|---|---|---|---|")
    for name, values in samples.items():
        median = statistics.median(values)
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"| {name} | {median:.0f} | {p90:.0f} | {median / baseline:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
