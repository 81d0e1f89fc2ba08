"""Typed messages that flow through the program, and their protobuf form at the edge.

Inside fedblock everything is one of these frozen dataclasses; only the gRPC layers (client/session.py
and server/service.py) call `to_pb` / `from_pb`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .adapters import LoraSettings
from .pb import coordinator_pb2 as pb

# Version 2 added algorithm settings, seeds, records (Report) and the log (Log). A peer of another
# version is refused at Join with a message that says which versions meet.
PROTOCOL_VERSION = 4  # 4: task timings, hardware, check-only joins and Admin; 3: RunInfo.lora and codec_files


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        return cls(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))

    def to_pb(self) -> pb.TensorSpec:
        return pb.TensorSpec(name=self.name, dtype=self.dtype, shape=list(self.shape))

    @classmethod
    def from_pb(cls, m: pb.TensorSpec) -> TensorSpec:
        return cls(m.name, m.dtype, tuple(int(d) for d in m.shape))


@dataclass(frozen=True)
class BlockSpec:
    name: str
    tensors: tuple[TensorSpec, ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)

    @classmethod
    def of(cls, name: str, params: Mapping[str, torch.Tensor], names) -> BlockSpec:
        """The layout of block `name` (its parameters `names`), as its deltas travel: float32."""
        return cls(name, tuple(TensorSpec(n, "float32", tuple(params[n].shape)) for n in names))

    def to_pb(self) -> pb.BlockSpec:
        return pb.BlockSpec(name=self.name, tensors=[t.to_pb() for t in self.tensors])

    @classmethod
    def from_pb(cls, m: pb.BlockSpec) -> BlockSpec:
        return cls(m.name, tuple(TensorSpec.from_pb(t) for t in m.tensors))


@dataclass(frozen=True)
class TaskTimings:
    """What one task cost its worker: `compute_s` training, after `idle_s` waiting on communication, from
    `started_unix` on the worker's clock. The coordinator maps that clock onto its own with `sent_unix`,
    the worker's clock when the message went out (stamped by `to_pb`)."""

    compute_s: float
    idle_s: float
    started_unix: float
    sent_unix: float = 0.0

    def to_pb(self) -> pb.TaskTimings:
        return pb.TaskTimings(compute_s=self.compute_s, idle_s=self.idle_s, started_unix=self.started_unix,
                              sent_unix=time.time())

    @classmethod
    def from_pb(cls, m: pb.TaskTimings) -> TaskTimings | None:
        values = (m.compute_s, m.idle_s, m.started_unix, m.sent_unix)
        if not all(math.isfinite(v) for v in values) or min(m.compute_s, m.idle_s) < 0 or m.sent_unix <= 0:
            return None  # absent, or nothing a timeline can use
        return cls(*values)


@dataclass(frozen=True)
class Manifest:
    """Describes one tensor transfer (one block), sent before its chunks."""

    round: int
    block: str
    base_version: int
    tensors: tuple[TensorSpec, ...]  # the block's tensors as the receiver will get them back
    codec: str
    raw_bytes: int
    wire_bytes: int
    blob_sha256: bytes
    chunk_size: int
    num_chunks: int
    num_tokens: int = 0
    train_loss: float = math.nan
    timings: TaskTimings | None = None  # uploads

    def to_pb(self) -> pb.Manifest:
        return pb.Manifest(
            round=self.round,
            block=self.block,
            base_version=self.base_version,
            tensors=[t.to_pb() for t in self.tensors],
            codec=self.codec,
            raw_bytes=self.raw_bytes,
            wire_bytes=self.wire_bytes,
            blob_sha256=self.blob_sha256,
            chunk_size=self.chunk_size,
            num_chunks=self.num_chunks,
            num_tokens=self.num_tokens,
            train_loss=self.train_loss,
            timings=self.timings.to_pb() if self.timings else None,
        )

    @classmethod
    def from_pb(cls, m: pb.Manifest) -> Manifest:
        return cls(
            round=m.round,
            block=m.block,
            base_version=m.base_version,
            tensors=tuple(TensorSpec.from_pb(t) for t in m.tensors),
            codec=m.codec,
            raw_bytes=m.raw_bytes,
            wire_bytes=m.wire_bytes,
            blob_sha256=bytes(m.blob_sha256),
            chunk_size=m.chunk_size,
            num_chunks=m.num_chunks,
            num_tokens=m.num_tokens,
            train_loss=m.train_loss,
            timings=TaskTimings.from_pb(m.timings) if m.HasField("timings") else None,
        )


