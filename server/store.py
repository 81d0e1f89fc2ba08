"""The coordinator's state directory: global model blocks, checkpoints, run identity, summary, export.

Layout of `--state-dir`:

    run.json                      what this run is (model, algorithm, blocks, state format); a restart
                                  must match it
    initial.json                  canonical SHA-256 of each block of the initial model
    model/                        config.json and tokenizer files (what workers fetch; what export copies)
    blocks/<block>@<version>.safetensors   one file per block version, written once
    blocks/<block>@<version>.safetensors.<codec>.blob   that version as --download-codec encodes it
                                  (a cache: made at its first download, removed with its block file)
    checkpoints/round-000012.json block versions + SHA-256 of each block file, registry, counters
    evaluations.json              the evaluations so far (also in each checkpoint, up to its round)
    incoming/                     partial uploads (chunks land here, not in memory)
    summary.json                  written at the end of a run
    export/                       the final model as a Hugging Face folder (default export place)

Every file is written atomically (temporary file, fsync, rename, fsync of the directory), so a crash at
any point leaves the previous checkpoint intact. A checkpoint only references block files that were
complete before it was written; loading verifies each file's hash. Only blocks that changed in a round
are written, so a checkpoint costs in proportion to what changed.

The global model is a `StoredModel`: its blocks are read from their block files when asked (views of a
private map of the file, checked against its hash, unmapped once dropped), so the coordinator holds in
memory only the blocks it is working on, whatever the model's size. The export is written shard by
shard, one block at a time.

Block files that a download (or an evaluation) is reading are pinned: pruning leaves them until it ends.
With `keep_base`, the base model's block files (version 0) are never pruned: an algorithm that hands
workers base values (FedCyBGD's --download-fraction) serves them all run long.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import itertools
import json
import logging
import math
import mmap
import os
import re
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import safetensors.torch
import torch
from torch import Tensor

from ..common import adapters
from ..common.adapters import LoraSettings
from ..common.codecs import load_safetensors
from ..common.config import ConfigError

log = logging.getLogger("fedblock.store")

Tensors = dict[str, Tensor]
_CKPT = re.compile(r"round-(\d{6})\.json$")
EXPORT_MARKER = ".fedblock-export"  # in every export folder: only such a folder is ever replaced
# The layout version of a state dir. 2 added the algorithm's state to checkpoints (a zeroth-order log)
# and seeds to plans; a format-1 dir (no "format" in run.json) holds a block method's run, which
# format 2 reads as it is.
STATE_FORMAT = 2


class StateError(RuntimeError):
    """The state directory is unusable (corrupt, or belongs to a different run)."""


class BlockFileMissing(StateError):
    """A block file that a checkpoint names is not on disk (pruned, or removed by someone)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file to write `path` through: it replaces `path` (fsynced) only when the block ends without an
    exception; otherwise it is removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


# ---- safetensors, streamed -------------------------------------------------------------------------

_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_HEADER_LIMIT = 100 << 20  # no safetensors file we read (blocks, model weights) has a larger header


@dataclass(frozen=True)
class TensorLayout:
    """One tensor of a safetensors file, before its values are at hand."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def safetensors_order(layout: Iterable[TensorLayout]) -> list[TensorLayout]:
    """The order safetensors lays tensors out in (widest elements first, then by name), which keeps
    every tensor aligned; with it a streamed file of one dtype (a block) is byte for byte what
    `safetensors.torch.save` writes."""
    return sorted(layout, key=lambda t: (-torch.empty((), dtype=t.dtype).element_size(), t.name))


def write_safetensors(f: BinaryIO, layout: list[TensorLayout], tensors: Iterable[tuple[str, Tensor]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file of `layout` (in that order) to `f`, its values streamed from `tensors`
    ((name, tensor) in the same order), each written from its own memory: no copy of the file is
    ever made. Raises ValueError when a tensor is not the one the layout says comes next."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in layout:
        header[t.name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors pads it
    f.write(len(encoded).to_bytes(8, "little") + encoded)
    stream = iter(tensors)
    for want in layout:
        name, t = next(stream, (None, None))
        if t is None or name != want.name or t.dtype != want.dtype or tuple(t.shape) != want.shape:
            got = "nothing" if t is None else f"{name} {t.dtype} {tuple(t.shape)}"
            raise ValueError(f"expected tensor {want.name} {want.dtype} {want.shape} next, got {got}")
        if want.nbytes:  # (little-endian, as safetensors wants it, on every machine we run on)
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        t = None  # a view of a block file's map keeps all of it mapped: not while the next is read


class _Hashing:
    """A file whose bytes are hashed (SHA-256) as they are written."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> None:
        self.sha.update(data)
        self.f.write(data)


