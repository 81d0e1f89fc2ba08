"""What the coordinator records of a run for its operators, without files from the sites: each round's
timeline of every worker (from the timings each update carries, in STATE_DIR/timeline.jsonl), the phase
histograms and per-worker series, and summary.json's reproducibility record."""

import math

import pytest

from fedblock.common.messages import TaskTimings
from fedblock.common.pb import coordinator_pb2 as pb
from fedblock.server.coordinator import merge_intervals

ROUNDS = 3


def sample(coordinator, name, **labels):
    return coordinator.metrics.registry.get_sample_value(name, labels or None)


def test_timeline_phases_and_reproduce(federation, data_file):
    fed = federation(algorithm="fedbcd", rounds=ROUNDS, local_steps=2, min_workers=2)
    for i in range(2):
        fed.add_worker(fed.worker_config(f"w{i}", data_file, seed=i))
    summary = fed.run()
    c = fed.coordinator
    history = summary["round_history"]
    assert [h["round"] for h in history] == list(range(1, ROUNDS + 1))

    timeline = c.store.read_timeline()  # STATE_DIR/timeline.jsonl, one line per round
    assert sorted(timeline) == list(range(1, ROUNDS + 1)) and all("timeline" not in h for h in history)
    intervals = [i for r in sorted(timeline) for i in timeline[r]]
    for worker, kind, start, end in intervals:
        assert worker in ("w0", "w1") and kind in ("compute", "idle", "upload", "download") and start <= end
    for w in ("w0", "w1"):
        compute = sorted((s, e) for n, k, s, e in intervals if n == w and k == "compute")
        assert len(compute) == ROUNDS  # one task per round, each once however many blocks it sent
        # fedbcd: a task starts once the round before has closed, and the coordinator's close comes after
        # the upload (the clocks are mapped to within the message's latency)
        closes = [h["closed_at_s"] for h in history]
        for r in range(1, ROUNDS):
            assert compute[r][0] >= closes[r - 1] - 0.05
            assert compute[r - 1][1] <= closes[r - 1] + 0.05
        assert all(b[0] >= a[1] - 1e-3 for a, b in zip(compute, compute[1:], strict=False))  # one compute thread
        uploads = [(s, e) for n, k, s, e in intervals if n == w and k == "upload"]
        assert len(uploads) == ROUNDS and all(e <= c + 1e-3 for (_, e), c in zip(sorted(uploads), closes, strict=True))
        assert any(n == w and k == "download" for n, k, _, _ in intervals)  # round 2 and 3 sync the new blocks

    # the phase histograms and the per-worker series
    assert sample(c, "fedblock_round_phase_seconds_count", phase="checkpoint") == ROUNDS
    assert sample(c, "fedblock_round_phase_seconds_count", phase="aggregation") == ROUNDS
    assert sample(c, "fedblock_round_phase_seconds_count", phase="training") == 2 * ROUNDS
    assert sample(c, "fedblock_round_phase_seconds_count", phase="upload") == 2 * ROUNDS
    assert sample(c, "fedblock_round_phase_seconds_count", phase="assignment") == ROUNDS
    assert sample(c, "fedblock_round_phase_seconds_count", phase="download") >= 2 * (ROUNDS - 1)
    for w in ("w0", "w1"):
        assert sample(c, "fedblock_peer_updates_accepted_total", worker=w) == ROUNDS
    assert sample(c, "fedblock_run_state", state="finished") == 1
    assert sample(c, "fedblock_run_state", state="running") == 0
    assert sample(c, "fedblock_rounds_target") == ROUNDS
    assert sample(c, "process_resident_memory_bytes") > 0
    for worker in fed.workers:
        m = worker.metrics.registry
        assert m.get_sample_value("fedblock_worker_phase_seconds_count", {"phase": "training"}) == ROUNDS
        assert m.get_sample_value("fedblock_worker_phase_seconds_count", {"phase": "upload"}) == ROUNDS
        assert m.get_sample_value("process_cpu_seconds_total") > 0

    reproduce = summary["reproduce"]
    assert reproduce["packages"]["torch"] and reproduce["packages"]["grpcio"]
    assert reproduce["config"]["rounds"] == ROUNDS and reproduce["config"]["algorithm"] == "fedbcd"
    assert reproduce["coordinator"]["cpu_count"] >= 1 and reproduce["coordinator"]["memory_bytes"] > 0
    assert sorted(reproduce["workers"]) == ["w0", "w1"]
    for hw in reproduce["workers"].values():
        assert hw["device"] == "cpu" and hw["cpu_count"] >= 1 and hw["torch"]


