"""Builds and runs a coordinator from its configuration: model, state dir, gRPC server, metrics."""

from __future__ import annotations

import ctypes
import json
import logging
import signal
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from torch import nn

from ..common import adapters, wire
from ..common.adapters import LoraSettings
from ..common.blocks import Block, Tensors, canonical_sha256
from ..common.config import ConfigError, CoordinatorConfig
from ..common.messages import BlockSpec
from ..common.metrics import serve as serve_metrics
from ..common.models import build_model_from_files, load_model, model_files, model_fingerprint, resolve_model
from ..common.rpc import message_limit, server_options
from ..common.security import Authenticator, load_tokens, server_credentials
from .coordinator import Coordinator, GlobalModel, trainable_blocks
from .metrics import CoordinatorMetrics
from .service import SERVICE, CoordinatorService, add_to_server
from .store import (
    Checkpoint,
    SafetensorsFile,
    StateError,
    StateStore,
    StoredModel,
    check_export_dir,
    exported_names,
)

log = logging.getLogger("fedblock.coordinator")
GRPC_THREADS = 1024  # every connected worker holds one event stream (one thread); threads start lazily


def build(config: CoordinatorConfig, metrics: CoordinatorMetrics | None = None) -> Coordinator:
    """A ready coordinator: the global model of the last checkpoint, or MODEL's at version 0. The model
    is never loaded whole: the architecture is built on the meta device, a checkpoint's blocks are read
    from their files when used, and a new run's blocks are written one at a time (`_base_blocks`).
    `metrics`: its registry (perhaps served already, while this loads)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    model_path = resolve_model(config.model)
    try:
        model = adapters.add_lora(build_model_from_files(model_path, device="meta"), config.lora)
    except ValueError as e:  # --lora-targets names no module of this model
        raise ConfigError(str(e)) from None
    store = StateStore(config.state_dir, keep=config.keep_checkpoints)
    store.remove_leftovers()  # of a killed coordinator: nothing else writes this state dir
    try:  # refused now rather than after the last round, when the run exports there
        check_export_dir(config.export_dir or store.root / "export", store.root)
    except ConfigError as e:
        raise ConfigError(f"--export-dir: {e}") from None
    try:
        blocks = adapters.partition(model, config.layers_per_block, config.lora)
    except (RuntimeError, NotImplementedError):  # the trace asked a meta tensor for a value (GPT-2's mask)
        log.info("tracing %s's blocks on an allocated copy of it (its memory, for a moment)", model_path.name)
        model = adapters.add_lora(build_model_from_files(model_path), config.lora)
        blocks = adapters.partition(model, config.layers_per_block, config.lora)
    trainable_blocks(config, [b.name for b in blocks])  # refused before the state dir is bound
    params = dict(model.named_parameters())
    specs = [BlockSpec.of(b.name, params, b.params) for b in blocks]
    cls = config.algorithm_class
    codec_sha = wire.sha256(config.codec_weights.read_bytes()).hex() if config.codec_weights else None
    run_id = store.bind_run(
        {
            "model_fingerprint": model_fingerprint(model_path),
            "algorithm": config.algorithm,
            # What a replay of the run's log depends on must not change when it resumes.
            "settings": {k: v for k, v in config.algorithm_settings().items() if k in cls.options},
            "train_blocks": config.train_blocks,
            "layers_per_block": config.layers_per_block,
            "blocks": [b.name for b in blocks],
            "codec": config.codec,
            "peft": config.lora.to_dict() if config.lora else None,
            # Latents in flight decode only with the decoder they were encoded for.
            "codec_weights_sha256": codec_sha,
        }
    )
    if config.codec_weights:
        store.install_codec_weights(config.codec_weights)
    store.install_model_files(model_files(model_path))
    intact = store.latest_intact()  # falls back past a damaged newest checkpoint, with a warning
    recorded = bool(store.initial_hashes())  # not by a new run, nor by a state format that did not record them
    if intact is None or not recorded:
        hashes, shas = {}, {}
        for block, tensors in _base_blocks(model_path, model, blocks, config.lora):
            hashes[block.name] = canonical_sha256(tensors, block.params)
            if intact is None:
                shas[block.name] = store.write_block(block.name, 0, tensors)
            del tensors  # before the next block is read
        if not recorded:
            store.write_initial_hashes(hashes)
    ckpt = None
    if intact is not None:
        ckpt, stored = intact
        initial = GlobalModel(ckpt.round, ckpt.block_versions, ckpt.block_sha256, stored)
        log.info("resuming run %s from the checkpoint of round %d", run_id, ckpt.round)
    else:
        versions = {b.name: 0 for b in blocks}
        store.write_checkpoint(Checkpoint(0, versions, shas))
        initial = GlobalModel(0, versions, shas, StoredModel(store, versions, shas))
    del model, params
    evaluate = None
    if config.eval_data:
        from .evaluation import Evaluator

        evaluate = Evaluator(store.model_dir, config.eval_data, config.eval_max_examples, config.eval_batch_size, config.max_seq_len,
                             config.lora)
    return Coordinator(config, store, run_id, specs, initial, metrics or CoordinatorMetrics(), evaluate, ckpt,
                       initial_sha256=store.initial_hashes())


def checkpoint_model(store: StateStore, ckpt: Checkpoint, tensors: StoredModel) -> StoredModel:
    """The global model of a checkpoint: its block files, brought to its round by the algorithm's state
    (a zeroth-order checkpoint holds the blocks it last wrote and the log since: those are read into
    memory and replayed there). For `fedblock export`."""
    if not ckpt.algorithm:
        return tensors
    import json

    from ..common.algorithms import load

    run = json.loads((store.root / "run.json").read_text())
    cls = load(run["algorithm"])
    lora = adapters.recorded(run)
    try:  # for its layout: on the meta device (no memory), or allocated and never loaded
        model = adapters.add_lora(build_model_from_files(store.model_dir, device="meta"), lora)
        blocks = adapters.partition(model, int(run.get("layers_per_block", 1)), lora)
    except (RuntimeError, NotImplementedError):  # the trace asked a meta tensor for a value (GPT-2's mask)
        model = adapters.add_lora(build_model_from_files(store.model_dir), lora)
        blocks = adapters.partition(model, int(run.get("layers_per_block", 1)), lora)
    params = dict(model.named_parameters())
    specs = [BlockSpec.of(b.name, params, b.params) for b in blocks]
    trainable = adapters.select_trainable([b.name for b in blocks], str(run.get("train_blocks", "*")), lora is not None)
    algorithm = cls(dict(run.get("settings", {})), specs, trainable)
    tensors = tensors.holding(trainable)  # the replay moves them in place
    try:
        algorithm.restore(ckpt.algorithm, tensors, ckpt.round)
    except ValueError as e:
        raise StateError(f"checkpoint of round {ckpt.round}: {e}") from None
    return tensors


def _weight_files(model_path: Path) -> list[Path]:
    """The safetensors files from_pretrained reads: those its index names, or model.safetensors (other
    files in the folder, an old copy say, are not the model)."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        return [model_path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = model_path / "model.safetensors"
    return [single] if single.is_file() else []


