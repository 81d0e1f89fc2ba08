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

Block files that a download is streaming are pinned: pruning leaves them until the download ends.
With `keep_base`, the base model's block files (version 0) are never pruned: an algorithm that hands
workers base values (FedCyBGD's --download-fraction) serves them all run long.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
        """Write one block version; returns the file's SHA-256 (hex)."""
        data = safetensors.torch.save({n: t.detach().contiguous().cpu() for n, t in tensors.items()})
        path = self.block_path(block, version)
        _remove_blobs(path)  # a round written again after a restart: what was encoded from before is stale
        atomic_write(path, data)
        return hashlib.sha256(data).hexdigest()

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
        path = self.block_path(block, version)
        try:
            with open(path, "rb") as f:  # into a writable buffer: the tensors are views of it, not copies
                data = bytearray(os.fstat(f.fileno()).st_size)
                f.readinto(data)
        except FileNotFoundError:
            raise BlockFileMissing(f"checkpoint references missing block file {path.name}") from None
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

    def latest_intact(self) -> tuple[Checkpoint, dict[str, Tensors]] | None:
        """The newest checkpoint that reads and whose block files all load and match their hashes, with
        its tensors; None for a fresh state dir. Damaged newer checkpoints are skipped with a warning
        that says what is wrong with each; StateError when there are checkpoints but none is intact."""
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


def export_model(model_dir: Path, blocks: Mapping[str, Mapping[str, Tensor]], out: Path,
                 lora: LoraSettings | None = None, adapter_out: Path | None = None) -> Path:
    """Write the model (architecture from `model_dir`, weights from `blocks`) as a Hugging Face folder.
    With `lora`, the adapters are merged into the base weights first, and with `adapter_out` also written
    alone in peft's format there. A folder is replaced only if check_export_dir allows it (ConfigError
    otherwise, before any work); `model_dir` is the state dir's model/ folder, so that the state dir
    itself is never replaced."""
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
    model = adapters.add_lora(build_model_from_files(model_dir, dtype=torch.float32), lora)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for tensors in blocks.values():
            for name, t in tensors.items():
                params[name].copy_(t)
    tmps = []
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmps.append(Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.")))
        if adapter_out is not None:  # before the merge, which folds the adapters away
            adapters.save_adapter(model, tmps[1])
        model = adapters.merge(model)
        model.save_pretrained(tmps[0])
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
