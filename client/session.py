"""The worker's side of the gRPC protocol: protobuf in, typed messages out, nothing else.

Uploads resume: after a transient failure the session asks UploadStatus which chunks the coordinator
holds and streams only the others. Downloads verify every block's hash before it is decoded. Wire
bytes (serialized message + 5-byte gRPC frame header) are counted as they cross.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import grpc

from ..common import wire
from ..common.codecs import CodecPipeline
from ..common.messages import (
    PROTOCOL_VERSION,
    CatchUp,
    Event,
    LogEntry,
    Manifest,
    ModelFile,
    RunInfo,
    TaskTimings,
    event_from_pb,
)
from ..common.pb import coordinator_pb2 as pb
from ..common.pb import coordinator_pb2_grpc as pb_grpc
from ..common.ratelimit import TokenBucket
from ..common.rpc import open_channel

log = logging.getLogger("fedblock.worker")

TRANSIENT = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # gRPC's own: a server at its concurrent-call limit
    grpc.StatusCode.INTERNAL,
}



def transient(e: grpc.RpcError) -> bool:
    """Whether the same call may succeed later. A message over gRPC's size limit never will: it is
    RESOURCE_EXHAUSTED too, like a server at its call limit, but says so in its details."""
    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (e.details() or ""):
        return False
    return e.code() in TRANSIENT


def reconnects(e: grpc.RpcError) -> bool:
    """Whether joining again may help: the link broke, the coordinator lost our session, or it failed
    in a way it did not foresee (UNKNOWN: a restart or a fixed coordinator may not fail again)."""
    return transient(e) or e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNKNOWN)


Counter = Callable[[str, int], None]


UPLOAD_METHOD = "/fedblock.v1.Coordinator/Upload"
DOWNLOAD_METHOD = "/fedblock.v1.Coordinator/Download"


def _size(message) -> int:
    return message.ByteSize() + wire.GRPC_FRAME_OVERHEAD


def _parse_download(raw: bytes):
    return wire.parse_chunk_message(raw, wire.DOWNLOAD_CHUNK_FIELD) or pb.DownloadMessage.FromString(raw)


def backoff_delays(base: float = 0.2, cap: float = 10.0) -> Iterator[float]:
    """Exponential back-off with full jitter: 0..base, 0..2·base, ... capped at `cap`."""
    delay = base
    while True:
        yield random.uniform(0, delay)
        delay = min(cap, delay * 2)


@dataclass(frozen=True)
class DownloadedBlock:
    block: str
    version: int
    tensors: dict


class Sync(NamedTuple):
    """A download: the model version, the block versions of our view (0: the base model's), the blocks
    we hold already (block -> canonical SHA-256 of the value we claimed), and the changed blocks,
    decoded as they stream in."""

    version: int
    block_versions: dict[str, int]
    confirmed: dict[str, bytes]
    blocks: Iterator[DownloadedBlock]
    view_round: int = 0  # the task round whose view this is (0: the global model's)


class Session:
    """One worker's connection to the coordinator."""

    def __init__(self, address: str, name: str, sent: Counter | None = None, received: Counter | None = None,
                 upload_rate: float = 0, download_rate: float = 0, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None, server_name: str | None = None):
        """`credentials` None means plaintext (the caller asked for --insecure)."""
        self.address = address
        self.name = name
        self.token = token
        self.channel = open_channel(address, credentials, server_name)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        # The bulk paths serialize and parse chunk messages themselves (wire.py): the same bytes as
        # protobuf, without its copies. Requests are pre-serialized bytes; responses may be RawChunks.
        self._upload = self.channel.stream_unary(
            UPLOAD_METHOD, request_serializer=None, response_deserializer=pb.UploadReply.FromString
        )
        self._download = self.channel.unary_stream(
            DOWNLOAD_METHOD, request_serializer=pb.DownloadRequest.SerializeToString, response_deserializer=_parse_download
        )
        self._sent = sent or (lambda kind, n: None)
        self._received = received or (lambda kind, n: None)
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._upload_bucket = TokenBucket(upload_rate)  # --max-upload-rate: paces the chunks we send
        self._download_bucket = TokenBucket(download_rate)  # --max-download-rate: paces how fast we read
        self._events_call = None
        self.info: RunInfo | None = None

    # ---- control ------------------------------------------------------------------------------

    def join(self, num_examples: int, device: str, timeout: float, check_only: bool = False) -> RunInfo:
        """Join the run, retrying with back-off while the coordinator is unreachable (up to `timeout` s).
        `check_only`: be authenticated and learn the run, without joining it (no session)."""
        from importlib.metadata import version

        from ..common.provenance import hardware

        request = pb.JoinRequest(name=self.name, version=version("fedblock"), device=device, num_examples=num_examples,
                                 protocol=PROTOCOL_VERSION, hardware=pb.Hardware(**hardware()), check_only=check_only)
        deadline = time.monotonic() + timeout
        delays = backoff_delays()
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        while True:
            try:
                reply = self.stub.Join(request, metadata=metadata, timeout=30)
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() >= deadline:
                    raise
                time.sleep(min(next(delays), max(0.0, deadline - time.monotonic())))
        self._sent("control", _size(request))
        self._received("control", _size(reply))
        if reply.protocol != PROTOCOL_VERSION:
            raise ConnectionRefusedError(f"the coordinator at {self.address} speaks fedblock protocol {reply.protocol}, "
                                         f"this worker {PROTOCOL_VERSION}: install the same fedblock version on both sides")
        self.info = RunInfo.from_pb(reply)
        self._metadata = (("fedblock-worker", self.name), ("fedblock-session", self.info.session))
        return self.info

    def events(self) -> Iterator[Event]:
        """The coordinator's event stream for this worker (blocks between events)."""
        self._events_call = self.stub.Events(pb.EventsRequest(), metadata=self._metadata)
        for message in self._events_call:
            self._received("control", _size(message))
            yield event_from_pb(message)

    def cancel_events(self) -> None:
        if self._events_call is not None:
            self._events_call.cancel()

    def heartbeat(self, held_version: int, steps: int) -> int:
        request = pb.HeartbeatRequest(held_version=max(held_version, 0), local_steps_done=steps)
        reply = self.stub.Heartbeat(request, metadata=self._metadata, timeout=30)
        self._sent("control", _size(request))
        self._received("control", _size(reply))
        return reply.model_version

    def leave(self, reason: str = "done") -> None:
        try:
            self.stub.Leave(pb.LeaveRequest(reason=reason), metadata=self._metadata, timeout=5)
        except grpc.RpcError:
            pass  # leaving is a courtesy; the heartbeat timeout covers a coordinator that is gone

    def close(self) -> None:
        self.cancel_events()
        self.channel.close()

    # ---- transfers -----------------------------------------------------------------------------

    def fetch_model_files(self, dest: Path, have: Path | None = None) -> None:
        """Fetch config and tokenizer files into `dest`, checking sizes and hashes against the join reply.
        Files in `have` (a local copy of the model) whose hash matches are copied from there instead."""
        assert self.info is not None
        self.fetch_files(self.info.model_files, dest, have)

    def fetch_files(self, files: Sequence[ModelFile], dest: Path, have: Path | None = None) -> None:
        """Fetch files the join reply lists (model or codec files) into `dest`, checking their sizes and
        hashes; those in `have` whose hash matches are copied from there instead."""
        dest.mkdir(parents=True, exist_ok=True)
        wanted = []
        for f in files:
            local = have / f.name if have is not None and "/" not in f.name else None
            if local is not None and local.is_file() and wire.sha256(local.read_bytes()) == f.sha256:
                (dest / f.name).write_bytes(local.read_bytes())
            else:
                wanted.append(f)
        if not wanted:
            return
        parts: dict[str, bytearray] = {}
        request = pb.ModelFilesRequest(names=[f.name for f in wanted])
        for message in self.stub.FetchModelFiles(request, metadata=self._metadata):
            self._received("control", _size(message))
            buf = parts.setdefault(message.name, bytearray())
            if message.offset != len(buf):
                raise wire.IntegrityError(f"model file {message.name}: chunk at {message.offset}, expected {len(buf)}")
            buf += message.data
        for f in wanted:
            data = parts.get(f.name)
            if data is None or len(data) != f.size or wire.sha256(data) != f.sha256:
                raise wire.IntegrityError(f"model file {f.name} arrived incomplete or corrupted")
            if "/" in f.name or f.name.startswith("."):
                raise wire.IntegrityError(f"refusing model file name {f.name!r}")
            (dest / f.name).write_bytes(data)

    def upload(self, manifest: Manifest, blob: bytes, max_attempts: int = 8, resume: bool = False) -> str:
        """Send one block delta; resumes after transient failures. Returns "accepted" or "late".
        `resume`: a second try (after a re-join): ask first what the coordinator already has. When it
        has the block already (or the round closed), nothing is sent at all."""
        delays = backoff_delays()
        for attempt in range(max_attempts):
            skip: frozenset[int] = frozenset()
            if resume or attempt:
                reply = self._upload_status(manifest)
                if reply is not None and reply.delivered:
                    return "accepted"
                if reply is not None and reply.closed:
                    return "late"
                if reply is not None:  # complete: only the header goes, and its answer says what became of it
                    skip = frozenset(range(manifest.num_chunks)) if reply.complete else frozenset(reply.held_chunks)
            try:
                reply = self._upload(self._upload_messages(manifest, blob, skip), metadata=self._metadata)
                return reply.status
            except grpc.RpcError as e:
                if not transient(e) or attempt == max_attempts - 1:
                    raise
                log.warning("upload of %s round %d interrupted (%s); resuming", manifest.block, manifest.round, e.code().name)
                time.sleep(next(delays))
        raise AssertionError("unreachable")

    def report(self, round: int, base_version: int, numbers, tokens: int, loss: float,
               timings: TaskTimings | None = None) -> str:
        """Send a record update (one message); "accepted" or "late". Retries transient failures."""
        request = pb.ReportRequest(round=round, base_version=base_version, numbers=list(numbers),
                                   num_tokens=tokens, train_loss=loss, timings=timings.to_pb() if timings else None)
        delays = backoff_delays()
        for attempt in range(8):
            try:
                reply = self.stub.Report(request, metadata=self._metadata, timeout=60)
                break
            except grpc.RpcError as e:
                if not transient(e) or attempt == 7:
                    raise
                time.sleep(next(delays))
        self._sent("update", _size(request))
        self._received("control", _size(reply))
        return reply.status

    def log(self, held_version: int, after_download: bool = False) -> CatchUp:
        """What our copy at `held_version` needs to catch up (the log, or: download the blocks).
        `after_download`: the copy is the blocks just downloaded (the log from them is what we need)."""
        request = pb.LogRequest(held_version=max(held_version, 0), after_download=after_download)
        reply = self.stub.Log(request, metadata=self._metadata, timeout=60)
        self._sent("control", _size(request))
        self._received("model", _size(reply))
        return CatchUp(reply.model_version, tuple(LogEntry.from_pb(e) for e in reply.entries), reply.download)

    def abandon(self, round: int, reason: str) -> None:
        """Tell the coordinator not to wait for our part in `round`."""
        self.stub.Abandon(pb.AbandonRequest(round=round, reason=reason), metadata=self._metadata, timeout=30)

    def _upload_messages(self, manifest: Manifest, blob: bytes, skip: frozenset[int]) -> Iterator[bytes]:
        """Serialized UploadMessages: the header, then the chunks not in `skip`."""
        header = pb.UploadMessage(header=pb.UploadHeader(manifest=manifest.to_pb())).SerializeToString()
        self._sent("update", len(header) + wire.GRPC_FRAME_OVERHEAD)
        yield header
        for index, view in wire.iter_chunks(blob, manifest.chunk_size, skip):
            message = wire.encode_chunk_message(wire.UPLOAD_CHUNK_FIELD, index, view)
            size = len(message) + wire.GRPC_FRAME_OVERHEAD
            self._upload_bucket.consume(size)
            self._sent("update", size)
            yield message

    def _upload_status(self, manifest: Manifest) -> pb.UploadStatusReply | None:
        """What the coordinator holds of this upload; None when it cannot say (send everything)."""
        request = pb.UploadStatusRequest(round=manifest.round, block=manifest.block, blob_sha256=manifest.blob_sha256)
        try:
            reply = self.stub.UploadStatus(request, metadata=self._metadata, timeout=30)
        except grpc.RpcError:
            return None
        self._sent("control", _size(request))
        self._received("control", _size(reply))
        return reply

    def download(self, held: Mapping[str, int], holds: Mapping[str, bytes] | None = None, task_round: int = 0,
                 base_held=()) -> Sync:
        """Delta sync of the blocks whose version differs from `held`: but for those we hold (`holds`,
        confirmed by the coordinator), and with `task_round` of the view the algorithm gives our task
        of that round (base-model blocks we keep, `base_held`, are not sent)."""
        assert self.info is not None
        specs = {b.name: b for b in self.info.blocks}
        request = pb.DownloadRequest(held_versions=dict(held), holds=dict(holds or {}), task_round=task_round,
                                     base_held=sorted(base_held))
        stream = self._download(request, metadata=self._metadata)
        first = next(stream)
        if isinstance(first, wire.RawChunk) or first.WhichOneof("kind") != "header":
            raise wire.IntegrityError("download did not start with its header")
        self._received("control", _size(first))
        header = first.header

        def blocks() -> Iterator[DownloadedBlock]:
            assembly: wire.Assembly | None = None
            received = 0
            try:
                for message in stream:
                    raw = isinstance(message, wire.RawChunk)
                    size = message.size + wire.GRPC_FRAME_OVERHEAD if raw else _size(message)
                    self._download_bucket.consume(size)
                    self._received("model", size)
                    if raw and assembly is not None:
                        assembly.add(message.index, message.data)
                        if assembly.complete:
                            m = assembly.manifest
                            tensors = CodecPipeline(m.codec).decode(assembly.finish(), specs[m.block].tensors)
                            assembly.close()
                            assembly = None
                            received += 1
                            yield DownloadedBlock(m.block, m.base_version, tensors)
                        continue
                    kind = "chunk" if raw else message.WhichOneof("kind")
                    if kind != "manifest":
                        raise wire.IntegrityError(f"unexpected {kind} in a download")
                    manifest = Manifest.from_pb(message.manifest)
                    spec = specs.get(manifest.block)
                    if spec is None:
                        raise wire.IntegrityError(f"download of unknown block {manifest.block!r}")
                    wire.check_specs(manifest.tensors, spec.tensors)
                    assembly = wire.Assembly(manifest)
                if assembly is not None or received != header.num_blocks:  # a stream that ended early
                    raise wire.IntegrityError(f"download ended after {received} of {header.num_blocks} blocks"
                                              + (" in the middle of one" if assembly is not None else ""))
            finally:
                if assembly is not None:  # a download that broke off: let its hashing thread go
                    assembly.close()

        confirmed = {b: bytes(holds[b]) for b in header.confirmed if holds and b in holds}
        return Sync(header.model_version, dict(header.block_versions), confirmed, blocks(), header.view_round)
