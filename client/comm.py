"""The worker's communication side: everything that talks to the coordinator, off the compute thread.

Three small loops, each on its own thread and each ending when `stop` is set:
- `read_events`: the coordinator's event stream; assignments go to the compute inbox, model notices
  wake the transfer loop, the end of the run stops the worker.
- `transfer`: uploads handed-over updates first (a round cannot close without them), then delta-syncs
  the global model when a newer version was announced, and puts the patch in the compute inbox.
- `heartbeats`: a heartbeat every interval, so a long training step never looks like a dead worker.

When the coordinator cannot be reached, or no longer knows this worker's session (it restarted, or
dropped us after a silence), whichever loop notices first joins again under the same name, with
exponential back-off and jitter, forever unless --max-retries says otherwise. Updates the coordinator
may not have (the one being sent, and accepted ones of rounds that have not closed) are sent again,
oldest round first, as the same bytes (resuming from the chunks the coordinator holds), and the next
delta sync asks for every block this worker changed, so its copy is the coordinator's again.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ..common import wire
from ..common.algorithms import Algorithm
from ..common.algorithms.blockwise import BlockDescent
from ..common.codecs import CodecPipeline, CodecState
from ..common.messages import Assignment, Manifest, ModelNotice, RunEnd
from .metrics import WorkerMetrics
from .session import Session, backoff_delays, reconnects, transient
from .state import ModelBook, Update
from .timeline import Timeline

log = logging.getLogger("fedblock.worker")

class GiveUp(Exception):
    """Reconnection is impossible (refused, another run) or --max-retries ran out."""


@dataclass
class Outgoing:
    """An update on its way to the coordinator. Each block is encoded once, when first sent, and the
    same bytes go again on a resend (so the coordinator's partial upload matches by hash); a stateful
    codec stage (top-k's residual) advances once, when the coordinator first has the block."""

    update: Update
    blocks: tuple[str, ...] = field(init=False)
    tried: bool = False  # sent before: ask the coordinator what it holds before sending again
    delivered: set[str] = field(default_factory=set)  # blocks the coordinator has, in this attempt
    _packed: dict[str, tuple[Manifest, bytes, CodecState | None]] = field(default_factory=dict)  # None: committed

    def __post_init__(self) -> None:
        self.blocks = tuple(self.update.deltas)

    @property
    def round(self) -> int:
        return self.update.round

    def pack(self, block: str, codec: CodecPipeline, chunk_size: int) -> tuple[Manifest, bytes]:
        if block not in self._packed:
            u = self.update
            self._packed[block] = wire.pack_pending(
                block, u.deltas[block], codec, round=u.round, base_version=u.base_version,
                chunk_size=chunk_size, num_tokens=max(1, u.tokens), train_loss=u.loss, timings=u.timings,
            )
            del u.deltas[block]  # the encoded blob replaces the delta (a whole-model update is big)
        manifest, blob, _ = self._packed[block]
        return manifest, blob

    def confirm(self, block: str, codec: CodecPipeline) -> None:
        """The coordinator has `block` (accepted it, or had it already): the codec state advances, once."""
        self.delivered.add(block)
        manifest, blob, state = self._packed[block]
        if state is not None:
            codec.commit(state)
            self._packed[block] = (manifest, blob, None)  # committed: not held twice


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
        algorithm: Algorithm | None = None,
        codec_weights: Path | None = None,
    ):
        """`codec_weights`: the file an upload codec stage encodes with (the autoencoder's)."""
        assert session.info is not None
        self.algorithm = algorithm or BlockDescent({}, (), ())
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
        self.codec = CodecPipeline(self.info.codec, weights=codec_weights)
        self.wake = threading.Event()
        self.run_end: RunEnd | None = None
        self.error: BaseException | None = None
        self.reconnects = 0
        self._generation = 0  # sessions joined so far; a failure seen in an old one needs no new join
        # Per loop: events read; blocks delivered and downloads done. What resets that loop's back-off.
        self._progress = {"events": 0, "transfer": 0}
        self._join_lock = threading.Lock()
        self._announced = book.version  # newest model version announced by the coordinator
        self._requested = book.version  # newest version downloaded (or being applied)
        self._queued = book.version  # newest version a patch handed to the compute thread brings the model to
        # Algorithms that catch up only when given a task: the newest base version of one (else: all).
        self._wanted = book.version if self.algorithm.catch_up_on_task else None
        # An algorithm whose views depend on the task (needs_base): the task the compute thread is about
        # to start, whose view the syncs ask for, and how many times that changed.
        self._view_for = 0
        self._views = 0
        self._resync = False  # the next delta sync asks for every block we changed
        # Updates accepted for rounds that have not closed yet: a coordinator killed before it checkpointed
        # such a round has lost them, and gets them again after the re-join (deterministic rounds plan the
        # same assignment again; a coordinator that still has them answers "duplicate").
        self._unclosed: list[Outgoing] = []
        self._resend: list[Outgoing] = []  # to send (again) before anything new, oldest round first
        self._lock = threading.Lock()

    # ---- events -----------------------------------------------------------------------------

    def read_events(self) -> None:
        self._loop(self._read_events_once, "events")

    def _read_events_once(self) -> None:
        for event in self.session.events():
            self._progress["events"] += 1
            if isinstance(event, Assignment):
                if self._wanted is not None:
                    with self._lock:
                        self._wanted = max(self._wanted, event.base_version)
                        self.wake.set()
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
        self._loop(self._transfer_once, "transfer")

    def _transfer_once(self) -> None:
        while not self.stop.is_set():
            # Updates to send again first (a round cannot close without them); then a new model before a
            # new update: the compute thread waits for the model sooner than the coordinator for the
            # update (with ParaBlock, round t+2 needs version t, which must not queue behind update t+1).
            out = self._next_resend()
            target = self._download_target() if out is None else None
            if target is not None:
                self._download(target)
                continue
            out = out or self._next_fresh()
            if out is not None:
                generation = self._generation
                try:
                    accepted = self._upload(out)  # raises to _loop (which re-joins) if the link is gone
                except BaseException:
                    self._requeue(out)  # the oldest round still goes first after the re-join
                    raise
                with self._lock:
                    if accepted and generation != self._generation:
                        self._requeue_locked(out)  # a re-join came meanwhile: that coordinator may have lost it
                    elif accepted and out.round > self._announced:
                        self._unclosed.append(out)
                continue
            self.wake.wait(timeout=0.5)
            self.wake.clear()

    def _download_target(self) -> int | None:
        """The model version to sync to now, if any."""
        with self._lock:
            newest = self._announced if self._wanted is None else min(self._announced, self._wanted)
            return newest if newest > self._requested else None

    def _next_resend(self) -> Outgoing | None:
        """The oldest update to send again (a later round cannot be planned before it)."""
        with self._lock:
            return self._resend.pop(0) if self._resend else None

    def _next_fresh(self) -> Outgoing | None:
        try:
            return Outgoing(self.outbox.get_nowait())
        except queue.Empty:
            return None

    def _requeue(self, out: Outgoing) -> None:
        with self._lock:
            self._requeue_locked(out)

    def _requeue_locked(self, out: Outgoing) -> None:
        out.delivered.clear()  # sent again from the start; UploadStatus tells what the coordinator holds
        if all(o is not out for o in self._resend):
            self._resend.append(out)
            self._resend.sort(key=lambda o: o.round)

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

    def want_view(self, round: int) -> None:
        """The compute thread starts the task of `round` next, on its own view (needs_base): sync for it,
        at the task's base version or later."""
        with self._lock:
            self._view_for = round
            self._views += 1
            self._wanted = max(self._wanted or 0, round - 1)
            self._requested = min(self._requested, round - 2)
            self.wake.set()

    def refetch(self) -> None:
        """Sync again now: the compute thread found a confirmed block not to be what it holds."""
        with self._lock:
            self._requested = min(self._requested, self.book.version - 1)
            self.wake.set()

    def _upload(self, out: Outgoing) -> bool:
        """Send every block of the update the coordinator does not have yet; True if it has them all."""
        t0 = time.perf_counter()
        status = "accepted"
        # Sent before (interrupted, or accepted by a coordinator that may have lost it): ask first what
        # the coordinator has, so that nothing crosses the link twice.
        resume, out.tried = out.tried, True
        u = out.update
        # A record (zeroth-order scalars) goes in one message; tensors block by block, through the codec.
        parts = [None] if u.numbers is not None else [b for b in out.blocks if b not in out.delivered]
        with self.timeline.span("upload", out.round, blocks=len(out.blocks)):
            for block in parts:
                try:
                    if block is None:
                        status = self.session.report(u.round, u.base_version, u.numbers, max(1, u.tokens), u.loss,
                                                     u.timings)
                    else:
                        manifest, blob = out.pack(block, self.codec, self.info.chunk_size)
                        status = self.session.upload(manifest, blob, resume=resume)
                except grpc.RpcError as e:
                    if reconnects(e):
                        raise
                    if e.code() == grpc.StatusCode.ALREADY_EXISTS:  # sent again after a re-join: it has it
                        log.info("round %d %s: the coordinator already has it", out.round, block)
                        status = "accepted"
                    elif not transient(e) and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise GiveUp(f"cannot send round {out.round} {block}: {e.details()}") from None
                    else:
                        # Refused for what it is: sending it again cannot help. Say so, so that the round
                        # does not wait for us, and go on with the next one.
                        log.error("round %d %s refused: %s: %s", out.round, block, e.code().name, e.details())
                        self.session.abandon(out.round, e.details() or e.code().name)
                        status = "refused"
                if status != "accepted":
                    log.info("round %d %s: %s", out.round, block or "record", status)
                    break  # the other blocks of the round would share its fate
                if block is not None:
                    out.confirm(block, self.codec)
                self._progress["transfer"] += 1
        seconds = time.perf_counter() - t0
        self.metrics.comm_seconds.inc(seconds)
        self.metrics.phase_seconds.labels("upload").observe(seconds)
        return status == "accepted"

    def _download(self, announced: int) -> None:
        t0 = time.perf_counter()
        with self._lock:
            resync = self._resync
            # From the newest version handed to the compute thread: a patch on its way there brings the copy
            # that far (a log catch-up from the book's version would replay those rounds twice). A re-join
            # does not reset it: a coordinator now behind it answers "download the blocks".
            start = max(self.book.version, self._queued)
            generation, views, task_round = self._generation, self._views, self._view_for
        if self.algorithm.needs_base:  # views are not monotone: ask from what the queued patches leave
            while self.book.version != self._queued and not self.stop.wait(0.05):
                pass
        with self.timeline.span("download", announced):
            held = self.book.request(announced, resync)
            holds = self.book.claims(held) if self.codec.lossless else {}
            patch = self.algorithm.fetch(self.session, start, held, announced, holds, task_round)
            version = patch.version
        with self._lock:
            # Else a re-join came meanwhile, or a task whose view this sync is not: sync once more.
            if generation == self._generation and views == self._views:
                self._requested = version
                self._resync = self._resync and not resync
            self._queued = version  # the compute thread applies patches in order: the last one says where
            self._progress["transfer"] += 1
        seconds = time.perf_counter() - t0
        self.metrics.comm_seconds.inc(seconds)
        self.metrics.phase_seconds.labels("download").observe(seconds)
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

    def _loop(self, body, name: str) -> None:
        """Run `body` until stop; re-join whenever the link or the session is lost."""
        self._guard(lambda: self._run_rejoining(body, name))

    def _run_rejoining(self, body, name: str) -> None:
        delays = backoff_delays(base=0.5, cap=self.max_backoff)
        while not self.stop.is_set():
            generation, progress = self._generation, self._progress[name]
            try:
                body()
                return
            except grpc.RpcError as e:
                if self.stop.is_set():
                    return
                if not reconnects(e):
                    raise
                log.warning("lost the coordinator (%s: %s); joining again", e.code().name, e.details())
            except (ConnectionError, wire.IntegrityError) as e:
                if self.stop.is_set():
                    return
                log.warning("%s; joining again", e)
            # A call that fails again and again with nothing done in between (a coordinator that fails on
            # it) waits longer each time, as joining does; progress starts the back-off afresh.
            if self._progress[name] != progress:
                delays = backoff_delays(base=0.5, cap=self.max_backoff)
            elif generation == self._generation:  # nobody joined again meanwhile: we will
                self.stop.wait(next(delays))
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
                    if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.FAILED_PRECONDITION):
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
                for out in self._unclosed:  # what the restarted coordinator may have lost
                    if out.round > info.model_version:
                        self._requeue_locked(out)
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
