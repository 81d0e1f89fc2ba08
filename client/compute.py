"""The worker's compute thread: run the assigned tasks, apply global patches at step boundaries.

With pipeline depth d, round t may start once the local model is at least at version t-1-d: d = 0 is
fedbcd (wait for the global model of round t-1), d = 1 is ParaBlock (start at once on a model one round
stale and fold the new global blocks in when they arrive). What a task does and how a patch is applied
is the algorithm's (its worker half); the waiting, the inbox and the hand-over are the same for all.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..common import blocks as B
from ..common.algorithms import Algorithm, Local, Stopped
from ..common.algorithms.blockwise import BlockDescent
from ..common.data import BatchStream
from ..common.messages import Assignment, TaskTimings
from ..common.progress import Progress
from ..common.training import BlockTrainer
from .metrics import WorkerMetrics
from .site import Lockstep
from .state import ModelBook, Patch, Update
from .timeline import Timeline

log = logging.getLogger("fedblock.worker")
POLL_S = 0.1


class ComputeLoop:
    """Consumes `inbox` (Assignments and Patches, in arrival order), produces Updates into `outbox`."""

    def __init__(
        self,
        model: nn.Module,
        blocks: list[B.Block],
        trainer: BlockTrainer,
        stream: BatchStream,
        book: ModelBook,
        inbox: queue.Queue,
        outbox: queue.Queue,
        depth: int,
        metrics: WorkerMetrics,
        stop: threading.Event,
        timeline: Timeline,
        on_handover: Callable[[], None] = lambda: None,
        algorithm: Algorithm | None = None,
        local: Local | None = None,
        claim_holds: bool = False,
        on_stale: Callable[[], None] = lambda: None,
        want_view: Callable[[int], None] = lambda round: None,
        lockstep: Lockstep | None = None,
    ):
        """`algorithm`: the run's (its worker half runs the tasks; default a block method). `local`:
        what it works on (default: built from the arguments, in a temporary work dir). `claim_holds`:
        record the hash of each block handed in (the codec is lossless), so that a sync need not bring
        it back; `on_stale`: a confirmed block was not what we hold, and must be downloaded;
        `want_view(round)`: for an algorithm whose views depend on the task (`needs_base`), the task
        that starts next, which waits for a patch of its own view. `lockstep`: on rank 0 of a site of
        several processes, what tells the other ranks each patch, task and step boundary (site.py)."""
        self.model = model
        self.blocks = {b.name: b for b in blocks}
        self.trainer = trainer
        self.algorithm = algorithm or BlockDescent({}, (), ())
        self.local = local or Local(model, self.blocks, (), stream, trainer, Path(tempfile.gettempdir()), stop)
        self.local.boundary, self.local.version, self.local.on_step = self._boundary, lambda: self.book.version, self._stepped
        self.lockstep = lockstep or Lockstep()
        self.stream = stream
        self.book = book
        self.inbox = inbox
        self.outbox = outbox
        self.depth = depth
        self.metrics = metrics
        self.stop = stop
        self.timeline = timeline
        self.on_handover = on_handover
        self.claim_holds = claim_holds
        self.on_stale = on_stale
        self.want_view = want_view
        self._view_round = 0  # the task round whose view the last patch applied was (0: the global model)
        self.steps_done = 0
        self.progress = Progress()
        self.rounds_done = 0
        self.rounds_ahead = 0  # rounds started before the global model they build on had arrived
        # torch's intra-op thread count is per OS thread (OpenMP): carry the creator's setting over.
        self.threads = torch.get_num_threads()
        self.error: BaseException | None = None
        self._assignments: deque[Assignment] = deque()  # arrived while training
        self._taken: set[tuple[int, tuple[str, ...]]] = set()  # (round, blocks) accepted so far
        self._idle_s = 0.0  # waiting on communication since the last task started (its timings)

    def run(self) -> None:
        torch.set_num_threads(self.threads)
        try:
            while not self.stop.is_set():
                self._train(self._next_assignment())
        except Stopped:
            pass
        except BaseException as e:  # surface to the worker, which stops everything
            self.error = e
            log.exception("compute thread failed")
            self.stop.set()
        finally:
            self.lockstep.end()

    # ---- one round ---------------------------------------------------------------------------

    def _train(self, a: Assignment) -> None:
        need = a.round - 1 - self.depth
        own_view = self.algorithm.needs_base
        if own_view:
            self.want_view(a.round)

        def waiting() -> bool:  # fedbcd waits here for round t-1's model (FedCyBGD also for the task's view)
            if self.book.version < need or self.book.unconfirmed():
                return True
            return own_view and self._view_round != a.round and self.book.version < a.round

        while waiting():
            self._take(wait_for="model")
            if any(b.round < a.round for b in self._assignments):  # an earlier round came (again): first
                self._assignments.append(a)
                return
        self._drain()
        if self.book.version >= a.round:
            log.info("round %d closed before it started here; skipped", a.round)
            return
        if self.book.version < a.round - 1:
            self.rounds_ahead += 1
            self.metrics.rounds_ahead.inc()
        with self.timeline.span("compute", a.round, blocks=list(a.blocks)):
            update = self._local_steps(a)
        self.book.mark_dirty(a.blocks, a.round, self._holds(update) if self.claim_holds else None)
        self._hand_over(update)
        self.rounds_done += 1
        self.metrics.rounds.inc()
        self.on_handover()

    def _local_steps(self, a: Assignment) -> Update:
        started, idle, self._idle_s = time.time(), self._idle_s, 0.0
        t0 = time.perf_counter()
        base = self.book.version
        self.lockstep.task(a)
        update = self.algorithm.run(a, self.local)
        self.lockstep.done(self.local, a)
        seconds = time.perf_counter() - t0
        update = dataclasses.replace(update, timings=TaskTimings(seconds, idle, started))
        self.metrics.compute_seconds.inc(seconds)
        self.metrics.phase_seconds.labels("idle").observe(idle)
        self.metrics.phase_seconds.labels("training").observe(seconds)
        self.progress.clear()
        log.info(
            "round %d: %s for %d steps, loss %.4f, on model version %d",
            a.round, "+".join(a.blocks) if len(a.blocks) < 4 else f"{len(a.blocks)} blocks", a.local_steps, update.loss,
            base,
        )
        return update

    def _holds(self, update: Update) -> dict[str, bytes]:
        """The canonical hash of each handed-in block as the local copy has it now (start + delta)."""
        names = {s.name: [t.name for t in s.tensors] for s in self.local.specs}
        return {b: B.canonical_sha256(B.block_params(self.model, self.blocks[b]), names[b])
                for b in update.deltas if b in names}

    def _stepped(self, what: str, loss: float) -> None:
        self.steps_done += 1
        self.metrics.local_steps.inc()
        self.metrics.train_loss.set(loss)
        self.progress.show(f"{what}, loss {loss:.4f}")

    # ---- the inbox ---------------------------------------------------------------------------

    def _next_assignment(self) -> Assignment:
        """The earliest round given: a later one may need the model that the earlier one makes (a relay
        whose next turn arrived before the round a departed worker left it, planned again)."""
        while not self._assignments:
            self._take(wait_for="assignment")
        a = min(self._assignments, key=lambda x: x.round)
        self._assignments.remove(a)
        return a

    def _take(self, wait_for: str | None = None) -> bool:
        """Handle one inbox item. With `wait_for` (what we wait for) block until one comes, counting the
        wait as compute idle time; without it return False when nothing is there."""
        if wait_for:
            with self._idle(wait_for):
                item = self._get(timeout=POLL_S)
        else:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return False
        if isinstance(item, Patch):
            self._apply(item)
        elif (item.round, item.blocks) not in self._taken:
            # After a re-join the coordinator sends again what it has not seen handed in; what we trained
            # (or are training) is still on its way through the communication thread.
            self._taken = {t for t in self._taken if t[0] >= self.book.version} | {(item.round, item.blocks)}
            self._assignments.append(item)
        return True

    def _get(self, timeout: float):
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                return self.inbox.get(timeout=timeout)
            except queue.Empty:
                self.lockstep.idle()

    @contextmanager
    def _idle(self, why: str):
        """The compute thread waits on communication: counted as idle time."""
        t0 = time.perf_counter()
        try:
            with self.timeline.span("idle", reason=why):
                yield
        finally:
            seconds = time.perf_counter() - t0
            self._idle_s += seconds
            self.metrics.compute_idle_seconds.inc(seconds)

    def _boundary(self) -> bool:
        """A task's step boundary (Local.boundary): `_drain`, and the other ranks of the site follow."""
        changed = self._drain()
        self.lockstep.boundary(changed)
        return changed

    def _drain(self) -> bool:
        """Take everything that has arrived (we are at a step boundary). True if a patch was applied."""
        version = self.book.version
        while self._take():
            pass
        return self.book.version != version

    def _apply(self, patch: Patch) -> None:
        if patch.version < self.book.version:
            # The coordinator went back past rounds we saw close (it resumed from an older checkpoint when
            # the newest was damaged): their updates are gone on both sides, so take them again when they
            # are planned again. Rounds that had not closed are still on their way: never trained twice.
            gone = range(patch.version + 1, self.book.version + 1)
            self._taken = {t for t in self._taken if t[0] not in gone}
        self.lockstep.apply(patch)
        stale = self.algorithm.apply(patch, self.local) or ()
        self.book.applied(patch)
        self._view_round = patch.view_round
        if stale:  # a patch that came after our claim changed the block: the claim no longer holds
            log.warning("blocks %s are not the value the coordinator confirmed; downloading them", sorted(stale))
            self.book.unconfirm(stale)
            self.on_stale()
        self.metrics.model_version.set(self.book.version)

    def _hand_over(self, update: Update) -> None:
        with self._idle("outbox"):
            while True:
                if self.stop.is_set():
                    raise Stopped
                try:
                    self.outbox.put(update, timeout=POLL_S)
                    return
                except queue.Full:
                    # The communication threads may be waiting to put into a full inbox (assignments sent
                    # again at every re-join, catch-ups) before they take from the outbox: keep taking.
                    self._drain()
                    self.lockstep.idle()
