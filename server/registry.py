"""Workers known to the coordinator: names, sessions, liveness and each one's event queue."""

from __future__ import annotations

import queue
import secrets
import threading
import time
from dataclasses import dataclass, field

from ..common.messages import Event

EVENT_QUEUE_SIZE = 256  # a worker this far behind on events is treated as gone


class UnknownWorker(LookupError):
    """No such worker, or the session is not the worker's current one."""


class Ended(UnknownWorker):
    """The session's part in the run was ended by the coordinator (an operator dropped the worker, or
    revoked its token): every later call of that session hears why, and joining again does not help
    the same process (a new Join from a restarted worker starts afresh)."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"worker {name!r}: {reason}")
        self.reason = reason


@dataclass
class WorkerRecord:
    name: str
    index: int  # stable join order (kept in checkpoints; schedules number participants by name)
    session: str = ""
    connected: bool = False
    last_seen: float = 0.0
    local_steps: int = 0  # as its last heartbeat said
    updates_accepted: int = 0
    told_end: bool = False  # the worker has been sent the end of the run
    token: str = ""  # hash ("sha256:<hex>") of the token the current session joined with ("" none)
    ended: str = ""  # why the coordinator ended this session's part in the run ("" it did not)
    events: queue.Queue = field(default_factory=lambda: queue.Queue(EVENT_QUEUE_SIZE))


class Registry:
    """Thread-safe map of worker name -> record. A re-join under the same name starts a new session
    and ends the old one's event stream (the old session's calls are refused from then on)."""

    def __init__(self, clock=time.monotonic):
        self._workers: dict[str, WorkerRecord] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def join(self, name: str, token: str = "") -> WorkerRecord:
        with self._lock:
            record = self._workers.get(name)
            if record is None:
                record = WorkerRecord(name=name, index=len(self._workers))
                self._workers[name] = record
            else:
                _close_stream(record.events)
                record.events = queue.Queue(EVENT_QUEUE_SIZE)
            record.session = secrets.token_hex(16)
            record.connected = True
            record.told_end = False
            record.token, record.ended = token, ""
            record.last_seen = self._clock()
            return record

    def open_stream(self, name: str, session: str) -> queue.Queue:
        """A fresh event queue for a new Events stream of the worker; the previous stream (if any) ends.
        One stream per worker at a time: two readers of one queue would split its events."""
        with self._lock:
            record = self._workers.get(name)
            _check_ended(record, session)
            if record is None or not record.connected or not secrets.compare_digest(record.session, session):
                raise UnknownWorker(f"unknown worker or stale session: {name!r}")
            _close_stream(record.events)
            record.events = queue.Queue(EVENT_QUEUE_SIZE)
            record.last_seen = self._clock()
            return record.events

    def restore(self, names_to_index: dict[str, int]) -> None:
        """Known workers from a checkpoint (disconnected until they join again)."""
        with self._lock:
            for name, index in sorted(names_to_index.items(), key=lambda kv: kv[1]):
                self._workers.setdefault(name, WorkerRecord(name=name, index=index))

    def check(self, name: str, session: str) -> WorkerRecord:
        """The record of a worker acting under its current session; refreshes its liveness."""
        with self._lock:
            record = self._workers.get(name)
            _check_ended(record, session)
            if record is None or not record.connected or not secrets.compare_digest(record.session, session):
                raise UnknownWorker(f"unknown worker or stale session: {name!r}")
            record.last_seen = self._clock()
            return record

    def disconnect(self, name: str) -> bool:
        """Mark a worker gone and end its event stream; True if it was connected."""
        with self._lock:
            record = self._workers.get(name)
            if record is None or not record.connected:
                return False
            record.connected = False
            _close_stream(record.events)
            return True

    def end(self, name: str, event: Event, reason: str) -> bool:
        """End a connected worker's session: `event` (its RunEnd) is the last thing its stream gives,
        and every later call of the session raises Ended. True if it was connected."""
        with self._lock:
            record = self._workers.get(name)
            if record is None or not record.connected:
                return False
            record.connected = False
            record.ended = reason
            record.told_end = True  # told now; a stream it opens again hears it again (`Coordinator.events`)
            _close_stream(record.events, last=event)
            return True

    def send(self, name: str, event: Event) -> bool:
        """Queue an event for a connected worker; a worker whose queue is full is disconnected."""
        with self._lock:
            record = self._workers.get(name)
            if record is None or not record.connected:
                return False
            try:
                record.events.put_nowait(event)
                return True
            except queue.Full:
                pass
        self.disconnect(name)
        return False

    def connected(self) -> dict[str, int]:
        """{name: index} of connected workers."""
        with self._lock:
            return {w.name: w.index for w in self._workers.values() if w.connected}

    def all(self) -> list[WorkerRecord]:
        with self._lock:
            return list(self._workers.values())

    def indices(self) -> dict[str, int]:
        with self._lock:
            return {w.name: w.index for w in self._workers.values()}


def _check_ended(record: WorkerRecord | None, session: str) -> None:
    if record is not None and record.ended and not record.connected and secrets.compare_digest(record.session, session):
        raise Ended(record.name, record.ended)


def _close_stream(events: queue.Queue, last: Event | None = None) -> None:
    """Wake the stream reader with the end marker (after `last`, if given), dropping queued events if
    the queue is full."""
    for item in (() if last is None else (last,)) + (None,):
        while True:
            try:
                events.put_nowait(item)
                break
            except queue.Full:
                try:
                    events.get_nowait()
                except queue.Empty:
                    pass
