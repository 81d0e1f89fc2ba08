"""Data parallelism over the ranks of one site: token-weighted sums over a torch.distributed group.

A site's global batch is split by rows over its ranks (data.BatchStream's `shard`). For the ranks
together to take the step one process would take on the whole batch, each rank scales its mean loss by
its share of the global token count before backward and the gradients are summed: the sum of
(n_r / N) * mean_r is the mean over all N tokens, the loss one process computes. Zeroth-order methods
sum each loss the same way, so every rank derives the same scalars.

`DataParallel` knows nothing of the network beyond torch.distributed's collectives; one process makes
none (`parallel` is None everywhere then).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


class DataParallel:
    """Sums over the ranks of `group` (None: the default group). Collectives run on `device` (NCCL's
    need a CUDA tensor); every rank must make the same calls in the same order."""

    def __init__(self, device: torch.device, group=None):
        self.device = device
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def sum_scalars(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks, in float64."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum `tensors` over the ranks in place: one collective per dtype on a flat copy."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def mean_loss(self, loss_fn: Callable) -> Callable:
        """`loss_fn(model, batch) -> (mean loss, weight)` over the whole global batch: the weighted sum
        and the weight summed over the ranks. For forward-only use (zeroth-order): the result has no
        gradient."""

        def summed(model, batch):
            loss, n = loss_fn(model, batch)
            total, count = self.sum_scalars([float(loss) * n, n])
            return torch.tensor(total / count if count else 0.0), int(count)

        return summed
