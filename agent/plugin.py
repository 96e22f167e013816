"""The public surface for source, sink and Vault login plug-ins (DESIGN §11); nothing else is
promised.

A plug-in is one module holding a *kind*: its config Struct (the TOML table or sink entry it
owns), its checks, a one-line :meth:`~SourceKind.describe`, the :class:`Target` used to find
duplicate targets and self-targeting write-backs, and :meth:`~SourceKind.build`, which imports
its SDK only then. A third-party package names its kind in the entry-point group
``dvs_agent.sources`` or ``dvs_agent.sinks`` (the value is ``module:attribute``, an instance or
a class of :class:`SourceKind` / :class:`SinkKind`)::

    [project.entry-points."dvs_agent.sinks"]
    doppler = "dvs_doppler:KIND"

A source kind owns the table ``[profiles.NAME.<kind>]`` (listed in ``sources``); a sink kind owns
the ``[[profiles.NAME.sinks]]`` entries with ``type = "<kind>"``, so its config Struct is
declared with ``tag="<kind>", tag_field="type"``. Both Structs should be ``frozen=True,
forbid_unknown_fields=True, kw_only=True``: unknown keys stay errors. A kind whose
``api_version`` differs from :data:`API_VERSION` is refused with a message naming it.

A Vault login method (:class:`LoginKind`, entry-point group ``dvs_agent.vault_logins``) reads
the keys of the vault table it is named in (``auth_method = "<kind>"``).

Checks yield messages that start with the key path they are about (``where.at("path")``);
``build`` raises :class:`~agent.errors.ConfigError` for what only the environment can tell
(a missing variable, an unreadable file). Never put a secret in a message.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import msgspec

from agent.errors import SourceEmpty, SourceUnavailable
from agent.fsutil import read_secret_file
from agent.keypath import Segment, key_path
from agent.models import Credentials, Secret, Token

if TYPE_CHECKING:
    from agent.config.schema import ProfileConfig

__all__ = [
    "API_VERSION",
    "BuildContext",
    "CredentialSource",
    "Credentials",
    "FleetStore",
    "FleetStoreKind",
    "Login",
    "LoginContext",
    "LoginKind",
    "Plugins",
    "Secret",
    "SinkKind",
    "Snapshot",
    "SourceKind",
    "Stored",
    "Target",
    "Token",
    "TokenSink",
    "TriggerKind",
    "Where",
]

#: the version of this interface; a kind declares the one it was written for
API_VERSION = 1

C = TypeVar("C", bound=msgspec.Struct)


class CredentialSource(Protocol):
    """Produces client credentials.

    ``read`` returns the current credentials (raising :class:`agent.errors.SourceEmpty` when
    there is nothing to read and :class:`agent.errors.SourceUnavailable` when the store cannot
    be asked now). ``version`` is a cheap check of what ``read`` would return: it changes when
    the credentials were rotated and is compared for equality only.
    """

    #: the kind's name ("env", "vault", "aws", ...): it labels logs, metrics and status
    name: str

    def read(self) -> Credentials: ...

    def version(self) -> str: ...

    def can_change(self) -> bool:
        """False when what ``read`` returns cannot change while the agent runs (polling it
        would be a busy loop); stores and files can change."""
        ...

    def close(self) -> None: ...


class TokenSink(Protocol):
    """Writes tokens somewhere consumers read them.

    ``check`` runs at start so that a bad target fails then, not at the first refresh;
    ``write`` raises :class:`agent.errors.SinkError` with a message naming the target.
    """

    #: a short label for logs and metrics, e.g. ``file:/run/dvs-agent/token``
    name: str
    #: consumers read this sink's target directly (a file): /readyz follows what it holds, and
    #: its close() never blocks (DESIGN §10 "Readiness is what consumers see")
    readiness: bool

    def check(self) -> None: ...

    def write(self, token: Token) -> None: ...

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until work a write started in the background (``on_change``) has ended; True
        when none runs."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Target:
    """What a sink writes or a source reads: two sinks on one target are a config error, and
    so is a sink on a profile's credential source.

    Targets of one ``store`` are compared by ``identity`` (or by ``same``, when equality of
    identities is too strict, e.g. a secret named by its name and by its ARN).
    """

    #: the kind of store: "file", "vault", "aws", "redis", ... (a source's target has the
    #: store of the sink that could write it)
    store: str
    #: equal identities of one store are one target
    identity: tuple[str, ...]
    #: how messages describe it: ``the Vault secret "secret/dvs" at https://vault:8200``
    what: str
    #: the key path that messages name
    key: str
    #: "file" | "secret" | "key": "two sinks cannot write one <noun>"
    noun: str = "target"
    #: whether two identities of this store name one target; None: equality
    same: Callable[[tuple[str, ...], tuple[str, ...]], bool] | None = field(
        default=None, compare=False
    )

    def is_same(self, other: Target) -> bool:
        if self.store != other.store:
            return False
        if self.same is not None:
            return self.same(self.identity, other.identity)
        return self.identity == other.identity


class Plugins(Protocol):
    """What a kind may look up in the registry that found it (:attr:`Where.plugins`)."""

    def login(self, name: str) -> LoginKind:
        """The Vault login method ``name`` (raises :class:`~agent.errors.ConfigError` when no
        plug-in provides it, or its plug-in does not load)."""
        ...

    def names(self, role: Any) -> list[str]:
        """Every kind of a role available ("source", "sink", "login")."""
        ...


@dataclass(frozen=True, slots=True)
class Where:
    """Where a kind's config sits, for its checks, description and target."""

    #: the profile's name
    profile: str
    #: the key path of the kind's table or sink entry: ``profiles.dvs.vault``,
    #: ``profiles.dvs.sinks[0]``
    key: str
    #: the path as segments (``["profiles", "dvs", "sinks", 0]``)
    segments: tuple[Segment, ...]
    #: the profile's source tables by kind name, as decoded (absent tables are not here)
    tables: Mapping[str, msgspec.Struct] = field(default_factory=dict)
    #: sources only: the kind is listed in the profile's ``sources``
    listed: bool = True
    #: the registry that found the kind (None: the built-ins only)
    plugins: Plugins | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        profile: str,
        rest: Sequence[Segment],
        *,
        tables: Mapping[str, msgspec.Struct] | None = None,
        listed: bool = True,
        plugins: Plugins | None = None,
    ) -> Where:
        """Where a table of profile ``profile`` is: ``rest`` = ``["vault"]``, ``["sinks", 0]``."""
        segments: tuple[Segment, ...] = ("profiles", profile, *rest)
        return cls(
            profile=profile,
            key=key_path(segments),
            segments=segments,
            tables={} if tables is None else tables,
            listed=listed,
            plugins=plugins,
        )

    def login(self, name: str) -> LoginKind:
        """The Vault login method ``name``, from :attr:`plugins` (else a built-in)."""
        if self.plugins is not None:
            return self.plugins.login(name)
        from agent.registry import Registry  # the registry imports this module

        return Registry().login(name)

    def at(self, *fields: Segment) -> str:
        """The key path of a key inside the table: ``where.at("path")``."""
        return key_path([*self.segments, *fields])

    def table(self, kind: str) -> msgspec.Struct | None:
        """The profile's ``[profiles.NAME.<kind>]`` table, or None when it has none."""
        return self.tables.get(kind)


