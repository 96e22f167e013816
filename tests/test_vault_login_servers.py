"""The servers of tests.vault_logins work, proven with plain hvac calls (no agent code).

One OpenBao (with a TLS listener) for the module serves the three methods. The error texts
asserted here are OpenBao's own (2.x); the agent's messages may rely on them.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import hvac
import hvac.exceptions
import pytest

from tests.vault_logins import (
    K8S_ISSUER,
    KV_PATH,
    TOKENREVIEW_PATH,
    BaoTLS,
    CertAuthority,
    JwtIssuer,
    TokenReviewServer,
    bao_tls_fixture,  # noqa: F401 - registers the fixture
    configure_cert,
    configure_jwt,
    configure_kubernetes,
    jwt_expiry,
    jwt_issuer_fixture,  # noqa: F401 - registers the fixture
    login_ca_fixture,  # noqa: F401 - registers the fixture
    make_ca,
    make_client_cert,
    token_review_fixture,  # noqa: F401 - registers the fixture
    write_kv_read_policy,
)

SECRET = {"client_id": "svc-client", "client_secret": "s3cr3t"}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def root(bao_tls: BaoTLS) -> Any:
    """The root client, with the read policy and the secret in place."""
    client = bao_tls.client()
    write_kv_read_policy(client)
    client.secrets.kv.v2.create_or_update_secret(path=KV_PATH, secret=SECRET)
    return client


def _read(client: Any) -> dict[str, str]:
    answer = client.secrets.kv.v2.read_secret_version(path=KV_PATH, raise_on_deleted_version=True)
    data: dict[str, str] = answer["data"]["data"]
    return data


def _anonymous(bao_tls: BaoTLS) -> Any:
    return hvac.Client(url=bao_tls.address)


# -- jwt ------------------------------------------------------------------------------------------


@pytest.fixture
def jwt_mount(root: Any, jwt_issuer: JwtIssuer) -> str:
    configure_jwt(
        root,
        pubkey_pem=jwt_issuer.public_key_pem,
        ttl=dt.timedelta(seconds=3),
        max_ttl=dt.timedelta(seconds=10),
    )
    return "jwt"


def test_jwt_login_reads_the_secret_and_renews(
    bao_tls: BaoTLS, jwt_mount: str, jwt_issuer: JwtIssuer
) -> None:
    client = _anonymous(bao_tls)
    token = jwt_issuer.mint(ttl=dt.timedelta(minutes=2))
    assert abs((jwt_expiry(token) - _now()).total_seconds() - 120) < 5
    auth = client.auth.jwt.jwt_login("dvs", token, path=jwt_mount)["auth"]
    assert auth["token_policies"] == ["default", "dvs-read"]
    assert auth["lease_duration"] == 3
    assert auth["renewable"] is True
    assert auth["metadata"] == {"role": "dvs"}
    assert _read(client) == SECRET
    assert client.auth.token.renew_self()["auth"]["lease_duration"] == 3


def test_jwt_es256_issuer_works(bao_tls: BaoTLS, root: Any) -> None:
    issuer = JwtIssuer(algorithm="ES256")
    configure_jwt(root, pubkey_pem=issuer.public_key_pem, mount="jwt-ec")
    auth = _anonymous(bao_tls).auth.jwt.jwt_login("dvs", issuer.mint(), path="jwt-ec")["auth"]
    assert auth["lease_duration"] == 3600


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (
            lambda issuer: issuer.expired(),
            "error validating token: invalid expiration time (exp) claim: token is expired",
        ),
        (
            lambda issuer: issuer.mint(aud="someone-else"),
            "error validating token: invalid audience (aud) claim: "
            "audience claim does not match any expected audience",
        ),
        (
            lambda issuer: issuer.mint(aud=None),
            "error validating token: invalid audience (aud) claim: "
            "audience claim does not match any expected audience",
        ),
        (
            lambda issuer: issuer.mint(nbf=_now() + dt.timedelta(hours=1)),
            "error validating token: invalid not before (nbf) claim: token not yet valid",
        ),
        (
            lambda _: JwtIssuer().mint(),
            "error validating token: error verifying token signature: "
            "no known key successfully validated the token signature",
        ),
    ],
    ids=["expired", "wrong-audience", "no-audience", "not-yet-valid", "other-key"],
)
def test_jwt_rejections_are_400_with_these_texts(
    bao_tls: BaoTLS, jwt_mount: str, jwt_issuer: JwtIssuer, make: Any, error: str
) -> None:
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        _anonymous(bao_tls).auth.jwt.jwt_login("dvs", make(jwt_issuer), path=jwt_mount)
    assert caught.value.errors == [error]


def test_jwt_unknown_role(bao_tls: BaoTLS, jwt_mount: str, jwt_issuer: JwtIssuer) -> None:
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        _anonymous(bao_tls).auth.jwt.jwt_login("nope", jwt_issuer.mint(), path=jwt_mount)
    assert caught.value.errors == ['role "nope" could not be found']


def test_revoked_or_expired_vault_token_is_403_permission_denied(
    bao_tls: BaoTLS, root: Any, jwt_mount: str, jwt_issuer: JwtIssuer
) -> None:
    configure_jwt(
        root, pubkey_pem=jwt_issuer.public_key_pem, mount="jwt-short", ttl=dt.timedelta(seconds=1)
    )
    revoked = _anonymous(bao_tls)
    revoked.auth.jwt.jwt_login("dvs", jwt_issuer.mint(), path=jwt_mount)
    lapsed = _anonymous(bao_tls)
    lapsed.auth.jwt.jwt_login("dvs", jwt_issuer.mint(), path="jwt-short")
    assert _read(revoked) == SECRET
    root.auth.token.revoke(revoked.token)
    for client in (revoked, lapsed):
        if client is lapsed:
            time.sleep(1.5)
        with pytest.raises(hvac.exceptions.Forbidden) as caught:
            _read(client)
        assert caught.value.errors == ["permission denied"]


# -- kubernetes -----------------------------------------------------------------------------------


def test_tokenreview_answers_as_the_api_server(token_review: TokenReviewServer) -> None:
    reviewer = token_review.service_account("kube-system", "vault-reviewer")
    token_review.grant_review(reviewer)
    account = token_review.service_account("dvs", "dvs-agent")
    token = token_review.mint(account, audiences=["vault"])
    context = ssl.create_default_context(cadata=token_review.ca_pem)
    url = token_review.host + TOKENREVIEW_PATH
    body = {"spec": {"token": token, "audiences": ["vault"]}}
    with httpx.Client(verify=context) as http:
        unauthenticated = http.post(url, json=body)
        answer = http.post(
            url, json=body, headers={"Authorization": f"Bearer {token_review.mint(reviewer)}"}
        )
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["reason"] == "Unauthorized"
    assert answer.status_code == 201
    review = answer.json()
    assert review["kind"] == "TokenReview"
    assert review["apiVersion"] == "authentication.k8s.io/v1"
    status = review["status"]
    assert status["authenticated"] is True
    assert status["audiences"] == ["vault"]
    assert status["user"]["username"] == "system:serviceaccount:dvs:dvs-agent"
    assert status["user"]["uid"] == account.uid
    assert status["user"]["groups"] == [
        "system:serviceaccounts",
        "system:serviceaccounts:dvs",
        "system:authenticated",
    ]
    assert status["user"]["extra"]["authentication.kubernetes.io/pod-name"] == ["dvs-agent-0"]
    claims = json.loads(_b64(token.split(".")[1]))
    assert claims["iss"] == K8S_ISSUER
    assert claims["sub"] == "system:serviceaccount:dvs:dvs-agent"
    assert claims["kubernetes.io"]["namespace"] == "dvs"
    assert claims["kubernetes.io"]["serviceaccount"] == {"name": "dvs-agent", "uid": account.uid}
    assert claims["exp"] > claims["iat"]


def _b64(part: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@pytest.fixture
def k8s_mount(root: Any, token_review: TokenReviewServer) -> str:
    """``kubernetes`` configured with a reviewer JWT (a granted ``kube-system`` account)."""
    reviewer = token_review.service_account("kube-system", "vault-reviewer")
    token_review.grant_review(reviewer)
    configure_kubernetes(
        root,
        host=token_review.host,
        ca_pem=token_review.ca_pem,
        token_reviewer_jwt=token_review.mint(reviewer, ttl=dt.timedelta(days=1)),
        ttl=dt.timedelta(seconds=30),
    )
    return "kubernetes"


def test_kubernetes_login_with_a_reviewer_jwt(
    bao_tls: BaoTLS, k8s_mount: str, token_review: TokenReviewServer
) -> None:
    account = token_review.service_account("dvs", "dvs-agent")
    before = token_review.review_count
    client = _anonymous(bao_tls)
    auth = client.auth.kubernetes.login("dvs", token_review.mint(account), mount_point=k8s_mount)[
        "auth"
    ]
    assert auth["metadata"]["service_account_namespace"] == "dvs"
    assert auth["metadata"]["service_account_uid"] == account.uid
    assert auth["lease_duration"] == 30
    assert _read(client) == SECRET
    assert token_review.review_count == before + 1
    review = token_review.reviews[-1]
    assert review.bearer == "system:serviceaccount:kube-system:vault-reviewer"
    assert not review.bearer_is_token
    assert review.authenticated
    assert review.audiences == (K8S_ISSUER,)  # OpenBao asks for the JWT's own audiences


def test_kubernetes_legacy_token(
    bao_tls: BaoTLS, k8s_mount: str, token_review: TokenReviewServer
) -> None:
    account = token_review.service_account("dvs", "dvs-agent")
    token = token_review.mint(account, legacy=True)
    _anonymous(bao_tls).auth.kubernetes.login("dvs", token, mount_point=k8s_mount)
    assert token_review.reviews[-1].audiences == ()


def test_kubernetes_revoked_token_is_permission_denied(
    bao_tls: BaoTLS, k8s_mount: str, token_review: TokenReviewServer
) -> None:
    token = token_review.mint(token_review.service_account("dvs", "dvs-agent"))
    token_review.revoke(token)
    with pytest.raises(hvac.exceptions.Forbidden) as caught:
        _anonymous(bao_tls).auth.kubernetes.login("dvs", token, mount_point=k8s_mount)
    assert caught.value.errors == ["permission denied"]
    review = token_review.reviews[-1]
    assert review.status == 201
    assert not review.authenticated
    assert review.error == "[invalid bearer token, service account token has been invalidated]"


def test_kubernetes_deleted_service_account_is_permission_denied(
    bao_tls: BaoTLS, k8s_mount: str, token_review: TokenReviewServer
) -> None:
    account = token_review.service_account("dvs", "dvs-agent")
    token = token_review.mint(account)
    token_review.delete_service_account(account)
    try:
        with pytest.raises(hvac.exceptions.Forbidden) as caught:
            _anonymous(bao_tls).auth.kubernetes.login("dvs", token, mount_point=k8s_mount)
        assert caught.value.errors == ["permission denied"]
        assert token_review.reviews[-1].error == (
            '[invalid bearer token, serviceaccounts "dvs-agent" not found]'
        )
    finally:
        assert token_review.service_account("dvs", "dvs-agent").uid != account.uid


def test_kubernetes_expired_token(
    bao_tls: BaoTLS, k8s_mount: str, token_review: TokenReviewServer
) -> None:
    account = token_review.service_account("dvs", "dvs-agent")
    long_ago = _now() - dt.timedelta(hours=2)
    before = token_review.review_count
    # past OpenBao's leeway (60 s): OpenBao refuses it itself, without a review
    expired = token_review.mint(account, iat=long_ago, exp=_now() - dt.timedelta(minutes=5))
    with pytest.raises(hvac.exceptions.Forbidden) as caught:
        _anonymous(bao_tls).auth.kubernetes.login("dvs", expired, mount_point=k8s_mount)
    assert caught.value.errors == ["invalid expiration time (exp) claim: token is expired"]
    assert token_review.review_count == before
    # within the leeway: the review says it expired
    just = token_review.mint(account, iat=long_ago, exp=_now() - dt.timedelta(seconds=20))
    with pytest.raises(hvac.exceptions.Forbidden) as caught:
        _anonymous(bao_tls).auth.kubernetes.login("dvs", just, mount_point=k8s_mount)
    assert caught.value.errors == ["permission denied"]
    assert token_review.reviews[-1].error == (
        "[invalid bearer token, service account token has expired]"
    )


@pytest.mark.parametrize(
    ("namespace", "name", "error"),
    [
        ("other", "dvs-agent", "namespace not authorized"),
        ("dvs", "someone-else", "service account name not authorized"),
    ],
    ids=["wrong-namespace", "wrong-name"],
)
def test_kubernetes_role_bounds_are_checked_before_the_review(
    bao_tls: BaoTLS,
    k8s_mount: str,
    token_review: TokenReviewServer,
    namespace: str,
    name: str,
    error: str,
) -> None:
    token = token_review.mint(token_review.service_account(namespace, name))
    before = token_review.review_count
    with pytest.raises(hvac.exceptions.Forbidden) as caught:
        _anonymous(bao_tls).auth.kubernetes.login("dvs", token, mount_point=k8s_mount)
    assert caught.value.errors == [error]
    assert token_review.review_count == before


def test_kubernetes_without_reviewer_jwt_the_login_jwt_is_the_bearer(
    bao_tls: BaoTLS, root: Any, token_review: TokenReviewServer
) -> None:
    configure_kubernetes(
        root,
        host=token_review.host,
        ca_pem=token_review.ca_pem,
        mount="k8s-self",
        bound_service_account_names=["self-reviewing"],
    )
    account = token_review.service_account("dvs", "self-reviewing")
    with pytest.raises(hvac.exceptions.Forbidden) as caught:
        _anonymous(bao_tls).auth.kubernetes.login(
            "dvs", token_review.mint(account), mount_point="k8s-self"
        )
    assert caught.value.errors == ["permission denied"]
    review = token_review.reviews[-1]
    assert (review.status, review.bearer, review.bearer_is_token) == (403, account.username, True)

    token_review.grant_review(account)
    _anonymous(bao_tls).auth.kubernetes.login(
        "dvs", token_review.mint(account), mount_point="k8s-self"
    )
    assert token_review.reviews[-1].status == 201
    # a token for another audience cannot be the bearer: the API server does not take it (401)
    with pytest.raises(hvac.exceptions.Forbidden):
        _anonymous(bao_tls).auth.kubernetes.login(
            "dvs", token_review.mint(account, audiences=["vault"]), mount_point="k8s-self"
        )
    assert token_review.reviews[-1].status == 401


def test_kubernetes_pem_keys_check_the_signature_before_the_review(
    bao_tls: BaoTLS, root: Any, token_review: TokenReviewServer
) -> None:
    reviewer = token_review.service_account("kube-system", "vault-reviewer")
    token_review.grant_review(reviewer)
    configure_kubernetes(
        root,
        host=token_review.host,
        ca_pem=token_review.ca_pem,
        mount="k8s-keys",
        token_reviewer_jwt=token_review.mint(reviewer),
        pem_keys=[token_review.public_key_pem],
    )
    account = token_review.service_account("dvs", "dvs-agent")
    _anonymous(bao_tls).auth.kubernetes.login(
        "dvs", token_review.mint(account), mount_point="k8s-keys"
    )
    with TokenReviewServer() as other_cluster:
        foreign = other_cluster.mint(other_cluster.service_account("dvs", "dvs-agent"))
    before = token_review.review_count
    with pytest.raises(hvac.exceptions.Forbidden) as caught:
        _anonymous(bao_tls).auth.kubernetes.login("dvs", foreign, mount_point="k8s-keys")
    assert caught.value.errors == ["permission denied"]
    assert token_review.review_count == before


def test_kubernetes_over_plain_http(bao_tls: BaoTLS, root: Any) -> None:
    with TokenReviewServer(tls=False) as server:
        assert server.host.startswith("http://")
        account = server.service_account("dvs", "dvs-agent")
        server.grant_review(account)
        configure_kubernetes(root, host=server.host, ca_pem=server.ca_pem, mount="k8s-http")
        _anonymous(bao_tls).auth.kubernetes.login(
            "dvs", server.mint(account), mount_point="k8s-http"
        )
        assert server.review_count == 1


def test_kubernetes_api_down_is_permission_denied(
    bao_tls: BaoTLS, k8s_mount: str, token_review: TokenReviewServer
) -> None:
    token_review.fault = 503
    try:
        with pytest.raises(hvac.exceptions.Forbidden) as caught:
            _anonymous(bao_tls).auth.kubernetes.login(
                "dvs",
                token_review.mint(token_review.service_account("dvs", "dvs-agent")),
                mount_point=k8s_mount,
            )
        assert caught.value.errors == ["permission denied"]
    finally:
        token_review.fault = None


# -- cert -----------------------------------------------------------------------------------------


@pytest.fixture
def cert_mount(root: Any, login_ca: CertAuthority) -> str:
    configure_cert(root, ca_pem=login_ca.cert_pem, ttl=dt.timedelta(seconds=20))
    return "cert"


def test_client_cert_files(tmp_path: Path, login_ca: CertAuthority) -> None:
    files = make_client_cert(login_ca, "dvs-agent", tmp_path)
    assert files.cert == tmp_path / "dvs-agent.pem"
    assert stat.S_IMODE(files.key.stat().st_mode) == 0o600
    assert files.cert_pem.startswith("-----BEGIN CERTIFICATE-----")
    assert files.key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert abs((files.not_after - _now()) - dt.timedelta(days=1)) < dt.timedelta(minutes=1)


def test_cert_login_on_the_tls_listener(
    bao_tls: BaoTLS, cert_mount: str, login_ca: CertAuthority, tmp_path: Path
) -> None:
    files = make_client_cert(login_ca, "dvs-agent", tmp_path)
    # hvac's own way: the login passes cert= and verify= for this one request
    client = hvac.Client(url=bao_tls.tls_address, verify=str(bao_tls.ca_file))
    auth = client.auth.cert.login(
        name="dvs", cert_pem=str(files.cert), key_pem=str(files.key), mount_point=cert_mount
    )["auth"]
    assert auth["lease_duration"] == 20
    assert auth["metadata"]["common_name"] == "dvs-agent"
    assert _read(client) == SECRET
    # a client made with the certificate: a plain write to the login path
    with_cert = bao_tls.tls_client(files)
    answer = with_cert.write_data(f"auth/{cert_mount}/login", data={"name": "dvs"})
    with_cert.token = answer["auth"]["client_token"]
    assert with_cert.auth.token.lookup_self()["data"]["display_name"] == "cert-dvs"


def _cert_login(bao_tls: BaoTLS, cert: Any, mount: str) -> Any:
    return bao_tls.tls_client(cert).write_data(f"auth/{mount}/login", data={"name": "dvs"})


def test_cert_untrusted_is_400(bao_tls: BaoTLS, cert_mount: str, tmp_path: Path) -> None:
    foreign = make_client_cert(make_ca("another CA"), "dvs-agent", tmp_path)
    with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
        _cert_login(bao_tls, foreign, cert_mount)
    assert caught.value.errors == ["invalid certificate or no client certificate supplied"]


def test_cert_expired_is_500(
    bao_tls: BaoTLS, cert_mount: str, login_ca: CertAuthority, tmp_path: Path
) -> None:
    expired = make_client_cert(
        login_ca, "dvs-agent", tmp_path, not_after=_now() - dt.timedelta(hours=1)
    )
    with pytest.raises(hvac.exceptions.InternalServerError) as caught:
        _cert_login(bao_tls, expired, cert_mount)
    (error,) = caught.value.errors
    assert error.startswith(
        "failed to verify client's certificate: x509: certificate has expired or is not yet "
        "valid: current time "
    )
    assert error.endswith(f" is after {expired.not_after:%Y-%m-%dT%H:%M:%SZ}")


def test_cert_login_without_a_certificate_is_400(bao_tls: BaoTLS, cert_mount: str) -> None:
    for client in (bao_tls.tls_client(), bao_tls.client()):
        client.token = None
        with pytest.raises(hvac.exceptions.InvalidRequest) as caught:
            client.write_data(f"auth/{cert_mount}/login", data={"name": "dvs"})
        assert caught.value.errors == ["no client certificate found"]
