"""The public surface for source and sink plug-ins (DESIGN §11); nothing else is promised.

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

Checks yield messages that start with the key path they are about (``where.at("path")``);
``build`` raises :class:`~agent.errors.ConfigError` for what only the environment can tell
(a missing variable, an unreadable file). Never put a secret in a message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import msgspec

from agent.keypath import Segment, key_path
from agent.models import Credentials, Secret, Token

if TYPE_CHECKING:
    from agent.config.schema import ProfileConfig

__all__ = [
    "API_VERSION",
    "BuildContext",
    "CredentialSource",
    "Credentials",
    "Secret",
    "SinkKind",
    "SourceKind",
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
