"""Fuzzing: random and mutated messages and chunk streams against every RPC of a real coordinator, and
the parsers they reach (chunk messages, safetensors, codec pipelines) directly.

The gRPC tests run hypothesis inside one federation (real coordinator, real gRPC on loopback). Every
answer is judged: a call may succeed where that is legitimate, or fail with a status that names the
caller's fault (INVALID_ARGUMENT, UNAUTHENTICATED, DATA_LOSS, ...). UNKNOWN or INTERNAL (an exception
escaped a handler, or grpc could not hand the request to one), a deadline (a hang), UNAVAILABLE (the
server is gone) or an upload accepted that must not be are recorded with the shortest input that caused
each, and the test fails at the end with the whole list, after it has checked that the junk left the
global model alone and that a real run still completes on the same coordinator.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import queue
import re
import struct
import threading
import time
import tracemalloc
from dataclasses import dataclass, field

import grpc
import pytest
import safetensors.torch
import torch
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedblock.client.session import Session
from fedblock.common import wire
from fedblock.common.aggregation import is_finite
from fedblock.common.codecs import CodecError, CodecPipeline, load_safetensors
from fedblock.common.messages import PROTOCOL_VERSION, Assignment, Manifest, TensorSpec
from fedblock.common.pb import coordinator_pb2 as pb
from fedblock.common.rpc import channel_options

CHUNK = 4096
TIMEOUT = 5.0  # every call has a deadline: running into it is a hang
SERVICE = pb.DESCRIPTOR.services_by_name["Coordinator"]
METHODS = {m.name: m for m in SERVICE.methods}
REQUESTS = {name: getattr(pb, m.input_type.name) for name, m in METHODS.items()}
OK = grpc.StatusCode.OK
C = grpc.StatusCode
# Statuses that say "your request is wrong" (or "not now"): what junk may get back.
REFUSALS = frozenset({
    C.INVALID_ARGUMENT, C.UNAUTHENTICATED, C.PERMISSION_DENIED, C.FAILED_PRECONDITION, C.DATA_LOSS, C.ABORTED,
    C.RESOURCE_EXHAUSTED, C.ALREADY_EXISTS, C.OUT_OF_RANGE, C.NOT_FOUND,
})
PROTECTED = frozenset({"fuzzer", "real"})  # the federation's own workers: junk never acts as them
# Derandomized, so that every run sends the same inputs: a failure is a bug, not a bad draw.
PURE = settings(deadline=None, derandomize=True, database=None)
FUZZ = settings(PURE, suppress_health_check=list(HealthCheck))


# ---- strategies --------------------------------------------------------------------------------------

U32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 2**31, 2**32 - 1]))
U64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2, 3, 2**32, 2**63 - 1, 2**64 - 1]))
I64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), -2, -1, 0, 1, 2, 2**63 - 1]))
F32 = st.floats(width=32)  # NaN and infinities included
ASCII = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
NAMES = st.one_of(
    st.sampled_from(["junk-0", "junk-1", "junk-2"]),  # reused, so junk sessions exist to act under
    st.text(max_size=24),
    st.sampled_from(["", " ", "a/b", "../../x", "x" * 4096, "layers.0", "\x00", "é", "\n"]),
).filter(lambda s: s not in PROTECTED)
DTYPE_NAMES = ["float32", "float16", "bfloat16", "float64", "int8", "int64", "bool", "", "F32", "torch.float32"]


def block_names(specs) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(sorted(specs)), st.text(max_size=12),
                     st.sampled_from(["", "layers.99", "layers.-1", "embed ", "EMBED", "*"]))


def pb_specs(specs) -> st.SearchStrategy[list]:
    random_spec = st.builds(pb.TensorSpec, name=st.text(max_size=16), dtype=st.sampled_from(DTYPE_NAMES) | st.text(max_size=8),
                            shape=st.lists(I64, max_size=5))
    real = st.sampled_from(sorted(specs)).map(lambda b: [t.to_pb() for t in specs[b].tensors])
    return st.one_of(real, st.lists(random_spec, max_size=4), real.flatmap(lambda ts: st.lists(random_spec, max_size=2).map(ts.__add__)))


@st.composite
def pb_manifests(draw, specs) -> pb.Manifest:
    """A manifest with random fields; half of them aimed: self-consistent for a real block, so that they
    get past the manifest checks to the round rules and chunk assembly."""
    m = pb.Manifest(
        round=draw(U64), block=draw(block_names(specs)), base_version=draw(I64), tensors=draw(pb_specs(specs)),
        codec=draw(st.sampled_from(["none", "", "zstd", "bf16", "none,none"]) | st.text(max_size=8)),
        raw_bytes=draw(U64), wire_bytes=draw(U64), blob_sha256=draw(st.binary(max_size=40)), chunk_size=draw(U32),
        num_chunks=draw(U32), num_tokens=draw(U64), train_loss=draw(F32),
    )
    if draw(st.booleans()):
        block = draw(st.sampled_from(sorted(specs)))
        size = draw(st.integers(1, 3 * CHUNK))
        chunk_size = draw(st.integers(1, CHUNK))
        m.block, m.codec, m.num_tokens = block, "none", draw(st.integers(1, 2**64 - 1))
        m.wire_bytes, m.chunk_size, m.num_chunks = size, chunk_size, wire.num_chunks(size, chunk_size)
        m.blob_sha256 = draw(st.binary(min_size=32, max_size=32))
        m.round = draw(st.integers(0, 3) | U64)
        m.base_version = draw(st.integers(-3, 3) | I64)
        del m.tensors[:]
        m.tensors.extend(t.to_pb() for t in specs[block].tensors)
    return m


def header_message(manifest: Manifest | pb.Manifest) -> bytes:
    m = manifest if isinstance(manifest, pb.Manifest) else manifest.to_pb()
    return pb.UploadMessage(header=pb.UploadHeader(manifest=m)).SerializeToString()


def upload_streams(specs) -> st.SearchStrategy[list[bytes]]:
    header = pb_manifests(specs).map(header_message)
    chunk = st.builds(lambda i, d: pb.UploadMessage(chunk=pb.Chunk(index=i, data=d)).SerializeToString(),
                      U32, st.binary(max_size=2 * CHUNK))
    return st.one_of(
        st.tuples(header, st.lists(chunk, max_size=5)).map(lambda hc: [hc[0], *hc[1]]),
        st.lists(st.one_of(header, chunk, st.just(b"")), max_size=5),
    )


def requests(rpc: str, specs) -> st.SearchStrategy[bytes]:
    """Valid protobuf encodings of `rpc`'s request with random field values."""
    build = {
        "Join": st.builds(pb.JoinRequest, name=NAMES, version=st.text(max_size=12), device=st.text(max_size=12),
                          num_examples=U64, protocol=st.sampled_from([0, PROTOCOL_VERSION, 99]) | U32,
                          check_only=st.booleans()),
        # Without --admin-tokens (as here) every one is refused: junk never drains or shortens the run.
        "Admin": st.one_of(st.builds(pb.AdminRequest, drop_worker=NAMES), st.builds(pb.AdminRequest, drain=st.booleans()),
                           st.builds(pb.AdminRequest, reload_tokens=st.booleans()),
                           st.builds(pb.AdminRequest, set_rounds=U32), st.builds(pb.AdminRequest)),
        "Heartbeat": st.builds(pb.HeartbeatRequest, held_version=U64, local_steps_done=U64),
        "UploadStatus": st.builds(pb.UploadStatusRequest, round=U64, block=block_names(specs),
                                  blob_sha256=st.binary(max_size=40)),
        "Download": st.builds(pb.DownloadRequest, held_versions=st.dictionaries(block_names(specs), I64, max_size=8)),
        "Leave": st.builds(pb.LeaveRequest, reason=st.text(max_size=40)),
        "Abandon": st.builds(pb.AbandonRequest, round=U64, reason=st.text(max_size=80)),
        "Report": st.builds(pb.ReportRequest, round=st.integers(0, 3) | U64, base_version=st.integers(0, 3) | U64,
                            numbers=st.lists(st.floats(width=32), max_size=12), num_tokens=U64,
                            train_loss=st.floats(width=32)),
        "Log": st.builds(pb.LogRequest, held_version=st.integers(0, 3) | U64),
    }.get(rpc, st.builds(REQUESTS[rpc]))
    return build.map(lambda m: m.SerializeToString())


