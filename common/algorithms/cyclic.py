"""FedCyBGD ("Save It All", Wang et al. 2024) as its authors' code runs it: cyclic block descent.

- Blocks are decoder layers (default `--train-blocks 'layers.*'`): embeddings, final norm and head keep
  the base model's values, as in the authors' code.
- `--fedcybgd-mode relay`: one worker per round, the workers in turn (by name), trains one block, and
  the global block becomes its result. The result travels as a delta like any other update; the mean of
  one delta is that delta exactly, so with a lossless codec the new global block is bit for bit the
  trained one (the authors' overwrite).
- `--fedcybgd-mode parallel`: every participant trains a distinct block per round, cycling over them.
- Block order (`--block-schedule`): `striped` (the authors' ascending; the default), `descending`,
  `random`.
- `--download-fraction F` (their compressed download, "layer dropping"): for a task, a worker receives
  ceil(F·n) of the n blocks changed since the base model, always including its own; the others revert
  to the base model's values. The subset is drawn with a seed sent with the task (drawn from the run's
  seed, the round and the worker) over the blocks changed at the version the task builds on, when the
  worker syncs for it (once per task). The worker keeps the base values on disk (WORK_DIR/base), so a
  reverted block costs no bytes; the coordinator keeps the base block files for a worker that lacks
  them (one that joined late).

Where we differ from the authors' code, on purpose:
- Their `ascending` gives client i the block i mod B in every round, so with fewer clients than blocks
  only the first N blocks are ever trained; ours moves on one block per turn (the same assignment when
  N is a multiple of B).
- Their sampling may drop the block a client is about to train, which is then trained from the base
  values and overwrites the global one; ours always sends it.
- AdamW starts afresh every task (their code carries the state between clients through a `myckp`
  method that is not in their repository).
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import safetensors.torch

from .. import blocks as B
from ..messages import Patch
from ..scheduler import assign_blocks
from .base import Local, Task
from .blockwise import BlockDescent


class FedCyBGD(BlockDescent):
    name = "fedcybgd"
    summary = "FedCyBGD: cyclic blocks (relay or parallel), compressed download by layer dropping"
    catch_up_on_task = True  # a worker syncs when its turn comes, not on every new model
    defaults = {"lr": 1e-4, "local_steps": 10, "block_schedule": "striped", "train_blocks": "layers.*"}
    options = ("fedcybgd_mode", "download_fraction", "trainable")

    def __init__(self, settings, blocks, trainable):
        super().__init__(settings, blocks, trainable)
        self.mode = settings.get("fedcybgd_mode", "relay")
        self.fraction = float(settings.get("download_fraction", 1.0))
        if self.mode not in ("relay", "parallel"):
            raise ValueError(f"unknown fedcybgd mode {self.mode!r} (relay or parallel)")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"download fraction must be in (0, 1], got {self.fraction}")
        self.needs_base = self.fraction < 1
        self._base_dir: Path | None = None  # worker: the base model's values of the trainable blocks

    # ---- coordinator half --------------------------------------------------------------------

    def tasks(self, round, workers, seed, schedule):
        if self.mode == "relay":
            turn = sorted(workers)[(round - 1) % len(workers)]
            chosen = assign_blocks(schedule, round, {turn: 0}, self.trainable, seed)
        else:
            chosen = assign_blocks(schedule, round, workers, self.trainable, seed)
        if not self.needs_base:
            return {w: Task(b) for w, b in chosen.items()}
        return {w: Task(b, (random.Random(f"{seed}/download/{round}/{w}").getrandbits(31),)) for w, b in chosen.items()}

    def view(self, versions, task):
        """Layer dropping: of the changed blocks, the task's own and a seeded sample of the rest keep
        their global versions; the others are the base model's (version 0). Without a task (a worker
        starting, or syncing between tasks) the global model: a view that drops blocks is only ever
        the view of the task it was drawn for."""
        if not self.needs_base or task is None:
            return versions
        changed = [b for b in self.trainable if versions.get(b, 0) > 0]
        own = set(task.blocks)
        others = [b for b in changed if b not in own]
        n = max(0, math.ceil(self.fraction * len(changed)) - len(own & set(changed)))
        keep = own | set(random.Random(task.seeds[0] if task.seeds else 0).sample(others, min(n, len(others))))
        return {b: (v if b in keep or b not in changed else 0) for b, v in versions.items()}

    # ---- worker half -------------------------------------------------------------------------

    def fetch(self, session, version, held, target, holds=None, task_round=0) -> Patch:
        if not self.needs_base:
            return super().fetch(session, version, held, target, holds)
        kept = self._kept()
        sync = session.download(held, holds=holds, task_round=task_round, base_held=kept)
        blocks = {b.block: b.tensors for b in sync.blocks}
        for b, v in sync.block_versions.items():
            if v == 0 and b not in blocks and held.get(b, -1) != 0:  # revert to the base values we keep
                blocks[b] = safetensors.torch.load_file(self._base_dir / f"{b}.safetensors")
        return Patch(sync.version, sync.block_versions, blocks, confirmed=sync.confirmed, view_round=sync.view_round)

    def apply(self, patch: Patch, local: Local) -> set[str]:
        stale = super().apply(patch, local)
        if self.needs_base:
            self._keep_base(patch, local)
        return stale

    def _kept(self) -> set[str]:
        if self._base_dir is None:
            return set()
        return {p.name.removesuffix(".safetensors") for p in self._base_dir.glob("*.safetensors")}

    def _keep_base(self, patch: Patch, local: Local) -> None:
        """Keep the base values of the trainable blocks: those that arrive at version 0, and on the
        first patch (the start-up sync) those the local copy holds at version 0. What a work dir kept
        before this run is not trusted: it may be another model's."""
        first = self._base_dir is None
        if first:
            self._base_dir = local.work_dir / "base"
            shutil.rmtree(self._base_dir, ignore_errors=True)
            self._base_dir.mkdir(parents=True)
        kept = self._kept()
        for b in self.trainable:
            if b in kept or patch.block_versions.get(b) != 0 or not (b in patch.blocks or first):
                continue
            values = patch.blocks.get(b) or B.block_params(local.model, local.blocks[b])
            path = self._base_dir / f"{b}.safetensors"
            tmp = path.with_suffix(".tmp")  # whole or not at all: the communication thread reads these
            safetensors.torch.save_file({n: t.detach().float().contiguous().cpu() for n, t in values.items()}, tmp)
            os.replace(tmp, path)