def _base_blocks(model_path: Path, model: nn.Module, blocks: list[Block],
                 lora: LoraSettings | None) -> Iterator[tuple[Block, Tensors]]:
    """Each block's initial value in float32, one block at a time. The base weights are read tensor by
    tensor from the model folder's safetensors files where those hold every one of `model`'s base
    parameters under its name and with its shape (as from_pretrained reads them); otherwise (another
    layout, which from_pretrained converts) the model is loaded whole, once. The adapters start as
    `add_lora` makes them from their seed, on an allocated base model that is never loaded (no memory
    but theirs)."""
    names = exported_names(model)  # the base parameters' names in the folder's files
    shapes = {names[n]: tuple(p.shape) for n, p in model.named_parameters() if n in names}
    where = {}  # base parameter (as the files name it) -> the file that holds it
    try:
        for path in _weight_files(model_path):
            f = SafetensorsFile(path)
            where.update({k: f for k, t in f.tensors.items() if t.shape == shapes.get(k)})
    except StateError:  # a dtype we do not read: from_pretrained does
        where = {}
    if not all(exported in where for exported in names.values()):
        log.info("%s's weight files are not laid out as its parameters: loading it whole", model_path.name)
        whole = adapters.add_lora(load_model(model_path, dtype=torch.float32), lora)
        params = dict(whole.named_parameters())
        for b in blocks:
            yield b, {n: params[n].detach().float() for n in b.params}
        return
    initial_adapters = {}
    if lora is not None:
        allocated = adapters.add_lora(build_model_from_files(model_path), lora)
        initial_adapters = {n: p.detach().clone() for n, p in allocated.named_parameters() if adapters.is_adapter(n)}
        del allocated
    for b in blocks:
        yield b, {n: initial_adapters[n] if n in initial_adapters else where[names[n]].read(names[n]).float()
                  for n in b.params}


@dataclass
class Serving:
    """The gRPC server with its coordinator service and the standard health service. It runs before the
    coordinator exists: until `ready`, health says NOT_SERVING and every coordinator call UNAVAILABLE."""

    server: grpc.Server
    port: int
    service: CoordinatorService
    health: health.HealthServicer

    def ready(self, coordinator: Coordinator) -> None:
        self.service.attach(coordinator)
        for name in HEALTH_NAMES:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float) -> None:
        self.health.enter_graceful_shutdown()  # NOT_SERVING to whoever asks during the grace period
        self.server.stop(grace).wait()


HEALTH_NAMES = ("", SERVICE)  # the server as a whole, and the coordinator service


