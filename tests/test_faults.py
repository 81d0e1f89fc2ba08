"""Faults: links that break, workers that go silent or come back, a coordinator killed at any moment."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from netproxy import Link

from fedblock.client.session import Session
from fedblock.server.store import StateStore


def uninterrupted(federation, data_file, names=("solo",), **options) -> dict:
    """The global parameters after a run with these options and workers, nothing disturbed: the
    reference a disturbed run must reach."""
    calm = federation(**options)
    for name in names:
        calm.add_worker(calm.worker_config(name, data_file, threads=1))
    calm.run()
    return global_params(calm.coordinator)


def global_params(coordinator):
    return {n: t for tensors in coordinator.global_model.tensors.values() for n, t in tensors.items()}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll `predicate()` (state only observable by looking) until it returns something true, and
    return that; AssertionError naming `what` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Output:
    """A process's output, read on a thread as it comes: a test waits for a line with a deadline (and
    the pipe never fills up while nobody reads it)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._lines: list[str] = []
        self._cv = threading.Condition()
        self.ended = threading.Event()  # the process closed its output: it exited
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for line in self.proc.stdout:
                with self._cv:
                    self._lines.append(line)
                    self._cv.notify_all()
        finally:
            with self._cv:
                self.ended.set()
                self._cv.notify_all()

    def text(self) -> str:
        with self._cv:
            return "".join(self._lines)

    def wait_for(self, pattern: str, timeout: float, what: str) -> re.Match:
        """The first line that matches the regex `pattern`; AssertionError if none has come after
        `timeout` seconds, or the output ended without one."""
        rx, seen = re.compile(pattern), 0
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self._lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self._lines)
                if self.ended.is_set():
                    raise AssertionError(f"the process ended (exit {self.proc.poll()}) before {what}:\n{self.text()[-4000:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}:\n{self.text()[-4000:]}")
                self._cv.wait(left)

    def finish(self, timeout: float) -> str:
        """Wait for the process to exit (AssertionError after `timeout` seconds); its whole output."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout:.0f} s:\n{self.text()[-4000:]}") from None
        self._reader.join(30)
        return self.text()


def reap(proc: subprocess.Popen) -> None:
    """Kill `proc` if it still runs, and wait for it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


def test_worker_rejoins_after_link_cuts_and_the_result_is_unchanged(federation, data_file):
    """The link drops again and again mid-run; the worker joins again each time, resends what the
    coordinator lacks, and the final model is bit for bit the uninterrupted one."""
    options = dict(algorithm="fedbcd", rounds=6, local_steps=3, lr=3e-3, heartbeat_interval=0.2)
    reference = uninterrupted(federation, data_file, **options)

    fed = federation(**options)
    link = Link(fed.running.port)
    worker = fed.add_worker(fed.worker_config("solo", data_file).__class__(
        **{**fed.worker_config("solo", data_file).__dict__, "coordinator": f"127.0.0.1:{link.port}"}))

    done = threading.Event()

    def saboteur():
        # Load, not synchronisation: a cut at random moments until the worker is done (or the test).
        while not done.wait(random.uniform(0.05, 0.3)) and not worker.stop.is_set():
            link.cut()

    cutter = threading.Thread(target=saboteur, daemon=True)
    cutter.start()
    try:
        summary = fed.run(timeout=120)
    finally:
        done.set()
        cutter.join(10)
        link.close()
    assert not cutter.is_alive()
    assert summary["rounds_completed"] == 6 and link.cuts >= 3
    outcome = fed.outcomes["solo"]
    assert outcome.finished and outcome.error is None
    got = global_params(fed.coordinator)
    for name, t in reference.items():
        assert torch.equal(got[name], t), name


def test_a_silent_worker_is_dropped_and_the_round_closes_without_it(federation, data_file):
    fed = federation(algorithm="parablock", rounds=4, local_steps=2, min_workers=2, min_updates=1,
                     heartbeat_interval=0.2, heartbeat_timeout=1.5, block_schedule="staggered")
    zombie = Session(fed.address, "zombie")  # joins, takes its assignment, then never speaks again
    zombie.join(num_examples=1, device="cpu", timeout=5)
    fed.add_worker(fed.worker_config("alive", data_file))
    summary = fed.run(timeout=60)  # a hang fails here: the round waits one heartbeat timeout, not forever
    assert summary["rounds_completed"] == 4
    workers = {w.name: w for w in fed.coordinator.registry.all()}
    assert not workers["zombie"].connected and workers["zombie"].updates_accepted == 0
    assert workers["alive"].updates_accepted == 4
    zombie.close()


