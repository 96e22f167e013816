"""Errors the agent reports. Each maps to one sysexits exit code (DESIGN §7).

Messages name what to check next (the config key, the path, the HTTP status, the likely cause)
and never contain a token, a client secret or an Authorization header.
"""

from __future__ import annotations

EX_OK = 0
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_CANTCREAT = 73
#: `refresh` refused by the running agent's rate limit: try again later (nothing is wrong)
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78

#: `once` with several profiles exits with the most severe code, in this order.
SEVERITY = (EX_CONFIG, EX_NOPERM, EX_CANTCREAT, EX_UNAVAILABLE)


class AgentError(Exception):
    """Base class; ``exit_code`` is what `once` exits with when this ends a profile."""

    exit_code = 1


class ConfigError(AgentError):
    """The configuration is invalid or missing (also: a required credential is absent)."""

    exit_code = EX_CONFIG


class SourceUnavailable(AgentError):
    """A credential source could not be read now (down, unreachable, denied)."""

    exit_code = EX_UNAVAILABLE


class SourceEmpty(AgentError):
    """A credential source has nothing to read (an unset variable, a missing file).

    As the only source of a profile this is a configuration error (exit 78).
    """

    exit_code = EX_CONFIG


class CredentialsRejected(AgentError):
    """The auth server answered 401 invalid_client."""

    exit_code = EX_NOPERM


class RequestRejected(AgentError):
    """The auth server answered 400 or 405: the request is misconfigured (no fast retry)."""

    exit_code = EX_CONFIG


class AuthServerUnavailable(AgentError):
    """5xx, 429, timeouts, connection errors and malformed answers, after the retries."""

    exit_code = EX_UNAVAILABLE

    def __init__(
        self, message: str, *, retry_after: float | None = None, outcome: str = "unavailable"
    ) -> None:
        super().__init__(message)
        #: seconds the server asked us to wait (429 Retry-After), if any
        self.retry_after = retry_after
        #: the last failure's kind, for metrics: unavailable | rate_limited | protocol_error
        self.outcome = outcome


class FleetRateLimited(AuthServerUnavailable):
    """Fleet mode: the fleet's minter was answered 429; this agent waits for the marker's
    ``not_before`` instead of asking (no request was made)."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, retry_after=retry_after, outcome="rate_limited")


class FleetRejected(CredentialsRejected):
    """Fleet mode: the fleet's minter was answered 401 with these credentials; this agent
    waits for the marker's ``rejected_until`` instead of asking (no request was made)."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FleetStoreError(AgentError):
    """The fleet store cannot be reached or refused (fleet mode then mints alone): never the
    profile's failure, only ``dvs_agent_fleet_store_up`` 0 and a log line."""

    exit_code = EX_UNAVAILABLE


class SinkError(AgentError):
    """A sink could not be written (or, at start, cannot be)."""

    exit_code = EX_CANTCREAT


def most_severe(codes: list[int]) -> int:
    """The exit code for several profiles' outcomes: 78 > 77 > 73 > 69 > 0."""
    for code in SEVERITY:
        if code in codes:
            return code
    return max(codes, default=EX_OK)
