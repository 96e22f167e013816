"""``auth_method = "cert"``: log in with a TLS client certificate (DESIGN §12).

The connection presents ``client_cert``/``client_key`` in its TLS handshakes with Vault
(:meth:`CertLogin.client_cert`); the login posts to ``auth/<mount>/login`` with the optional
cert role ``role``. Before each login the pair is loaded (a key that does not match, an expired
certificate: an error naming the file) and the connection's pool is emptied, so a renewed
certificate is the one the handshake presents. The key is read by OpenSSL only, never by the
agent's Python code.
"""

from __future__ import annotations

import os
import ssl
import stat
import time
from collections.abc import Iterator
from typing import Any

from agent.errors import SourceEmpty, SourceUnavailable
from agent.fsutil import read_secret_file
from agent.logins.common import (
    check_mount,
    check_readable,
    logged_in,
    mount_key,
    not_mounted,
    rejected,
    required,
)
from agent.plugin import Login, LoginContext, LoginKind, Where


class CertLogin(LoginKind):
    name = "cert"
    holder = "cert role"

    def check(self, config: Any, where: Where) -> Iterator[str]:
        yield from required(self.name, config, where, "client_cert")
        yield from required(self.name, config, where, "client_key")
        yield from check_readable(config, where, "client_cert")
        if config.role == "":
            yield f"{where.at('role')}: must not be empty (leave the key out to try every role)"
        yield from check_mount(self, config, where)
        address = config.address
        if address and address.startswith("http://"):
            yield (
                f'{where.at("auth_method")}: "cert" needs TLS: a client certificate is sent '
                f"only over https, and {where.at('address')} is {address!r}"
            )

    def describe(self, config: Any) -> str:
        role = f"role {config.role}" if config.role else "any role"
        return f"cert login ({role}, auth/{self.mount(config)}, {config.client_cert})"

    def what(self, config: Any) -> str:
        role = f" (role {config.role})" if config.role else ""
        return f"certificate login at auth/{self.mount(config)}{role}"

    def client_cert(self, config: Any) -> tuple[str, str] | None:
        return (config.client_cert, config.client_key)

    def login(self, config: Any, ctx: LoginContext) -> Login:
        import hvac.exceptions

        expires_at = self._load(config, ctx)
        # a renewed certificate must be presented: no connection made with the old one
        ctx.client.adapter.session.close()
        mount = self.mount(config)
        body = {"name": config.role} if config.role else {}
        try:
            response = ctx.client.login(f"/v1/auth/{mount}/login", use_token=False, json=body)
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
            raise rejected(self.what(config), ctx, exc, self._fix(config, ctx)) from None
        except hvac.exceptions.InternalServerError as exc:
            # OpenBao answers 500 "failed to verify client's certificate: x509: ..." for a
            # certificate it cannot verify (expired on its clock): a rejection, not an outage
            if "certificate" not in str(exc):
                raise
            raise rejected(self.what(config), ctx, exc, self._fix(config, ctx)) from None
        except hvac.exceptions.InvalidPath:
            raise not_mounted(
                self, config, ctx, "cert", f"bao auth enable -path={mount} cert"
            ) from None
        return logged_in(response, self.what(config), ctx, expires_at)

    def _load(self, config: Any, ctx: LoginContext) -> float | None:
        """Load the pair as the handshake will; the certificate's expiry."""
        key = ctx.config_key
        cert_name, key_name = f"{key}.client_cert", f"{key}.client_key"
        for path, name in ((config.client_cert, cert_name), (config.client_key, key_name)):
            if not os.path.exists(path):
                raise SourceEmpty(f"{path} ({name}) does not exist: write it, or set {name}")
            if not stat.S_ISREG(os.stat(path).st_mode):
                # OpenSSL would block on a FIFO for ever, holding the profile's refresh
                raise SourceUnavailable(
                    f"{path} ({name}) is not a regular file (a FIFO, a device or a directory?)"
                )
            if not os.access(path, os.R_OK):
                raise SourceUnavailable(
                    f"{path} ({name}) is not readable by the agent (uid {os.geteuid()}): fix "
                    "its owner or mode"
                )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            context.load_cert_chain(config.client_cert, config.client_key)
        except ssl.SSLError as exc:
            reason = exc.reason or "unreadable PEM"
            raise SourceUnavailable(
                f"cannot use the client certificate {config.client_cert} ({cert_name}) with the "
                f"key {config.client_key} ({key_name}): {reason} (both must be PEM, the key "
                "unencrypted and the pair's)"
            ) from None
        except OSError as exc:
            raise SourceUnavailable(
                f"cannot read the client certificate {config.client_cert} ({cert_name}) or its "
                f"key ({key_name}): {exc.strerror or exc}"
            ) from None
        expires_at, starts_at = certificate_validity(config.client_cert)
        now = ctx.wall()
        if expires_at is not None and expires_at <= now:
            raise SourceUnavailable(
                f"the client certificate {config.client_cert} ({cert_name}) expired at "
                f"{_stamp(expires_at)}: renew it (the agent reads it again at the next login)"
            )
        if starts_at is not None and starts_at > now:
            raise SourceUnavailable(
                f"the client certificate {config.client_cert} ({cert_name}) is valid only from "
                f"{_stamp(starts_at)} (is this host's clock right?)"
            )
        return expires_at

    def _fix(self, config: Any, ctx: LoginContext) -> str:
        key = ctx.config_key
        role = f"the cert role {config.role!r}" if config.role else "a cert role"
        return (
            f"check that {config.client_cert} ({key}.client_cert) is issued by a CA that "
            f"{role} at auth/{self.mount(config)} trusts ({key}.role, "
            f"{key}.{mount_key(config)}) and that it is current; the TLS connection must reach "
            "Vault itself (a proxy that ends TLS drops the client certificate)"
        )


KIND = CertLogin()


def certificate_validity(path: str) -> tuple[float | None, float | None]:
    """``(not after, not before)`` of the first certificate in the PEM file ``path``, Unix
    time; ``(None, None)`` when it cannot be parsed (the handshake will say)."""
    from cryptography import x509  # only for configs that log in with a certificate

    try:
        cert = x509.load_pem_x509_certificate(read_secret_file(path).encode())
    except (OSError, ValueError):
        return None, None
    return cert.not_valid_after_utc.timestamp(), cert.not_valid_before_utc.timestamp()


def _stamp(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
