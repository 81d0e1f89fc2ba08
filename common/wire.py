"""Tensor transfers on the wire: pack a block into a manifest + blob, cut it into chunks, put it back.

The blob is what a codec pipeline produced (safetensors bytes, maybe compressed). It travels in chunks
of at most `chunk_size` bytes; the manifest carries the blob's SHA-256, checked once all chunks are in.
`Assembly` accepts chunks in any order and any number of times (resumed uploads resend some), keeps
them in memory or in a mapped file, and hashes them as they arrive. The bulk of every transfer, the
chunk messages, is written and read here without protobuf's copies (same bytes on the wire).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from torch import Tensor

from .codecs import CodecPipeline, CodecState
from .messages import Manifest, TaskTimings, TensorSpec

GRPC_FRAME_OVERHEAD = 5  # gRPC length-prefixed message header; counted in wire byte metrics
DEFAULT_CHUNK_SIZE = 1 << 20


class IntegrityError(ValueError):
    """Chunks do not fit the manifest, or the assembled blob does not hash to it."""


class AssemblyClosed(IntegrityError):
    """A chunk came for an assembly already closed (its upload was discarded meanwhile)."""


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def num_chunks(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def iter_chunks(blob: bytes, chunk_size: int, skip: frozenset[int] = frozenset()) -> Iterator[tuple[int, memoryview]]:
    """(index, view) for every chunk of `blob` not in `skip`; views, not copies."""
    view = memoryview(blob)
    for index in range(num_chunks(len(blob), chunk_size)):
        if index not in skip:
            yield index, view[index * chunk_size : (index + 1) * chunk_size]


def pack(block: str, tensors: Mapping[str, Tensor], codec: CodecPipeline, **fields) -> tuple[Manifest, bytes]:
    """Encode one block's tensors, advancing the codec's state, and describe the result (the fields
    are `pack_pending`'s): for senders that never resend."""
    manifest, blob, state = pack_pending(block, tensors, codec, **fields)
    codec.commit(state)
    return manifest, blob


def pack_pending(
    block: str,
    tensors: Mapping[str, Tensor],
    codec: CodecPipeline,
    *,
    round: int,
    base_version: int,
    chunk_size: int,
    num_tokens: int = 0,
    train_loss: float = float("nan"),
    timings: TaskTimings | None = None,
) -> tuple[Manifest, bytes, CodecState]:
    """`pack` without advancing the codec's state: pass the state to `codec.commit` once the receiver
    has the blob. The manifest lists the decoded tensors."""
    blob, state = codec.encode_pending(block, tensors)
    specs = tuple(TensorSpec(n, "float32", tuple(t.shape)) for n, t in tensors.items())
    manifest = Manifest(
        round=round,
        block=block,
        base_version=base_version,
        tensors=specs,
        codec=codec.spec,
        raw_bytes=sum(t.numel() * 4 for t in tensors.values()),
        wire_bytes=len(blob),
        blob_sha256=sha256(blob),
        chunk_size=chunk_size,
        num_chunks=num_chunks(len(blob), chunk_size),
        num_tokens=num_tokens,
        train_loss=train_loss,
        timings=timings,
    )
    return manifest, blob, state


def check_manifest_shape(manifest: Manifest, max_chunk_size: int, max_bytes: int) -> None:
    """Structural checks of a manifest before any chunk is accepted."""
    if not 0 < manifest.chunk_size <= max_chunk_size:
        raise IntegrityError(f"chunk_size {manifest.chunk_size} outside 1..{max_chunk_size}")
    if not 0 < manifest.wire_bytes <= max_bytes:
        raise IntegrityError(f"wire_bytes {manifest.wire_bytes} outside 1..{max_bytes}")
    if manifest.num_chunks != num_chunks(manifest.wire_bytes, manifest.chunk_size):
        raise IntegrityError(
            f"num_chunks {manifest.num_chunks} does not match {manifest.wire_bytes} bytes in chunks of {manifest.chunk_size}"
        )
    if len(manifest.blob_sha256) != 32:
        raise IntegrityError("blob_sha256 must be 32 bytes")


class BufferPool:
    """Anonymous memory for blobs, kept warm for the next one.

    Copying into fresh pages costs a page fault and the kernel's zeroing for every 4 KiB, which made
    receiving a block several times slower than the network; a buffer used before costs a plain copy.
    At most `keep` free buffers are kept; a buffer serves any blob up to its size.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            fits = [b for b in self._free if size <= len(b) <= 2 * size]
            if fits:
                best = min(fits, key=len)
                self._free.remove(best)
                return best
        return mmap.mmap(-1, size)

    def give(self, buffer: mmap.mmap) -> None:
        """Return a buffer nobody reads any more."""
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=len)
            while len(self._free) > self.keep:
                self._free.pop(0)  # the smallest go first; an unmapped buffer dies with its last reference


class RunningHash:
    """SHA-256 of pieces fed in order. `threaded`: computed on a thread of its own (hashlib releases
    the GIL), so that receiving the next chunk does not wait for it; the pieces must stay valid until
    hashed (views of a buffer that lives on)."""

    def __init__(self, threaded: bool):
        self._sha = hashlib.sha256()
        self._stopped = False
        self._queue: queue.Queue | None = None
        if threaded:
            self._queue = queue.Queue(maxsize=64)  # bounded: a slow hash holds back receiving
            self._thread = threading.Thread(target=self._run, daemon=True, name="hash")
            self._thread.start()

    def _run(self) -> None:
        while (piece := self._queue.get()) is not None:
            self._sha.update(piece)

    def feed(self, piece) -> None:
        if self._stopped:  # nobody reads the queue any more: a put could block forever
            raise RuntimeError("hash already stopped")
        if self._queue is None:
            self._sha.update(piece)
        else:
            self._queue.put(piece)

    def digest(self) -> bytes:
        """The hash of everything fed (no more may be fed after)."""
        self.stop()
        if self._queue is not None:
            self._thread.join()
        return self._sha.digest()

    def stop(self) -> None:
        if self._queue is not None and not self._stopped:
            self._queue.put(None)
        self._stopped = True


class Assembly:
    """Collects the chunks of one blob: in memory, or written to the file `path` (so that a coordinator's
    memory does not grow with the number of uploads in progress; the file is only mapped to read it once
    it is complete)."""

    def __init__(self, manifest: Manifest, path: Path | None = None, pool: BufferPool | None = None):
        self.manifest = manifest
        self.path = path
        self._held: set[int] = set()
        self._closed = False
        self._lock = threading.Lock()  # close() may come from another thread (its round closed)
        # In memory the hash runs on its own thread over views of the buffer; for a file it runs inline
        # over each chunk as it comes (a queue would keep chunks alive: memory growing with uploads).
        self._hash = RunningHash(threaded=path is None)
        self._hashed_upto = 0  # chunks [0, _hashed_upto) are fed to the hash
        self._fd = -1
        self._blob = None  # the whole blob, once complete
        self._buffer: memoryview | None = None
        self.memory: mmap.mmap | None = None  # the memory buffer, to give back to its pool when done
        if path is None:
            # Anonymous memory (from the pool when there is one), not bytearray(n), which would zero
            # every byte first: a whole extra pass.
            self.memory = pool.take(manifest.wire_bytes) if pool else mmap.mmap(-1, manifest.wire_bytes)
            self._buffer = memoryview(self.memory)[: manifest.wire_bytes]
        else:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(self._fd, manifest.wire_bytes)

    @property
    def held(self) -> frozenset[int]:
        return frozenset(self._held)

    @property
    def complete(self) -> bool:
        return len(self._held) == self.manifest.num_chunks

    def missing(self) -> list[int]:
        return [i for i in range(self.manifest.num_chunks) if i not in self._held]

    def _span(self, index: int) -> tuple[int, int]:
        m = self.manifest
        start = index * m.chunk_size
        return start, min(start + m.chunk_size, m.wire_bytes)

    def add(self, index: int, data: bytes | memoryview) -> None:
        """Store chunk `index`; a chunk already held is checked for size and ignored."""
        with self._lock:
            self._add(index, data)

    def _add(self, index: int, data: bytes | memoryview) -> None:
        if self._closed:  # its file is gone, or its buffer may already serve another upload
            raise AssemblyClosed("upload already closed")
        if not 0 <= index < self.manifest.num_chunks:
            raise IntegrityError(f"chunk index {index} outside 0..{self.manifest.num_chunks - 1}")
        start, end = self._span(index)
        if len(data) != end - start:
            raise IntegrityError(f"chunk {index} has {len(data)} bytes, expected {end - start}")
        if index in self._held:
            return
        if self._buffer is not None:
            self._buffer[start:end] = data
        else:
            os.pwrite(self._fd, data, start)
        self._held.add(index)
        # Hash while chunks arrive in order; chunks that came early join once the gap before them is
        # filled (in memory) or when the blob is complete (in a file).
        while self._hashed_upto in self._held and (self._buffer is not None or index == self._hashed_upto):
            a, b = self._span(self._hashed_upto)
            self._hash.feed(self._buffer[a:b] if self._buffer is not None else data)
            self._hashed_upto += 1

    def blob(self) -> memoryview | mmap.mmap:
        """The complete blob, not yet verified, not a copy: the memory buffer or a private map of the
        file (writable, so tensors can be views of it). Raises IntegrityError when chunks are missing."""
        if not self.complete:
            missing = self.manifest.num_chunks - len(self._held)
            raise IntegrityError(f"{missing} of {self.manifest.num_chunks} chunks missing")
        with self._lock:
            return self._map_blob()

    def _map_blob(self) -> memoryview | mmap.mmap:
        if self._blob is None:
            if self._closed:
                raise AssemblyClosed("upload closed before it was read")
            if self._buffer is None and self._fd < 0:  # suspended: open its file again
                self._fd = os.open(self.path, os.O_RDWR)
            self._blob = self._buffer if self._buffer is not None else mmap.mmap(
                self._fd, self.manifest.wire_bytes, access=mmap.ACCESS_COPY
            )
            view = memoryview(self._blob)
            while self._hashed_upto in self._held:  # chunks that came out of order (file)
                a, b = self._span(self._hashed_upto)
                self._hash.feed(view[a:b])
                self._hashed_upto += 1
        return self._blob

    def suspend(self) -> None:
        """A checked blob that waits (in a file): give up its descriptors, keep the file; `blob` maps it
        again. The map goes with the last reference to it: tensors decoded from it keep it valid (it is
        never closed under them: torch.frombuffer does not hold a buffer export that would forbid it)."""
        with self._lock:
            if self.path is None or self._closed:
                return
            self._blob = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def verify(self) -> None:
        """Wait for the hash of the whole blob; IntegrityError if it is not the manifest's."""
        self.blob()
        if self._hash.digest() != self.manifest.blob_sha256:
            raise IntegrityError("blob SHA-256 does not match the manifest (corrupted chunk)")

    def finish(self) -> memoryview | mmap.mmap:
        """The verified blob (see `blob`). Raises IntegrityError when chunks are missing or the hash is wrong."""
        blob = self.blob()
        self.verify()
        return blob

    def close(self, remove: bool = True) -> None:
        """Release the file and the hashing thread (tensors that view the blob keep their memory);
        `add` fails from now on, and so does `blob` if it was not read before."""
        with self._lock:
            self._closed = True
            self._hash.stop()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if self._buffer is None:
                self._blob = None  # a file's map (and its descriptor) goes with the last tensor that views it
            if remove and self.path is not None:
                self.path.unlink(missing_ok=True)


def check_specs(manifest_specs: Sequence[TensorSpec], expected: Sequence[TensorSpec]) -> None:
    """The manifest must list exactly the block's tensors with their shapes (dtype float32 on the wire)."""
    got = {s.name: s for s in manifest_specs}
    want = {s.name: s for s in expected}
    if set(got) != set(want):
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        raise IntegrityError(f"wrong tensor set: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, spec in want.items():
        if tuple(got[name].shape) != tuple(spec.shape):
            raise IntegrityError(f"{name}: shape {tuple(got[name].shape)} != {tuple(spec.shape)}")
        if got[name].dtype != "float32":
            raise IntegrityError(f"{name}: dtype {got[name].dtype} (deltas travel as float32 before the codec)")


# ---- chunk messages without protobuf copies --------------------------------------------------------
#
# A chunk is the bulk of every transfer. Protobuf's Python runtime copies its payload twice on each
# side (into the message, out of the message). These functions write and read exactly the bytes that
# protobuf would (an UploadMessage or DownloadMessage whose oneof holds a Chunk), with one copy when
# writing and none when reading. Anything that is not a plain chunk message is left to protobuf.

UPLOAD_CHUNK_FIELD = 2  # UploadMessage.chunk
DOWNLOAD_CHUNK_FIELD = 3  # DownloadMessage.chunk


class RawChunk(NamedTuple):
    index: int
    data: memoryview  # a view of the received message: no copy
    size: int  # serialized size of the whole message


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def encode_chunk_message(field: int, index: int, data: bytes | memoryview) -> bytes:
    """The protobuf encoding of a message whose field `field` is Chunk{index, data}."""
    # proto3 leaves out fields holding their default (index 0, empty data)
    inner = (b"\x08" + _varint(index) if index else b"") + (b"\x12" + _varint(len(data)) if len(data) else b"")
    return b"".join((bytes([field << 3 | 2]), _varint(len(inner) + len(data)), inner, data))


def parse_chunk_message(raw: bytes, field: int) -> RawChunk | None:
    """Read Chunk{index, data} out of a serialized message whose only field is `field`; None when the
    message is anything else (the caller then parses it with protobuf)."""
    try:
        if not raw or raw[0] != (field << 3 | 2):
            return None
        length, pos = _read_varint(raw, 1)
        if pos + length != len(raw):
            return None
        index, data = 0, memoryview(b"")
        while pos < len(raw):
            tag = raw[pos]
            pos += 1
            if tag == 0x08:
                index, pos = _read_varint(raw, pos)
                if index >= 1 << 32:
                    return None
            elif tag == 0x12:
                n, pos = _read_varint(raw, pos)
                if pos + n > len(raw):
                    return None
                data = memoryview(raw)[pos : pos + n]
                pos += n
            else:
                return None
        return RawChunk(index, data, len(raw))
    except ValueError:
        return None
