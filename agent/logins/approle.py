"""``auth_method = "approle"``: log in with a role id and a secret id, each read from a file."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from agent.errors import SourceUnavailable
from agent.logins.common import logged_in, mount_key, required
from agent.plugin import Login, LoginContext, LoginKind, Where
from agent.sources.vault import mount_path_problem


class AppRoleLogin(LoginKind):
    name = "approle"
    holder = "AppRole role"

    def mount(self, config: Any) -> str:
        """``auth_mount``, else its old name ``approle_mount``, else ``approle``."""
        mount: str = config.auth_mount or config.approle_mount or "approle"
        return mount

    def check(self, config: Any, where: Where) -> Iterator[str]:
        for file_key in ("role_id_file", "secret_id_file"):
            yield from required(self.name, config, where, file_key)
        for key in ("auth_mount", "approle_mount"):
            value = getattr(config, key)
            if value is not None:
                problem = mount_path_problem(value, "approle")
                if problem:
                    yield f"{where.at(key)}: {problem}"
        if config.auth_mount and config.approle_mount and config.auth_mount != config.approle_mount:
            yield (
                f"{where.at('approle_mount')}: the old name of auth_mount, set to another mount "
                f"({config.approle_mount!r} against {config.auth_mount!r}): keep auth_mount only"
            )

    def describe(self, config: Any) -> str:
        return "approle login"

    def what(self, config: Any) -> str:
        return f"AppRole login at auth/{self.mount(config)}"

    def login(self, config: Any, ctx: LoginContext) -> Login:
        """Log in at ``auth/<mount>/login`` with the role_id and secret_id files."""
        import hvac.exceptions

        role_id = ctx.read_file(config.role_id_file, "role_id_file")
        secret_id = ctx.read_file(config.secret_id_file, "secret_id_file")
        where = f"auth/{self.mount(config)}"
        key = ctx.config_key
        try:
            response = ctx.client.auth.approle.login(
                role_id=role_id, secret_id=secret_id, mount_point=self.mount(config)
            )
        except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
            raise SourceUnavailable(
                f"AppRole login at {where} on Vault at {ctx.address} rejected "
                f"({ctx.vault_errors(exc)}): check role_id/secret_id ({key}.role_id_file "
                f"= {config.role_id_file}, {key}.secret_id_file = {config.secret_id_file}; the "
                f"secret_id may have expired or reached its use limit) and that AppRole is "
                f"mounted at {where} ({key}.{mount_key(config)})"
            ) from None
        except hvac.exceptions.InvalidPath:
            raise SourceUnavailable(
                f"no AppRole auth method at {where} on Vault at {ctx.address}: enable it "
                f"(`vault auth enable approle`) or set {key}.{mount_key(config)}"
            ) from None
        return logged_in(response, f"AppRole login at {where}", ctx)


KIND = AppRoleLogin()
