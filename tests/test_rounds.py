"""The round state machine and the schedules, without network or tensors."""

import pytest

from fedblock.common.scheduler import assign_blocks, learning_rate, select_workers
from fedblock.server.rounds import Refused, RoundRules, Rounds

BLOCKS = ("embed", "layers.0", "layers.1", "head")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def rules(**kw):
    base = dict(rounds=5, clients_per_round=0, min_updates=1, round_timeout=0.0, depth=1, schedule="round-robin",
                blocks=BLOCKS, local_steps=4, lr=1e-3, lr_schedule="constant", seed=0)
    return RoundRules(**{**base, **kw})


WORKERS = {"a": 0, "b": 1, "c": 2}


def report(r, worker, round, blocks=None, base=None):
    plan = r.plans[round]
    for block in blocks or plan.assignments[worker]:
        p = r.park(worker, round, block, round - 1 if base is None else base)
        if p is not None:
            r.end_fold(p, worker, plan.assignments[worker], ok=True, tokens=10, loss=1.0)


# ---- schedules ---------------------------------------------------------------------------------


def test_round_robin_gives_everyone_the_same_block_in_turn():
    got = [assign_blocks("round-robin", t, WORKERS, BLOCKS, 0) for t in range(1, 6)]
    assert [g["a"] for g in got] == [("embed",), ("layers.0",), ("layers.1",), ("head",), ("embed",)]
    assert all(len(set(g.values())) == 1 for g in got)


def test_staggered_spreads_workers_over_blocks():
    got = assign_blocks("staggered", 1, WORKERS, BLOCKS, 0)
    assert got == {"a": ("embed",), "b": ("layers.0",), "c": ("layers.1",)}
    assert assign_blocks("staggered", 2, WORKERS, BLOCKS, 0)["a"] == ("layers.0",)


def test_striped_keeps_consecutive_rounds_on_disjoint_blocks():
    blocks = tuple(f"layers.{i}" for i in range(12))
    rounds = [assign_blocks("striped", t, WORKERS, blocks, 0) for t in range(1, 6)]
    covered = [{b for (b,) in r.values()} for r in rounds]
    assert all(len(c) == 3 for c in covered)  # one block per worker, all different
    assert all(not (a & b) for a, b in zip(covered, covered[1:], strict=False))
    assert covered[0] | covered[1] | covered[2] | covered[3] == set(blocks)  # a sweep every B/P rounds


def test_random_is_seeded():
    a = [assign_blocks("random", t, WORKERS, BLOCKS, 7) for t in range(1, 30)]
    assert a == [assign_blocks("random", t, WORKERS, BLOCKS, 7) for t in range(1, 30)]
    assert a != [assign_blocks("random", t, WORKERS, BLOCKS, 8) for t in range(1, 30)]
    assert {g["a"][0] for g in a} == set(BLOCKS)


def test_worker_selection_and_learning_rate():
    assert select_workers(3, ["c", "a", "b"], 0, 0) == ["a", "b", "c"]
    picks = {tuple(select_workers(t, ["a", "b", "c", "d"], 2, 0)) for t in range(20)}
    assert all(len(p) == 2 for p in picks) and len(picks) > 1
    assert learning_rate("constant", 0.1, 7, 10) == 0.1
    assert learning_rate("cosine", 0.1, 1, 10) == pytest.approx(0.1)
    assert learning_rate("cosine", 0.1, 10, 10) == pytest.approx(0.01)


# ---- planning and delivery ----------------------------------------------------------------------


def test_first_round_goes_to_everyone_and_next_is_planned_on_hand_in():
    r = Rounds(rules())
    plan = r.plan(1, WORKERS)
    assert set(plan.assignments) == set(WORKERS)
    sent = r.deliveries()
    assert sorted(w for w, _ in sent) == ["a", "b", "c"]
    assert all(a.round == 1 and a.base_version == 0 and a.blocks == ("embed",) for _, a in sent)
    assert r.deliveries() == []  # nothing twice
    r.admit("a", 1, "embed", 0)
    r.hand_in("a", 1, WORKERS)
    assert 2 in r.plans  # planned early so that a ParaBlock worker gets round 2 now
    sent = r.deliveries()
    assert [(w, a.round) for w, a in sent] == [("a", 2)]  # b and c have not handed in round 1 yet
    assert r.plan(3, WORKERS) is None  # never more than one round ahead of the head


def test_round_closes_when_everyone_reported_and_version_advances():
    r = Rounds(rules())
    r.plan(1, WORKERS)
    for w in WORKERS:
        assert r.closable(list(WORKERS)) is None
        assert not r.has_update(w, 1, "embed")
        report(r, w, 1)
        assert r.has_update(w, 1, "embed")  # a worker sending it again is told so (UploadStatus)
    plan = r.closable(list(WORKERS))
    assert plan is not None and plan.tokens == 30
    r.close(plan, WORKERS)
    assert r.version == 1 and r.head.round == 2
    assert r.has_update("a", 1, "layers.0") and not r.has_update("a", 2, "layers.0")  # closed: nothing wanted


