"""Prometheus metrics of DESIGN §8, in a registry of their own (no global registry).

Every series carries a ``profile`` label; :meth:`Metrics.forget` drops all of a removed profile's
series, so a reload that removes a profile does not leave its last values exported forever.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

from agent.manager import State

#: the values of ``dvs_agent_profile_state{state}`` (DESIGN §8), one of them 1 at a time: the
#: profile's states, in their order
STATES: tuple[str, ...] = tuple(state.value for state in State)

#: from a token served from a local test server (~5 ms) to retries and backoff inside one
#: refresh (tens of seconds)
REFRESH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
#: the local proxy's added latency: well under a millisecond when healthy
PROXY_BUCKETS = (0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

_Series = tuple[MetricWrapperBase, tuple[str, ...]]


class Metrics:
    """The agent's metrics; the manager, the sinks and the triggers report, ``/metrics`` renders.

    Thread-safe: reports come from scheduler and trigger threads while HTTP threads render.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        #: per profile, every label set this object created (for ``forget``)
        self._series: dict[str, set[_Series]] = {}
        #: per profile, the provider_slug label of its current expiry series
        self._slugs: dict[str, str] = {}

        self._token_requests = Counter(
            "dvs_agent_token_requests",
            "Token endpoint requests by outcome "
            "(ok, reused, rejected, misconfigured, unavailable, rate_limited, protocol_error)",
            ["profile", "outcome"],
            registry=self.registry,
        )
        self._triggers = Counter(
            "dvs_agent_triggers",
            "Rotation triggers received (poll: a source version changed, sighup, event, "
            "refresh, 401)",
            ["profile", "trigger"],
            registry=self.registry,
        )
        self._rotations = Counter(
            "dvs_agent_rotations",
            "Times the credentials in use changed, by the trigger that found it (poll, sighup, "
            "event, refresh, 401, schedule), counted at their first use",
            ["profile", "trigger"],
            registry=self.registry,
        )
        self._sink_writes = Counter(
            "dvs_agent_sink_writes",
            "Token writes per sink by outcome (ok, error)",
            ["profile", "sink", "outcome"],
            registry=self.registry,
        )
        self._source_errors = Counter(
            "dvs_agent_source_errors",
            "Failed reads or version checks of a credential source",
            ["profile", "source"],
            registry=self.registry,
        )
        self._refresh_duration = Histogram(
            "dvs_agent_refresh_duration_seconds",
            "Duration of one refresh: sources, token request (with its retries) and sinks",
            ["profile"],
            buckets=REFRESH_BUCKETS,
            registry=self.registry,
        )
        self._state = Gauge(
            "dvs_agent_profile_state",
            "1 for the profile's current state (starting, ok, degraded, expired, misconfigured)",
            ["profile", "state"],
            registry=self.registry,
        )
        self._expiry = Gauge(
            "dvs_agent_token_expiry_timestamp_seconds",
            "Unix time at which the profile's current token expires",
            ["profile", "provider_slug"],
            registry=self.registry,
        )
        self._last_success = Gauge(
            "dvs_agent_last_success_timestamp_seconds",
            "Unix time of the profile's last successful refresh",
            ["profile"],
            registry=self.registry,
        )
        self._source_in_use = Gauge(
            "dvs_agent_source_in_use",
            "1 for the credential source whose credentials are in use, 0 for the other sources",
            ["profile", "source"],
            registry=self.registry,
        )
        self._login_expiry = Gauge(
            "dvs_agent_login_credential_expiry_timestamp_seconds",
            "Unix time at which the credential of the profile's Vault login expires (the JWT "
            "of jwt and kubernetes logins, the client certificate of cert logins)",
            ["profile", "method"],
            registry=self.registry,
        )
        self._fleet_adoptions = Counter(
            "dvs_agent_fleet_adoptions",
            "Fleet mode: tokens taken from the fleet's store instead of a token request",
            ["profile"],
            registry=self.registry,
        )
        self._fleet_leases = Counter(
            "dvs_agent_fleet_leases",
            "Fleet mode: the mint lease, by outcome (won: this agent asks for the fleet; lost: "
            "another does; expired: a lease ended before its token was published; renewed)",
            ["profile", "outcome"],
            registry=self.registry,
        )
        self._fleet_store_up = Gauge(
            "dvs_agent_fleet_store_up",
            "Fleet mode: 1 when the fleet's store answered the last read, 0 when it could not "
            "be used (the agent then asks the auth server on its own)",
            ["profile"],
            registry=self.registry,
        )

        self._proxy_requests = Counter(
            "dvs_agent_proxy_requests",
            "Local proxy: requests answered, by status (499: the client went away first)",
            ["profile", "status"],
            registry=self.registry,
        )
        self._proxy_added = Histogram(
            "dvs_agent_proxy_added_seconds",
            "Local proxy: the time it adds to a request before the answer starts (the whole "
            "time minus the upstream's)",
            ["profile"],
            buckets=PROXY_BUCKETS,
            registry=self.registry,
        )
        self._proxy_replays = Counter(
            "dvs_agent_proxy_replays",
            "Local proxy: requests replayed once with a renewed token after a 401",
            ["profile"],
            registry=self.registry,
        )

    # ------------------------------------------------------------------------------- counters

    def token_request(self, profile: str, outcome: str) -> None:
        """One request to the token endpoint ended with ``outcome``."""
        with self._lock:
            self._counter(self._token_requests, profile, outcome).inc()

    def trigger(self, profile: str, trigger: str) -> None:
        """A rotation trigger arrived (poll, sighup, event, refresh, 401)."""
        with self._lock:
            self._counter(self._triggers, profile, trigger).inc()

    def rotation(self, profile: str, trigger: str) -> None:
        """The credentials in use changed; ``trigger`` found it."""
        with self._lock:
            self._counter(self._rotations, profile, trigger).inc()

    def sink_write(self, profile: str, sink: str, outcome: str) -> None:
        """One write of ``sink`` (its label, e.g. ``file:/run/dvs-agent/token``): ok or error."""
        with self._lock:
            self._counter(self._sink_writes, profile, sink, outcome).inc()

    def source_error(self, profile: str, source: str) -> None:
        """A read or version check of ``source`` failed."""
        with self._lock:
            self._counter(self._source_errors, profile, source).inc()

    def refresh_duration(self, profile: str, seconds: float) -> None:
        """One refresh took ``seconds``."""
        with self._lock:
            self._track(self._refresh_duration, profile)
            self._refresh_duration.labels(profile).observe(seconds)

    # --------------------------------------------------------------------------------- gauges

    def state(self, profile: str, state: str) -> None:
        """``state`` (one of :data:`STATES`) is 1, the four others 0."""
        if state not in STATES:
            raise ValueError(f"unknown profile state {state!r}; expected one of {STATES}")
        with self._lock:
            for each in STATES:
                self._track(self._state, profile, each)
                self._state.labels(profile, each).set(1 if each == state else 0)

    def token(self, profile: str, provider_slug: str | None, expires_at: float) -> None:
        """The profile now holds a token expiring at ``expires_at`` (Unix time).

        A token of another provider_slug replaces the series of the previous one.
        """
        slug = provider_slug or ""
        with self._lock:
            old = self._slugs.get(profile)
            if old is not None and old != slug:
                self._drop(self._expiry, profile, old)
            self._slugs[profile] = slug
            self._track(self._expiry, profile, slug)
            self._expiry.labels(profile, slug).set(expires_at)

    def last_success(self, profile: str, at: float) -> None:
        """The profile's last successful refresh ended at ``at`` (Unix time)."""
        with self._lock:
            self._track(self._last_success, profile)
            self._last_success.labels(profile).set(at)

    def source_in_use(self, profile: str, source: str, sources: Sequence[str]) -> None:
        """``source`` is 1 and the profile's other ``sources`` 0.

        Sources no longer listed (after a reload) lose their series.
        """
        listed = dict.fromkeys([*sources, source])
        with self._lock:
            for metric, labels in list(self._series.get(profile, ())):
                if metric is self._source_in_use and labels[1] not in listed:
                    self._drop(metric, *labels)
            for each in listed:
                self._track(self._source_in_use, profile, each)
                self._source_in_use.labels(profile, each).set(1 if each == source else 0)

    def login_credential_expiry(self, profile: str, method: str, at: float) -> None:
        """The credential a Vault login of ``profile`` used (``method``) expires at ``at``."""
        with self._lock:
            self._track(self._login_expiry, profile, method)
            self._login_expiry.labels(profile, method).set(at)

    def fleet_adoption(self, profile: str) -> None:
        with self._lock:
            self._counter(self._fleet_adoptions, profile).inc()

    def fleet_lease(self, profile: str, outcome: str) -> None:
        with self._lock:
            self._counter(self._fleet_leases, profile, outcome).inc()

    def fleet_store_up(self, profile: str, up: bool) -> None:
        with self._lock:
            self._track(self._fleet_store_up, profile)
            self._fleet_store_up.labels(profile).set(1 if up else 0)

    def proxy_request(self, profile: str, status: int) -> None:
        with self._lock:
            self._counter(self._proxy_requests, profile, str(status)).inc()

    def proxy_added(self, profile: str, seconds: float) -> None:
        with self._lock:
            self._track(self._proxy_added, profile)
            self._proxy_added.labels(profile).observe(seconds)

    def proxy_replay(self, profile: str) -> None:
        with self._lock:
            self._counter(self._proxy_replays, profile).inc()

    # ------------------------------------------------------------------------------ lifecycle

    def forget(self, profile: str) -> None:
        """Drop every series of ``profile`` (removed from the config)."""
        with self._lock:
            for metric, labels in self._series.pop(profile, set()):
                metric.remove(*labels)
            self._slugs.pop(profile, None)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every series, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # -------------------------------------------------------------------------------- helpers

    def _counter(self, metric: Counter, *labels: str) -> Counter:
        self._track(metric, *labels)
        return metric.labels(*labels)

    def _track(self, metric: MetricWrapperBase, *labels: str) -> None:
        """Remember a label set (``labels[0]`` is the profile); the caller holds the lock."""
        self._series.setdefault(labels[0], set()).add((metric, labels))

    def _drop(self, metric: MetricWrapperBase, *labels: str) -> None:
        """Remove one label set and forget it; the caller holds the lock."""
        series = self._series.get(labels[0])
        if series is not None and (metric, labels) in series:
            series.discard((metric, labels))
            metric.remove(*labels)
