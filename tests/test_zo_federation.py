"""Zeroth-order methods end to end over real gRPC: DeComFL and FedSPZO, the log and the replica.

The sync test follows the authors' (server/client model sync to 1e-6): after a run in which workers
join late and miss rounds, each float32 worker that catches up from where it is holds exactly the
coordinator's replica (max abs difference 0, well inside 1e-6).
"""

import pytest
import torch
from test_faults import wait_for

from fedblock.client.session import Session
from fedblock.common import zo
from fedblock.common.models import load_model


def replica(coordinator) -> dict[str, torch.Tensor]:
    return {n: t for tensors in coordinator.global_model.tensors.values() for n, t in tensors.items()}


def caught_up(fed, worker) -> dict[str, torch.Tensor]:
    """The worker's model after it catches up to the coordinator's final version, as it would when given
    its next task: its own algorithm's fetch (the log, or blocks + log) and apply, over a new session."""
    session = Session(fed.address, worker.config.name)
    try:
        session.join(0, "cpu", timeout=10)
        final = fed.coordinator.global_model.version
        patch = worker.algorithm.fetch(session, worker.book.version, dict(worker.book.block_versions), final)
        worker.algorithm.apply(patch, worker.local)
    finally:
        session.close()
    assert patch.version == final
    return {n: p.detach().clone() for n, p in worker.local.model.named_parameters()}


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[n].float() - b[n].float()).abs().max()) for n in b)


@pytest.mark.parametrize("algorithm, perturbations", [("decomfl", "3"), ("fedspzo", "1,3")])
def test_late_workers_that_missed_rounds_catch_up_to_the_replica(federation, data_file, tiny_model, tmp_path,
                                                                 algorithm, perturbations):
    fed = federation(algorithm=algorithm, rounds=8, clients_per_round=2, min_workers=2, min_updates=1, lr=1e-3,
                     zo_perturbations=perturbations, local_steps=2, eval_data=str(data_file))
    a = fed.add_worker(fed.worker_config("a", data_file, work_dir=tmp_path / "a"))
    b = fed.add_worker(fed.worker_config("b", data_file, work_dir=tmp_path / "b"))
    result = {}
    import threading

    run = threading.Thread(target=lambda: result.setdefault("summary", fed.coordinator.run()), daemon=True)
    run.start()
    wait_for(lambda: fed.coordinator.global_model.version >= 3, 60, "round 3 to close")
    c = fed.add_worker(fed.worker_config("c", data_file, work_dir=tmp_path / "c"))  # joins late: replays the log
    run.join(120)
    assert not run.is_alive(), "the run did not finish"
    for t in fed.threads:
        t.join(30)
    summary = result["summary"]
    assert summary["rounds_completed"] == 8 and summary["updates_rejected"] == 0
    initial = dict(load_model(tiny_model).named_parameters())
    final = replica(fed.coordinator)
    assert max_diff(final, initial) > 0, "the replica never moved"
    assert summary["eval_loss_final"] != summary["eval_loss_initial"]
    for worker in (a, b, c):
        assert worker.book is not None, f"{worker.config.name} never started"
        assert max_diff(caught_up(fed, worker), final) <= 1e-6, worker.config.name


def test_a_worker_far_behind_downloads_the_blocks_instead_of_replaying(federation, data_file, tmp_path):
    # A replay limit of one round's work: the coordinator writes its replica's blocks about every other
    # round, and a worker more than a round behind downloads them and replays at most one round.
    probe = federation(algorithm="decomfl", rounds=1)
    per_round = probe.coordinator.algorithm.step_cost()
    fed = federation(algorithm="decomfl", rounds=6, clients_per_round=1, min_workers=1, lr=1e-3,
                     zo_perturbations="2", zo_replay_limit=per_round * 1.5)
    a = fed.add_worker(fed.worker_config("a", data_file, work_dir=tmp_path / "a"))
    summary = fed.run(timeout=120)
    assert summary["rounds_completed"] == 6
    assert fed.coordinator.global_model.files_at >= 4  # the replica's blocks were written as it went
    behind = fed.coordinator.algorithm.catch_up(0, 6)
    assert behind.download and not behind.entries
    session = Session(fed.address, "late")
    try:
        session.join(0, "cpu", timeout=10)
        patch = a.algorithm.fetch(session, 0, {}, 6)
    finally:
        session.close()
    assert patch.blocks and patch.version == 6  # blocks at the files' version, then the rest of the log
    a.algorithm.apply(patch, a.local)
    model = {n: p.detach() for n, p in a.local.model.named_parameters()}
    assert max_diff(model, replica(fed.coordinator)) <= 1e-6