def serve(config: CoordinatorConfig, coordinator: Coordinator | None = None) -> Serving:
    """Start the gRPC server (TLS unless --insecure), with health checking and server reflection. It
    is ready when `coordinator` is given, else once `Serving.ready` is called."""
    auth = Authenticator(
        tokens=load_tokens(config.auth_tokens) if config.auth_tokens else None,
        bind_certificate_names=config.tls_client_ca is not None,
        path=config.auth_tokens,
    )
    admin = None  # operators (`fedblock admin`): nobody without --admin-tokens
    if config.admin_tokens:
        admin = Authenticator(tokens=load_tokens(config.admin_tokens, "--admin-tokens", "operator"),
                              path=config.admin_tokens, flag="--admin-tokens", who="operator")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=GRPC_THREADS, thread_name_prefix="grpc"),
                         options=server_options(message_limit(config.chunk_size)))
    service = CoordinatorService(None, auth, admin)
    add_to_server(service, server)
    checker = health.HealthServicer()
    for name in HEALTH_NAMES:
        checker.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if config.tls_cert is not None:
        port = server.add_secure_port(config.listen, server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca))
    else:
        log.warning("serving plaintext gRPC (--insecure): anyone on the network can read and alter the traffic")
        port = server.add_insecure_port(config.listen)
    if auth.tokens is None and not auth.bind_certificate_names:
        log.warning("no --auth-tokens and no --tls-client-ca: any worker that can connect may join under any name")
    if port == 0:
        raise ConfigError(f"--listen: cannot bind {config.listen}")
    server.start()
    serving = Serving(server, port, service, checker)
    if coordinator is not None:
        serving.ready(coordinator)
    return serving


@dataclass
class Running:
    coordinator: Coordinator
    serving: Serving
    metrics_server: object | None = None

    @property
    def server(self) -> grpc.Server:
        return self.serving.server

    @property
    def port(self) -> int:
        return self.serving.port

    def close(self, grace: float = 1.0) -> None:
        self.serving.stop(grace)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()


def tune_malloc() -> None:
    """glibc: few malloc arenas and a fixed mmap threshold. Many gRPC threads each receiving 1 MiB
    chunks otherwise leave megabytes in per-thread arenas, so memory grew with the number of concurrent
    uploads (+13 % from 8 to 32 updates of a SmolLM2 block; +5 % with this). A no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: chunk-sized buffers are mapped and given back
    except (OSError, AttributeError):
        pass


def start(config: CoordinatorConfig) -> Running:
    """Serve gRPC and /metrics first (health checks say NOT_SERVING while loading), then load the model
    and the state, then accept workers."""
    tune_malloc()
    serving = serve(config)
    metrics, metrics_server = CoordinatorMetrics(), None
    try:
        if config.metrics_port:  # scraped while it loads, too (run state "waiting"): it is up
            metrics_server, _ = serve_metrics(metrics.registry, config.metrics_port)
        coordinator = build(config, metrics)
    except BaseException:
        serving.stop(0)
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        raise
    serving.ready(coordinator)
    log.info(
        "coordinator on port %d: %s, %d rounds, blocks %d (%d trainable), model version %d",
        serving.port, config.algorithm, config.rounds, len(coordinator.block_order), len(coordinator.trainable),
        coordinator.global_model.version,
    )
    return Running(coordinator, serving, metrics_server)


OPERATOR_SIGNALS = {signal.SIGHUP: "reload_tokens", signal.SIGUSR1: "drain"}


def operator_signal(service: CoordinatorService, signum: int) -> threading.Thread:
    """SIGHUP: reload the tokens files; SIGUSR1: drain. The command runs on a thread of its own: a
    handler runs on the main thread between two bytecodes of whatever it was doing, perhaps half-way
    through a change under the coordinator's (re-entrant) lock."""
    action, name = OPERATOR_SIGNALS[signum], signal.Signals(signum).name

    def act() -> None:
        try:
            service.operator(action, by=f"signal {name}")  # it logs what it did
        except (LookupError, ValueError) as e:
            log.error("signal %s: %s refused: %s", name, action, e)

    thread = threading.Thread(target=act, name=f"signal-{name}", daemon=True)
    thread.start()
    return thread


def run(config: CoordinatorConfig) -> dict:
    """`fedblock coordinator`: serve until the run is complete; SIGINT/SIGTERM stop it cleanly,
    SIGHUP reloads the tokens files, SIGUSR1 drains (`operator_signal`)."""
    main = threading.current_thread() is threading.main_thread()
    if main:  # health checks already answer while it loads: an operator may signal it then
        for sig in OPERATOR_SIGNALS:
            signal.signal(sig, lambda signum, _: log.warning("signal %s while loading the model and state: ignored "
                                                             "(send it again)", signal.Signals(signum).name))
    running = start(config)
    if main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: running.coordinator.stop())
        for sig in OPERATOR_SIGNALS:
            signal.signal(sig, lambda signum, _: operator_signal(running.serving.service, signum))
    try:
        summary = running.coordinator.run()
        if not running.coordinator.wait_workers_told(config.end_grace):
            missing = [w.name for w in running.coordinator.registry.all() if not w.told_end]
            if missing:
                log.warning("workers %s did not hear that the run ended (gone?)", ", ".join(missing))
        if config.linger:
            log.info("run over; serving status and metrics for %.0f s more", config.linger)
            running.coordinator.wait_stopped(config.linger)
    finally:
        running.close(grace=2.0)
    return summary
