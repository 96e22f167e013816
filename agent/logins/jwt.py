"""``auth_method = "jwt"``: log in with a JWT read from ``jwt_file`` at every login (DESIGN §12).

Workload-identity tokens rotate, so the file is read again at each login; an expired JWT is an
error naming the file before anything is sent. Vault's ``jwt`` auth method checks the
signature, issuer and audience against the role ``role``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from agent.logins.common import (
    check_mount,
    logged_in,
    mount_key,
    not_mounted,
    read_jwt,
    rejected,
    required,
)
from agent.plugin import Login, LoginContext, LoginKind, Where


class JwtLogin(LoginKind):
    name = "jwt"
    holder = "JWT role"
    #: what the messages call the method
    label = "JWT"
    #: the default of ``jwt_file`` (None: required)
    default_jwt_file: str | None = None

    def jwt_file(self, config: Any) -> str:
        path: str | None = config.jwt_file or self.default_jwt_file
        assert path, "check() requires jwt_file"
        return path

    def check(self, config: Any, where: Where) -> Iterator[str]:
        yield from required(self.name, config, where, "role")
        if self.default_jwt_file is None or config.jwt_file == "":
            yield from required(self.name, config, where, "jwt_file")
        yield from check_mount(self, config, where)

    def describe(self, config: Any) -> str:
        return f"{self.name} login (role {config.role}, auth/{self.mount(config)})"

    def what(self, config: Any) -> str:
        return f"{self.label} login at auth/{self.mount(config)} (role {config.role})"

    def login(self, config: Any, ctx: LoginContext) -> Login:
        import hvac.exceptions

        path = self.jwt_file(config)
        jwt, expires_at = read_jwt(ctx, path)
        mount = self.mount(config)
        try:
            response = self.post(ctx, config.role, jwt, mount)
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
            raise rejected(self.what(config), ctx, exc, self.fix(config, ctx, path)) from None
        except hvac.exceptions.InvalidPath:
            raise not_mounted(
                self, config, ctx, self.label, f"bao auth enable -path={mount} {self.name}"
            ) from None
        return logged_in(response, self.what(config), ctx, expires_at)

    def post(self, ctx: LoginContext, role: str, jwt: str, mount: str) -> Any:
        return ctx.client.auth.jwt.jwt_login(role=role, jwt=jwt, path=mount, use_token=False)

    def fix(self, config: Any, ctx: LoginContext, path: str) -> str:
        key = ctx.config_key
        return (
            f"check the JWT in {path} ({key}.jwt_file): its signature, issuer, audience and "
            f"expiry must match the jwt auth config and the bound claims of the role "
            f"{config.role!r} ({key}.role), which must exist at auth/{self.mount(config)} "
            f"({key}.{mount_key(config)})"
        )


KIND = JwtLogin()