@dataclass(frozen=True)
class Assignment:
    """Round `round`: train `blocks` for `local_steps` steps at `learning_rate` on model `base_version`,
    with the round's `seeds` (zeroth-order directions; empty for block methods)."""

    round: int
    blocks: tuple[str, ...]
    local_steps: int
    learning_rate: float
    base_version: int
    seeds: tuple[int, ...] = ()

    def to_pb(self) -> pb.Event:
        return pb.Event(
            assignment=pb.Assignment(
                round=self.round,
                blocks=list(self.blocks),
                local_steps=self.local_steps,
                learning_rate=self.learning_rate,
                base_version=self.base_version,
                seeds=list(self.seeds),
            )
        )


@dataclass(frozen=True)
class ModelNotice:
    """The global model reached `version` (rounds completed)."""

    version: int

    def to_pb(self) -> pb.Event:
        return pb.Event(model=pb.ModelNotice(version=self.version))


@dataclass(frozen=True)
class LogEntry:
    """One closed round of a zeroth-order run: its learning rate, seeds and aggregated scalars."""

    round: int
    lr: float
    seeds: tuple[int, ...]
    scalars: tuple[float, ...]

    def to_pb(self) -> pb.LogEntry:
        return pb.LogEntry(round=self.round, learning_rate=self.lr, seeds=list(self.seeds), scalars=list(self.scalars))

    @classmethod
    def from_pb(cls, m: pb.LogEntry) -> LogEntry:
        return cls(m.round, m.learning_rate, tuple(m.seeds), tuple(m.scalars))

    def to_record(self) -> list:
        return [self.round, self.lr, list(self.seeds), list(self.scalars)]

    @classmethod
    def from_record(cls, rec) -> LogEntry:
        round, lr, seeds, scalars = rec
        return cls(int(round), float(lr), tuple(int(s) for s in seeds), tuple(float(x) for x in scalars))


@dataclass(frozen=True)
class Patch:
    """For the compute thread: the model at `version`. `blocks` holds the global blocks that changed since
    the request (at `block_versions`); `entries` the log rounds to replay on them (zeroth-order).
    `confirmed`: blocks not sent because the worker holds their global value (block -> its canonical
    SHA-256, which the worker checks against its copy before it counts the block as at its version)."""

    version: int
    block_versions: dict[str, int]
    blocks: dict[str, dict[str, torch.Tensor]]
    entries: tuple[LogEntry, ...] = ()
    confirmed: Mapping[str, bytes] = field(default_factory=dict)
    view_round: int = 0  # the task round whose view this is (0: the global model's; see Algorithm.view)


@dataclass(frozen=True)
class Update:
    """A finished local round on top of model version `base_version`: one delta per trained block, or
    (`numbers`) a small record of numbers such as zeroth-order scalars."""

    round: int
    base_version: int
    deltas: dict[str, dict[str, torch.Tensor]]
    tokens: int
    loss: float
    numbers: tuple[float, ...] | None = None
    timings: TaskTimings | None = None  # set by the compute loop


@dataclass(frozen=True)
class CatchUp:
    """What a worker at some version needs: the log entries up to `version`, or (`download`) the blocks."""

    version: int
    entries: tuple[LogEntry, ...] = ()
    download: bool = False


# Why a coordinator ends one worker's part before the run ends: an operator's decision, which a
# restarted worker process would undo (it exits 0, so that restart policies leave it be).
DROPPED, REVOKED = "dropped by operator", "token revoked"


@dataclass(frozen=True)
class RunEnd:
    reason: str
    final_version: int

    def to_pb(self) -> pb.Event:
        return pb.Event(end=pb.RunEnd(reason=self.reason, final_version=self.final_version))


