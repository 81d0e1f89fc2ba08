"""TLS, mutual TLS and per-worker tokens: who may join, and under which name."""

import shutil

import grpc
import pytest

from fedblock.client.session import Session
from fedblock.common.cli import main
from fedblock.common.config import ConfigError
from fedblock.common.security import channel_credentials, hash_token, load_tokens

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")


def join(address, name, *, ca=None, cert=None, key=None, token=None, insecure=False):
    creds = None if insecure else channel_credentials(ca, cert, key)
    session = Session(address, name, credentials=creds, token=token, server_name="localhost")
    try:
        return session.join(num_examples=1, device="cpu", timeout=2)
    finally:
        session.close()


def test_tls_run_end_to_end(federation, pki, data_file):
    fed = federation(insecure=False, tls_cert=pki / "coordinator.pem", tls_key=pki / "coordinator.key", rounds=2,
                     local_steps=2)
    fed.add_worker(fed.worker_config("site-a", data_file, insecure=False, tls_ca=pki / "ca.pem",
                                     tls_server_name="localhost"))
    summary = fed.run()
    assert summary["rounds_completed"] == 2 and summary["updates_accepted"] == 2


def test_tls_refuses_plaintext_and_unknown_cas(federation, pki):
    fed = federation(insecure=False, tls_cert=pki / "coordinator.pem", tls_key=pki / "coordinator.key")
    assert join(fed.address, "site-a", ca=pki / "ca.pem").session
    for kwargs in ({"insecure": True}, {"ca": pki / "other.pem"}):
        with pytest.raises(grpc.RpcError) as e:
            join(fed.address, "site-a", **kwargs)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_binds_the_certificate_to_the_worker_name(federation, pki):
    fed = federation(insecure=False, tls_cert=pki / "coordinator.pem", tls_key=pki / "coordinator.key",
                     tls_client_ca=pki / "ca.pem")
    ca = pki / "ca.pem"
    assert join(fed.address, "site-a", ca=ca, cert=pki / "site-a.pem", key=pki / "site-a.key").session
    with pytest.raises(grpc.RpcError) as e:  # site-a's certificate, site-b's name
        join(fed.address, "site-b", ca=ca, cert=pki / "site-a.pem", key=pki / "site-a.key")
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "names ['site-a'], not 'site-b'" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:  # no client certificate: the handshake fails
        join(fed.address, "site-a", ca=ca)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    refused = fed.coordinator.metrics.joins_refused._value.get()
    assert refused == 1


def test_tokens_let_a_worker_join_only_under_its_own_name(federation, tmp_path):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f"site-a: {hash_token('secret-a')}\nsite-b: plain-b\n")
    fed = federation(auth_tokens=tokens)
    assert join(fed.address, "site-a", token="secret-a", insecure=True).session
    assert join(fed.address, "site-b", token="plain-b", insecure=True).session
    for name, token in (("site-a", "wrong"), ("site-a", "plain-b"), ("site-c", "secret-a"), ("site-a", None)):
        with pytest.raises(grpc.RpcError) as e:
            join(fed.address, name, token=token, insecure=True)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, token)
    assert fed.coordinator.metrics.joins_refused._value.get() == 4
    assert "site-c" not in {w.name for w in fed.coordinator.registry.all()}


def test_a_session_secret_cannot_be_used_under_another_name(federation, pki):
    fed = federation()
    session = Session(fed.address, "site-a")
    session.join(num_examples=1, device="cpu", timeout=5)
    session._metadata = (("fedblock-worker", "site-b"), session._metadata[1])
    with pytest.raises(grpc.RpcError) as e:
        session.heartbeat(0, 0)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    session.close()


def test_token_command_and_tokens_file(tmp_path, capsys):
    assert main(["token", "--name", "site-a"]) == 0
    out = capsys.readouterr().out.splitlines()
    token = out[0].rsplit(": ", 1)[1]
    (tmp_path / "t.yaml").write_text(out[-1] + "\n")
    assert load_tokens(tmp_path / "t.yaml") == {"site-a": hash_token(token)}
    for text, match in (("[1, 2]", "must map"), ("a: sha256:xyz", "64 lowercase hex"), ("a: ''", "non-empty")):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_tokens(tmp_path / "bad.yaml")


def test_worker_cli_gives_one_line_for_a_refused_token(federation, tmp_path, data_file, capsys):
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text("site-a: right\n")
    fed = federation(auth_tokens=tokens)
    code = main(["worker", "--coordinator", fed.address, "--name", "site-a", "--data", str(data_file), "--insecure",
                 "--token", "wrong", "--connect-timeout", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and "UNAUTHENTICATED" in err[-1] and "no valid token" in err[-1]
