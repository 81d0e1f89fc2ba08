"""Token-bucket rate limiting of a byte stream (a worker's upload or download link)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TokenBucket:
    """`consume(n)` blocks until n bytes fit a budget of `rate` bytes per second.

    The bucket holds at most `burst` bytes of credit (default: 50 ms worth, at least 64 KiB), so an idle
    link cannot later send a large burst. A request larger than the credit is let through at once and
    paid for by sleeping (the balance goes negative), which keeps the long-run rate exact for any chunk
    size. `rate` 0 means unlimited.
    """

    def __init__(self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(64 * 1024, 0.05 * rate))
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = threading.Lock()

    def consume(self, nbytes: int) -> float:
        """Take `nbytes` from the bucket; returns the seconds slept."""
        if self.rate == 0 or nbytes <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait
