"""What the coordinator does with uploads: one owner for each upload's memory, one open upload per
(worker, round, block), a worker's contribution whole or not at all, and results checked before
they are written. Hand-driven sessions on real gRPC; the races are forced, not hoped for."""

import threading

import grpc
import pytest
import torch
from test_faults import wait_for

from fedblock.client.session import Session
from fedblock.common import wire
from fedblock.common.codecs import CodecPipeline

CHUNK = 4096


def joined(fed, name: str) -> Session:
    session = Session(fed.address, name)
    session.join(num_examples=1, device="cpu", timeout=10)
    return session


def delta_for(fed, block, scale=1e-3, seed=0, fill=None):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in fed.coordinator.specs[block].tensors:
        out[t.name] = torch.full(t.shape, fill) if fill is not None else torch.randn(t.shape, generator=gen) * scale
    return out


def pack(delta, block, round=1, tokens=1, base=0):
    return wire.pack(block, delta, CodecPipeline("none"), round=round, base_version=base, chunk_size=CHUNK,
                     num_tokens=tokens)


def counted(fed, status, reason=""):
    return fed.coordinator.metrics.updates.labels(status, reason)._value.get()


def start(fed):
    runner = threading.Thread(target=fed.run, daemon=True)
    runner.start()
    return runner


def planned(fed, round):
    wait_for(lambda: round in fed.coordinator.rounds.plans, 10, f"round {round} to be planned")
    return fed.coordinator.rounds.plans[round]


def test_two_streams_of_one_upload_release_its_memory_once(federation):
    """A worker sends every chunk; its link breaks while the coordinator still waits to decode; it
    comes back, hears "complete" from UploadStatus and sends the header again. Both streams share the
    upload, one of them checks it, both get its answer, and its buffer goes back to the pool once,
    even when the round closes between the two (the case that gave it back twice and let two later
    uploads write into one buffer)."""
    fed = federation(rounds=2, chunk_size=CHUNK, local_steps=1, train_blocks="layers.1", upload_slots=2)
    c = fed.coordinator
    session = joined(fed, "w")
    runner = start(fed)
    planned(fed, 1)
    delta = delta_for(fed, "layers.1")
    manifest, blob = pack(delta, "layers.1")
    before = {n: t.clone() for n, t in c.global_model.tensors["layers.1"].items()}
    for _ in range(2):  # hold every decode slot: both streams get as far as they can and wait
        c._decode_slots.acquire()
    results = {}

    def stream(label, chunks):
        try:
            results[label] = c.upload("w", session.info.session, manifest, chunks)
        except Exception as e:  # noqa: BLE001 - the test reports what each stream got
            results[label] = e

    first = threading.Thread(target=stream, args=("first", list(wire.iter_chunks(blob, CHUNK))))
    first.start()
    wait_for(lambda: c.upload_status("w", session.info.session, 1, "layers.1", manifest.blob_sha256).complete, 10,
             "the first stream to deliver every chunk")
    reached = threading.Event()

    def header_only():  # the header again, after "complete": no chunks follow
        reached.set()
        yield from ()

    second = threading.Thread(target=stream, args=("second", header_only()))
    second.start()
    assert reached.wait(10), "the second stream was not admitted"
    c._decode_slots.release()  # one stream may decode; the round then closes
    wait_for(lambda: c.global_model.version == 1, 10, "round 1 to close")
    c._decode_slots.release()  # then the other one
    first.join(10)
    second.join(10)
    free = c._pool._free
    assert len({id(b) for b in free}) == len(free), "a buffer is in the pool twice"
    assert results == {"first": "accepted", "second": "accepted"}, results
    for n, t in delta.items():  # one update of weight 1: the global moved by exactly the delta
        assert torch.equal(c.global_model.tensors["layers.1"][n], before[n] + t)
    assert counted(fed, "accepted") == 1 and c._in_memory == 0
    c.stop()
    runner.join(10)
    session.close()


def test_one_open_upload_per_worker_round_and_block(federation):
    """An assigned worker that starts upload after upload of the same block with different bytes
    holds one assembly at a time: no pile of open files or memory (it was one per distinct hash)."""
    fed = federation(rounds=1, chunk_size=CHUNK, local_steps=1, train_blocks="layers.1", upload_slots=0)
    c = fed.coordinator
    session = joined(fed, "w")
    runner = start(fed)
    planned(fed, 1)
    for seed in range(40):
        manifest, blob = pack(delta_for(fed, "layers.1", seed=seed), "layers.1")
        first = next(wire.iter_chunks(blob, CHUNK))
        with pytest.raises(grpc.RpcError) as err:
            _one_chunk(session, manifest, first)
        assert err.value.code() == grpc.StatusCode.ABORTED and "incomplete" in err.value.details()
        assert len(c._uploads) == 1
        assert len(list(c.store.incoming_dir.glob("*.part"))) == 1
    # The last one is the one that counts: it resumes and is accepted.
    assert session.upload(manifest, blob, resume=True) == "accepted"
    runner.join(30)
    assert c.global_model.version == 1 and not c._uploads and not list(c.store.incoming_dir.glob("*.part"))
    session.close()


