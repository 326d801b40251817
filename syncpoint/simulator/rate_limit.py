"""A token bucket, the shape of most per-key API quotas."""

from __future__ import annotations

import threading
import time


class TokenBucket:
    """``per_minute`` requests a minute, refilled continuously, bursting to one second's worth.

    A full minute's burst would let a client fire its whole quota at once and never see a
    429, which is exactly the behaviour the simulator exists to provoke.
    """

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0  # tokens per second
        self.capacity = max(1.0, self.rate)
        self._tokens = self.capacity
        self._updated = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take a token. Returns 0 on success, else the seconds until a token is available."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            if self._tokens >= 1:
                self._tokens -= 1
                return 0.0
            return (1 - self._tokens) / self.rate
