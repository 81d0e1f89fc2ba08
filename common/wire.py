"""Tensor transfers on the wire: pack a block into a manifest + blob, cut it into chunks, put it back.

The blob is what a codec pipeline produced (safetensors bytes, maybe compressed). It travels in chunks
of at most `chunk_size` bytes; the manifest carries the blob's SHA-256, checked once all chunks are in.
`Assembly` accepts chunks in any order and any number of times (resumed uploads resend some), keeps
them in memory or in a file (so a coordinator's memory does not grow with concurrent uploads), and
hashes incrementally while chunks arrive in order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from torch import Tensor

from .codecs import CodecPipeline
from .messages import Manifest, TensorSpec

GRPC_FRAME_OVERHEAD = 5  # gRPC length-prefixed message header; counted in wire byte metrics
DEFAULT_CHUNK_SIZE = 1 << 20


class IntegrityError(ValueError):
    """Chunks do not fit the manifest, or the assembled blob does not hash to it."""


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


def pack(
    block: str,
    tensors: Mapping[str, Tensor],
    codec: CodecPipeline,
    *,
    round: int,
    base_version: int,
    chunk_size: int,
    num_tokens: int = 0,
    train_loss: float = float("nan"),
) -> tuple[Manifest, bytes]:
    """Encode one block's tensors and describe the result. The manifest lists the decoded tensors."""
    blob = codec.encode(block, tensors)
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
    )
    return manifest, blob


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


class Assembly:
    """Collects the chunks of one blob, in memory or in the file `path`."""

    def __init__(self, manifest: Manifest, path: Path | None = None):
        self.manifest = manifest
        self.path = path
        self._held: set[int] = set()
        self._hasher = hashlib.sha256()
        self._hashed_upto = 0  # chunks [0, _hashed_upto) are in the running hash
        if path is None:
            self._buffer: bytearray | None = bytearray(manifest.wire_bytes)
            self._fd = -1
        else:
            self._buffer = None
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

    def _expected_len(self, index: int) -> int:
        m = self.manifest
        return min(m.chunk_size, m.wire_bytes - index * m.chunk_size)

    def add(self, index: int, data: bytes | memoryview) -> None:
        """Store chunk `index`; a chunk already held is checked for size and ignored."""
        if not 0 <= index < self.manifest.num_chunks:
            raise IntegrityError(f"chunk index {index} outside 0..{self.manifest.num_chunks - 1}")
        if len(data) != self._expected_len(index):
            raise IntegrityError(f"chunk {index} has {len(data)} bytes, expected {self._expected_len(index)}")
        if index in self._held:
            return
        offset = index * self.manifest.chunk_size
        if self._buffer is not None:
            self._buffer[offset : offset + len(data)] = data
        else:
            os.pwrite(self._fd, data, offset)
        self._held.add(index)
        if index == self._hashed_upto:  # the common case: chunks in order, hash on the fly
            self._hasher.update(data)
            self._hashed_upto += 1
            while self._hashed_upto in self._held and self._buffer is not None:
                # out-of-order chunks already in memory can join the running hash now
                start = self._hashed_upto * self.manifest.chunk_size
                self._hasher.update(memoryview(self._buffer)[start : start + self._expected_len(self._hashed_upto)])
                self._hashed_upto += 1

    def read(self) -> bytes | bytearray:
        if self._buffer is not None:
            return self._buffer
        return os.pread(self._fd, self.manifest.wire_bytes, 0)

    def finish(self) -> bytes | bytearray:
        """The verified blob. Raises IntegrityError when chunks are missing or the hash is wrong."""
        if not self.complete:
            raise IntegrityError(f"{len(self.missing())} of {self.manifest.num_chunks} chunks missing")
        blob = self.read()
        if self._hashed_upto == self.manifest.num_chunks:
            digest = self._hasher.digest()
        else:
            digest = sha256(blob)
        if digest != self.manifest.blob_sha256:
            raise IntegrityError("blob SHA-256 does not match the manifest (corrupted chunk)")
        return blob

    def close(self, remove: bool = True) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if remove and self.path is not None:
                self.path.unlink(missing_ok=True)
        self._buffer = None


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
