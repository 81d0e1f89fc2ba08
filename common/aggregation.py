"""Streaming, token-weighted aggregation of block deltas. Plain tensor code, no network.

Each arriving delta is folded into one running float32 weighted mean per block and then dropped, so the
coordinator holds one accumulator per block, never N copies of a block. The running mean
(m ← m + (n/W)·(Δ − m), as an in-place lerp) equals Σ nᵢΔᵢ / Σ nᵢ and is exact for a single update,
which a running sum divided at the end is not.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch
from torch import Tensor

Tensors = dict[str, Tensor]


class RoundSums:
    """Running token-weighted mean of the deltas per block for one round. `add` is thread-safe."""

    def __init__(self) -> None:
        self.owners: list = []  # buffers that adopted deltas live in (to recycle once the round is done)
        self._sums: dict[str, Tensors] = {}
        self._weights: dict[str, float] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def add(self, block: str, delta: Mapping[str, Tensor], weight: float, adopt: bool = False, owner=None) -> bool:
        """Fold `delta` in with `weight`. With `adopt`, a first delta's float32 tensors become the
        accumulator themselves instead of a copy (the caller hands them, and `owner`, the memory they
        live in, over for good). Returns True if the delta was adopted."""
        if weight <= 0:
            raise ValueError(f"update weight must be > 0, got {weight}")
        with self._guard:
            lock = self._locks.setdefault(block, threading.Lock())
        with lock:
            acc = self._sums.get(block)
            total = self._weights.get(block, 0.0) + weight
            adopted = acc is None and adopt
            if acc is None:
                self._sums[block] = {n: d.detach().float() if adopt else d.detach().float().clone() for n, d in delta.items()}
                if adopted and owner is not None:
                    self.owners.append(owner)
            else:
                for n, d in delta.items():
                    acc[n].lerp_(d.detach().float(), weight / total)
            self._weights[block] = total
            return adopted

    @property
    def blocks(self) -> list[str]:
        return list(self._sums)

    def mean(self, block: str) -> Tensors:
        """Σ nᵢ·Δᵢ / Σ nᵢ for `block` (call once the round is closed)."""
        return self._sums[block]


def apply_mean(global_block: Mapping[str, Tensor], mean: Mapping[str, Tensor]) -> Tensors:
    """New tensors g + mean Δ (the old version stays valid for whoever still reads it)."""
    return {n: (g.float() + mean[n]).to(g.dtype) for n, g in global_block.items()}


def is_finite(tensors: Mapping[str, Tensor]) -> bool:
    """No NaN or Inf anywhere. A sum propagates both and reads each value once without allocating
    (isfinite would allocate a mask as large as the block); only a sum that overflows float32 is
    checked element by element."""
    for t in tensors.values():
        if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
            return False
    return True


def l2_norm(tensors: Mapping[str, Tensor]) -> float:
    """The L2 norm of all tensors together, as one vector (in float64: a sum of squares overflows
    float32 long before the norm does)."""
    return float(sum(torch.linalg.vector_norm(t, dtype=torch.float64) ** 2 for t in tensors.values()) ** 0.5)