@dataclass(frozen=True, slots=True)
class BuildContext:
    """What :meth:`SourceKind.build` and :meth:`SinkKind.build` get besides their config."""

    where: Where
    #: the process environment (tests pass their own)
    environ: Mapping[str, str]
    #: the profile's logger
    logger: logging.Logger
    #: the profile's ``request_timeout`` in seconds: the bound of one call to a store
    timeout: float
    #: ``report_expiry(method, at)``: a credential that a store login uses (a JWT, a client
    #: certificate) expires at ``at`` (Unix time), for
    #: ``dvs_agent_login_credential_expiry_timestamp_seconds`` (DESIGN §12)
    report_expiry: Callable[[str, float], None] = field(
        default=lambda method, at: None, compare=False, repr=False
    )


class _Kind(Generic[C]):
    #: the name in ``sources`` or a sink's ``type``
    name: ClassVar[str]
    #: the Struct that the kind's TOML table decodes into
    config_type: ClassVar[type[Any]]
    #: the interface version the kind was written for
    api_version: ClassVar[int] = API_VERSION

    def check(self, config: C, where: Where) -> Iterable[str]:
        """Problems that the Struct's types cannot express, each ``key.path: what is wrong``."""
        return ()

    def describe(self, config: C, where: Where) -> str:
        """One line about what it reads or writes, for ``dvs-agent check`` (no secrets)."""
        return self.name

    def targets(self, config: C, where: Where) -> Iterable[Target]:
        """What it reads (a source) or writes (a sink); nothing when its keys are invalid."""
        return ()

    def commands(self, config: C, where: Where) -> Iterable[tuple[str, Sequence[str]]]:
        """``(key path, argv)`` of each command it runs as the agent (a file sink's
        ``on_change``): the config file's trust warning names them (DESIGN §10)."""
        return ()


