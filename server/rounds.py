"""The round state machine: planning, assignment delivery, update admission and closing. No I/O.

Vocabulary:
- `version`: rounds closed so far (the global model's version). Round t builds on version t-1.
- A *plan* fixes round t's participants and their blocks. The head round is version+1; the round after
  it may be planned early, as soon as a worker hands in its update for the head (its upload starts), so
  that a ParaBlock worker gets assignment t+1 without waiting for round t to close.
- A worker receives assignment r once it has handed in every earlier round it was given (or those
  rounds closed without it).
- An update is admitted if its round is open, the worker was assigned that block, it is not a duplicate
  and its base version is at most `depth` rounds stale. A checked block is *parked* until the worker's
  other blocks of the round are in too; then all of them are folded in at once (a worker's contribution
  enters whole or not at all). The head closes when every participant has reported every block, or
  after `round_timeout` with at least `min_updates` complete workers.
- Planning is a function of (round, the workers present, seed). A restarted coordinator restores the
  open rounds' plans from its checkpoint and counts the workers it waits for as present.

All methods must be called under the owner's lock; they return what the owner should do (assignments
to send) and never block.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from ..common.aggregation import RoundSums
from ..common.messages import Assignment
from ..common.scheduler import assign_blocks, learning_rate, select_workers


class Refused(Exception):
    """An update that may not enter the round, or that the coordinator refuses (bad manifest, hash,
    decoding, NaN). `reason` is a short metric label; `late` is not an error."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RoundRules:
    rounds: int
    clients_per_round: int
    min_updates: int
    round_timeout: float
    depth: int
    schedule: str
    blocks: tuple[str, ...]  # trainable blocks, in model order
    local_steps: int
    lr: float
    lr_schedule: str
    seed: int
    assign_all_blocks: bool = False  # without a planner: every worker gets every block (full-model methods)
    # The algorithm's planning: (round, {worker: number}) -> {worker: Task}. Without one, `schedule`.
    planner: Callable[[int, Mapping[str, int]], Mapping] | None = None


@dataclass
class RoundPlan:
    round: int
    assignments: dict[str, tuple[str, ...]]
    lr: float
    local_steps: int
    deadline: float = math.inf
    delivered: set[str] = field(default_factory=set)
    handed_in: set[str] = field(default_factory=set)
    reported: dict[str, set[str]] = field(default_factory=dict)
    accumulating: set[tuple[str, str]] = field(default_factory=set)  # (worker, block) being folded in
    parked: dict[str, set[str]] = field(default_factory=dict)  # worker -> blocks checked, waiting for the rest
    abandoned: set[str] = field(default_factory=set)  # gave up their part: never assigned this round again
    sums: RoundSums = field(default_factory=RoundSums)
    seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)  # worker -> its task's seeds (if any)
    records: dict[str, tuple[float, ...]] = field(default_factory=dict)  # worker -> its record update
    trained: dict[str, tuple[int, float]] = field(default_factory=dict)  # worker -> (tokens, train loss)

    def done(self, worker: str) -> bool:
        return self.reported.get(worker, set()) >= set(self.assignments[worker])

    @property
    def workers_done(self) -> int:
        return sum(1 for w in self.assignments if self.done(w))

    @property
    def complete(self) -> bool:
        return bool(self.assignments) and all(self.done(w) for w in self.assignments)

    @property
    def tokens(self) -> int:
        return sum(t for t, _ in self.trained.values())

    @property
    def train_loss(self) -> float:
        return sum(t * loss for t, loss in self.trained.values()) / self.tokens if self.tokens else math.nan

    def assignment(self, worker: str, base_version: int) -> Assignment:
        return Assignment(self.round, self.assignments[worker], self.local_steps, self.lr, base_version,
                          self.seeds.get(worker, ()))

    def to_record(self) -> dict:
        """What a checkpoint keeps of an open round: who trains what, with which seeds, at which rate."""
        return {"round": self.round, "assignments": {w: list(b) for w, b in self.assignments.items()},
                "seeds": {w: list(s) for w, s in self.seeds.items()},
                "lr": self.lr, "local_steps": self.local_steps, "abandoned": sorted(self.abandoned)}


