"""An in-memory fleet store (DESIGN §13) for in-process tests of the fleet coordinator.

:class:`MemoryFleetStore` implements :class:`agent.plugin.FleetStore` with the semantics of
the real stores, against an injected clock (Unix seconds, the store's own time):

- every entry (token document, lease, marker) is kept with an expiry; one past it is gone;
- ``acquire`` sets the lease only when none is live (Redis ``SET NX PX``);
- ``renew`` and ``release`` act only while the lease still holds the value given;
- ``publish`` writes only ``generation == stored + 1`` (a Vault ``cas``), and the generation
  is remembered after the document has expired (Redis' counter, Vault's version);
- ``read`` returns the three live entries with their remaining life and the store's ``now``.

Several handles share one store (:meth:`MemoryFleetStore.handle`): each agent (each
:class:`agent.fleet.coordinator.Fleet`) gets its own, so that calls are counted per agent and
one agent's store can fail while the other's answers (a partition). Failures: :meth:`go_down`
(every call), :meth:`fail_next` (the next N calls, of one method or of any), :meth:`fail_method`
(every call of some methods). :meth:`before` runs a function before the next call of a method,
outside the store's lock, so that a test can put another agent's move in a race window.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.errors import FleetStoreError
from agent.plugin import Snapshot, Stored

#: the store's methods that a test can make fail, count and hook
METHODS = (
    "check",
    "read",
    "acquire",
    "renew",
    "release",
    "clear_lease",
    "publish",
    "mark",
    "close",
)
KINDS = ("token", "lease", "marker")


@dataclass
class Entry:
    value: bytes
    #: store time (Unix s) when it is dropped; None: never
    expires: float | None


@dataclass(frozen=True)
class Write:
    """One value written to the store (for the "no secret in the store" checks)."""

    handle: str
    method: str
    key: str
    value: bytes


@dataclass
class _Data:
    """What every handle of one store shares."""

    clock: Callable[[], float]
    lock: threading.RLock = field(default_factory=threading.RLock)
    entries: dict[tuple[str, str], Entry] = field(default_factory=dict)
    generations: dict[str, int] = field(default_factory=dict)
    writes: list[Write] = field(default_factory=list)
    #: calls of every handle, by method
    calls: Counter[str] = field(default_factory=Counter)


class MemoryFleetStore:
    """One agent's handle on an in-memory fleet store (see the module's text)."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        name: str = "memory",
        _data: _Data | None = None,
    ) -> None:
        self.name = name
        self._data = _data if _data is not None else _Data(clock=clock)
        #: this handle's calls, by method (failed ones included)
        self.calls: Counter[str] = Counter()
        #: this handle's calls that raised FleetStoreError, by method
        self.failures: Counter[str] = Counter()
        self.down = False
        #: the text of the errors raised while down (None: a default naming the method)
        self.down_message: str | None = None
        self.closed = False
        self._failing: set[str] = set()
        self._fail_next: list[tuple[int, str | None]] = []
        self._hooks: dict[str, list[Callable[[], object]]] = {}
        self._switches = threading.Lock()

    # ------------------------------------------------------------------ test controls
    def handle(self, name: str | None = None) -> MemoryFleetStore:
        """Another handle on the same entries (its own counters and failure switches)."""
        return MemoryFleetStore(
            self._data.clock, name=name if name is not None else self.name, _data=self._data
        )

    @property
    def all_calls(self) -> Counter[str]:
        """The calls of every handle of this store, by method."""
        with self._data.lock:
            return Counter(self._data.calls)

    @property
    def writes(self) -> list[Write]:
        """Every value written through any handle, oldest first."""
        with self._data.lock:
            return list(self._data.writes)

    def now(self) -> float:
        return self._data.clock()

    def go_down(self, message: str | None = None) -> None:
        """Every call raises FleetStoreError (saying ``message``) until :meth:`come_back`."""
        self.down_message = message
        self.down = True

    def come_back(self) -> None:
        """Answer again: clears :meth:`go_down`, :meth:`fail_next` and :meth:`fail_method`."""
        with self._switches:
            self.down = False
            self.down_message = None
            self._failing.clear()
            self._fail_next.clear()

    def fail_next(self, count: int = 1, method: str | None = None) -> None:
        """The next ``count`` calls (of ``method``, or of any method) raise FleetStoreError."""
        self._known(method)
        with self._switches:
            self._fail_next.append((count, method))

    def fail_method(self, *methods: str) -> None:
        """Every call of these methods raises FleetStoreError until :meth:`come_back`."""
        for method in methods:
            self._known(method)
        with self._switches:
            self._failing.update(methods)

    def before(self, method: str, action: Callable[[], object]) -> None:
        """Run ``action`` once, just before the next call of ``method`` through this handle
        (outside the store's lock: it may use the store)."""
        self._known(method)
        with self._switches:
            self._hooks.setdefault(method, []).append(action)

    def entry(self, key: str, kind: str) -> bytes | None:
        """The live value of ``kind`` (token, lease, marker) for ``key``; no call is counted."""
        with self._data.lock:
            found = self._live(key, kind)
            return None if found is None else found.value

    def expiry(self, key: str, kind: str) -> float | None:
        """When the live entry of ``kind`` is dropped (store time); None: absent or never."""
        with self._data.lock:
            found = self._live(key, kind)
            return None if found is None else found.expires

    def generation(self, key: str) -> int:
        with self._data.lock:
            return self._data.generations.get(key, 0)

    def put(self, key: str, kind: str, value: bytes, ttl: float | None) -> None:
        """Write an entry as is (a forged or hand-made one); no call is counted, no check."""
        if kind not in KINDS:
            raise ValueError(f"unknown entry kind {kind!r}")
        with self._data.lock:
            self._set(key, kind, value, ttl)
            self._data.writes.append(Write(self.name, "put", key, value))

    def set_generation(self, key: str, generation: int) -> None:
        with self._data.lock:
            self._data.generations[key] = generation

    # ------------------------------------------------------------------ FleetStore
    def check(self) -> None:
        self._enter("check")

    def read(self, key: str) -> Snapshot:
        self._enter("read")
        with self._data.lock:
            now = self.now()
            return Snapshot(
                now=now,
                token=self._stored(key, "token", now),
                lease=self._stored(key, "lease", now),
                marker=self._stored(key, "marker", now),
                generation=self._data.generations.get(key, 0),
            )

    def acquire(self, key: str, value: bytes, ttl: float) -> bool:
        self._enter("acquire")
        with self._data.lock:
            if self._live(key, "lease") is not None:
                return False
            self._write("acquire", key, "lease", value, ttl)
            return True

    def renew(self, key: str, value: bytes, ttl: float) -> bool:
        self._enter("renew")
        with self._data.lock:
            found = self._live(key, "lease")
            if found is None or found.value != value:
                return False
            found.expires = self.now() + _ttl(ttl)
            return True

    def release(self, key: str, value: bytes) -> bool:
        self._enter("release")
        with self._data.lock:
            found = self._live(key, "lease")
            if found is None or found.value != value:
                return False
            del self._data.entries[(key, "lease")]
            return True

    def clear_lease(self, key: str) -> bool:
        self._enter("clear_lease")
        with self._data.lock:
            found = self._live(key, "lease")
            self._data.entries.pop((key, "lease"), None)
            return found is not None

    def publish(self, key: str, value: bytes, generation: int, ttl: float) -> bool:
        self._enter("publish")
        with self._data.lock:
            current = self._data.generations.get(key, 0)
            if generation != current + 1:
                return False
            self._data.generations[key] = max(current, generation)
            self._write("publish", key, "token", value, ttl)
            return True

    def mark(self, key: str, value: bytes | None, ttl: float) -> None:
        self._enter("mark")
        with self._data.lock:
            if value is None:
                self._data.entries.pop((key, "marker"), None)
            else:
                self._write("mark", key, "marker", value, ttl)

    def close(self) -> None:
        self._enter("close")
        self.closed = True

    # ------------------------------------------------------------------ internals
    def _enter(self, method: str) -> None:
        """Count the call, run its hooks, raise when it is made to fail."""
        with self._switches:
            hooks = self._hooks.pop(method, [])
        for hook in hooks:
            hook()
        with self._switches:
            self.calls[method] += 1
            failing = self.down or method in self._failing
            message = self.down_message if self.down else None
            for index, (count, which) in enumerate(self._fail_next):
                if which is None or which == method:
                    failing = True
                    if count <= 1:
                        del self._fail_next[index]
                    else:
                        self._fail_next[index] = (count - 1, which)
                    break
        with self._data.lock:
            self._data.calls[method] += 1
        if failing and method != "close":
            self.failures[method] += 1
            raise FleetStoreError(
                message or f"{self.name}: the fleet's {method} failed (made to fail)"
            )

    def _known(self, method: str | None) -> None:
        if method is not None and method not in METHODS:
            raise ValueError(f"unknown store method {method!r}")

    def _live(self, key: str, kind: str) -> Entry | None:
        found = self._data.entries.get((key, kind))
        if found is None:
            return None
        if found.expires is not None and found.expires <= self.now():
            del self._data.entries[(key, kind)]
            return None
        return found

    def _stored(self, key: str, kind: str, now: float) -> Stored | None:
        found = self._live(key, kind)
        if found is None:
            return None
        remaining = None if found.expires is None else found.expires - now
        return Stored(value=found.value, remaining=remaining)

    def _set(self, key: str, kind: str, value: bytes, ttl: float | None) -> None:
        expires = None if ttl is None else self.now() + _ttl(ttl)
        self._data.entries[(key, kind)] = Entry(value=bytes(value), expires=expires)

    def _write(self, method: str, key: str, kind: str, value: bytes, ttl: float) -> None:
        self._set(key, kind, value, ttl)
        self._data.writes.append(Write(self.name, method, key, bytes(value)))


def _ttl(ttl: float) -> float:
    """Redis' ``PX``: whole milliseconds, at least one."""
    return max(1, int(ttl * 1000)) / 1000