def _one_chunk(session, manifest, chunk):
    from fedblock.common.pb import coordinator_pb2 as pb

    index, data = chunk

    def messages():
        yield pb.UploadMessage(header=pb.UploadHeader(manifest=manifest.to_pb()))
        yield pb.UploadMessage(chunk=pb.Chunk(index=index, data=bytes(data)))

    return session.stub.Upload(messages(), metadata=session._metadata)


def test_a_fedavg_contribution_enters_whole_or_not_at_all(federation):
    """fedavg: a worker's last block is refused (NaN) after its other blocks arrived. None of its
    blocks may enter the round's means; the round is exactly the other worker's update."""
    fed = federation(algorithm="fedavg", rounds=1, chunk_size=CHUNK, local_steps=1, min_workers=2,
                     train_blocks="layers.*")
    c = fed.coordinator
    good, bad = joined(fed, "good"), joined(fed, "bad")
    runner = start(fed)
    plan = planned(fed, 1)
    blocks = plan.assignments["bad"]
    assert len(blocks) > 1 and plan.assignments["good"] == blocks
    before = {b: {n: t.clone() for n, t in c.global_model.tensors[b].items()} for b in blocks}
    deltas = {b: delta_for(fed, b, seed=i) for i, b in enumerate(blocks)}
    for i, b in enumerate(blocks[:-1]):
        assert bad.upload(*pack(delta_for(fed, b, seed=100 + i), b, tokens=5)) == "accepted"
    assert not plan.sums.blocks  # checked and waiting for the rest: nothing folded in yet
    with pytest.raises(grpc.RpcError) as err:
        bad.upload(*pack(delta_for(fed, blocks[-1], fill=float("nan")), blocks[-1], tokens=5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "non_finite" in err.value.details()
    bad.abandon(1, err.value.details())
    for b in blocks:
        assert good.upload(*pack(deltas[b], b, tokens=3)) == "accepted"
    runner.join(30)
    g = c.global_model
    assert g.version == 1
    for b in blocks:  # the good worker alone: g + its delta, bit for bit
        for n, t in deltas[b].items():
            assert torch.equal(g.tensors[b][n], before[b][n] + t), (b, n)
    assert not c._parked and c._in_memory == 0
    good.close()
    bad.close()


def test_a_round_whose_result_overflows_is_not_written(federation):
    """Finite deltas whose sum with the block overflows float32: the block keeps its value, the
    checkpoint stays finite, and the run goes on."""
    fed = federation(rounds=2, chunk_size=CHUNK, local_steps=1, train_blocks="layers.1")
    c = fed.coordinator
    session = joined(fed, "w")
    runner = start(fed)
    planned(fed, 1)
    huge = delta_for(fed, "layers.1", fill=3e38)
    assert session.upload(*pack(huge, "layers.1")) == "accepted"  # finite, and g + Δ still is
    wait_for(lambda: 2 in c.rounds.plans and c.global_model.version == 1, 10, "round 2")
    after_one = {n: t.clone() for n, t in c.global_model.tensors["layers.1"].items()}
    assert all(torch.isfinite(t).all() for t in after_one.values())
    assert session.upload(*pack(huge, "layers.1", round=2, base=1)) == "accepted"  # 3e38 + 3e38 = inf
    runner.join(30)
    g = c.global_model
    assert g.version == 2 and g.block_versions["layers.1"] == 1  # unchanged in round 2
    for n, t in g.tensors["layers.1"].items():
        assert torch.equal(t, after_one[n])
    stored = c.store.read_block("layers.1", g.block_versions["layers.1"], g.block_sha256["layers.1"])
    assert all(torch.isfinite(t).all() for t in stored.values())
    assert counted(fed, "rejected", "non_finite_result") == 1
    session.close()


def test_max_update_norm_refuses_outliers_and_changes_nothing(federation):
    fed = federation(rounds=1, chunk_size=CHUNK, local_steps=1, train_blocks="layers.1", max_update_norm=1.0)
    c = fed.coordinator
    session = joined(fed, "w")
    runner = start(fed)
    planned(fed, 1)
    before = c.global_model
    with pytest.raises(grpc.RpcError) as err:
        session.upload(*pack(delta_for(fed, "layers.1", scale=1.0), "layers.1"))
    assert "too_large_norm" in err.value.details() and "--max-update-norm" in err.value.details()
    assert c.global_model is before and counted(fed, "rejected", "too_large_norm") == 1
    small = delta_for(fed, "layers.1", scale=1e-4)
    assert session.upload(*pack(small, "layers.1")) == "accepted"
    runner.join(30)
    assert c.global_model.version == 1
    session.close()


def open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


def test_parked_blocks_wait_in_their_files_without_descriptors(federation):
    """fedavg with every upload in a file: a worker's checked blocks wait for its last one in their
    upload files, holding no file descriptor (a 32-layer model has 33 blocks per worker), and go
    once the round is folded in."""
    fed = federation(algorithm="fedavg", rounds=1, chunk_size=CHUNK, local_steps=1, train_blocks="layers.*",
                     upload_slots=0)
    c = fed.coordinator
    session = joined(fed, "w")
    runner = start(fed)
    blocks = planned(fed, 1).assignments["w"]
    deltas = {b: delta_for(fed, b, seed=i) for i, b in enumerate(blocks)}
    before = {b: {n: t.clone() for n, t in c.global_model.tensors[b].items()} for b in blocks}
    assert session.upload(*pack(deltas[blocks[0]], blocks[0])) == "accepted"
    fds = open_fds()
    for b in blocks[1:-1]:
        assert session.upload(*pack(deltas[b], b)) == "accepted"
    assert open_fds() <= fds and len(list(c.store.incoming_dir.glob("*.part"))) == len(blocks) - 1
    assert session.upload(*pack(deltas[blocks[-1]], blocks[-1])) == "accepted"
    runner.join(30)
    assert c.global_model.version == 1 and not list(c.store.incoming_dir.glob("*.part"))
    for b in blocks:
        for n, t in deltas[b].items():
            assert torch.equal(c.global_model.tensors[b][n], before[b][n] + t), (b, n)
    session.close()


def test_a_fold_that_fails_midway_stops_the_coordinator(federation):
    """Folding a worker's parked blocks fails before anything entered the round's means: the blocks
    wait again, and the worker's resend of its last block (Session.upload retries "failed") completes
    the update. When it then fails after one block entered, the round can no longer be made whole, so
    the coordinator stops (it resumes from its checkpoint) and writes nothing more."""
    fed = federation(algorithm="fedavg", rounds=1, chunk_size=CHUNK, local_steps=1, train_blocks="layers.*")
    c = fed.coordinator
    session = joined(fed, "w")
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("error", _raises(c.run)), daemon=True)
    runner.start()
    plan = planned(fed, 1)
    blocks = plan.assignments["w"]
    decode, add, calls = c.codec.decode, plan.sums.add, []

    def failing_decode(*args, **kw):  # decoding a parked block again fails, once: nothing entered yet
        calls.append("decode")
        if calls.count("decode") == 2:
            raise MemoryError("simulated")
        return decode(*args, **kw)

    def failing_add(*args, **kw):  # the second block of the next try fails while it is added
        calls.append(args[0])
        if len(calls) > 3 and calls.count(blocks[1]):
            raise MemoryError("simulated")
        return add(*args, **kw)

    for b in blocks[:-1]:
        assert session.upload(*pack(delta_for(fed, b), b)) == "accepted"
    c.codec.decode, plan.sums.add = failing_decode, failing_add
    with pytest.raises(grpc.RpcError) as err:
        session.upload(*pack(delta_for(fed, blocks[-1]), blocks[-1]), max_attempts=2)
    assert err.value.code() == grpc.StatusCode.ABORTED and "failed" in err.value.details()
    # The retry found the others waiting (none was sent again): decode the last, then fold.
    assert calls == ["decode", "decode", "decode", "decode", blocks[0], "decode", blocks[1]], calls
    runner.join(30)
    assert isinstance(result.get("error"), RuntimeError) and "resume" in str(result["error"])
    assert "after 1 of 4 blocks" in str(result["error"].__cause__)
    assert c.global_model.version == 0 and not (c.store.ckpt_dir / "round-000001.json").exists()
    assert not c._parked and c._in_memory == 0 and not list(c.store.incoming_dir.glob("*.part"))
    session.close()


def _raises(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return e
    return None
