"""A fedblock worker: joins a run, fetches the model, then trains on one thread and talks on others."""

from __future__ import annotations

import itertools
import logging
import queue
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from ..common import adapters, sharding
from ..common import blocks as B
from ..common.algorithms import Algorithm, Local, load
from ..common.codecs import CodecPipeline
from ..common.config import ConfigError, WorkerConfig
from ..common.data import BatchStream, load_examples, tokenize
from ..common.messages import DROPPED, REVOKED, Patch
from ..common.metrics import serve as serve_metrics
from ..common.models import build_model_from_files, load_model, load_tokenizer, resolve_model
from ..common.parallel import DataParallel
from ..common.security import channel_credentials
from ..common.training import BlockTrainer, OptimConfig
from .comm import Comm
from .compute import ComputeLoop
from .metrics import WorkerMetrics
from .session import Session, backoff_delays, reconnects
from .site import Leader, Lockstep, join_site, leave_site, place_from_env, site_device
from .state import ModelBook
from .timeline import Timeline

log = logging.getLogger("fedblock.worker")
INBOX_SIZE = 16  # assignments and patches for the compute thread; a handful per round at most


@contextmanager
def _heartbeating(session: Session, interval: float) -> Iterator[None]:
    """Heartbeats while the worker starts (model files, tokenising, building the model, the first
    download can outlast --heartbeat-timeout); the communication thread takes over after."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(interval):
            try:
                session.heartbeat(-1, 0)
            except grpc.RpcError as e:  # the start-up itself notices a lost coordinator
                log.debug("heartbeat while starting failed: %s", e.code().name)

    thread = threading.Thread(target=beat, name="startup-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=1.0)  # at most one heartbeat call in flight, bounded by its own timeout


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return device


def _dtype(config: WorkerConfig) -> torch.dtype:
    return torch.bfloat16 if config.dtype == "bfloat16" else torch.float32


def build_local(config: WorkerConfig, info, model_dir: Path, examples, device: torch.device, work_dir: Path, stop,
                parallel: DataParallel | None = None, base: Path | None = None) -> Local:
    """The model (from the coordinator's files, or a local base model `base` in float32), its blocks,
    the trainer and the data stream (this process's rows of the site's batches under `parallel`): what
    the algorithm works on, before any block is downloaded."""
    tokenizer = load_tokenizer(model_dir)
    data = tokenize(examples, tokenizer, config.max_seq_len)
    shard = (parallel.rank, parallel.world) if parallel is not None else (0, 1)
    stream = BatchStream(data, config.batch_size, config.seed, tokenizer.pad_token_id, shard)
    # A local base model is read in float32 (its blocks are checked by their float32 hash) and cast after.
    model = load_model(base) if base is not None else build_model_from_files(model_dir, dtype=_dtype(config),
                                                                              device=device)
    model = adapters.add_lora(model, info.lora)  # the same adapters as the coordinator's, from its seed
    blocks = adapters.partition(model, info.layers_per_block, info.lora)
    params = dict(model.named_parameters())
    shapes = {b.name: {n: tuple(params[n].shape) for n in b.params} for b in blocks}
    if shapes != {b.name: {t.name: tuple(t.shape) for t in b.tensors} for b in info.blocks}:
        raise RuntimeError("the model built from the coordinator's files does not match its block layout")
    trainer = BlockTrainer(model, blocks, OptimConfig(grad_clip=config.grad_clip,
                                                      gradient_checkpointing=config.gradient_checkpointing), parallel)
    return Local(model, {b.name: b for b in blocks}, info.blocks, stream, trainer, work_dir, stop, parallel=parallel)


def shard_local(local: Local, device: torch.device) -> None:
    """Shard the local model over the site's ranks (sharding.py), each rank's part on `device`."""
    _, layers = B.find_decoder_layers(local.model)  # the partition into blocks found them already
    sharding.shard_model(local.model, layers, device, local.parallel.group)
    mine, total = sharding.held(local.model)
    log.info("rank %d holds %d of the model's %d parameters (%.1f%%, sharded with FSDP2)",
             local.parallel.rank, mine, total, 100 * mine / total)


@dataclass
class Outcome:
    finished: bool  # the coordinator ended the run
    rounds: int
    steps: int
    rounds_ahead: int = 0  # rounds that overlapped the previous round's communication
    error: BaseException | None = None
    reason: str = ""  # why the coordinator ended it: "finished", "stopped", "dropped by operator", "token revoked"


class Worker:
    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics | None = None, lockstep: Lockstep | None = None,
                 parallel: DataParallel | None = None, device: torch.device | None = None):
        """`lockstep`, `parallel`, `device`: rank 0 of a site of several processes (site.py)."""
        self.config = config
        self.lockstep = lockstep or Lockstep()
        self.parallel = parallel
        self.metrics = metrics or WorkerMetrics()
        self.stop = threading.Event()
        self.training = False  # True once the compute and communication threads run
        self.algorithm = self.local = self.book = None  # set once the worker has joined and has the model
        # Fail on a bad data path or format before touching the network.
        self.examples = load_examples(config.data)
        self.device = device or pick_device(config.device)
        self.timeline = Timeline(config.name, config.timeline)
        if config.insecure:
            log.warning("connecting without TLS (--insecure): only on a network you trust")

    def run(self) -> Outcome:
        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        m = self.metrics
        session = Session(
            c.coordinator, c.name,
            sent=lambda kind, n: m.bytes_sent.labels(kind).inc(n),
            received=lambda kind, n: m.bytes_received.labels(kind).inc(n),
            upload_rate=c.max_upload_rate,
            download_rate=c.max_download_rate,
            credentials=None if c.insecure else channel_credentials(c.tls_ca, c.tls_cert, c.tls_key),
            token=c.token,
            server_name=c.tls_server_name,
        )
        work_dir = c.work_dir or Path(tempfile.mkdtemp(prefix=f"fedblock-{c.name}-"))
        try:
            delays = backoff_delays(base=0.5, cap=c.max_backoff)
            for attempt in itertools.count(1):
                try:
                    info, algorithm, local, book = self._start(session, Path(work_dir))
                    break
                except grpc.RpcError as e:
                    # The coordinator went away while we fetched the model (a restart): start over.
                    if not reconnects(e) or (c.max_retries and attempt >= c.max_retries) or self.stop.is_set():
                        raise
                    log.warning("lost the coordinator while starting (%s); joining again", e.code().name)
                    self.stop.wait(next(delays))
            self.algorithm, self.local, self.book = algorithm, local, book  # for inspection (tests, benchmarks)
            log.info("%s: %d training examples, model version %d", c.name, len(local.stream.data), book.version)
            return self._loop(session, algorithm, local, book, info.pipeline_depth)
        finally:
            session.close()
            self.timeline.close()
            if c.work_dir is None:
                shutil.rmtree(work_dir, ignore_errors=True)

    def _start(self, session: Session, work_dir: Path):
        """Join, fetch the model's files and every block: (info, algorithm, local, book)."""
        c = self.config
        try:
            info = session.join(len(self.examples), str(self.device), c.connect_timeout)
        except grpc.RpcError as e:  # it waited --connect-timeout for the coordinator
            raise ConnectionError(f"cannot join the run at {c.coordinator}: {e.code().name}: {e.details()}") from None
        log.info("%s joined run %s (%s, depth %d, %d blocks, model version %d)",
                 c.name, info.run_id, info.algorithm, info.pipeline_depth, len(info.blocks), info.model_version)
        try:
            algorithm = self._algorithm(info)
        except BaseException as e:  # code never travels: this site lacks it, or it fails on the run's settings
            session.leave(f"cannot run algorithm {info.algorithm}: {e}"[:200])  # leaving never raises
            if not isinstance(e, Exception):
                raise
            raise ConfigError(f"the run uses algorithm {info.algorithm!r}, which this worker cannot run: {e}") from None
        if c.shard_model and (not algorithm.shardable or info.lora is not None):
            what = "LoRA adapters" if info.lora is not None else f"algorithm {info.algorithm!r}"
            session.leave(f"--shard-model: {what} not supported")
            raise ConfigError(f"--shard-model: the run trains {what}; a sharded model trains full weights with a "
                              "first-order block method (fedbcd, parablock, fedavg, fedcybgd)")
        try:
            with _heartbeating(session, info.heartbeat_interval_s):
                return info, algorithm, *self._prepare(session, work_dir, info, algorithm)
        except grpc.RpcError as e:
            if not reconnects(e):
                session.leave("failed to start")
            raise
        except BaseException:
            session.leave("failed to start")  # so the coordinator does not wait for us
            raise

    @staticmethod
    def _algorithm(info) -> Algorithm:
        cls = load(info.algorithm)
        settings = dict(info.algorithm_settings)
        trainable = [b for b in settings.get("trainable", "").split(",") if b] or [b.name for b in info.blocks]
        return cls(settings, info.blocks, trainable)

    def _prepare(self, session: Session, work_dir: Path, info, algorithm: Algorithm):
        """Model files, data, model and every block: (local, book)."""
        c = self.config
        model_dir = work_dir / "model"
        base = resolve_model(c.model) if c.model else None
        session.fetch_model_files(model_dir, have=base)
        session.fetch_files(info.codec_files, work_dir / "codec")  # the autoencoder's weights (ae:RATIO)
        self.lockstep.start(info, model_dir, c.shard_model)  # the other ranks build the model while this one downloads it
        local_model = base is not None and _same_file(base / "config.json", model_dir / "config.json")
        if base is not None and not local_model:
            log.warning("--model %s: its config.json is not the coordinator's; downloading the whole model", c.model)
        book = ModelBook()
        host = torch.device("cpu") if c.shard_model else self.device  # sharded, each rank's part goes to the device
        local = build_local(c, info, model_dir, self.examples, host, work_dir,
                            self.lockstep.stop_flag(self.stop), self.parallel, base if local_model else None)
        local.version = lambda: book.version
        matched = self._matching_blocks(local, info) if local_model else set()
        self._initial_sync(session, algorithm, local, book, matched)
        if local_model:  # only now: the sync took the algorithm's exact copy (zeroth-order) in float32
            local.model.to(device=host, dtype=_dtype(c)).train()
        if c.shard_model:  # only now: the local base model's blocks were hashed whole, on this rank alone
            shard_local(local, self.device)
        return local, book

    @staticmethod
    def _matching_blocks(local: Local, info) -> set[str]:
        """The blocks of a local base model whose canonical hash is the coordinator's initial one."""
        params, blocks = dict(local.model.named_parameters()), list(local.blocks.values())
        expected = dict(zip((b.name for b in info.blocks), info.initial_block_sha256, strict=False))
        matched = {b.name for b in blocks if expected.get(b.name) == B.canonical_sha256({n: params[n] for n in b.params}, b.params)}
        log.info("local base model: %d of %d blocks match the coordinator's initial model", len(matched), len(blocks))
        return matched

    def _initial_sync(self, session: Session, algorithm: Algorithm, local: Local, book: ModelBook,
                      matched: set[str]) -> None:
        """Download every block this worker lacks. Blocks of a local base model that match the initial
        model count as held at version 0; an algorithm that catches up by the log (zeroth-order) then
        downloads nothing at all and replays the log from version 0 when it is given a task."""
        names = set(local.blocks)
        if algorithm.catch_up_on_task and matched == names:
            patch = Patch(0, dict.fromkeys(names, 0), {})
        else:
            sync = session.download(dict.fromkeys(matched, 0))
            patch = Patch(sync.version, sync.block_versions, {block.block: block.tensors for block in sync.blocks})
            missing = {b for b in names - set(patch.blocks) if not (b in matched and sync.block_versions.get(b) == 0)}
            if missing:
                raise RuntimeError(f"initial download is missing blocks {sorted(missing)[:5]}")
        # The other ranks of a site hold no local base model: they are sent its matched blocks too.
        kept = {b: B.snapshot(B.block_params(local.model, local.blocks[b])) for b in matched - set(patch.blocks)}
        self.lockstep.apply(Patch(patch.version, {**patch.block_versions, **dict.fromkeys(kept, 0)},
                                  {**patch.blocks, **kept}) if kept else patch)
        algorithm.apply(patch, local)
        book.applied(patch)
        with book.lock:
            book.block_versions.update({b: 0 for b in matched - set(patch.blocks)})

    def _loop(self, session, algorithm, local, book, depth) -> Outcome:
        model, blocks, trainer, stream = local.model, list(local.blocks.values()), local.trainer, local.stream
        inbox: queue.Queue = queue.Queue(INBOX_SIZE)
        outbox: queue.Queue = queue.Queue(1)
        # With a lossless codec and float32 weights, a block handed in is, if nobody else trained it, the
        # new global value: the worker claims it by hash instead of downloading it back.
        # (Not sharded: the hash of a whole block would take the other ranks, busy training.)
        claim = CodecPipeline(session.info.codec).lossless and all(p.dtype == torch.float32 for p in model.parameters()) \
            and not sharding.is_sharded(model)
        compute = ComputeLoop(model, blocks, trainer, stream, book, inbox, outbox, depth, self.metrics, self.stop,
                              self.timeline, algorithm=algorithm, local=local, claim_holds=claim,
                              lockstep=self.lockstep)
        comm = Comm(session, book, inbox, outbox, self.metrics, self.stop, self.timeline,
                    steps_done=lambda: compute.steps_done, num_examples=len(self.examples), device=str(self.device),
                    max_retries=self.config.max_retries, max_backoff=self.config.max_backoff, algorithm=algorithm,
                    codec_weights=next((local.work_dir / "codec" / f.name for f in session.info.codec_files), None))
        compute.on_handover = comm.notify_handover
        compute.on_stale = comm.refetch
        compute.want_view = comm.want_view
        threads = [
            threading.Thread(target=compute.run, name="compute", daemon=True),
            threading.Thread(target=comm.read_events, name="events", daemon=True),
            threading.Thread(target=comm.transfer, name="transfer", daemon=True),
            threading.Thread(target=comm.heartbeats, name="heartbeat", daemon=True),
        ]
        for t in threads:
            t.start()
        self.training = True
        try:
            while not self.stop.wait(0.5):
                pass
        finally:
            self.stop.set()
            session.cancel_events()
            for t in threads:
                t.join(timeout=30)
        error = compute.error or comm.error
        if comm.run_end is None or error is not None:
            session.leave("error" if error else "stopped")
        return Outcome(comm.run_end is not None, compute.rounds_done, compute.steps_done, compute.rounds_ahead, error,
                       comm.run_end.reason if comm.run_end is not None else "")


def run(config: WorkerConfig) -> Outcome:
    """`fedblock worker`: SIGINT/SIGTERM stop it cleanly (at once while it is still starting up). Under
    torchrun with several processes, this process's part of the site (site.py): rank 0 is the worker,
    the others follow it."""
    place = place_from_env()
    if place is None:
        if config.shard_model:
            raise ConfigError("--shard-model shards the model over the processes of a site: start it with "
                              "--nproc-per-node N (N > 1) or under torchrun")
        return _run(Worker(config))
    if config.batch_size < place.ranks:
        raise ConfigError(f"--batch-size {config.batch_size} cannot be shared by the site's {place.ranks} processes")
    device = site_device(place, pick_device(config.device))
    control = join_site(place, device, config.rank_timeout)
    parallel = DataParallel(device)
    try:
        if place.leader:
            return _run(Worker(config, lockstep=Leader(control), parallel=parallel, device=device))
        from .follower import Follower

        try:
            Follower(config, parallel, device, control).run()
        except Exception as e:  # a rank died, or rank 0 failed mid-collective: this rank fails too
            return Outcome(False, 0, 0, error=e)
        return Outcome(True, 0, 0, reason="finished")
    finally:
        leave_site()


def _run(worker: Worker) -> Outcome:
    config = worker.config
    if config.metrics_port:
        server, _ = serve_metrics(worker.metrics.registry, config.metrics_port)
    lingering, stop_lingering = threading.Event(), threading.Event()

    def on_signal(*_):
        if lingering.is_set():  # the run is over for us: a signal now only ends the lingering
            stop_lingering.set()
        elif worker.training:
            worker.stop.set()  # the threads finish their step or transfer and leave
        else:
            raise KeyboardInterrupt  # joining, downloading or tokenizing: nothing to finish

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
    outcome = None
    try:
        outcome = worker.run()
        return outcome
    finally:
        if config.metrics_port:
            # After a run that finished (or an operator ended our part), so that the last values are scraped
            # and a pod that Kubernetes would restart stays as it is; never after a failure or a coordinator
            # that stopped: that exit status is what brings the worker back (a restart policy).
            if config.linger and outcome is not None and outcome.finished and outcome.reason in ("finished", DROPPED,
                                                                                                REVOKED):
                lingering.set()
                log.info("run over; serving /metrics for %.0f s more", config.linger)
                stop_lingering.wait(config.linger)
            server.shutdown()
            server.server_close()
