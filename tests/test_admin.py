"""Operator controls during a run (`fedblock admin`, SIGHUP, SIGUSR1) and a site's pre-flight check
(`fedblock worker --check`): real gRPC on loopback, in-process coordinators, a tiny model."""

import signal
import threading
import time

import grpc
import pytest

from fedblock.client.check import preflight
from fedblock.client.session import Session
from fedblock.common.admin import admin
from fedblock.common.cli import main
from fedblock.common.config import AdminConfig
from fedblock.common.models import make_tiny_model
from fedblock.common.pb import coordinator_pb2 as pb
from fedblock.common.pb import coordinator_pb2_grpc as pb_grpc
from fedblock.common.rpc import open_channel
from fedblock.common.security import hash_token
from fedblock.server.daemon import operator_signal
from fedblock.server.rounds import RoundRules, Rounds

OPERATOR_TOKEN = "op-secret"
FAST = {"local_steps": 1, "heartbeat_interval": 1.0, "end_grace": 5.0}


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def admin_tokens(tmp_path):
    path = tmp_path / "admins.yaml"
    path.write_text(f"alice: {hash_token(OPERATOR_TOKEN)}\n")
    return path


def command(fed, action, argument=None, token=OPERATOR_TOKEN, operator="alice"):
    """The coordinator's answer to an Admin call, or the RpcError it raised."""
    with open_channel(fed.address, None) as channel:
        metadata = [("fedblock-operator", operator)] + ([("authorization", f"Bearer {token}")] if token else [])
        request = pb.AdminRequest(**{action: True if argument is None else argument})
        try:
            return pb_grpc.CoordinatorStub(channel).Admin(request, metadata=metadata, timeout=30).result
        except grpc.RpcError as e:
            return e


def in_background(fed, timeout=120):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("summary", fed.run(timeout=timeout)), daemon=True)
    thread.start()
    return thread, result


