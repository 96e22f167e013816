"""config/kubernetes.yaml: the sidecar example agrees with the agent, and its config runs.

The kubelet is not here, so the last test plays its part: the ConfigMap's agent.toml is run
with the container paths mapped into a temp dir, the Secret laid out as the kubelet lays out
a secret volume (each key a symlink through ``..data`` to a timestamped directory), and a
rotation done as the kubelet does it (a new directory, then ``..data`` swapped atomically).
"""

from __future__ import annotations

import functools
import json
import os
import re
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from agent.config import parse_config
from agent.devserver import TokenServer
from tests.conftest import REPO, Spawn, agent_env, wait_for
from tests.servers import free_port

MANIFEST = REPO / "config" / "kubernetes.yaml"
SIDECAR = "dvs-agent"


@functools.cache
def _docs() -> dict[str, dict[str, Any]]:
    """The manifest's documents by kind, read and parsed once (tests only read them)."""
    docs = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs) == 3, [doc["kind"] for doc in docs]
    return by_kind


def _pod() -> dict[str, Any]:
    pod: dict[str, Any] = _docs()["Deployment"]["spec"]["template"]["spec"]
    return pod


def _sidecar() -> dict[str, Any]:
    return next(c for c in _pod()["initContainers"] if c["name"] == SIDECAR)


def _agent_toml() -> str:
    text: str = _docs()["ConfigMap"]["data"]["agent.toml"]
    return text


