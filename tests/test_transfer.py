"""Uploads and downloads over real gRPC on loopback: chunking, integrity, resume and validation."""

import threading
import time

import grpc
import pytest
import torch

from fedblock.client.session import Session
from fedblock.common import wire
from fedblock.common.codecs import CodecPipeline
from fedblock.common.messages import Assignment
from fedblock.common.pb import coordinator_pb2 as pb

CHUNK = 4096


@pytest.fixture
def one_round(federation):
    """A 1-round run with a hand-driven worker session (no worker threads)."""
    fed = federation(rounds=1, chunk_size=CHUNK, local_steps=1, block_schedule="round-robin", train_blocks="layers.1")
    runner = threading.Thread(target=fed.run, daemon=True)
    session = Session(fed.address, "manual")
    session.join(num_examples=1, device="cpu", timeout=10)
    events = session.events()
    runner.start()
    assignment = next(e for e in events if isinstance(e, Assignment))
    yield fed, session, assignment, runner
    session.close()


def block_delta(fed, block, scale=1e-3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(t.shape, generator=gen) * scale for t in fed.coordinator.specs[block].tensors}


def pack(delta, block, round=1, tokens=1, codec="none"):
    return wire.pack(block, delta, CodecPipeline(codec), round=round, base_version=0, chunk_size=CHUNK, num_tokens=tokens)


def test_block_of_many_chunks_round_trips_bit_exactly(one_round):
    fed, session, a, runner = one_round
    assert a.round == 1 and a.blocks == ("layers.1",)
    before = {n: t.clone() for n, t in fed.coordinator.global_model.tensors["layers.1"].items()}
    delta = block_delta(fed, "layers.1")
    manifest, blob = pack(delta, "layers.1")
    assert manifest.num_chunks > 10
    assert session.upload(manifest, blob) == "accepted"
    runner.join(30)
    after = fed.coordinator.global_model
    assert after.version == 1 and after.block_versions["layers.1"] == 1
    for n, t in delta.items():  # weight 1 and one update: the global moves by exactly the delta
        assert torch.equal(after.tensors["layers.1"][n], before[n] + t)
    # ... and a worker downloading it gets the same bits.
    version, versions, _, blocks, _ = session.download({b: 0 for b in fed.coordinator.block_order})
    (got,) = list(blocks)
    assert version == 1 and got.block == "layers.1" and got.version == 1
    assert all(torch.equal(got.tensors[n], after.tensors["layers.1"][n]) for n in delta)


def raw_upload(session, manifest, chunks):
    def messages():
        yield pb.UploadMessage(header=pb.UploadHeader(manifest=manifest.to_pb()))
        for index, data in chunks:
            yield pb.UploadMessage(chunk=pb.Chunk(index=index, data=bytes(data)))

    return session.stub.Upload(messages(), metadata=session._metadata)


def rejected(fed, reason):
    return fed.coordinator.metrics.updates.labels("rejected", reason)._value.get()


def test_corrupted_chunk_is_refused_and_changes_nothing(one_round):
    fed, session, a, runner = one_round
    before = fed.coordinator.global_model
    manifest, blob = pack(block_delta(fed, "layers.1"), "layers.1")
    chunks = [(i, bytearray(c)) for i, c in wire.iter_chunks(blob, CHUNK)]
    chunks[7][1][5] ^= 0xFF
    with pytest.raises(grpc.RpcError) as err:
        raw_upload(session, manifest, chunks)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and "hash_mismatch" in err.value.details()
    assert rejected(fed, "hash_mismatch") == 1
    assert fed.coordinator.global_model is before and fed.coordinator.rounds.version == 0
    # The same worker can still deliver a good update for the round.
    assert session.upload(manifest, blob) == "accepted"
    runner.join(30)
    assert fed.coordinator.global_model.version == 1


def test_broken_upload_resumes_from_held_chunks(federation):
    """The link drops in the middle of an upload; the retry sends only the chunks the coordinator lacks."""
    from netproxy import Link

    fed = federation(rounds=1, chunk_size=CHUNK, local_steps=1, train_blocks="layers.1")
    runner = threading.Thread(target=fed.run, daemon=True)
    link = Link(fed.running.port)
    session = Session(f"127.0.0.1:{link.port}", "flaky")
    session.join(num_examples=1, device="cpu", timeout=10)
    events = session.events()
    runner.start()
    next(e for e in events if isinstance(e, Assignment))
    manifest, blob = pack(block_delta(fed, "layers.1"), "layers.1")
    original = session._upload_messages
    attempts = []

    def recording(m, b, skip):
        attempts.append([])
        for message in original(m, b, skip):
            index = wire.parse_chunk_message(message, wire.UPLOAD_CHUNK_FIELD)
            if index is not None and len(attempts) == 1 and len(attempts[0]) == manifest.num_chunks // 2:
                deadline = time.monotonic() + 10
                while not session._upload_status(manifest).held_chunks and time.monotonic() < deadline:
                    time.sleep(0.01)  # let the coordinator store some chunks, then cut the link
                link.cut()
            if index is not None:
                attempts[-1].append(index.index)
            yield message

    session._upload_messages = recording
    assert session.upload(manifest, blob) == "accepted"
    assert link.cuts == 1 and len(attempts) == 2
    first, resent = attempts
    held = manifest.num_chunks - len(resent)
    assert 0 < held < manifest.num_chunks  # the coordinator kept what arrived before the cut ...
    assert resent == list(range(held, manifest.num_chunks))  # ... and only the rest was sent again
    runner.join(30)
    assert fed.coordinator.global_model.version == 1
    session.close()
    link.close()