@st.composite
def mutated(draw, raw: bytes) -> bytes:
    """`raw` with a few bytes flipped, inserted, deleted, or cut off."""
    out = bytearray(raw)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, len(out)))
        if op == "flip" and out:
            out[at % len(out)] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del out[at:]
    return bytes(out)


# safetensors-like blobs: a JSON header from hypothesis, including what json.dumps writes for floats
# (NaN, Infinity), big integers, wrong types and nesting, with or without consistent offsets.
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@st.composite
def safetensors_like(draw, names=None) -> bytes:
    header: dict = {}
    offset = 0
    name_strategy = st.sampled_from(names) if names else st.text(max_size=8)
    for _ in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(sorted(ST_DTYPES)) | st.sampled_from(["F8_E4M3", "U64", "f32", ""]) | JSON)
        shape = draw(st.lists(st.integers(0, 4), max_size=3) | st.lists(I64 | st.integers(2**63, 2**70), max_size=3) | JSON)
        try:
            size = ST_DTYPES[dtype] * math.prod(shape)
        except Exception:  # JSON junk for a dtype or shape
            size = None
        size = size if isinstance(size, int) and 0 <= size <= 4096 else draw(st.integers(0, 64))
        offsets = [offset, offset + size] if draw(st.booleans()) else draw(st.lists(I64, max_size=3) | JSON)
        offset += size
        info = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
        if draw(st.integers(0, 5)) == 0:
            info.pop(draw(st.sampled_from(sorted(info))))
        header[draw(name_strategy)] = info if draw(st.integers(0, 7)) else draw(JSON)
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3) | JSON)
    text = json.dumps(header).encode() if draw(st.integers(0, 9)) else json.dumps(draw(JSON)).encode()
    text += b" " * draw(st.integers(0, 7))
    length = len(text) if draw(st.integers(0, 5)) else draw(st.integers(0, 2**64 - 1))
    data = bytes(offset) if draw(st.booleans()) else draw(st.binary(max_size=offset + 16))
    return struct.pack("<Q", length) + text + data


def _header(text: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(text)) + text + data


