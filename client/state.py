"""What flows between a worker's threads, and the bookkeeping of its model copy.

The compute thread is the only one that writes model weights. The communication side hands it
`Patch`es (new global blocks) and receives `Update`s (block deltas) through bounded queues. Both sides
read `ModelBook`, which records which global version each local block corresponds to.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from torch import Tensor

Tensors = dict[str, Tensor]


@dataclass(frozen=True)
class Patch:
    """Global blocks at model version `version` (only those that changed since the request)."""

    version: int
    block_versions: dict[str, int]
    blocks: dict[str, Tensors]


@dataclass(frozen=True)
class Update:
    """A finished local round: one delta per trained block, on top of model version `base_version`."""

    round: int
    base_version: int
    deltas: dict[str, Tensors]
    tokens: int
    loss: float


@dataclass
class ModelBook:
    """Versions of the local copy. `dirty` blocks carry the worker's own handed-in progress (block ->
    round) that the global model has not confirmed yet; once that round has closed, the next delta sync
    asks for them again, whether or not the coordinator kept the update."""

    version: int = -1
    block_versions: dict[str, int] = field(default_factory=dict)
    dirty: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(self, notice_version: int) -> dict[str, int]:
        """Held versions to send with a download for model version `notice_version`."""
        with self.lock:
            held = dict(self.block_versions)
            for block, round in self.dirty.items():
                if round <= notice_version:
                    held[block] = -1
            return held

    def mark_dirty(self, blocks, round: int) -> None:
        with self.lock:
            for b in blocks:
                self.dirty[b] = round

    def applied(self, patch: Patch) -> None:
        with self.lock:
            self.version = max(self.version, patch.version)
            for b in patch.blocks:
                self.block_versions[b] = patch.block_versions[b]
                if self.dirty.get(b, patch.version + 1) <= patch.version:
                    del self.dirty[b]
