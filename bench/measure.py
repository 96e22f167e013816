"""What the benches share: /proc readings of an agent process and the rotation pauses."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a mapping (``VmRSS`` -> ``"38400 kB"``, ``Threads`` -> ``"3"``)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


def oncpu_seconds(pids: Iterable[int]) -> float:
    """Nanosecond on-CPU time of the live threads of ``pids`` (/proc/PID/task/TID/schedstat);
    utime+stime count 10 ms ticks. Threads that ended are not counted: read it over a window
    in which none starts or ends."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total / 1e9


def spread_pauses(count: int, seed: int = 2026) -> list[float]:
    """Pauses (s) between seeing one rotation and making the next, spread evenly over one
    second in a shuffled order: the pause sets where the next write falls in a 1 s poll cycle,
    which decides most of a polled rotation's latency, so the median measures the agent and
    not the draws. The same ``seed`` gives every agent the same pauses."""
    pauses = [0.2 + (k + 0.5) / count for k in range(count)]
    random.Random(seed).shuffle(pauses)
    return pauses


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Ask ``proc`` to stop (``sig``), wait up to 10 s, then kill it."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
