"""The coordinator's state directory: global model blocks, checkpoints, run identity, summary, export.

Layout of `--state-dir`:

    run.json                      what this run is (model, algorithm, blocks); a restart must match it
    model/                        config.json and tokenizer files (what workers fetch; what export copies)
    blocks/<block>@<version>.safetensors   one file per block version, written once
    checkpoints/round-000012.json block versions + SHA-256 of each block file, registry, counters
    incoming/                     partial uploads (chunks land here, not in memory)
    summary.json                  written at the end of a run
    export/                       the final model as a Hugging Face folder (default export place)

Every file is written atomically (temporary file, fsync, rename, fsync of the directory), so a crash at
any point leaves the previous checkpoint intact. A checkpoint only references block files that were
complete before it was written; loading verifies each file's hash. Only blocks that changed in a round
are written, so a checkpoint costs in proportion to what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from ..common.codecs import load_safetensors

Tensors = dict[str, Tensor]
_CKPT = re.compile(r"round-(\d{6})\.json$")


class StateError(RuntimeError):
    """The state directory is unusable (corrupt, or belongs to a different run)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


@dataclass
class Checkpoint:
    round: int
    block_versions: dict[str, int]
    block_sha256: dict[str, str]
    workers: dict[str, int] = field(default_factory=dict)  # name -> join index
    counters: dict[str, float] = field(default_factory=dict)  # bytes, updates, wall time so far
    eval_history: list[list[float]] = field(default_factory=list)  # [round, loss]
    round_history: list[dict] = field(default_factory=list)  # per round: timing, updates, bytes


class StateStore:
    def __init__(self, root: Path, keep: int = 3):
        self.root = Path(root)
        self.keep = keep
        self.model_dir = self.root / "model"
        self.blocks_dir = self.root / "blocks"
        self.ckpt_dir = self.root / "checkpoints"
        self.incoming_dir = self.root / "incoming"
        for d in (self.root, self.blocks_dir, self.ckpt_dir, self.incoming_dir):
            d.mkdir(parents=True, exist_ok=True)

    # ---- run identity ---------------------------------------------------------------------------

    def bind_run(self, identity: Mapping[str, Any]) -> str:
        """Record the run's identity, or check it against the one recorded; returns the run id."""
        path = self.root / "run.json"
        if path.exists():
            recorded = json.loads(path.read_text())
            for key, value in identity.items():
                if recorded.get(key) != value:
                    raise StateError(
                        f"{self.root} holds a run with {key}={recorded.get(key)!r}, not {value!r}; "
                        "use another --state-dir or the same settings"
                    )
            return recorded["run_id"]
        run_id = hashlib.sha256(os.urandom(16)).hexdigest()[:16]
        atomic_write_json(path, {**identity, "run_id": run_id})
        return run_id

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

    # ---- blocks -----------------------------------------------------------------------------------

    def block_path(self, block: str, version: int) -> Path:
        return self.blocks_dir / f"{block}@{version}.safetensors"

    def write_block(self, block: str, version: int, tensors: Mapping[str, Tensor]) -> str:
        """Write one block version; returns the file's SHA-256 (hex)."""
        data = safetensors.torch.save({n: t.detach().contiguous().cpu() for n, t in tensors.items()})
        atomic_write(self.block_path(block, version), data)
        return hashlib.sha256(data).hexdigest()

    def read_block(self, block: str, version: int, sha256_hex: str) -> Tensors:
        path = self.block_path(block, version)
        try:
            with open(path, "rb") as f:  # into a writable buffer: the tensors are views of it, not copies
                data = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(data)
        except FileNotFoundError:
            raise StateError(f"checkpoint references missing block file {path.name}") from None
        if hashlib.sha256(data).hexdigest() != sha256_hex:
            raise StateError(f"block file {path.name} does not match its checkpoint hash")
        return load_safetensors(data)[0]

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

    def load_blocks(self, ckpt: Checkpoint) -> dict[str, Tensors]:
        return {b: self.read_block(b, v, ckpt.block_sha256[b]) for b, v in ckpt.block_versions.items()}

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
        for f in self.blocks_dir.iterdir():
            if f.suffix == ".safetensors" and f.name not in live:
                f.unlink(missing_ok=True)

    # ---- end of run -------------------------------------------------------------------------------

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.root / "summary.json"
        atomic_write_json(path, dict(summary))
        return path


def export_model(model_dir: Path, blocks: Mapping[str, Mapping[str, Tensor]], out: Path) -> Path:
    """Write the model (architecture from `model_dir`, weights from `blocks`) as a Hugging Face folder."""
    from ..common.models import build_model_from_files

    model = build_model_from_files(model_dir, dtype=torch.float32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for tensors in blocks.values():
            for name, t in tensors.items():
                params[name].copy_(t)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    model.save_pretrained(tmp)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.startswith(".") and not (tmp / f.name).exists():
            shutil.copy2(f, tmp / f.name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
