"""What a worker's threads did and when: intervals with wall-clock times, so that the timelines of
several workers (and of fedbcd against parablock) line up. `--timeline FILE` writes them as JSONL."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path


class Timeline:
    def __init__(self, worker: str):
        self.worker = worker
        self._events: list[dict] = []
        self._lock = threading.Lock()

    @contextmanager
    def span(self, kind: str, round: int | None = None, **extra):
        """Record the enclosed interval as `kind` ("compute", "idle", "upload", "download")."""
        start = time.time()
        try:
            yield
        finally:
            event = {"worker": self.worker, "kind": kind, "round": round, "start": start, "end": time.time(), **extra}
            with self._lock:
                self._events.append(event)

    def events(self) -> list[dict]:
        with self._lock:
            return list(self._events)

    def write(self, path: Path) -> None:
        with open(path, "w") as f:
            for event in self.events():
                f.write(json.dumps(event) + "\n")