def test_admission_rules():
    r = Rounds(rules(schedule="staggered", depth=1))
    r.plan(1, WORKERS)
    with pytest.raises(Refused) as e:
        r.admit("zed", 1, "embed", 0)
    assert e.value.reason == "not_assigned"
    with pytest.raises(Refused) as e:
        r.admit("a", 1, "head", 0)
    assert e.value.reason == "wrong_block"
    with pytest.raises(Refused) as e:
        r.admit("a", 1, "embed", 3)  # based on a model from the future
    assert e.value.reason == "stale_base"
    report(r, "a", 1)
    with pytest.raises(Refused) as e:
        r.admit("a", 1, "embed", 0)
    assert e.value.reason == "duplicate"
    # Staleness: with depth 1, round t may build on version t-2 but not t-3.
    for w in ("b", "c"):
        report(r, w, 1)
    r.close(r.closable(list(WORKERS)), WORKERS)
    r.hand_in("a", 2, WORKERS)
    report(r, "a", 2, base=0)  # 2 - 1 - 1 = 0: allowed
    for w in ("b", "c"):
        report(r, w, 2)
    r.close(r.closable(list(WORKERS)), WORKERS)
    r.plan(3, WORKERS)  # a no-op when round 3 was planned early
    with pytest.raises(Refused) as e:
        r.admit("a", 3, r.plans[3].assignments["a"][0], 0)  # 3 - 1 - 1 = 1 > 0
    assert e.value.reason == "stale_base"
    with pytest.raises(Refused) as e:
        r.admit("a", 1, "embed", 0)
    assert e.value.reason == "late"


def test_fedbcd_depth_zero_accepts_only_the_current_model():
    r = Rounds(rules(depth=0))
    r.plan(1, WORKERS)
    for w in WORKERS:
        report(r, w, 1)
    r.close(r.closable(list(WORKERS)), WORKERS)
    with pytest.raises(Refused) as e:
        r.admit("a", 2, "layers.0", 0)
    assert e.value.reason == "stale_base"
    r.admit("a", 2, "layers.0", 1)


def test_timeout_closes_with_min_updates_and_drops_the_rest():
    clock = Clock()
    r = Rounds(rules(round_timeout=10.0, min_updates=2), clock=clock)
    r.plan(1, WORKERS)
    report(r, "a", 1)
    clock.t = 11
    assert r.closable(list(WORKERS)) is None  # one update < min_updates: keep waiting
    report(r, "b", 1)
    clock.t = 5
    assert r.closable(list(WORKERS)) is None  # before the deadline: wait for c
    clock.t = 11
    plan = r.closable(list(WORKERS))
    assert plan is not None and set(plan.assignments) - {"c"} == {"a", "b"}
    r.close(plan, WORKERS)
    assert "c" not in plan.assignments
    with pytest.raises(Refused) as e:
        r.admit("c", 1, "embed", 0)
    assert e.value.reason == "late"
    # c gets its next assignment although it never handed in round 1: that round is closed.
    assert ("c", 2) in [(w, a.round) for w, a in r.deliveries()]


def test_a_departed_worker_no_longer_holds_up_the_round():
    r = Rounds(rules())
    r.plan(1, WORKERS)
    report(r, "a", 1)
    report(r, "b", 1)
    r.departed("c")
    plan = r.closable(["a", "b"])
    assert plan is not None and plan.complete


def test_accumulation_in_flight_blocks_closing():
    r = Rounds(rules())
    r.plan(1, {"a": 0})
    p = r.park("a", 1, "embed", 0)
    assert r.closable(["a"]) is None
    r.end_fold(p, "a", ["embed"], ok=True, tokens=3)
    assert r.closable(["a"]) is p


def test_failed_accumulation_can_be_retried():
    r = Rounds(rules())
    r.plan(1, {"a": 0})
    p = r.park("a", 1, "embed", 0)
    r.end_fold(p, "a", ["embed"], ok=False)
    assert not p.done("a")
    r.admit("a", 1, "embed", 0)


def test_rejoin_redelivers_what_was_not_handed_in():
    r = Rounds(rules())
    r.plan(1, WORKERS)
    r.deliveries()
    r.rejoined("b")
    assert [(w, a.round) for w, a in r.deliveries()] == [("b", 1)]


def test_rejoin_redelivers_what_was_handed_in_but_not_finished():
    """A worker process started again under the same name lost the update it had begun sending: its
    unfinished rounds go out again (else the coordinator waits for the rest of that upload and the new
    process for the model that round makes), the next one only after it hands that one in again."""
    r = Rounds(rules(depth=0))
    r.plan(1, {"a": 0})
    r.deliveries()
    r.hand_in("a", 1, {"a": 0})  # its upload started: round 2 is planned and goes out
    assert [(w, a.round) for w, a in r.deliveries()] == [("a", 2)]
    r.rejoined("a")
    assert [(w, a.round) for w, a in r.deliveries()] == [("a", 1)]
    r.hand_in("a", 1, {"a": 0})
    assert [(w, a.round) for w, a in r.deliveries()] == [("a", 2)]
    report(r, "a", 1)
    r.rejoined("a")  # a finished round is not given again
    assert [(w, a.round) for w, a in r.deliveries()] == [("a", 2)]