def test_admin_needs_admin_tokens_and_the_right_token(federation, admin_tokens, capsys):
    plain = federation()
    e = command(plain, "drain")
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "--admin-tokens" in e.details()
    fed = federation(admin_tokens=admin_tokens)
    for token, operator in (("wrong", "alice"), (None, "alice"), (OPERATOR_TOKEN, "mallory"), (OPERATOR_TOKEN, "")):
        e = command(fed, "drain", token=token, operator=operator)
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "no valid token for operator" in e.details(), (token, operator)
    assert fed.coordinator.rounds.total == 20  # nothing changed
    e = command(fed, "drop_worker", "nobody")
    assert e.code() == grpc.StatusCode.NOT_FOUND and "no worker named 'nobody'" in e.details()
    # The command line: exit 1 with the reason when refused, 2 for a wrong command line.
    assert main(["admin", "drain", "--coordinator", fed.address, "--insecure", "--operator", "alice", "--token", "x"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["admin", "set-rounds", "--coordinator", fed.address, "--insecure"]) == 2
    assert "set-rounds needs N" in capsys.readouterr().err


def test_set_rounds_extends_the_run_and_never_goes_below_what_is_planned(federation, admin_tokens, data_file):
    fed = federation(rounds=2, admin_tokens=admin_tokens, **FAST)
    fed.add_worker(fed.worker_config("site-a", data_file))
    out = []
    config = AdminConfig(coordinator=fed.address, insecure=True, operator="alice", token=OPERATOR_TOKEN)
    assert admin(config, "set-rounds", "4", out=out.append) == 0  # before the first round: extend --rounds 2 to 4
    assert "4 rounds long (was 2" in out[0]
    c = fed.coordinator
    assert c.status()["rounds_total"] == 4 and c.metrics.rounds_target._value.get() == 4
    thread, result = in_background(fed)
    wait_for(lambda: c.rounds.committed >= 1, what="round 1 planned")
    e = command(fed, "set_rounds", 0)
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "already planned or done" in e.details()
    thread.join(120)
    summary = result["summary"]
    assert summary["rounds_completed"] == summary["rounds_total"] == 4
    assert fed.outcomes["site-a"].finished and fed.outcomes["site-a"].reason == "finished"
    e = command(fed, "set_rounds", 10)  # the run is over
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "the run is over" in e.details()


def test_drain_ends_the_run_after_its_open_rounds(federation, admin_tokens, data_file):
    fed = federation(rounds=100, admin_tokens=admin_tokens, **FAST)
    fed.add_worker(fed.worker_config("site-a", data_file))
    c = fed.coordinator
    thread, result = in_background(fed)
    wait_for(lambda: c.global_model.version >= 1, what="round 1 closed")
    answer = command(fed, "drain")
    assert "draining: the run ends after round" in answer or "the run ends now" in answer
    last = c.rounds.total
    assert last < 100 and c.status()["rounds_total"] == last and c.metrics.rounds_target._value.get() == last
    thread.join(120)
    summary = result["summary"]
    assert summary["rounds_completed"] == summary["rounds_total"] == last  # a complete run: exit status 0
    assert summary["export_path"] and c.state == "finished"
    assert fed.outcomes["site-a"].reason == "finished"


def test_drop_worker_ends_its_session_and_the_rounds_go_on(federation, admin_tokens, data_file):
    fed = federation(rounds=100, min_workers=2, admin_tokens=admin_tokens, **FAST)
    for name in ("site-a", "site-b"):
        fed.add_worker(fed.worker_config(name, data_file))
    c = fed.coordinator
    thread, result = in_background(fed)
    wait_for(lambda: c.global_model.version >= 1, what="round 1 closed")
    answer = command(fed, "drop_worker", "site-b")
    assert "dropped worker 'site-b'" in answer
    fed.threads[1].join(30)
    assert not fed.threads[1].is_alive(), "the dropped worker did not stop"
    outcome = fed.outcomes["site-b"]
    assert outcome.reason == "dropped by operator" or "dropped by operator" in str(outcome.error)
    record = {w.name: w for w in c.registry.all()}["site-b"]
    assert not record.connected  # it did not join again by itself
    # no "lost worker" for an operator's decision: its per-worker series are gone
    assert c.metrics.registry.get_sample_value("fedblock_peer_connected", {"worker": "site-b"}) is None
    e = command(fed, "drop_worker", "site-b")
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "not connected" in e.details()
    # The rounds go on with site-a alone.
    version = c.global_model.version
    wait_for(lambda: c.global_model.version >= version + 2, what="two rounds without site-b")
    assert all("site-b" not in p.assignments for p in c.rounds.plans.values() if p.round > version + 1)
    # Started again by its operator, it may join again.
    session = Session(fed.address, "site-b")
    assert session.join(num_examples=1, device="cpu", timeout=5).session
    session.leave()
    session.close()
    operator_signal(fed.running.serving.service, signal.SIGUSR1).join(10)  # SIGUSR1: drain
    thread.join(120)
    summary = result["summary"]
    assert summary["rounds_completed"] == summary["rounds_total"] < 100
    assert fed.outcomes["site-a"].reason == "finished"


def test_reload_tokens_drops_a_revoked_worker_and_a_bad_file_changes_nothing(federation, admin_tokens, data_file,
                                                                               tmp_path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"site-a: {hash_token('secret-a')}\nsite-b: {hash_token('secret-b')}\n")
    fed = federation(rounds=100, min_workers=2, auth_tokens=tokens, admin_tokens=admin_tokens, **FAST)
    fed.add_worker(fed.worker_config("site-a", data_file, token="secret-a"))
    fed.add_worker(fed.worker_config("site-b", data_file, token="secret-b"))
    c, service = fed.coordinator, fed.running.serving.service
    thread, result = in_background(fed)
    wait_for(lambda: c.global_model.version >= 1, what="round 1 closed")
    table = service.auth.tokens
    tokens.write_text("site-a: sha256:not-a-hash\n")
    e = command(fed, "reload_tokens")
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "--auth-tokens" in e.details()
    assert service.auth.tokens is table and set(c.registry.connected()) == {"site-a", "site-b"}
    tokens.write_text(f"site-a: {hash_token('secret-a')}\n")  # site-b revoked
    operator_signal(service, signal.SIGHUP).join(10)  # what SIGHUP does
    assert set(service.auth.tokens) == {"site-a"}
    fed.threads[1].join(30)
    assert not fed.threads[1].is_alive(), "the revoked worker did not stop"
    outcome = fed.outcomes["site-b"]
    assert outcome.reason == "token revoked" or "token revoked" in str(outcome.error)
    assert set(c.registry.connected()) == {"site-a"}
    with pytest.raises(grpc.RpcError) as e:  # and it cannot come back
        Session(fed.address, "site-b", token="secret-b").join(num_examples=1, device="cpu", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    version = c.global_model.version
    wait_for(lambda: c.global_model.version >= version + 1, what="a round without site-b")
    assert "no worker dropped" in command(fed, "reload_tokens")
    command(fed, "drain")
    thread.join(120)
    assert result["summary"]["rounds_completed"] == result["summary"]["rounds_total"]


def test_set_total_of_rounds():
    r = Rounds(RoundRules(rounds=3, clients_per_round=0, min_updates=1, round_timeout=0, depth=0, schedule="round-robin",
                          blocks=("a",), local_steps=1, lr=1e-3, lr_schedule="constant", seed=0))
    assert r.plan(1, {"w": 0}) is not None and r.committed == 1
    with pytest.raises(ValueError, match="already planned"):
        r.set_total(0)
    r.set_total(1)
    assert r.total == 1 and r.plan(2, {"w": 0}) is None
    r.set_total(5)
    assert r.total == 5 and not r.finished


# ---- fedblock worker --check --------------------------------------------------------------------


def test_check_against_a_live_coordinator(federation, tmp_path, tiny_model, data_file, capsys):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"site-a: {hash_token('secret-a')}\n")
    fed = federation(auth_tokens=tokens)
    c = fed.coordinator
    argv = ["worker", "--check", "--coordinator", fed.address, "--insecure", "--name", "site-a", "--data", str(data_file),
            "--batch-size", "4", "--max-seq-len", "64"]
    assert main([*argv, "--token", "secret-a", "--model", str(tiny_model)]) == 0
    out = capsys.readouterr().out.splitlines()
    checks = {line.split()[1].rstrip(":"): line.split()[0] for line in out[:-1]}
    assert checks == {"data": "OK", "coordinator": "OK", "token": "OK", "algorithm": "OK", "tokenize": "OK",
                      "model": "OK", "memory": "OK"}, out
    assert out[-1].startswith("OK")
    # Nothing registered: no worker in Status, none connected in the metrics.
    assert c.status()["workers"] == [] and c.metrics.workers_connected._value.get() == 0
    # Without --model the tokenizer comes from the coordinator (no session needed, the token is).
    lines = []
    config = fed.worker_config("site-a", data_file, token="secret-a")
    config.check_only = True
    assert preflight(config, out=lambda line, **_: lines.append(line)) == 0, lines
    assert any(line.startswith("OK   tokenize") for line in lines) and not c.registry.all()
    # A bad token: exit 1, and why.
    assert main([*argv, "--token", "wrong"]) == 1
    out = capsys.readouterr().out
    assert "FAIL token: no valid token for worker 'site-a'" in out and out.splitlines()[-1].startswith("FAIL")
    with open_channel(fed.address, None) as channel:  # nor do the model files go to a wrong token
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.CoordinatorStub(channel).FetchModelFiles(
                pb.ModelFilesRequest(), metadata=[("fedblock-worker", "site-a"), ("authorization", "Bearer wrong")]))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert c.metrics.joins_refused._value.get() == 1 and not c.registry.all()


