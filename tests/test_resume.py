"""Coming back after a failure: workers resend the oldest round first, as the same bytes; a restarted
coordinator waits for its workers and plans what the uninterrupted run would have; an unexpected
server error or a long start-up does not cost a worker its place."""

import dataclasses
import json
import logging
import queue
import signal
import threading
import types

import grpc
import pytest
import torch
from netproxy import Link
from test_faults import cli, free_port, global_params, uninterrupted

from fedblock.client.comm import Comm, Outgoing
from fedblock.client.metrics import WorkerMetrics
from fedblock.client.state import ModelBook, Update
from fedblock.client.timeline import Timeline
from fedblock.common.codecs import CodecPipeline
from fedblock.server.store import StateStore


class RpcFailure(grpc.RpcError):
    def __init__(self, code, details=""):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


class RestartingCoordinator:
    """The worker's session as seen by `Comm`, scripted: the coordinator accepts round 4, restarts
    (losing it, as when killed before its checkpoint) while round 5 is on its way, and then, as the
    real one does, cannot take round 5 before round 4 (not_planned)."""

    def __init__(self):
        self.info = types.SimpleNamespace(codec="none", chunk_size=1 << 20, run_id="run", model_version=3,
                                          heartbeat_interval_s=60.0, session="s0")
        self.uploads: list[tuple[int, str]] = []
        self.rounds_in: set[int] = set()
        self.restarted = False
        self.first_in = threading.Event()
        self.both_in = threading.Event()

    def upload(self, manifest, blob, resume=False):
        r = manifest.round
        if r == 5 and not self.restarted:
            self.restarted = True
            self.rounds_in.clear()  # round 4 died with it
            self.uploads.append((r, "link lost"))
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "connection reset")
        if r == 5 and 4 not in self.rounds_in:
            self.uploads.append((r, "not_planned"))
            raise RpcFailure(grpc.StatusCode.ABORTED, "not_planned: round 5 is not planned yet; send it again later")
        self.uploads.append((r, "accepted"))
        self.rounds_in.add(r)
        self.first_in.set()
        if self.rounds_in >= {4, 5}:
            self.both_in.set()
        return "accepted"

    def join(self, num_examples, device, timeout):
        return types.SimpleNamespace(**{**vars(self.info), "session": "s1"})

    def download(self, held, **kw):
        from fedblock.client.session import Sync

        return Sync(3, {}, {}, iter(()))

    def abandon(self, round, reason):
        raise AssertionError(f"round {round} abandoned: {reason}")


def update(round):
    return Update(round, round - 1, {"layers.0": {"w": torch.full((4, 4), float(round))}}, tokens=8, loss=1.0)


def test_after_a_rejoin_the_oldest_round_goes_first():
    """ParaBlock, depth 1: the coordinator accepted round 4 and was killed before its checkpoint; round
    5 failed on its way. After the re-join round 4 must go before round 5 (the restarted coordinator
    cannot plan 5 before it has 4): sending 5 first, again and again, was a livelock."""
    session, stop = RestartingCoordinator(), threading.Event()
    outbox: queue.Queue = queue.Queue(1)
    comm = Comm(session, ModelBook(version=3), queue.Queue(16), outbox, WorkerMetrics(), stop, Timeline("w"),
                max_backoff=0.05)
    thread = threading.Thread(target=comm.transfer, daemon=True)
    thread.start()
    try:
        outbox.put(update(4))
        assert session.first_in.wait(5), session.uploads
        outbox.put(update(5))
        assert session.both_in.wait(10), f"livelock: {session.uploads[:6]} ... ({len(session.uploads)} uploads)"
    finally:
        stop.set()
        thread.join(5)
    assert session.uploads == [(4, "accepted"), (5, "link lost"), (4, "accepted"), (5, "accepted")]
    assert comm.error is None and comm.reconnects == 1


def test_an_update_is_encoded_once_and_its_codec_state_advances_once():
    codec = CodecPipeline("topk:0.25")
    out = Outgoing(update(4))
    first = out.pack("layers.0", codec, 1 << 20)
    assert not codec.stages[0].residual  # not sent yet: the residual has not moved
    again = out.pack("layers.0", codec, 1 << 20)
    assert again[1] is first[1] and again[0].blob_sha256 == first[0].blob_sha256  # resumable: same bytes
    out.confirm("layers.0", codec)
    residual = codec.stages[0].residual[("layers.0", "w")].clone()
    out.confirm("layers.0", codec)  # accepted again by a coordinator that had lost it: no second step
    assert torch.equal(codec.stages[0].residual[("layers.0", "w")], residual)
    assert "layers.0" not in out.update.deltas  # the blob replaced the delta