class SafetensorsFile:
    """A safetensors file's tensors by name, from its header, each read on its own into fresh memory
    (never mapped: what was read goes when the caller drops it). StateError for a malformed file."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= _HEADER_LIMIT:
                raise StateError(f"{self.path.name} is not a safetensors file (header length {size})")
            raw = f.read(size)
        inverse = {v: k for k, v in _DTYPE_NAMES.items()}
        try:
            header = json.loads(raw)
            header.pop("__metadata__", None)
            entries = sorted(header.items(), key=lambda item: int(item[1]["data_offsets"][0]))
            self.tensors = {n: TensorLayout(n, inverse[e["dtype"]], tuple(int(d) for d in e["shape"])) for n, e in entries}
            self._offsets = {n: 8 + size + int(e["data_offsets"][0]) for n, e in entries}
            bad = [n for n, e in entries if int(e["data_offsets"][1]) - int(e["data_offsets"][0]) != self.tensors[n].nbytes]
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise StateError(f"{self.path.name} has a malformed safetensors header ({type(e).__name__}: {e})") from None
        if bad:
            raise StateError(f"{self.path.name}: the offsets of {bad[0]} do not fit its shape")

    def read(self, name: str) -> Tensor:
        spec = self.tensors[name]
        out = torch.empty(spec.shape, dtype=spec.dtype)
        view, done = memoryview(out.reshape(-1).view(torch.uint8).numpy()), 0
        with open(self.path, "rb", buffering=0) as f:
            while done < spec.nbytes:  # one call reads at most about 2 GB
                n = os.preadv(f.fileno(), [view[done:]], self._offsets[name] + done)
                if n <= 0:
                    raise StateError(f"{self.path.name} ends inside tensor {name}")
                done += n
        return out


@dataclass
class Checkpoint:
    round: int
    block_versions: dict[str, int]
    block_sha256: dict[str, str]
    workers: dict[str, int] = field(default_factory=dict)  # name -> join index
    counters: dict[str, float] = field(default_factory=dict)  # bytes, updates, wall time so far
    eval_history: list[list[float]] = field(default_factory=list)  # [round, loss]
    round_history: list[dict] = field(default_factory=list)  # per round: timing, updates, bytes
    plans: list[dict] = field(default_factory=list)  # the open rounds' plans (RoundPlan.to_record)
    present: list[str] = field(default_factory=list)  # workers connected when it was written
    algorithm: dict = field(default_factory=dict)  # the algorithm's own state (Algorithm.state)


class Pin:
    """Block files held on disk for one reader until `release()`; releasing again does nothing."""

    def __init__(self, store: StateStore, names: tuple[str, ...]):
        self._store = store
        self.names = names
        self.released = False

    def release(self) -> None:
        self._store._unpin(self)

    def __enter__(self) -> Pin:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class StoredModel(Mapping[str, Tensors]):
    """One version of the global model, block -> tensors, whose blocks are read from their block files
    when asked (`StateStore.read_block`: hash-checked views of a private map of the file, unmapped once
    the caller drops them). Only the blocks someone is using are in memory, and each access reads the
    file again: a caller that reads a block twice keeps what it read.

    Blocks `held` are in memory instead, and returned as they are: a records algorithm's replica, which
    it moves on in place (its files are written only now and then). The tensors of a file-backed block
    may be changed by whoever got them without changing the file or the model (the map is private),
    but a held block's change is the model's.

    A version stays readable while its block files are kept: the last checkpoints name them, or a pin
    holds them (`snapshot`). A file that is gone raises BlockFileMissing."""

    def __init__(self, store: StateStore, versions: Mapping[str, int], shas: Mapping[str, str],
                 held: Mapping[str, Tensors] | None = None, pin: Pin | None = None):
        self.store = store
        self.block_versions = dict(versions)
        self.block_sha256 = dict(shas)
        self._held = dict(held or {})
        self._pin = pin
        if not self._held.keys() <= self.block_versions.keys():
            raise KeyError(f"held blocks {sorted(self._held.keys() - self.block_versions.keys())} are not the model's")

    def __getitem__(self, block: str) -> Tensors:
        held = self._held.get(block)
        if held is not None:
            return held
        return self.store.read_block(block, self.block_versions[block], self.block_sha256[block])

    def __contains__(self, block: object) -> bool:  # without reading the block, as Mapping's would
        return block in self.block_versions

    def __iter__(self) -> Iterator[str]:
        return iter(self.block_versions)

    def __len__(self) -> int:
        return len(self.block_versions)

    def __repr__(self) -> str:
        return f"StoredModel({len(self)} blocks in {self.store.blocks_dir}, held: {sorted(self._held)})"

    @property
    def held(self) -> frozenset[str]:
        """The blocks in memory (all others are read from their files at each access)."""
        return frozenset(self._held)

    def source(self, block: str) -> str | None:
        """The SHA-256 of the file a block is read from (what its value is, for a reader that keeps a
        copy); None for a held block, whose value changes in place."""
        return None if block in self._held else self.block_sha256[block]

    def layout(self, block: str) -> list[TensorLayout]:
        """A block's tensors (names, dtypes, shapes), without reading their values."""
        held = self._held.get(block)
        if held is not None:
            return [TensorLayout(n, t.dtype, tuple(t.shape)) for n, t in held.items()]
        return self.store.block_layout(block, self.block_versions[block])

    def holding(self, blocks: Iterable[str]) -> StoredModel:
        """This version with `blocks` read into memory too (copies, which the holder may change in place)."""
        held = dict(self._held)
        for b in blocks:
            if b not in held:
                held[b] = {n: t.clone() for n, t in self[b].items()}
        return StoredModel(self.store, self.block_versions, self.block_sha256, held)

    def next(self, versions: Mapping[str, int], shas: Mapping[str, str]) -> StoredModel:
        """The version whose block files are `versions` (with hashes `shas`); the held blocks stay held."""
        return StoredModel(self.store, versions, shas, self._held)

    def snapshot(self) -> StoredModel:
        """This version as it is now, readable until `release()` whatever closes meanwhile: its files
        are pinned (pruning leaves them) and its held blocks copied (their holder moves them on)."""
        pin = self.store.pin({b: v for b, v in self.block_versions.items() if b not in self._held})
        held = {b: {n: t.clone() for n, t in ts.items()} for b, ts in self._held.items()}
        return StoredModel(self.store, self.block_versions, self.block_sha256, held, pin)

    def release(self) -> None:
        """Let pruning have a snapshot's files (a no-op for a model that is no snapshot, or once done)."""
        if self._pin is not None:
            self._pin.release()


