"""The compute thread and the communication threads never wait on each other in a cycle."""

import queue
import threading

import pytest

from fedblock.client.compute import ComputeLoop
from fedblock.client.metrics import WorkerMetrics
from fedblock.client.state import ModelBook
from fedblock.client.timeline import Timeline
from fedblock.common.messages import Assignment, Update


class Instant:
    """An algorithm whose tasks take no time: the compute thread goes straight to the hand-over."""

    needs_base = False

    def run(self, a, local):
        return Update(a.round, a.base_version, {}, 1, 0.0, (0.0,))

    def apply(self, patch, local):
        pass


def test_a_compute_thread_waiting_to_hand_over_still_takes_what_arrives():
    """The outbox holds an update the transfer thread has not taken, because that thread (or the events
    thread) is putting into a full inbox first: assignments sent again at each re-join fill it. The
    compute thread, waiting for room in the outbox, must keep taking from the inbox, or the three wait
    on each other for ever."""
    inbox: queue.Queue = queue.Queue(4)
    outbox: queue.Queue = queue.Queue(1)
    outbox.put("an update the transfer thread has not taken yet")
    stop = threading.Event()
    loop = ComputeLoop(None, [], None, None, ModelBook(version=0), inbox, outbox, 0, WorkerMetrics(), stop,
                       Timeline("w"), algorithm=Instant())
    inbox.put(Assignment(1, ("embed",), 1, 1e-3, 0))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        again = Assignment(1, ("embed",), 1, 1e-3, 0)  # what a re-join sends again
        for _ in range(8):  # twice the inbox: only a compute thread that keeps taking makes room
            inbox.put(again, timeout=10)
        assert outbox.get(timeout=5) == "an update the transfer thread has not taken yet"
        assert outbox.get(timeout=10).round == 1
    finally:
        stop.set()
        thread.join(10)
    assert loop.error is None, loop.error


def test_a_confirmed_block_that_a_later_patch_changed_is_downloaded_before_training(tiny_model, tmp_path):
    """The race that a claim by hash must survive: a patch queued before the claim was read (a resync
    carrying the block's older value) is applied after it, so the confirmation that follows does not
    describe the local copy any more. The compute thread checks the hash, asks for the block, and does
    not train on a copy it knows is wrong."""
    import torch

    from fedblock.common import blocks as B
    from fedblock.common.algorithms import Local
    from fedblock.common.algorithms.blockwise import BlockDescent
    from fedblock.common.messages import BlockSpec, Patch
    from fedblock.common.models import load_model

    model = load_model(tiny_model)
    blocks = B.partition(model)
    params = dict(model.named_parameters())
    specs = tuple(BlockSpec.of(b.name, params, b.params) for b in blocks)
    names = [b.name for b in blocks]

    class Instant(BlockDescent):  # the real apply (and its check); a task that takes no time
        def run(self, a, local):
            return Update(a.round, local.version(), {}, 1, 0.0)

    stop = threading.Event()
    local = Local(model, {b.name: b for b in blocks}, specs, None, None, tmp_path, stop)
    book = ModelBook(version=1, block_versions=dict.fromkeys(names, 1))
    inbox: queue.Queue = queue.Queue(8)
    outbox: queue.Queue = queue.Queue(1)
    stale = threading.Event()
    loop = ComputeLoop(model, blocks, None, None, book, inbox, outbox, 0, WorkerMetrics(), stop, Timeline("w"),
                       algorithm=Instant({}, specs, names), local=local, on_stale=stale.set)
    live = B.block_params(model, local.blocks["layers.0"])
    claim = B.canonical_sha256(live, [t.name for t in specs[names.index("layers.0")].tensors])
    older = {n: p.detach() - 1.0 for n, p in live.items()}
    inbox.put(Patch(1, {"layers.0": 1}, {"layers.0": older}))  # queued before the claim was read
    inbox.put(Patch(2, dict.fromkeys(names, 2), {}, confirmed={"layers.0": claim}))
    inbox.put(Assignment(3, ("layers.1",), 1, 1e-3, 2))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        assert stale.wait(10)  # it asked for the block again
        assert book.block_versions["layers.0"] == -1
        assert outbox.empty()  # and waits for it before training round 3
        fixed = {n: p.detach().clone() + 0.5 for n, p in live.items()}
        inbox.put(Patch(2, {"layers.0": 2}, {"layers.0": fixed}))
        assert outbox.get(timeout=10).round == 3
        assert all(torch.equal(live[n], fixed[n]) for n in live)
    finally:
        stop.set()
        thread.join(10)
    assert loop.error is None, loop.error


def test_the_earliest_round_given_is_trained_first():
    """A relay's next turn (round 4, on version 3) arrived before round 3, planned again for the same
    worker after the one it was given left: round 4 waits for the model only round 3 makes, so the
    compute thread must take round 3 first, also when it arrives while round 4 waits."""
    inbox: queue.Queue = queue.Queue(8)
    outbox: queue.Queue = queue.Queue(4)
    stop = threading.Event()
    loop = ComputeLoop(None, [], None, None, ModelBook(version=2), inbox, outbox, 0, WorkerMetrics(), stop,
                       Timeline("w"), algorithm=Instant())
    inbox.put(Assignment(4, ("embed",), 1, 1e-3, 3))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        inbox.put(Assignment(3, ("embed",), 1, 1e-3, 2))
        assert outbox.get(timeout=10).round == 3
        assert outbox.empty()  # round 4 still waits for version 3
    finally:
        stop.set()
        thread.join(10)
    assert loop.error is None, loop.error


def test_a_task_whose_view_is_its_own_waits_for_that_view():
    """FedCyBGD's layer dropping: the model at the task's base version is not enough, the task starts
    on the view drawn for it (a patch of that view), which the compute thread asks for."""
    from fedblock.common.messages import Patch

    class OwnView(Instant):
        needs_base = True

    inbox: queue.Queue = queue.Queue(8)
    outbox: queue.Queue = queue.Queue(4)
    stop, asked = threading.Event(), queue.Queue()
    loop = ComputeLoop(None, [], None, None, ModelBook(version=3), inbox, outbox, 0, WorkerMetrics(), stop,
                       Timeline("w"), algorithm=OwnView(), want_view=asked.put)
    inbox.put(Assignment(4, ("embed",), 1, 1e-3, 3))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        assert asked.get(timeout=10) == 4
        inbox.put(Patch(3, {}, {}))  # the global model at the base version: not the task's view
        inbox.put(Patch(3, {}, {}, view_round=5))  # another task's
        with pytest.raises(queue.Empty):
            outbox.get(timeout=0.5)
        inbox.put(Patch(3, {}, {}, view_round=4))
        assert outbox.get(timeout=10).round == 4
    finally:
        stop.set()
        thread.join(10)
    assert loop.error is None, loop.error
