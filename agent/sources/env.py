"""The ``env`` source: ``DVS_CLIENT_ID``/``DVS_CLIENT_SECRET`` or ``…_FILE`` (a plug-in, §11)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping

import msgspec

from agent.config.checks import env_var_problem
from agent.errors import ConfigError, SourceEmpty, SourceUnavailable
from agent.fsutil import read_secret_file
from agent.models import Credentials, Secret
from agent.plugin import BuildContext, SourceKind, Where


class EnvSourceConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[profiles.NAME.env]``: the variables the ``env`` source reads (each also ``NAME_FILE``)."""

    client_id_var: str = "DVS_CLIENT_ID"
    client_secret_var: str = "DVS_CLIENT_SECRET"  # noqa: S105 - a variable name


class EnvKind(SourceKind[EnvSourceConfig]):
    name = "env"
    config_type = EnvSourceConfig
    default_table = True

    def check(self, config: EnvSourceConfig, where: Where) -> Iterator[str]:
        for var_key in ("client_id_var", "client_secret_var"):
            problem = env_var_problem(getattr(config, var_key))
            if problem:
                yield f"{where.at(var_key)}: {problem}"
        if config.client_id_var == config.client_secret_var:
            yield f"{where.at('client_secret_var')}: must differ from client_id_var"

    def describe(self, config: EnvSourceConfig, where: Where) -> str:
        return f"env ${config.client_id_var}, ${config.client_secret_var} (or their _FILE)"

    def build(self, config: EnvSourceConfig | None, context: BuildContext) -> EnvSource:
        return EnvSource(config or EnvSourceConfig(), environ=context.environ)


KIND = EnvKind()


class EnvSource:
    """Reads the client id and secret from environment variables.

    Each variable also honours ``NAME_FILE`` (a path, as Docker secrets and systemd credentials
    use); both set is an error; one trailing newline of a file is stripped. A ``_FILE`` is read
    again at every call, so rewriting it is a rotation.
    """

    name = "env"

    def __init__(
        self,
        config: EnvSourceConfig | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        config = config or EnvSourceConfig()
        self._id_var = config.client_id_var
        self._secret_var = config.client_secret_var
        self._environ = os.environ if environ is None else environ

    def read(self) -> Credentials:
        client_id = self._value(self._id_var)
        secret = self._value(self._secret_var)
        return Credentials(
            client_id=client_id,
            client_secret=Secret(secret),
            source=self.name,
            version=_version(client_id, secret),
        )

    def version(self) -> str:
        return self.read().version

    def can_change(self) -> bool:
        """Only through a ``_FILE``: a process's own environment does not change under it.

        So False also when one value comes from a file but the other is a plain variable that
        is unset or empty (or set beside its ``_FILE``): ``read`` fails the same way for as
        long as the process lives, and ``run`` exits 78 at start instead of retrying.
        """
        names = (self._id_var, self._secret_var)
        if not any(f"{var}_FILE" in self._environ for var in names):
            return False
        return not any(self._fixed_problem(var) for var in names)

    def _fixed_problem(self, var: str) -> bool:
        """``var`` is given (or missing) in a way that no file can change."""
        direct = self._environ.get(var)
        path = self._environ.get(f"{var}_FILE")
        if path is not None:
            # both set (an error until the environment changes), or a file with no name
            return direct is not None or not path
        return not direct  # unset or empty, with no file to appear later

    def close(self) -> None:
        return None

    def _value(self, var: str) -> str:
        direct = self._environ.get(var)
        file_var = f"{var}_FILE"
        path = self._environ.get(file_var)
        if direct is not None and path is not None:
            raise ConfigError(
                f"both {var} and {file_var} are set: set one of them (the env source reads "
                f"{var} directly, or the file that {file_var} names)"
            )
        if path is not None:
            value = _read_file(path, file_var)
        elif direct is not None:
            value = direct
        else:
            raise SourceEmpty(
                f"{var} is not set (nor {file_var}), and a plain variable cannot appear or change "
                f"in a running agent's environment: set {file_var} to a file holding the value "
                f"(re-read, so it may appear or rotate later; systemd: "
                f"Environment={file_var}=/etc/dvs-agent/..., or LoadCredential= with "
                f"{file_var}=%d/...), or set {var} itself"
            )
        if not value and path is not None:
            raise SourceEmpty(f"the file {path} ({file_var}) is empty")
        if not value:
            raise SourceEmpty(
                f"{var} is empty, and a plain variable cannot appear or change in a running "
                f"agent's environment: set {file_var} to a file holding the value instead"
            )
        return value


def _read_file(path: str, file_var: str) -> str:
    try:
        text = read_secret_file(path)
    except FileNotFoundError:
        raise SourceEmpty(f"{file_var} names {path}, which does not exist") from None
    except PermissionError:
        raise SourceUnavailable(
            f"{file_var} names {path}, which the agent (uid {os.geteuid()}) may not read: "
            "fix its owner or mode"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceUnavailable(f"cannot read {path} ({file_var}): {exc}") from None
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


def _version(client_id: str, secret: str) -> str:
    digest = hashlib.sha256(client_id.encode() + b"\0" + secret.encode()).hexdigest()
    return f"sha256:{digest[:16]}"