class StateStore:
    def __init__(self, root: Path, keep: int = 3, keep_base: bool = False):
        self.root = Path(root)
        self.keep = keep
        self.keep_base = keep_base
        self.model_dir = self.root / "model"
        self.blocks_dir = self.root / "blocks"
        self.ckpt_dir = self.root / "checkpoints"
        self.incoming_dir = self.root / "incoming"
        for d in (self.root, self.blocks_dir, self.ckpt_dir, self.incoming_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # pinning and pruning of block files
        self._pins: Counter[str] = Counter()  # block file name -> readers holding it
        self._live: set[str] | None = None  # block files the kept checkpoints name (None: not pruned yet)

    def remove_leftovers(self) -> int:
        """Remove what a killed coordinator left behind: partial uploads (incoming/*.part) and the
        temporary files of unfinished atomic writes (.*.tmp). Returns how many files went. Only for the
        coordinator that owns the state dir, before it serves: a running one is still writing these."""
        stale = list(self.incoming_dir.glob("*.part")) + list(self.blocks_dir.glob("*.blob"))  # blobs: a cache
        for d in (self.root, self.blocks_dir, self.ckpt_dir, self.root / "codec", *self.records_dir.glob("round-*")):
            stale += d.glob(".*.tmp")
        removed = 0
        for path in stale:  # (a cached blob may predate a rewrite of its block file after a crash)
            if path.is_file() and not path.is_symlink():
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d leftover files of an interrupted run from %s (incoming/*.part, .*.tmp)",
                     removed, self.root)
        return removed

    # ---- run identity ---------------------------------------------------------------------------

    def bind_run(self, identity: Mapping[str, Any]) -> str:
        """Record the run's identity, or check it against the one recorded; returns the run id."""
        path = self.root / "run.json"
        if path.exists():
            recorded = json.loads(path.read_text())
            fmt = recorded.get("format", 1)
            if not isinstance(fmt, int) or fmt > STATE_FORMAT:
                raise StateError(f"{self.root} was written by a newer fedblock (state format {fmt}; this one reads "
                                 f"up to {STATE_FORMAT}): resume it with that version, or use another --state-dir")
            migrate = fmt < STATE_FORMAT
            if migrate:
                if identity.get("algorithm") not in ("fedbcd", "parablock", "fedavg"):
                    raise StateError(f"{self.root} holds a state format {fmt} run, which only block methods wrote; "
                                     "use another --state-dir")
                recorded = {**recorded, "format": STATE_FORMAT}
                for key, value in identity.items():  # format 1 did not record every setting (--train-blocks)
                    recorded.setdefault(key, value)
            for key, value in identity.items():
                if recorded.get(key) != value:
                    raise StateError(
                        f"{self.root} holds a run with {key}={recorded.get(key)!r}, not {value!r}; "
                        "use another --state-dir or the same settings"
                    )
            if migrate:  # only once the run is known to be this one: a refused start leaves the dir as it was
                atomic_write_json(path, recorded)
                log.info("migrated %s from state format %d to %d (nothing else changes)", self.root, fmt, STATE_FORMAT)
            return recorded["run_id"]
        run_id = hashlib.sha256(os.urandom(16)).hexdigest()[:16]
        atomic_write_json(path, {**identity, "run_id": run_id, "format": STATE_FORMAT})
        return run_id

    def initial_hashes(self) -> dict[str, bytes]:
        """Canonical SHA-256 per block of the run's initial model ({} if never recorded)."""
        try:
            return {b: bytes.fromhex(h) for b, h in json.loads((self.root / "initial.json").read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def write_initial_hashes(self, hashes: Mapping[str, bytes]) -> None:
        atomic_write_json(self.root / "initial.json", {b: h.hex() for b, h in hashes.items()})

    def install_model_files(self, files: list[Path]) -> None:
        """Copy the model's config and tokenizer files in (once)."""
        if (self.model_dir / ".complete").exists():
            return
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".model."))
        for f in files:
            shutil.copy2(f, tmp / f.name)
        (tmp / ".complete").write_text("")
        shutil.rmtree(self.model_dir, ignore_errors=True)
        os.replace(tmp, self.model_dir)
        _fsync_dir(self.root)

    def model_files(self) -> list[Path]:
        return sorted(p for p in self.model_dir.iterdir() if p.is_file() and not p.name.startswith("."))

    # ---- the codec's files --------------------------------------------------------------------------

    CODEC_WEIGHTS = "autoencoder.safetensors"  # no model file has this name: model files are no weights

    def install_codec_weights(self, source: Path) -> Path:
        """Copy the autoencoder's weights in; the run serves this copy, so the source may change after."""
        path = self.root / "codec" / self.CODEC_WEIGHTS
        atomic_write(path, Path(source).read_bytes())
        return path

    def codec_files(self) -> list[Path]:
        path = self.root / "codec" / self.CODEC_WEIGHTS
        return [path] if path.is_file() else []

    # ---- blocks -----------------------------------------------------------------------------------

    def block_path(self, block: str, version: int) -> Path:
        return self.blocks_dir / f"{block}@{version}.safetensors"

    def write_block(self, block: str, version: int, tensors: Mapping[str, Tensor]) -> str:
        """Write one block version; returns the file's SHA-256 (hex). The file is what
        `safetensors.torch.save` makes of `tensors`, streamed from their memory (no copy of the block)."""
        layout = safetensors_order(TensorLayout(n, t.dtype, tuple(t.shape)) for n, t in tensors.items())
        path = self.block_path(block, version)
        _remove_blobs(path)  # a round written again after a restart: what was encoded from before is stale
        with atomic_file(path) as f:
            hashing = _Hashing(f)
            write_safetensors(hashing, layout, ((t.name, tensors[t.name]) for t in layout))
        return hashing.sha.hexdigest()

    def blob_path(self, block: str, version: int, codec: str) -> Path:
        """Where (block, version) encoded with download codec `codec` is cached."""
        tag = re.sub(r"[^A-Za-z0-9]+", "-", codec)
        return self.block_path(block, version).with_name(f"{self.block_path(block, version).name}.{tag}.blob")

    def write_blob(self, block: str, version: int, codec: str, data: bytes) -> Path:
        path = self.blob_path(block, version, codec)
        with self._lock:  # not for a block file that pruning has taken meanwhile
            if not self.block_path(block, version).is_file():
                raise BlockFileMissing(f"block file {self.block_path(block, version).name} is not on disk")
            atomic_write(path, data)
        return path

    def read_block(self, block: str, version: int, sha256_hex: str) -> Tensors:
        """The tensors of a block file, checked against its hash: views of a private map of the file
        (copy-on-write: writing to them never reaches the file, nor costs memory until then), unmapped
        when the last of them is dropped. The map outlives the file's removal (pruning)."""
        path = self.block_path(block, version)
        try:
            with open(path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except FileNotFoundError:
            raise BlockFileMissing(f"checkpoint references missing block file {path.name}") from None
        except ValueError:  # an empty file cannot be mapped
            raise StateError(f"block file {path.name} is empty") from None
        if hashlib.sha256(mapped).hexdigest() != sha256_hex:
            raise StateError(f"block file {path.name} does not match its checkpoint hash")
        return load_safetensors(mapped)[0]

    def file_sha256(self, block: str, version: int) -> str:
        """SHA-256 (hex) of a block file, read in pieces (it is never in memory whole)."""
        path = self.block_path(block, version)
        sha, piece = hashlib.sha256(), bytearray(1 << 20)
        try:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(piece):
                    sha.update(memoryview(piece)[:n])
        except FileNotFoundError:
            raise BlockFileMissing(f"checkpoint references missing block file {path.name}") from None
        return sha.hexdigest()

    def block_layout(self, block: str, version: int) -> list[TensorLayout]:
        """The tensors of a block file, from its header alone (unchecked: the values are not read)."""
        try:
            return list(SafetensorsFile(self.block_path(block, version)).tensors.values())
        except FileNotFoundError:
            raise BlockFileMissing(f"block file {self.block_path(block, version).name} is not on disk") from None

    # ---- checkpoints ------------------------------------------------------------------------------

    def write_checkpoint(self, ckpt: Checkpoint) -> Path:
        path = self.ckpt_dir / f"round-{ckpt.round:06d}.json"
        atomic_write_json(path, asdict(ckpt))
        self._prune()
        return path

    def checkpoints(self) -> list[Path]:
        return sorted(p for p in self.ckpt_dir.iterdir() if _CKPT.search(p.name))

    def latest(self) -> Checkpoint | None:
        """The newest readable checkpoint (None for a fresh state dir)."""
        for path in reversed(self.checkpoints()):
            try:
                return Checkpoint(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                continue  # unreadable: fall back to the one before
        return None

    def load_blocks(self, ckpt: Checkpoint) -> StoredModel:
        """The checkpoint's model, its block files checked against their hashes first (read in pieces:
        nothing is kept in memory). Raises StateError (BlockFileMissing for a file that is gone)."""
        for b, v in ckpt.block_versions.items():
            if self.file_sha256(b, v) != ckpt.block_sha256[b]:
                raise StateError(f"block file {self.block_path(b, v).name} does not match its checkpoint hash")
        return StoredModel(self, ckpt.block_versions, ckpt.block_sha256)

    def latest_intact(self) -> tuple[Checkpoint, StoredModel] | None:
        """The newest checkpoint that reads and whose block files all match their hashes, with its
        model; None for a fresh state dir. Damaged newer checkpoints are skipped with a warning that
        says what is wrong with each; StateError when there are checkpoints but none is intact."""
        problems = []
        for path in reversed(self.checkpoints()):
            try:
                ckpt = Checkpoint(**json.loads(path.read_text()))
            except (ValueError, TypeError) as e:
                problems.append(f"{path.name} is unreadable ({e})")
                continue
            try:
                tensors = self.load_blocks(ckpt)
            except KeyError as e:
                problems.append(f"{path.name} has no hash for block {e}")
                continue
            except (StateError, OSError) as e:
                problems.append(f"{path.name}: {e}")
                continue
            except (AttributeError, TypeError, ValueError) as e:  # parseable JSON of the wrong shape
                problems.append(f"{path.name} is malformed ({type(e).__name__}: {e})")
                continue
            if problems:
                log.warning("falling back to the older checkpoint %s: %s", path.name, "; ".join(problems))
            return ckpt, tensors
        if problems:
            raise StateError(f"no intact checkpoint in {self.ckpt_dir}: {'; '.join(problems)}")
        return None

    def pin(self, versions: Mapping[str, int]) -> Pin:
        """Keep the files of these block versions on disk until the pin is released: pruning skips
        them, and the last release of a file that no kept checkpoint names removes it. Raises
        BlockFileMissing, pinning nothing, when one of them is gone already."""
        names = tuple(self.block_path(b, v).name for b, v in versions.items())
        with self._lock:
            for name in names:
                if not (self.blocks_dir / name).is_file():
                    raise BlockFileMissing(f"block file {name} is not on disk")
            self._pins.update(names)
        return Pin(self, names)

    def pinned(self) -> set[str]:
        """Names of the block files pinned now."""
        with self._lock:
            return set(self._pins)

    def _unpin(self, pin: Pin) -> None:
        with self._lock:
            if pin.released:
                return
            pin.released = True
            for name in pin.names:
                self._pins[name] -= 1
                if self._pins[name] > 0:
                    continue
                del self._pins[name]
                if self._live is not None and name not in self._live:  # pruning skipped it for us
                    _remove_blobs(self.blocks_dir / name)
                    (self.blocks_dir / name).unlink(missing_ok=True)

    def _prune(self) -> None:
        paths = self.checkpoints()
        for old in paths[: -self.keep]:
            old.unlink(missing_ok=True)
        live = set()
        for path in paths[-self.keep :]:
            try:
                ckpt = json.loads(path.read_text())
            except ValueError:
                continue
            live.update(self.block_path(b, v).name for b, v in ckpt["block_versions"].items())
            if self.keep_base:
                live.update(self.block_path(b, 0).name for b in ckpt["block_versions"])
        with self._lock:
            self._live = live
            for f in self.blocks_dir.iterdir():
                if f.suffix == ".safetensors" and f.name not in live and f.name not in self._pins:
                    _remove_blobs(f)
                    f.unlink(missing_ok=True)

    # ---- evaluations ------------------------------------------------------------------------------

    # ---- recorded updates (--record-updates) ------------------------------------------------------

    @property
    def records_dir(self) -> Path:
        return self.root / "records"

    def record_update(self, round: int, worker: str, block: str, delta: Mapping[str, Tensor], tokens: int) -> Path:
        """Keep an accepted update's decoded delta, for `fedblock codec train` (written only when the
        operator asked: a site's update says something about its data). Sent again, it replaces itself."""
        path = self.records_dir / f"round-{round:06d}" / f"{worker}@{block}.safetensors"
        meta = {"round": str(round), "worker": worker, "block": block, "tokens": str(tokens)}
        atomic_write(path, safetensors.torch.save({n: t.contiguous() for n, t in delta.items()}, metadata=meta))
        return path

    def prune_records(self, keep_from: int) -> None:
        """Delete the recorded updates of rounds before `keep_from`."""
        for d in self.records_dir.glob("round-*"):
            if d.is_dir() and d.name[6:].isdigit() and int(d.name[6:]) < keep_from:
                shutil.rmtree(d, ignore_errors=True)

    def write_evaluations(self, history: list[list[float]]) -> None:
        """The evaluations so far, as each arrives (they come from their own thread, between checkpoints)."""
        atomic_write_json(self.root / "evaluations.json", {"eval_history": history})

    def read_evaluations(self, up_to: int) -> list[list[float]]:
        """Evaluations recorded of rounds up to `up_to` ([] when there are none, or the file is unreadable)."""
        try:
            history = json.loads((self.root / "evaluations.json").read_text())["eval_history"]
            return [[float(x) if i else int(x) for i, x in enumerate(e)] for e in history if int(e[0]) <= up_to]
        except (OSError, ValueError, TypeError, KeyError, IndexError):
            return []

    # ---- what operators change and see ------------------------------------------------------------

    def write_rounds(self, total: int, flag: int) -> None:
        """An operator's length of the run (drain, set-rounds), for a restart with the same `--rounds`
        (`flag`) to keep it."""
        atomic_write_json(self.root / "rounds.json", {"rounds": int(total), "flag": int(flag)})

    def read_rounds(self, flag: int) -> int | None:
        """The length an operator set while the run had `--rounds flag`; None when none was, when the run
        was started again with another --rounds (that wins), or when the file is unreadable."""
        try:
            recorded = json.loads((self.root / "rounds.json").read_text())
            total, was = int(recorded["rounds"]), int(recorded["flag"])
        except (OSError, ValueError, TypeError, KeyError, OverflowError):
            return None
        return total if was == flag and total >= 0 else None

    def append_timeline(self, round: int, intervals: list[list]) -> None:
        """One round's timeline ([worker, kind, start_s, end_s] on the run clock) at the end of
        timeline.jsonl: appended, so a run writes it once whatever its length (checkpoints stay small)."""
        line = (json.dumps({"round": int(round), "intervals": intervals}, allow_nan=False) + "\n").encode()
        with open(self.root / "timeline.jsonl", "a+b") as f:
            if f.seek(0, os.SEEK_END) and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                line = b"\n" + line  # after a line torn by a kill: a line of its own, not glued to it
            f.write(line)

    def read_timeline(self) -> dict[int, list[list]]:
        """round -> its intervals. A round written twice (run again after a restart) keeps its last
        entry; a torn last line (a kill during the write) is skipped."""
        rounds: dict[int, list[list]] = {}
        try:
            lines = (self.root / "timeline.jsonl").read_text().splitlines()
        except OSError:
            return rounds
        for line in lines:
            try:
                entry = json.loads(line)
                rounds[int(entry["round"])] = [[str(w), str(k), float(a), float(b)] for w, k, a, b in entry["intervals"]]
            except (ValueError, TypeError, KeyError, OverflowError):
                continue
        return rounds

    # ---- end of run -------------------------------------------------------------------------------

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.root / "summary.json"
        atomic_write_json(path, dict(summary))
        return path


def _remove_blobs(block_file: Path) -> None:
    """Remove the cached encodings of a block file."""
    for blob in block_file.parent.glob(f"{glob.escape(block_file.name)}.*.blob"):
        blob.unlink(missing_ok=True)


def check_export_dir(out: Path, state_dir: Path | None = None) -> None:
    """Raise ConfigError unless `out` may receive an export: it does not exist, is an empty folder,
    or is an earlier export (it holds EXPORT_MARKER). Anything else would be deleted by the export.
    With `state_dir`, `out` may also neither hold the state dir nor lie inside it (but for its own
    `export/`): the export replaces the folder whole."""
    out = Path(out)
    if state_dir is not None:
        state, target = Path(state_dir).resolve(), out.resolve()
        if state.is_relative_to(target) or (target.is_relative_to(state) and target != state / "export"):
            raise ConfigError(f"export folder {out} would replace part of the state dir {state_dir}; "
                              f"use {Path(state_dir) / 'export'} or a folder outside it")
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise ConfigError(f"export folder {out} exists and is not a folder; choose a new or empty folder")
    if (out / EXPORT_MARKER).is_file() or not any(out.iterdir()):
        return
    raise ConfigError(f"export folder {out} is not empty and is not an earlier fedblock export "
                      f"(it has no {EXPORT_MARKER}); refusing to replace it: choose a new or empty folder")


DEFAULT_SHARD_BYTES = 2_000_000_000  # transformers' "2GB": the most bytes of tensors in one export shard
WEIGHTS_NAME = "model.safetensors"  # the names save_pretrained gives a model's weights
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def export_model(model_dir: Path, blocks: Mapping[str, Mapping[str, Tensor]], out: Path,
                 lora: LoraSettings | None = None, adapter_out: Path | None = None,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the model (architecture from `model_dir`, weights from `blocks`) as a Hugging Face folder:
    float32 safetensors shards of at most `max_shard_bytes` each (`model-00001-of-0000N.safetensors`
    and `model.safetensors.index.json`; `model.safetensors` alone when one is enough), as
    `save_pretrained` writes them. The blocks are read one at a time, in model order (a StoredModel's
    from its files): the model is never in memory whole. With `lora`, each layer's adapters (block
    `lora.<block>`) are merged into its base weight (peft's merge, layer by layer), and with
    `adapter_out` the adapters are also written alone in peft's format there. StateError when the
    blocks are not the architecture's parameters. A folder is replaced only if check_export_dir
    allows it (ConfigError otherwise, before any work); `model_dir` is the state dir's model/ folder,
    so that the state dir itself is never replaced."""
    from ..common.models import build_model_from_files

    targets = [Path(out)] + ([Path(adapter_out)] if adapter_out is not None else [])
    if adapter_out is not None and lora is None:
        raise ConfigError("--adapter-out: this run trained no adapters (it ran without --peft lora)")
    if adapter_out is not None:
        a, o = Path(adapter_out).resolve(), Path(out).resolve()
        if a == o or a.is_relative_to(o) or o.is_relative_to(a):
            raise ConfigError("--adapter-out and --out must be separate folders, neither inside the other")
    for target in targets:
        check_export_dir(target, model_dir.parent)
    # The architecture on the meta device (names, shapes, the adapters' layers): no memory.
    base = build_model_from_files(model_dir, dtype=torch.float32, device="meta")
    model = adapters.add_lora(base, lora)
    plan = _export_plan(model, blocks)
    tmps = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmps.append(Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.")))
        if adapter_out is not None:
            _save_adapters(model, blocks, tmps[1])
        _write_shards(tmps[0], plan, _exported_tensors(model, blocks, plan), max_shard_bytes)
        base.config.architectures = [type(base).__name__]  # as save_pretrained records it
        base.config.save_pretrained(tmps[0])
        if base.can_generate():
            base.generation_config.save_pretrained(tmps[0])
        for f in model_dir.iterdir():
            if f.is_file() and not f.name.startswith(".") and not (tmps[0] / f.name).exists():
                shutil.copy2(f, tmps[0] / f.name)
        for target, tmp in zip(targets, tmps, strict=True):
            (tmp / EXPORT_MARKER).write_text("written by fedblock; the next export replaces this folder\n")
            check_export_dir(target, model_dir.parent)  # again: something may have been put there meanwhile
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
    except BaseException:
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out)


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The LoRA layers of a peft model, by module name ({} for a plain model)."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def exported_names(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter of `model` (a peft model or a plain one) but the adapters -> its name in the
    exported model, which has the adapters merged away: peft's merge puts each LoRA layer's base layer
    in its place (`q_proj.base_layer.weight` becomes `q_proj.weight`) and unwraps the model."""
    layers = _lora_layers(model)
    peft_model = hasattr(model, "merge_and_unload")
    names = {}
    for name, _ in model.named_parameters():
        if adapters.is_adapter(name):
            continue
        module, _, leaf = name.rpartition(".")
        owner = module.removesuffix(".base_layer")
        exported = f"{owner}.{leaf}" if owner != module and owner in layers else name
        names[name] = exported.removeprefix("base_model.model.") if peft_model else exported
    return names


def _layout(blocks: Mapping[str, Mapping[str, Tensor]], block: str) -> list[TensorLayout]:
    if isinstance(blocks, StoredModel):  # from the file's header: the values are read once, when written
        return blocks.layout(block)
    return [TensorLayout(n, t.dtype, tuple(t.shape)) for n, t in blocks[block].items()]


def _export_plan(model: torch.nn.Module, blocks: Mapping[str, Mapping[str, Tensor]]) -> list[tuple[str, list[TensorLayout]]]:
    """(block, its exported tensors: float32, exported names) in model order, for the blocks that hold
    base weights; checked first: every parameter of the architecture once, with its shape."""
    names = exported_names(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    position = {exported: i for i, exported in enumerate(names.values())}
    plan, seen = [], set()
    for b in blocks:
        exported = []
        for t in _layout(blocks, b):
            if adapters.is_adapter(t.name):
                continue
            if t.name not in names:
                raise StateError(f"block {b}: {t.name} is no parameter of the model to export")
            if t.name in seen:
                raise StateError(f"block {b}: {t.name} is in another block too")
            if t.shape != shapes[t.name]:
                raise StateError(f"block {b}: {t.name} has shape {list(t.shape)}, the model {list(shapes[t.name])}")
            seen.add(t.name)
            exported.append(TensorLayout(names[t.name], torch.float32, t.shape))
        if exported:
            plan.append((b, sorted(exported, key=lambda t: position[t.name])))
    missing = sorted(names.keys() - seen)
    if missing:
        raise StateError(f"the blocks lack {len(missing)} of the model's parameters ({', '.join(missing[:3])}, ...)")
    return sorted(plan, key=lambda entry: position[entry[1][0].name])


def _exported_tensors(model: torch.nn.Module, blocks: Mapping[str, Mapping[str, Tensor]],
                      plan: list[tuple[str, list[TensorLayout]]]) -> Iterator[tuple[str, Tensor]]:
    """(exported name, float32 tensor) in `plan` order, reading one block (and its adapters) at a time."""
    names, layers = exported_names(model), _lora_layers(model)
    for block, layout in plan:
        exported = _exported_block(blocks, block, names, layers)
        for t in layout:
            yield t.name, exported[t.name].float()
        del exported  # before the next block is read


def _exported_block(blocks: Mapping[str, Mapping[str, Tensor]], block: str, names: Mapping[str, str],
                    layers: Mapping[str, torch.nn.Module]) -> Tensors:
    """One block's base weights by exported name, the adapters of its LoRA layers merged in."""
    values = blocks[block]
    own = [p for p in layers if f"{p}.base_layer.weight" in values]
    merged = {}
    if own:
        extra = blocks.get(adapters.PREFIX + block)
        if extra is None:
            raise StateError(f"block {block} has LoRA layers but there is no block {adapters.PREFIX + block}")
        both = {**values, **extra}
        merged = {f"{p}.base_layer.weight": _merged_weight(layers[p], p, both) for p in own}
    return {names[n]: merged.get(n, t) for n, t in values.items() if not adapters.is_adapter(n)}


def _merged_weight(layer: torch.nn.Module, prefix: str, values: Mapping[str, Tensor]) -> Tensor:
    """One LoRA layer's base weight with its adapters merged in, by peft's own merge, on a copy."""
    state = {n[len(prefix) + 1:]: t for n, t in values.items() if n.startswith(prefix + ".")}
    state["base_layer.weight"] = state["base_layer.weight"].float().clone()  # the merge adds in place
    layer.load_state_dict(state, assign=True)
    layer.merge()
    merged = layer.base_layer.weight.detach()
    layer.to_empty(device="meta")  # lets go of what was loaded
    return merged


def _save_adapters(model: torch.nn.Module, blocks: Mapping[str, Mapping[str, Tensor]], out: Path) -> None:
    """The adapters alone, in peft's format: the adapter blocks (small) are loaded into the meta model."""
    values = {n: t for b in blocks if b.startswith(adapters.PREFIX) for n, t in blocks[b].items()}
    # An adapter on an embedding layer makes peft save that layer's base weight too: load it from the
    # embedding and head blocks (not decoder layers).
    embeddings = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    if any("lora_" in n for m in embeddings for n, _ in m.named_parameters()):
        wanted = {id(p) for m in embeddings for p in m.parameters()}
        names = {n for n, p in model.named_parameters() if id(p) in wanted} - set(values)
        for b in blocks:
            if not b.startswith(adapters.PREFIX) and not b.startswith("layers."):
                values.update({n: t for n, t in blocks[b].items() if n in names})
    unexpected = model.load_state_dict(values, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise StateError(f"the adapter blocks hold {', '.join(unexpected[:3])}, which the model has not")
    adapters.save_adapter(model, out)


def _write_shards(folder: Path, plan: list[tuple[str, list[TensorLayout]]], tensors: Iterator[tuple[str, Tensor]],
                  max_shard_bytes: int) -> None:
    """The weights as save_pretrained shards them: tensors in order, a new shard when the next one
    would take the shard past `max_shard_bytes` (a larger tensor has one of its own)."""
    shards: list[list[TensorLayout]] = [[]]
    size = 0
    for _, layout in plan:
        for t in layout:
            if shards[-1] and size + t.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
    files = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, layout in zip(files, shards, strict=True):
        with open(folder / file, "wb") as f:
            write_safetensors(f, layout, itertools.islice(tensors, len(layout)), {"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for shard in shards for t in shard)},
                 "weight_map": {t.name: file for file, shard in zip(files, shards, strict=True) for t in shard}}
        (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
