"""Real servers for Vault's ``jwt``, ``kubernetes`` and ``cert`` logins (DESIGN §9, §12).

Nothing here fakes a client: OpenBao does every login itself, against what these helpers set up.

- ``jwt``: :class:`JwtIssuer` holds a key pair in memory and mints JWTs (PyJWT);
  :func:`configure_jwt` enables OpenBao's ``jwt`` method with that public key
  (``jwt_validation_pubkeys``) and a ``role_type = "jwt"`` role.
- ``kubernetes``: OpenBao parses the service-account JWT itself, then asks the Kubernetes API
  whether it is still valid (``POST {kubernetes_host}/apis/authentication.k8s.io/v1/tokenreviews``).
  :class:`TokenReviewServer` is that endpoint, answering as a real API server does, over TLS with
  a CA of its own; it mints the service-account tokens it later reviews, can revoke them, and
  records every review. :func:`configure_kubernetes` points the ``kubernetes`` method at it.
- ``cert``: :func:`bao_tls_server` is ``bao server -dev`` with a second, TLS listener (a server
  certificate from a test CA); :func:`make_client_cert` writes client certificates;
  :func:`configure_cert` trusts a CA for a ``certs/NAME`` role.

How OpenBao's ``kubernetes`` method calls the TokenReview endpoint (OpenBao 2.x,
``builtin/credential/kubernetes/token_review.go`` and ``backend.go``):

- the bearer is ``token_reviewer_jwt`` when the config sets one; without it, outside a pod (or
  with ``disable_local_ca_jwt``), the bearer is the very JWT being logged in with, so that service
  account itself must be allowed to create TokenReviews (here:
  :meth:`TokenReviewServer.grant_review`);
- ``http://`` hosts are called as they are, but the config still needs a CA: without
  ``kubernetes_ca_cert`` OpenBao reads the pod's
  ``/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`` and refuses the config when it is absent.
  :func:`configure_kubernetes` always sets the CA and ``disable_local_ca_jwt = true``, so that a
  CI job that runs in a pod does not pick up that pod's own token and CA;
- the issuer is not checked (``disable_iss_validation`` defaults to true), nor the signature when
  no ``pem_keys`` are configured; the namespace and name come from the JWT's claims and are
  checked against the role *before* the review, and so is ``exp`` (with 60 s of leeway: a token
  expired less than that is refused by the review instead); after the review, the reviewed
  name, namespace and uid must equal the JWT's;
- every failure of the review (401, 403, ``authenticated: false``, other audiences) reaches the
  client only as ``permission denied``: the reason is in OpenBao's debug log.

Fixtures: the ``*_fixture`` functions below are pytest fixtures with short names (``jwt_issuer``,
``token_review``, ``bao_tls``, ``login_ca``); a test module takes them with
``from tests.vault_logins import bao_tls_fixture  # noqa: F401`` (the import registers the fixture).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.servers import _stop, bao_server, free_port

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

#: the KV v2 path (under ``secret/``) that :func:`write_kv_read_policy` lets a login read
KV_PATH = "dvs/client"
#: the policy :func:`write_kv_read_policy` writes by default
READ_POLICY = "dvs-read"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _seconds(duration: dt.timedelta) -> str:
    """A duration as OpenBao's parameters take it: whole seconds, ``"3s"``."""
    return f"{int(duration.total_seconds())}s"


