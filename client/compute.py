"""The worker's compute thread: train the assigned blocks, apply global patches at step boundaries.

With pipeline depth d, round t may start once the local model is at least at version t-1-d: d = 0 is
fedbcd (wait for the global model of round t-1), d = 1 is ParaBlock (start at once on a model one round
stale and fold the new global blocks in when they arrive, with the rebase correction for the blocks
being trained). Everything else is the same code.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from ..common import blocks as B
from ..common.data import BatchStream
from ..common.messages import Assignment
from ..common.progress import Progress
from ..common.training import BlockTrainer
from .metrics import WorkerMetrics
from .state import ModelBook, Patch, Update
from .timeline import Timeline

log = logging.getLogger("fedblock.worker")
POLL_S = 0.1


class Stopped(Exception):
    pass


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
    ):
        self.model = model
        self.blocks = {b.name: b for b in blocks}
        self.trainer = trainer
        self.stream = stream
        self.book = book
        self.inbox = inbox
        self.outbox = outbox
        self.depth = depth
        self.metrics = metrics
        self.stop = stop
        self.timeline = timeline
        self.on_handover = on_handover
        self.steps_done = 0
        self.progress = Progress()
        self.rounds_done = 0
        self.rounds_ahead = 0  # rounds started before the global model they build on had arrived
        # torch's intra-op thread count is per OS thread (OpenMP): carry the creator's setting over.
        self.threads = torch.get_num_threads()
        self.error: BaseException | None = None
        self._assignments: deque[Assignment] = deque()  # arrived while training
        self._taken: set[tuple[int, tuple[str, ...]]] = set()  # (round, blocks) accepted so far
        self._training: dict[str, dict] = {}  # block -> live params, during a round
        self._start: dict[str, dict] = {}  # block -> start values s_b, during a round

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

    # ---- one round ---------------------------------------------------------------------------

    def _train(self, a: Assignment) -> None:
        need = a.round - 1 - self.depth
        while self.book.version < need:  # fedbcd waits here for the global model of round t-1
            self._take(wait_for="model")
        self._drain()
        if self.book.version >= a.round:
            log.info("round %d closed before it started here; skipped", a.round)
            return
        if self.book.version < a.round - 1:
            self.rounds_ahead += 1
            self.metrics.rounds_ahead.inc()
        with self.timeline.span("compute", a.round, blocks=list(a.blocks)):
            update = self._local_steps(a)
        self.book.mark_dirty(a.blocks, a.round)
        self._hand_over(update)
        self.rounds_done += 1
        self.metrics.rounds.inc()
        self.on_handover()

    def _local_steps(self, a: Assignment) -> Update:
        self.trainer.begin_round(a.blocks)
        self._training = {b: B.block_params(self.model, self.blocks[b]) for b in a.blocks}
        self._start = {b: B.snapshot(p) for b, p in self._training.items()}
        base_version = self.book.version
        tokens, loss_sum = 0, 0.0
        t0 = time.perf_counter()
        batches = self.stream.round(a.round)
        for k in range(a.local_steps):
            if self.stop.is_set():
                raise Stopped
            if self._drain():
                base_version = self.book.version
            # Dropout seeded from (worker seed, round, step): a round run again gives the same update.
            result = self.trainer.step(next(batches), a.learning_rate, seed=(self.stream.seed, a.round, k))
            tokens += result.tokens
            loss_sum += result.loss * result.tokens
            self.steps_done += 1
            self.metrics.local_steps.inc()
            self.metrics.train_loss.set(result.loss)
            self.progress.show(f"round {a.round}: {'+'.join(a.blocks)[:40]} step {k + 1}/{a.local_steps}, loss {result.loss:.4f}")
        if self._drain():
            base_version = self.book.version
        deltas = {b: B.take_delta_(self._training[b], self._start[b]) for b in a.blocks}
        self.metrics.compute_seconds.inc(time.perf_counter() - t0)
        self._training, self._start = {}, {}
        self.progress.clear()
        loss = loss_sum / tokens if tokens else float("nan")
        log.info(
            "round %d: trained %s for %d steps, loss %.4f, on model version %d",
            a.round, "+".join(a.blocks) if len(a.blocks) < 4 else f"{len(a.blocks)} blocks", a.local_steps, loss, base_version,
        )
        return Update(a.round, base_version, deltas, tokens, loss)

    # ---- the inbox ---------------------------------------------------------------------------

    def _next_assignment(self) -> Assignment:
        while not self._assignments:
            self._take(wait_for="assignment")
        return self._assignments.popleft()

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
                pass

    @contextmanager
    def _idle(self, why: str):
        """The compute thread waits on communication: counted as idle time."""
        t0 = time.perf_counter()
        try:
            with self.timeline.span("idle", reason=why):
                yield
        finally:
            self.metrics.compute_idle_seconds.inc(time.perf_counter() - t0)

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
        for name, tensors in patch.blocks.items():
            live = self._training.get(name)
            if live is not None:  # the block being trained: keep our progress, rebased on the new global
                B.rebase_(live, self._start[name], tensors)
            else:
                B.assign_(B.block_params(self.model, self.blocks[name]), tensors)
        self.book.applied(patch)
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
                    pass
