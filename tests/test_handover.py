"""The compute thread and the communication threads never wait on each other in a cycle."""

import queue
import threading

from fedblock.client.compute import ComputeLoop
from fedblock.client.metrics import WorkerMetrics
from fedblock.client.state import ModelBook
from fedblock.client.timeline import Timeline
from fedblock.common.messages import Assignment, Update


class Instant:
    """An algorithm whose tasks take no time: the compute thread goes straight to the hand-over."""

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
