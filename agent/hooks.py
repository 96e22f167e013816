"""Running a sink's ``on_change`` hook beside the refresh, not in it (DESIGN §10).

:class:`HookRunner` runs one argv (no shell) for one sink:

- :meth:`HookRunner.submit` returns at once. It starts a thread for a run when none is running;
  while one runs, it marks one more run as pending instead: any number of newer tokens during a
  run lead to exactly one more run after it, which sees the newest file. The thread ends with
  the last run, so no thread is left idle while no hook runs.
- Each run is its own process group (``setpgroup=0``), started with an empty signal mask and
  default signal dispositions: the daemon's threads block SIGHUP/SIGTERM/SIGINT
  (:mod:`agent.signals`), and a child would otherwise inherit that mask. stdin and stdout are
  ``/dev/null``; stderr is a pipe, read bounded (the last :data:`STDERR_KEPT` bytes).
- At ``timeout`` the whole group is killed (SIGKILL). When the leader exits but has left a
  background process holding stderr, what stderr has is read for at most :data:`EXIT_GRACE`
  seconds, then the pipe is closed and the run is reported: a lingering child costs neither the
  timeout nor the next run (it is not the run any more and is left alone).
- :meth:`HookRunner.stop` kills every running hook's group at once; later submits do nothing.
- The environment is what the caller gives (:func:`hook_environment` builds the allowlist).

Why ``os.posix_spawn`` and not :mod:`subprocess`: a child of ``fork``/``vfork`` keeps the
calling thread's signal mask, and :mod:`subprocess` has no safe way to clear it (``preexec_fn``
is unsafe in a threaded process, and unblocking the signals in the calling thread would let it
take a SIGTERM that must wake the main thread). ``posix_spawn`` sets the child's mask and
dispositions between its clone and its exec (``setsigmask``, ``setsigdef``). It does not close
inherited descriptors as ``close_fds=True`` did: Python's own descriptors are close-on-exec
anyway, and the inheritable ones above 2 (inherited from whoever started the agent) get a close
action. glibc leaves its two internal signals (32, 33) ignored in the child; no program relies
on inheriting those (glibc and musl install their own handlers when they use them).

Nothing here ever logs the token: a hook's stderr is shown only through
:func:`agent.masking.outside`, with the values given to :meth:`HookRunner.submit` masked.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence

from agent.masking import outside, variants
from agent.signals import signals_to_main_thread

#: the environment variables a hook gets from the agent's environment (plus ``LC_*``)
ALLOWED_ENV = ("PATH", "LANG", "TZ", "HOME", "USER")
#: the longest ``on_change_timeout`` the config allows
MAX_TIMEOUT = 300.0
#: after the leader exits, how long stderr is still read (a background child may hold it)
EXIT_GRACE = 0.5
#: the bytes of stderr kept (the last ones): the log shows the last non-empty line of them
STDERR_KEPT = 4096
#: how many recent tokens' values are masked in a run's stderr (a hook may print an older one)
_MASKS_KEPT = 4
#: how often the leader is checked where ``pidfd_open`` is not available
_POLL_STEP = 0.05
#: every signal whose disposition can be reset (SIGKILL and SIGSTOP cannot be caught)
_DEFAULT_SIGNALS = tuple(
    sig for sig in signal.valid_signals() if sig not in (signal.SIGKILL, signal.SIGSTOP)
)

_log = logging.getLogger(__name__)


def hook_environment(
    environ: Mapping[str, str], *, profile: str, token_file: str
) -> dict[str, str]:
    """The environment of a hook: ``PATH``, ``LANG``, ``LC_*``, ``TZ``, ``HOME`` and ``USER``
    from ``environ`` where set, ``DVS_PROFILE`` (unless ``profile`` is empty) and
    ``DVS_TOKEN_FILE``; nothing else (no secret, ``NOTIFY_SOCKET``, ``CREDENTIALS_DIRECTORY``)."""
    env = {
        name: value
        for name, value in environ.items()
        if name in ALLOWED_ENV or name.startswith("LC_")
    }
    if profile:
        env["DVS_PROFILE"] = profile
    env["DVS_TOKEN_FILE"] = token_file
    return env


class HookRunner:
    """Runs ``argv`` after each new token, one run at a time, coalescing newer tokens.

    ``label`` names what the hook is for in log messages (``on_change for <label>: …``): a
    failure or a timeout is a WARNING naming ``argv[0]`` and the exit code, a success is INFO.
    Thread-safe; :meth:`submit` and :meth:`stop` never block on a hook.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        env: Mapping[str, str],
        label: str,
        logger: logging.Logger | None = None,
    ) -> None:
        if not argv:
            raise ValueError("a hook needs an argv")
        self.argv: tuple[str, ...] = tuple(argv)
        #: seconds a run may take before its process group is killed
        self.timeout = timeout
        self.env: dict[str, str] = dict(env)
        self.label = label
        self._log = logger or _log
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        #: the values to mask of the run pending after the current one (None: none pending)
        self._pending: tuple[str, ...] | None = None
        #: leaders of running hooks, not yet reaped (so their pids are still theirs)
        self._groups: set[int] = set()
        self._recent: collections.deque[tuple[str, ...]] = collections.deque(maxlen=_MASKS_KEPT)
        self._stopped = False

    def submit(self, mask: Sequence[str] = ()) -> None:
        """Run the hook for a new token, masking ``mask`` (the token's values) in its stderr.

        Returns at once: a run starts in a new thread, or, while one runs, one more run is
        marked pending (several submits during a run → one more run). Nothing after stop."""
        values = tuple(mask)
        with self._lock:
            if self._stopped:
                return
            self._recent.append(values)
            if self._thread is not None:
                self._pending = values
                return
            thread = threading.Thread(
                target=self._loop, args=(values,), name=f"on_change {self.label}", daemon=True
            )
            self._thread = thread
            # the hook thread must not take the signals the main thread serves
            with signals_to_main_thread():
                thread.start()

    def stop(self) -> None:
        """Kill every running hook's process group (SIGKILL) and refuse later submits.

        Non-blocking, thread-safe and idempotent; the run's thread reports and ends by itself."""
        with self._lock:
            self._stopped = True
            self._pending = None
            for pid in self._groups:
                _kill_group(pid)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no run is running or pending; True when that is so."""
        with self._idle:
            return self._idle.wait_for(lambda: self._thread is None, timeout)

    @property
    def busy(self) -> bool:
        """A run is running or pending."""
        with self._lock:
            return self._thread is not None

    # -- the run thread -----------------------------------------------------------------

    def _loop(self, values: tuple[str, ...]) -> None:
        try:
            while True:
                try:
                    self._run(values)
                except Exception as exc:  # a bug here must not end the hooks of this sink
                    self._log.warning(
                        "on_change for %s: %s could not be run: %s",
                        self.label,
                        self.argv[0],
                        type(exc).__name__,
                    )
                with self._idle:
                    # decided and cleared at once: a submit from now on starts a new thread
                    if self._stopped or self._pending is None:
                        self._end()
                        return
                    values, self._pending = self._pending, None
        except BaseException:
            with self._idle:
                self._end()
            raise

    def _end(self) -> None:
        """This run thread ends (under the lock)."""
        self._thread = None
        self._pending = None
        self._idle.notify_all()

    def _run(self, values: tuple[str, ...]) -> None:
        argv0 = self.argv[0]
        try:
            pid, stderr = self._spawn()
        except OSError as exc:
            reason = "not found" if isinstance(exc, FileNotFoundError) else exc.strerror
            self._log.warning(
                "on_change for %s: cannot run %s: %s", self.label, argv0, reason or exc
            )
            return
        with self._lock:
            self._groups.add(pid)
            if self._stopped:  # stop() came between the spawn and this line
                _kill_group(pid)
        try:
            status, timed_out, tail = self._watch(pid, stderr)
        finally:
            os.close(stderr)
            with self._lock:
                self._groups.discard(pid)
                stopped = self._stopped
                masks = [value for recent in self._recent for value in recent]
        code = None if status is None else os.waitstatus_to_exitcode(status)
        last = last_line(bytes(tail.data), truncated=tail.truncated, secrets=[*values, *masks])
        if timed_out:
            self._log.warning(
                "on_change for %s: %s timed out after %gs and was killed (exit code %s): %s",
                self.label,
                argv0,
                self.timeout,
                code,
                last,
            )
        elif code != 0 and stopped:
            self._log.warning(
                "on_change for %s: %s was killed as the agent stops (exit code %s): %s",
                self.label,
                argv0,
                code,
                last,
            )
        elif code != 0:
            self._log.warning(
                "on_change for %s: %s failed with exit code %s: %s",
                self.label,
                argv0,
                code,
                last,
            )
        else:
            self._log.info("on_change for %s: %s succeeded", self.label, argv0)

    def _spawn(self) -> tuple[int, int]:
        """Start the hook in its own process group; (its pid, the read end of its stderr)."""
        read_end, write_end = os.pipe()  # both close-on-exec
        try:
            if write_end <= 2:  # the agent runs without stdin/stdout: keep clear of 0-2
                moved = fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, 3)
                os.close(write_end)
                write_end = moved
            actions: list[tuple[object, ...]] = [
                (os.POSIX_SPAWN_DUP2, write_end, 2),
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            ]
            actions.extend((os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds())
            pid = os.posix_spawnp(
                self.argv[0],
                list(self.argv),
                self.env,
                file_actions=actions,
                setpgroup=0,
                setsigmask=(),
                setsigdef=_DEFAULT_SIGNALS,
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        return pid, read_end

    def _watch(self, pid: int, stderr: int) -> tuple[int | None, bool, _Tail]:
        """Wait for the leader (killing the group at the timeout), reading stderr meanwhile;
        then read what stderr still has for at most :data:`EXIT_GRACE`.

        Returns (the wait status, or None if it was lost; whether it timed out; stderr)."""
        tail = _Tail()
        deadline = time.monotonic() + self.timeout
        pidfd = _pidfd(pid)
        poller = select.poll()
        poller.register(stderr, select.POLLIN)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        open_stderr = True
        timed_out = False
        exited = False
        try:
            exited, status = self._reap(pid)
            while not exited:
                wait: float | None
                left = deadline - time.monotonic()
                if not timed_out and left <= 0:
                    timed_out = True
                    with self._lock:
                        _kill_group(pid)  # not reaped yet: the pid is still the leader's
                if timed_out:  # killed: wait for the leader to die (SIGKILL cannot be caught)
                    wait = None if pidfd is not None else _POLL_STEP
                else:
                    wait = left if pidfd is not None else min(left, _POLL_STEP)
                for fd, _ in poller.poll(None if wait is None else wait * 1000):
                    if fd == stderr and not tail.read(stderr):
                        poller.unregister(stderr)
                        open_stderr = False
                exited, status = self._reap(pid)
            grace_end = time.monotonic() + EXIT_GRACE
            while open_stderr and (left := grace_end - time.monotonic()) > 0:
                ready = select.poll()
                ready.register(stderr, select.POLLIN)
                if not ready.poll(left * 1000) or not tail.read(stderr):
                    break
        except BaseException:
            if not exited:  # never leave a hook running untracked
                with self._lock:
                    _kill_group(pid)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            raise
        finally:
            if pidfd is not None:
                os.close(pidfd)
        return status, timed_out, tail

    def _reap(self, pid: int) -> tuple[bool, int | None]:
        """(True, the leader's wait status) once it exited (the status is None if someone else
        reaped it), else (False, None). Under the lock, with the pid leaving :attr:`_groups`,
        so that :meth:`stop` never signals a pid that may belong to another process by now."""
        with self._lock:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                self._groups.discard(pid)
                return True, None
            if done == 0:
                return False, None
            self._groups.discard(pid)
            return True, status


class _Tail:
    """The last :data:`STDERR_KEPT` bytes read from a pipe."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.truncated = False

    def read(self, fd: int) -> bool:
        """Read what the pipe has; False at end of file (or on an error)."""
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return False
        if not chunk:
            return False
        self.data += chunk
        if len(self.data) > STDERR_KEPT:
            del self.data[: len(self.data) - STDERR_KEPT]
            self.truncated = True
        return True