class SourceKind(_Kind[C]):
    """A credential source: ``[profiles.NAME.<name>]``, listed in ``sources``."""

    #: True: a profile that lists the source without a table gets ``config_type()`` (every
    #: key has a default); False: the table may be absent, and :meth:`check` gets None
    default_table: ClassVar[bool] = False

    def check_table(self, config: C | None, where: Where) -> Iterable[str]:
        """:meth:`check` for a table that may be absent (``where.listed`` tells whether the
        source is used; a table may be present for sinks to take defaults from)."""
        if config is None:
            return ()
        return self.check(config, where)

    def build(self, config: C | None, context: BuildContext) -> CredentialSource:
        raise NotImplementedError(f"source {self.name} has no build()")


class SinkKind(_Kind[C]):
    """A token sink: ``[[profiles.NAME.sinks]]`` with ``type = "<name>"``."""

    def build(self, config: C, context: BuildContext) -> TokenSink:
        raise NotImplementedError(f"sink {self.name} has no build()")


class RotationListener(Protocol):
    """A rotation trigger's running part (a thread long-polling a queue)."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 5.0) -> None: ...


class TriggerKind:
    """A rotation trigger beside version polling: it wakes profiles whose credentials an event
    says changed (DESIGN §5). Its keys sit in the source tables it watches (the aws source's
    ``events_queue_url``); built in only, no entry-point group."""

    name: ClassVar[str]

    def listeners(
        self,
        profiles: Mapping[str, ProfileConfig],
        on_rotation: Callable[[str, str], None],
        logger: logging.Logger,
    ) -> list[RotationListener]:
        """The listeners (not started) for these profiles; ``on_rotation(profile, detail)``
        is how they wake one. Imports its SDK only when a profile asks for it."""
        return []


# -- Vault login methods (DESIGN §12): ``auth_method`` of a vault table ---------------------------


@dataclass(frozen=True, slots=True)
class Login:
    """A Vault token and how long it lives, as a login (or a token look-up) answered."""

    token: str = field(repr=False)
    #: seconds the token lives from now; 0: no expiry (a root token) or none known
    ttl_seconds: int
    #: whether ``renew-self`` can extend it
    renewable: bool
    #: when the credential the login used (a JWT, a client certificate) expires, Unix time;
    #: None: it does not, or the method cannot tell
    credential_expires_at: float | None = None


@dataclass(frozen=True, slots=True)
class LoginContext:
    """What a login gets from its Vault connection besides the vault table."""

    #: the connection's ``hvac.Client`` (its TLS settings, namespace and timeout)
    client: Any
    #: the Vault server's address, for messages
    address: str
    #: the key path of the vault table (or vault sink) the keys come from: ``profiles.dvs.vault``
    config_key: str
    #: where ``$VAULT_TOKEN`` is looked up
    environ: Mapping[str, str]
    log: logging.Logger
    #: ``remember(slot, value)``: mask ``value`` in every text from Vault from now on (a newer
    #: value in the same slot replaces it)
    remember: Callable[[str, str], None]
    #: Vault's error text of an hvac exception, with every remembered value and the token in
    #: use masked
    vault_errors: Callable[[BaseException], str]
    #: the wall clock (Unix time), for the expiry of a JWT or a certificate
    wall: Callable[[], float] = time.time

    def read_file(self, path: str, key: str) -> str:
        """The stripped content of the credential file ``path`` that the vault key ``key``
        names, remembered (masked from now on). Raises SourceEmpty when it is missing or empty
        (it may appear), SourceUnavailable when it cannot be read; both name the key."""
        name = f"{self.config_key}.{key}"
        try:
            text = read_secret_file(path).strip()
        except FileNotFoundError:
            raise SourceEmpty(
                f"{path} ({name}) does not exist: write it, or set {name} to the file that "
                f"holds the {key.removesuffix('_file')}"
            ) from None
        except PermissionError:
            raise SourceUnavailable(
                f"{path} ({name}) is not readable by the agent (uid {os.geteuid()}): "
                "fix its owner or mode"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SourceUnavailable(f"cannot read {path} ({name}): {exc}") from None
        if not text:
            raise SourceEmpty(f"{path} ({name}) is empty")
        self.remember(key, text)
        return text


class LoginKind:
    """A Vault auth method: ``auth_method = "<name>"`` in a vault table (or a vault sink).

    Its keys are the vault table's (``auth_mount``, ``role``, ``jwt_file``, ``client_cert``,
    ...: ``config`` below is that table's Struct, with a vault sink's own keys applied). A
    third-party package names its kind in the entry-point group ``dvs_agent.vault_logins``.
    :meth:`login` imports hvac's parts it needs only then; it reads its credential files at
    every call (they rotate) through :meth:`LoginContext.read_file`, raises an
    :class:`~agent.errors.AgentError` for the failures it can explain and lets other hvac and
    requests errors through: the connection maps those, naming :meth:`what`.
    """

    #: the ``auth_method`` value
    name: ClassVar[str]
    #: the interface version the kind was written for
    api_version: ClassVar[int] = API_VERSION
    #: who holds the policy, in permission-denied hints ("the policy of the agent's HOLDER")
    holder: ClassVar[str] = "role"
    #: True: the token is handed to the agent, not made by a login (``token``): before it runs
    #: out, and after a 403, the connection reads it again and renews it instead of logging in
    given: ClassVar[bool] = False

    def mount(self, config: Any) -> str:
        """The auth method's mount: ``auth_mount``, else the method's name."""
        mount: str | None = getattr(config, "auth_mount", None)
        return mount or self.name

    def check(self, config: Any, where: Where) -> Iterable[str]:
        """Problems of the keys this method reads, each ``key.path: what is wrong``."""
        return ()

    def describe(self, config: Any) -> str:
        """What ``check`` says of the login (no secrets): ``jwt login (role dvs)``."""
        return f"{self.name} login"

    def what(self, config: Any) -> str:
        """The operation a failed login names: ``JWT login at auth/jwt``."""
        return f"{self.name} login at auth/{self.mount(config)}"

    def client_cert(self, config: Any) -> tuple[str, str] | None:
        """``(certificate file, key file)`` the connection presents in its TLS handshakes."""
        return None

    def login(self, config: Any, ctx: LoginContext) -> Login:
        raise NotImplementedError(f"login method {self.name} has no login()")


# -- fleet stores (DESIGN §13): ``[profiles.NAME.fleet]`` with ``store = "<kind>"`` --------------


@dataclass(frozen=True, slots=True)
class Stored:
    """One entry of a fleet store, as the store holds it."""

    #: the bytes written (a signed JSON entry: the store never interprets it)
    value: bytes = field(repr=False)
    #: seconds until the store drops it (Redis ``PTTL``; Vault: its write time plus the TTL it
    #: was written with, against the ``Date`` of Vault's answer); None: no expiry is known
    remaining: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The three entries of one fleet key, read together, and the store's own clock."""

    #: the store's time of the read, Unix seconds (Redis ``TIME``; Vault: the ``Date`` header)
    now: float
    token: Stored | None
    lease: Stored | None
    marker: Stored | None
    #: the last generation published for the key (0: none); the next publish must be this + 1
    generation: int