def test_an_interrupted_topk_run_ends_with_the_uninterrupted_model(federation, data_file):
    """Links cut in the middle of uploads with a stateful codec (top-k with error feedback): each
    update is encoded once, its resend is the same bytes, and the residual advances once, so the
    final model is bit for bit that of a run without cuts."""
    options = dict(algorithm="fedbcd", rounds=6, local_steps=2, lr=3e-3, heartbeat_interval=0.2,
                   codec="topk:0.05", chunk_size=1024, block_schedule="round-robin")
    reference = uninterrupted(federation, data_file, **options)

    fed = federation(**options)
    link = Link(fed.running.port)
    fed.add_worker(dataclasses.replace(fed.worker_config("solo", data_file), coordinator=f"127.0.0.1:{link.port}"))
    c, receive, interrupted = fed.coordinator, fed.coordinator.upload, set()

    def cut_midway(name, session, manifest, chunks):
        """The first try of every round breaks midway, and the coordinator forgets the session (as
        after a silence), so that the worker joins again and its transfer loop sends the update anew."""
        def passing():
            for i, chunk in enumerate(chunks):
                if i == min(2, manifest.num_chunks - 1) and manifest.round not in interrupted:
                    interrupted.add(manifest.round)
                    c.registry.disconnect(name)
                    link.cut()
                yield chunk

        return receive(name, session, manifest, passing())

    c.upload = cut_midway
    summary = fed.run(timeout=120)
    assert summary["rounds_completed"] == 6 and interrupted == set(range(1, 7)), interrupted
    assert fed.outcomes["solo"].error is None
    got = global_params(fed.coordinator)
    for name, t in reference.items():
        assert torch.equal(got[name], t), name
    assert summary["updates_rejected"] == 0
    link.close()


def test_an_unexpected_server_error_does_not_end_the_worker(federation, data_file):
    """The coordinator fails on a download in a way it did not foresee (gRPC UNKNOWN); the worker
    joins again with back-off and finishes the run."""
    # A lossy codec: the worker downloads the block it trained (it cannot claim the global value).
    fed = federation(algorithm="fedbcd", rounds=3, local_steps=2, heartbeat_interval=0.2, codec="bf16")
    c = fed.coordinator
    original, failures = c.download_manifest, []

    def failing_once(g, block, version):
        if g.version == 1 and not failures:
            failures.append(block)
            raise RuntimeError("a bug in the coordinator")
        return original(g, block, version)

    c.download_manifest = failing_once
    fed.add_worker(fed.worker_config("solo", data_file))
    summary = fed.run(timeout=90)
    assert failures and summary["rounds_completed"] == 3
    outcome = fed.outcomes["solo"]
    assert outcome.finished and outcome.error is None
    assert fed.workers[0].config.name == "solo" and c.registry.all()[0].updates_accepted == 3


def test_a_long_start_up_keeps_the_worker_in_its_round(federation, data_file, caplog):
    """The first download takes several heartbeat timeouts (a slow link): heartbeats run from the
    join on, so the worker is not dropped from the round it was planned into."""
    fed = federation(algorithm="fedbcd", rounds=2, local_steps=1, heartbeat_interval=0.2, heartbeat_timeout=1.0)
    fed.add_worker(fed.worker_config("slow", data_file, max_download_rate=150_000))
    with caplog.at_level(logging.INFO, logger="fedblock.coordinator"):
        summary = fed.run(timeout=120)
    assert summary["rounds_completed"] == 2
    assert not [r for r in caplog.records if "silent for" in r.getMessage()]
    assert fed.coordinator.registry.all()[0].updates_accepted == 2


