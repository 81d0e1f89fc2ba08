"""The worker's communication side: everything that talks to the coordinator, off the compute thread.

Three small loops, each on its own thread and each ending when `stop` is set:
- `read_events`: the coordinator's event stream; assignments go to the compute inbox, model notices
  wake the transfer loop, the end of the run stops the worker.
- `transfer`: uploads handed-over updates first (a round cannot close without them), then delta-syncs
  the global model when a newer version was announced, and puts the patch in the compute inbox.
- `heartbeats`: a heartbeat every interval, so a long training step never looks like a dead worker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import grpc

from ..common import wire
from ..common.codecs import CodecPipeline
from ..common.messages import Assignment, ModelNotice, RunEnd
from .metrics import WorkerMetrics
from .session import Session
from .state import ModelBook, Patch, Update
from .timeline import Timeline

log = logging.getLogger("fedblock.worker")


class Comm:
    def __init__(
        self,
        session: Session,
        book: ModelBook,
        inbox: queue.Queue,
        outbox: queue.Queue,
        metrics: WorkerMetrics,
        stop: threading.Event,
        timeline: Timeline,
        steps_done=lambda: 0,
    ):
        assert session.info is not None
        self.session = session
        self.info = session.info
        self.book = book
        self.inbox = inbox
        self.outbox = outbox
        self.metrics = metrics
        self.stop = stop
        self.timeline = timeline
        self.steps_done = steps_done
        self.codec = CodecPipeline(self.info.codec)
        self.wake = threading.Event()
        self.run_end: RunEnd | None = None
        self.error: BaseException | None = None
        self._announced = book.version  # newest model version announced by the coordinator
        self._requested = book.version  # newest version already downloaded (or being applied)
        self._lock = threading.Lock()

    # ---- events -----------------------------------------------------------------------------

    def read_events(self) -> None:
        try:
            for event in self.session.events():
                if isinstance(event, Assignment):
                    self._put(self.inbox, event)
                elif isinstance(event, ModelNotice):
                    with self._lock:
                        self._announced = max(self._announced, event.version)
                    self.wake.set()
                elif isinstance(event, RunEnd):
                    log.info("run ended (%s) at model version %d", event.reason, event.final_version)
                    self.run_end = event
                    self.stop.set()
                    return
            if not self.stop.is_set():
                raise ConnectionError("the coordinator closed the event stream")
        except grpc.RpcError as e:
            if not self.stop.is_set():
                self._fail(ConnectionError(f"event stream lost: {e.code().name}: {e.details()}"))
        except BaseException as e:
            self._fail(e)
        finally:
            self.wake.set()

    # ---- transfers --------------------------------------------------------------------------

    def transfer(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    update = self.outbox.get_nowait()
                except queue.Empty:
                    update = None
                if update is not None:
                    self._upload(update)
                    continue
                with self._lock:
                    target = self._announced if self._announced > self._requested else None
                if target is not None:
                    self._download(target)
                    continue
                self.wake.wait(timeout=0.5)
                self.wake.clear()
        except BaseException as e:
            self._fail(e)

    def notify_handover(self) -> None:
        self.wake.set()

    def _upload(self, update: Update) -> None:
        t0 = time.perf_counter()
        with self.timeline.span("upload", update.round, blocks=len(update.deltas)):
            self._send(update)
        self.metrics.comm_seconds.inc(time.perf_counter() - t0)

    def _send(self, update: Update) -> None:
        for block, delta in update.deltas.items():
            manifest, blob = wire.pack(
                block,
                delta,
                self.codec,
                round=update.round,
                base_version=update.base_version,
                chunk_size=self.info.chunk_size,
                num_tokens=max(1, update.tokens),
                train_loss=update.loss,
            )
            status = self.session.upload(manifest, blob)
            if status != "accepted":
                log.info("round %d %s: coordinator says %s", update.round, block, status)
                break  # the round closed without us: the other blocks would be late too

    def _download(self, announced: int) -> None:
        t0 = time.perf_counter()
        with self.timeline.span("download", announced):
            version, block_versions, blocks = self.session.download(self.book.request(announced))
            patch = Patch(version, block_versions, {b.block: b.tensors for b in blocks})
        with self._lock:
            self._requested = max(self._requested, version)
        self.metrics.comm_seconds.inc(time.perf_counter() - t0)
        self._put(self.inbox, patch)

    # ---- heartbeats -------------------------------------------------------------------------

    def heartbeats(self) -> None:
        interval = self.info.heartbeat_interval_s
        while not self.stop.wait(interval):
            try:
                version = self.session.heartbeat(self.book.version, self.steps_done())
                with self._lock:  # a missed notice is caught up through the heartbeat reply
                    if version > self._announced:
                        self._announced = version
                        self.wake.set()
            except grpc.RpcError as e:
                log.warning("heartbeat failed: %s", e.code().name)

    # ---- helpers ----------------------------------------------------------------------------

    def _put(self, q: queue.Queue, item) -> None:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _fail(self, error: BaseException) -> None:
        if self.stop.is_set():
            return
        log.error("communication failed: %s", error)
        self.error = error
        self.stop.set()
