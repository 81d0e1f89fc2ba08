"""The algorithm seam: an algorithm from outside fedblock runs end to end; a worker that cannot import
the run's algorithm leaves at Join and says why; Join refuses another protocol version; the state dir's
format is migrated (block methods) or refused (anything else, or a newer format)."""

import json
import os
import subprocess
import sys
import types

import grpc
import pytest
import sign_descent
import torch
from conftest import Federation

from fedblock.common.config import CoordinatorConfig
from fedblock.common.messages import PROTOCOL_VERSION
from fedblock.common.models import load_model
from fedblock.common.pb import coordinator_pb2 as pb
from fedblock.common.pb import coordinator_pb2_grpc as pb_grpc
from fedblock.server import daemon
from fedblock.server.store import STATE_FORMAT, StateError

# ---- an algorithm defined outside fedblock ------------------------------------------------------


def test_a_custom_sign_descent_algorithm_runs_end_to_end(federation, data_file, tiny_model):
    rounds, step = 3, sign_descent.SignDescent.server_lr
    fed = federation(algorithm="sign_descent:SignDescent", rounds=rounds, local_steps=2, lr=1e-3)
    worker = fed.add_worker(fed.worker_config("solo", data_file))
    summary = fed.run(timeout=120)
    assert summary["rounds_completed"] == rounds and summary["updates_rejected"] == 0
    assert fed.outcomes["solo"].finished and fed.outcomes["solo"].error is None
    assert isinstance(fed.coordinator.algorithm, sign_descent.SignDescent)
    assert isinstance(worker.algorithm, sign_descent.SignDescent)  # the worker imported it by name too

    initial = dict(load_model(tiny_model).named_parameters())
    changed = set()
    for block, tensors in fed.coordinator.global_model.tensors.items():
        for name, final in tensors.items():
            moved = final.double() - initial[name].detach().double()
            k = torch.round(moved / step)
            # Every element moved by a whole number of server steps (float32 rounding aside: < 1e-6,
            # a thousandth of a step), at most one per round.
            assert float((moved - k * step).abs().max()) < 1e-6, f"{name} moved by something other than k * {step}"
            assert float(k.abs().max()) <= rounds, name
            if bool((k != 0).any()):
                changed.add(block)
    assert changed, "no block of the global model changed"
    # A fedbcd step (g + mean delta) would not land on the grid: the sign step is what ran.
    assert changed <= set(fed.coordinator.trainable)


# ---- a worker that cannot import the algorithm ----------------------------------------------------


