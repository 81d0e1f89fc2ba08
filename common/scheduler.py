"""Which worker trains which block in a round, and which workers take part. Pure functions.

Schedules (`--block-schedule`), for round t (1-based) and B trainable blocks:
- `round-robin`: every worker trains block (t - 1) mod B, so a round moves one block with all workers.
- `staggered`:   worker i (the i-th participant by name) trains block (i + t - 1) mod B, so one round covers
                 many blocks and consecutive rounds give each worker a different block.
- `striped`:     worker i trains block (i + P·(t - 1)) mod B with P workers in the round: like
                 `staggered`, but consecutive rounds train disjoint blocks (while P <= B/2). With
                 ParaBlock a worker starts round t before round t-1's result has arrived; under
                 `staggered` it would train exactly the block a neighbour changed in round t-1, from
                 the value before that change, and the two deltas would overlap. `striped` avoids that.
- `descending`:  `striped` from the last block down: worker i trains block B-1 - ((i + P·(t - 1)) mod B)
                 (FedCyBGD's descending order; its ascending order is `striped`).
- `random`:      each worker draws a block uniformly, seeded by (seed, round, worker name).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence


def assign_blocks(
    schedule: str,
    round: int,
    workers: Mapping[str, int],
    blocks: Sequence[str],
    seed: int,
) -> dict[str, tuple[str, ...]]:
    """{worker: (block,)} for `round`. `workers` maps each participant to its number i."""
    if not blocks:
        raise ValueError("no trainable blocks")
    n = len(blocks)
    if schedule == "round-robin":
        return {w: (blocks[(round - 1) % n],) for w in workers}
    if schedule == "staggered":
        return {w: (blocks[(i + round - 1) % n],) for w, i in workers.items()}
    if schedule == "striped":
        return {w: (blocks[(i + len(workers) * (round - 1)) % n],) for w, i in workers.items()}
    if schedule == "descending":
        return {w: (blocks[n - 1 - (i + len(workers) * (round - 1)) % n],) for w, i in workers.items()}
    if schedule == "random":
        return {w: (random.Random(f"{seed}/{round}/{w}").choice(list(blocks)),) for w in workers}
    raise ValueError(f"unknown block schedule {schedule!r}")


def select_workers(round: int, available: Sequence[str], k: int, seed: int) -> list[str]:
    """k of the available workers (all when k is 0 or at least their number), seeded per round."""
    pool = sorted(available)
    if k <= 0 or k >= len(pool):
        return pool
    return sorted(random.Random(f"{seed}/select/{round}").sample(pool, k))


def learning_rate(schedule: str, base: float, round: int, rounds: int) -> float:
    if schedule == "constant":
        return base
    if schedule == "cosine":  # from base at round 1 down to base/10 at the last round
        progress = (round - 1) / max(1, rounds - 1)
        return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")