def test_a_restarted_coordinator_waits_for_its_workers_and_plans_as_before(tmp_path, tiny_model, data_file, federation):
    """fedbcd, striped, two workers. The coordinator is killed (-9) after it accepted A's round-2
    update and before B's; B is held (SIGSTOP) so that A joins the restarted coordinator first. The
    new coordinator restores round 2's plan from its checkpoint, waits for B, and the run ends with
    the model of an uninterrupted run, no update refused or late."""
    rounds = 4
    options = dict(algorithm="fedbcd", rounds=rounds, local_steps=2, lr=1e-3, block_schedule="striped",
                   min_workers=2, train_blocks="layers.*")
    reference = uninterrupted(federation, data_file, ("A", "B"), **options)

    port, state = free_port(), tmp_path / "state"
    coordinator_args = ["--log-level", "DEBUG", "coordinator", "--model", tiny_model, "--state-dir", state,
                        "--listen", f"127.0.0.1:{port}", "--insecure", "--algorithm", "fedbcd", "--rounds", rounds,
                        "--local-steps", 2, "--lr", 1e-3, "--block-schedule", "striped", "--train-blocks", "layers.*",
                        "--min-workers", 2, "--threads", 1, "--heartbeat-interval", 0.5]
    common = ["--coordinator", f"127.0.0.1:{port}", "--data", data_file, "--insecure", "--batch-size", 4,
              "--max-seq-len", 64, "--threads", 1, "--max-backoff", 1]
    coordinator = cli(*coordinator_args)
    workers = {"A": cli("worker", "--name", "A", *common),
               "B": cli("worker", "--name", "B", *common, "--max-upload-rate", "40KB/s")}
    try:
        for line in coordinator.stdout:
            if "round 2: layers." in line and "from A accepted" in line:
                break
        else:
            pytest.fail("the coordinator ended before it accepted A's round-2 update")
        coordinator.send_signal(signal.SIGKILL)
        coordinator.communicate()
        workers["B"].send_signal(signal.SIGSTOP)
        assert not (state / "checkpoints" / "round-000002.json").exists()
        coordinator = cli(*coordinator_args)
        for line in coordinator.stdout:
            if "worker A joined" in line:
                break
        workers["B"].send_signal(signal.SIGCONT)
        out = coordinator.communicate(timeout=180)[0]
        assert coordinator.returncode == 0, out[-4000:]
        logs = {name: w.communicate(timeout=60)[0] for name, w in workers.items()}
    finally:
        for p in (coordinator, *workers.values()):
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.communicate()
    assert all(w.returncode == 0 for w in workers.values()), {n: log[-3000:] for n, log in logs.items()}
    assert " refused: " not in logs["A"] + logs["B"], [ln for ln in (logs["A"] + logs["B"]).splitlines() if "refused" in ln]
    summary = json.loads((state / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds
    odd = [ln for ln in out.splitlines() if any(w in ln for w in ("late", "rejected", "duplicate", "refused"))]
    assert summary["updates_rejected"] == 0 and summary["updates_late"] == 0, odd
    store = StateStore(state)
    got = {n: t for tensors in store.latest_intact()[1].values() for n, t in tensors.items()}
    worst = max(float((got[n] - t).abs().max()) for n, t in reference.items())
    assert worst <= 1e-5, worst


def test_a_round_planned_again_after_a_fallback_is_trained_again(tiny_model, data_file):
    """Round 3 closed (the worker saw it) but the coordinator's checkpoint of it was damaged: it resumed
    from round 2 and plans round 3 again. The worker's update of round 3 is gone on both sides, so it
    must take the assignment again (it used to ignore it as already taken: a round that never closed).
    A round that had not closed is never trained twice."""
    from test_rebase import stream_of

    from fedblock.client.compute import ComputeLoop
    from fedblock.client.state import Patch
    from fedblock.common import blocks as B
    from fedblock.common.messages import Assignment
    from fedblock.common.models import load_model
    from fedblock.common.training import BlockTrainer, OptimConfig

    model = load_model(tiny_model)
    blocks = B.partition(model)
    versions = {b.name: 2 for b in blocks}
    inbox, outbox, stop = queue.Queue(), queue.Queue(1), threading.Event()
    loop = ComputeLoop(model, blocks, BlockTrainer(model, blocks, OptimConfig()), stream_of(tiny_model, data_file),
                       ModelBook(version=2, block_versions=dict(versions)), inbox, outbox, depth=1,
                       metrics=WorkerMetrics(), stop=stop, timeline=Timeline("w"))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        inbox.put(Assignment(3, ("layers.0",), 2, 1e-3, 2))
        first = outbox.get(timeout=30)
        inbox.put(Assignment(4, ("layers.1",), 2, 1e-3, 3))  # ParaBlock: round 4 starts on version 2
        fourth = outbox.get(timeout=30)
        inbox.put(Patch(3, {**versions, "layers.0": 3}, {}))  # round 3 closed ...
        inbox.put(Patch(2, versions, {}))  # ... and the restarted coordinator is back at version 2
        inbox.put(Assignment(4, ("layers.1",), 2, 1e-3, 3))  # not closed: still on its way, not again
        inbox.put(Assignment(3, ("layers.0",), 2, 1e-3, 2))  # closed and lost: train it again
        again = outbox.get(timeout=30)
        inbox.put(Patch(3, {**versions, "layers.0": 3}, {}))  # round 3 closes again
        inbox.put(Assignment(5, ("layers.2",), 2, 1e-3, 4))
        fifth = outbox.get(timeout=30)  # in order: had round 4 been trained again, it would come first
        assert (first.round, fourth.round, again.round, fifth.round) == (3, 4, 3, 5)
    finally:
        stop.set()
        thread.join(30)
    assert loop.error is None


class LogCatchingUp:
    """A zeroth-order worker's fetches, recorded: from which version each one asked for the log. Each
    answer brings the model to the next of `versions` (by default, the target asked for)."""

    catch_up_on_task = False
    needs_base = False

    def __init__(self, versions=()):
        self.asked: list[int] = []
        self.fetched = threading.Event()
        self._versions = iter(versions)

    def fetch(self, session, version, held, target, holds=None, task_round=0):
        from fedblock.common.messages import Patch

        self.asked.append(version)
        self.fetched.set()
        return Patch(next(self._versions, target), {}, {}, ())


def catching_up(coordinator_version: int, algorithm: LogCatchingUp):
    """A worker's transfer thread at model version 3, against a coordinator that restarts at
    `coordinator_version`: (comm, inbox, stop, thread), the thread running."""
    session, stop = RestartingCoordinator(), threading.Event()
    session.info.model_version = coordinator_version
    inbox: queue.Queue = queue.Queue(16)
    comm = Comm(session, ModelBook(version=3), inbox, queue.Queue(1), WorkerMetrics(), stop, Timeline("w"),
                max_backoff=0.05, algorithm=algorithm)
    thread = threading.Thread(target=comm.transfer, daemon=True)
    thread.start()
    return comm, inbox, stop, thread


def test_a_catch_up_after_a_rejoin_starts_where_the_queued_patch_left_the_model():
    """A log catch-up to version 5 waits in the compute inbox (not applied yet: the book still says 3)
    when the coordinator restarts behind it, at 4. The next catch-up must start from 5, where that
    patch brings the model, not from the book's 3: replaying rounds 4 and 5 twice corrupts the model
    (from 5, a coordinator at 4 answers "download the blocks")."""
    algorithm = LogCatchingUp()
    comm, inbox, stop, thread = catching_up(4, algorithm)
    try:
        comm._announce(5)
        assert algorithm.fetched.wait(5)
        assert inbox.get(timeout=5).version == 5  # taken out of the queue, but never applied: book at 3
        algorithm.fetched.clear()
        comm._rejoin(comm._generation)  # the restarted coordinator says 4
        assert algorithm.fetched.wait(5), algorithm.asked
    finally:
        stop.set()
        thread.join(5)
    assert algorithm.asked == [3, 5]


def test_after_a_download_from_a_coordinator_that_went_back_the_next_catch_up_starts_there():
    """The queued patch brings the model to 5; the coordinator comes back at 3 and the worker's catch-up
    from 5 gets blocks at 3 (it had to download). The model will then be at 3, so the next catch-up
    asks from 3, not from 5: rounds 4 and 5 of the new history would be skipped."""
    algorithm = LogCatchingUp(versions=[5, 3, 4])
    comm, inbox, stop, thread = catching_up(3, algorithm)
    try:
        comm._announce(5)
        assert algorithm.fetched.wait(5) and inbox.get(timeout=5).version == 5
        algorithm.fetched.clear()
        comm._rejoin(comm._generation)  # at 3: the fetch from 5 answers with the blocks of 3
        assert algorithm.fetched.wait(5) and inbox.get(timeout=5).version == 3
        algorithm.fetched.clear()
        comm._announce(4)
        assert algorithm.fetched.wait(5), algorithm.asked
    finally:
        stop.set()
        thread.join(5)
    assert algorithm.asked == [3, 5, 3]