def test_timings_from_the_wire_are_checked():
    good = pb.TaskTimings(compute_s=1.5, idle_s=0.5, started_unix=100.0, sent_unix=102.0)
    assert TaskTimings.from_pb(good) == TaskTimings(1.5, 0.5, 100.0, 102.0)
    for bad in (dict(compute_s=-1.0), dict(idle_s=math.nan), dict(started_unix=math.inf), dict(sent_unix=0.0)):
        assert TaskTimings.from_pb(pb.TaskTimings(**{**dict(compute_s=1.0, idle_s=0.0, started_unix=1.0,
                                                               sent_unix=2.0), **bad})) is None
    assert TaskTimings(1.0, 0.0, 5.0).to_pb().sent_unix > 1e9  # stamped when it goes out


@pytest.mark.parametrize("intervals, merged", [
    ([["a", "upload", 0.0, 1.0], ["a", "upload", 1.02, 2.0], ["a", "upload", 3.0, 4.0]],
     [["a", "upload", 0.0, 2.0], ["a", "upload", 3.0, 4.0]]),
    ([["b", "compute", 0.0, 1.0], ["a", "compute", 0.5, 1.0], ["a", "upload", 1.0, 1.5]],
     [["b", "compute", 0.0, 1.0], ["a", "compute", 0.5, 1.0], ["a", "upload", 1.0, 1.5]]),
])
def test_merge_intervals(intervals, merged):
    assert merge_intervals(intervals) == merged


def test_timings_that_do_not_fit_the_clock_and_a_flood_of_intervals(federation):
    """A worker's timings land in a histogram and the timeline only when they fit the run's clock, and
    no worker can add more than its share of intervals to a round, however often it syncs."""
    from fedblock.server.coordinator import MAX_WORKER_INTERVALS

    c = federation().coordinator
    count = lambda: sample(c, "fedblock_round_phase_seconds_count", phase="training")  # noqa: E731
    for hostile in (TaskTimings(1e308, 0.0, -1e308, 1e308), TaskTimings(5.0, 0.0, 100.0, 101.0),
                    TaskTimings(1.0, 1e9, 100.0, 101.0), TaskTimings(1.0, 0.0, 100.0, 1e12)):
        with c._cv:
            c._task_timings("w0", 1, hostile, received_s=10.0)
    assert count() == 0 and c._intervals == []
    with c._cv:
        c._task_timings("w0", 1, TaskTimings(2.0, 0.5, 100.0, 102.5), received_s=10.0)
        c._task_timings("w0", 1, TaskTimings(2.0, 0.5, 100.0, 102.5), received_s=11.0)  # the task's next block
    assert count() == 1
    assert c._intervals == [["w0", "idle", 7.0, 7.5], ["w0", "compute", 7.5, 9.5]]
    for _ in range(10 * MAX_WORKER_INTERVALS):
        c.downloaded("w1", c.wall_seconds(), blocks=1)
    c.note_interval("w2", "upload", 1.0, 2.0)
    kept = [i for i in c._intervals if i[0] == "w1"]
    assert len(kept) == MAX_WORKER_INTERVALS and c._intervals[-1][0] == "w2"


def test_timeline_file_after_a_torn_line(tmp_path):
    """timeline.jsonl after a kill mid-write: the torn line is skipped, and the round run again after
    the restart is a line of its own."""
    from fedblock.server.store import StateStore

    store = StateStore(tmp_path / "s")
    store.append_timeline(1, [["w", "compute", 0.0, 1.0]])
    with open(store.root / "timeline.jsonl", "a") as f:
        f.write('{"round": 2, "intervals": [["w", "comp')  # killed here
    store.append_timeline(2, [["w", "compute", 5.0, 6.0]])
    store.append_timeline(3, [["w", "upload", 7.0, 7.5]])
    assert store.read_timeline() == {1: [["w", "compute", 0.0, 1.0]], 2: [["w", "compute", 5.0, 6.0]],
                                     3: [["w", "upload", 7.0, 7.5]]}
    store.append_timeline(2, [["w", "idle", 1.0, 2.0]])  # a round written again keeps its last entry
    assert store.read_timeline()[2] == [["w", "idle", 1.0, 2.0]]
    (store.root / "rounds.json").write_text('{"rounds": 1e999, "flag": 8}')
    assert store.read_rounds(8) is None
