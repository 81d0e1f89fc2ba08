"""A one-line live status on a terminal; nothing otherwise (log lines carry the same facts there)."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """`show(text)` rewrites the status line at most every `interval` seconds; `clear()` removes it.
    Off when the stream is not a terminal (e.g. under `fedblock simulate` or in a log file)."""

    def __init__(self, stream: TextIO | None = None, interval: float = 0.2):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.interval = interval
        self._last = 0.0
        self._width = 0
        self._lock = threading.Lock()

    def show(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < self.interval:
                return
            self._last = now
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self._width = len(text)

    def clear(self) -> None:
        if self.enabled and self._width:
            with self._lock:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
                self._width = 0