def test_decomfl_moves_only_a_few_bytes_per_round(federation, data_file, tmp_path):
    fed = federation(algorithm="decomfl", rounds=20, clients_per_round=1, min_workers=2, zo_perturbations="5",
                     heartbeat_interval=60, heartbeat_timeout=120)
    workers = [fed.add_worker(fed.worker_config(n, data_file, work_dir=tmp_path / n)) for n in ("a", "b")]
    summary = fed.run(timeout=120)
    initial_blocks = sum(p.stat().st_size for p in fed.coordinator.store.blocks_dir.glob("*@0.safetensors"))
    sent = {w.config.name: {k: w.metrics.bytes_sent.labels(k)._value.get() for k in ("update", "control")}
            for w in workers}
    got = {w.config.name: {k: w.metrics.bytes_received.labels(k)._value.get() for k in ("model", "control")}
           for w in workers}
    for name in sent:
        after_start = got[name]["model"] - initial_blocks - 10_000  # each downloaded the model once (+ manifests)
        per_round = (sent[name]["update"] + sent[name]["control"] + after_start) / summary["rounds_completed"]
        assert sent[name]["update"] <= 20 * 60, (name, sent[name])  # 20 B of scalars + framing per report
        assert per_round < 1000, (name, sent, got)  # well under 1 MB for 1,000 rounds


def test_the_directions_do_not_depend_on_the_device_or_dtype_they_are_drawn_in():
    a = zo.signs(7, 2, 3, 5000, dtype=torch.float32)
    b = zo.signs(7, 2, 3, 5000, dtype=torch.bfloat16)
    assert torch.equal(a, b.float())


@pytest.mark.slow
def test_a_decomfl_coordinator_killed_mid_run_resumes_to_the_uninterrupted_model(tmp_path, tiny_model, data_file,
                                                                                  federation):
    """kill -9 the coordinator three times during a decomfl run: it resumes from its checkpoint (the
    blocks it last wrote and the log since), and the run ends with exactly the uninterrupted model."""
    import json
    import random

    from safetensors.torch import load_file
    from test_faults import cli, free_port, reap, run_with_kills, uninterrupted

    rounds = 8
    options = dict(algorithm="decomfl", rounds=rounds, local_steps=2, lr=1e-3, zo_perturbations="8")
    reference = uninterrupted(federation, data_file, **options)

    port, state = free_port(), tmp_path / "state"
    coordinator_args = ["coordinator", "--model", tiny_model, "--state-dir", state, "--listen", f"127.0.0.1:{port}",
                        "--insecure", "--algorithm", "decomfl", "--rounds", rounds, "--local-steps", 2, "--lr", 1e-3,
                        "--zo-perturbations", 8, "--threads", 1, "--heartbeat-interval", 0.5]
    worker = cli("worker", "--coordinator", f"127.0.0.1:{port}", "--name", "solo", "--data", data_file, "--insecure",
                 "--batch-size", 4, "--max-seq-len", 64, "--threads", 1, "--max-backoff", 1)
    try:
        run_with_kills(coordinator_args, worker, kills=3, pause=random.Random(3), longest=0.3)
    finally:
        reap(worker)
    summary = json.loads((state / "summary.json").read_text())
    assert summary["rounds_completed"] == rounds
    exported = {}
    for f in sorted((state / "export").glob("*.safetensors")):
        exported.update(load_file(f))
    for name, t in reference.items():
        assert torch.equal(exported[name], t), name


def test_an_update_is_called_late_only_once_its_round_is_checkpointed(federation):
    """A worker drops an update that the coordinator calls late. A coordinator killed between closing a
    round and writing its checkpoint resumes before the round and plans it again: had it called a second
    copy of the update late meanwhile (a report retried into a new session is sent again), the worker
    would keep nothing of the round, and the resumed run would wait for it forever (the kill test above
    once hung so). The answer waits for the checkpoint; a coordinator that stops first says "ask again"."""
    import threading

    from fedblock.common.messages import Assignment
    from fedblock.server.rounds import Refused

    fed = federation(algorithm="decomfl", rounds=2, zo_perturbations="2")
    c = fed.coordinator
    writing, release = threading.Event(), threading.Event()
    write_checkpoint = c.store.write_checkpoint

    def held(ckpt):  # round 1's checkpoint waits: the moment a kill -9 may strike
        if ckpt.round == 1:
            writing.set()
            assert release.wait(60)
        return write_checkpoint(ckpt)

    c.store.write_checkpoint = held
    admit_record, refused_late = c.rounds.admit_record, threading.Event()

    def admit(*args):
        try:
            return admit_record(*args)
        except Refused as e:
            if e.reason == "late":
                refused_late.set()
            raise

    c.rounds.admit_record = admit
    session = Session(fed.address, "solo")
    session.join(1, "cpu", timeout=10)
    runner = threading.Thread(target=c.run, daemon=True)
    runner.start()
    try:
        task = next(e for e in session.events() if isinstance(e, Assignment))
        again = (task.round, task.base_version, [0.5, -0.5], 1, 1.0)
        assert session.report(*again) == "accepted"
        assert writing.wait(30), "round 1 never closed"
        answer = {}

        def report_again():
            try:
                answer["status"] = c.report("solo", session.info.session, *again)
            except Refused as e:
                answer["refused"] = e.reason

        second = threading.Thread(target=report_again, daemon=True)
        second.start()
        assert refused_late.wait(30), "the second report never reached its round"
        with c._cv:  # held by the second report until it answers or waits
            c.stop()  # as the kill: round 1's checkpoint is never written while it waits
        second.join(30)
        assert answer == {"refused": "in_progress"}, answer  # never "late": the worker keeps the update
    finally:
        release.set()
        runner.join(30)
    assert c.global_model.version == 1 and (c.store.ckpt_dir / "round-000001.json").is_file()
    assert c.report("solo", session.info.session, *again) == "late"  # once checkpointed: late at once
    session.close()


