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

from ..common import blocks as B
from ..common.config import WorkerConfig
from ..common.data import BatchStream, load_examples, tokenize
from ..common.metrics import serve as serve_metrics
from ..common.models import build_model_from_files, load_tokenizer
from ..common.security import channel_credentials
from ..common.training import BlockTrainer, OptimConfig
from .comm import Comm
from .compute import ComputeLoop
from .metrics import WorkerMetrics
from .session import Session, backoff_delays, reconnects
from .state import ModelBook, Patch
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


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    return device


@dataclass
class Outcome:
    finished: bool  # the coordinator ended the run
    rounds: int
    steps: int
    rounds_ahead: int = 0  # rounds that overlapped the previous round's communication
    error: BaseException | None = None


class Worker:
    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics | None = None):
        self.config = config
        self.metrics = metrics or WorkerMetrics()
        self.stop = threading.Event()
        self.training = False  # True once the compute and communication threads run
        # Fail on a bad data path or format before touching the network.
        self.examples = load_examples(config.data)
        self.device = pick_device(config.device)
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
                    info, data, stream, model, blocks, book = self._start(session, Path(work_dir) / "model")
                    break
                except grpc.RpcError as e:
                    # The coordinator went away while we fetched the model (a restart): start over.
                    if not reconnects(e) or (c.max_retries and attempt >= c.max_retries) or self.stop.is_set():
                        raise
                    log.warning("lost the coordinator while starting (%s); joining again", e.code().name)
                    self.stop.wait(next(delays))
            log.info("%s: %d training examples, model version %d", c.name, len(data), book.version)
            trainer = BlockTrainer(model, blocks, OptimConfig(grad_clip=c.grad_clip,
                                                              gradient_checkpointing=c.gradient_checkpointing))
            return self._loop(session, model, blocks, trainer, stream, book, info.pipeline_depth)
        finally:
            session.close()
            self.timeline.close()
            if c.work_dir is None:
                shutil.rmtree(work_dir, ignore_errors=True)

    def _start(self, session: Session, model_dir: Path):
        """Join, fetch the model's files and every block: (info, data, batches, model, blocks, book)."""
        c = self.config
        try:
            info = session.join(len(self.examples), str(self.device), c.connect_timeout)
        except grpc.RpcError as e:  # it waited --connect-timeout for the coordinator
            raise ConnectionError(f"cannot join the run at {c.coordinator}: {e.code().name}: {e.details()}") from None
        log.info("%s joined run %s (%s, depth %d, %d blocks, model version %d)",
                 c.name, info.run_id, info.algorithm, info.pipeline_depth, len(info.blocks), info.model_version)
        try:
            with _heartbeating(session, info.heartbeat_interval_s):
                return info, *self._prepare(session, model_dir, info)
        except grpc.RpcError as e:
            if not reconnects(e):
                session.leave("failed to start")
            raise
        except BaseException:
            session.leave("failed to start")  # so the coordinator does not wait for us
            raise

    def _prepare(self, session: Session, model_dir: Path, info):
        """Model files, data, model and every block: (data, batches, model, blocks, book)."""
        c = self.config
        session.fetch_model_files(model_dir)
        tokenizer = load_tokenizer(model_dir)
        data = tokenize(self.examples, tokenizer, c.max_seq_len)
        stream = BatchStream(data, c.batch_size, c.seed, tokenizer.pad_token_id)
        dtype = torch.bfloat16 if c.dtype == "bfloat16" else torch.float32
        model = build_model_from_files(model_dir, dtype=dtype, device=self.device)
        blocks = B.partition(model, info.layers_per_block)
        self._check_partition(model, blocks, info)
        book = ModelBook()
        self._initial_sync(session, model, blocks, book)
        return data, stream, model, blocks, book

    def _check_partition(self, model, blocks: list[B.Block], info) -> None:
        params = dict(model.named_parameters())
        local = {b.name: {n: tuple(params[n].shape) for n in b.params} for b in blocks}
        remote = {b.name: {t.name: tuple(t.shape) for t in b.tensors} for b in info.blocks}
        if local != remote:
            raise RuntimeError("the model built from the coordinator's files does not match its block layout")

    def _initial_sync(self, session: Session, model, blocks, book: ModelBook) -> None:
        """Download every block (the first delta sync holds nothing)."""
        version, block_versions, stream = session.download({})
        by_name = {b.name: b for b in blocks}
        got = {}
        for block in stream:
            B.assign_(B.block_params(model, by_name[block.block]), block.tensors)
            got[block.block] = {}
        if set(got) != set(by_name):
            raise RuntimeError(f"initial download is missing blocks {sorted(set(by_name) - set(got))[:5]}")
        book.applied(Patch(version, block_versions, got))

    def _loop(self, session, model, blocks, trainer, stream, book, depth) -> Outcome:
        inbox: queue.Queue = queue.Queue(INBOX_SIZE)
        outbox: queue.Queue = queue.Queue(1)
        compute = ComputeLoop(model, blocks, trainer, stream, book, inbox, outbox, depth, self.metrics, self.stop, self.timeline)
        comm = Comm(session, book, inbox, outbox, self.metrics, self.stop, self.timeline,
                    steps_done=lambda: compute.steps_done, num_examples=len(self.examples), device=str(self.device),
                    max_retries=self.config.max_retries, max_backoff=self.config.max_backoff)
        compute.on_handover = comm.notify_handover
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
        return Outcome(comm.run_end is not None, compute.rounds_done, compute.steps_done, compute.rounds_ahead, error)


def run(config: WorkerConfig) -> Outcome:
    """`fedblock worker`: SIGINT/SIGTERM stop it cleanly (at once while it is still starting up)."""
    worker = Worker(config)
    if config.metrics_port:
        server, _ = serve_metrics(worker.metrics.registry, config.metrics_port)

    def on_signal(*_):
        if worker.training:
            worker.stop.set()  # the threads finish their step or transfer and leave
        else:
            raise KeyboardInterrupt  # joining, downloading or tokenizing: nothing to finish

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
    try:
        return worker.run()
    finally:
        if config.metrics_port:
            server.shutdown()