class Rounds:
    def __init__(self, rules: RoundRules, version: int = 0, clock: Callable[[], float] | None = None):
        import time

        self.rules = rules
        self.version = version
        self.plans: dict[int, RoundPlan] = {}
        self._clock = clock or time.monotonic

    # ---- planning ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return self.version >= self.rules.rounds

    @property
    def total(self) -> int:
        """The rounds the run is to complete: --rounds, unless an operator changed it (`set_total`)."""
        return self.rules.rounds

    @property
    def committed(self) -> int:
        """The last round planned or closed: the run cannot be made shorter than this."""
        return max(self.plans, default=self.version)

    def set_total(self, rounds: int) -> None:
        """Run `rounds` rounds in all (an operator's drain or set-rounds); ValueError below `committed`.
        Rounds planned from now on take their learning rate from the new total (a cosine schedule
        stretches or shrinks); the open ones keep theirs."""
        self.check_total(rounds)
        self.rules = replace(self.rules, rounds=rounds)

    def check_total(self, rounds: int) -> None:
        """ValueError when the run cannot be made `rounds` long (fewer than are planned or done)."""
        if rounds < self.committed:
            raise ValueError(f"cannot make the run {rounds} rounds long: rounds up to {self.committed} are already "
                             "planned or done (drain ends the run after them)")

    @property
    def head(self) -> RoundPlan | None:
        return self.plans.get(self.version + 1)

    def plan(self, round: int, available: Mapping[str, int]) -> RoundPlan | None:
        """Plan `round` over the available workers; None when it cannot be planned."""
        r = self.rules
        if round in self.plans or round > r.rounds or round not in (self.version + 1, self.version + 2):
            return None
        if round == self.version + 2 and self.head is None:
            return None
        chosen = select_workers(round, list(available), r.clients_per_round, r.seed)
        if not chosen:
            return None
        plan = RoundPlan(round, {}, learning_rate(r.lr_schedule, r.lr, round, r.rounds), r.local_steps)
        # Worker i = the i-th participant by name: the same run gives the same schedule.
        self._give(plan, {w: i for i, w in enumerate(sorted(chosen))})
        if round == self.version + 1:
            self._start_clock(plan)
        self.plans[round] = plan
        return plan

    def _give(self, plan: RoundPlan, workers: Mapping[str, int]) -> None:
        """Plan the tasks of `workers` (worker -> number i) in `plan`."""
        r = self.rules
        if r.planner is not None:
            tasks = r.planner(plan.round, workers)
            assignments = {w: tuple(t.blocks) for w, t in tasks.items()}
            plan.seeds.update({w: tuple(t.seeds) for w, t in tasks.items() if t.seeds})
        elif r.assign_all_blocks:
            assignments = {w: r.blocks for w in workers}
        else:
            assignments = assign_blocks(r.schedule, plan.round, workers, r.blocks, r.seed)
        plan.assignments.update(assignments)
        for w in assignments:
            plan.reported[w] = set()

    def restore(self, records: Sequence[Mapping]) -> None:
        """Open rounds' plans from a checkpoint (see `RoundPlan.to_record`); nothing is delivered yet.
        Raises ValueError for a record that is not a plan this run could have made (its blocks must be
        trainable now, its learning rate finite and positive, its steps at least one)."""
        if not isinstance(records, list):
            raise ValueError(f"plans must be a list, not {type(records).__name__}")
        plans = {}
        for rec in records:
            plan = self._plan_from_record(rec)
            if self.version < plan.round <= self.rules.rounds:
                plans[plan.round] = plan
        if self.version + 1 not in plans:  # a later round without its head cannot be handed in yet
            return
        for round, plan in sorted(plans.items()):
            if round == self.version + 1:
                self._start_clock(plan)
            self.plans[round] = plan

    def _plan_from_record(self, rec) -> RoundPlan:
        try:
            round, lr, steps = int(rec["round"]), float(rec["lr"]), int(rec["local_steps"])
            assignments = {str(w): tuple(str(b) for b in blocks) for w, blocks in dict(rec["assignments"]).items()}
            abandoned = {str(w) for w in rec.get("abandoned", ())}
            seeds = {str(w): tuple(int(x) for x in s) for w, s in dict(rec.get("seeds", {})).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed plan record ({type(e).__name__}: {e})") from None
        if not (math.isfinite(lr) and lr > 0 and steps >= 1 and assignments):
            raise ValueError(f"implausible plan record for round {round}: lr {lr}, local steps {steps}")
        for w, blocks in assignments.items():
            if not blocks or not set(blocks) <= set(self.rules.blocks):
                raise ValueError(f"round {round} plan gives {w!r} blocks {list(blocks)[:3]} outside the trainable ones")
        plan = RoundPlan(round, assignments, lr, steps, abandoned=abandoned, seeds=seeds)
        plan.reported = {w: set() for w in assignments}
        return plan

    def records(self) -> list[dict]:
        return [self.plans[r].to_record() for r in sorted(self.plans)]

    def _start_clock(self, plan: RoundPlan) -> None:
        if self.rules.round_timeout > 0:
            plan.deadline = self._clock() + self.rules.round_timeout

    def deliveries(self) -> list[tuple[str, Assignment]]:
        """Assignments that may go out now; marks them delivered."""
        out = []
        for round in sorted(self.plans):
            plan = self.plans[round]
            for worker in plan.assignments:
                if worker in plan.delivered:
                    continue
                earlier = [p for r, p in self.plans.items() if r < round and worker in p.delivered]
                if all(worker in p.handed_in for p in earlier):
                    plan.delivered.add(worker)
                    out.append((worker, plan.assignment(worker, round - 1)))
        return out

    # ---- workers coming and going ----------------------------------------------------------------

    def rejoined(self, worker: str) -> None:
        """A worker's new session must be sent again what it was given and has not completed: a process
        started again under the same name lost what it had handed in but not finished sending (the old
        one, re-joining, knows those assignments and sends the rest of its update)."""
        for plan in self.plans.values():
            if worker in plan.assignments and not plan.done(worker):
                plan.delivered.discard(worker)
                plan.handed_in.discard(worker)

    def departed(self, worker: str) -> None:
        """Drop a gone worker from every round it has not completed (it may be given them again when it
        comes back: what it was sending is still on its way)."""
        for round in list(self.plans):
            self.abandon(worker, round, for_good=False)

    def abandon(self, worker: str, round: int, for_good: bool = True) -> bool:
        """The worker's part in `round` ends without (more of) its update; True if it had one.
        Blocks of it that wait for the rest are dropped. `for_good`: its update was refused and
        a new try would be refused again, so the round is never given to it again (others may take
        its place through `top_up`, or the round closes without it)."""
        plan = self.plans.get(round)
        if plan is None or worker not in plan.assignments or plan.done(worker):
            return False
        if any(w == worker for w, _ in plan.accumulating):
            return False  # an update of it is being folded in right now: let that finish
        del plan.assignments[worker]
        plan.delivered.discard(worker)
        plan.parked.pop(worker, None)  # a contribution enters whole or not at all
        if for_good:
            plan.abandoned.add(worker)
        elif not plan.assignments and not plan.abandoned:
            del self.plans[round]  # nobody left: plan it again when workers are there
        return True

    def top_up(self, available: Mapping[str, int]) -> None:
        """Add idle workers to a head round that cannot reach `min_updates` with its own participants."""
        plan = self.head
        if plan is None:
            return
        short = self.rules.min_updates - len(plan.assignments)
        if short <= 0:
            return
        busy = {w for p in self.plans.values() for w in p.assignments} | plan.abandoned
        extra = [w for w in available if w not in busy]
        if not extra:
            return
        chosen = sorted(extra)[:short]
        first = len(plan.assignments)
        self._give(plan, {w: first + i for i, w in enumerate(chosen)})

    # ---- updates -----------------------------------------------------------------------------

    def admit(self, worker: str, round: int, block: str, base_version: int) -> RoundPlan:
        """Check an update's header; raises Refused."""
        if round <= self.version:
            raise Refused("late", f"round {round} is already closed (model version {self.version})")
        plan = self.plans.get(round)
        if plan is None and round <= min(self.version + 2, self.rules.rounds):
            # Not planned yet (a restarted coordinator waits for its workers): worth sending again later.
            raise Refused("not_planned", f"round {round} is not planned yet; send it again later")
        if plan is None or worker not in plan.assignments:
            raise Refused("not_assigned", f"worker {worker!r} has no assignment in round {round}")
        if block not in plan.assignments[worker]:
            raise Refused("wrong_block", f"round {round} assigned {list(plan.assignments[worker])} to {worker!r}, not {block!r}")
        if block in plan.reported[worker] or block in plan.parked.get(worker, ()) or (worker, block) in plan.accumulating:
            raise Refused("duplicate", f"{worker!r} already delivered {block!r} for round {round}")
        if not round - 1 - self.rules.depth <= base_version <= self.version:
            raise Refused(
                "stale_base",
                f"base version {base_version} outside {round - 1 - self.rules.depth}..{self.version} for round {round}",
            )
        return plan

    def admit_record(self, worker: str, round: int, base_version: int) -> RoundPlan:
        """Check a record update's header (it covers the worker's whole task); raises Refused."""
        plan = self.plans.get(round)
        blocks = plan.assignments.get(worker, ()) if plan is not None else ()
        return self.admit(worker, round, blocks[0] if blocks else "", base_version)

    def has_update(self, worker: str, round: int, block: str) -> bool:
        """Whether the worker's update of `block` for `round` is in (or parked), or no longer wanted."""
        plan = self.plans.get(round)
        return round <= self.version or (
            plan is not None and (block in plan.reported.get(worker, ()) or block in plan.parked.get(worker, ()))
        )

    def hand_in(self, worker: str, round: int, available: Mapping[str, int]) -> None:
        """A worker started delivering round `round`: it is ready for its next assignment."""
        plan = self.plans.get(round)
        if plan is not None and worker in plan.assignments:
            plan.handed_in.add(worker)
        if round == self.version + 1:
            self.plan(round + 1, available)

    def park(self, worker: str, round: int, block: str, base_version: int) -> RoundPlan | None:
        """A checked block of the worker's update waits for its other blocks. When all are in, they are
        marked as being folded in and the plan is returned (fold them, then `end_fold`); else None.
        Raises Refused."""
        plan = self.admit(worker, round, block, base_version)
        parked = plan.parked.setdefault(worker, set())
        parked.add(block)
        if parked < set(plan.assignments[worker]):
            return None
        del plan.parked[worker]
        plan.accumulating.update((worker, b) for b in parked)
        return plan

    def end_fold(self, plan: RoundPlan, worker: str, blocks, ok: bool, tokens: int = 0, loss: float = 0.0) -> None:
        for b in blocks:
            plan.accumulating.discard((worker, b))
        if ok and worker in plan.reported:
            plan.reported[worker].update(blocks)
            plan.trained[worker] = (tokens, loss)

    # ---- closing -----------------------------------------------------------------------------

    def closable(self, connected: Sequence[str]) -> RoundPlan | None:
        """The head round if it may close now."""
        plan = self.head
        if plan is None or plan.accumulating:
            return None
        if plan.complete:
            return plan
        done = plan.workers_done
        if done >= self.rules.min_updates and self._clock() >= plan.deadline:
            return plan
        pending = [w for w in plan.assignments if not plan.done(w) and w in connected]
        # Nobody left to wait for: close with what there is, or with less than --min-updates when
        # participants gave up their part (waiting would be forever if nobody else comes).
        if not pending and (done >= self.rules.min_updates or plan.abandoned):
            return plan
        return None

    def close(self, plan: RoundPlan, available: Mapping[str, int]) -> None:
        """Mark the head closed: the version advances and the next round's clock starts."""
        assert plan.round == self.version + 1
        del self.plans[plan.round]
        for w in [w for w in plan.assignments if not plan.done(w)]:
            del plan.assignments[w]  # the ones that did not make it: late from now on
        self.version = plan.round
        nxt = self.plans.get(self.version + 1)
        if nxt is not None:
            self._start_clock(nxt)
        else:
            self.plan(self.version + 1, available)
