"""What a worker's threads did and when: intervals with wall-clock times, so that the timelines of
several workers (and of fedbcd against parablock) line up. `--timeline FILE` writes them as JSONL,
one line per interval as it ends (nothing is kept in memory; a crash leaves what was done)."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path


class Timeline:
    def __init__(self, worker: str, path: Path | None = None):
        """Without `path` nothing is recorded."""
        self.worker = worker
        self._file = open(path, "w") if path is not None else None  # noqa: SIM115 (closed by close())
        self._lock = threading.Lock()

    @contextmanager
    def span(self, kind: str, round: int | None = None, **extra):
        """Record the enclosed interval as `kind` ("compute", "idle", "upload", "download")."""
        start = time.time()
        try:
            yield
        finally:
            if self._file is not None:
                event = {"worker": self.worker, "kind": kind, "round": round, "start": start, "end": time.time(), **extra}
                with self._lock:
                    if not self._file.closed:
                        self._file.write(json.dumps(event) + "\n")
                        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            with self._lock:
                self._file.close()