def last_line(stderr: bytes, *, truncated: bool = False, secrets: Iterable[str] = ()) -> str:
    """The last non-empty line of ``stderr``, made safe to log by
    :func:`agent.masking.outside`: ``secrets`` masked, cut to 200 characters, controls escaped.

    ``truncated`` says the start of ``stderr`` was dropped: its first, partial line is not
    shown (it could hold the end of a secret)."""
    data = stderr
    if truncated:
        newline = data.find(b"\n")
        data = data[newline + 1 :] if newline >= 0 else b""
    lines = [line for line in data.split(b"\n") if line.strip()]
    if not lines:
        return "(stderr line too long to show)" if truncated else "(no stderr)"
    line = lines[-1].removesuffix(b"\r").decode(errors="replace")
    masked = [form for value in secrets if value for form in variants(value)]
    return outside(line, masked)


def _pidfd(pid: int) -> int | None:
    """A descriptor that polls readable when ``pid`` exits (Linux 5.3+), or None."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    try:
        return int(opener(pid))
    except OSError:  # an old kernel, or a seccomp filter: poll the pid instead
        return None


def _inheritable_fds() -> list[int]:
    """Descriptors above 2 that would survive an exec (inherited by the agent from its parent)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return []
    found = []
    for name in names:
        fd = int(name)
        if fd <= 2:
            continue
        with contextlib.suppress(OSError):
            if os.get_inheritable(fd):
                found.append(fd)
    return found


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
