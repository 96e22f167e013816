"""The agent's profiles as the proxy sees them (:class:`agent.proxy.forward.Tokens`).

No HTTP stack here: :class:`ProfileTokens` reads a profile's held token and state (attribute
reads, safe from the proxy's thread) and asks for a renewal through the agent's rate-limited
``refresh`` path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from agent.clock import Clock
from agent.manager import Profile
from agent.models import Token


class ProfileTokens:
    """See the module's doc. ``profiles`` returns the running profiles (a reload replaces a
    rebuilt one: the proxy always asks for the current one by name)."""

    def __init__(
        self,
        profiles: Callable[[], Mapping[str, Profile]],
        *,
        clock: Clock,
        renew: Callable[[str], bool],
    ) -> None:
        self._profiles = profiles
        self._clock = clock
        self._renew = renew

    def current(self, profile: str) -> Token | None:
        held = self._profiles().get(profile)
        token = held.token if held is not None else None
        # a valid token held is used whatever the state says (a sink that cannot be written,
        # a rotation that failed): the proxy never drops a working token
        if token is None or not token.is_valid(self._clock()):
            return None
        return token

    def standing(self, profile: str) -> tuple[str, str | None]:
        held = self._profiles().get(profile)
        if held is None:
            return "removed", "the profile is no longer in the config"
        return held.state.value, held.last_error

    def renew(self, profile: str) -> bool:
        return self._renew(profile)