def _mount_of(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The volume mount of ``container`` that holds ``path`` (the deepest one)."""
    holding = [
        m
        for m in container["volumeMounts"]
        if PurePosixPath(path).is_relative_to(PurePosixPath(m["mountPath"]))
    ]
    return max(holding, key=lambda m: len(m["mountPath"]), default=None)


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_the_configmap_config_is_valid() -> None:
    config = parse_config(_agent_toml(), source="config/kubernetes.yaml")
    assert list(config.profiles) == ["dvs"]
    assert config.profiles["dvs"].sources == ["env"]
    # the kubelet probes the pod IP: a loopback listener would fail every probe
    assert config.health.address == ("0.0.0.0", 8787)


def test_the_sidecar_can_write_what_the_config_writes_and_read_what_it_reads() -> None:
    config = parse_config(_agent_toml(), source="config/kubernetes.yaml")
    sidecar = _sidecar()
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar, started before the service
    writes = [config.agent.state_dir] + [
        str(PurePosixPath(sink.path).parent) for sink in config.profiles["dvs"].sinks
    ]
    for path in writes:
        mount = _mount_of(sidecar, path)
        assert mount is not None and not mount.get("readOnly"), path
    # the image's default config path is where the ConfigMap is mounted
    dockerfile = (REPO / "Dockerfile").read_text()
    default_config = re.search(r"DVS_AGENT_CONFIG=(\S+)", dockerfile)
    assert default_config is not None
    config_mount = _mount_of(sidecar, default_config.group(1))
    assert config_mount is not None and config_mount["name"] == "dvs-agent-config"
    # the _FILE variables name keys of the Secret, under its mount
    secret = _docs()["Secret"]
    env = _env(sidecar)
    volumes = {v["name"]: v for v in _pod()["volumes"]}
    for var in ("DVS_CLIENT_ID_FILE", "DVS_CLIENT_SECRET_FILE"):
        path = PurePosixPath(env[var])
        mount = _mount_of(sidecar, str(path))
        assert mount is not None and mount["readOnly"], var
        volume = volumes[mount["name"]]
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert path.relative_to(mount["mountPath"]).as_posix() in secret["stringData"]


def test_the_service_reads_the_token_read_only_and_waits_for_it() -> None:
    config = parse_config(_agent_toml(), source="config/kubernetes.yaml")
    pod = _pod()
    sidecar = _sidecar()
    (service,) = pod["containers"]
    token = config.profiles["dvs"].sinks[0].path
    assert _env(service)["DVS_TOKEN_FILE"] == token
    theirs, ours = _mount_of(service, token), _mount_of(sidecar, token)
    assert theirs is not None and ours is not None
    assert theirs["readOnly"] and theirs["name"] == ours["name"]
    token_volume = next(v for v in pod["volumes"] if v["name"] == ours["name"])
    assert token_volume["emptyDir"]["medium"] == "Memory"
    # the file's mode lets the pod's fsGroup read it, and no one else
    assert config.profiles["dvs"].sinks[0].mode & 0o047 == 0o040
    assert pod["securityContext"]["fsGroup"] == sidecar["securityContext"]["runAsGroup"]
    # the service starts after the sidecar's startup probe: /readyz, on the listener's port
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert config.health.address is not None
    for probe in ("startupProbe", "readinessProbe"):
        assert sidecar[probe]["httpGet"]["path"] == "/readyz"
        assert ports[sidecar[probe]["httpGet"]["port"]] == config.health.address[1]
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_runs_as_the_images_user_with_nothing_writable_but_its_volumes() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert user is not None
    context = _sidecar()["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (int(user[1]), int(user[2]))
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert _pod()["securityContext"]["runAsNonRoot"] is True


def _kubelet_secret(directory: Path, data: dict[str, str], generation: int) -> None:
    """Write ``data`` as the kubelet's atomic writer does: a new timestamped directory, the
    ``..data`` symlink swapped to it by a rename, each key a symlink through ``..data``."""
    directory.mkdir(exist_ok=True)
    target = directory / f"..2026_11_28_00_00_{generation:02d}.000000001"
    target.mkdir()
    for key, value in data.items():
        (target / key).write_text(value)
        (target / key).chmod(0o440)
    staging = directory / "..data_tmp"
    staging.symlink_to(target.name)
    os.replace(staging, directory / "..data")
    for key in data:
        link = directory / key
        if not link.is_symlink():
            link.symlink_to(f"..data/{key}")


def _localized(text: str, root: Path, token_url: str, port: int) -> str:
    """The ConfigMap's agent.toml with the container paths under ``root``, the token server's
    URL instead of OSIGU's, the given port and a 1 s poll (the example polls every 30 s)."""
    for path in ("/var/lib/dvs-agent", "/run/dvs-agent"):
        text = text.replace(f'"{path}', f'"{root}{path}')
    text = text.replace('listen = "0.0.0.0:8787"', f'listen = "0.0.0.0:{port}"')
    text = text.replace('poll_interval = "30s"', 'poll_interval = "1s"')
    return re.sub(r'^environment = "sandbox".*$', f'token_url = "{token_url}"', text, flags=re.M)


def test_the_example_runs_and_follows_a_secret_rotated_the_kubelets_way(
    tmp_path: Path, spawn: Spawn
) -> None:
    secret = _docs()["Secret"]["stringData"]
    old = {"client_id": "k8s-client", "client_secret": "first-secret"}
    new = {"client_id": "k8s-client", "client_secret": "second-secret"}
    assert set(old) == set(secret)
    port = free_port()
    creds = tmp_path / "etc" / "dvs-credentials"
    creds.parent.mkdir()
    _kubelet_secret(creds, old, 1)
    with TokenServer(clients={"k8s-client": "first-secret"}) as server:
        text = _localized(_agent_toml(), tmp_path, server.url, port)
        config = tmp_path / "agent.toml"
        config.write_text(text)
        sidecar_env = {var: str(tmp_path) + value for var, value in _env(_sidecar()).items()}
        env = agent_env(**sidecar_env)
        del env["DVS_CLIENT_ID"], env["DVS_CLIENT_SECRET"]
        agent = spawn(config, env=env)
        token = tmp_path / "run" / "dvs-agent" / "token"

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    return bool(r.status == 200)
            except OSError:
                return False

        assert wait_for(ready, timeout=20), agent.output()
        first = token.read_text()
        assert server.issued()[first].client_secret == "first-secret"
        assert json.loads((token.parent / "token.json").read_text())["access_token"] == first

        server.set_secret("k8s-client", "second-secret")
        _kubelet_secret(creds, new, 2)
        assert wait_for(
            lambda: (
                token.read_text() != first
                and server.issued()[token.read_text()].client_secret == "second-secret"
            ),
            timeout=20,
        ), agent.output()
        assert agent.stop() == 0
    assert "first-secret" not in agent.output() and "second-secret" not in agent.output()