def test_top_up_brings_in_idle_workers_when_too_few_remain():
    r = Rounds(rules(min_updates=2, clients_per_round=2))
    r.plan(1, {"a": 0, "b": 1})
    r.departed("b")
    r.top_up({"a": 0, "c": 2})
    assert set(r.plans[1].assignments) == {"a", "c"}


def test_an_abandoned_round_is_not_given_back_and_closes_without_its_worker():
    # A lone worker whose update was refused for good: the round must not wait for it, nor hand it the
    # same assignment again (it would be refused again); it closes with no update.
    r = Rounds(rules())
    r.plan(1, {"a": 0})
    r.deliveries()
    r.hand_in("a", 1, {"a": 0})
    assert r.abandon("a", 1)
    r.top_up({"a": 0})
    assert r.plan(1, {"a": 0}) is None and not r.plans[1].assignments and r.deliveries() == [("a", r.plans[2].assignment("a", 1))]
    plan = r.closable(["a"])
    assert plan is not None and plan.workers_done == 0
    r.close(plan, {"a": 0})
    assert r.version == 1


def test_an_abandoned_round_goes_to_an_idle_worker():
    r = Rounds(rules(min_updates=1, clients_per_round=1))
    r.plan(1, {"a": 0, "b": 1})
    (first,) = r.plans[1].assignments
    other = "b" if first == "a" else "a"
    r.abandon(first, 1)
    r.top_up({"a": 0, "b": 1})
    assert set(r.plans[1].assignments) == {other}
    assert r.closable(["a", "b"]) is None  # waits for the one who took it over
    report(r, other, 1)
    assert r.closable(["a", "b"]).workers_done == 1


def test_no_rounds_beyond_the_total():
    r = Rounds(rules(rounds=1))
    r.plan(1, WORKERS)
    r.hand_in("a", 1, WORKERS)
    assert 2 not in r.plans
    for w in WORKERS:
        report(r, w, 1)
    r.close(r.closable(list(WORKERS)), WORKERS)
    assert r.finished and r.head is None


def test_a_multi_block_update_waits_until_all_its_blocks_are_in():
    r = Rounds(rules(assign_all_blocks=True))
    r.plan(1, {"a": 0, "b": 1})
    assert r.park("a", 1, "embed", 0) is None and not r.plans[1].accumulating  # nothing folded in yet
    assert r.has_update("a", 1, "embed")  # UploadStatus: it has it
    with pytest.raises(Refused, match="already delivered"):
        r.admit("a", 1, "embed", 0)
    r.abandon("a", 1)  # a later block refused: the parked ones go with it
    assert "a" not in r.plans[1].parked and not r.has_update("a", 1, "embed")
    for block in BLOCKS[:-1]:
        assert r.park("b", 1, block, 0) is None
    plan = r.park("b", 1, BLOCKS[-1], 0)
    assert plan is not None and plan.accumulating == {("b", b) for b in BLOCKS}
    r.end_fold(plan, "b", BLOCKS, ok=True, tokens=5)
    assert plan.done("b") and r.closable(["a", "b"]) is plan


def test_open_plans_survive_a_restart():
    r = Rounds(rules(schedule="staggered"), version=2)
    r.plan(3, WORKERS)
    r.hand_in("a", 3, WORKERS)  # plans round 4 too
    records = r.records()
    assert [rec["round"] for rec in records] == [3, 4]
    again = Rounds(rules(schedule="staggered"), version=2)
    again.restore(records)
    assert {k: p.assignments for k, p in again.plans.items()} == {k: p.assignments for k, p in r.plans.items()}
    assert not any(p.delivered for p in again.plans.values())  # sent when the workers come back
    later = Rounds(rules(schedule="staggered"), version=3)
    later.restore(records)  # a checkpoint newer than round 3: only round 4 is open
    assert list(later.plans) == [4]


@pytest.mark.parametrize("records", [
    {"round": 3},  # not a list
    [{"round": "three", "assignments": {"a": ["embed"]}, "lr": 1e-3, "local_steps": 4}],
    [{"round": 3, "lr": 1e-3, "local_steps": 4}],  # no assignments
    [{"round": 3, "assignments": ["a"], "lr": 1e-3, "local_steps": 4}],
    [{"round": 3, "assignments": {"a": ["embed"]}, "lr": float("nan"), "local_steps": 4}],
    [{"round": 3, "assignments": {"a": ["embed"]}, "lr": 1e-3, "local_steps": 0}],
    [{"round": 3, "assignments": {"a": ["layers.9"]}, "lr": 1e-3, "local_steps": 4}],  # not trainable now
])
def test_plans_from_a_checkpoint_are_checked_before_use(records):
    r = Rounds(rules(), version=2)
    with pytest.raises(ValueError):
        r.restore(records)
    assert not r.plans