def test_a_worker_that_cannot_import_the_algorithm_leaves_at_join(federation, data_file, monkeypatch, tmp_path):
    # The coordinator's process can import this algorithm; the worker's process cannot.
    module = types.ModuleType("ephemeral_algo_xyz")

    class Ephemeral(sign_descent.SignDescent):
        name = "ephemeral"

    module.Ephemeral = Ephemeral
    monkeypatch.setitem(sys.modules, "ephemeral_algo_xyz", module)
    fed = federation(algorithm="ephemeral_algo_xyz:Ephemeral", rounds=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-m", "fedblock.common.cli", "worker", "--coordinator", fed.address, "--name", "lacking",
         "--data", str(data_file), "--insecure", "--connect-timeout", "30", "--threads", "1"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "ephemeral_algo_xyz:Ephemeral" in last and "cannot" in last, proc.stderr[-3000:]
    assert "ephemeral_algo_xyz" in last.split("cannot", 1)[1]  # and why: the module it could not import
    # It joined, then left: the coordinator does not count it as connected (nor waits for it).
    assert "lacking" in {w.name for w in fed.coordinator.registry.all()}
    assert "lacking" not in fed.coordinator.registry.connected()


# ---- the protocol version --------------------------------------------------------------------------


def test_join_refuses_another_protocol_version(federation):
    fed = federation(algorithm="fedbcd", rounds=1)
    channel = grpc.insecure_channel(fed.address)
    try:
        stub = pb_grpc.CoordinatorStub(channel)
        for protocol in (0, 99):
            request = pb.JoinRequest(name=f"p{protocol}", version="0.0.1", device="cpu", num_examples=1,
                                     protocol=protocol)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Join(request, timeout=10)
            e = caught.value
            assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, (protocol, e.code(), e.details())
            assert f"protocol {protocol}" in e.details() and f"protocol {PROTOCOL_VERSION}" in e.details(), e.details()
        assert not {"p0", "p99"} & {w.name for w in fed.coordinator.registry.all()}
        reply = stub.Join(pb.JoinRequest(name="right", version="0.1.0", device="cpu", num_examples=1,
                                         protocol=PROTOCOL_VERSION), timeout=10)
        assert reply.session and reply.algorithm == "fedbcd"
        assert "right" in fed.coordinator.registry.connected()
    finally:
        channel.close()


# ---- the state dir's format -------------------------------------------------------------------------


def rewrite_run_json(state_dir, **changes):
    """Edit run.json as an older (or newer) fedblock would have written it; a value None removes the key."""
    path = state_dir / "run.json"
    recorded = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            recorded.pop(key, None)
        else:
            recorded[key] = value
    path.write_text(json.dumps(recorded))
    return recorded


def state_config(state_dir, tiny_model, **kw):
    return CoordinatorConfig(model=str(tiny_model), state_dir=state_dir, listen="127.0.0.1:0", insecure=True, **kw)


def test_a_format_1_state_dir_of_a_block_method_is_migrated_and_resumes(federation, data_file, tiny_model):
    first = federation(algorithm="fedbcd", rounds=1, local_steps=2)
    first.add_worker(first.worker_config("solo", data_file))
    assert first.run(timeout=120)["rounds_completed"] == 1
    state_dir = first.coordinator.store.root
    after_one = {b: {n: t.clone() for n, t in ts.items()} for b, ts in first.coordinator.global_model.tensors.items()}
    # Format 1, as fedblock wrote it before: no "format", no "train_blocks", no initial.json.
    recorded = rewrite_run_json(state_dir, format=None, train_blocks=None)
    (state_dir / "initial.json").unlink()

    running = daemon.start(state_config(state_dir, tiny_model, algorithm="fedbcd", rounds=2, local_steps=2))
    second = Federation(running)
    try:
        migrated = json.loads((state_dir / "run.json").read_text())
        assert migrated["format"] == STATE_FORMAT == 2
        assert migrated["run_id"] == recorded["run_id"] and second.coordinator.run_id == recorded["run_id"]
        assert migrated == {**recorded, "format": 2, "train_blocks": "*"}  # what format 1 lacked, nothing else
        g = second.coordinator.global_model
        assert g.version == 1  # resumed from round 1's checkpoint
        for b, tensors in after_one.items():
            for n, t in tensors.items():
                assert torch.equal(g.tensors[b][n], t), n
        second.add_worker(second.worker_config("solo", data_file))
        summary = second.run(timeout=120)
        assert summary["rounds_completed"] == 2 and summary["updates_rejected"] == 0
    finally:
        second.close()
    # A third start reads the migrated dir as it is.
    assert daemon.build(state_config(state_dir, tiny_model, algorithm="fedbcd", rounds=2)).global_model.version == 2


def test_a_refused_start_leaves_a_format_1_state_dir_as_it_was(tmp_path, tiny_model):
    # A format-1 run trained only 'layers.*' (format 1 did not record --train-blocks). A start with a
    # wrong setting is refused, and must not record its own --train-blocks: the right start still resumes.
    state_dir = tmp_path / "state"
    daemon.build(state_config(state_dir, tiny_model, algorithm="fedbcd", train_blocks="layers.*"))
    before = rewrite_run_json(state_dir, format=None, train_blocks=None)
    with pytest.raises(StateError, match="codec='none', not 'bf16'"):
        daemon.build(state_config(state_dir, tiny_model, algorithm="fedbcd", codec="bf16"))
    with pytest.raises(StateError, match="algorithm='fedbcd', not 'parablock'"):
        daemon.build(state_config(state_dir, tiny_model, algorithm="parablock"))
    assert json.loads((state_dir / "run.json").read_text()) == before
    resumed = daemon.build(state_config(state_dir, tiny_model, algorithm="fedbcd", train_blocks="layers.*"))
    assert resumed.run_id == before["run_id"]
    assert json.loads((state_dir / "run.json").read_text()) == {**before, "format": 2, "train_blocks": "layers.*"}


def test_a_format_1_state_dir_is_refused_for_a_zeroth_order_method(tmp_path, tiny_model):
    state_dir = tmp_path / "state"
    daemon.build(state_config(state_dir, tiny_model, algorithm="fedbcd"))
    before = rewrite_run_json(state_dir, format=None, algorithm="decomfl")
    with pytest.raises(StateError, match=r"state format 1 .*another --state-dir"):
        daemon.build(state_config(state_dir, tiny_model, algorithm="decomfl"))
    assert json.loads((state_dir / "run.json").read_text()) == before  # left as it was


@pytest.mark.parametrize("algorithm", ["fedbcd", "decomfl"])
def test_a_newer_state_format_is_refused(tmp_path, tiny_model, algorithm):
    state_dir = tmp_path / "state"
    daemon.build(state_config(state_dir, tiny_model, algorithm=algorithm))
    before = rewrite_run_json(state_dir, format=STATE_FORMAT + 1)
    with pytest.raises(StateError, match=rf"newer fedblock \(state format {STATE_FORMAT + 1}.*another --state-dir"):
        daemon.build(state_config(state_dir, tiny_model, algorithm=algorithm))
    assert json.loads((state_dir / "run.json").read_text()) == before
