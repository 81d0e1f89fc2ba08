"""The coordinator: owns the global model and runs rounds. Knows nothing of gRPC.

The gRPC service (service.py) turns each call into one method here; the daemon (daemon.py) builds this
object and calls `run()` on its main thread. One condition variable guards the state; tensor work
(decoding, accumulating, aggregating, checkpointing) happens outside it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import resource
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..common import blocks as B
from ..common import provenance, wire
from ..common.adapters import select_trainable
from ..common.aggregation import is_finite, l2_norm
from ..common.algorithms import Algorithm, Task
from ..common.codecs import CodecPipeline
from ..common.config import ConfigError, CoordinatorConfig
from ..common.messages import (
    DROPPED,
    REVOKED,
    BlockSpec,
    CatchUp,
    Event,
    Manifest,
    ModelFile,
    ModelNotice,
    RunEnd,
    RunInfo,
    TaskTimings,
)
from ..common.progress import Progress
from ..common.rpc import message_limit
from .evaluation import BackgroundEvaluation
from .metrics import CoordinatorMetrics
from .registry import Ended, Registry
from .rounds import Refused, RoundPlan, RoundRules, Rounds
from .store import BlockFileMissing, Checkpoint, StateError, StateStore, StoredModel, export_model

if TYPE_CHECKING:
    from ..common.security import Authenticator

log = logging.getLogger("fedblock.coordinator")

Tensors = dict[str, Tensor]
MAX_CONCURRENT_DECODES = 2  # bounds the memory of finishing uploads (one blob + one delta each)
RETRY_LATER = frozenset({"not_planned", "incomplete"})  # refusals that a worker's next try gets past
OUTCOME_WAIT_S = 300.0  # a resumed stream waits this long for the one checking the same upload
# How long a "late" answer waits for its round's checkpoint (`_closed_for_good`): less than the workers'
# shortest deadline on those calls (UploadStatus's 30 s), so that they hear "in_progress" and ask again.
LATE_WAIT_S = 20.0


@dataclass(frozen=True)
class GlobalModel:
    """One version of the global model. Its tensors are its block files' (`block_versions`), which the
    coordinator reads as a StoredModel: a block is in memory only while it is used (aggregated, hashed,
    evaluated, exported), and a new version is new files. A records algorithm (zeroth-order) holds its
    replica's blocks in memory instead and moves them on in place, on the coordinator's run thread,
    which is the only reader of them (evaluation, export): downloads stream the block files."""

    version: int
    block_versions: Mapping[str, int]
    block_sha256: Mapping[str, str]
    tensors: Mapping[str, Tensors]  # a StoredModel (the coordinator reads any other mapping's blocks from the files)
    files_version: int | None = None  # the version the block files hold (None: `version`); a records
    # algorithm (zeroth-order) moves its tensors on in place and writes its blocks only now and then

    @property
    def files_at(self) -> int:
        return self.version if self.files_version is None else self.files_version


@dataclass(eq=False)
class _Upload:
    """The upload of one (worker, round, block) in progress. The coordinator's upload table owns it
    until one stream claims it to check it; that stream then owns it (and may hand it on to the
    parking, or its memory to the round's sums). Other streams of the same blob wait for the outcome."""

    key: tuple[str, int, str]
    manifest: Manifest
    assembly: wire.Assembly
    claimed: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    outcome: str | Refused = "late"

    def wait(self) -> str:
        """The claiming stream's answer, for another stream of the same upload."""
        if not self.done.wait(OUTCOME_WAIT_S):
            raise Refused("in_progress", "the upload is still being checked; ask again")
        if isinstance(self.outcome, Refused):
            raise Refused(self.outcome.reason, str(self.outcome))
        return self.outcome


@dataclass(frozen=True)
class UploadState:
    held: list[int]  # chunks held of an upload in progress
    complete: bool  # nothing more to send but the header (or nothing at all, below)
    delivered: bool = False  # the block is in (or waits for the worker's others): send nothing
    closed: bool = False  # its round has closed: send nothing


@dataclass(frozen=True)
class Sync:
    """What one download sends a worker: its view of the global model `g` (block -> version; an
    algorithm may give some blocks at 0, the base model's), the blocks to stream at those versions, and
    the blocks it holds already (its own update, applied alone: block -> canonical SHA-256)."""

    g: GlobalModel
    versions: dict[str, int]
    send: list[str]
    confirmed: dict[str, bytes]
    view_round: int = 0  # the task round whose view this is (0: the global model's)


@dataclass
class Totals:
    bytes_up: int = 0  # upload wire bytes received
    bytes_down: int = 0  # download wire bytes sent
    updates_accepted: int = 0
    refusals: dict[str, int] = field(default_factory=dict)  # updates_rejected, updates_late
    wall_seconds_before: float = 0.0  # wall time of earlier runs of this state dir
    eval_history: list[list[float]] = field(default_factory=list)
    round_history: list[dict] = field(default_factory=list)


def trainable_blocks(config: CoordinatorConfig, block_order: list[str]) -> list[str]:
    """The blocks --train-blocks selects; ConfigError when it selects none."""
    trainable = select_trainable(block_order, config.train_blocks, adapters=config.lora is not None)
    if not trainable:
        what = "the adapter blocks" if config.lora else "the blocks"
        raise ConfigError(f"--train-blocks {config.train_blocks!r} matches none of {what} "
                          f"({', '.join(block_order[:3])}, ..., {block_order[-1]})")
    return trainable


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig,
        store: StateStore,
        run_id: str,
        specs: list[BlockSpec],
        initial: GlobalModel,
        metrics: CoordinatorMetrics | None = None,
        evaluate=None,
        checkpoint: Checkpoint | None = None,
        initial_sha256: Mapping[str, bytes] | None = None,
    ):
        """`evaluate(tensors_by_block) -> loss` is optional; `checkpoint` resumes a run; `initial_sha256`
        is the canonical hash of each block of the initial model (a worker with a local base model
        checks its copy against it). `initial`'s blocks are read from its block files in `store`."""
        self.config = config
        self.store = store
        self.run_id = run_id
        self.specs = {s.name: s for s in specs}
        self.block_order = [s.name for s in specs]
        self.trainable = trainable_blocks(config, self.block_order)
        try:
            self.algorithm: Algorithm = config.algorithm_class(config.algorithm_settings(), specs, self.trainable)
        except ValueError as e:  # settings the algorithm cannot work with (for this model)
            raise ConfigError(f"--algorithm {config.algorithm}: {e}") from None
        self.initial_sha256 = dict(initial_sha256 or {})
        weights = store.codec_files()
        self.codec = CodecPipeline(config.codec, weights=weights[0] if weights else None)
        if any(stage.needs_weights for stage in self.codec.stages):  # padded to multiples of the ratio
            for b in self.trainable:
                encoded, raw = (CodecPipeline(spec).payload_nbytes(self.specs[b].tensors) for spec in
                                (self.codec.stages[0].spec, "none"))
                if encoded >= raw:
                    raise ConfigError(f"--codec {config.codec}: it would make {b}'s upload larger ({encoded} bytes "
                                      f"against {raw}); use a smaller ratio")
        self.download_codec = CodecPipeline(config.download_codec, direction="download")
        self.metrics = metrics or CoordinatorMetrics()
        self._evaluate = evaluate
        self._evaluations: BackgroundEvaluation | None = None  # its thread runs while `run` does
        self.registry = Registry()
        model = initial.tensors
        if not isinstance(model, StoredModel):
            model = StoredModel(store, initial.block_versions, initial.block_sha256)
        if self.algorithm.records:  # its replica moves on in place: in memory, never a file's map
            model = model.holding(self.trainable)
        self.global_model = initial = dataclasses.replace(initial, tensors=model)
        self._awaited: set[str] = set()  # after a restart: workers of the open rounds not back yet
        self._awaited_until = 0.0
        self.rounds = Rounds(
            RoundRules(
                rounds=config.rounds,
                clients_per_round=config.clients_per_round,
                min_updates=config.min_updates,
                round_timeout=config.round_timeout,
                depth=config.depth,
                schedule=config.block_schedule,
                blocks=self.trainable,
                local_steps=config.local_steps,
                lr=config.lr,
                lr_schedule=config.lr_schedule,
                seed=config.seed,
                planner=self._plan_tasks,
            ),
            version=initial.version,
        )
        self.totals = Totals()
        operator_total = store.read_rounds(config.rounds)  # a drain or set-rounds before a restart
        if operator_total is not None and operator_total != config.rounds:
            self.rounds.set_total(max(operator_total, initial.version))
            log.info("the run is %d rounds long, as an operator set it (--rounds %d)", self.rounds.total, config.rounds)
        if checkpoint is not None:
            self.registry.restore(checkpoint.workers)
            self.totals.bytes_up = int(checkpoint.counters.get("bytes_up", 0))
            self.totals.bytes_down = int(checkpoint.counters.get("bytes_down", 0))
            self.totals.updates_accepted = int(checkpoint.counters.get("updates_accepted", 0))
            self.totals.refusals = {k: int(checkpoint.counters.get(k, 0)) for k in ("updates_rejected", "updates_late")}
            self.totals.wall_seconds_before = float(checkpoint.counters.get("wall_seconds", 0.0))
            # Evaluations finish on their own thread, after the checkpoint of their round: merge what came.
            evaluated = {int(e[0]): list(e) for e in [*checkpoint.eval_history, *store.read_evaluations(checkpoint.round)]}
            self.totals.eval_history = [evaluated[r] for r in sorted(evaluated)]
            self.totals.round_history = [dict(r) for r in checkpoint.round_history]
            # The algorithm's state (a zeroth-order log) brings the checkpoint's block files to its round.
            try:
                files_version = self.algorithm.restore(checkpoint.algorithm, initial.tensors, initial.version)
            except ValueError as e:
                raise StateError(f"checkpoint of round {checkpoint.round}: {e}") from None
            if self.algorithm.records and any(checkpoint.block_versions.get(b) != files_version for b in self.trainable):
                raise StateError(f"checkpoint of round {checkpoint.round}: its blocks are not those of round "
                                 f"{files_version} that its log starts from")
            if files_version != initial.version:
                self.global_model = initial = GlobalModel(initial.version, initial.block_versions, initial.block_sha256,
                                                          initial.tensors, files_version)
            # Plan what the uninterrupted run would have: its open rounds as they were, and, until the
            # grace period ends, the workers it had counted as present (they are coming back).
            try:
                self.rounds.restore(checkpoint.plans)
                present = {str(w) for w in checkpoint.present} if isinstance(checkpoint.present, list) else set()
            except ValueError as e:  # plan afresh: what matters is the model, which was checked
                log.warning("checkpoint of round %d: ignoring its open rounds' plans: %s", checkpoint.round, e)
                present = set()
            self._awaited = present | {w for p in self.rounds.plans.values() for w in p.assignments}
            self._awaited_until = time.monotonic() + config.resume_grace
        self._cv = threading.Condition()
        self._uploads: dict[tuple[str, int, str], _Upload] = {}  # (worker, round, block) -> open upload
        self._uploads_lock = threading.Lock()
        self._parked: dict[tuple[str, int], dict[str, _Upload]] = {}  # (worker, round) -> checked blocks (under _cv)
        self._in_memory = 0  # assemblies held in memory (at most --upload-slots)
        self._pool = wire.BufferPool(keep=max(1, config.upload_slots))
        self._decode_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
        self._stop = threading.Event()
        self._failure: BaseException | None = None  # set by _fail: run() raises it
        self._round_started: dict[int, float] = {}
        self._t0 = time.monotonic()
        self._startup_peak = 0  # peak RSS before the first round (loading, first checkpoint)
        self.state = "waiting"
        self.metrics.rounds_target.set(self.rounds.total)
        self._intervals: list[list] = []  # [worker, kind, start_s, end_s] since the last close (under _cv)
        self._interval_counts: dict[str, int] = {}  # worker -> intervals of it in _intervals
        self._timed: set[tuple[str, int]] = set()  # (worker, round) whose task timings are in
        self._fold_seconds: dict[int, float] = {}  # round -> time spent folding its updates in
        self.hardware: dict[str, dict] = {}  # worker -> its machine, as it said at Join
        self.progress = Progress()
        self.export_path: Path | None = None
        self.model_files, self.codec_files = (
            tuple(ModelFile(p.name, p.stat().st_size, wire.sha256(p.read_bytes())) for p in files)
            for files in (store.model_files(), store.codec_files())
        )
        self._hash_lock = threading.Lock()
        self._canonical: dict[str, tuple[int, bytes]] = {}  # block -> (version, canonical SHA-256), newest asked
        self._blobs: dict[tuple[str, int], tuple[Path, int, bytes]] = {}  # encoded downloads: (path, size, sha)
        self._encode_lock = threading.Lock()  # one encoding at a time: a block version is encoded once
        # The base model's block files, which an algorithm's views may hand out (FedCyBGD's layer dropping).
        store.keep_base = store.keep_base or self.algorithm.needs_base
        self._base_sha256 = self._check_base_files() if self.algorithm.needs_base else {}

    def _plan_tasks(self, round: int, workers: Mapping[str, int]):
        """The algorithm's tasks of a round being planned (the `assignment` phase: they go out at once)."""
        t = time.perf_counter()
        tasks = self.algorithm.tasks(round, workers, self.config.seed, self.config.block_schedule)
        self.metrics.phase_seconds.labels("assignment").observe(time.perf_counter() - t)
        return tasks

    # ---- calls from workers (via the service) ------------------------------------------------------

    def join(self, name: str, hardware: Mapping | None = None, token: str = "") -> RunInfo:
        """`token`: the hash of the token the worker authenticated with (a reload of the tokens drops it
        when that is no longer its token)."""
        record = self.registry.join(name, token)
        with self._cv:  # its assignments go out when it opens its event stream (`events`)
            self._awaited.discard(name)
            if hardware:
                self.hardware[name] = dict(hardware)
            self.metrics.workers_connected.set(len(self.registry.connected()))
            self.metrics.peer_connected.labels(name).set(1)
            self.metrics.peer_last_seen.labels(name).set(time.time())
            self._cv.notify_all()
            self._end_if_revoked(name, token)  # the tokens may have been reloaded since the service checked it
        log.info("worker %s joined (%d connected)", name, len(self.registry.connected()))
        return self._run_info(record.session)

    def _run_info(self, session: str) -> RunInfo:
        c = self.config
        return RunInfo(
            session=session,
            run_id=self.run_id,
            algorithm=c.algorithm,
            pipeline_depth=c.depth,
            heartbeat_interval_s=c.heartbeat_interval,
            codec=self.codec.spec,
            chunk_size=c.chunk_size,
            max_message_bytes=message_limit(c.chunk_size),
            blocks=tuple(self.specs[b] for b in self.block_order),
            layers_per_block=c.layers_per_block,
            model_version=self.global_model.version,
            model_files=self.model_files,
            seed=c.seed,
            rounds=self.rounds.total,
            algorithm_settings=self._worker_settings(),
            initial_block_sha256=tuple(self.initial_sha256.get(b, b"") for b in self.block_order),
            lora=c.lora,
            codec_files=self.codec_files,
        )

    def _worker_settings(self) -> dict[str, str]:
        """The algorithm's settings that its worker half reads (`options`)."""
        every = {**self.config.algorithm_settings(), "trainable": ",".join(self.trainable)}
        return {k: v for k, v in every.items() if k in self.algorithm.options}

    def refused_join(self, name: str, why: str) -> None:
        self.metrics.joins_refused.inc()
        log.warning("refused a join as %r: %s", name, why)

    def authenticate(self, name: str, session: str) -> None:
        self.registry.check(name, session)

    def events(self, name: str, session: str, alive=lambda: True, poll_s: float = 0.5) -> Iterator[Event]:
        """The worker's event stream; ends when the caller is gone (`alive()` false), when the worker
        opens another stream, leaves or joins again, or when the run ends."""
        try:
            events = self.registry.open_stream(name, session)
        except Ended as e:  # the coordinator ended its part (an operator): say so again, as often as it asks
            yield RunEnd(e.reason, self.global_model.version)
            return
        record = next(w for w in self.registry.all() if w.name == name)
        with self._cv:  # what was queued for an earlier stream is gone with it: send it again
            self.rounds.rejoined(name)
            self._deliver()
        g = self.global_model
        yield ModelNotice(g.version)  # what to sync to, first
        if self.state in ("finished", "stopped"):  # joined after the end (while we wait for stragglers)
            record.told_end = True
            yield RunEnd(self.state, g.version)
            return
        while alive() and not self._stop.is_set():
            try:
                event = events.get(timeout=poll_s)
            except queue.Empty:
                continue
            if event is None:
                return
            if isinstance(event, RunEnd):
                record.told_end = True
                yield event
                return
            yield event

    def heartbeat(self, name: str, session: str, local_steps: int = 0) -> int:
        record = self.registry.check(name, session)
        record.local_steps = local_steps
        self._seen(name, local_steps)
        return self.global_model.version

    def _seen(self, name: str, local_steps: int | None = None) -> None:
        """The worker's per-worker series, while it has a session (a worker an operator just dropped has
        none: they are not made again)."""
        with self._cv:
            if name not in self.registry.connected():
                return
            if local_steps is not None:
                self.metrics.peer_local_steps.labels(name).set(local_steps)
            self.metrics.peer_last_seen.labels(name).set(time.time())

    def leave(self, name: str, session: str) -> None:
        self.registry.check(name, session).told_end = True  # gone for good: nobody to tell the end
        self._drop(name, "left")

    def upload(self, name: str, session: str, manifest: Manifest, chunks: Iterable[tuple[int, bytes]]) -> str:
        """Receive one block delta. Returns "accepted" or "late"; raises Refused or UnknownWorker.
        Streams of the same upload (a worker resuming after a broken link) share its chunks, and all
        get the answer of the one that checked it."""
        self.registry.check(name, session)
        started = self.wall_seconds()
        if self.algorithm.records:
            raise self._reject("wrong_kind", f"{self.config.algorithm} takes record updates (Report), not tensors")
        self._check_manifest(manifest)
        with self._cv:
            try:
                self.rounds.admit(name, manifest.round, manifest.block, manifest.base_version)
            except Refused as e:
                if e.reason != "late":
                    self._count("rejected", e.reason)
                    raise
                self._late(name, manifest.round)
                return "late"
            self.rounds.hand_in(name, manifest.round, self._present())
            self._deliver()
            self._task_timings(name, manifest.round, manifest.timings, started)
        outcome = self._receive(name, manifest, chunks)
        if outcome == "accepted":
            ended = self.wall_seconds()
            self.metrics.phase_seconds.labels("upload").observe(ended - started)
            self._seen(name)
            self.note_interval(name, "upload", started, ended)
        return outcome

    def _receive(self, name: str, manifest: Manifest, chunks: Iterable[tuple[int, bytes]]) -> str:
        up = self._open_upload(name, manifest)
        try:
            for index, data in chunks:
                try:
                    up.assembly.add(index, data)
                except wire.AssemblyClosed:
                    raise
                except wire.IntegrityError as e:
                    self._discard_upload(up)
                    raise self._reject("bad_chunk", str(e)) from None
            if not up.assembly.complete:
                missing = manifest.num_chunks - len(up.assembly.held)
                raise self._reject("incomplete", f"stream ended with {missing} chunks missing; resume it")
            mine = self._claim(up)
        except wire.AssemblyClosed:  # discarded meanwhile: its round closed, or a newer upload replaced it
            if up.claimed:  # no: another stream of it checked it, and closed it when done
                return up.wait()
            with self._cv:
                if manifest.round <= self.rounds.version:
                    self._late(name, manifest.round)
                    return "late"
            raise self._reject("superseded", "a newer upload of this block replaced this one") from None
        return self._check_and_fold(name, up) if mine else up.wait()

    def _check_and_fold(self, name: str, up: _Upload) -> str:
        """The one stream that claimed the upload: check it, then park it or fold the worker's update in.
        It owns the upload's memory from the claim on, and releases it unless parked or adopted."""
        fate = "done"  # or "parked" (its blocks wait for the worker's others) or "adopted" (by the round's sums)
        try:
            with self._decode_slots:
                up.outcome, fate = self._park_or_fold(name, up, self._decode_checked(up))
            return up.outcome
        except Refused as e:
            up.outcome = e
            raise
        except Exception as e:
            log.exception("round %d: failed on %s's upload of %s", up.manifest.round, name, up.manifest.block)
            up.outcome = Refused("failed", f"the coordinator failed on this upload ({type(e).__name__}); send it again")
            raise up.outcome from None
        finally:
            with self._uploads_lock:
                if self._uploads.get(up.key) is up:
                    del self._uploads[up.key]
            if fate != "parked":
                self._release(up, keep_memory=fate == "adopted")
            up.done.set()

    def _decode_checked(self, up: _Upload) -> Tensors:
        """The upload's delta, checked: hash, decoding, finite, norm. Raises Refused (counted)."""
        m = up.manifest
        # Decoding and the checks read the blob while the tail of its hash is still being computed;
        # nothing is used before the hash has been checked.
        delta, problem = None, None
        blob = up.assembly.blob()
        try:
            delta = self.codec.decode(blob, self.specs[m.block].tensors)
            if not is_finite(delta):
                problem = ("non_finite", f"update for {m.block} contains NaN or Inf")
            elif self.config.max_update_norm and (norm := l2_norm(delta)) > self.config.max_update_norm:
                problem = ("too_large_norm", f"update for {m.block} has L2 norm {norm:.4g} > --max-update-norm "
                                             f"{self.config.max_update_norm:g}")
        except ValueError as e:
            problem = ("malformed", f"cannot decode the update: {e}")
        try:
            up.assembly.verify()  # a corrupted chunk is reported as such, whatever it did to the decoding
        except wire.IntegrityError as e:
            problem = ("hash_mismatch", str(e))
        if problem is not None:
            raise self._reject(*problem)
        return delta

    def _park_or_fold(self, name: str, up: _Upload, delta: Tensors) -> tuple[str, str]:
        """Park a checked block until the worker's other blocks of the round are in, then fold all of
        them in. Returns (status, what became of `up`'s memory: "parked", "adopted" or "done")."""
        m = up.manifest
        with self._cv:
            try:
                plan = self.rounds.park(name, m.round, m.block, m.base_version)
            except Refused as e:
                if e.reason == "late":
                    self._late(name, m.round)
                    return "late", "done"
                self._count("rejected", e.reason)
                raise
            if plan is None:
                del delta  # its tensors may view a file's map, which waiting gives up (no descriptors held)
                up.assembly.suspend()
                self._parked.setdefault((name, m.round), {})[m.block] = up
                return "accepted", "parked"
            earlier = list(self._parked.pop((name, m.round), {}).values())
        return "accepted", "adopted" if self._fold(name, plan, earlier, up, delta) else "done"

    def _record(self, round: int, name: str, m: Manifest, delta: Tensors) -> None:
        try:
            self.store.record_update(round, name, m.block, delta, m.num_tokens)
        except OSError as e:  # the records serve a later pre-training; the run itself goes on
            log.warning("round %d: could not record %s's update of %s: %s", round, name, m.block, e)

    def _fold(self, name: str, plan: RoundPlan, earlier: list[_Upload], last: _Upload, delta: Tensors) -> bool:
        """Fold a worker's whole update into its round: the parked blocks (`earlier`, which this call now
        owns and releases) and `last` with its decoded `delta`. Returns whether `last`'s memory was
        adopted as the round's accumulator. A failure before anything was added parks the earlier
        blocks again (a resend of `last` completes the update); one once adding began stops the
        coordinator (the round's means would hold part of a contribution: it resumes from its
        checkpoint, and the workers send the round again)."""
        m = last.manifest
        added, adding = 0, False
        adopted_last = False
        try:
            for up in [*earlier, last]:
                # A parked block was checked when it came; decoding it again reads its buffer or file.
                d = delta if up is last else self.codec.decode(up.assembly.blob(), self.specs[up.manifest.block].tensors)
                # A delta that views the upload's memory (codec "none"), which is ours alone, can become
                # the round's accumulator as it is (the memory goes back to the pool with the round).
                memory = up.assembly.memory
                owner = memory if memory is not None and _views(d, memory) else None
                if self.config.record_updates:  # before the fold, which may add into d's memory
                    self._record(plan.round, name, up.manifest, d)
                t = time.perf_counter()
                adding = True
                adopted = self.algorithm.fold(plan.sums, up.manifest.block, d, float(up.manifest.num_tokens),
                                              adopt=owner is not None, owner=owner)
                adding = False
                seconds = time.perf_counter() - t
                self.metrics.aggregation_duration.observe(seconds)
                with self._cv:
                    self._fold_seconds[plan.round] = self._fold_seconds.get(plan.round, 0.0) + seconds
                added += 1
                del d
                if up is last:
                    adopted_last = adopted
                else:
                    self._release(up, keep_memory=adopted)
        except BaseException as e:
            if added or adding:
                for up in earlier[added:]:
                    self._release(up)
                self._fail(RuntimeError(f"round {plan.round}: folding in {name}'s update failed after {added} of "
                                        f"{len(earlier) + 1} blocks: {e!r}"))
            else:
                with self._cv:  # still whole: they wait again for `last`, which the worker sends again
                    for up in earlier:
                        up.assembly.suspend()
                        plan.parked.setdefault(name, set()).add(up.manifest.block)
                        self._parked.setdefault((name, plan.round), {})[up.manifest.block] = up
            raise
        finally:
            blocks = [up.manifest.block for up in [*earlier, last]]
            ok = added == len(blocks)
            loss = m.train_loss if math.isfinite(m.train_loss) else 0.0
            with self._cv:
                self.rounds.end_fold(plan, name, blocks, ok, m.num_tokens, loss)
                if ok:
                    self.totals.updates_accepted += len(blocks)
                    for w in self.registry.all():
                        if w.name == name:
                            w.updates_accepted += len(blocks)
                self._cv.notify_all()
        self.metrics.updates.labels("accepted", "").inc(len(blocks))
        self.metrics.peer_updates_accepted.labels(name).inc(len(blocks))
        log.debug("round %d: %s from %s accepted", plan.round, "+".join(blocks) if len(blocks) < 4 else f"{len(blocks)} blocks", name)
        self.progress.show(
            f"round {plan.round}/{self.rounds.total}: {plan.workers_done}/{len(plan.assignments)} workers delivered, "
            f"{self.totals.bytes_up / 1e6:.1f} MB up, {self.totals.bytes_down / 1e6:.1f} MB down",
            force=True,
        )
        return adopted_last

    def report(self, name: str, session: str, round: int, base_version: int, numbers: tuple[float, ...],
               tokens: int, loss: float, timings: TaskTimings | None = None) -> str:
        """A record update (a few numbers for the worker's whole task), checked and kept by its round.
        Returns "accepted" or "late"; raises Refused or UnknownWorker."""
        self.registry.check(name, session)
        received = self.wall_seconds()
        if not self.algorithm.records:
            raise self._reject("wrong_kind", f"{self.config.algorithm} takes tensor updates (Upload), not records")
        with self._cv:
            try:
                plan = self.rounds.admit_record(name, round, base_version)
            except Refused as e:
                if e.reason != "late":
                    self._count("rejected", e.reason)
                    raise
                self._late(name, round)
                return "late"
            try:
                self.algorithm.check(Task(plan.assignments[name], plan.seeds.get(name, ())), numbers)
            except ValueError as e:
                raise self._reject("malformed", str(e)) from None
            norm = math.sqrt(math.fsum(x * x for x in numbers))
            if self.config.max_update_norm and norm > self.config.max_update_norm:
                raise self._reject("too_large_norm", f"the record's L2 norm {norm:.4g} exceeds --max-update-norm "
                                                     f"{self.config.max_update_norm:g}")
            self.rounds.hand_in(name, round, self._present())
            plan.records[name] = tuple(numbers)
            blocks = plan.assignments[name]
            self.rounds.end_fold(plan, name, blocks, True, max(1, tokens), loss if math.isfinite(loss) else 0.0)
            self.totals.updates_accepted += 1
            for w in self.registry.all():
                if w.name == name:
                    w.updates_accepted += 1
            self._deliver()
            self._task_timings(name, round, timings, received)
            self._cv.notify_all()
        self.metrics.updates.labels("accepted", "").inc()
        self.metrics.peer_updates_accepted.labels(name).inc()
        self._seen(name)
        return "accepted"

    def catch_up(self, name: str, session: str, held: int, after_download: bool = False) -> CatchUp:
        """What a worker whose copy is at version `held` needs to reach the current global version
        (`after_download`: its copy is the block files it just downloaded)."""
        self.registry.check(name, session)
        with self._cv:  # the log changes when a round closes
            return self.algorithm.catch_up(held, self.global_model.version, name, after_download)

    def abandon(self, name: str, session: str, round: int, reason: str) -> None:
        """The worker gives up its part in `round` (its update was refused for good)."""
        self.registry.check(name, session)
        with self._cv:
            if self.rounds.abandon(name, round):
                self.metrics.updates.labels("abandoned", _label(reason)).inc()
                log.warning("worker %s abandoned round %d: %s", name, round, reason[:200])
                self._drop_stale_uploads()  # its blocks that waited for the rest
                self._deliver()
                self._cv.notify_all()

    def upload_status(self, name: str, session: str, round: int, block: str, sha: bytes) -> UploadState:
        """What the coordinator holds of an upload, so that a resend sends only what is missing."""
        self.registry.check(name, session)
        with self._uploads_lock:
            up = self._uploads.get((name, round, block))
            if up is not None and up.manifest.blob_sha256 == sha:  # complete: the header gets its outcome
                return UploadState(sorted(up.assembly.held), up.assembly.complete)
        with self._cv:
            if round <= self.rounds.version:
                self._closed_for_good(round)
                return UploadState([], True, closed=True)
            has = self.rounds.has_update(name, round, block)
            return UploadState([], has, delivered=has)

    def download(self, name: str, session: str, held: Mapping[str, int], holds: Mapping[str, bytes] | None = None,
                 task_round: int = 0, base_held: Iterable[str] = ()) -> Sync:
        """What a worker holding block versions `held` is sent. Its view is the global model, or what the
        algorithm gives its task of `task_round` (while that round is open and the worker in it).
        A block the worker keeps the base values of (`base_held`) is not sent when its view is the base.
        A block it claims to hold (`holds`, its own lossless update) is not sent when the claim is the
        global value's canonical hash. The blocks are those of `files_at` (for a records algorithm it
        may be older than `version`)."""
        self.registry.check(name, session)
        g = self.global_model
        task = self._task(name, task_round) if task_round else None
        versions = dict(self.algorithm.view(g.block_versions, task))
        holds = {} if self.algorithm.records else dict(holds or {})  # a records replica moves in place
        base_held = set(base_held)
        send, confirmed = [], {}
        for b in self.block_order:
            v = versions[b]
            # Any difference counts: a worker can be ahead of a coordinator that restarted from a checkpoint.
            if held.get(b, -1) == v or (v == 0 and b in base_held):
                continue
            claim = holds.get(b)
            if claim is not None and v == g.block_versions[b] and claim == self._canonical_sha256(g, b):
                confirmed[b] = claim
            else:
                send.append(b)
        return Sync(g, versions, send, confirmed, task_round if task is not None else 0)

    def _task(self, name: str, round: int) -> Task | None:
        """The worker's task in `round`, if that round is open and it takes part."""
        with self._cv:
            plan = self.rounds.plans.get(round)
            if plan is None or name not in plan.assignments:
                return None
            return Task(plan.assignments[name], plan.seeds.get(name, ()))

    def _canonical_sha256(self, g: GlobalModel, block: str) -> bytes | None:
        """The canonical hash of the global block (a block method never changes its tensors in place);
        None when its file is gone (`g` is older than the checkpoints kept: the block is sent, and the
        download, whose pin fails, is asked again)."""
        version = g.block_versions[block]
        with self._hash_lock:
            hit = self._canonical.get(block)
        if hit is not None and hit[0] == version:
            return hit[1]
        try:
            digest = B.canonical_sha256(g.tensors[block], [t.name for t in self.specs[block].tensors])
        except BlockFileMissing:
            return None
        with self._hash_lock:
            self._canonical[block] = (version, digest)
        return digest

    def _check_base_files(self) -> dict[str, str]:
        """SHA-256 of each base block file (version 0), checked against the initial model's hashes
        (one block file mapped at a time)."""
        shas = {}
        for b in self.block_order:
            try:
                shas[b] = self.store.file_sha256(b, 0)
            except BlockFileMissing:
                raise StateError(f"{self.config.algorithm} with these settings hands out the base model, whose block "
                                 f"file {self.store.block_path(b, 0).name} is gone; use another --state-dir") from None
            names = [t.name for t in self.specs[b].tensors]
            expected = self.initial_sha256.get(b)
            if expected is not None and B.canonical_sha256(self.store.read_block(b, 0, shas[b]), names) != expected:
                raise StateError(f"base block file {self.store.block_path(b, 0).name} is not the initial model's {b}")
        return shas

    def download_manifest(self, g: GlobalModel, block: str, version: int) -> tuple[Manifest, Path]:
        """The manifest and the file a download of (block, version) streams: the block file itself
        (codec "none"), or its encoding with --download-codec, made once per block version."""
        file_sha = g.block_sha256[block] if version == g.block_versions[block] else self._base_sha256[block]
        if self.download_codec.spec == "none":
            path = self.store.block_path(block, version)
            size, sha = path.stat().st_size, bytes.fromhex(file_sha)
        else:
            path, size, sha = self._encoded(block, version, file_sha)
        spec = self.specs[block]
        manifest = Manifest(
            round=g.version,
            block=block,
            base_version=version,
            tensors=spec.tensors,
            codec=self.download_codec.spec,
            raw_bytes=spec.numel * 4,
            wire_bytes=size,
            blob_sha256=sha,
            chunk_size=self.config.chunk_size,
            num_chunks=wire.num_chunks(size, self.config.chunk_size),
        )
        return manifest, path

    def _encoded(self, block: str, version: int, file_sha: str) -> tuple[Path, int, bytes]:
        key = (block, version)
        with self._hash_lock:
            hit = self._blobs.get(key)
        if hit is not None and hit[0].is_file():
            return hit
        with self._encode_lock:
            with self._hash_lock:
                hit = self._blobs.get(key)
            if hit is not None and hit[0].is_file():  # encoded while we waited
                return hit
            blob = self.download_codec.encode(block, self.store.read_block(block, version, file_sha))
            path = self.store.write_blob(block, version, self.download_codec.spec, blob)
            hit = (path, len(blob), wire.sha256(blob))
            with self._hash_lock:
                self._blobs[key] = hit
            return hit

    def note_interval(self, worker: str, kind: str, start_s: float, end_s: float) -> None:
        """One interval of a worker's timeline (compute, idle, upload, download), in run seconds; the next
        round's entry in the history keeps it (summary.json, `fedblock report`)."""
        with self._cv:
            self._keep_interval(worker, kind, start_s, end_s)

    def _keep_interval(self, worker: str, kind: str, start_s: float, end_s: float) -> None:
        """Under the lock: within the bounds, whatever a worker sends or how often it syncs."""
        if len(self._intervals) < MAX_INTERVALS and self._interval_counts.get(worker, 0) < MAX_WORKER_INTERVALS:
            self._interval_counts[worker] = self._interval_counts.get(worker, 0) + 1
            self._intervals.append([worker, kind, round(start_s, 3), round(end_s, 3)])

    def downloaded(self, worker: str, started_s: float, blocks: int) -> None:
        """A model sync of `blocks` blocks (begun at `started_s`) went out to the worker."""
        ended = self.wall_seconds()
        self.metrics.phase_seconds.labels("download").observe(ended - started_s)
        if blocks:
            self.note_interval(worker, "download", started_s, ended)

    def _task_timings(self, worker: str, task_round: int, timings: TaskTimings | None, received_s: float) -> None:
        """Under the lock: the worker's compute and idle time of its task of `task_round`, once per task, put
        on the coordinator's clock: the message left the worker at `sent_unix`, and came at `received_s`."""
        if timings is None or (worker, task_round) in self._timed:
            return
        lead = timings.sent_unix - timings.started_unix  # from training's start to the message leaving
        if not (0 <= timings.compute_s <= lead + 1 and lead <= received_s + 60 and timings.idle_s <= received_s + 60):
            log.debug("worker %s, round %d: timings %s do not fit the run's clock; ignored", worker, task_round, timings)
            return  # a clock that jumped, or timings made up: nothing that lands in a histogram or a file
        self._timed.add((worker, task_round))
        self.metrics.phase_seconds.labels("training").observe(timings.compute_s)
        started = received_s - lead
        if timings.idle_s > 0:
            self._keep_interval(worker, "idle", started - timings.idle_s, started)
        self._keep_interval(worker, "compute", started, started + timings.compute_s)

    def count_sent(self, kind: str, nbytes: int) -> None:
        self.metrics.bytes_sent.labels(kind).inc(nbytes)
        if kind == "model":
            with self._cv:
                self.totals.bytes_down += nbytes

    def count_received(self, kind: str, nbytes: int) -> None:
        self.metrics.bytes_received.labels(kind).inc(nbytes)
        if kind == "update":
            with self._cv:
                self.totals.bytes_up += nbytes

    def status(self) -> dict:
        with self._cv:
            now = time.monotonic()
            head = self.rounds.head
            last = self.totals.eval_history[-1] if self.totals.eval_history else [0, math.nan]
            return {
                "run_id": self.run_id,
                "algorithm": self.config.algorithm,
                "round": head.round if head else 0,
                "rounds_completed": self.global_model.version,
                "rounds_total": self.rounds.total,
                "workers": [
                    {
                        "name": w.name,
                        "connected": w.connected,
                        "last_seen_s": now - w.last_seen if w.last_seen else math.inf,
                        "updates_accepted": w.updates_accepted,
                        "current_round": max((r for r, p in self.rounds.plans.items() if w.name in p.assignments), default=0),
                        "local_steps": w.local_steps,
                        "device": self.hardware.get(w.name, {}).get("device", ""),
                    }
                    for w in self.registry.all()
                ],
                "bytes_received": self.totals.bytes_up,
                "bytes_sent": self.totals.bytes_down,
                "last_eval_round": int(last[0]),
                "last_eval_loss": float(last[1]),
                "state": self.state,
            }

    # ---- operator controls (`fedblock admin` through the service, signals through the daemon) --------
    # Each returns what it did, in words, and logs it with who asked (`by`); LookupError: no such worker;
    # ValueError (ConfigError among them): refused, nothing changed.

    _reloaded: Authenticator | None = None  # the workers' tokens as a reload left them (None: never reloaded)

    def describe(self, name: str) -> RunInfo:
        """What a Join would tell `name` about the run, for a pre-flight check (`fedblock worker --check`):
        no session, nothing registered or counted as connected."""
        log.info("worker %s: pre-flight check (authenticated; nothing joined)", name)
        return self._run_info("")

    def drop_worker(self, name: str, by: str = "an operator") -> str:
        """End a worker's part in the run: it is sent RunEnd("dropped by operator") and every later call
        of its session is refused, so it exits instead of joining again; its open rounds go on without it.
        A worker started again under the name may join again (its token permitting)."""
        with self._cv:
            record = next((w for w in self.registry.all() if w.name == name), None)
            if record is None:
                known = ", ".join(sorted(w.name for w in self.registry.all())) or "none"
                raise LookupError(f"no worker named {name!r} (known: {known})")
            if record.connected:
                self._end_worker(name, DROPPED)
                result = f"dropped worker {name!r}: its open rounds go on without it"
            elif name in self._awaited:  # after a restart, not back yet: stop waiting for it
                self._awaited.discard(name)
                self.rounds.departed(name)
                self._drop_stale_uploads()
                self._deliver()
                self._cv.notify_all()
                result = f"no longer waiting for worker {name!r}: its open rounds go on without it"
            else:
                raise ValueError(f"worker {name!r} is not connected: nothing to drop")
        log.warning("%s: %s", by, result)
        return result

    def reload_tokens(self, workers: Authenticator | None, operators: Authenticator | None = None,
                      by: str = "an operator") -> str:
        """Read the --auth-tokens (and --admin-tokens) files again and use them from now on; a connected
        worker whose token is no longer the one it joined with is dropped (RunEnd "token revoked"). A
        file that is not valid changes nothing (ConfigError)."""
        files = [a for a in (workers, operators) if a is not None and a.path is not None]
        if not files:
            raise ValueError("this coordinator has no --auth-tokens or --admin-tokens file to reload")
        tables = [(a, a.read()) for a in files]  # all read before any is used
        revoked = []
        with self._cv:  # a Join registering meanwhile checks its token against the new table (`join`)
            for a, tokens in tables:
                a.tokens = tokens
            if workers is not None and workers.path is not None:
                self._reloaded = workers
                for w in self.registry.all():
                    if w.connected and not workers.admits(w.name, w.token):
                        self._end_worker(w.name, REVOKED)
                        revoked.append(w.name)
        read = "; ".join(f"{a.flag}: {len(tokens)} {a.who}s" for a, tokens in tables)
        result = f"reloaded {read}; " + (f"dropped {', '.join(revoked)} (token revoked or changed)" if revoked
                                         else "no worker dropped")
        log.warning("%s: %s", by, result)
        return result

    def drain(self, by: str = "an operator") -> str:
        """Finish the rounds already planned, plan no new one, then end the run as a complete one."""
        with self._cv:
            self._check_running()
            last, before = self.rounds.committed, self.rounds.total
            self._set_total(last)
            result = (f"draining: the run ends after round {last} (of {before})" if last > self.rounds.version
                      else f"no round is open: the run ends now, at round {last} (of {before})")
        log.warning("%s: %s", by, result)
        return result

    def set_rounds(self, rounds: int, by: str = "an operator") -> str:
        """Run `rounds` rounds in all, more or fewer than --rounds, but never fewer than are planned
        already (ValueError), and at least 1. A coordinator started again with the same --rounds keeps it
        (STATE_DIR/rounds.json)."""
        with self._cv:
            self._check_running()
            if rounds < 1 and self.rounds.committed == 0:
                raise ValueError("a run is at least 1 round long (to end it now: drain)")
            before = self.rounds.total
            self._set_total(rounds)
        result = f"the run is now {rounds} rounds long (was {before}; {self.rounds.version} done)"
        log.warning("%s: %s", by, result)
        return result

    def _check_running(self) -> None:
        """Under the lock: the run's length may change only while it runs (or waits for workers)."""
        if self.rounds.finished or self._stop.is_set() or self.state in ("finished", "stopped"):
            raise ValueError(f"the run is over ({self.state}, {self.rounds.version} rounds done)")

    def _set_total(self, rounds: int) -> None:
        """Under the lock: the one place the run's length changes (`Rounds.total` is what all read).
        Recorded first, so that a restart with the same --rounds keeps it; nothing changes unless it is."""
        self.rounds.check_total(rounds)
        try:
            self.store.write_rounds(rounds, self.config.rounds)
        except OSError as e:
            raise ValueError(f"cannot record the run's new length in the state dir ({e}); it is unchanged") from None
        self.rounds.set_total(rounds)
        self.metrics.rounds_target.set(rounds)
        self._cv.notify_all()  # the run loop sees at once that it is over (a drain with no round open)

    def _end_worker(self, name: str, reason: str) -> None:
        """Under the lock: end a connected worker's session (`Registry.end`), then plan without it. Its
        per-worker series go: an operator's decision is no lost worker (FedblockWorkerLost)."""
        self.registry.end(name, RunEnd(reason, self.global_model.version), reason)
        self._drop(name, reason)
        m = self.metrics
        for series in (m.peer_connected, m.peer_local_steps, m.peer_last_seen, m.peer_updates_accepted):
            try:
                series.remove(name)
            except KeyError:
                pass
        log.warning("worker %s: %s; its session is over", name, reason)

    def _end_if_revoked(self, name: str, token: str) -> None:
        """Under the lock, as a worker joins: drop it if a reload has revoked the token it joined with."""
        if self._reloaded is not None and not self._reloaded.admits(name, token):
            self._end_worker(name, REVOKED)

    # ---- the main loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        """Run rounds until `--rounds` are done (or `stop()`); then evaluate, export, summarise."""
        self._t0 = time.monotonic()
        if self._evaluate is not None:
            self._evaluations = BackgroundEvaluation(self._evaluate, self._evaluated)
        try:
            return self._run()
        except BaseException:
            self.stop()  # no checkpoint is coming: "late" answers waiting for one give up (`_closed_for_good`)
            raise
        finally:
            if self._evaluations is not None:
                self._evaluations.close()

    def _run(self) -> dict:
        if not self.totals.eval_history:  # on its own thread: round 1 does not wait for it
            self._submit_eval()
        started = self.global_model.version > 0 or bool(self.rounds.plans)  # resumed: it runs at once
        if started:
            with self._cv:
                self._running()
        while not self._stop.is_set():
            plan = None
            with self._cv:
                if self.rounds.finished:
                    break
                self._expire_silent_workers()
                connected = self._present()
                if self.rounds.head is None and (started or len(connected) >= self.config.min_workers):
                    if self.rounds.plan(self.rounds.version + 1, connected) is not None and self.state == "waiting":
                        started = True
                        self._running()
                if started:
                    self.rounds.top_up(connected)
                self._deliver()
                self._note_round_starts()
                plan = self.rounds.closable(list(connected))
                if plan is not None:
                    self.rounds.close(plan, connected)
                    self._drop_stale_uploads()
                    self._deliver()
                    self._note_round_starts()
                else:
                    self._cv.wait(timeout=0.1)
            if plan is not None and self._failure is None:
                self._close_round(plan)
        if self._failure is not None:
            raise RuntimeError("the coordinator stopped; start it again to resume from its checkpoint") from self._failure
        return self._finish()

    def _running(self) -> None:
        self.state = "running"
        self.metrics.set_state("running")
        self._startup_peak = _peak_rss()
        _reset_peak_rss()  # from here on the peak is that of running rounds

    def _fail(self, error: BaseException) -> None:
        """Something the run cannot go on from: stop, and let `run` raise it (nothing more is written)."""
        log.critical("%s", error)
        self._failure = error
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()

    def wait_stopped(self, timeout: float) -> bool:
        return self._stop.wait(timeout)

    def wait_workers_told(self, timeout: float) -> bool:
        """After the run: wait until every known worker has been sent its end (a worker that was
        reconnecting when the run ended hears it when it joins again). False on timeout or stop()."""
        deadline = time.monotonic() + timeout
        while not all(w.told_end for w in self.registry.all()):
            if self._stop.wait(0.1) or time.monotonic() >= deadline:
                return False
        return True

    # ---- internals -----------------------------------------------------------------------------------

    def _check_manifest(self, m: Manifest) -> None:
        if m.wire_bytes > self.config.max_update_bytes:
            raise self._reject("too_large", f"{m.wire_bytes} wire bytes exceed the limit of {self.config.max_update_bytes}")
        if m.block not in self.specs:
            raise self._reject("unknown_block", f"no block named {m.block!r}")
        if m.codec != self.codec.spec:
            raise self._reject("wrong_codec", f"codec {m.codec!r}; this run uses {self.codec.spec!r}")
        if m.num_tokens <= 0:
            raise self._reject("no_weight", "num_tokens must be > 0")
        spec = self.specs[m.block]
        try:
            if m.chunk_size != self.config.chunk_size:
                raise wire.IntegrityError(f"chunk_size {m.chunk_size}; this run uses {self.config.chunk_size}")
            if m.raw_bytes != spec.numel * 4:
                raise wire.IntegrityError(f"raw_bytes {m.raw_bytes}; block {m.block} has {spec.numel * 4}")
            # No codec makes a block much bigger than its raw size: bound what one header may claim
            # (an in-memory upload reserves that much at once).
            if m.wire_bytes > 2 * m.raw_bytes + (1 << 20):
                raise wire.IntegrityError(f"wire_bytes {m.wire_bytes} is implausible for {m.raw_bytes} raw bytes")
            wire.check_manifest_shape(m, max_chunk_size=self.config.chunk_size, max_bytes=self.config.max_update_bytes)
            wire.check_specs(m.tensors, spec.tensors)
        except wire.IntegrityError as e:
            raise self._reject("bad_manifest", str(e)) from None

    def _reject(self, reason: str, message: str) -> Refused:
        self._count("rejected", reason)
        return Refused(reason, message)

    def _count(self, status: str, reason: str) -> None:
        """An update refused or late: in the metrics, and in the run's totals (summary.json) unless the
        worker's next try can succeed (the refusal says "send it again")."""
        self.metrics.updates.labels(status, reason).inc()
        if reason in RETRY_LATER:
            return
        with self._cv:  # re-entrant: callers may hold it
            key = f"updates_{status}"
            self.totals.refusals[key] = self.totals.refusals.get(key, 0) + 1

    def _late(self, name: str, round: int) -> None:
        """Under the lock: a worker handed in a closed round; it may get its next assignment. Answered
        once the round's close is checkpointed (`_closed_for_good`)."""
        self._closed_for_good(round)
        self._count("late", "round_closed")
        log.info("late update from %s for closed round %d", name, round)
        self._deliver()

    def _closed_for_good(self, round: int) -> None:
        """Under the lock, before a worker is told that `round` has closed ("late", or an upload state
        "closed"): wait until its checkpoint is written (the global model's version, which notices and
        heartbeats announce, is at `round`). A worker drops an update that came late; had this
        coordinator died between closing the round and writing its checkpoint, the next one resumes
        before the round, plans it again, and waits forever for that update (the worker trained the
        round already, and kept nothing of it). Refused ("in_progress": ask again) when this coordinator
        stops first, or the checkpoint takes longer than LATE_WAIT_S."""
        deadline = time.monotonic() + LATE_WAIT_S
        while self.global_model.version < round:
            left = deadline - time.monotonic()
            if self._stop.is_set() or left <= 0:
                raise Refused("in_progress", f"round {round} is closing; ask again")
            self._cv.wait(timeout=left)

    def _open_upload(self, name: str, m: Manifest) -> _Upload:
        """The upload of (worker, round, block): the one in progress when the blob is the same, else a
        new one that replaces an unclaimed older one (one open upload per key: a worker cannot hold
        more files or memory than its assignments). In memory while a slot is free, else in a file."""
        key = (name, m.round, m.block)
        with self._uploads_lock:
            up = self._uploads.get(key)
            if up is not None and up.manifest.blob_sha256 == m.blob_sha256:
                return up
            if up is not None:
                if up.claimed:
                    raise Refused("in_progress", "another upload of this block is being checked; ask again")
                del self._uploads[key]
                self._release_locked(up)
            if self._in_memory < self.config.upload_slots:
                self._in_memory += 1
                assembly = wire.Assembly(m, pool=self._pool)
            else:
                path = self.store.incoming_dir / f"{name}.r{m.round}.{m.block}.{m.blob_sha256.hex()[:16]}.part"
                assembly = wire.Assembly(m, path)
            up = self._uploads[key] = _Upload(key, m, assembly)
            return up

    def _claim(self, up: _Upload) -> bool:
        """True for the one stream that gets to check and fold in the complete upload; False for the
        others (they wait for its outcome). AssemblyClosed if it was discarded meanwhile."""
        with self._uploads_lock:
            if up.claimed:
                return False
            if self._uploads.get(up.key) is not up:
                raise wire.AssemblyClosed("upload discarded")
            up.claimed = True
            return True

    def _discard_upload(self, up: _Upload) -> None:
        with self._uploads_lock:
            if self._uploads.get(up.key) is up and not up.claimed:
                del self._uploads[up.key]
                self._release_locked(up)

    def _release(self, up: _Upload, keep_memory: bool = False) -> None:
        with self._uploads_lock:
            self._release_locked(up, keep_memory)

    def _release_locked(self, up: _Upload, keep_memory: bool = False) -> None:
        """Close the upload and give its memory back to the pool (unless the round's sums adopted it).
        Called once per upload, by its one owner: the table, the claiming stream, or the parking."""
        a = up.assembly
        a.close()
        if a.memory is not None:
            self._in_memory -= 1
            if not keep_memory:
                self._pool.give(a.memory)

    def _drop_stale_uploads(self) -> None:
        """Under the lock: uploads of closed rounds, and parked blocks of contributions that can no
        longer complete (their round closed, or the worker left it), can never be used."""
        with self._uploads_lock:
            for key in [k for k, up in self._uploads.items() if k[1] <= self.rounds.version and not up.claimed]:
                self._release_locked(self._uploads.pop(key))
        for key in list(self._parked):
            name, round = key
            plan = self.rounds.plans.get(round)
            if plan is None or name not in plan.parked:
                for up in self._parked.pop(key).values():
                    self._release(up)

    def _present(self) -> dict[str, int]:
        """Under the lock: the workers rounds are planned and closed with: the connected ones, and after
        a restart, until --resume-grace ends, those it waits for (their assignments go out when they
        join). Once it ends, the absent ones leave their open rounds, as a silent worker would."""
        present = self.registry.connected()
        if self._awaited and time.monotonic() >= self._awaited_until:
            log.warning("workers %s did not come back within --resume-grace %.0f s: planning without them",
                        ", ".join(sorted(self._awaited)), self.config.resume_grace)
            gone, self._awaited = self._awaited, set()
            for name in gone:
                self.rounds.departed(name)
            self._drop_stale_uploads()
        indices = self.registry.indices()
        return {**{w: indices.get(w, 0) for w in self._awaited}, **present}

    def _deliver(self) -> None:
        """Under the lock: send every assignment that may go out now."""
        for worker, assignment in self.rounds.deliveries():
            self.registry.send(worker, assignment)

    def _note_round_starts(self) -> None:
        head = self.rounds.head
        if head is not None and head.round not in self._round_started:
            self._round_started[head.round] = time.monotonic()
            self.metrics.round.set(head.round)
            self.metrics.round_started.set(time.time())
            log.info(
                "round %d/%d started: %s",
                head.round,
                self.rounds.total,
                ", ".join(f"{w}->{'+'.join(b) if len(b) < 4 else f'{len(b)} blocks'}" for w, b in sorted(head.assignments.items())),
            )

    def _expire_silent_workers(self) -> None:
        now = time.monotonic()
        for w in self.registry.all():
            if w.connected and now - w.last_seen > self.config.heartbeat_timeout:
                log.warning("worker %s silent for %.0f s: dropped from its rounds", w.name, now - w.last_seen)
                self._drop(w.name, "heartbeat timeout")

    def _drop(self, name: str, why: str) -> None:
        with self._cv:
            if self.registry.disconnect(name):
                log.info("worker %s gone (%s)", name, why)
            self.rounds.departed(name)
            self._drop_stale_uploads()
            self._deliver()
            self.metrics.workers_connected.set(len(self.registry.connected()))
            self.metrics.peer_connected.labels(name).set(0)
            self._cv.notify_all()

    def _close_round(self, plan: RoundPlan) -> None:
        """Aggregate a closed round into a new global version, checkpoint it, then announce it."""
        g = self.global_model
        t = time.perf_counter()
        try:
            changed = self.algorithm.close(plan, g.tensors)
        except Exception as e:  # the model may be half changed: nothing of it is written or announced
            self._fail(RuntimeError(f"round {plan.round}: the algorithm failed to close it: {e!r}"))
            return
        # Finite deltas can still overflow float32 when added to the block.
        finite = {b: is_finite(result) for b, result in changed.items()}
        for b in (b for b, ok in finite.items() if not ok):
            self._count("rejected", "non_finite_result")
            log.error("round %d: the new value of %s is not finite; %s keeps its value", plan.round, b, b)
        new_tensors = {b: result for b, result in changed.items() if finite[b]}
        written = sorted(new_tensors)
        del changed  # (comprehensions: no loop variable keeps a new block alive past its write)
        for memory in plan.sums.owners:  # the round's means are folded in: their memory can serve again
            self._pool.give(memory)
        with self._cv:
            folding = self._fold_seconds.pop(plan.round, 0.0)
        self.metrics.phase_seconds.labels("aggregation").observe(folding + time.perf_counter() - t)
        # A records algorithm may move the model on without writing blocks: its files stay where they were.
        files_version = g.files_at if self.algorithm.records and not written else plan.round
        versions = {**g.block_versions, **{b: plan.round for b in written}}
        t = time.perf_counter()
        shas = dict(g.block_sha256)
        for b in written:  # each new block goes once it is written: its file has it
            shas[b] = self.store.write_block(b, plan.round, new_tensors.pop(b))
        started = self._round_started.pop(plan.round, time.monotonic())
        # A record covers a worker's whole task; a tensor update is one block.
        updates = len(plan.records) if self.algorithm.records else sum(len(r) for r in plan.reported.values())
        with self._cv:
            self.totals.round_history.append({
                "round": plan.round,
                "closed_at_s": round(self.wall_seconds(), 3),
                "seconds": round(time.monotonic() - started, 3),
                "workers": plan.workers_done,
                "updates": updates,
                "tokens": plan.tokens,
                "train_loss": plan.train_loss,
                "blocks": written,
                "bytes_up": self.totals.bytes_up,
                "bytes_down": self.totals.bytes_down,
            })
            timeline, self._intervals, self._interval_counts = merge_intervals(self._intervals), [], {}
            self._timed = {k for k in self._timed if k[1] > plan.round}
            counters = {
                "bytes_up": self.totals.bytes_up,
                "bytes_down": self.totals.bytes_down,
                "updates_accepted": self.totals.updates_accepted,
                **self.totals.refusals,
                "wall_seconds": self.wall_seconds(),
            }
            eval_history = [list(e) for e in self.totals.eval_history]
            round_history = [dict(r) for r in self.totals.round_history]
            plans = self.rounds.records()  # a restart plans these rounds again as they are
            present = sorted(self._present())
            algorithm_state = self.algorithm.state()
        try:
            self.store.append_timeline(plan.round, timeline)
        except OSError as e:  # it serves the run's report; the run goes on
            log.warning("round %d: could not write its timeline: %s", plan.round, e)
        self.store.write_checkpoint(
            Checkpoint(plan.round, versions, shas, self.registry.indices(), counters, eval_history, round_history,
                       plans, present, algorithm_state)
        )
        self.metrics.checkpoint_duration.observe(time.perf_counter() - t)
        self.metrics.phase_seconds.labels("checkpoint").observe(time.perf_counter() - t)
        if self.config.record_updates and self.config.record_keep_rounds:
            self.store.prune_records(plan.round - self.config.record_keep_rounds + 1)
        new_global = GlobalModel(plan.round, versions, shas, g.tensors.next(versions, shas),
                                 files_version if files_version != plan.round else None)
        with self._cv:
            self.global_model = new_global
            self._cv.notify_all()  # "late" answers waited for this checkpoint (`_closed_for_good`)
            if plan.round < self.rounds.total:  # after the last round the end of the run is the news
                notice = ModelNotice(plan.round)
                for name in self.registry.connected():
                    self.registry.send(name, notice)
            self.metrics.round_duration.observe(time.monotonic() - started)
            self.metrics.rounds_completed.inc()
            self.metrics.model_version.set(plan.round)
        self.progress.clear()
        log.info(
            "round %d/%d closed: %d updates from %d workers, %d tokens, train loss %.4f, blocks %s, up %.1f MB, down %.1f MB",
            plan.round, self.rounds.total, updates, plan.workers_done,
            plan.tokens, plan.train_loss, ",".join(written) or "-", self.totals.bytes_up / 1e6,
            self.totals.bytes_down / 1e6,
        )
        every = self.config.eval_every
        if every and plan.round % every == 0 and plan.round < self.rounds.total:
            self._submit_eval()

    def _submit_eval(self) -> None:
        """Evaluate the current global model on the evaluation thread: a snapshot of it, whose block
        files stay on disk until it is evaluated (or dropped), and which copies a records algorithm's
        replica (it moves on in place)."""
        if self._evaluations is None:
            return
        g = self.global_model
        self._evaluations.submit(g.version, g.tensors.snapshot())

    def _evaluated(self, round: int, loss: float, accuracy: float | None, seconds: float) -> None:
        """On the evaluation thread: record one result ([round, loss] or [round, loss, accuracy])."""
        entry = [round, loss] if accuracy is None else [round, loss, accuracy]
        with self._cv:
            self.totals.eval_history = sorted([e for e in self.totals.eval_history if e[0] != round] + [entry])
            history = [list(e) for e in self.totals.eval_history]
        self.store.write_evaluations(history)  # only this thread writes it
        self.metrics.eval_loss.set(loss)
        log.info("eval after round %d: loss %.4f%s (%.1f s)", round, loss,
                 "" if accuracy is None else f", accuracy {accuracy:.3f}", seconds)

    def wall_seconds(self) -> float:
        """Seconds of the run so far, restarts included (the clock of its history and timeline)."""
        return self.totals.wall_seconds_before + (time.monotonic() - self._t0)

    def _finish(self) -> dict:
        g = self.global_model
        finished = self.rounds.finished
        with self._cv:
            self.state = "finished" if finished else "stopped"
            self.metrics.set_state(self.state)
            end = RunEnd("finished" if finished else "stopped", g.version)
            for name in self.registry.connected():
                self.registry.send(name, end)
        if self._evaluations is not None:
            if finished and (not self.totals.eval_history or self.totals.eval_history[-1][0] != g.version):
                self._submit_eval()
            if finished:  # the evaluations asked for complete, the final one last; a stopped run waits for none
                self._evaluations.wait_idle(self._stop)
            self._evaluations.close()
        if finished:
            out = self.config.export_dir or (self.store.root / "export")
            try:
                self.export_path = export_model(self.store.model_dir, g.tensors, out, self.config.lora).resolve()
                log.info("exported the final model to %s", self.export_path)
            except ConfigError as e:  # the folder filled up during the run: the checkpoint still has it
                log.error("no export: %s (fedblock export --state-dir %s writes it)", e, self.store.root)
        history = self.totals.eval_history
        summary = {
            "algorithm": self.config.algorithm,
            "run_id": self.run_id,
            "rounds_completed": g.version,
            "rounds_total": self.rounds.total,
            "workers": len(self.registry.all()),
            "worker_names": sorted(w.name for w in self.registry.all()),
            "updates_accepted": self.totals.updates_accepted,
            "updates_rejected": self.totals.refusals.get("updates_rejected", 0),
            "updates_late": self.totals.refusals.get("updates_late", 0),
            "eval_loss_initial": history[0][1] if history and history[0][0] == 0 else None,
            "eval_loss_final": history[-1][1] if history and history[-1][0] == g.version else None,
            "eval_accuracy_initial": history[0][2] if history and history[0][0] == 0 and len(history[0]) > 2 else None,
            "eval_accuracy_final": (history[-1][2] if history and history[-1][0] == g.version and len(history[-1]) > 2
                                    else None),
            "eval_history": history,
            "round_history": self.totals.round_history,
            "bytes_up": self.totals.bytes_up,
            "bytes_down": self.totals.bytes_down,
            "wall_seconds": round(self.wall_seconds(), 3),
            "export_path": str(self.export_path) if self.export_path else None,
            "coordinator_peak_rss_bytes": max(self._startup_peak, _peak_rss()),
            "rounds_peak_rss_bytes": _peak_rss(),
            "reproduce": {  # what it takes to run it again
                "revision": provenance.revision(),
                "packages": provenance.packages(),
                "config": _plain(dataclasses.asdict(self.config)),
                "coordinator": provenance.hardware(),
                "workers": {name: self.hardware[name] for name in sorted(self.hardware)},
            },
        }
        self.store.write_summary(summary)
        return summary



