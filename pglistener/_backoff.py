"""Capped exponential backoff with jitter, after psycopg_pool's AttemptWithBackoff."""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays between attempts: the first retry at once, then `initial` doubling up to
    `maximum`, each scaled by a random factor in [0.5, 1.0) so that many listeners do not
    retry in step. The sequence starts over once a connection has stayed up for
    `reset_after` seconds (a flapping server keeps the long delays)."""

    JITTER = 0.5

    def __init__(
        self,
        initial: float,
        maximum: float,
        reset_after: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.reset_after = reset_after
        self._rand = rand
        self._failures = 0
        self._up_since: float | None = None

    def succeeded(self, now: float) -> None:
        self._up_since = now

    def failed(self, now: float) -> float:
        """Record a failure (a lost connection or a failed attempt); the delay before the
        next attempt."""
        if self._up_since is not None and now - self._up_since >= self.reset_after:
            self._failures = 0
        self._up_since = None
        self._failures += 1
        if self._failures == 1:
            return 0.0
        base = min(self.maximum, self.initial * 2.0 ** (self._failures - 2))
        return base * (1.0 - self.JITTER * self._rand())
