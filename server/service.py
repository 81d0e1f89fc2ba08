"""The gRPC face of the coordinator: protobuf in, protobuf out, nothing else.

Each handler reads the caller's identity from metadata, converts messages, calls one Coordinator
method and maps its exceptions to gRPC status codes. Wire bytes are counted here, where messages are
serialized: a message's size plus the 5-byte gRPC frame header.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator

import grpc

from ..common import wire
from ..common.config import valid_worker_name
from ..common.messages import PROTOCOL_VERSION, Manifest, TaskTimings
from ..common.pb import coordinator_pb2 as pb
from ..common.pb import coordinator_pb2_grpc as pb_grpc
from ..common.security import OPERATOR_KEY, Authenticator, presented_token
from .coordinator import Coordinator
from .registry import Ended, UnknownWorker
from .rounds import Refused
from .store import BlockFileMissing

log = logging.getLogger("fedblock.coordinator")

WORKER_KEY = "fedblock-worker"
SESSION_KEY = "fedblock-session"

_REJECT_CODES = {
    "hash_mismatch": grpc.StatusCode.DATA_LOSS,
    "bad_chunk": grpc.StatusCode.DATA_LOSS,
    "incomplete": grpc.StatusCode.ABORTED,
    "not_planned": grpc.StatusCode.ABORTED,  # workers retry ABORTED with back-off
    "in_progress": grpc.StatusCode.ABORTED,  # another stream of the same upload is being checked
    "failed": grpc.StatusCode.ABORTED,  # the coordinator failed on it unexpectedly: worth another try
    "superseded": grpc.StatusCode.FAILED_PRECONDITION,  # the same worker sent another blob of the block
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "not_assigned": grpc.StatusCode.FAILED_PRECONDITION,
    "wrong_block": grpc.StatusCode.FAILED_PRECONDITION,
    "stale_base": grpc.StatusCode.FAILED_PRECONDITION,
    "wrong_kind": grpc.StatusCode.FAILED_PRECONDITION,  # tensors to a records algorithm, or the reverse
}


SERVICE = "fedblock.v1.Coordinator"


def _size(message) -> int:
    return message.ByteSize() + wire.GRPC_FRAME_OVERHEAD


def _parse_upload(raw: bytes):
    return wire.parse_chunk_message(raw, wire.UPLOAD_CHUNK_FIELD) or pb.UploadMessage.FromString(raw)


def _serialize_download(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


UNDECODABLE = object()  # what a request that is not a valid message of its type becomes


def _tolerant(deserialize):
    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except Exception:  # protobuf's DecodeError and friends: answered INVALID_ARGUMENT below
            return UNDECODABLE

    return parse


def _refusing_undecodable(handler, service: CoordinatorService):
    """The same handler, but an undecodable request is answered INVALID_ARGUMENT (gRPC would say
    INTERNAL, as if the coordinator had failed), and any request UNAVAILABLE (which workers retry)
    while the coordinator is still loading (`service.c` is None)."""

    def check(request, context):
        if service.c is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator is loading its model and state; try again")
        if request is UNDECODABLE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request is not a valid protobuf message of its type")
        return request

    if handler.request_streaming:
        def behaviour(requests, context):
            return handler.stream_unary(((check(r, context) for r in requests)), context)

        return handler._replace(request_deserializer=_tolerant(handler.request_deserializer), stream_unary=behaviour)
    kind = "unary_stream" if handler.response_streaming else "unary_unary"
    inner = getattr(handler, kind)

    def unary(request, context):
        return inner(check(request, context), context)

    return handler._replace(request_deserializer=_tolerant(handler.request_deserializer), **{kind: unary})


def add_to_server(service: CoordinatorService, server: grpc.Server) -> None:
    """Register the service as protoc generated it, except that the bulk paths (Upload's requests,
    Download's responses) go through wire.py's chunk codec (the same bytes, without protobuf's copies)
    and that undecodable requests are refused as invalid arguments."""

    class Capture:  # stands in for the server to get the generated handler table
        def add_generic_rpc_handlers(self, _):
            pass

        def add_registered_method_handlers(self, _, handlers):
            self.handlers = dict(handlers)

    capture = Capture()
    pb_grpc.add_CoordinatorServicer_to_server(service, capture)
    handlers = capture.handlers
    handlers["Upload"] = grpc.stream_unary_rpc_method_handler(
        service.Upload, request_deserializer=_parse_upload, response_serializer=pb.UploadReply.SerializeToString
    )
    handlers["Download"] = grpc.unary_stream_rpc_method_handler(
        service.Download, request_deserializer=pb.DownloadRequest.FromString, response_serializer=_serialize_download
    )
    handlers = {name: _refusing_undecodable(h, service) for name, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _bounded(value, limit: int = 200):
    """A worker's free text, as the coordinator keeps it (summary.json): at most `limit` characters."""
    return value[:limit] if isinstance(value, str) else value


def _missing_block_file(context: grpc.ServicerContext, version: int, what: str):
    """UNAVAILABLE, which workers retry: by then a newer version (whose files exist) may be current."""
    log.warning("download of model version %d refused: %s", version, what)
    context.abort(grpc.StatusCode.UNAVAILABLE, f"model version {version}: {what}; download again")


def _identity(context: grpc.ServicerContext) -> tuple[str, str]:
    md = dict(context.invocation_metadata())
    return md.get(WORKER_KEY, ""), md.get(SESSION_KEY, "")


def _abort(context: grpc.ServicerContext, error: Exception):
    if isinstance(error, Ended):  # not UNAUTHENTICATED, which a worker answers by joining again
        context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
    if isinstance(error, UnknownWorker):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, str(error))
    if isinstance(error, Refused):
        context.abort(_REJECT_CODES.get(error.reason, grpc.StatusCode.INVALID_ARGUMENT), f"{error.reason}: {error}")
    raise error


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator | None, auth: Authenticator | None = None,
                 admin: Authenticator | None = None):
        """With `coordinator` None every call is answered UNAVAILABLE until `attach` (the server runs,
        and answers health checks, while the model and state load). `admin`: the operators' tokens
        (--admin-tokens); without it, Admin refuses every command."""
        self.c = coordinator
        self.auth = auth or Authenticator()
        self.admin = admin

    def attach(self, coordinator: Coordinator) -> None:
        self.c = coordinator

    def Join(self, request: pb.JoinRequest, context):
        self.c.count_received("control", _size(request))
        if not valid_worker_name(request.name):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a worker name is 1-64 letters, digits, '.', '_' or '-'")
        if request.protocol != PROTOCOL_VERSION:
            self.c.refused_join(request.name, f"protocol {request.protocol}")
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this worker speaks fedblock protocol {request.protocol} (fedblock {request.version or '?'}); "
                          f"the coordinator speaks protocol {PROTOCOL_VERSION}: install the same fedblock version on "
                          "both sides")
        refusal = self.auth.check(request.name, dict(context.invocation_metadata()), context)
        if refusal is not None:
            self.c.refused_join(request.name, refusal)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        if request.check_only:  # `fedblock worker --check`: authenticated as a Join, and nothing joined
            reply = self.c.describe(request.name).to_pb()
            self.c.count_sent("control", _size(reply))
            return reply
        hardware = {f.name: _bounded(getattr(request.hardware, f.name)) for f in request.hardware.DESCRIPTOR.fields}
        hardware["device"] = _bounded(request.device)
        hardware["fedblock"] = _bounded(request.version)
        token = presented_token(dict(context.invocation_metadata())) if self.auth.tokens is not None else ""
        reply = self.c.join(request.name, hardware, token=token).to_pb()
        self.c.count_sent("control", _size(reply))
        return reply

    def Events(self, request, context) -> Iterator[pb.Event]:
        name, session = _identity(context)
        try:
            events = self.c.events(name, session, alive=context.is_active)
            for event in events:
                message = event.to_pb()
                self.c.count_sent("control", _size(message))
                yield message
        except UnknownWorker as e:
            _abort(context, e)

    def Heartbeat(self, request: pb.HeartbeatRequest, context):
        name, session = _identity(context)
        self.c.count_received("control", _size(request))
        try:
            version = self.c.heartbeat(name, session, request.local_steps_done)
        except UnknownWorker as e:
            _abort(context, e)
        return pb.HeartbeatReply(model_version=version)

    def Upload(self, request_iterator: Iterator[pb.UploadMessage], context):
        name, session = _identity(context)
        first = next(request_iterator, None)
        if first is None or isinstance(first, wire.RawChunk) or first.WhichOneof("kind") != "header":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an upload must start with its header")
        self.c.count_received("update", _size(first))

        def chunks():
            for message in request_iterator:
                if isinstance(message, wire.RawChunk):
                    self.c.count_received("update", message.size + wire.GRPC_FRAME_OVERHEAD)
                    yield message.index, message.data
                elif message.WhichOneof("kind") == "chunk":  # protobuf's form of the same (e.g. with extra fields)
                    self.c.count_received("update", _size(message))
                    yield message.chunk.index, message.chunk.data
                else:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "only chunks may follow the upload header")

        try:
            status = self.c.upload(name, session, Manifest.from_pb(first.header.manifest), chunks())
        except (UnknownWorker, Refused) as e:
            _abort(context, e)
        return pb.UploadReply(status=status)

    def UploadStatus(self, request: pb.UploadStatusRequest, context):
        name, session = _identity(context)
        try:
            state = self.c.upload_status(name, session, request.round, request.block, bytes(request.blob_sha256))
        except UnknownWorker as e:
            _abort(context, e)
        return pb.UploadStatusReply(held_chunks=state.held, complete=state.complete, delivered=state.delivered,
                                    closed=state.closed)

    def Report(self, request: pb.ReportRequest, context):
        name, session = _identity(context)
        self.c.count_received("update", _size(request))
        try:
            timings = TaskTimings.from_pb(request.timings) if request.HasField("timings") else None
            status = self.c.report(name, session, request.round, request.base_version, tuple(request.numbers),
                                   request.num_tokens, request.train_loss, timings)
        except (UnknownWorker, Refused) as e:
            _abort(context, e)
        return pb.UploadReply(status=status)

    def Log(self, request: pb.LogRequest, context):
        name, session = _identity(context)
        self.c.count_received("control", _size(request))
        try:
            catch_up = self.c.catch_up(name, session, request.held_version, request.after_download)
        except UnknownWorker as e:
            _abort(context, e)
        reply = pb.LogReply(model_version=catch_up.version, entries=[e.to_pb() for e in catch_up.entries],
                            download=catch_up.download)
        self.c.count_sent("model", _size(reply))
        return reply

    def Abandon(self, request: pb.AbandonRequest, context):
        name, session = _identity(context)
        try:
            self.c.abandon(name, session, request.round, request.reason)
        except UnknownWorker as e:
            _abort(context, e)
        return pb.AbandonReply()

    def Download(self, request: pb.DownloadRequest, context) -> Iterator[pb.DownloadMessage]:
        """Streams version g's changed blocks. Their files are pinned before the header goes, so rounds
        that close (and prune) during a long download do not take them away; the pin is released when
        the stream ends, fails or is cancelled. A block file that is gone anyway is answered
        UNAVAILABLE (workers download again), not UNKNOWN."""
        name, session = _identity(context)
        started = self.c.wall_seconds()
        try:
            sync = self.c.download(name, session, dict(request.held_versions), dict(request.holds), request.task_round,
                                   request.base_held)
        except UnknownWorker as e:
            _abort(context, e)
        g = sync.g
        try:
            pin = self.c.store.pin({b: sync.versions[b] for b in sync.send})
        except BlockFileMissing as e:  # e.g. pruned between the round's checkpoint and its announcement
            _missing_block_file(context, g.version, str(e))
        if not context.add_callback(pin.release):  # a cancelled stream may never resume this generator
            pin.release()
            return
        try:
            header = pb.DownloadMessage(
                header=pb.DownloadHeader(model_version=g.files_at, num_blocks=len(sync.send),
                                         block_versions=sync.versions, confirmed=sorted(sync.confirmed),
                                         view_round=sync.view_round)
            )
            self.c.count_sent("control", _size(header))
            yield header
            for block in sync.send:
                try:
                    manifest, path = self.c.download_manifest(g, block, sync.versions[block])
                    f = open(path, "rb")
                except (FileNotFoundError, BlockFileMissing) as e:  # pinned, so removed by someone else
                    if not context.is_active():
                        return
                    _missing_block_file(context, g.version, f"block file of {block}@{sync.versions[block]} "
                                                            f"is not on disk ({e})")
                message = pb.DownloadMessage(manifest=manifest.to_pb())
                self.c.count_sent("model", _size(message))
                with f:
                    yield message
                    for index in range(manifest.num_chunks):
                        data = os.pread(f.fileno(), manifest.chunk_size, index * manifest.chunk_size)
                        message = wire.encode_chunk_message(wire.DOWNLOAD_CHUNK_FIELD, index, data)
                        self.c.count_sent("model", len(message) + wire.GRPC_FRAME_OVERHEAD)
                        yield message
                        if not context.is_active():
                            return
            self.c.downloaded(name, started, len(sync.send))
        finally:
            pin.release()

    def FetchModelFiles(self, request, context) -> Iterator[pb.FileChunk]:
        name, session = _identity(context)
        # A caller without a session that authenticates as a Join would (a pre-flight check) may have them.
        if session or not valid_worker_name(name) or self.auth.check(name, dict(context.invocation_metadata()), context):
            try:
                self.c.authenticate(name, session)
            except UnknownWorker as e:
                _abort(context, e)
        step = self.c.config.chunk_size
        wanted = set(request.names)
        for path in [*self.c.store.model_files(), *self.c.store.codec_files()]:
            if wanted and path.name not in wanted:
                continue
            data = path.read_bytes()
            for offset in range(0, max(len(data), 1), step):
                message = pb.FileChunk(name=path.name, offset=offset, data=data[offset : offset + step])
                self.c.count_sent("control", _size(message))
                yield message

    def Leave(self, request, context):
        name, session = _identity(context)
        try:
            self.c.leave(name, session)
        except UnknownWorker as e:
            _abort(context, e)
        return pb.LeaveReply()

    def Status(self, request, context):
        s = self.c.status()
        return pb.StatusReply(
            run_id=s["run_id"],
            algorithm=s["algorithm"],
            round=s["round"],
            rounds_completed=s["rounds_completed"],
            rounds_total=s["rounds_total"],
            workers=[
                pb.WorkerStatus(
                    name=w["name"],
                    connected=w["connected"],
                    last_seen_s=w["last_seen_s"] if math.isfinite(w["last_seen_s"]) else -1.0,
                    updates_accepted=w["updates_accepted"],
                    current_round=w["current_round"],
                    local_steps=w["local_steps"],
                    device=w["device"],
                )
                for w in s["workers"]
            ],
            bytes_received=s["bytes_received"],
            bytes_sent=s["bytes_sent"],
            last_eval_loss=s["last_eval_loss"],
            last_eval_round=s["last_eval_round"],
            state=s["state"],
        )

    # ---- operator controls -----------------------------------------------------------------------

    def Admin(self, request: pb.AdminRequest, context):
        """`fedblock admin`: an operator named in the metadata (`fedblock-operator`) with its token from
        --admin-tokens; each command is one Coordinator method (see `operator`)."""
        if self.admin is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "this coordinator takes no operator commands (start it with --admin-tokens)")
        metadata = dict(context.invocation_metadata())
        operator = metadata.get(OPERATOR_KEY, "")
        refusal = self.admin.check(operator, metadata, context)
        if refusal is not None:
            log.warning("refused an operator command as %r: %s", operator, refusal)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        action = request.WhichOneof("action")
        if action in ("reload_tokens", "drain") and not getattr(request, action):
            action = None  # `drain: false` asks for nothing
        if action is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no action: drop_worker, reload_tokens, drain or set_rounds")
        try:
            result = self.operator(action, getattr(request, action), by=f"operator {operator}")
        except LookupError as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ValueError as e:  # refused as asked (ConfigError: a tokens file that is not valid); nothing changed
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.AdminReply(result=result)

    def operator(self, action: str, argument=None, by: str = "an operator") -> str:
        """One operator command, also for the daemon's signals: what was done, in words. LookupError,
        ValueError: refused (see the Coordinator's operator controls)."""
        if action == "drop_worker":
            return self.c.drop_worker(str(argument), by)
        if action == "reload_tokens":
            return self.c.reload_tokens(self.auth, self.admin, by)
        if action == "drain":
            return self.c.drain(by)
        if action == "set_rounds":
            return self.c.set_rounds(int(argument), by)
        raise ValueError(f"unknown operator command {action!r}")
