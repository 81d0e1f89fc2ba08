"""The one interface every federated algorithm implements, on both sides of the wire.

An algorithm is one class. The coordinator makes one instance per run and calls its coordinator half;
each worker makes one from the settings it receives at Join and calls its worker half. Nothing else in
fedblock knows an algorithm by name: sessions, chunked transfers, resume, heartbeats, the round
machinery (participants, deadlines, --min-updates, admission, checkpoints, metrics) and the worker's
threads are shared.

Coordinator half (all calls from the coordinator's threads, never concurrently for one round):
- `tasks(round, workers, seed)`: what each participant is asked (blocks, seeds). A function of its
  arguments alone, so a restarted coordinator plans what the uninterrupted one would have.
- `check(task, numbers)`: whether a record update is well formed (records algorithms), before it
  touches anything; raise ValueError to refuse it.
- `fold(sums, block, delta, weight, ...)`: fold a checked tensor update into the round's running sums
  (streaming: never N copies). Records are kept per worker by the round (they are a few numbers).
- `close(plan, model)`: the next global state from a closed round. Returns the blocks whose new
  tensors must be written (a records algorithm may change `model` in place and return none).
- `catch_up(held, version, worker, after_download)`: what a worker at version `held` needs to reach
  `version`.
- `view(versions, task)`: the block versions a worker with `task` (None: no task yet) should hold; the
  global model's by default. A block at version 0 is the base model's (FedCyBGD's layer dropping).
- `state()` / `restore(state, model, version)`: its part of the checkpoint.

Worker half (on the worker's compute thread; `fetch` on its communication thread):
- `run(task, local)`: run the task on the local model; returns the Update (tensors or numbers).
- `fetch(session, version, held, target, holds, task_round)`: what to download to reach model version
  `target` (`holds`: blocks whose new global value the worker may hold already, by canonical hash;
  `task_round`: the task whose view is wanted, for an algorithm with `needs_base`).
- `apply(patch, local)`: bring the local model up to the patch's version. Returns the blocks the
  patch confirms (`patch.confirmed`) whose local copy is not the confirmed value: they are downloaded.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from ..blocks import Block
from ..data import BatchStream
from ..messages import Assignment, BlockSpec, CatchUp, Patch, Update

Tensors = dict[str, Tensor]


@dataclass(frozen=True)
class Task:
    """One participant's part of a round, as planned."""

    blocks: tuple[str, ...]
    seeds: tuple[int, ...] = ()


@dataclass
class Local:
    """What an algorithm's worker half works on. Owned by the compute thread."""

    model: nn.Module
    blocks: dict[str, Block]  # by name, in model order
    specs: tuple[BlockSpec, ...]  # the run's block layout (the coordinator's parameter order)
    stream: BatchStream
    trainer: Any  # training.BlockTrainer for first-order methods
    work_dir: Path  # the algorithm may keep files here (zeroth-order: the exact copy of the model)
    stop: threading.Event  # (anything with is_set: a site of several processes decides it together)
    parallel: Any = None  # parallel.DataParallel over a site's processes (None: one process)
    # Set by the compute thread that runs the tasks:
    boundary: Callable[[], bool] = lambda: False  # a step boundary: apply what has arrived; True if the model changed
    version: Callable[[], int] = lambda: -1  # the global model version the local copy is at
    on_step: Callable[[str, float], None] = lambda what, loss: None  # after each local step: metrics, progress


class Stopped(Exception):
    """The worker is stopping: leave the task unfinished."""


class Algorithm:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    pipeline_depth: ClassVar[int] = 0  # rounds a worker may train ahead of the global model
    records: ClassVar[bool] = False  # updates are a record of numbers (Report), not block tensors
    catch_up_on_task: ClassVar[bool] = False  # workers catch up when given a task, not on every new model
    shardable: ClassVar[bool] = False  # its worker half runs on a model sharded over a site's ranks (sharding.py)
    # Views hand out the base model's blocks: the coordinator keeps their files, and a worker syncs for
    # each task and starts it only on that task's view.
    needs_base: bool = False
    # Config options (as attribute names) and this algorithm's defaults for those the user left unset.
    defaults: ClassVar[Mapping[str, Any]] = {}
    # Config options the workers need: sent at Join as strings, read back by `__init__` on the worker.
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: Mapping[str, str], blocks: Sequence[BlockSpec], trainable: Sequence[str]):
        self.settings = dict(settings)
        self.specs = tuple(blocks)
        self.trainable = tuple(trainable)

    # ---- coordinator half --------------------------------------------------------------------

    def tasks(self, round: int, workers: Mapping[str, int], seed: int, schedule: str) -> dict[str, Task]:
        """`workers` maps each participant to its number i (0, 1, ... in the order they joined the plan)."""
        raise NotImplementedError

    def check(self, task: Task, numbers: Sequence[float]) -> None:
        raise ValueError(f"{self.name} takes no record updates")

    def fold(self, sums, block: str, delta: Tensors, weight: float, adopt: bool = False, owner=None) -> bool:
        return sums.add(block, delta, weight, adopt=adopt, owner=owner)

    def close(self, plan, model: Mapping[str, Tensors]) -> dict[str, Tensors]:
        raise NotImplementedError

    def catch_up(self, held: int, version: int, worker: str | None = None, after_download: bool = False) -> CatchUp:
        """Block methods catch up by a delta sync of the blocks (Download), never by a log."""
        return CatchUp(version, download=True)

    def view(self, versions: Mapping[str, int], task: Task | None) -> Mapping[str, int]:
        return versions

    def state(self) -> dict:
        return {}

    def restore(self, state: Mapping, model: Mapping[str, Tensors], version: int) -> int:
        """Load `state` (from `state()`), bringing `model` (the checkpoint's block files) to `version`.
        Returns the version the block files hold."""
        return version

    # ---- worker half -------------------------------------------------------------------------

    def run(self, task: Assignment, local: Local) -> Update:
        raise NotImplementedError

    def fetch(self, session, version: int, held: Mapping[str, int], target: int,
              holds: Mapping[str, bytes] | None = None, task_round: int = 0) -> Patch:
        """What brings a local copy at `version` (its blocks at `held`) to `target` or later. Block
        methods: a delta sync of the blocks whose version differs from `held`, but for those the
        coordinator confirms we hold (`holds`)."""
        sync = session.download(held, holds=holds)
        return Patch(sync.version, sync.block_versions, {b.block: b.tensors for b in sync.blocks},
                     confirmed=sync.confirmed)

    def apply(self, patch: Patch, local: Local) -> set[str] | None:
        raise NotImplementedError
