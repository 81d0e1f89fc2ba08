"""Zeroth-order methods: only seeds go down and a few scalars come up.

`decomfl` (DeComFL, Li et al., ICLR 2025), as its authors' code runs it: the coordinator draws K seeds
per round (one per local step). A participant brings its model to the round's base version by
replaying the log, runs K ZO-SGD steps with P perturbations each (central or forward differences,
`--zo-perturbations`, `--zo-mu`, `--zo-estimator`) and uploads the K*P directional derivatives. The
coordinator aggregates them per (step, perturbation) over the participants (mean, or `--zo-aggregate
median|trimmed`), appends (round, lr, seeds, scalars) to the log and replays it on its replica. Because
every party regenerates the same directions from the seeds, averaging scalars is averaging updates,
and the participant's own trajectory is discarded: it goes back to its copy of the model at its last
sync (a float32 file in its work dir) and replays the log from there next time.

`fedspzo` (FedSPZO, our reading of its public description): the model is split at `--zo-split L` into
block 1 (embeddings and layers below L) and block 2 (the rest); P1 perturbations of block 1 and, for each,
P2 of block 2 (`--zo-perturbations P1,P2`), P1*P2 joint directions in all, with block 1's output computed
once per block-1 perturbation and reused for its P2 block-2 perturbations. Its default split is the
lowest one at which a step costs at most half of DeComFL's layer evaluations for P = P1*P2.

Directions come from common/zo.py's device-independent generator; parameter order (its `index`) is the
trainable blocks in model order, and each block's tensors in the run's block layout order.

Catch-up: a worker at version v is sent the log entries v+1..current, unless replaying them would cost
more than `--zo-replay-limit` parameter-direction updates ((rounds missed) x K x P x parameters), or
the log no longer reaches back to v: then it downloads the blocks (the replica as last written, at most
half that limit behind) and replays from there. The coordinator writes its replica's blocks whenever it
has moved half the limit since it last did, so a download never needs much replay.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import threading
from collections.abc import Iterable, Mapping, Sequence

import torch

from .. import blocks as B
from .. import zo
from ..aggregation import is_finite
from ..messages import Assignment, CatchUp, LogEntry, Patch, Update
from .base import Algorithm, Local, Stopped, Task, Tensors

SNAPSHOT_FILE = "zo-model.f32"
MAX_LOSS_DIFFERENCE = 1000.0  # bounds a reported scalar: |g| <= this / (2 mu)


def aggregate(values: Sequence[float], how: str) -> float:
    """One (step, perturbation)'s scalar over the participants."""
    if how == "mean":
        return math.fsum(values) / len(values)
    if how == "median":
        return float(statistics.median(values))
    if how == "trimmed":  # drop the lowest and highest tenth (at least one each from three values on)
        cut = max(1, len(values) // 10) if len(values) >= 3 else 0
        kept = sorted(values)[cut : len(values) - cut]
        return math.fsum(kept) / len(kept)
    raise ValueError(f"unknown --zo-aggregate {how!r}")


def round_seeds(seed: int, round: int, steps: int) -> tuple[int, ...]:
    """The K seeds of a round: a function of (run seed, round)."""
    rng = random.Random(f"{seed}/zo/{round}")
    return tuple(rng.getrandbits(32) for _ in range(steps))


def _layers(name: str) -> tuple[int, int] | None:
    """(first, last) decoder layer of a block named layers.I or layers.I-J; None for other blocks."""
    if not name.startswith("layers."):
        return None
    first, _, last = name.removeprefix("layers.").partition("-")
    return int(first), int(last or first)


class DeComFL(Algorithm):
    name = "decomfl"
    summary = "zeroth-order: K seeds down, K*P scalars up; the model is rebuilt by replaying a log"
    records = True
    catch_up_on_task = True
    defaults = {"lr": 1e-5, "local_steps": 1, "block_schedule": "round-robin", "train_blocks": "*",
                "zo_perturbations": "5"}
    options = ("zo_perturbations", "zo_mu", "zo_estimator", "trainable")

    def __init__(self, settings, blocks, trainable):
        super().__init__(settings, blocks, trainable)
        self.mu = float(settings.get("zo_mu", 1e-3))
        self.estimator = settings.get("zo_estimator", "central")
        self.how = settings.get("zo_aggregate", "mean")
        self.replay_limit = float(settings.get("zo_replay_limit", 1e11))
        self._parse_perturbations(settings.get("zo_perturbations", "5"))
        specs = {s.name: s for s in self.specs}
        # Parameter order of the directions: trainable blocks in model order, each block's tensors in order.
        self.order = [(b, t.name) for b in self.trainable for t in specs[b].tensors]
        self.numel = sum(math.prod(t.shape) for b in self.trainable for t in specs[b].tensors)
        self.log: list[LogEntry] = []  # coordinator: rounds after `oldest`, in order
        self.held: dict[str, int] = {}  # coordinator: worker -> version of its copy, as last heard
        self.files_version = 0  # coordinator: the version its block files hold
        self.written = [0]  # coordinator: versions whose block files it wrote, recent ones (downloads)
        self._snapshot = None  # worker: its copy at its last sync
        self._summed = None  # worker on a site of several processes: the loss summed over them
        self._lock = threading.Lock()

    def _parse_perturbations(self, text: str) -> None:
        self.P = int(text)
        if self.P < 1:
            raise ValueError("--zo-perturbations must be >= 1")
        self.per_step = self.P

    def step_cost(self) -> float:
        """Parameter-direction updates to replay one local step."""
        return self.per_step * self.numel

    # ---- the update rule, shared by the coordinator's replica and the workers ---------------------

    def steps(self, entry_seeds: Sequence[int], scalars: Sequence[float], lr: float, index: int) -> list:
        """(seed, direction, coefficient) for parameter `index`, for one round's K steps in order."""
        n = self.per_step
        out = []
        for k, seed in enumerate(entry_seeds):
            out += zo.steps_for(seed, scalars[k * n : (k + 1) * n], lr)
        return out

    def replay(self, params: Sequence[torch.Tensor], entries: Iterable[LogEntry]) -> None:
        entries = list(entries)
        for i, p in enumerate(params):  # parameter by parameter: element-wise, so the same bits
            steps = [s for e in entries for s in self.steps(e.seeds, e.scalars, e.lr, i)]
            zo.replay_(p, i, steps)

    # ---- coordinator half --------------------------------------------------------------------

    def tasks(self, round, workers, seed, schedule):
        seeds = round_seeds(seed, round, int(self.settings.get("local_steps", 1)))
        return {w: Task(self.trainable, seeds) for w in workers}

    def check(self, task: Task, numbers: Sequence[float]) -> None:
        want = len(task.seeds) * self.per_step
        if len(numbers) != want:
            raise ValueError(f"expected {want} scalars ({len(task.seeds)} steps x {self.per_step}), got {len(numbers)}")
        if not all(math.isfinite(x) for x in numbers):
            raise ValueError("the scalars contain NaN or Inf")
        # A scalar is a loss difference over 2*mu: no two forward losses of one batch differ by 1,000.
        bound = MAX_LOSS_DIFFERENCE / (2 * self.mu)
        if any(abs(x) > bound for x in numbers):
            raise ValueError(f"a scalar exceeds {bound:.3g} (a loss difference above {MAX_LOSS_DIFFERENCE:g})")

    def check_entry(self, e: LogEntry) -> None:
        if len(e.scalars) != len(e.seeds) * self.per_step or not all(math.isfinite(x) for x in e.scalars):
            raise ValueError(f"log entry of round {e.round} holds {len(e.scalars)} scalars for {len(e.seeds)} seeds; "
                             f"this run takes {self.per_step} per seed")

    def close(self, plan, model: Mapping[str, Tensors]) -> dict[str, Tensors]:
        reports = list(plan.records.values())
        if reports:
            seeds = next(iter(plan.seeds.values()))
            scalars = tuple(zo.f32(aggregate([r[i] for r in reports], self.how)) for i in range(len(reports[0])))
        else:  # closed without a report (its participants gave up): the model stays as it is
            seeds, scalars = (), ()
        entry = LogEntry(plan.round, plan.lr, seeds, scalars)
        params = self._params(model)
        self.replay(params, [entry])  # the replica, in place: only the coordinator's run thread reads it
        if not is_finite(dict(enumerate(params))):  # nothing of this round is kept: the run cannot go on
            raise FloatingPointError(f"round {plan.round}: the replica overflowed replaying the round's scalars")
        steps = int(self.settings.get("local_steps", 1))
        with self._lock:  # catch_up reads the log from the service's threads
            self.log.append(entry)
            for w in plan.records:
                self.held[w] = max(self.held.get(w, 0), plan.round - 1)
            changed = {}
            if (plan.round - self.files_version) * steps * self.step_cost() > self.replay_limit / 2:
                self.files_version = plan.round
                changed = {b: model[b] for b in self.trainable}  # the replica's blocks, written as they are
            # Keep what a worker may still replay: from block files it may be downloading (those written
            # in the last two limits' worth of rounds, and the ones announced now), and from its own copy
            # within the limit; but not what every known worker holds already.
            worth = int(self.replay_limit // (steps * self.step_cost()))
            horizon = plan.round - 2 * worth - 1
            downloading = [f for f in self.written if f >= horizon] or [self.written[-1]]
            keep_after = min(*downloading, max(min(self.held.values(), default=0), horizon))
            self.written = [f for f in self.written if f >= min(downloading)] + ([plan.round] if changed else [])
            self.log = [e for e in self.log if e.round > keep_after]
        return changed

    def _params(self, model: Mapping[str, Tensors]) -> list[torch.Tensor]:
        return [model[b][n] for b, n in self.order]

    def catch_up(self, held: int, version: int, worker: str | None = None, after_download: bool = False) -> CatchUp:
        steps = int(self.settings.get("local_steps", 1))
        with self._lock:
            oldest = self.log[0].round - 1 if self.log else version
            # Replaying from blocks just downloaded is never worth a download again.
            too_costly = (version - held) * steps * self.step_cost() > self.replay_limit and not after_download
            if held > version or held < oldest or too_costly:
                return CatchUp(version, download=True)
            if worker is not None:
                self.held[worker] = held
            return CatchUp(version, tuple(e for e in self.log if held < e.round <= version))

    def state(self) -> dict:
        with self._lock:
            return {"log": [e.to_record() for e in self.log], "held": dict(self.held),
                    "files_version": self.files_version, "written": list(self.written)}

    def restore(self, state, model, version) -> int:
        try:
            self.log = [LogEntry.from_record(r) for r in state.get("log", [])]
            self.held = {str(w): int(v) for w, v in dict(state.get("held", {})).items()}
            self.files_version = int(state.get("files_version", 0))
            self.written = [int(f) for f in state.get("written", [self.files_version])] or [self.files_version]
        except (TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed zeroth-order state in the checkpoint ({e})") from None
        for e in self.log:
            self.check_entry(e)
        todo = [e for e in self.log if e.round > self.files_version]
        if [e.round for e in todo] != list(range(self.files_version + 1, version + 1)):
            raise ValueError(f"the checkpoint's log does not hold rounds {self.files_version + 1}..{version}")
        self.replay(self._params(model), todo)
        return self.files_version

    # ---- worker half -------------------------------------------------------------------------

    def fetch(self, session, version, held, target, holds=None, task_round=0) -> Patch:
        reply = session.log(version)
        if not reply.download:
            return Patch(reply.version, {}, {}, reply.entries)
        sync = session.download({})
        blocks = {b.block: b.tensors for b in sync.blocks}
        reply = session.log(sync.version, after_download=True)
        if reply.download:
            raise ConnectionError(f"the coordinator cannot catch us up from the blocks it sent (version {sync.version})")
        return Patch(reply.version, sync.block_versions, blocks, reply.entries)

    def apply(self, patch: Patch, local: Local) -> None:
        snapshot = self._snapshot_of(local)
        params = self._local_params(local)
        if patch.blocks:
            for block, tensors in patch.blocks.items():
                B.assign_(B.block_params(local.model, local.blocks[block]), tensors)
            # The exact copy from the float32 values that came, not from a bfloat16 model's rounding of them.
            by_name = {n: t for tensors in patch.blocks.values() for n, t in tensors.items()}
            snapshot.write([by_name.get(n, p) for (_, n), p in zip(self.order, params, strict=True)])
        # A log entry is the same wherever it comes from: skip those the copy already has (a catch-up
        # asked for again after a re-join), and never replay across a gap.
        at = min(e.round for e in patch.entries) - 1 if patch.blocks and patch.entries else local.version()
        entries = [e for e in patch.entries if e.round > at]
        for e in entries:
            self.check_entry(e)
        if entries and [e.round for e in entries] != list(range(at + 1, at + 1 + len(entries))):
            raise RuntimeError(f"log entries {[e.round for e in entries][:3]}... do not continue version {at}")
        if entries:
            for i, p in enumerate(params):  # on the model's device: the directions are the same bits there
                exact = snapshot.read(i).to(p.device)
                zo.replay_(exact, i, [s for e in entries for s in self.steps(e.seeds, e.scalars, e.lr, i)])
                snapshot.write_one(i, exact)
                with torch.no_grad():
                    p.copy_(exact)

    def run(self, a: Assignment, local: Local) -> Update:
        model = local.model
        model.eval()  # ZO forward passes: no dropout
        params = self._local_params(local)
        snapshot = self._snapshot_of(local)
        batches = local.stream.round(a.round)
        numbers: list[float] = []
        rows, loss_sum = 0, 0.0
        try:
            for k, seed in enumerate(a.seeds):
                if local.stop.is_set():
                    raise Stopped
                batch = {key: v.to(params[0].device) for key, v in next(batches).items()}
                scalars, loss = self.estimate(local, params, batch, seed)
                if k < len(a.seeds) - 1:  # the last step's own update would be undone at once (below)
                    self.local_step(params, seed, scalars, a.learning_rate)
                numbers += scalars
                n = local.stream.batch_size  # the site's batch: this process may hold only some of its rows
                rows += n
                loss_sum += loss * n
                local.on_step(f"round {a.round}: zeroth-order step {k + 1}/{len(a.seeds)}", loss)
        finally:  # back to the copy at the last sync: the global model follows the averaged scalars
            snapshot.restore(params)
        return Update(a.round, local.version(), {}, rows, loss_sum / rows if rows else math.nan, tuple(numbers))

    def estimate(self, local: Local, params, batch, seed: int) -> tuple[list[float], float]:
        settings = zo.ZOSettings(self.P, self.mu, self.estimator)
        return zo.estimate(local.model, params, batch, seed, settings, self._loss_fn(local))

    def _loss_fn(self, local: Local):
        """task_loss, or on a site of several processes its mean over the site's batch (one function per
        run: zo.SplitForward primes each loss function once)."""
        from ..training import task_loss

        if local.parallel is None:
            return task_loss
        if self._summed is None:
            self._summed = local.parallel.mean_loss(task_loss)
        return self._summed

    def local_step(self, params, seed: int, scalars, lr: float) -> None:
        for i, p in enumerate(params):
            zo.replay_(p, i, self.steps((seed,), scalars, lr, i))

    def _local_params(self, local: Local) -> list[torch.Tensor]:
        named = dict(local.model.named_parameters())
        return [named[n] for _, n in self.order]

    def _snapshot_of(self, local: Local) -> _Snapshot:
        if self._snapshot is None:
            self._snapshot = _Snapshot(local.work_dir / SNAPSHOT_FILE, self._local_params(local))
        return self._snapshot


class _Snapshot:
    """The worker's exact float32 copy of its trainable parameters at its last sync, in a file (so it
    costs no memory): read back to reset the model and to replay the log on."""

    def __init__(self, path, params: Sequence[torch.Tensor]):
        self.path = path
        self.shapes = [p.shape for p in params]
        self.offsets = [0]
        for p in params:
            self.offsets.append(self.offsets[-1] + p.numel() * 4)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(self.offsets[-1])
        self.write(params)

    def write(self, tensors: Sequence[torch.Tensor]) -> None:
        for i, t in enumerate(tensors):
            self.write_one(i, t)

    def write_one(self, i: int, t: torch.Tensor) -> None:
        data = t.detach().to("cpu", torch.float32).contiguous().numpy()
        with open(self.path, "r+b") as f:
            os.pwrite(f.fileno(), memoryview(data).cast("B"), self.offsets[i])

    def read(self, i: int) -> torch.Tensor:
        n = self.offsets[i + 1] - self.offsets[i]
        buf = bytearray(n)
        with open(self.path, "rb") as f:
            if os.preadv(f.fileno(), [buf], self.offsets[i]) != n:
                raise OSError(f"{self.path}: short read")
        return torch.frombuffer(buf, dtype=torch.float32).reshape(self.shapes[i])

    def restore(self, params: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(self.read(i))


class FedSPZO(DeComFL):
    name = "fedspzo"
    summary = "split-perturbation zeroth-order: P1 perturbations below --zo-split, P2 above for each"
    defaults = {**DeComFL.defaults, "zo_perturbations": "1,8"}
    options = (*DeComFL.options, "zo_split")

    def __init__(self, settings, blocks, trainable):
        super().__init__(settings, blocks, trainable)
        layer_blocks = [r for s in self.specs if (r := _layers(s.name)) is not None]
        self.num_layers = max(last for _, last in layer_blocks) + 1 if layer_blocks else 0
        if self.num_layers < 2:
            raise ValueError("fedspzo needs a model of at least two decoder layers")
        boundaries = sorted(first for first, _ in layer_blocks if first > 0)  # where a block can start
        split = int(settings.get("zo_split", 0) or 0)
        if split:
            self.split = split
            if not 1 <= split < self.num_layers:
                raise ValueError(f"--zo-split must be 1..{self.num_layers - 1} for a model of {self.num_layers} layers")
            if split not in boundaries:
                raise ValueError(f"--zo-split {split} falls inside a block: use a multiple of --layers-per-block")
        else:  # the default, moved up to where a block starts (a later split only costs less)
            wanted = zo.default_split(self.num_layers, self.P1, self.P2)
            self.split = next((b for b in boundaries if b >= wanted), boundaries[-1] if boundaries else 0)
            if not self.split:
                raise ValueError("fedspzo needs at least two blocks of decoder layers")
        # Block 1: everything computed below the split (embeddings: a tied head weight too); block 2: the rest.
        below = {s.name for s in self.specs if (r := _layers(s.name)) is None and s.name == "embed"
                 or (r is not None and r[1] < self.split)}
        self.n1 = sum(1 for b, _ in self.order if b in below)
        if [b in below for b, _ in self.order] != [True] * self.n1 + [False] * (len(self.order) - self.n1):
            raise ValueError("fedspzo: the trainable blocks below the split must come first in model order")
        if not 0 < self.n1 < len(self.order):
            raise ValueError(f"fedspzo: --zo-split {self.split} leaves no trainable block on one side "
                             "(see --train-blocks)")

    def _parse_perturbations(self, text: str) -> None:
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise ValueError(f"fedspzo: --zo-perturbations must be P1,P2 (e.g. 1,8), got {text!r}")
        self.P1, self.P2 = int(parts[0]), int(parts[1])
        self.P = self.P1 * self.P2
        self.per_step = self.P

    def steps(self, entry_seeds, scalars, lr, index):
        n = self.per_step
        out = []
        for k, seed in enumerate(entry_seeds):
            block1, block2 = zo.spzo_steps(seed, scalars[k * n : (k + 1) * n], lr, self.P1, self.P2, 1, 1)
            out += block1 if index < self.n1 else block2
        return out

    def estimate(self, local: Local, params, batch, seed: int) -> tuple[list[float], float]:
        return zo.spzo_estimate(local.model, self.split, params[: self.n1], params[self.n1 :], batch, seed,
                                self.P1, self.P2, self.mu, self._loss_fn(local))
