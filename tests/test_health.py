"""The standard gRPC health service and server reflection on the coordinator, asked with the stock
clients (grpcio-health-checking, grpcio-reflection), and `fedblock health`, the probes' command."""

import shutil
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fedblock.common.cli import main
from fedblock.common.config import CoordinatorConfig
from fedblock.common.pb import coordinator_pb2 as pb
from fedblock.common.pb import coordinator_pb2_grpc as pb_grpc
from fedblock.common.simulate import free_port
from fedblock.server import daemon

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def config(tmp_path, tiny_model, **kw) -> CoordinatorConfig:
    return CoordinatorConfig(model=str(tiny_model), state_dir=tmp_path / "state", listen=f"127.0.0.1:{kw.pop('port', 0)}",
                             insecure=True, rounds=1, **kw)


def loading_gate(monkeypatch):
    """daemon.start's loading held until `release` is set (`loading` says it got there); the port it
    bound lands in the returned dict as soon as the server runs."""
    loading, release, bound = threading.Event(), threading.Event(), {}
    real_build, real_serve = daemon.build, daemon.serve

    def slow_build(c, metrics=None):
        loading.set()
        assert release.wait(30)
        return real_build(c, metrics)

    def serve(c, coordinator=None):
        serving = real_serve(c, coordinator)
        bound["port"] = serving.port
        return serving

    monkeypatch.setattr(daemon, "build", slow_build)
    monkeypatch.setattr(daemon, "serve", serve)
    return loading, release, bound


def test_not_serving_while_loading_then_serving(tmp_path, tiny_model, monkeypatch):
    """The server answers while the model and state load: health NOT_SERVING, a Join UNAVAILABLE (workers
    retry it); once loaded, SERVING, with no worker there yet (the readiness probe lets them in)."""
    loading, release, bound = loading_gate(monkeypatch)
    result = {}
    metrics_port = free_port()
    starter = threading.Thread(target=lambda: result.setdefault(
        "running", daemon.start(config(tmp_path, tiny_model, metrics_port=metrics_port))))
    starter.start()
    try:
        assert loading.wait(30)
        address = f"127.0.0.1:{bound['port']}"
        # /metrics is up while it loads (so no "coordinator down"), in the state "waiting"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert 'fedblock_run_state{state="waiting"} 1.0' in r.read().decode()
        assert check(address) == NOT_SERVING
        assert check(address, "fedblock.v1.Coordinator") == NOT_SERVING
        assert main(["health", "--coordinator", address, "--insecure"]) == 1
        assert main(["health", "--coordinator", address, "--insecure", "--live"]) == 0
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as e:
            pb_grpc.CoordinatorStub(channel).Join(pb.JoinRequest(name="w", protocol=4), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        starter.join(60)
        running = result["running"]
        try:
            assert check(address) == SERVING
            assert check(address, "fedblock.v1.Coordinator") == SERVING
            assert main(["health", "--coordinator", address, "--insecure"]) == 0
            assert running.coordinator.state == "waiting"  # no worker yet, and ready for them
        finally:
            running.close(grace=0)
    finally:
        release.set()
        starter.join(60)


def test_unknown_service_and_unreachable(tmp_path, tiny_model, capsys):
    running = daemon.start(config(tmp_path, tiny_model))
    address = f"127.0.0.1:{running.port}"
    try:
        with pytest.raises(grpc.RpcError) as e:
            check(address, "no.such.Service")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert main(["health", "--coordinator", address, "--insecure", "--service", "no.such.Service"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().out
    finally:
        running.close(grace=0)
    assert main(["health", "--coordinator", address, "--insecure", "--timeout", "1"]) == 1  # nothing listens


def test_a_failed_load_releases_the_port(tmp_path, tiny_model):
    """A coordinator that cannot load stops its server: the port is free for the next try."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bad = config(tmp_path, tiny_model, port=port, train_blocks="nothing.matches")
    with pytest.raises(Exception, match="train-blocks"):
        daemon.start(bad)
    running = daemon.start(config(tmp_path, tiny_model, port=port))
    running.close(grace=0)


def test_reflection_lists_the_services(tmp_path, tiny_model):
    running = daemon.start(config(tmp_path, tiny_model))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
            names = {s.name for s in reply.list_services_response.service}
            assert {"fedblock.v1.Coordinator", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
            request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="fedblock.v1.Coordinator")
            (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
            assert reply.file_descriptor_response.file_descriptor_proto  # grpcurl can describe it
    finally:
        running.close(grace=0)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_the_kubernetes_probes_against_a_live_tls_coordinator(tmp_path, tiny_model, monkeypatch, pki):
    """deploy/k8s's exec probes, as written there (only the address and the CA file replaced): while the
    coordinator loads, liveness passes and readiness fails; once loaded, both pass."""
    from test_k8s import probe_commands

    loading, release, bound = loading_gate(monkeypatch)
    c = CoordinatorConfig(model=str(tiny_model), state_dir=tmp_path / "state", listen="127.0.0.1:0", rounds=1,
                          tls_cert=pki / "coordinator.pem", tls_key=pki / "coordinator.key")
    result = {}
    starter = threading.Thread(target=lambda: result.setdefault("running", daemon.start(c)))
    starter.start()
    try:
        assert loading.wait(30)
        readiness, liveness = probe_commands(f"127.0.0.1:{bound['port']}", str(pki / "ca.pem"), "localhost")
        assert readiness[0] == liveness[0] == "fedblock"
        assert main(readiness[1:]) == 1 and main(liveness[1:]) == 0
        release.set()
        starter.join(60)
        try:
            assert main(readiness[1:]) == 0 and main(liveness[1:]) == 0
        finally:
            result["running"].close(grace=0)
    finally:
        release.set()
        starter.join(60)


def test_a_resumed_run_is_running_at_once(tmp_path, tiny_model, data_file, federation):
    """A coordinator that resumes a run in progress reports "running" (the alerts that watch a running
    run stay armed) before any worker is back."""
    import dataclasses

    fed = federation(rounds=1, local_steps=1)
    fed.add_worker(fed.worker_config("w0", data_file))
    fed.run()
    resumed = daemon.build(dataclasses.replace(fed.coordinator.config, rounds=3))
    thread = threading.Thread(target=resumed.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while resumed.state != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resumed.state == "running" and not resumed.registry.connected()
        assert resumed.metrics.registry.get_sample_value("fedblock_run_state", {"state": "running"}) == 1
    finally:
        resumed.stop()
        thread.join(30)