def test_a_returning_worker_resumes_under_its_name(federation, data_file):
    fed = federation(algorithm="fedbcd", rounds=6, local_steps=2, min_workers=1, heartbeat_interval=0.2,
                     heartbeat_timeout=1.0, block_schedule="staggered")
    first = fed.add_worker(fed.worker_config("site", data_file))
    runner = threading.Thread(target=fed.run, daemon=True)
    runner.start()
    wait_for(lambda: fed.coordinator.global_model.version >= 2, 60, "round 2 to close")
    first.stop.set()  # the process "dies" ...
    fed.threads[0].join(10)
    assert not fed.threads[0].is_alive(), "the stopped worker did not stop"
    # ... and the coordinator notices (its Leave, or the heartbeat timeout) ...
    wait_for(lambda: not fed.coordinator.registry.all()[0].connected, 30, "the coordinator to let the worker go")
    fed.add_worker(fed.worker_config("site", data_file))  # ... and comes back under its name
    runner.join(60)
    assert not runner.is_alive(), f"the run did not finish (model version {fed.coordinator.global_model.version})"
    assert fed.coordinator.global_model.version == 6
    (record,) = fed.coordinator.registry.all()
    assert record.name == "site" and record.index == 0 and record.updates_accepted >= 5


def test_updates_accepted_by_a_coordinator_that_died_before_its_checkpoint_are_sent_again(tmp_path, tiny_model, data_file):
    """fedbcd, two workers, one of them on a slow uplink. The coordinator accepts the fast worker's
    round-1 update and is killed (-9) while the slow one still uploads: round 1 was never checkpointed,
    so the restarted coordinator has lost an update that the fast worker was told it accepted. The
    fast worker must send it again (it keeps accepted updates until their round has closed); without
    that, round 1 would wait for it forever."""
    port, state = free_port(), tmp_path / "state"
    coordinator_args = ["--log-level", "DEBUG", "coordinator", "--model", tiny_model, "--state-dir", state,
                        "--listen", f"127.0.0.1:{port}", "--insecure", "--algorithm", "fedbcd", "--rounds", 2,
                        "--local-steps", 2, "--lr", 1e-3, "--train-blocks", "layers.*", "--min-workers", 2,
                        "--threads", 1, "--heartbeat-interval", 0.5]
    common = ["--coordinator", f"127.0.0.1:{port}", "--data", data_file, "--insecure", "--batch-size", 4,
              "--max-seq-len", 64, "--threads", 1, "--max-backoff", 1]
    timeline = tmp_path / "fast.timeline.jsonl"

    def fast_has_the_reply() -> bool:
        """The fast worker's round-1 upload span is written when its Upload call has returned."""
        text = timeline.read_text() if timeline.exists() else ""
        events = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
        return any(e["kind"] == "upload" and e["round"] == 1 for e in events)

    coordinator = cli(*coordinator_args)
    first = Output(coordinator)
    workers = {name: cli("worker", "--name", name, *common, *extra)
               for name, extra in (("fast", ("--timeline", timeline)), ("slow", ("--max-upload-rate", "40KB/s")))}
    outputs = {name: Output(w) for name, w in workers.items()}
    try:
        first.wait_for(r"round 1: layers\.\S+ from fast accepted", 120, "the fast worker's round-1 update accepted")
        # The reply reaches the fast worker; round 1 waits for the slow one (~5 s).
        wait_for(fast_has_the_reply, 30, "the fast worker to have the reply to its round-1 upload")
        assert "from slow accepted" not in first.text()
        coordinator.send_signal(signal.SIGKILL)
        first.finish(30)
        assert not (state / "checkpoints" / "round-000001.json").exists()  # round 1 is lost with it
        coordinator = cli(*coordinator_args)
        out = Output(coordinator).finish(120)
        assert coordinator.returncode == 0, out[-4000:]
        logs = {name: outputs[name].finish(60) for name in workers}
    finally:
        for p in (coordinator, *workers.values()):
            reap(p)
    assert all(w.returncode == 0 for w in workers.values()), {n: log[-3000:] for n, log in logs.items()}
    assert "joined again" in logs["fast"]
    # It had the reply before the kill (the update was kept, not in flight), and sent it again once the
    # new coordinator had planned round 1 (before that: ABORTED, not_planned, and a retry).
    assert "round 1 interrupted (UNAVAILABLE)" not in logs["fast"]
    assert "from fast accepted" in out.split("round 2/2 started")[0], out[-4000:]  # round 1's, again
    summary = json.loads((state / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert [r["workers"] for r in summary["round_history"]] == [2, 2]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedblock.common.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_with_kills(coordinator_args, worker: subprocess.Popen, kills: int, pause: random.Random,
                   longest: float) -> tuple[list[str], str]:
    """Start the coordinator (`cli(*coordinator_args)`) and kill -9 it `kills` times, each at a random
    moment up to `longest` s after a round started (mid-round, mid-upload, mid-checkpoint: whatever the
    dice say), starting it again on the same state dir each time; then let it finish, and the worker
    too. Returns the round lines each kill followed and the worker's output."""
    worker_output = Output(worker)
    moments: list[str] = []
    coordinator = None
    try:
        for kill in range(kills + 1):
            coordinator = cli(*coordinator_args)
            output = Output(coordinator)
            if kill == kills:
                try:
                    out = output.finish(240)
                except AssertionError as e:
                    raise AssertionError(f"{e}\nthe worker:\n{worker_output.text()[-6000:]}") from None
                assert coordinator.returncode == 0, out[-3000:]
                break
            # Wait until the worker is in this coordinator's run (past its own start-up, joined to this
            # coordinator: each kill then costs it a session) and a round is under way, then strike.
            # (The pause is the dice, not a wait for something; it ends early only if the coordinator does.)
            worker_output.wait_for(r"training examples, model version", 120, "the worker to start")
            output.wait_for(r"worker solo joined", 120, f"the worker to join coordinator {kill + 1}")
            line = output.wait_for(r" started: ", 120, "a round to start").string
            moments.append(line.split(" INFO ")[-1].strip())
            ended = output.ended.wait(pause.uniform(0.0, longest))
            assert not ended and coordinator.poll() is None, \
                f"the coordinator ended before kill {kill + 1}:\n{output.text()[-3000:]}"
            coordinator.send_signal(signal.SIGKILL)
            output.finish(30)
            assert coordinator.returncode == -signal.SIGKILL
        worker_out = worker_output.finish(60)
        assert worker.returncode == 0, worker_out[-3000:]
    finally:
        if coordinator is not None:
            reap(coordinator)
    return moments, worker_out


@pytest.mark.slow
def test_coordinator_killed_at_random_moments_resumes_to_the_same_model(tmp_path, tiny_model, data_file, federation):
    """kill -9 the coordinator at random moments (mid-round, mid-upload, mid-checkpoint, whatever the
    dice say), start it again on the same state dir each time; the worker keeps going. The run ends
    with all rounds and exactly the model of an uninterrupted run."""
    rounds, steps = 8, 40  # rounds of ~0.5 s, so that kills land anywhere in them
    options = dict(algorithm="fedbcd", rounds=rounds, local_steps=steps, lr=1e-3, block_schedule="round-robin")
    reference = uninterrupted(federation, data_file, **options)

    port, state = free_port(), tmp_path / "state"
    coordinator_args = ["coordinator", "--model", tiny_model, "--state-dir", state, "--listen", f"127.0.0.1:{port}",
                        "--insecure", "--algorithm", "fedbcd", "--rounds", rounds, "--local-steps", steps, "--lr", 1e-3,
                        "--block-schedule", "round-robin", "--threads", 1, "--heartbeat-interval", 0.5]
    worker = cli("worker", "--coordinator", f"127.0.0.1:{port}", "--name", "solo", "--data", data_file, "--insecure",
                 "--batch-size", 4, "--max-seq-len", 64, "--threads", 1, "--max-upload-rate", "2MB/s",
                 "--max-backoff", 1)
    try:
        moments, worker_out = run_with_kills(coordinator_args, worker, kills=4, pause=random.Random(7), longest=1.2)
    finally:
        reap(worker)
    summary = json.loads((state / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds
    store = StateStore(state)
    got = {n: t for tensors in store.load_blocks(store.latest()).values() for n, t in tensors.items()}
    for name, t in reference.items():
        assert torch.equal(got[name], t), name
    assert worker_out.count("joined again") >= 4, (moments, worker_out[-3000:])
