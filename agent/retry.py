"""The one backoff of the agent: exponential, capped and jittered (DESIGN §11).

Every retry timescale uses it: the fast retries inside a token attempt (seconds,
:class:`agent.oauth.RetryPolicy`), the profile's retries after a failed refresh (seconds to
minutes, :class:`agent.policy.Timing`) and the SQS long-poll loop after an error. The jitter
takes a random share off each wait, so that a fleet that failed together does not retry in
lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

#: exponents beyond this add nothing but an overflow risk (2**64 dwarfs every cap)
_MAX_EXPONENT = 64


@dataclass(frozen=True, slots=True)
class Backoff:
    """Wait number ``n`` (0-based) is ``first * multiplier**n``, at most ``cap``, less a random
    share of up to ``jitter`` of it (all in seconds)."""

    first: float
    cap: float
    multiplier: float = 2.0
    #: 0.5: each wait is between half the ceiling and the ceiling
    jitter: float = 0.5

    def ceiling(self, n: int) -> float:
        """The wait before jitter."""
        return min(self.cap, self.first * self.multiplier ** min(max(n, 0), _MAX_EXPONENT))

    def delay(self, n: int, rng: random.Random) -> float:
        ceiling = self.ceiling(n)
        return ceiling - ceiling * rng.uniform(0, self.jitter)
