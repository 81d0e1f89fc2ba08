"""What flows between a worker's threads, and the bookkeeping of its model copy.

The compute thread is the only one that writes model weights. The communication side hands it
`Patch`es (new global blocks) and receives `Update`s (block deltas) through bounded queues. Both sides
read `ModelBook`, which records which global version each local block corresponds to.

On a GPU an `Update`'s block deltas are `blocks.HostCopy` mappings, still being copied to pinned host
memory when handed over: the communication thread's first read of a value waits for its copy, the
compute thread never does.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..common.messages import Patch, Update

__all__ = ["ModelBook", "Patch", "Update"]


@dataclass
class ModelBook:
    """Versions of the local copy. `dirty` blocks carry the worker's own handed-in progress (block ->
    round) that the global model has not confirmed yet; once that round has closed, the next delta sync
    asks for them again, whether or not the coordinator kept the update. `holds`: the canonical hash of
    a dirty block's value at hand-in, which the sync offers so that the coordinator need not send it
    back when it is the new global value."""

    version: int = -1
    block_versions: dict[str, int] = field(default_factory=dict)
    dirty: dict[str, int] = field(default_factory=dict)
    holds: dict[str, bytes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request(self, notice_version: int, everything_changed: bool = False) -> dict[str, int]:
        """Held versions to send with a download for model version `notice_version`. After a re-join
        (`everything_changed`) every block we changed is asked for: the coordinator may have lost it."""
        with self.lock:
            held = dict(self.block_versions)
            for block, round in self.dirty.items():
                if round <= notice_version or everything_changed:
                    held[block] = -1
            return held

    def claims(self, held: dict[str, int]) -> dict[str, bytes]:
        """The hashes to offer for the blocks `held` (from `request`) asks for again."""
        with self.lock:
            return {b: h for b, h in self.holds.items() if held.get(b) == -1}

    def mark_dirty(self, blocks, round: int, holds: dict[str, bytes] | None = None) -> None:
        with self.lock:
            for b in blocks:
                self.dirty[b] = round
                self.holds.pop(b, None)
            self.holds.update(holds or {})

    def applied(self, patch: Patch) -> None:
        """Patches arrive in download order, so the last one is the coordinator's current version (which
        can be older than ours after it restarted from a checkpoint)."""
        with self.lock:
            self.version = patch.version
            for b in (*patch.blocks, *patch.confirmed):
                self.block_versions[b] = patch.block_versions[b]
                self.dirty.pop(b, None)  # we asked for it: the local copy is the global one again
                self.holds.pop(b, None)

    def unconfirmed(self) -> bool:
        """Whether a block is missing (see `unconfirm`) until the next download brings it."""
        with self.lock:
            return -1 in self.block_versions.values()

    def unconfirm(self, blocks) -> None:
        """Blocks whose local copy turned out not to be what the coordinator confirmed: ask for them."""
        with self.lock:
            for b in blocks:
                self.block_versions[b] = -1
