"""The algorithms a run can use, and what distinguishes them.

Everything else (transport, aggregation, checkpoints, the worker's threads) is shared code; an
algorithm only decides how far a worker may train ahead of the global model and which blocks each
worker gets per round.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    name: str
    pipeline_depth: int  # rounds a worker may train ahead of the global model (0: wait for it)
    all_blocks: bool  # every worker trains every trainable block (full-model methods)
    summary: str


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("fedbcd", 0, False, "federated block coordinate descent: one block per worker, synchronous"),
        Algorithm("parablock", 1, False, "fedbcd with communication overlapped with the next round's training"),
        Algorithm("fedavg", 0, True, "full-model federated averaging (the baseline): whole-model deltas"),
    )
}