def _public_pem(key: PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def _private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` with mode 0600 (a private key, or a token)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(path, 0o600)
    return path


# -- certificates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertAuthority:
    """A certificate authority made by the test (EC P-256), in memory."""

    name: str
    cert: x509.Certificate = field(repr=False)
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def create(cls, name: str = "dvs test CA") -> CertAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(name=name, cert=cert, key=key)

    @property
    def cert_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def write(self, path: Path) -> Path:
        """Write the CA certificate (PEM) to ``path``."""
        path.write_text(self.cert_pem)
        return path

    def issue(
        self,
        common_name: str,
        *,
        ip_addresses: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A leaf certificate and its new key; valid from a minute ago for a day by default."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_before = now - dt.timedelta(minutes=1) if not_before is None else not_before
        not_after = now + dt.timedelta(days=1) if not_after is None else not_after
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        names: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses
        ]
        names += [x509.DNSName(name) for name in dns_names]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key, written as PEM files (the key with mode 0600)."""

    cert: Path
    key: Path
    #: the certificate's ``notAfter``
    not_after: dt.datetime

    @property
    def cert_pem(self) -> str:
        return self.cert.read_text()


def make_ca(name: str = "dvs test CA") -> CertAuthority:
    """A new CA (each call: another, unrelated CA)."""
    return CertAuthority.create(name)


def make_client_cert(
    ca: CertAuthority,
    cn: str,
    directory: Path,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    stem: str | None = None,
) -> CertFiles:
    """A TLS client certificate (extended key usage clientAuth) for ``cn``, signed by ``ca``,
    written as ``directory/STEM.pem`` and ``directory/STEM-key.pem`` (``STEM``: ``cn``).

    An expired one: ``not_after`` in the past (``not_before`` goes before it by itself)."""
    if not_after is not None and not_before is None:
        not_before = min(_now(), not_after) - dt.timedelta(days=1)
    cert, key = ca.issue(cn, not_before=not_before, not_after=not_after)
    directory.mkdir(parents=True, exist_ok=True)
    stem = cn if stem is None else stem
    cert_path = directory / f"{stem}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = _write_private(directory / f"{stem}-key.pem", _private_pem(key))
    return CertFiles(cert=cert_path, key=key_path, not_after=cert.not_valid_after_utc)


def make_server_cert(
    ca: CertAuthority, directory: Path, *, host: str = "127.0.0.1", stem: str = "server"
) -> CertFiles:
    """A TLS server certificate for ``host`` (an IP address SAN, or a DNS name SAN)."""
    try:
        ipaddress.ip_address(host)
        ips, dns = [host], []
    except ValueError:
        ips, dns = [], [host]
    cert, key = ca.issue(
        host, ip_addresses=ips, dns_names=dns, usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = _write_private(directory / f"{stem}-key.pem", _private_pem(key))
    return CertFiles(cert=cert_path, key=key_path, not_after=cert.not_valid_after_utc)


# -- OpenBao: mounts and policies ---------------------------------------------------------------


def enable_auth(client: Any, method: str, mount: str) -> None:
    """Enable auth method ``method`` at ``mount`` unless something is already mounted there
    (so that modules sharing the session's OpenBao can each configure the same mount)."""
    mounted = client.sys.list_auth_methods()
    mounts = mounted.get("data", mounted)
    if f"{mount.strip('/')}/" in mounts:
        return
    client.sys.enable_auth_method(method_type=method, path=mount)


def write_kv_read_policy(
    client: Any, name: str = READ_POLICY, path: str = KV_PATH, mount: str = "secret"
) -> str:
    """A policy that may read the KV v2 secret ``mount/path`` (data and metadata); its name."""
    client.sys.create_or_update_policy(
        name=name,
        policy=(
            f'path "{mount}/data/{path}" {{ capabilities = ["read"] }}\n'
            f'path "{mount}/metadata/{path}" {{ capabilities = ["read"] }}\n'
        ),
    )
    return name


def _token_params(
    policies: Sequence[str], ttl: dt.timedelta, max_ttl: dt.timedelta | None
) -> dict[str, Any]:
    params: dict[str, Any] = {"token_policies": list(policies), "token_ttl": _seconds(ttl)}
    if max_ttl is not None:
        params["token_max_ttl"] = _seconds(max_ttl)
    return params


# -- jwt ------------------------------------------------------------------------------------------


class JwtIssuer:
    """An issuer of JWTs: a key pair made in memory (RS256: RSA 2048; ES256: EC P-256)."""

    def __init__(
        self,
        *,
        issuer: str = "https://issuer.dvs.test",
        algorithm: str = "RS256",
        kid: str = "dvs-test-key",
    ) -> None:
        self.issuer = issuer
        self.algorithm = algorithm
        self.kid = kid
        if algorithm.startswith(("RS", "PS")):
            self._key: PrivateKey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        elif algorithm == "ES256":
            self._key = ec.generate_private_key(ec.SECP256R1())
        else:
            raise ValueError(f"unsupported algorithm {algorithm!r}: RS256, RS384, PS256, ES256")
        #: the public key (SubjectPublicKeyInfo PEM), for ``jwt_validation_pubkeys``
        self.public_key_pem = _public_pem(self._key)

    def mint(
        self,
        *,
        sub: str = "dvs-agent",
        aud: str | Sequence[str] | None = "dvs-agent",
        iss: str | None = None,
        ttl: dt.timedelta = dt.timedelta(minutes=5),
        exp: dt.datetime | None = None,
        nbf: dt.datetime | None = None,
        iat: dt.datetime | None = None,
        claims: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed JWT: ``iat`` now, ``exp`` ``iat + ttl``, ``iss`` this issuer.

        ``aud=None`` leaves ``aud`` out; ``claims`` are added last (a value ``None`` drops that
        claim, e.g. ``claims={"exp": None}`` for a JWT that never expires)."""
        issued = _now() if iat is None else iat
        payload: dict[str, Any] = {
            "iss": self.issuer if iss is None else iss,
            "sub": sub,
            "iat": issued,
            "exp": issued + ttl if exp is None else exp,
            "jti": str(uuid.uuid4()),
        }
        if nbf is not None:
            payload["nbf"] = nbf
        if aud is not None:
            payload["aud"] = aud if isinstance(aud, str) else list(aud)
        for name, value in (claims or {}).items():
            if value is None:
                payload.pop(name, None)
            else:
                payload[name] = value
        return jwt.encode(payload, self._key, algorithm=self.algorithm, headers={"kid": self.kid})

    def expired(self, *, ago: dt.timedelta = dt.timedelta(hours=1), **kwargs: Any) -> str:
        """A JWT that expired ``ago`` (an hour: past any leeway of OpenBao's)."""
        now = _now()
        return self.mint(iat=now - ago - dt.timedelta(minutes=5), exp=now - ago, **kwargs)


def jwt_expiry(token: str) -> dt.datetime:
    """The ``exp`` of a JWT (unverified), as an aware datetime."""
    claims = jwt.decode(token, options={"verify_signature": False})
    return dt.datetime.fromtimestamp(int(claims["exp"]), dt.UTC)


def configure_jwt(
    client: Any,
    *,
    pubkey_pem: str | Sequence[str],
    mount: str = "jwt",
    role: str = "dvs",
    policies: Sequence[str] = (READ_POLICY,),
    bound_audiences: Sequence[str] = ("dvs-agent",),
    user_claim: str = "sub",
    bound_subject: str | None = None,
    bound_issuer: str | None = None,
    ttl: dt.timedelta = dt.timedelta(hours=1),
    max_ttl: dt.timedelta | None = None,
    leeway: dt.timedelta | None = None,
) -> None:
    """Enable OpenBao's ``jwt`` method at ``mount`` (``jwt_validation_pubkeys``: the PEM(s)) and
    write its ``role`` (``role_type = "jwt"``). ``leeway``: the role's ``expiration_leeway``,
    ``not_before_leeway`` and ``clock_skew_leeway`` (None: none at all, so a JWT is rejected the
    second it expires; OpenBao's defaults are 150 s + 60 s)."""
    enable_auth(client, "jwt", mount)
    keys = [pubkey_pem] if isinstance(pubkey_pem, str) else list(pubkey_pem)
    config: dict[str, Any] = {"jwt_validation_pubkeys": keys}
    if bound_issuer is not None:
        config["bound_issuer"] = bound_issuer
    client.write_data(f"auth/{mount}/config", data=config)
    leeway_s = -1 if leeway is None else int(leeway.total_seconds())
    data: dict[str, Any] = {
        "role_type": "jwt",
        "user_claim": user_claim,
        "bound_audiences": list(bound_audiences),
        "expiration_leeway": leeway_s,
        "not_before_leeway": leeway_s,
        "clock_skew_leeway": leeway_s,
        **_token_params(policies, ttl, max_ttl),
    }
    if bound_subject is not None:
        data["bound_subject"] = bound_subject
    client.write_data(f"auth/{mount}/role/{role}", data=data)


# -- kubernetes -----------------------------------------------------------------------------------

#: the ``iss`` (and default audience) of a projected service-account token
K8S_ISSUER = "https://kubernetes.default.svc.cluster.local"
#: the ``iss`` of a legacy (Secret-based) service-account token
K8S_LEGACY_ISSUER = "kubernetes/serviceaccount"
TOKENREVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass(frozen=True)
class ServiceAccount:
    namespace: str
    name: str
    uid: str

    @property
    def username(self) -> str:
        """As the API server names it: ``system:serviceaccount:NAMESPACE:NAME``."""
        return f"system:serviceaccount:{self.namespace}:{self.name}"


@dataclass(frozen=True)
class Review:
    """One ``POST .../tokenreviews`` the server answered."""

    #: the username of the bearer (the reviewer); None: the bearer was not authenticated (401)
    bearer: str | None
    #: whether the bearer was the reviewed token itself (no ``token_reviewer_jwt`` configured)
    bearer_is_token: bool
    #: the HTTP status of the answer (201 when the review was made, 401/403 otherwise)
    status: int
    #: the audiences OpenBao asked for (``spec.audiences``)
    audiences: tuple[str, ...]
    #: the review's ``status.authenticated``
    authenticated: bool
    #: the reviewed user (``system:serviceaccount:NS:NAME``), when authenticated
    username: str | None
    #: the review's ``status.error``
    error: str


@dataclass
class _Issued:
    account: ServiceAccount
    pod: tuple[str, str] | None
    legacy: bool


class TokenReviewServer:
    """The TokenReview endpoint of a Kubernetes API server, faithful to what OpenBao reads.

    It mints service-account tokens (RS256, signed with a key of its own; projected tokens by
    default, legacy Secret-based ones with ``legacy=True``) and reviews them as the API server
    does: a token is valid when its signature is this server's, it has not expired, it was not
    revoked and its service account still exists, and its audiences meet the wanted ones (the
    request's ``spec.audiences``, else the API server's own :attr:`api_audiences`; a legacy token,
    which has no ``aud``, counts as issued for the API audiences).

    The bearer of the review request must itself be a valid token for the API audiences (else 401)
    of a service account allowed to create TokenReviews (:meth:`grant_review`; else 403), as the
    ``system:auth-delegator`` binding allows. Answers: 201 with the TokenReview (spec echoed,
    ``status`` filled), or a ``Status`` object for 401/403/404/405 and injected faults.

    Served over TLS with a certificate for 127.0.0.1 from :attr:`ca` (``tls=False``: plain HTTP).
    """

    def __init__(
        self,
        *,
        tls: bool = True,
        issuer: str = K8S_ISSUER,
        api_audiences: Sequence[str] = (K8S_ISSUER,),
    ) -> None:
        self.issuer = issuer
        self.api_audiences = tuple(api_audiences)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = base64.urlsafe_b64encode(os.urandom(12)).decode().rstrip("=")
        #: the public key of the service-account signing key (for ``pem_keys``)
        self.public_key_pem = _public_pem(self._key)
        #: the CA of the server's TLS certificate (for ``kubernetes_ca_cert``)
        self.ca = make_ca("dvs test kubernetes CA")
        self._tls = tls
        self._lock = threading.Lock()
        self._accounts: dict[tuple[str, str], ServiceAccount] = {}
        self._issued: dict[str, _Issued] = {}
        self._revoked: set[str] = set()
        self._reviewers: set[str] = set()
        self._reviews: list[Review] = []
        #: an HTTP status to answer every request with (a ``Status`` object), e.g. 500 or 503
        self.fault: int | None = None
        self._dir: Path | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The ``kubernetes_host`` to configure: ``https://127.0.0.1:PORT``."""
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> str:
        return self.ca.cert_pem

    def start(self) -> TokenReviewServer:
        server = self

        class Handler(_TokenReviewHandler):
            owner = server

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        if self._tls:
            self._dir = Path(tempfile.mkdtemp(prefix="dvs-tokenreview-"))
            files = make_server_cert(self.ca, self._dir)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(files.cert, files.key)
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        self.port = int(httpd.server_address[1])
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="tokenreview", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> TokenReviewServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- service accounts and their tokens -----------------------------------------------------

    def service_account(self, namespace: str, name: str) -> ServiceAccount:
        """The service account ``namespace/name``, made (with a new uid) if it does not exist."""
        with self._lock:
            account = self._accounts.get((namespace, name))
            if account is None:
                account = ServiceAccount(namespace, name, str(uuid.uuid4()))
                self._accounts[(namespace, name)] = account
            return account

    def delete_service_account(self, account: ServiceAccount) -> None:
        """Delete it: its tokens no longer pass review (one made again gets another uid)."""
        with self._lock:
            if self._accounts.get((account.namespace, account.name)) == account:
                del self._accounts[(account.namespace, account.name)]

    def grant_review(self, account: ServiceAccount) -> None:
        """Let ``account`` create TokenReviews (bind it to ``system:auth-delegator``)."""
        with self._lock:
            self._reviewers.add(account.username)

    def mint(
        self,
        account: ServiceAccount,
        *,
        audiences: Sequence[str] | None = None,
        ttl: dt.timedelta = dt.timedelta(hours=1),
        iat: dt.datetime | None = None,
        exp: dt.datetime | None = None,
        pod: str | None = "dvs-agent-0",
        legacy: bool = False,
    ) -> str:
        """A service-account token as the API server (or the kubelet's projection) makes it.

        Projected: ``iss`` :attr:`issuer`, ``aud`` (default: the API audiences), ``sub``
        ``system:serviceaccount:NS:NAME``, ``exp``/``iat``/``nbf``, ``jti``, and the
        ``kubernetes.io`` claim (namespace, serviceaccount and pod name and uid, warnafter).
        Legacy (``legacy=True``): ``iss`` ``kubernetes/serviceaccount``, the flat
        ``kubernetes.io/serviceaccount/*`` claims, no ``aud`` and no ``exp``."""
        jti = str(uuid.uuid4())
        issued = _now() if iat is None else iat
        if legacy:
            payload: dict[str, Any] = {
                "iss": K8S_LEGACY_ISSUER,
                "kubernetes.io/serviceaccount/namespace": account.namespace,
                "kubernetes.io/serviceaccount/secret.name": f"{account.name}-token-{jti[:5]}",
                "kubernetes.io/serviceaccount/service-account.name": account.name,
                "kubernetes.io/serviceaccount/service-account.uid": account.uid,
                "sub": account.username,
            }
            pod_ref = None
        else:
            expires = issued + ttl if exp is None else exp
            claim: dict[str, Any] = {
                "namespace": account.namespace,
                "serviceaccount": {"name": account.name, "uid": account.uid},
            }
            pod_ref = None if pod is None else (pod, str(uuid.uuid4()))
            if pod_ref is not None:
                claim["pod"] = {"name": pod_ref[0], "uid": pod_ref[1]}
                claim["warnafter"] = int((issued + (expires - issued) * 0.8).timestamp())
            payload = {
                "aud": list(self.api_audiences if audiences is None else audiences),
                "exp": int(expires.timestamp()),
                "iat": int(issued.timestamp()),
                "iss": self.issuer,
                "jti": jti,
                "kubernetes.io": claim,
                "nbf": int(issued.timestamp()),
                "sub": account.username,
            }
        token = jwt.encode(payload, self._key, algorithm="RS256", headers={"kid": self.kid})
        with self._lock:
            self._issued[token] = _Issued(account=account, pod=pod_ref, legacy=legacy)
        return token

    def revoke(self, token: str) -> None:
        """Invalidate one token (as deleting its pod or Secret does)."""
        with self._lock:
            self._revoked.add(token)

    # -- what it saw ---------------------------------------------------------------------------

    @property
    def reviews(self) -> list[Review]:
        with self._lock:
            return list(self._reviews)

    @property
    def review_count(self) -> int:
        with self._lock:
            return len(self._reviews)

    # -- the review ------------------------------------------------------------------------------

    def _check(
        self, token: str, wanted: Sequence[str]
    ) -> tuple[ServiceAccount | None, _Issued | None, list[str], str]:
        """(account, issued, audiences, error) for ``token`` reviewed for ``wanted`` audiences."""

        def invalid(why: str) -> tuple[None, None, list[str], str]:
            return None, None, [], f"[invalid bearer token, {why}]"

        try:
            claims = jwt.decode(
                token,
                self._key.public_key(),
                algorithms=["RS256"],
                options={"verify_aud": False, "verify_exp": False, "verify_nbf": False},
            )
        except jwt.InvalidTokenError:
            return invalid("square/go-jose: error in cryptographic primitive")
        with self._lock:
            issued = self._issued.get(token)
            revoked = token in self._revoked
            current = (
                None
                if issued is None
                else self._accounts.get((issued.account.namespace, issued.account.name))
            )
        if issued is None:
            return invalid("service account token has been invalidated")
        now = _now().timestamp()
        if "exp" in claims and now >= claims["exp"]:
            return invalid("service account token has expired")
        if "nbf" in claims and now < claims["nbf"]:
            return invalid("service account token is not valid yet")
        if current != issued.account:
            name = issued.account.name
            return invalid(f'serviceaccounts "{name}" not found')
        if revoked:
            return invalid("service account token has been invalidated")
        token_auds = claims.get("aud", list(self.api_audiences))
        token_auds = [token_auds] if isinstance(token_auds, str) else list(token_auds)
        targets = list(wanted) or list(self.api_audiences)
        met = [aud for aud in targets if aud in token_auds]
        if not met:
            return invalid(
                f"token audiences {json.dumps(token_auds)} is invalid for the target audiences "
                f"{json.dumps(targets)}"
            )
        return issued.account, issued, met, ""

    def _answer(self, bearer: str | None, body: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        spec = body.get("spec") or {}
        token = str(spec.get("token") or "")
        wanted = [str(aud) for aud in spec.get("audiences") or []]
        if self.fault is not None:
            return self.fault, _status(self.fault, "InternalError", "injected fault")
        reviewer = None
        if bearer:
            reviewer, _, _, _ = self._check(bearer, self.api_audiences)
        if reviewer is None:
            self._record(Review(None, bearer == token, 401, tuple(wanted), False, None, ""))
            return 401, _status(401, "Unauthorized", "Unauthorized")
        with self._lock:
            allowed = reviewer.username in self._reviewers
        if not allowed:
            self._record(
                Review(reviewer.username, bearer == token, 403, tuple(wanted), False, None, "")
            )
            return 403, _status(
                403,
                "Forbidden",
                "tokenreviews.authentication.k8s.io is forbidden: User "
                f'"{reviewer.username}" cannot create resource "tokenreviews" in API group '
                '"authentication.k8s.io" at the cluster scope',
                details={"group": "authentication.k8s.io", "kind": "tokenreviews"},
            )
        account, issued, audiences, error = self._check(token, wanted)
        status: dict[str, Any] = {"user": {}}
        if account is not None and issued is not None:
            extra: dict[str, list[str]] = {}
            if issued.pod is not None:
                extra["authentication.kubernetes.io/pod-name"] = [issued.pod[0]]
                extra["authentication.kubernetes.io/pod-uid"] = [issued.pod[1]]
            status = {
                "authenticated": True,
                "user": {
                    "username": account.username,
                    "uid": account.uid,
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{account.namespace}",
                        "system:authenticated",
                    ],
                    **({"extra": extra} if extra else {}),
                },
                "audiences": audiences,
            }
        else:
            status["error"] = error
        self._record(
            Review(
                reviewer.username,
                bearer == token,
                201,
                tuple(wanted),
                account is not None,
                None if account is None else account.username,
                error,
            )
        )
        return 201, {
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": dict(spec),
            "status": status,
        }

    def _record(self, review: Review) -> None:
        with self._lock:
            self._reviews.append(review)


def _status(
    code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A Kubernetes ``Status`` object, as the API server answers failures."""
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        status["details"] = dict(details)
    return status


class _TokenReviewHandler(BaseHTTPRequestHandler):
    owner: TokenReviewServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the requests carry tokens."""

    def _send(self, code: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self.path.split("?")[0] != TOKENREVIEW_PATH:
            self._send(
                404, _status(404, "NotFound", "the server could not find the requested resource")
            )
            return
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            self._send(400, _status(400, "BadRequest", "the request body is not JSON"))
            return
        header = self.headers.get("Authorization") or ""
        bearer = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else None
        code, answer = self.owner._answer(bearer, body)
        self._send(code, answer)

    def do_GET(self) -> None:
        self._send(405, _status(405, "MethodNotAllowed", "the server does not allow this method"))


def configure_kubernetes(
    client: Any,
    *,
    host: str,
    ca_pem: str,
    mount: str = "kubernetes",
    role: str = "dvs",
    bound_service_account_names: Sequence[str] = ("dvs-agent",),
    bound_service_account_namespaces: Sequence[str] = ("dvs",),
    policies: Sequence[str] = (READ_POLICY,),
    ttl: dt.timedelta = dt.timedelta(hours=1),
    max_ttl: dt.timedelta | None = None,
    token_reviewer_jwt: str | None = None,
    pem_keys: Sequence[str] = (),
    audience: str | None = None,
) -> None:
    """Enable OpenBao's ``kubernetes`` method at ``mount``, pointed at ``host`` (a
    :class:`TokenReviewServer`), and write its ``role``.

    Always ``disable_local_ca_jwt = true`` with ``kubernetes_ca_cert = ca_pem`` (see the module's
    docstring). ``token_reviewer_jwt`` None: the login's own JWT is the reviewer's bearer.
    ``pem_keys``: keys that check the JWT's signature before the review (default: none, as
    OpenBao's own default). ``audience``: the role's ``audience`` (the JWT's ``aud`` must hold
    it)."""
    enable_auth(client, "kubernetes", mount)
    config: dict[str, Any] = {
        "kubernetes_host": host,
        "kubernetes_ca_cert": ca_pem,
        "disable_local_ca_jwt": True,
        "pem_keys": list(pem_keys),
    }
    # an empty string unsets it: a reviewer JWT of an earlier configure does not linger
    config["token_reviewer_jwt"] = token_reviewer_jwt or ""
    client.write_data(f"auth/{mount}/config", data=config)
    data: dict[str, Any] = {
        "bound_service_account_names": list(bound_service_account_names),
        "bound_service_account_namespaces": list(bound_service_account_namespaces),
        **_token_params(policies, ttl, max_ttl),
    }
    if audience is not None:
        data["audience"] = audience
    client.write_data(f"auth/{mount}/role/{role}", data=data)


# -- cert: OpenBao with a TLS listener ------------------------------------------------------------


@dataclass(frozen=True)
class BaoTLS:
    """``bao server -dev`` with a second listener, TLS, at :attr:`tls_address`.

    The TLS listener *requests* client certificates but does not verify them (OpenBao's default:
    ``tls.RequestClientCert``; neither ``tls_require_and_verify_client_cert`` nor
    ``tls_disable_client_certs`` is set), so that the ``cert`` method judges them: an untrusted
    or expired client certificate completes the handshake and is refused by the login."""

    #: the dev listener, plain HTTP (for arranging: policies, mounts, secrets)
    address: str
    #: ``https://127.0.0.1:PORT``, the listener the ``cert`` login must use
    tls_address: str
    #: the CA that signed the TLS listener's certificate (PEM file), for ``verify=``
    ca_file: Path
    #: that CA (it can also sign client certificates, or use :func:`make_ca` for another)
    ca: CertAuthority = field(repr=False)
    root_token: str
    log: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)

    def client(self) -> Any:
        """A root client on the plain listener."""
        import hvac

        return hvac.Client(url=self.address, token=self.root_token)

    def tls_client(self, cert: CertFiles | None = None, token: str | None = None) -> Any:
        """A client of the TLS listener that trusts :attr:`ca_file`, with ``cert`` (if any) as its
        client certificate."""
        import hvac

        return hvac.Client(
            url=self.tls_address,
            token=token,
            verify=str(self.ca_file),
            cert=None if cert is None else (str(cert.cert), str(cert.key)),
        )


@contextmanager
def bao_tls_server(workdir: Path, ca: CertAuthority | None = None) -> Iterator[BaoTLS]:
    """``bao server -dev`` (root token :data:`~tests.servers.ROOT_TOKEN`, KV v2 at ``secret/``)
    plus a ``-config`` file declaring a TLS ``listener "tcp"`` on another free port, with a
    server certificate for 127.0.0.1 (an IP SAN) from ``ca`` (default: a new CA)."""
    ca = make_ca("dvs test OpenBao CA") if ca is None else ca
    workdir.mkdir(parents=True, exist_ok=True)
    ca_file = ca.write(workdir / "bao-ca.pem")
    server = make_server_cert(ca, workdir, stem="bao-server")
    port, tls_port = free_port(), free_port()
    while tls_port == port:
        tls_port = free_port()
    listener = (
        'listener "tcp" {\n'
        f'  address = "127.0.0.1:{tls_port}"\n'
        f'  tls_cert_file = "{server.cert}"\n'
        f'  tls_key_file = "{server.key}"\n'
        "}\n"
    )
    with bao_server(workdir, extra_config=listener, port=port) as bao:
        yield BaoTLS(
            address=bao.address,
            tls_address=f"https://127.0.0.1:{tls_port}",
            ca_file=ca_file,
            ca=ca,
            root_token=bao.root_token,
            log=workdir / "bao.log",
            process=bao.process,
        )


def configure_cert(
    client: Any,
    *,
    ca_pem: str,
    mount: str = "cert",
    name: str = "dvs",
    policies: Sequence[str] = (READ_POLICY,),
    ttl: dt.timedelta = dt.timedelta(hours=1),
    max_ttl: dt.timedelta | None = None,
    allowed_common_names: Iterable[str] | None = None,
) -> None:
    """Enable OpenBao's ``cert`` method at ``mount`` and trust ``ca_pem`` for ``certs/name``."""
    enable_auth(client, "cert", mount)
    data: dict[str, Any] = {
        "certificate": ca_pem,
        "display_name": name,
        **_token_params(policies, ttl, max_ttl),
    }
    if allowed_common_names is not None:
        data["allowed_common_names"] = list(allowed_common_names)
    client.write_data(f"auth/{mount}/certs/{name}", data=data)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(name="jwt_issuer", scope="module")
def jwt_issuer_fixture() -> JwtIssuer:
    """A :class:`JwtIssuer` (RS256) for the module."""
    return JwtIssuer()


@pytest.fixture(name="token_review", scope="module")
def token_review_fixture() -> Iterator[TokenReviewServer]:
    """A running :class:`TokenReviewServer` (TLS) for the module."""
    with TokenReviewServer() as server:
        yield server


@pytest.fixture(name="bao_tls", scope="module")
def bao_tls_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoTLS]:
    """An OpenBao dev server with a TLS listener (:func:`bao_tls_server`) for the module."""
    with bao_tls_server(tmp_path_factory.mktemp("bao-tls")) as server:
        yield server


@pytest.fixture(name="login_ca", scope="module")
def login_ca_fixture() -> CertAuthority:
    """A CA for client certificates, distinct from the TLS listener's."""
    return make_ca("dvs test client CA")
