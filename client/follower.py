"""Ranks 1.. of a site of several processes: train what rank 0 says, in lockstep with it (site.py)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from ..common.algorithms import Stopped
from ..common.config import WorkerConfig
from ..common.data import load_examples
from ..common.parallel import DataParallel
from .site import (
    Apply,
    Boundary,
    Channel,
    End,
    Flag,
    KeepAlive,
    LockstepError,
    Start,
    Task,
    agree,
    fingerprint,
)
from .worker import Worker, build_local, shard_local

log = logging.getLogger("fedblock.site")


class _Stop:
    """Where the algorithm looks whether to stop: rank 0 decides and sends its answer."""

    def __init__(self, follower: Follower):
        self.follower = follower

    def is_set(self) -> bool:
        message = self.follower.channel.receive()
        if isinstance(message, End):  # rank 0 left in the middle of a task (it failed)
            raise Stopped
        if not isinstance(message, Flag):
            raise LockstepError(f"expected Flag from rank 0, got {type(message).__name__}")
        return message.stop


class Follower:
    def __init__(self, config: WorkerConfig, parallel: DataParallel, device: torch.device, control=None):
        self.config = config
        self.parallel = parallel
        self.device = device
        self.channel = Channel(control)
        self.examples = load_examples(config.data)  # every rank reads the site's data, and takes its rows
        self.version = -1  # of the local copy: the last patch applied
        self.tasks = 0

    def run(self) -> None:
        """Until rank 0 ends (End): returns; a collective that fails (a rank died) raises."""
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        parent = self.config.work_dir
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        work_dir = Path(tempfile.mkdtemp(prefix=f"fedblock-{self.config.name}-rank{self.parallel.rank}-", dir=parent))
        try:
            message = self.channel.receive()
            while isinstance(message, Start):  # again when rank 0 lost the coordinator while starting
                message = self._session(message, work_dir)
            if message is not None and not isinstance(message, End):
                raise LockstepError(f"expected Start from rank 0, got {type(message).__name__}")
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)

    def _session(self, start: Start, work_dir: Path) -> Start | None:
        """Build the model from rank 0's Start and follow it: None once rank 0 ends, or the next Start."""
        model_dir = work_dir / "model"
        shutil.rmtree(model_dir, ignore_errors=True)
        for name, data in start.files.items():
            path = model_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        algorithm = Worker._algorithm(start.info)  # the same reading of the run as rank 0
        host = torch.device("cpu") if start.shard else self.device  # sharded, each rank's part goes to the device
        local = build_local(self.config, start.info, model_dir, self.examples, host, work_dir, _Stop(self),
                            self.parallel)
        if start.shard:  # before any patch: a patch gives each rank its part (rank 0 shards after its sync)
            shard_local(local, self.device)
        local.boundary, local.version = self._boundary(algorithm, local), lambda: self.version
        self.version = -1
        while not self.channel.ended:
            message = self.channel.receive()
            if isinstance(message, Start):
                return message
            if isinstance(message, Apply):
                self._apply(algorithm, local, message)
            elif isinstance(message, Task):
                try:
                    algorithm.run(message.assignment, local)
                except Stopped:
                    continue
                agree(fingerprint(local, message.assignment.blocks), self.channel.group)
                self.tasks += 1
            elif not isinstance(message, (KeepAlive, End)):
                raise LockstepError(f"unexpected {type(message).__name__} from rank 0")
        log.info("rank %d: rank 0 ended after %d tasks", self.parallel.rank, self.tasks)
        return None

    def _apply(self, algorithm, local, message: Apply) -> None:
        # A block rank 0 finds stale is downloaded there and comes here as a patch of its own.
        algorithm.apply(message.patch, local)
        self.version = message.patch.version

    def _boundary(self, algorithm, local):
        def boundary() -> bool:
            while True:
                message = self.channel.receive()
                if isinstance(message, Apply):
                    self._apply(algorithm, local, message)
                elif isinstance(message, Boundary):
                    return message.changed
                elif isinstance(message, End):
                    raise Stopped
                else:
                    raise LockstepError(f"expected Apply or Boundary from rank 0, got {type(message).__name__}")

        return boundary

