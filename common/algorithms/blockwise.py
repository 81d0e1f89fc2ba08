"""First-order block methods: a worker trains some blocks with AdamW and sends their deltas.

- `fedbcd`: federated block coordinate descent; a worker waits for round t-1's global model.
- `parablock`: the same, but a worker trains round t at once on a model one round stale, while its
  communication thread sends round t-1; new global blocks are patched in at step boundaries, and the
  block being trained is rebased: w <- w + (g - s), s <- g (its own progress kept, moved onto g).
- `fedavg`: every worker trains every trainable block (full-model federated averaging).

The coordinator folds each delta into a running token-weighted mean per block (aggregation.RoundSums)
and adds the mean to the global block when the round closes.
"""

from __future__ import annotations

from .. import blocks as B
from ..aggregation import apply_mean
from ..messages import Assignment, Patch, Update
from ..scheduler import assign_blocks
from .base import Algorithm, Local, Stopped, Task, Tensors


class BlockDescent(Algorithm):
    name = "fedbcd"
    summary = "federated block coordinate descent: one block per worker, synchronous"
    all_blocks = False  # every worker trains every trainable block
    shardable = True
    defaults = {"lr": 1e-4, "local_steps": 10, "block_schedule": "round-robin", "train_blocks": "*"}

    def __init__(self, settings, blocks, trainable):
        super().__init__(settings, blocks, trainable)
        self._training: dict[str, Tensors] = {}  # worker: block -> live params, during a round
        self._start: dict[str, Tensors] = {}  # worker: block -> start values s_b, during a round

    # ---- coordinator half --------------------------------------------------------------------

    def tasks(self, round, workers, seed, schedule):
        if self.all_blocks:
            return {w: Task(self.trainable) for w in workers}
        return {w: Task(b) for w, b in assign_blocks(schedule, round, workers, self.trainable, seed).items()}

    def close(self, plan, model):
        """g + the token-weighted mean delta, for every block that received updates."""
        return {b: self.step(model[b], plan.sums.mean(b), plan.lr) for b in plan.sums.blocks}

    def step(self, block: Tensors, mean: Tensors, lr: float) -> Tensors:
        """The new global block from its mean delta (the workers' lr is already in the delta)."""
        return apply_mean(block, mean)

    # ---- worker half -------------------------------------------------------------------------

    def run(self, a: Assignment, local: Local) -> Update:
        trainer = local.trainer
        trainer.begin_round(a.blocks)
        self._training = {b: B.block_params(local.model, local.blocks[b]) for b in a.blocks}
        self._start = {b: B.snapshot(p) for b, p in self._training.items()}
        base_version = local.version()
        tokens, loss_sum = 0, 0.0
        batches = local.stream.round(a.round)
        try:
            for k in range(a.local_steps):
                if local.stop.is_set():
                    raise Stopped
                if local.boundary():
                    base_version = local.version()
                # Dropout seeded from (worker seed, round, step): a round run again gives the same update.
                result = trainer.step(next(batches), a.learning_rate, seed=(local.stream.seed, a.round, k))
                tokens += result.tokens
                loss_sum += result.loss * result.tokens
                local.on_step(f"round {a.round}: {'+'.join(a.blocks)[:40]} step {k + 1}/{a.local_steps}", result.loss)
            if local.boundary():
                base_version = local.version()
            # On a GPU the deltas go to pinned host memory on a side stream: the next round's steps do
            # not wait for the copy, the communication thread does (when it reads them).
            deltas = {b: B.to_host_async(B.take_delta_(self._training[b], self._start[b])) for b in a.blocks}
        finally:
            self._training, self._start = {}, {}
        loss = loss_sum / tokens if tokens else float("nan")
        return Update(a.round, base_version, deltas, tokens, loss)

    def apply(self, patch: Patch, local: Local) -> set[str]:
        for name, tensors in patch.blocks.items():
            live = self._training.get(name)
            if live is not None:  # the block being trained: keep our progress, rebased on the new global
                B.rebase_(live, self._start[name], tensors)
            else:
                B.assign_(B.block_params(local.model, local.blocks[name]), tensors)
        return self.check_confirmed(patch, local)

    def check_confirmed(self, patch: Patch, local: Local) -> set[str]:
        """The confirmed blocks whose local copy (its start values, for the block being trained) is
        not the value confirmed: a patch applied after the claim was made changed it."""
        names = {s.name: [t.name for t in s.tensors] for s in local.specs}
        stale = set()
        for name, sha in patch.confirmed.items():
            values = self._start.get(name) or B.block_params(local.model, local.blocks[name])
            if B.canonical_sha256(values, names[name]) != sha:
                stale.add(name)
        return stale


class ParaBlock(BlockDescent):
    name = "parablock"
    summary = "fedbcd with communication overlapped with the next round's training"
    pipeline_depth = 1
    # Consecutive rounds on disjoint blocks: a round trained on a model one round stale then never
    # trains the block a neighbour changed in the round before (see scheduler.py).
    defaults = {**BlockDescent.defaults, "block_schedule": "striped"}


class FedAvg(BlockDescent):
    name = "fedavg"
    summary = "full-model federated averaging (the baseline): whole-model deltas"
    all_blocks = True
