"""The coordinator: owns the global model and runs rounds. Knows nothing of gRPC.

The gRPC service (service.py) turns each call into one method here; the daemon (daemon.py) builds this
object and calls `run()` on its main thread. One condition variable guards the state; tensor work
(decoding, accumulating, aggregating, checkpointing) happens outside it.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import queue
import resource
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..common import wire
from ..common.algorithms import ALGORITHMS
from ..common.codecs import CodecPipeline
from ..common.config import ConfigError, CoordinatorConfig
from ..common.messages import BlockSpec, Event, Manifest, ModelFile, ModelNotice, RunEnd, RunInfo
from ..common.progress import Progress
from .aggregator import apply_mean, is_finite
from .metrics import CoordinatorMetrics
from .registry import Registry
from .rounds import Refused, RoundPlan, RoundRules, Rounds
from .store import Checkpoint, StateStore, export_model

log = logging.getLogger("fedblock.coordinator")

Tensors = dict[str, Tensor]
MAX_CONCURRENT_DECODES = 2  # bounds the memory of finishing uploads (one blob + one delta each)


@dataclass(frozen=True)
class GlobalModel:
    """One immutable version of the global model. Block tensors are never changed in place."""

    version: int
    block_versions: Mapping[str, int]
    block_sha256: Mapping[str, str]
    tensors: Mapping[str, Tensors]


@dataclass
class Totals:
    bytes_up: int = 0  # upload wire bytes received
    bytes_down: int = 0  # download wire bytes sent
    updates_accepted: int = 0
    wall_seconds_before: float = 0.0  # wall time of earlier runs of this state dir
    eval_history: list[list[float]] = field(default_factory=list)
    round_history: list[dict] = field(default_factory=list)


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
    ):
        """`evaluate(tensors_by_block) -> loss` is optional; `checkpoint` resumes a run."""
        self.config = config
        self.store = store
        self.run_id = run_id
        self.specs = {s.name: s for s in specs}
        self.block_order = [s.name for s in specs]
        patterns = [p.strip() for p in config.train_blocks.split(",") if p.strip()]
        self.trainable = tuple(b for b in self.block_order if any(fnmatch.fnmatchcase(b, p) for p in patterns))
        if not self.trainable:
            raise ConfigError(f"--train-blocks {config.train_blocks!r} matches none of the blocks "
                              f"({', '.join(self.block_order[:3])}, ..., {self.block_order[-1]})")
        self.codec = CodecPipeline(config.codec)
        self.metrics = metrics or CoordinatorMetrics()
        self._evaluate = evaluate
        self.registry = Registry()
        self.global_model = initial
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
                assign_all_blocks=ALGORITHMS[config.algorithm].all_blocks,
            ),
            version=initial.version,
        )
        self.totals = Totals()
        if checkpoint is not None:
            self.registry.restore(checkpoint.workers)
            self.totals.bytes_up = int(checkpoint.counters.get("bytes_up", 0))
            self.totals.bytes_down = int(checkpoint.counters.get("bytes_down", 0))
            self.totals.updates_accepted = int(checkpoint.counters.get("updates_accepted", 0))
            self.totals.wall_seconds_before = float(checkpoint.counters.get("wall_seconds", 0.0))
            self.totals.eval_history = [list(e) for e in checkpoint.eval_history]
            self.totals.round_history = [dict(r) for r in checkpoint.round_history]
        self._cv = threading.Condition()
        self._uploads: dict[tuple[str, int, str, bytes], wire.Assembly] = {}
        self._uploads_lock = threading.Lock()
        self._in_memory = 0  # assemblies held in memory (at most --upload-slots)
        self._pool = wire.BufferPool(keep=max(1, config.upload_slots))
        self._decode_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
        self._stop = threading.Event()
        self._round_started: dict[int, float] = {}
        self._t0 = time.monotonic()
        self._startup_peak = 0  # peak RSS before the first round (loading, first checkpoint)
        self.state = "waiting"
        self.progress = Progress()
        self.export_path: Path | None = None
        self.model_files = tuple(
            ModelFile(p.name, p.stat().st_size, wire.sha256(p.read_bytes())) for p in store.model_files()
        )

    # ---- calls from workers (via the service) ------------------------------------------------------

    def join(self, name: str) -> RunInfo:
        record = self.registry.join(name)
        with self._cv:  # its assignments go out when it opens its event stream (`events`)
            self.metrics.workers_connected.set(len(self.registry.connected()))
            self._cv.notify_all()
        log.info("worker %s joined (%d connected)", name, len(self.registry.connected()))
        c = self.config
        return RunInfo(
            session=record.session,
            run_id=self.run_id,
            algorithm=c.algorithm,
            pipeline_depth=c.depth,
            heartbeat_interval_s=c.heartbeat_interval,
            codec=self.codec.spec,
            chunk_size=c.chunk_size,
            max_message_bytes=c.chunk_size + (1 << 16),
            blocks=tuple(self.specs[b] for b in self.block_order),
            layers_per_block=c.layers_per_block,
            model_version=self.global_model.version,
            model_files=self.model_files,
            seed=c.seed,
            rounds=c.rounds,
        )

    def refused_join(self, name: str, why: str) -> None:
        self.metrics.joins_refused.inc()
        log.warning("refused a join as %r: %s", name, why)

    def authenticate(self, name: str, session: str) -> None:
        self.registry.check(name, session)

    def events(self, name: str, session: str, alive=lambda: True, poll_s: float = 0.5) -> Iterator[Event]:
        """The worker's event stream; ends when the caller is gone (`alive()` false), when the worker
        opens another stream, leaves or joins again, or when the run ends."""
        events = self.registry.open_stream(name, session)
        record = next(w for w in self.registry.all() if w.name == name)
        with self._cv:  # what was queued for an earlier stream is gone with it: send it again
            self.rounds.rejoined(name)
            self._deliver()
        g = self.global_model
        yield ModelNotice(g.version, dict(g.block_versions))  # what to sync to, first
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

    def heartbeat(self, name: str, session: str) -> int:
        self.registry.check(name, session)
        return self.global_model.version

    def leave(self, name: str, session: str) -> None:
        self.registry.check(name, session).told_end = True  # gone for good: nobody to tell the end
        self._drop(name, "left")

    def upload(self, name: str, session: str, manifest: Manifest, chunks: Iterable[tuple[int, bytes]]) -> str:
        """Receive one block delta. Returns "accepted" or "late"; raises Refused or UnknownWorker."""
        self.registry.check(name, session)
        self._check_manifest(manifest)
        with self._cv:
            try:
                self.rounds.admit(name, manifest.round, manifest.block, manifest.base_version)
            except Refused as e:
                if e.reason != "late":
                    self.metrics.updates.labels("rejected", e.reason).inc()
                    raise
                self._late(name, manifest.round)
                return "late"
            self.rounds.hand_in(name, manifest.round, self.registry.connected())
            self._deliver()
        assembly = self._assembly(name, manifest)
        try:
            return self._receive(name, manifest, assembly, chunks)
        except wire.AssemblyClosed as e:  # discarded meanwhile: its round closed, or another stream ended it
            with self._cv:
                if manifest.round <= self.rounds.version:
                    self._late(name, manifest.round)
                    return "late"
            raise self._reject("bad_chunk", str(e)) from None

    def _receive(self, name: str, manifest: Manifest, assembly: wire.Assembly, chunks: Iterable[tuple[int, bytes]]) -> str:
        """The chunks of an admitted upload; then decode, check and fold it in (see `upload`)."""
        for index, data in chunks:
            try:
                assembly.add(index, data)
            except wire.AssemblyClosed:
                raise
            except wire.IntegrityError as e:
                self._discard_upload(name, manifest)
                raise self._reject("bad_chunk", str(e)) from None
        if not assembly.complete:
            missing = assembly.manifest.num_chunks - len(assembly.held)
            raise self._reject("incomplete", f"stream ended with {missing} chunks missing; resume it")
        with self._decode_slots:
            # Decoding and the finite check read the blob while the tail of its hash is still being
            # computed; nothing is used before the hash has been checked.
            delta, problem = None, None
            blob = assembly.blob()  # AssemblyClosed if its round closed while it waited for a slot
            try:
                delta = self.codec.decode(blob, self.specs[manifest.block].tensors)
                if not is_finite(delta):
                    problem = ("non_finite", f"update for {manifest.block} contains NaN or Inf")
            except ValueError as e:
                problem = ("malformed", f"cannot decode the update: {e}")
            try:
                assembly.verify()  # a corrupted chunk is reported as such, whatever it did to the decoding
            except wire.IntegrityError as e:
                problem = ("hash_mismatch", str(e))
            finally:
                self._discard_upload(name, manifest)
            try:
                if problem is not None:
                    raise self._reject(*problem)
                # A delta that views the in-memory buffer (codec "none"), which is ours alone now, can
                # become the round's accumulator as it is (the buffer goes back to the pool with the round).
                owner = assembly.memory if assembly.memory is not None and _views(delta, assembly.memory) else None
                status, adopted = self._accumulate(name, manifest, delta, owner)
            finally:
                del delta
            if assembly.memory is not None and not (owner is not None and adopted):
                self._pool.give(assembly.memory)
            return status

    def abandon(self, name: str, session: str, round: int, reason: str) -> None:
        """The worker gives up its part in `round` (its update was refused for good)."""
        self.registry.check(name, session)
        with self._cv:
            if self.rounds.abandon(name, round):
                self.metrics.updates.labels("abandoned", _label(reason)).inc()
                log.warning("worker %s abandoned round %d: %s", name, round, reason[:200])
                self._deliver()
                self._cv.notify_all()

    def upload_status(self, name: str, session: str, round: int, block: str, sha: bytes) -> tuple[list[int], bool]:
        self.registry.check(name, session)
        with self._uploads_lock:
            assembly = self._uploads.get((name, round, block, sha))
            if assembly is not None:
                return sorted(assembly.held), assembly.complete
        with self._cv:
            return [], self.rounds.has_update(name, round, block)

    def download(self, name: str, session: str, held: Mapping[str, int]) -> tuple[GlobalModel, list[str]]:
        """The current global version and the blocks (in model order) newer than what the worker holds."""
        self.registry.check(name, session)
        g = self.global_model
        # Any difference counts: a worker can be ahead of a coordinator that restarted from a checkpoint.
        wanted = [b for b in self.block_order if held.get(b, -1) != g.block_versions[b]]
        return g, wanted

    def download_manifest(self, g: GlobalModel, block: str) -> tuple[Manifest, Path]:
        """Downloads stream the checkpoint's block files as they are: safetensors, codec "none"."""
        path = self.store.block_path(block, g.block_versions[block])
        size = path.stat().st_size
        spec = self.specs[block]
        manifest = Manifest(
            round=g.version,
            block=block,
            base_version=g.block_versions[block],
            tensors=spec.tensors,
            codec="none",
            raw_bytes=spec.numel * 4,
            wire_bytes=size,
            blob_sha256=bytes.fromhex(g.block_sha256[block]),
            chunk_size=self.config.chunk_size,
            num_chunks=wire.num_chunks(size, self.config.chunk_size),
        )
        return manifest, path

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
                "rounds_total": self.config.rounds,
                "workers": [
                    {
                        "name": w.name,
                        "connected": w.connected,
                        "last_seen_s": now - w.last_seen if w.last_seen else math.inf,
                        "updates_accepted": w.updates_accepted,
                    }
                    for w in self.registry.all()
                ],
                "bytes_received": self.totals.bytes_up,
                "bytes_sent": self.totals.bytes_down,
                "last_eval_round": int(last[0]),
                "last_eval_loss": float(last[1]),
                "state": self.state,
            }

    # ---- the main loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        """Run rounds until `--rounds` are done (or `stop()`); then evaluate, export, summarise."""
        self._t0 = time.monotonic()
        if self._evaluate is not None and not self.totals.eval_history:
            self._eval(0)
        started = self.global_model.version > 0
        while not self._stop.is_set():
            plan = None
            with self._cv:
                if self.rounds.finished:
                    break
                self._expire_silent_workers()
                connected = self.registry.connected()
                if self.rounds.head is None and (started or len(connected) >= self.config.min_workers):
                    if self.rounds.plan(self.rounds.version + 1, connected) is not None and self.state == "waiting":
                        started = True
                        self.state = "running"
                        self._startup_peak = _peak_rss()
                        _reset_peak_rss()  # from here on the peak is that of running rounds
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
            if plan is not None:
                self._close_round(plan)
        return self._finish()

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
        self.metrics.updates.labels("rejected", reason).inc()
        return Refused(reason, message)

    def _late(self, name: str, round: int) -> None:
        """Under the lock: a worker handed in a closed round; it may get its next assignment."""
        self.metrics.updates.labels("late", "round_closed").inc()
        log.info("late update from %s for closed round %d", name, round)
        self._deliver()

    def _assembly(self, name: str, m: Manifest) -> wire.Assembly:
        """The upload's assembly: in memory while a slot is free (--upload-slots), else in a file."""
        key = (name, m.round, m.block, m.blob_sha256)
        with self._uploads_lock:
            assembly = self._uploads.get(key)
            if assembly is None:
                if self._in_memory < self.config.upload_slots:
                    self._in_memory += 1
                    assembly = wire.Assembly(m, pool=self._pool)
                else:
                    path = self.store.incoming_dir / f"{name}.r{m.round}.{m.block}.{m.blob_sha256.hex()[:16]}.part"
                    assembly = wire.Assembly(m, path)
                self._uploads[key] = assembly
            return assembly

    def _discard_upload(self, name: str, m: Manifest) -> None:
        with self._uploads_lock:
            self._release(self._uploads.pop((name, m.round, m.block, m.blob_sha256), None))

    def _release(self, assembly: wire.Assembly | None) -> None:
        """Under the uploads lock."""
        if assembly is not None:
            if assembly.path is None:
                self._in_memory -= 1
            assembly.close()

    def _drop_stale_uploads(self) -> None:
        """Under the lock: partial uploads of closed rounds can never be used."""
        with self._uploads_lock:
            for key in [k for k in self._uploads if k[1] <= self.rounds.version]:
                self._release(self._uploads.pop(key))

    def _accumulate(self, name: str, m: Manifest, delta: Tensors, memory) -> tuple[str, bool]:
        """Fold a checked delta into its round; ("accepted" or "late", whether its memory was adopted)."""
        with self._cv:
            try:
                plan = self.rounds.begin_accumulate(name, m.round, m.block, m.base_version)
            except Refused as e:
                if e.reason == "late":
                    self._late(name, m.round)
                    return "late", False
                self.metrics.updates.labels("rejected", e.reason).inc()
                raise
        ok = adopted = False
        try:
            t = time.perf_counter()
            adopted = plan.sums.add(m.block, delta, float(m.num_tokens), adopt=memory is not None, owner=memory)
            self.metrics.aggregation_duration.observe(time.perf_counter() - t)
            ok = True
        finally:
            with self._cv:
                self.rounds.end_accumulate(plan, name, m.block, ok, m.num_tokens, m.train_loss if math.isfinite(m.train_loss) else 0.0)
                if ok:
                    self.totals.updates_accepted += 1
                    for w in self.registry.all():
                        if w.name == name:
                            w.updates_accepted += 1
                self._cv.notify_all()
        self.metrics.updates.labels("accepted", "").inc()
        log.debug("round %d: %s from %s accepted", plan.round, m.block, name)
        self.progress.show(
            f"round {plan.round}/{self.config.rounds}: {plan.workers_done}/{len(plan.assignments)} workers delivered, "
            f"{self.totals.bytes_up / 1e6:.1f} MB up, {self.totals.bytes_down / 1e6:.1f} MB down",
            force=True,
        )
        return "accepted", adopted

    def _deliver(self) -> None:
        """Under the lock: send every assignment that may go out now."""
        for worker, assignment in self.rounds.deliveries():
            self.registry.send(worker, assignment)

    def _note_round_starts(self) -> None:
        head = self.rounds.head
        if head is not None and head.round not in self._round_started:
            self._round_started[head.round] = time.monotonic()
            self.metrics.round.set(head.round)
            log.info(
                "round %d/%d started: %s",
                head.round,
                self.config.rounds,
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
            self._deliver()
            self.metrics.workers_connected.set(len(self.registry.connected()))
            self._cv.notify_all()

    def _close_round(self, plan: RoundPlan) -> None:
        """Aggregate a closed round into a new global version, checkpoint it, then announce it."""
        g = self.global_model
        new_tensors = {b: apply_mean(g.tensors[b], plan.sums.mean(b)) for b in plan.sums.blocks}
        for memory in plan.sums.owners:  # the round's means are folded in: their memory can serve again
            self._pool.give(memory)
        versions = {**g.block_versions, **{b: plan.round for b in new_tensors}}
        t = time.perf_counter()
        shas = dict(g.block_sha256)
        for b, tensors in new_tensors.items():
            shas[b] = self.store.write_block(b, plan.round, tensors)
        started = self._round_started.pop(plan.round, time.monotonic())
        with self._cv:
            self.totals.round_history.append({
                "round": plan.round,
                "closed_at_s": round(self._wall_seconds(), 3),
                "seconds": round(time.monotonic() - started, 3),
                "workers": plan.workers_done,
                "updates": sum(len(r) for r in plan.reported.values()),
                "tokens": plan.tokens,
                "train_loss": plan.train_loss,
                "blocks": sorted(new_tensors),
                "bytes_up": self.totals.bytes_up,
                "bytes_down": self.totals.bytes_down,
            })
            counters = {
                "bytes_up": self.totals.bytes_up,
                "bytes_down": self.totals.bytes_down,
                "updates_accepted": self.totals.updates_accepted,
                "wall_seconds": self._wall_seconds(),
            }
            eval_history = [list(e) for e in self.totals.eval_history]
            round_history = [dict(r) for r in self.totals.round_history]
        self.store.write_checkpoint(
            Checkpoint(plan.round, versions, shas, self.registry.indices(), counters, eval_history, round_history)
        )
        self.metrics.checkpoint_duration.observe(time.perf_counter() - t)
        new_global = GlobalModel(plan.round, versions, shas, {**g.tensors, **new_tensors})
        with self._cv:
            self.global_model = new_global
            if plan.round < self.config.rounds:  # after the last round the end of the run is the news
                notice = ModelNotice(plan.round, dict(versions))
                for name in self.registry.connected():
                    self.registry.send(name, notice)
            self.metrics.round_duration.observe(time.monotonic() - started)
            self.metrics.rounds_completed.inc()
            self.metrics.model_version.set(plan.round)
        self.progress.clear()
        log.info(
            "round %d/%d closed: %d updates from %d workers, %d tokens, train loss %.4f, blocks %s, up %.1f MB, down %.1f MB",
            plan.round, self.config.rounds, sum(len(r) for r in plan.reported.values()), plan.workers_done,
            plan.tokens, plan.train_loss, ",".join(sorted(new_tensors)) or "-", self.totals.bytes_up / 1e6,
            self.totals.bytes_down / 1e6,
        )
        every = self.config.eval_every
        if self._evaluate is not None and every and plan.round % every == 0 and plan.round < self.config.rounds:
            self._eval(plan.round)

    def _eval(self, round: int) -> float:
        t = time.perf_counter()
        loss = float(self._evaluate(self.global_model.tensors))
        with self._cv:
            self.totals.eval_history = [e for e in self.totals.eval_history if e[0] != round] + [[round, loss]]
        self.metrics.eval_loss.set(loss)
        log.info("eval after round %d: loss %.4f (%.1f s)", round, loss, time.perf_counter() - t)
        return loss

    def _wall_seconds(self) -> float:
        return self.totals.wall_seconds_before + (time.monotonic() - self._t0)

    def _finish(self) -> dict:
        g = self.global_model
        finished = self.rounds.finished
        with self._cv:
            self.state = "finished" if finished else "stopped"
            end = RunEnd("finished" if finished else "stopped", g.version)
            for name in self.registry.connected():
                self.registry.send(name, end)
        if self._evaluate is not None and finished and (not self.totals.eval_history or self.totals.eval_history[-1][0] != g.version):
            self._eval(g.version)
        if finished:
            out = self.config.export_dir or (self.store.root / "export")
            self.export_path = export_model(self.store.model_dir, g.tensors, out).resolve()
            log.info("exported the final model to %s", self.export_path)
        history = self.totals.eval_history
        summary = {
            "algorithm": self.config.algorithm,
            "run_id": self.run_id,
            "rounds_completed": g.version,
            "rounds_total": self.config.rounds,
            "workers": len(self.registry.all()),
            "worker_names": sorted(w.name for w in self.registry.all()),
            "updates_accepted": self.totals.updates_accepted,
            "eval_loss_initial": history[0][1] if history and history[0][0] == 0 else None,
            "eval_loss_final": history[-1][1] if history and history[-1][0] == g.version else None,
            "eval_history": history,
            "round_history": self.totals.round_history,
            "bytes_up": self.totals.bytes_up,
            "bytes_down": self.totals.bytes_down,
            "wall_seconds": round(self._wall_seconds(), 3),
            "export_path": str(self.export_path) if self.export_path else None,
            "coordinator_peak_rss_bytes": max(self._startup_peak, _peak_rss()),
            "rounds_peak_rss_bytes": _peak_rss(),
        }
        self.store.write_summary(summary)
        return summary



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