Event = Assignment | ModelNotice | RunEnd


def event_from_pb(m: pb.Event) -> Event:
    kind = m.WhichOneof("kind")
    if kind == "assignment":
        a = m.assignment
        return Assignment(a.round, tuple(a.blocks), a.local_steps, a.learning_rate, a.base_version, tuple(a.seeds))
    if kind == "model":
        return ModelNotice(m.model.version)
    if kind == "end":
        return RunEnd(m.end.reason, m.end.final_version)
    raise ValueError(f"unknown event kind {kind!r}")


@dataclass(frozen=True)
class ModelFile:
    name: str
    size: int
    sha256: bytes


@dataclass(frozen=True)
class RunInfo:
    """What a worker learns at Join: the run it takes part in."""

    session: str
    run_id: str
    algorithm: str
    pipeline_depth: int
    heartbeat_interval_s: float
    codec: str
    chunk_size: int
    max_message_bytes: int
    blocks: tuple[BlockSpec, ...]
    layers_per_block: int
    model_version: int
    model_files: tuple[ModelFile, ...]
    seed: int
    rounds: int
    algorithm_settings: Mapping[str, str] = field(default_factory=dict)
    initial_block_sha256: tuple[bytes, ...] = ()  # per block: canonical float32 SHA-256 of the initial model
    protocol: int = PROTOCOL_VERSION
    lora: LoraSettings | None = None  # the run trains these adapters (--peft lora)
    codec_files: tuple[ModelFile, ...] = ()  # what the upload codec needs (the autoencoder's weights)

    def to_pb(self) -> pb.JoinReply:
        return pb.JoinReply(
            session=self.session,
            run_id=self.run_id,
            algorithm=self.algorithm,
            pipeline_depth=self.pipeline_depth,
            heartbeat_interval_s=self.heartbeat_interval_s,
            codec=self.codec,
            chunk_size=self.chunk_size,
            max_message_bytes=self.max_message_bytes,
            blocks=[b.to_pb() for b in self.blocks],
            layers_per_block=self.layers_per_block,
            model_version=self.model_version,
            model_files=[pb.ModelFile(name=f.name, size=f.size, sha256=f.sha256) for f in self.model_files],
            seed=self.seed,
            rounds=self.rounds,
            algorithm_settings=dict(self.algorithm_settings),
            initial_block_sha256=list(self.initial_block_sha256),
            protocol=self.protocol,
            lora=None if self.lora is None else pb.LoraAdapters(
                r=self.lora.r, alpha=self.lora.alpha, dropout=self.lora.dropout,
                targets=list(self.lora.targets), seed=self.lora.seed),
            codec_files=[pb.ModelFile(name=f.name, size=f.size, sha256=f.sha256) for f in self.codec_files],
        )

    @classmethod
    def from_pb(cls, m: pb.JoinReply) -> RunInfo:
        return cls(
            session=m.session,
            run_id=m.run_id,
            algorithm=m.algorithm,
            pipeline_depth=m.pipeline_depth,
            heartbeat_interval_s=m.heartbeat_interval_s,
            codec=m.codec,
            chunk_size=m.chunk_size,
            max_message_bytes=m.max_message_bytes,
            blocks=tuple(BlockSpec.from_pb(b) for b in m.blocks),
            layers_per_block=m.layers_per_block,
            model_version=m.model_version,
            model_files=tuple(ModelFile(f.name, f.size, bytes(f.sha256)) for f in m.model_files),
            seed=m.seed,
            rounds=m.rounds,
            algorithm_settings=dict(m.algorithm_settings),
            initial_block_sha256=tuple(bytes(h) for h in m.initial_block_sha256),
            protocol=m.protocol,
            lora=LoraSettings(m.lora.r, m.lora.alpha, m.lora.dropout, tuple(m.lora.targets), m.lora.seed)
            if m.HasField("lora") else None,
            codec_files=tuple(ModelFile(f.name, f.size, bytes(f.sha256)) for f in m.codec_files),
        )