# Hand-made hostile headers, each a one-line reason a parser could fall over.
HOSTILE_SAFETENSORS = {
    "shape-float-overflow": _header(b'{"w":{"dtype":"F32","shape":[1e400],"data_offsets":[0,4]}}', bytes(4)),
    "shape-infinity": _header(b'{"w":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}', bytes(4)),
    "offset-infinity": _header(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,-Infinity]}}', bytes(4)),
    "offset-nan": _header(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[NaN,4]}}', bytes(4)),
    "empty-tensor-with-huge-dims": _header(b'{"w":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904,0],'
                                           b'"data_offsets":[0,0]}}'),
    "empty-tensor-with-2^64-dim": _header(b'{"w":{"dtype":"F32","shape":[18446744073709551616,0],"data_offsets":[0,0]}}'),
    "empty-tensor-with-100-dims": _header(json.dumps({"w": {"dtype": "F32", "shape": [0] * 100, "data_offsets": [0, 0]}}).encode()),
    "deeply-nested-json": _header(b"[" * 100_000 + b"]" * 100_000),
    "deeply-nested-metadata": _header(b'{"__metadata__":' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    "header-length-2^64-1": b"\xff" * 8 + b"{}",
    "header-length-past-end": struct.pack("<Q", 1000) + b"{}",
    "4301-digit-integer": _header(b'{"w":{"dtype":"F32","shape":[' + b"9" * 4301 + b'],"data_offsets":[0,4]}}', bytes(4)),
    "misaligned-offset": _header(b'{"w":{"dtype":"F64","shape":[1],"data_offsets":[3,11]}}', bytes(11)),
    "overlapping-tensors": _header(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                   b'"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}', bytes(12)),
    "duplicate-names": _header(b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                               b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    "invalid-utf8": _header(b'{"\xff\xfe":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    "surrogate-escape": _header(b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    "metadata-not-strings": _header(b'{"__metadata__":{"w":1}}'),
    "info-not-a-dict": _header(b'{"w":[1,2,3]}'),
    "shape-is-a-string": _header(b'{"w":{"dtype":"F32","shape":"11","data_offsets":[0,4]}}', bytes(4)),
    "shape-of-bools": _header(b'{"w":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', bytes(4)),
    "dtype-unhashable": _header(b'{"w":{"dtype":["F32"],"shape":[1],"data_offsets":[0,4]}}', bytes(4)),
    "negative-dim-zero-numel": _header(b'{"w":{"dtype":"F32","shape":[-1,0],"data_offsets":[0,0]}}'),
}


# ---- calling the coordinator with raw bytes ----------------------------------------------------------


@dataclass
class Answer:
    code: grpc.StatusCode
    details: str = ""
    replies: list = field(default_factory=list)


def _short(raw) -> str:
    if isinstance(raw, list):
        return "[" + ", ".join(_short(r) for r in raw[:6]) + (", ..." if len(raw) > 6 else "") + f"] ({len(raw)} messages)"
    return repr(raw[:120]) + (f"...({len(raw)} bytes)" if len(raw) > 120 else "")


def _parsed(rpc: str, raw) -> str:
    first = raw[0] if isinstance(raw, list) and raw else raw
    if isinstance(first, list) or not isinstance(first, bytes):
        return ""
    try:
        text = str(REQUESTS[rpc].FromString(first)).replace("\n", " ")
    except Exception:
        return ""
    return f" first message parses as {{{text[:300]}}}" if text else ""


def _signature(details: str) -> str:
    """Details without what varies between inputs (numbers, hashes, paths, quoted values)."""
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", details)
    return re.sub(r"[0-9a-f]{8,}|\d+", "#", text)[:90]


class Prober:
    """Sends raw bytes to the coordinator's RPCs and keeps what went wrong."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=channel_options())
        self.stubs = {}
        for name, m in METHODS.items():
            kind = {(False, False): self.channel.unary_unary, (False, True): self.channel.unary_stream,
                    (True, False): self.channel.stream_unary}[(m.client_streaming, m.server_streaming)]
            self.stubs[name] = kind(f"/{SERVICE.full_name}/{name}", request_serializer=None, response_deserializer=None)
        self.failures: dict[tuple[str, str], str] = {}
        self.codes: dict[tuple[str, str], int] = {}
        self.sessions: dict[str, str] = {}  # junk workers joined: name -> latest session
        self.calls = 0

    def call(self, rpc: str, request, metadata=()) -> Answer:
        self.calls += 1
        try:
            if METHODS[rpc].client_streaming:
                return Answer(OK, replies=[self.stubs[rpc](iter(request), metadata=metadata, timeout=TIMEOUT)])
            if not METHODS[rpc].server_streaming:
                return Answer(OK, replies=[self.stubs[rpc](request, metadata=metadata, timeout=TIMEOUT)])
            stream = self.stubs[rpc](request, metadata=metadata, timeout=TIMEOUT)
            replies = []
            for reply in stream:
                replies.append(reply)
                if rpc == "Events":  # an event stream stays open: the first event is the answer
                    stream.cancel()
                    break
            return Answer(OK, replies=replies)
        except grpc.RpcError as e:
            return Answer(e.code(), e.details() or "")

    def send(self, rpc: str, request, metadata=(), *, expect=None, statuses=frozenset(), note: str = "") -> Answer:
        """Call and judge. Success is legitimate for every RPC but Upload, whose reply status must be in
        `statuses`; a failure must be a refusal, and `expect` = (code, reason) pins it down further."""
        answer = self.call(rpc, request, metadata)
        self.codes[(rpc, answer.code.name)] = self.codes.get((rpc, answer.code.name), 0) + 1
        problem = None
        if answer.code == OK:
            if rpc == "Upload":
                status = pb.UploadReply.FromString(answer.replies[0]).status
                if status not in statuses:
                    problem = f"answered {status!r}" + (f", expected {expect[0].name} {expect[1]}" if expect else "")
            elif expect is not None:
                problem = f"succeeded, expected {expect[0].name} {expect[1]}"
            elif rpc == "Join":
                self.sessions[REQUESTS[rpc].FromString(request).name] = pb.JoinReply.FromString(answer.replies[0]).session
        elif answer.code not in REFUSALS:
            problem = f"{answer.code.name}: {answer.details}"
        elif expect is not None and (answer.code != expect[0] or expect[1] not in answer.details):
            problem = f"{answer.code.name} ({answer.details[:80]}), expected {expect[0].name} {expect[1]}"
        if problem is not None:
            what = f"{rpc}: {note + ' ' if note else ''}metadata={metadata!r} request={_short(request)}{_parsed(rpc, request)}"
            what = what if len(what) < 900 else what[:900] + " …"
            key = (rpc, _signature(problem))
            if key not in self.failures or len(what) < len(self.failures[key]):
                self.failures[key] = f"{problem[:300]}\n      input: {what}"
        return answer

    def speakable(self) -> list[str]:
        """Junk workers whose names can travel in metadata as they are."""
        return sorted(n for n in self.sessions if n and n.isascii() and n.isprintable() and n == n.strip())

    def join_junk(self, count: int = 3) -> None:
        for i in range(count):
            request = pb.JoinRequest(name=f"junk-{i}", version="0", device="cpu",
                                     protocol=PROTOCOL_VERSION).SerializeToString()
            assert self.send("Join", request).code == OK

    def report(self) -> str:
        return "\n".join(f"  - {rpc}: {text}" for (rpc, _), text in sorted(self.failures.items()))

    def leave_all(self, coordinator) -> None:
        """Every connected junk worker leaves (so that the run's rounds do not wait for it)."""
        for w in coordinator.registry.all():
            if w.connected and w.name not in PROTECTED:
                answer = Answer(C.INVALID_ARGUMENT)
                if w.name.isascii() and w.name.isprintable():
                    answer = self.call("Leave", b"", (("fedblock-worker", w.name), ("fedblock-session", w.session)))
                assert answer.code == OK or not re.fullmatch(r"[A-Za-z0-9_.-]+", w.name), (w.name, answer)
                if answer.code != OK:  # a name that cannot travel in metadata (as it is): no call can act as it
                    coordinator.leave(w.name, w.session)
        assert set(coordinator.registry.connected()) <= PROTECTED


def metadata(data, prober: Prober, protected_sessions: dict[str, str]):
    """Who the junk claims to be: nobody, somebody random, a junk worker (with its real session or a
    stale one), or one of the federation's own workers without its session."""
    kind = data.draw(st.sampled_from(["none", "random", "junk", "junk", "junk", "stale", "forged", "half"]), label="who")
    text = st.text(ASCII, max_size=40)
    # What depends on the state (the junk workers joined so far) is drawn whatever the state, so that
    # hypothesis sees the same draws when it replays an example.
    pick, stale = data.draw(st.integers(0, 63)), data.draw(st.sampled_from(["", "0" * 32]) | text)
    if kind == "random":
        md = [("fedblock-worker", data.draw(text)), ("fedblock-session", data.draw(text))]
    elif kind in ("junk", "stale") and prober.speakable():
        names = prober.speakable()
        name = names[pick % len(names)]
        md = [("fedblock-worker", name), ("fedblock-session", prober.sessions[name] if kind == "junk" else stale)]
    elif kind == "forged":
        name = data.draw(st.sampled_from(sorted(PROTECTED)))
        guess = data.draw(st.sampled_from(["", "0" * 32, protected_sessions[name][:-1] + "0"]) | text)
        md = [("fedblock-worker", name), ("fedblock-session", guess if guess != protected_sessions[name] else "")]
    elif kind == "half":
        md = [(data.draw(st.sampled_from(["fedblock-worker", "fedblock-session"])), data.draw(text))]
    else:
        md = []
    if data.draw(st.integers(0, 9)) == 0:
        md.append(("x-fuzz", data.draw(text)))
    return tuple(md)


def random_call(data, prober: Prober, specs, protected_sessions: dict[str, str]) -> None:
    """One call of a random RPC: a valid message with random fields, random bytes, or mutated bytes."""
    rpc = data.draw(st.sampled_from(sorted(METHODS)), label="rpc")
    how = data.draw(st.sampled_from(["message", "message", "bytes", "mutated"]), label="how")
    if rpc == "Upload":
        stream = data.draw(upload_streams(specs))
        if how == "bytes":
            stream = data.draw(st.lists(st.binary(max_size=300), max_size=4))
        elif how == "mutated" and stream:
            at = data.draw(st.integers(0, len(stream) - 1))
            stream[at] = data.draw(mutated(stream[at]))
        request = stream
    else:
        request = data.draw(requests(rpc, specs))
        if how == "bytes":
            request = data.draw(st.binary(max_size=300))
        elif how == "mutated":
            request = data.draw(mutated(request))
    if rpc == "Join":
        try:
            if pb.JoinRequest.FromString(request).name in PROTECTED:
                return  # junk must not take over the federation's own workers (that is allowed, not junk)
        except Exception:
            pass
    prober.send(rpc, request, metadata(data, prober, protected_sessions), statuses={"late"}, note=f"[{how}]")


# ---- mutated uploads from an assigned worker -----------------------------------------------------------


def block_delta(specs, block: str, seed: int, scale: float = 1e-3) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(t.shape, generator=gen) * scale for t in specs[block].tensors}


def pack(delta: dict, block: str, round: int = 1) -> tuple[Manifest, bytes]:
    return wire.pack(block, delta, CodecPipeline("none"), round=round, base_version=0, chunk_size=CHUNK, num_tokens=1)


def chunk_message(index: int, data: bytes, style: str) -> bytes:
    """A chunk as a worker sends it, as protobuf writes it, or with unknown fields (outer or inner)."""
    if style == "wire":
        return wire.encode_chunk_message(wire.UPLOAD_CHUNK_FIELD, index, data)
    if style == "pb":
        return pb.UploadMessage(chunk=pb.Chunk(index=index, data=data)).SerializeToString()
    if style == "pb+outer":
        return pb.UploadMessage(chunk=pb.Chunk(index=index, data=data)).SerializeToString() + b"\x78\x01"
    inner = pb.Chunk(index=index, data=data).SerializeToString() + b"\x78\x01"
    return b"\x12" + wire._varint(len(inner)) + inner


CHUNK_STYLES = ["wire", "wire", "pb", "pb+outer", "pb+inner"]


def predict(m: Manifest, chunks: list[tuple[int, bytes]]) -> str:
    """What the coordinator must make of these chunks under a valid header: chunks may come in any order
    and any number of times (the first copy counts), must fit the manifest, and must hash to it."""
    held: dict[int, bytes] = {}
    for index, data in chunks:
        if not 0 <= index < m.num_chunks:
            return "bad_chunk"
        start = index * m.chunk_size
        if len(data) != min(start + m.chunk_size, m.wire_bytes) - start:
            return "bad_chunk"
        held.setdefault(index, data)
    if len(held) < m.num_chunks:
        return "incomplete"
    return "accepted" if wire.sha256(b"".join(held[i] for i in range(m.num_chunks))) == m.blob_sha256 else "hash_mismatch"


EXPECTED = {  # the reason an upload is refused for -> its status
    "bad_chunk": C.DATA_LOSS, "hash_mismatch": C.DATA_LOSS, "incomplete": C.ABORTED, "malformed": C.INVALID_ARGUMENT,
    "non_finite": C.INVALID_ARGUMENT,
}

INDEX = st.integers(0, 10_000)
CHUNK_OPS = st.lists(st.one_of(
    st.tuples(st.just("drop"), INDEX),
    st.tuples(st.just("duplicate"), INDEX, INDEX),
    st.tuples(st.just("swap"), INDEX, INDEX),
    st.tuples(st.just("flip"), INDEX, st.integers(0, CHUNK), st.integers(1, 255)),
    st.tuples(st.just("reindex"), INDEX, U32),
    st.tuples(st.just("resize"), INDEX, st.integers(-CHUNK, CHUNK).filter(bool)),
    st.tuples(st.just("truncate"), INDEX),
), min_size=1, max_size=4)


def apply_ops(chunks: list[tuple[int, bytes]], ops) -> list[tuple[int, bytes]]:
    chunks = list(chunks)
    for op in ops:
        if not chunks:
            break
        k = op[1] % len(chunks)
        index, data = chunks[k]
        if op[0] == "drop":
            del chunks[k]
        elif op[0] == "duplicate":
            chunks.insert(op[2] % (len(chunks) + 1), chunks[k])
        elif op[0] == "swap":
            j = op[2] % len(chunks)
            chunks[k], chunks[j] = chunks[j], chunks[k]
        elif op[0] == "flip" and data:
            b = bytearray(data)
            b[op[2] % len(b)] ^= op[3]
            chunks[k] = (index, bytes(b))
        elif op[0] == "reindex":
            chunks[k] = (op[2], data)
        elif op[0] == "resize":
            chunks[k] = (index, data + bytes(op[2]) if op[2] > 0 else data[: max(0, len(data) + op[2])])
        elif op[0] == "truncate":
            del chunks[k:]
    return chunks


@dataclass
class Upload:
    """The fuzzing worker: its identity and the round-1 block it was assigned."""

    prober: Prober
    specs: dict
    block: str
    metadata: tuple
    protected_sessions: dict
    seed: int = 0
    skipped: int = 0  # garbage that would decode into a legitimate update (not sent)

    def fresh(self) -> tuple[Manifest, bytes]:
        """A valid update never sent before (so no partial upload of an earlier example resumes into it)."""
        self.seed += 1
        return pack(block_delta(self.specs, self.block, self.seed), self.block)

    def identity(self, data) -> tuple[tuple, bool]:
        """Mostly the fuzzer's own metadata; sometimes nobody's, or the fuzzer's name with a wrong session."""
        if data.draw(st.integers(0, 7)):
            return self.metadata, True
        name, session = self.metadata[0][1], self.metadata[1][1]
        text = st.text(ASCII, max_size=40)
        md = data.draw(st.sampled_from([
            (), (("fedblock-worker", name),), (("fedblock-session", session),), (("fedblock-session", session), ("fedblock-worker", "real")),
            (("fedblock-worker", name), ("fedblock-session", session.upper())),
            (("fedblock-worker", name + " "), ("fedblock-session", session)),
        ]) | st.tuples(st.tuples(st.just("fedblock-worker"), text), st.tuples(st.just("fedblock-session"), text)))
        return md, False

    def stream(self, data) -> None:
        """The valid stream with chunks dropped, duplicated, reordered, corrupted, re-indexed, resized or cut."""
        m, blob = self.fresh()
        chunks = apply_ops([(i, bytes(c)) for i, c in wire.iter_chunks(blob, CHUNK)], data.draw(CHUNK_OPS, label="ops"))
        if predict(m, chunks) == "accepted":  # only reordered or duplicated: lose one chunk entirely
            gone = data.draw(st.integers(0, m.num_chunks - 1))
            chunks = [c for c in chunks if c[0] != gone]
        reason = predict(m, chunks)
        styles = data.draw(st.lists(st.sampled_from(CHUNK_STYLES), min_size=1, max_size=3))
        messages = [header_message(m)] + [chunk_message(i, d, styles[n % len(styles)]) for n, (i, d) in enumerate(chunks)]
        md, valid = self.identity(data)
        expect = (EXPECTED[reason], reason) if valid else (C.UNAUTHENTICATED, "")
        self.prober.send("Upload", messages, md, expect=expect, note="[mutated chunks]")

    def lying_header(self, data) -> None:
        """Genuine chunks under a header that lies about something the coordinator checks."""
        m, blob = self.fresh()
        fields = data.draw(st.lists(st.sampled_from(
            ["round", "block", "base_version", "codec", "num_tokens", "wire_bytes", "chunk_size", "num_chunks",
             "blob_sha256", "tensors", "wire_bytes+num_chunks", "chunk_size+num_chunks"]), min_size=1, max_size=3, unique=True))
        lie: dict = {}
        for f in fields:
            if f == "round":
                lie["round"] = data.draw(st.sampled_from([0, 2, 3]) | U64)
            elif f == "block":
                lie["block"] = data.draw(block_names(self.specs))
            elif f == "base_version":
                lie["base_version"] = data.draw(I64.filter(lambda v: v not in (-1, 0)))
            elif f == "codec":
                lie["codec"] = data.draw(st.sampled_from(["", "zstd", "bf16", "None"]) | st.text(max_size=8))
            elif f == "num_tokens":
                lie["num_tokens"] = 0
            elif f == "blob_sha256":
                lie["blob_sha256"] = data.draw(st.binary(max_size=40))
            elif f == "tensors":
                lie["tensors"] = data.draw(lying_specs(self.specs[self.block].tensors))
            else:
                for part in f.split("+"):
                    lie[part] = data.draw(U32 if part != "wire_bytes" else U64 | st.integers(1, 2 * m.wire_bytes))
                if "+" in f and lie.get("wire_bytes", m.wire_bytes) and lie.get("chunk_size", m.chunk_size):
                    lie["num_chunks"] = wire.num_chunks(lie.get("wire_bytes", m.wire_bytes), lie.get("chunk_size", m.chunk_size))
                    lie["num_chunks"] = lie["num_chunks"] if lie["num_chunks"] < 2**32 else 0
        lie = {k: v for k, v in lie.items() if v != getattr(m, k)}
        if not lie:
            lie["blob_sha256"] = hashlib.sha256(m.blob_sha256).digest()
        informational = dict(train_loss=data.draw(F32), num_tokens=data.draw(U64.filter(bool)))
        liar = dataclasses.replace(m, **{**informational, **lie})
        messages = [header_message(liar)] + [chunk_message(i, bytes(c), "wire") for i, c in wire.iter_chunks(blob, CHUNK)]
        md, valid = self.identity(data)
        # Any refusal will do (which check fires first is the coordinator's business); only a round that
        # is already closed (0) may be answered "late", before the rest is looked at.
        statuses = {"late"} if valid and liar.round == 0 else frozenset()
        self.prober.send("Upload", messages, md, expect=None if valid else (C.UNAUTHENTICATED, ""), statuses=statuses,
                         note=f"[header lies about {sorted(lie)}]")

    def structure(self, data) -> None:
        """Streams whose order of messages is wrong, with two headers, empty or undecodable messages."""
        m, blob = self.fresh()
        chunks = [chunk_message(i, bytes(c), "wire") for i, c in wire.iter_chunks(blob, CHUNK)]
        k = data.draw(st.integers(1, len(chunks) - 1))
        header = header_message(m)
        kind = data.draw(st.sampled_from(["chunk-first", "nothing", "header-only", "two-headers", "empty-message",
                                          "undecodable", "header-merged-into-chunk", "chunk-merged-into-header"]))
        md, valid = self.identity(data)
        if kind == "chunk-first":
            messages, expect = [chunks[0], header, *chunks[1:]], (C.INVALID_ARGUMENT, "must start with its header")
        elif kind == "nothing":
            messages, expect = [], (C.INVALID_ARGUMENT, "must start with its header")
        elif kind == "header-only":
            messages, expect = [header], (C.ABORTED, "incomplete")
        elif kind == "two-headers":
            messages, expect = [header, *chunks[:k], header, *chunks[k:]], (C.INVALID_ARGUMENT, "only chunks")
        elif kind == "empty-message":
            messages, expect = [header, *chunks[:k], b"", *chunks[k:]], (C.INVALID_ARGUMENT, "only chunks")
        elif kind == "undecodable":
            junk = data.draw(st.sampled_from([b"\xff", b"\x12\xff", b"\x0a\x05abc", b"\x12\x02\x08"]) | st.binary(min_size=1, max_size=20))
            try:
                parsed = pb.UploadMessage.FromString(junk)
                if wire.parse_chunk_message(junk, wire.UPLOAD_CHUNK_FIELD) or parsed.WhichOneof("kind"):
                    return  # it means something after all
                expect = (C.INVALID_ARGUMENT, "only chunks")
            except Exception:
                expect = (C.INVALID_ARGUMENT, "")
            messages = [header, *chunks[:k], junk, *chunks[k:]]
        elif kind == "header-merged-into-chunk":  # one message, both oneof members: protobuf keeps the last
            messages, expect = [header + chunks[0], *chunks[1:]], (C.INVALID_ARGUMENT, "must start with its header")
        else:  # the header wins, so chunk 0 (inside the merged message) never arrived
            messages, expect = [chunks[0] + header, *chunks[1:]], (C.ABORTED, "incomplete")
        if not valid and messages and messages[0] != chunks[0] and kind != "header-merged-into-chunk":
            expect = (C.UNAUTHENTICATED, "")
        self.prober.send("Upload", messages, md, expect=expect, note=f"[{kind}]")

    def garbage(self, data) -> None:
        """A blob that hashes correctly and fits its manifest but is not a valid update: the decoder's turn."""
        specs = self.specs[self.block].tensors
        names = [t.name for t in specs]
        kind = data.draw(st.sampled_from(["random", "json", "hostile", "non-finite", "integers", "wrong-shape",
                                          "extra-tensor", "missing-tensor", "header-flip", "resized"]), label="garbage")
        if kind == "random":
            blob = data.draw(st.binary(min_size=1, max_size=3000))
        elif kind == "json":
            blob = data.draw(safetensors_like(names))
        elif kind == "hostile":
            blob = HOSTILE_SAFETENSORS[data.draw(st.sampled_from(sorted(HOSTILE_SAFETENSORS)))]
        else:
            self.seed += 1
            delta = block_delta(self.specs, self.block, self.seed)
            name = data.draw(st.sampled_from(names))
            if kind == "non-finite":
                flat = delta[name].view(-1)
                flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
            elif kind == "integers":
                delta[name] = (delta[name] * 1e4).to(data.draw(st.sampled_from([torch.int32, torch.int8, torch.bool])))
            elif kind == "wrong-shape":
                delta[name] = delta[name].reshape(-1)[: data.draw(st.integers(0, 8))].clone()
            elif kind == "extra-tensor":
                delta[data.draw(st.text(max_size=8).filter(lambda s: s not in names and s != "__metadata__"))] = torch.zeros(1)
            elif kind == "missing-tensor":
                del delta[name]
            blob = safetensors.torch.save({n: t.contiguous() for n, t in delta.items()})
            if kind == "header-flip":
                b = bytearray(blob)
                b[data.draw(st.integers(0, 8 + int.from_bytes(blob[:8], "little") - 1))] ^= data.draw(st.integers(1, 255))
                blob = bytes(b)
            elif kind == "resized":
                cut = data.draw(st.integers(-64, 64).filter(bool))
                blob = blob + bytes(cut) if cut > 0 else blob[:cut]
        md, valid = self.identity(data)
        self.send_blob(blob, md, valid, f"garbage: {kind}", base_version=data.draw(st.sampled_from([0, -1])),
                       num_tokens=data.draw(U64.filter(bool)), train_loss=data.draw(F32))

    def send_blob(self, blob: bytes, md, valid: bool, note: str, **fields) -> None:
        """Upload `blob` under a manifest that fits it exactly (size, chunks, hash, the block's tensors),
        in the run's chunk size."""
        specs = self.specs[self.block].tensors
        try:
            decoded = CodecPipeline("none").decode(bytearray(blob), specs)
            if is_finite(decoded):
                self.skipped += 1
                return  # decodes into a legitimate update: not junk
            expect = (C.INVALID_ARGUMENT, "non_finite")
        except Exception:
            expect = (C.INVALID_ARGUMENT, "malformed")
        chunk_size = CHUNK
        raw = sum(math.prod(t.shape) for t in specs) * 4
        fields = {"base_version": 0, "raw_bytes": raw, "num_tokens": 1, "train_loss": math.nan, **fields}
        m = Manifest(round=1, block=self.block, tensors=specs, codec="none", wire_bytes=len(blob), blob_sha256=wire.sha256(blob),
                     chunk_size=chunk_size, num_chunks=wire.num_chunks(len(blob), chunk_size), **fields)
        messages = [header_message(m)] + [chunk_message(i, bytes(c), "wire") for i, c in wire.iter_chunks(blob, chunk_size)]
        self.prober.send("Upload", messages, md, expect=expect if valid else (C.UNAUTHENTICATED, ""), note=f"[{note}]")

    def tour(self, config) -> None:
        """Every refusal once, deterministically, each with its exact status and reason."""
        other = next(b for b in sorted(self.specs) if b != self.block)

        def lie(note, expect, statuses=frozenset(), chunks=None, **changes):
            m, blob = self.fresh()
            cs = [(i, bytes(c)) for i, c in wire.iter_chunks(blob, CHUNK)] if chunks is None else chunks(blob)
            messages = [header_message(dataclasses.replace(m, **changes))] + [chunk_message(i, d, "wire") for i, d in cs]
            self.prober.send("Upload", messages, self.metadata, expect=expect, statuses=statuses, note=f"[tour: {note}]")

        lie("a closed round", None, statuses={"late"}, round=0)
        lie("a round never planned", (C.FAILED_PRECONDITION, "not_assigned"), round=5)
        lie("an unknown block", (C.INVALID_ARGUMENT, "unknown_block"), block="nope")
        lie("a block not assigned", (C.FAILED_PRECONDITION, "wrong_block"), block=other, tensors=self.specs[other].tensors,
            raw_bytes=sum(math.prod(t.shape) for t in self.specs[other].tensors) * 4)
        lie("a base version ahead", (C.FAILED_PRECONDITION, "stale_base"), base_version=5)
        lie("a base version too old", (C.FAILED_PRECONDITION, "stale_base"), base_version=-2)
        lie("another codec", (C.INVALID_ARGUMENT, "wrong_codec"), codec="zstd")
        lie("no tokens", (C.INVALID_ARGUMENT, "no_weight"), num_tokens=0)
        lie("too many bytes", (C.INVALID_ARGUMENT, "too_large"), wire_bytes=config.max_update_bytes + 1)
        lie("chunks too large", (C.INVALID_ARGUMENT, "bad_manifest"), chunk_size=config.chunk_size + 1)
        lie("another chunk size", (C.INVALID_ARGUMENT, "bad_manifest"), chunk_size=config.chunk_size // 2)
        lie("raw bytes that are not the block's", (C.INVALID_ARGUMENT, "bad_manifest"), raw_bytes=12)
        lie("an implausible wire size", (C.INVALID_ARGUMENT, "bad_manifest"), wire_bytes=config.max_update_bytes // 2)
        lie("a wrong chunk count", (C.INVALID_ARGUMENT, "bad_manifest"), num_chunks=1)
        lie("a tensor missing", (C.INVALID_ARGUMENT, "bad_manifest"), tensors=())
        lie("a wrong hash", (C.DATA_LOSS, "hash_mismatch"), blob_sha256=bytes(32))
        lie("a short hash", (C.INVALID_ARGUMENT, "bad_manifest"), blob_sha256=bytes(31))
        lie("a short chunk", (C.DATA_LOSS, "bad_chunk"), chunks=lambda b: [(0, bytes(b[:10]))])
        lie("a chunk index too high", (C.DATA_LOSS, "bad_chunk"), chunks=lambda b: [(2**32 - 1, bytes(b[:CHUNK]))])
        lie("chunks missing", (C.ABORTED, "incomplete"), chunks=lambda b: [(0, bytes(b[:CHUNK]))])
        self.send_blob(b"\x00" * 64, self.metadata, True, "tour: zeros")
        for name, blob in sorted(HOSTILE_SAFETENSORS.items()):
            self.send_blob(blob, self.metadata, True, f"tour: hostile safetensors {name}")
        self.seed += 1
        delta = block_delta(self.specs, self.block, self.seed)
        next(iter(delta.values())).view(-1)[7] = math.nan
        self.send_blob(safetensors.torch.save(delta), self.metadata, True, "tour: NaN")


@st.composite
def lying_specs(draw, specs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
    specs = list(specs)
    k = draw(st.integers(0, len(specs) - 1))
    kind = draw(st.sampled_from(["drop", "rename", "reshape", "dtype", "extra", "none"]))
    if kind == "drop":
        del specs[k]
    elif kind == "rename":
        specs[k] = dataclasses.replace(specs[k], name=draw(st.text(max_size=12).filter(lambda s: s != specs[k].name)))
    elif kind == "reshape":
        shape = draw(st.lists(st.integers(-3, 2**40) | I64, max_size=4).map(tuple).filter(lambda s: s != specs[k].shape))
        specs[k] = dataclasses.replace(specs[k], shape=shape)
    elif kind == "dtype":
        specs[k] = dataclasses.replace(specs[k], dtype=draw(st.sampled_from(DTYPE_NAMES[1:]) | st.text(max_size=8)))
    elif kind == "extra":
        specs.append(TensorSpec(draw(st.text(max_size=12).filter(lambda s: s not in {t.name for t in specs})), "float32", (1,)))
    else:
        specs = []
    return tuple(specs)


# ---- the federation tests ----------------------------------------------------------------------------


def snapshot(coordinator) -> tuple:
    g = coordinator.global_model
    tensors = {b: {n: t.clone() for n, t in ts.items()} for b, ts in g.tensors.items()}
    return g.version, dict(g.block_versions), dict(g.block_sha256), tensors


def assert_model_is(coordinator, snap) -> None:
    version, versions, shas, tensors = snap
    g = coordinator.global_model
    assert (g.version, dict(g.block_versions), dict(g.block_sha256)) == (version, versions, shas)
    for b, ts in tensors.items():
        assert all(torch.equal(g.tensors[b][n], t) for n, t in ts.items()), f"block {b} changed"


def counted(coordinator, status: str, reason: str = "") -> float:
    return coordinator.metrics.updates.labels(status, reason)._value.get()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_every_rpc_survives_junk_and_the_run_completes(federation, data_file):
    """Junk to every RPC before the run, then mutated uploads from an assigned worker (and more junk)
    during round 1; the global model stays as it was, and a 2-round run with a real worker completes."""
    assert set(METHODS) == {"Join", "Events", "Heartbeat", "Upload", "UploadStatus", "Abandon", "Download",
                            "FetchModelFiles", "Leave", "Status", "Report", "Log", "Admin"}, "a new RPC: give it a request strategy"
    fed = federation(rounds=2, chunk_size=CHUNK, local_steps=2, lr=1e-3, block_schedule="staggered", min_workers=2,
                     max_update_bytes=1 << 20)  # partial uploads pile up: beyond --upload-slots they go to files
    c = fed.coordinator
    specs = c.specs
    fuzzer = Session(fed.address, "fuzzer")
    fuzzer.join(num_examples=1, device="cpu", timeout=10)
    fed.add_worker(fed.worker_config("real", data_file))
    wait_for(lambda: "real" in c.registry.connected(), 60, "the real worker to join")
    sessions = {w.name: w.session for w in c.registry.all()}
    prober = Prober(fed.address)
    initial = snapshot(c)

    # Phase 1: the gRPC server is up, the run loop not yet; two workers are connected and idle.
    @settings(FUZZ, max_examples=500)
    @given(st.data())
    def before_the_run(data):
        random_call(data, prober, specs, sessions)

    t0 = time.monotonic()
    prober.join_junk()
    before_the_run()
    phase1 = time.monotonic() - t0
    prober.leave_all(c)
    assert prober.call("Status", b"").code == OK and fuzzer.heartbeat(0, 0) == 0, "the coordinator stopped answering"
    assert_model_is(c, initial)
    assert counted(c, "accepted") == 0 and c.totals.updates_accepted == 0
    assert set(c.registry.connected()) == PROTECTED

    # Phase 2: the run starts; round 1 waits for the fuzzer, which sends junk for its assigned block.
    summary: dict = {}
    runner = threading.Thread(target=lambda: summary.update(c.run()), daemon=True)
    events: queue.Queue = queue.Queue()

    def read_events():
        try:
            for event in fuzzer.events():
                events.put(event)
        except grpc.RpcError:
            pass

    threading.Thread(target=read_events, daemon=True).start()
    runner.start()
    deadline = time.monotonic() + 30
    assignment = None
    while assignment is None:
        event = events.get(timeout=max(0.1, deadline - time.monotonic()))
        assignment = event if isinstance(event, Assignment) else None
    assert assignment.round == 1 and len(assignment.blocks) == 1
    with c._cv:
        round1 = {w: b for w, (b,) in c.rounds.plans[1].assignments.items()}
    assert set(round1) == PROTECTED and round1["fuzzer"] != round1["real"]
    up = Upload(prober, specs, assignment.blocks[0], fuzzer._metadata, sessions)

    @settings(FUZZ, max_examples=400)
    @given(st.data())
    def during_round_1(data):
        what = data.draw(st.sampled_from(["stream", "stream", "header", "structure", "garbage", "garbage", "junk"]), label="what")
        if what == "stream":
            up.stream(data)
        elif what == "header":
            up.lying_header(data)
        elif what == "structure":
            up.structure(data)
        elif what == "garbage":
            up.garbage(data)
        else:
            random_call(data, prober, specs, sessions)

    t0 = time.monotonic()
    prober.join_junk()
    up.tour(c.config)
    during_round_1()
    phase2 = time.monotonic() - t0
    prober.leave_all(c)
    assert prober.call("Status", b"").code == OK and fuzzer.heartbeat(0, 0) == 0, "the coordinator stopped answering"
    assert_model_is(c, initial)  # round 1 cannot close while the fuzzer has not delivered
    by_name = {w.name: w for w in c.registry.all()}
    assert by_name["fuzzer"].updates_accepted == 0, "junk was accepted"
    assert all(w.updates_accepted == 0 for n, w in by_name.items() if n not in PROTECTED), "junk was accepted"
    assert counted(c, "accepted") == c.totals.updates_accepted == by_name["real"].updates_accepted
    unreached = {r for r in ("bad_chunk", "incomplete", "hash_mismatch", "malformed", "non_finite", "bad_manifest",
                             "wrong_codec", "unknown_block", "stale_base", "no_weight", "too_large", "not_assigned",
                             "wrong_block") if counted(c, "rejected", r) == 0}
    assert not unreached, f"the fuzzing never reached the rejections {sorted(unreached)}; answers {prober.codes}\n{prober.report()}"

    # The fuzzer's own update, chunks reversed and repeated, in every encoding, still gets in ...
    delta = block_delta(specs, up.block, seed=-1)
    m, blob = pack(delta, up.block)
    chunks = [(i, bytes(v)) for i, v in wire.iter_chunks(blob, CHUNK)]
    chunks = chunks[::-1] + chunks[:3]
    messages = [header_message(m)] + [chunk_message(i, d, CHUNK_STYLES[n % 5]) for n, (i, d) in enumerate(chunks)]
    answer = prober.call("Upload", messages, fuzzer._metadata)
    assert answer.code == OK and pb.UploadReply.FromString(answer.replies[0]).status == "accepted", answer
    # ... then it leaves, and the real worker finishes the run alone.
    fuzzer.leave()
    runner.join(120)
    assert not runner.is_alive(), "the run did not finish"
    fed.threads[0].join(60)
    fuzzer.close()
    assert summary["rounds_completed"] == 2 and summary["updates_accepted"] == 3  # real: 2, fuzzer: 1
    assert fed.outcomes["real"].finished and fed.outcomes["real"].error is None
    assert counted(c, "accepted") == 3
    by_name = {w.name: w.updates_accepted for w in c.registry.all()}
    assert by_name["real"] == 2 and by_name["fuzzer"] == 1 and sum(by_name.values()) == 3
    g = c.global_model
    _, _, _, before = initial
    assert g.block_versions[up.block] == 1 and g.block_versions[round1["real"]] == 1
    for n, t in delta.items():  # the fuzzer's block moved by exactly its one accepted delta
        assert torch.equal(g.tensors[up.block][n], before[up.block][n] + t)
    assert sorted(g.block_versions.values()).count(2) == 1  # the real worker's round-2 block
    for b, version in g.block_versions.items():
        if version == 0:
            assert all(torch.equal(g.tensors[b][n], t) for n, t in before[b].items()), b
    print(f"\nfuzzed {prober.calls} calls: {phase1:.1f} s before the run, {phase2:.1f} s during round 1; "
          f"{up.skipped} garbage blobs skipped as legitimate; answers: "
          + ", ".join(f"{rpc} {code}: {n}" for (rpc, code), n in sorted(prober.codes.items())))
    assert not prober.failures, "the coordinator mishandled junk:\n" + prober.report()


@pytest.mark.parametrize("name", ["a/b", "../../escaped", "x" * 300, "..", "-"])
def test_worker_names_never_reach_the_file_system(federation, tmp_path, name):
    """A name from Join could end up in the file name of an upload held on disk (--upload-slots 0).
    Any name a worker can join under must upload like any other, and nothing may land outside incoming/."""
    fed = federation(rounds=1, chunk_size=CHUNK, train_blocks="head", upload_slots=0, min_workers=1)
    c = fed.coordinator
    session = Session(fed.address, name)
    try:
        session.join(num_examples=1, device="cpu", timeout=10)
    except grpc.RpcError as e:  # refusing such a name at Join is a fine answer too
        assert e.code() == C.INVALID_ARGUMENT, e
        return
    events = session.events()
    runner = threading.Thread(target=c.run, daemon=True)
    runner.start()
    assignment = next(e for e in events if isinstance(e, Assignment))
    prober = Prober(fed.address)
    m, blob = pack(block_delta(c.specs, "head", 1), assignment.blocks[0])
    m = dataclasses.replace(m, chunk_size=64, num_chunks=wire.num_chunks(m.wire_bytes, 64))
    chunks = [chunk_message(i, bytes(d), "wire") for i, d in wire.iter_chunks(blob, 64)]
    prober.send("Upload", [header_message(m), *chunks[:-1]], session._metadata, expect=(C.ABORTED, "incomplete"),
                note="[all chunks but the last]")
    strays = [p for p in tmp_path.rglob("*.part") if c.store.incoming_dir.resolve() not in p.resolve().parents]
    answer = prober.send("Upload", [header_message(m), *chunks], session._metadata, statuses={"accepted"}, note="[complete]")
    session.close()
    c.stop()
    runner.join(30)
    assert not strays, f"worker {name!r}: an upload was written outside {c.store.incoming_dir}: {strays}"
    assert not prober.failures, f"worker {name!r}:\n" + prober.report()
    assert answer.code == OK, answer


# ---- the parsers, directly -----------------------------------------------------------------------------


def varints() -> st.SearchStrategy[bytes]:
    """Varint encodings: canonical, overlong (padded with 0x80), over 64 bits, or cut short."""
    value = st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 127, 128, 2**32 - 1, 2**32, 2**64 - 1])
    return st.one_of(
        value.map(wire._varint),
        st.tuples(value, st.integers(1, 10)).map(lambda vp: bytes(b | 0x80 for b in wire._varint(vp[0])) + b"\x80" * (vp[1] - 1) + b"\x00"),
        st.binary(min_size=1, max_size=11).map(lambda b: bytes(x | 0x80 for x in b)),
        st.integers(2, 127).map(lambda n: b"\xff" * 9 + bytes([n])),
    )


@st.composite
def chunkish(draw, field: int) -> bytes:
    """Bytes shaped like a chunk message: right or wrong outer tag and length, inner fields in any order,
    repeated, unknown, with odd varints."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["index", "data", "unknown", "raw"]))
        if kind == "index":
            parts.append(b"\x08" + draw(varints()))
        elif kind == "data":
            payload = draw(st.binary(max_size=40))
            n = len(payload) + draw(st.sampled_from([0, 0, 0, -1, 1, 2**31]))
            parts.append(b"\x12" + wire._varint(max(n, 0)) + payload)
        elif kind == "unknown":
            parts.append(draw(st.sampled_from([b"\x18\x01", b"\x0a\x00", b"\x78\x05", b"\x10\x01", b"\x0d\x00\x00\x00\x00"])))
        else:
            parts.append(draw(st.binary(max_size=6)))
    inner = b"".join(parts)
    tag = draw(st.sampled_from([field << 3 | 2, field << 3 | 2, 0x0A, 0x1A, 0x12, 0x92]))
    length = draw(st.sampled_from([len(inner)] * 4 + [len(inner) + 1, max(len(inner) - 1, 0), 2**40]))
    return bytes([tag]) + wire._varint(length) + inner + draw(st.sampled_from([b"", b"", b"\x00", b"\x78\x01"]))


FIELDS = st.sampled_from([wire.UPLOAD_CHUNK_FIELD, wire.DOWNLOAD_CHUNK_FIELD])
CHUNK_MESSAGES = {wire.UPLOAD_CHUNK_FIELD: pb.UploadMessage, wire.DOWNLOAD_CHUNK_FIELD: pb.DownloadMessage}


@settings(PURE, max_examples=2000)
@given(data=st.data(), field=FIELDS)
def test_parse_chunk_message_never_raises_and_agrees_with_protobuf(data, field):
    """Whatever the bytes, the chunk parser answers a chunk or None (then protobuf parses); when it
    answers a chunk, protobuf reads the very same chunk from those bytes."""
    valid = st.builds(wire.encode_chunk_message, st.just(field), U32, st.binary(max_size=64))
    raw = data.draw(st.one_of(st.binary(max_size=80), chunkish(field), valid.flatmap(mutated)))
    got = wire.parse_chunk_message(raw, field)
    if got is None:
        return
    message = CHUNK_MESSAGES[field].FromString(raw)
    assert message.WhichOneof("kind") == "chunk"
    assert (got.index, bytes(got.data), got.size) == (message.chunk.index, message.chunk.data, len(raw))


@settings(PURE, max_examples=1000)
@given(index=U32, payload=st.binary(max_size=3000), field=FIELDS)
@example(index=2**32 - 1, payload=bytes(1 << 20), field=wire.UPLOAD_CHUNK_FIELD)
@example(index=0, payload=b"", field=wire.DOWNLOAD_CHUNK_FIELD)
def test_chunk_messages_are_protobufs_bytes(index, payload, field):
    """encode_chunk_message writes what protobuf writes; parse_chunk_message reads what protobuf writes."""
    expected = CHUNK_MESSAGES[field](chunk=pb.Chunk(index=index, data=payload)).SerializeToString()
    assert wire.encode_chunk_message(field, index, payload) == expected
    assert wire.encode_chunk_message(field, index, memoryview(payload)) == expected
    got = wire.parse_chunk_message(expected, field)
    assert got is not None and (got.index, bytes(got.data), got.size) == (index, payload, len(expected))
    assert wire.parse_chunk_message(expected, wire.UPLOAD_CHUNK_FIELD + wire.DOWNLOAD_CHUNK_FIELD - field) is None


def touch(tensors, meta) -> None:
    """Read every loaded element: views must lie inside the blob (a bad one crashes the interpreter)."""
    assert isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    for t in tensors.values():
        assert isinstance(t, torch.Tensor)
        t.double().sum()


ST_TORCH = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
            torch.int8, torch.uint8, torch.bool]


TENSOR_NAMES = st.text(min_size=1, max_size=10)


@st.composite
def tensor_dicts(draw, names=TENSOR_NAMES) -> dict:
    out = {}
    for name in draw(st.lists(names.filter(lambda s: s != "__metadata__"), max_size=4, unique=True)):
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
        values = torch.randint(-100, 100, shape, generator=gen)
        dtype = draw(st.sampled_from(ST_TORCH))
        out[name] = (values % 2 if dtype == torch.bool else values).to(dtype)
    return out


def valid_safetensors(names=TENSOR_NAMES) -> st.SearchStrategy[bytes]:
    meta = st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)
    return st.builds(lambda t, m: safetensors.torch.save(t, metadata=m), tensor_dicts(names), meta)


SAFETENSORS_JUNK = st.one_of(
    st.binary(max_size=200),
    safetensors_like(),
    valid_safetensors().flatmap(mutated),
    # mutated hostile headers (the huge ones are tested as they are, below)
    st.sampled_from([b for b in HOSTILE_SAFETENSORS.values() if len(b) < 1000]).flatmap(mutated),
)


@settings(PURE, max_examples=1000)
@given(blob=SAFETENSORS_JUNK)
def test_load_safetensors_refuses_junk_with_codec_error_only(blob):
    for buffer in (bytearray(blob), bytes(blob)):  # no-copy path (writable) and copying path (read-only)
        try:
            tensors, meta = load_safetensors(buffer)
        except CodecError:
            continue
        touch(tensors, meta)


@pytest.mark.parametrize("name", sorted(HOSTILE_SAFETENSORS))
def test_load_safetensors_refuses_hostile_headers_with_codec_error_only(name):
    for buffer in (bytearray(HOSTILE_SAFETENSORS[name]), HOSTILE_SAFETENSORS[name]):
        try:
            touch(*load_safetensors(buffer))
        except CodecError:
            pass


@settings(PURE, max_examples=200)
@given(tensors=tensor_dicts(), meta=st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_load_safetensors_round_trips_what_safetensors_writes(tensors, meta):
    if not tensors and meta == {}:
        meta = None  # safetensors 0.8 writes '{},"__metadata__":{}}' for that: its own bug, not ours
    blob = safetensors.torch.save(tensors, metadata=meta)
    for buffer in (bytearray(blob), blob):
        got, got_meta = load_safetensors(buffer)
        assert got_meta == (meta or {})
        assert got.keys() == tensors.keys()
        for n, t in tensors.items():
            assert got[n].dtype == t.dtype and got[n].shape == t.shape and torch.equal(got[n], t), n


DECODE_SPECS = [TensorSpec("w", "float32", (4, 3)), TensorSpec("b", "float32", (3,))]
STAGE_NAMES = st.sampled_from(["w", "b"]).flatmap(lambda n: st.sampled_from([n, n + "::q", n + "::scale", n + "::idx", n + "::val", n + "::shuf"]))
TORCH_DTYPE_NAMES = ["float32", "float16", "bfloat16", "float64", "int8", "int32", "int64", "uint8", "bool", "complex64",
                     "qint8", "quint4x2", "float8_e4m3fn", "uint16", "bits8", "Tensor", "__class__", "float"]


@st.composite
def stage_blobs(draw) -> bytes:
    """What a codec stage decodes: tensors named like stage outputs, with random dtypes and shapes, and
    shuffle metadata naming any torch attribute as the dtype."""
    tensors = draw(tensor_dicts(STAGE_NAMES))
    meta = {}
    for base in draw(st.lists(st.sampled_from(["w", "b"]), max_size=2, unique=True)):
        info = {"dtype": draw(st.sampled_from(TORCH_DTYPE_NAMES)), "shape": draw(st.lists(st.integers(-1, 13), max_size=3))}
        meta[base] = json.dumps(info) if draw(st.integers(0, 5)) else draw(st.text(max_size=10))
    return safetensors.torch.save(tensors, metadata=meta or None)


PIPELINES = ["none", "shuffle", "int8", "topk:0.5", "int8,shuffle", "bf16,shuffle,zstd:1", "zstd:1"]


@settings(PURE, max_examples=800)
@given(spec=st.sampled_from(PIPELINES), data=st.data())
def test_codec_decode_refuses_junk_with_codec_error_only(spec, data):
    """The coordinator turns a ValueError from decode into a refusal ("malformed"); anything else would
    escape its handler."""
    codec = CodecPipeline(spec)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32)))
    good = codec.encode("blk", {s.name: torch.randn(s.shape, generator=gen) for s in DECODE_SPECS})
    blob = data.draw(st.one_of(st.just(good).flatmap(mutated), stage_blobs(), SAFETENSORS_JUNK))
    if spec.endswith("zstd:1") and data.draw(st.booleans()):
        blob = zstandard.ZstdCompressor(level=1).compress(blob)  # so that junk reaches the inner stages
    try:
        out = codec.decode(bytearray(blob), DECODE_SPECS)
    except CodecError:
        return
    assert {n: (t.dtype, tuple(t.shape)) for n, t in out.items()} == {s.name: (torch.float32, s.shape) for s in DECODE_SPECS}


def _shuffled(dtype: str, shape: list, planes: torch.Tensor) -> bytes:
    return safetensors.torch.save({"w::shuf": planes, "b::shuf": torch.zeros(4, 3, dtype=torch.uint8)},
                                  metadata={"w": json.dumps({"dtype": dtype, "shape": shape}),
                                            "b": json.dumps({"dtype": "float32", "shape": [3]})})


HOSTILE_STAGES = {  # (pipeline, what a stage decodes), each a reason a stage decoder could fall over
    "int8 rows of an empty tensor": ("int8", lambda: safetensors.torch.save({
        "w::q": torch.zeros((0, 3), dtype=torch.int8), "w::scale": torch.zeros(0),
        "b::q": torch.zeros(3, dtype=torch.int8), "b::scale": torch.zeros(1)})),
    "int8 of a 0-dim tensor": ("int8", lambda: safetensors.torch.save({
        "w::q": torch.zeros((), dtype=torch.int8), "w::scale": torch.zeros(1), "b": torch.zeros(3)})),
    "shuffle to a negative shape": ("shuffle", lambda: _shuffled("float32", [-4, -3], torch.zeros(4, 12, dtype=torch.uint8))),
    "shuffle to an overflowing shape": ("shuffle", lambda: _shuffled("float32", [2**40, 2**40, 0], torch.zeros(4, 0, dtype=torch.uint8))),
    "shuffle to a quantized dtype": ("shuffle", lambda: _shuffled("qint8", [4, 3], torch.zeros(1, 12, dtype=torch.uint8))),
    "shuffle to a non-dtype": ("shuffle", lambda: _shuffled("Tensor", [4, 3], torch.zeros(4, 12, dtype=torch.uint8))),
    "topk with 2-d indices": ("topk:0.5", lambda: safetensors.torch.save({
        "w::idx": torch.zeros(1, 2, dtype=torch.int32), "w::val": torch.zeros(1, 2),
        "b::idx": torch.zeros(0, dtype=torch.int32), "b::val": torch.zeros(0)})),
    "topk index out of range": ("topk:0.5", lambda: safetensors.torch.save({
        "w::idx": torch.full((2,), 200, dtype=torch.uint8), "w::val": torch.zeros(2),
        "b::idx": torch.full((1,), -1, dtype=torch.int64), "b::val": torch.zeros(1)})),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch on quantized dtypes
@pytest.mark.parametrize("name", sorted(HOSTILE_STAGES))
def test_codec_decode_refuses_hostile_stage_tensors_with_codec_error_only(name):
    spec, make = HOSTILE_STAGES[name]
    try:
        out = CodecPipeline(spec).decode(bytearray(make()), DECODE_SPECS)
    except CodecError:
        return
    assert {n: (t.dtype, tuple(t.shape)) for n, t in out.items()} == {s.name: (torch.float32, s.shape) for s in DECODE_SPECS}


def _zstd_declaring(size: int) -> bytes:
    """A zstd frame holding 100 bytes whose header declares `size` bytes of content."""
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"x" * 100)
    assert frame[4] == 0x20  # single segment, 1-byte content size: widen it to 8 bytes
    return frame[:4] + bytes([0xE0]) + struct.pack("<Q", size) + frame[6:]


ZSTD_BOMBS = {
    "declares 2^62 bytes": lambda: _zstd_declaring(1 << 62),
    "declares 2^40 bytes": lambda: _zstd_declaring(1 << 40),
    "64 MiB of zeros in 2 KB": lambda: zstandard.ZstdCompressor(level=1).compress(bytes(64 << 20)),
}


@pytest.mark.parametrize("name", sorted(ZSTD_BOMBS))
def test_zstd_decode_stays_within_its_output_bound(name):
    """decode bounds decompression by the block's expected size (a few MiB here): a frame that declares
    or holds far more is refused with CodecError, without allocating it."""
    blob = ZSTD_BOMBS[name]()
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            CodecPipeline("zstd").decode(bytearray(blob), DECODE_SPECS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"decoding {len(blob)} bytes allocated {peak / 2**20:.0f} MiB"