def test_check_finds_other_weights_and_missing_data(federation, tmp_path, data_file, capsys):
    fed = federation()
    other = make_tiny_model(tmp_path / "other", "llama", seed=1, num_layers=4, hidden_size=64)
    base = ["worker", "--check", "--coordinator", fed.address, "--insecure", "--name", "site-a", "--batch-size", "4",
            "--max-seq-len", "64"]
    assert main([*base, "--data", str(data_file), "--model", str(other)]) == 1
    out = capsys.readouterr().out
    assert "FAIL model:" in out and ("differ from the coordinator's initial model" in out or "config.json" in out), out
    assert main([*base, "--data", str(tmp_path / "missing.jsonl")]) == 1
    out = capsys.readouterr().out
    assert "FAIL data:" in out and "missing.jsonl" in out, out
    assert "OK   coordinator:" in out
    assert not fed.coordinator.registry.all()


def test_an_operators_length_of_the_run_survives_a_restart(federation):
    """set-rounds and drain are kept in the state dir: a coordinator started again with the same --rounds
    keeps the operator's length (a drained run stays complete); another --rounds wins."""
    import dataclasses

    from fedblock.server import daemon

    fed = federation(rounds=8)
    c = fed.coordinator
    c.set_rounds(12)
    config = c.config
    assert daemon.build(config).rounds.total == 12
    assert daemon.build(dataclasses.replace(config, rounds=9)).rounds.total == 9
    assert daemon.build(config).rounds.total == 12  # the operator's length is for --rounds 8
    c.drain()  # nothing planned yet: the run ends now, at round 0
    again = daemon.build(config)
    assert again.rounds.total == 0 and again.rounds.finished


def test_a_length_that_cannot_be_recorded_changes_nothing(federation, monkeypatch):
    fed = federation(rounds=8)
    c = fed.coordinator

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(c.store, "write_rounds", full)
    with pytest.raises(ValueError, match="unchanged"):
        c.set_rounds(12)
    assert c.rounds.total == 8 and c.metrics.registry.get_sample_value("fedblock_rounds_target") == 8
