"""A download streams one model version while rounds close and prune: its block files stay until it ends.

Real gRPC on loopback. The handler is held just before it opens a block file (a gate around
Coordinator.download_manifest), so rounds close at a known point of the stream.
"""

import threading

import grpc
import pytest
import torch
from test_faults import wait_for

from fedblock.client.session import Session
from fedblock.common.pb import coordinator_pb2 as pb
from fedblock.server.store import Checkpoint


class Gate:
    """Holds the download handler before it opens its `at`-th block (counting from 1)."""

    def __init__(self, coordinator, at: int):
        self.entered, self.open, self.calls = threading.Event(), threading.Event(), 0
        original = coordinator.download_manifest

        def gated(g, block, version):
            self.calls += 1
            if self.calls == at:
                self.entered.set()
                assert self.open.wait(30)
            return original(g, block, version)

        coordinator.download_manifest = gated


def close_rounds(store, g, rounds):
    """Checkpoint `rounds` that change every block (as closing rounds would): this prunes."""
    versions, shas = dict(g.block_versions), dict(g.block_sha256)
    for r in rounds:
        for b, tensors in g.tensors.items():
            shas[b] = store.write_block(b, r, {n: t + r for n, t in tensors.items()})
            versions[b] = r
        store.write_checkpoint(Checkpoint(r, dict(versions), dict(shas)))


def joined(fed) -> Session:
    session = Session(fed.address, "w1")
    session.join(num_examples=1, device="cpu", timeout=30)
    return session


def wait_unpinned(store) -> None:
    wait_for(lambda: not store.pinned(), 10, "the download's pins to be released")


def test_rounds_that_prune_during_a_download_do_not_break_it(federation):
    fed = federation(keep_checkpoints=1, chunk_size=1024)
    c = fed.coordinator
    g = c.global_model
    gate = Gate(c, at=2)
    # The values of version 0, read before the rounds below prune its block files (the coordinator maps
    # them from there; this test writes checkpoints behind its back, so nothing else moves it on).
    initial = {b: {n: t.clone() for n, t in tensors.items()} for b, tensors in g.tensors.items()}
    session = joined(fed)
    try:
        version, versions, _, blocks, _ = session.download({})
        first = next(blocks)  # one block fully received; the handler waits before opening the second
        assert gate.entered.wait(30)
        close_rounds(c.store, g, [1, 2, 3])
        gate.open.set()
        got = {first.block: first} | {b.block: b for b in blocks}  # every block arrives, hash-checked
    finally:
        session.close()
    assert version == 0 and versions == dict(g.block_versions) and list(got) == c.block_order
    for block, downloaded in got.items():
        assert downloaded.version == 0
        assert all(torch.equal(downloaded.tensors[n], t) for n, t in initial[block].items())
    # The download is over: its pins go, and with them the files no kept checkpoint names.
    wait_unpinned(c.store)
    assert sorted(p.name for p in c.store.blocks_dir.iterdir()) == sorted(f"{b}@3.safetensors" for b in c.block_order)


def test_a_cancelled_download_releases_its_files(federation):
    fed = federation(keep_checkpoints=1, chunk_size=1024)
    c = fed.coordinator
    g = c.global_model
    gate = Gate(c, at=1)
    session = joined(fed)
    try:
        call = session._download(pb.DownloadRequest(), metadata=session._metadata)
        assert next(call).WhichOneof("kind") == "header"
        assert gate.entered.wait(30)
        close_rounds(c.store, g, [1])
        assert c.store.pinned() and c.store.block_path(c.block_order[0], 0).exists()
        call.cancel()
        # Released although the handler has not moved since (it waits at the gate).
        wait_unpinned(c.store)
        assert not c.store.block_path(c.block_order[0], 0).exists()
        gate.open.set()
    finally:
        session.close()


def test_a_block_file_that_is_gone_is_a_retryable_error_that_says_which(federation):
    fed = federation(chunk_size=1024)
    c = fed.coordinator
    gone = c.block_order[2]
    c.store.block_path(gone, 0).unlink()
    session = joined(fed)
    try:
        with pytest.raises(grpc.RpcError) as error:
            _, _, _, blocks, _ = session.download({})
            list(blocks)
    finally:
        session.close()
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"{gone}@0.safetensors" in error.value.details() and "download again" in error.value.details()


def test_a_block_file_removed_during_the_download_is_a_retryable_error(federation):
    fed = federation(chunk_size=1024)
    c = fed.coordinator
    gate = Gate(c, at=2)
    session = joined(fed)
    try:
        _, _, _, blocks, _ = session.download({})
        next(blocks)
        assert gate.entered.wait(30)
        c.store.block_path(c.block_order[1], 0).unlink()  # not pruning: someone else
        gate.open.set()
        with pytest.raises(grpc.RpcError) as error:
            list(blocks)
    finally:
        session.close()
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"{c.block_order[1]}@0.safetensors" in error.value.details()
    wait_unpinned(c.store)