MAX_INTERVALS = 4096  # timeline intervals kept per round: a bound whatever the workers report
MAX_WORKER_INTERVALS = 64  # of one worker per round (a task's idle, compute, upload, and its syncs)


def merge_intervals(intervals: list[list], gap_s: float = 0.05) -> list[list]:
    """[worker, kind, start, end] intervals sorted, with those of the same worker and kind that touch
    (closer than `gap_s`) joined: the uploads of a task's blocks one after the other become one."""
    merged: dict[tuple[str, str], list[list]] = {}
    for worker, kind, start, end in sorted(intervals, key=lambda i: (i[0], i[1], i[2])):
        runs = merged.setdefault((worker, kind), [])
        if runs and start - runs[-1][3] <= gap_s:
            runs[-1][3] = max(runs[-1][3], end)
        else:
            runs.append([worker, kind, start, end])
    return sorted((i for runs in merged.values() for i in runs), key=lambda i: (i[2], i[0]))


def _plain(value):
    """JSON's form of a config value (paths as strings)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def _peak_rss() -> int:
    """Peak resident memory (bytes) since the last reset (Linux VmHWM), else since the start."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> None:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM); a no-op elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _views(tensors: Tensors, buffer) -> bool:
    """Whether every tensor lives in `buffer` (a writable buffer such as an anonymous map)."""
    start = torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()
    end = start + len(buffer)
    return all(start <= t.untyped_storage().data_ptr() < end for t in tensors.values())


def _label(reason: str) -> str:
    """A metric label from a reason a worker sent: the leading word, bounded."""
    word = reason.split(":", 1)[0].strip().lower()
    return word if word.replace("_", "").isalnum() and len(word) <= 32 else "other"
