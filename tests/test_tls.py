"""The token endpoint over HTTPS: verification is always on; ca_bundle names the CA."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.devserver import TokenServer
from tests.conftest import CLIENT_ID, CLIENT_SECRET, run_cli, write_config


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA), made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is not installed")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[TokenServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    with TokenServer(clients={CLIENT_ID: CLIENT_SECRET}, tls=context) as server:
        yield server


def test_https_with_ca_bundle(
    tls_server: TokenServer, certificate: tuple[Path, Path], tmp_path: Path
) -> None:
    assert tls_server.url.startswith("https://127.0.0.1:")
    config = write_config(tmp_path, tls_server.url, extra_profile=f'ca_bundle = "{certificate[0]}"')
    result = run_cli("once", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "token").read_text() in tls_server.issued()


def test_https_without_the_ca_fails_verification(tls_server: TokenServer, tmp_path: Path) -> None:
    result = run_cli("once", "-c", str(write_config(tmp_path, tls_server.url)))
    assert result.returncode == 69
    assert "TLS verification failed" in result.stderr and "ca_bundle" in result.stderr
    assert tls_server.issued() == {}  # the secret never reached an unverified server
    assert not (tmp_path / "token").exists()


def test_missing_ca_bundle_is_a_config_error(tls_server: TokenServer, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    config = write_config(tmp_path, tls_server.url, extra_profile=f'ca_bundle = "{missing}"')
    result = run_cli("once", "-c", str(config))
    assert result.returncode == 78
    assert "ca_bundle" in result.stderr