def test_fedblock_export_of_a_zeroth_order_state_dir_is_the_replica(federation, data_file, tmp_path):
    from safetensors.torch import load_file

    from fedblock.common.config import ExportConfig
    from fedblock.common.tools import export

    fed = federation(algorithm="decomfl", rounds=3, lr=1e-3, zo_perturbations="2")
    fed.add_worker(fed.worker_config("a", data_file, work_dir=tmp_path / "a"))
    fed.run(timeout=60)
    assert fed.coordinator.global_model.files_at == 0  # the blocks on disk are the initial ones
    out = export(ExportConfig(state_dir=fed.coordinator.store.root, out=tmp_path / "out"))
    exported = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        exported.update(load_file(f))
    for name, t in replica(fed.coordinator).items():
        assert name not in exported or torch.equal(exported[name], t), name
    assert out


def test_a_resume_with_other_zeroth_order_settings_is_refused(tmp_path, tiny_model):
    from fedblock.common.config import CoordinatorConfig
    from fedblock.server import daemon
    from fedblock.server.store import StateError

    def config(p):
        return CoordinatorConfig(model=str(tiny_model), state_dir=tmp_path / "s", insecure=True, algorithm="decomfl",
                                 zo_perturbations=p)

    daemon.build(config("3"))
    daemon.build(config("3"))  # the same settings resume
    with pytest.raises(StateError, match="zo_perturbations"):
        daemon.build(config("4"))


def test_scalars_out_of_bounds_are_refused_and_change_nothing(federation, tiny_model):
    import threading

    import grpc

    from fedblock.common.messages import Assignment

    fed = federation(algorithm="decomfl", rounds=1, zo_perturbations="2", max_update_norm=50.0)
    session = Session(fed.address, "x")
    session.join(1, "cpu", timeout=10)
    runner = threading.Thread(target=fed.coordinator.run, daemon=True)
    runner.start()
    task = next(e for e in session.events() if isinstance(e, Assignment))
    before = {n: t.clone() for n, t in replica(fed.coordinator).items()}
    for numbers, reason in (([1e30, 0.0], "malformed"), ([float("nan"), 0.0], "malformed"), ([1.0], "malformed"),
                            ([40.0, 40.0], "too_large_norm")):
        with pytest.raises(grpc.RpcError) as e:
            session.report(task.round, task.base_version, numbers, 1, 1.0)
        assert reason in e.value.details(), e.value.details()
    assert fed.coordinator.rounds.plans[task.round].records == {}
    assert session.report(task.round, task.base_version, [0.5, -0.5], 1, 1.0) == "accepted"
    runner.join(30)
    session.close()
    moved = max(float((before[n] - t).abs().max()) for n, t in replica(fed.coordinator).items())
    assert 0 < moved < 1e-3


def test_fedspzo_splits_only_where_a_block_starts(tmp_path):
    from fedblock.common.algorithms import FedSPZO
    from fedblock.common.messages import BlockSpec, TensorSpec

    def specs(layers, per_block):
        names = ["embed"] + [f"layers.{i}-{i + per_block - 1}" if per_block > 1 else f"layers.{i}"
                             for i in range(0, layers, per_block)] + ["head"]
        return [BlockSpec(n, (TensorSpec(f"{n}.w", "float32", (4,)),)) for n in names]

    for layers, per_block in ((4, 2), (8, 2), (6, 3), (30, 1)):
        blocks = specs(layers, per_block)
        algo = FedSPZO({"zo_perturbations": "1,8"}, blocks, [b.name for b in blocks])
        assert algo.split % per_block == 0 and 0 < algo.split < layers, (layers, per_block, algo.split)
    assert FedSPZO({"zo_perturbations": "1,8"}, specs(30, 1), [b.name for b in specs(30, 1)]).split == 18
    with pytest.raises(ValueError, match="inside a block"):
        FedSPZO({"zo_perturbations": "1,8", "zo_split": "3"}, specs(8, 2), [b.name for b in specs(8, 2)])
    with pytest.raises(ValueError, match="no trainable block"):
        FedSPZO({"zo_perturbations": "1,8"}, specs(4, 1), ["head"])


def test_zeroth_order_methods_refuse_a_pipeline():
    from fedblock.common.config import ConfigError, CoordinatorConfig

    with pytest.raises(ConfigError, match="depth 0"):
        CoordinatorConfig(model="m", state_dir="s", insecure=True, algorithm="decomfl", pipeline_depth=1).check()
