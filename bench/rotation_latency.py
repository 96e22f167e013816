"""Rotation latency: from a write to the credential store to the new token on disk.

For each trigger (Vault KV v2 polling, AWS Secrets Manager polling, an SQS-delivered
EventBridge event with polling off, SIGHUP with polling off) it runs a real agent process
against real servers (OpenBao dev server, moto_server, the project's token server), rotates the
client secret N times and reports the median and max time until the token file holds a token
minted with the new secret.

    .venv/bin/python bench/rotation_latency.py [--rotations 20] [--poll-interval 1]

Numbers depend on the machine; compare them within one run, never against a fixed target.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.devserver import TokenServer  # noqa: E402
from bench import measure  # noqa: E402
from tests.servers import MOTO_ENV, bao_server, moto_server  # noqa: E402

CLIENT_ID = "bench-client"


@dataclass
class Result:
    name: str
    latencies: list[float]

    def row(self) -> str:
        lat = sorted(self.latencies)
        return f"{self.name:<28} {len(lat):>5} {statistics.median(lat):>10.3f} {lat[-1]:>9.3f}"


def _config(workdir: Path, token_url: str, profile: str) -> Path:
    path = workdir / "agent.toml"
    path.write_text(
        f"""
[agent]
log_level = "warning"
log_format = "text"
state_dir = "{workdir}/state"

[health]
listen = ""

[profiles.bench]
token_url = "{token_url}"
{profile}

[[profiles.bench.sinks]]
type = "file"
path = "{workdir}/token"
"""
    )
    return path


@contextmanager
def _agent(config: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    log = open(config.parent / "agent.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "-c", str(config)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        yield proc
    finally:
        measure.stop_process(proc)
        log.close()


def _measure(
    name: str,
    server: TokenServer,
    token_path: Path,
    rotations: int,
    rotate: Callable[[str], None],
) -> Result:
    def minted_with(secret: str) -> bool:
        try:
            token = token_path.read_text()
        except FileNotFoundError:
            return False
        issued = server.issued().get(token)
        return issued is not None and issued.client_secret == secret

    deadline = time.monotonic() + 60
    while not minted_with("secret-0"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: no first token within 60 s")
        time.sleep(0.01)
    latencies = []
    pauses = measure.spread_pauses(rotations)
    for i in range(1, rotations + 1):
        secret = f"secret-{i}"
        server.set_secret(CLIENT_ID, secret)
        started = time.monotonic()
        rotate(secret)
        while not minted_with(secret):
            if time.monotonic() - started > 60:
                raise RuntimeError(f"{name}: rotation {i} not picked up within 60 s")
            time.sleep(0.005)
        latencies.append(time.monotonic() - started)
        time.sleep(pauses[i - 1])
    return Result(name, latencies)


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("DVS_", "VAULT_", "AWS_"))}


def bench_vault(work: Path, server: TokenServer, rotations: int, poll: float) -> Result:
    with bao_server(work / "bao") as bao:
        client = bao.client()
        path = f"dvs/bench-{uuid.uuid4().hex[:8]}"

        def write(secret: str) -> None:
            client.secrets.kv.v2.create_or_update_secret(
                path=path, secret={"client_id": CLIENT_ID, "client_secret": secret}
            )

        write("secret-0")
        token_file = work / "vault-token"
        token_file.write_text(bao.root_token)
        profile = f"""
sources = ["vault"]
[profiles.bench.vault]
address = "{bao.address}"
auth_method = "token"
token_file = "{token_file}"
path = "{path}"
[profiles.bench.rotation]
poll_interval = "{poll}s"
"""
        with _agent(_config(work, server.url, profile), _base_env()):
            return _measure(f"vault poll ({poll:g}s)", server, work / "token", rotations, write)


def bench_aws(work: Path, server: TokenServer, rotations: int, poll: float, events: bool) -> Result:
    with moto_server(work / "moto") as moto:
        sm = moto.client("secretsmanager")
        sqs = moto.client("sqs")
        name = f"dvs/bench-{uuid.uuid4().hex[:8]}"
        arn = sm.create_secret(
            Name=name,
            SecretString=json.dumps({"client_id": CLIENT_ID, "client_secret": "secret-0"}),
        )["ARN"]
        queue_url = sqs.create_queue(QueueName=f"rot-{uuid.uuid4().hex[:8]}")["QueueUrl"]

        def write(secret: str) -> None:
            sm.put_secret_value(
                SecretId=name,
                SecretString=json.dumps({"client_id": CLIENT_ID, "client_secret": secret}),
            )
            if events:
                sqs.send_message(QueueUrl=queue_url, MessageBody=json.dumps(_cloudtrail(arn)))

        events_line = f'events_queue_url = "{queue_url}"' if events else ""
        profile = f"""
sources = ["aws"]
[profiles.bench.aws]
secret_id = "{name}"
region = "{moto.region}"
endpoint_url = "{moto.endpoint_url}"
{events_line}
[profiles.bench.rotation]
poll_interval = "{0 if events else poll}"
"""
        env = {**_base_env(), **MOTO_ENV}
        label = "aws sqs event (no polling)" if events else f"aws poll ({poll:g}s)"
        with _agent(_config(work, server.url, profile), env):
            return _measure(label, server, work / "token", rotations, write)


def _cloudtrail(arn: str) -> dict[str, object]:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "AWS API Call via CloudTrail",
        "source": "aws.secretsmanager",
        "detail": {
            "eventSource": "secretsmanager.amazonaws.com",
            "eventName": "PutSecretValue",
            "requestParameters": {"secretId": arn},
        },
    }


def bench_sighup(work: Path, server: TokenServer, rotations: int) -> Result:
    secret_file = work / "client_secret"
    secret_file.write_text("secret-0")
    env = {
        **_base_env(),
        "DVS_CLIENT_ID": CLIENT_ID,
        "DVS_CLIENT_SECRET_FILE": str(secret_file),
    }
    profile = '[profiles.bench.rotation]\npoll_interval = "0"'
    with _agent(_config(work, server.url, profile), env) as proc:

        def write(secret: str) -> None:
            secret_file.write_text(secret)
            proc.send_signal(signal.SIGHUP)

        return _measure("SIGHUP (no polling)", server, work / "token", rotations, write)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rotations", type=int, default=20)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    args = parser.parse_args()
    results = []
    with ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dvs-bench-")))
        server = stack.enter_context(TokenServer(clients={CLIENT_ID: "secret-0"}))
        runs: list[tuple[str, Callable[[Path], Result]]] = [
            ("vault", lambda w: bench_vault(w, server, args.rotations, args.poll_interval)),
            ("aws", lambda w: bench_aws(w, server, args.rotations, args.poll_interval, False)),
            ("sqs", lambda w: bench_aws(w, server, args.rotations, args.poll_interval, True)),
            ("sighup", lambda w: bench_sighup(w, server, args.rotations)),
        ]
        for name, run in runs:
            work = base / name
            work.mkdir()
            server.set_secret(CLIENT_ID, "secret-0")
            results.append(run(work))
    print(f"rotation → new token on disk, {args.rotations} rotations each, seconds")
    print(f"{'trigger':<28} {'n':>5} {'median':>10} {'max':>9}")
    for result in results:
        print(result.row())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