@pytest.mark.parametrize(
    "mutate,code,reason",
    [
        (lambda d: {n: t.clone().fill_(float("nan")) for n, t in d.items()}, grpc.StatusCode.INVALID_ARGUMENT, "non_finite"),
        (lambda d: {n: t.clone().fill_(float("inf")) for n, t in d.items()}, grpc.StatusCode.INVALID_ARGUMENT, "non_finite"),
        (lambda d: dict(list(d.items())[1:]), grpc.StatusCode.INVALID_ARGUMENT, "bad_manifest"),
        (lambda d: {n: t.reshape(-1) for n, t in d.items()}, grpc.StatusCode.INVALID_ARGUMENT, "bad_manifest"),
    ],
    ids=["nan", "inf", "missing_tensor", "wrong_shape"],
)
def test_bad_updates_are_refused_with_a_reason(one_round, mutate, code, reason):
    fed, session, a, runner = one_round
    before = fed.coordinator.global_model
    manifest, blob = pack(mutate(block_delta(fed, "layers.1")), "layers.1")
    with pytest.raises(grpc.RpcError) as err:
        session.upload(manifest, blob)
    assert err.value.code() == code and reason in err.value.details()
    assert rejected(fed, reason) == 1
    assert fed.coordinator.global_model is before
    good, blob = pack(block_delta(fed, "layers.1"), "layers.1")
    assert session.upload(good, blob) == "accepted"
    runner.join(30)


def test_assignment_rules_are_enforced(one_round):
    fed, session, a, runner = one_round
    wrong_block, blob = pack(block_delta(fed, "layers.0"), "layers.0")
    with pytest.raises(grpc.RpcError) as err:
        session.upload(wrong_block, blob)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "wrong_block" in err.value.details()
    future, blob = pack(block_delta(fed, "layers.1"), "layers.1", round=5)
    with pytest.raises(grpc.RpcError) as err:
        session.upload(future, blob)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "not_assigned" in err.value.details()
    other_codec, blob = pack(block_delta(fed, "layers.1"), "layers.1", codec="bf16")
    with pytest.raises(grpc.RpcError) as err:
        session.upload(other_codec, blob)
    assert "wrong_codec" in err.value.details()
    impostor = Session(fed.address, "manual")
    impostor.info = session.info
    impostor._metadata = (("fedblock-worker", "manual"), ("fedblock-session", "0" * 32))
    good, blob = pack(block_delta(fed, "layers.1"), "layers.1")
    with pytest.raises(grpc.RpcError) as err:
        impostor.upload(good, blob)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    impostor.close()
    assert session.upload(good, blob) == "accepted"
    runner.join(30)
    assert fed.coordinator.global_model.version == 1
    # The round closed with that update: sending it again is late, not an error, and changes nothing.
    assert session.upload(good, blob) == "late"
    assert fed.coordinator.global_model.version == 1


def test_download_is_a_delta_sync(one_round):
    fed, session, a, runner = one_round
    everything = fed.coordinator.block_order
    version, _, _, blocks, _ = session.download({})
    assert version == 0 and [b.block for b in blocks] == everything
    version, _, _, blocks, _ = session.download({b: 0 for b in everything})
    assert list(blocks) == []
    manifest, blob = pack(block_delta(fed, "layers.1"), "layers.1")
    session.upload(manifest, blob)
    runner.join(30)
    version, versions, _, blocks, _ = session.download({b: 0 for b in everything})
    assert version == 1 and [b.block for b in blocks] == ["layers.1"] and versions["layers.1"] == 1
    # A block the worker marks as not held (-1) comes even when unchanged; so does one whose version
    # differs in either direction (a worker ahead of a coordinator restarted from a checkpoint).
    _, _, _, blocks, _ = session.download({**versions, "head": -1, "embed": 7})
    assert [b.block for b in blocks] == ["embed", "head"]


def test_a_download_stream_that_ends_early_is_refused():
    """A stream that stops cleanly before the blocks its header announced (or in the middle of one) is
    an error, not a shorter model."""
    import types

    session = Session("127.0.0.1:9", "w")  # never connects: the stream below stands in for the server
    session.info = types.SimpleNamespace(blocks=())
    session._metadata = ()
    header = pb.DownloadMessage(header=pb.DownloadHeader(model_version=3, num_blocks=2))
    session._download = lambda request, metadata: iter([header])
    sync = session.download({})
    with pytest.raises(wire.IntegrityError, match="after 0 of 2 blocks"):
        list(sync.blocks)
    session.channel.close()
