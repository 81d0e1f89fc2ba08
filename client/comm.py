"""The worker's communication side: everything that talks to the coordinator, off the compute thread.

Three small loops, each on its own thread and each ending when `stop` is set:
- `read_events`: the coordinator's event stream; assignments go to the compute inbox, model notices
  wake the transfer loop, the end of the run stops the worker.
- `transfer`: uploads handed-over updates first (a round cannot close without them), then delta-syncs
  the global model when a newer version was announced, and puts the patch in the compute inbox.
- `heartbeats`: a heartbeat every interval, so a long training step never looks like a dead worker.

When the coordinator cannot be reached, or no longer knows this worker's session (it restarted, or
dropped us after a silence), whichever loop notices first joins again under the same name, with
exponential back-off and jitter, forever unless --max-retries says otherwise. The update being sent
is kept and sent again (resuming from the chunks the coordinator holds), and the next delta sync asks
for every block this worker changed, so its copy is the coordinator's again.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time

import grpc

from ..common import wire
from ..common.codecs import CodecPipeline
from ..common.messages import Assignment, ModelNotice, RunEnd
from .metrics import WorkerMetrics
from .session import TRANSIENT, Session, backoff_delays
from .state import ModelBook, Patch, Update
from .timeline import Timeline

log = logging.getLogger("fedblock.worker")

# Errors after which joining again may help: the link broke, or the coordinator lost our session.
RECONNECT = TRANSIENT | {grpc.StatusCode.UNAUTHENTICATED}


class GiveUp(Exception):
    """Reconnection is impossible (refused, another run) or --max-retries ran out."""


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
        num_examples: int = 0,
        device: str = "cpu",
        max_retries: int = 0,
        max_backoff: float = 30.0,
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
        self.num_examples = num_examples
        self.device = device
        self.max_retries = max_retries
        self.max_backoff = max_backoff
        self.codec = CodecPipeline(self.info.codec)
        self.wake = threading.Event()
        self.run_end: RunEnd | None = None
        self.error: BaseException | None = None
        self.reconnects = 0
        self._generation = 0  # sessions joined so far; a failure seen in an old one needs no new join
        self._join_lock = threading.Lock()
        self._announced = book.version  # newest model version announced by the coordinator
        self._requested = book.version  # newest version downloaded (or being applied)
        self._resync = False  # the next delta sync asks for every block we changed
        self._pending: Update | None = None  # the update being sent; kept across a re-join
        # Updates accepted for rounds that have not closed yet: a coordinator killed before it checkpointed
        # such a round has lost them, and gets them again after the re-join (deterministic rounds plan the
        # same assignment again; a coordinator that still has them answers "duplicate").
        self._unclosed: list[Update] = []
        self._resend: list[Update] = []
        self._fresh = False  # _pending came from the compute thread and has not been tried yet
        self._lock = threading.Lock()

    # ---- events -----------------------------------------------------------------------------

    def read_events(self) -> None:
        self._loop(self._read_events_once)

    def _read_events_once(self) -> None:
        for event in self.session.events():
            if isinstance(event, Assignment):
                self._put(self.inbox, event)
            elif isinstance(event, ModelNotice):
                self._announce(event.version)
            elif isinstance(event, RunEnd):
                log.info("run ended (%s) at model version %d", event.reason, event.final_version)
                self.run_end = event
                self.stop.set()
                self.wake.set()
                return
        if not self.stop.is_set():  # dropped by the coordinator (restart, silence, our own re-join)
            raise ConnectionError("the coordinator closed the event stream")

    # ---- transfers --------------------------------------------------------------------------

    def transfer(self) -> None:
        self._loop(self._transfer_once)

    def _transfer_once(self) -> None:
        while not self.stop.is_set():
            if self._pending is None:
                with self._lock:
                    self._pending = self._resend.pop(0) if self._resend else None
            if self._pending is None:
                try:
                    self._pending = self.outbox.get_nowait()
                    self._fresh = True
                except queue.Empty:
                    pass
            if self._pending is not None:
                # Sent before (interrupted, or accepted by a coordinator that may have lost it): ask first
                # what the coordinator has, so that nothing crosses the link twice.
                resume, self._fresh = not self._fresh, False
                accepted = self._upload(self._pending, resume)  # raises to _loop (which re-joins) if the link is gone
                with self._lock:
                    if accepted and self._pending.round > self._announced:
                        self._unclosed.append(self._pending)
                self._pending = None
                continue
            with self._lock:
                target = self._announced if self._announced > self._requested else None
            if target is not None:
                self._download(target)
                continue
            self.wake.wait(timeout=0.5)
            self.wake.clear()

    def _announce(self, version: int) -> None:
        """The coordinator's model is at `version` (or newer): sync to it; updates of rounds up to it
        are folded in for good (a whole-model fedavg delta is not held a moment longer)."""
        with self._lock:
            if version > self._announced:
                self._announced = version
                self._unclosed = [u for u in self._unclosed if u.round > version]
                self.wake.set()

    def notify_handover(self) -> None:
        self.wake.set()

    def _upload(self, update: Update, resume: bool = False) -> bool:
        """Send every block of the update; True if the coordinator accepted them all."""
        t0 = time.perf_counter()
        status = "accepted"
        with self.timeline.span("upload", update.round, blocks=len(update.deltas)):
            for block, delta in update.deltas.items():
                manifest, blob = wire.pack(
                    block, delta, self.codec, round=update.round, base_version=update.base_version,
                    chunk_size=self.info.chunk_size, num_tokens=max(1, update.tokens), train_loss=update.loss,
                )
                try:
                    status = self.session.upload(manifest, blob, resume=resume)
                except grpc.RpcError as e:
                    if e.code() in RECONNECT:
                        raise
                    if e.code() == grpc.StatusCode.ALREADY_EXISTS:  # sent again after a re-join: it has it
                        log.info("round %d %s: the coordinator already has it", update.round, block)
                        continue
                    # Refused for what it is: sending it again cannot help. Say so, so that the round does
                    # not wait for us, and go on with the next one.
                    log.error("round %d %s refused: %s: %s", update.round, block, e.code().name, e.details())
                    self.session.abandon(update.round, e.details() or e.code().name)
                    status = "refused"
                if status != "accepted":
                    log.info("round %d %s: %s", update.round, block, status)
                    break  # the other blocks of the round would share its fate
        self.metrics.comm_seconds.inc(time.perf_counter() - t0)
        return status == "accepted"

    def _download(self, announced: int) -> None:
        t0 = time.perf_counter()
        with self._lock:
            resync = self._resync
        with self.timeline.span("download", announced):
            version, block_versions, blocks = self.session.download(self.book.request(announced, resync))
            patch = Patch(version, block_versions, {b.block: b.tensors for b in blocks})
        with self._lock:
            self._requested = version
            self._resync = self._resync and not resync
        self.metrics.comm_seconds.inc(time.perf_counter() - t0)
        self._put(self.inbox, patch)

    # ---- heartbeats -------------------------------------------------------------------------

    def heartbeats(self) -> None:
        interval = self.info.heartbeat_interval_s
        while not self.stop.wait(interval):
            generation = self._generation
            try:
                # A missed notice is caught up through the heartbeat reply.
                self._announce(self.session.heartbeat(self.book.version, self.steps_done()))
            except grpc.RpcError as e:
                log.warning("heartbeat failed: %s", e.code().name)
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:  # the coordinator forgot us
                    self._guard(functools.partial(self._rejoin, generation))

    # ---- (re)joining ------------------------------------------------------------------------

    def _loop(self, body) -> None:
        """Run `body` until stop; re-join whenever the link or the session is lost."""
        self._guard(lambda: self._run_rejoining(body))

    def _run_rejoining(self, body) -> None:
        while not self.stop.is_set():
            generation = self._generation
            try:
                body()
                return
            except grpc.RpcError as e:
                if self.stop.is_set():
                    return
                if e.code() not in RECONNECT:
                    raise
                log.warning("lost the coordinator (%s: %s); joining again", e.code().name, e.details())
            except (ConnectionError, wire.IntegrityError) as e:
                if self.stop.is_set():
                    return
                log.warning("%s; joining again", e)
            self._rejoin(generation)

    def _rejoin(self, generation: int) -> None:
        """Join again (once per lost session, whichever thread asks first), with back-off and jitter."""
        with self._join_lock:
            if generation != self._generation or self.stop.is_set():
                return
            delays = backoff_delays(base=0.5, cap=self.max_backoff)
            attempt = 0
            while not self.stop.is_set():
                try:
                    info = self.session.join(self.num_examples, self.device, timeout=0)
                    break
                except grpc.RpcError as e:
                    attempt += 1
                    if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                        raise GiveUp(f"the coordinator refused us: {e.details()}") from None
                    if self.max_retries and attempt >= self.max_retries:
                        raise GiveUp(f"no coordinator after {attempt} attempts ({e.code().name})") from None
                    delay = next(delays)
                    log.info("join attempt %d failed (%s); next in %.1f s", attempt, e.code().name, delay)
                    self.stop.wait(delay)
            else:
                return
            if info.run_id != self.info.run_id:
                raise GiveUp(f"the coordinator now runs {info.run_id}, not our run {self.info.run_id}")
            self.info = info
            self.reconnects += 1
            self._generation += 1
            with self._lock:
                self._announced = info.model_version
                self._requested = -1  # sync now, and ask for everything we changed
                self._resync = True
                lost = [u for u in self._unclosed if u.round > info.model_version and u is not self._pending]
                self._resend = sorted({id(u): u for u in self._resend + lost}.values(), key=lambda u: u.round)
                self._unclosed = []
            self.wake.set()
            log.info("joined again (session %d), coordinator at model version %d", self._generation, info.model_version)

    # ---- helpers ----------------------------------------------------------------------------

    def _guard(self, body) -> None:
        try:
            body()
        except BaseException as e:
            self._fail(e)

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
