"""No two sinks on one target, and no sink on a credential source (DESIGN §3).

Each kind names what it reads or writes as a :class:`~agent.plugin.Target`; this module only
compares them, across every profile, and says which keys collide.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from agent.keypath import toml_repr
from agent.plugin import Target


def target_problems(
    sources: Sequence[tuple[str, Target]], sinks: Sequence[tuple[str, Target]]
) -> Iterator[str]:
    """``(profile, target)`` of every listed source and every sink, in file order."""
    written: list[tuple[str, Target]] = []
    for profile, target in sinks:
        source = next((s for s in sources if target.is_same(s[1])), None)
        if source is not None:
            yield _source_targeted(profile, target, *source)
        other = next((t for _, t in written if target.is_same(t)), None)
        if other is not None:
            yield _duplicate(target, other)
        else:
            written.append((profile, target))


def _duplicate(target: Target, other: Target) -> str:
    if target.noun == "file":
        return (
            f"{target.key}: {target.what} is also the path of {other.key}; "
            "two sinks cannot write one file"
        )
    also = "" if target.what == other.what else f" ({other.what})"
    return (
        f"{target.key}: {target.what} is also written by {other.key}{also}; "
        f"two sinks cannot write one {target.noun}"
    )


def _source_targeted(profile: str, target: Target, source_profile: str, source: Target) -> str:
    if source_profile == profile:
        return (
            f"{target.key}: {target.what} is the profile's own credential source "
            f"({source.key}): it would trigger rotations forever (every token written there "
            "changes the source's version); write the token to another secret"
        )
    return (
        f"{target.key}: {target.what} is the credential source of profile "
        f"{toml_repr(source_profile)} ({source.key}): the token would overwrite that "
        "profile's credentials; write it to another secret"
    )