class FleetStore(Protocol):
    """Where the agents of one client share a token (DESIGN §13): three entries per fleet key
    (the token document, the mint lease, the marker), each written with a lifetime.

    The store only keeps bytes; the agent signs and checks them. Every method raises
    :class:`agent.errors.FleetStoreError` (naming the store and what to check) when the store
    cannot be reached or refuses; nothing else.
    """

    #: a short label for logs, metrics and status, e.g. ``redis:10.0.0.5:6379/0``
    name: str

    def check(self) -> None:
        """At start: what can be checked without a connection (files, URLs)."""
        ...

    def read(self, key: str) -> Snapshot: ...

    def acquire(self, key: str, value: bytes, ttl: float) -> bool:
        """Take the lease with ``value`` for ``ttl`` seconds unless a live lease exists."""
        ...

    def renew(self, key: str, value: bytes, ttl: float) -> bool:
        """Extend the lease to ``ttl`` from now only if it still holds ``value``."""
        ...

    def release(self, key: str, value: bytes) -> bool:
        """Drop the lease only if it still holds ``value``."""
        ...

    def clear_lease(self, key: str) -> bool:
        """Drop whatever lease exists (``dvs-agent fleet release``); True when one did."""
        ...

    def publish(self, key: str, value: bytes, generation: int, ttl: float) -> bool:
        """Store the token document with ``generation`` (the snapshot's + 1) for ``ttl``
        seconds; False when another publish took that generation first (newest wins)."""
        ...

    def mark(self, key: str, value: bytes | None, ttl: float) -> None:
        """Set (None: clear) the marker for ``ttl`` seconds."""
        ...

    def close(self) -> None: ...


class FleetStoreKind(_Kind[C]):
    """A fleet store: ``[profiles.NAME.fleet]`` with ``store = "<name>"`` (entry-point group
    ``dvs_agent.fleet_stores``); its config Struct is declared with ``tag="<name>",
    tag_field="store"`` and holds the common key ``lease`` besides its own."""

    def build(self, config: C, context: BuildContext) -> FleetStore:
        raise NotImplementedError(f"fleet store {self.name} has no build()")
