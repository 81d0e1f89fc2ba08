"""The coordinator evaluates on its own thread: the rounds never wait for an evaluation."""

import threading

from fedblock.server.evaluation import BackgroundEvaluation


def test_rounds_go_on_while_an_evaluation_runs(federation, data_file, monkeypatch):
    """Force the interleaving: the first evaluation (round 0) holds until every round has closed."""
    fed = federation(algorithm="fedbcd", rounds=3, local_steps=1, eval_data=str(data_file), eval_every=1,
                     eval_max_examples=4)
    evaluate, release, seen = fed.coordinator._evaluate, threading.Event(), []
    final_asked = threading.Event()
    submit = BackgroundEvaluation.submit

    def submitted(self, round, tensors):
        submit(self, round, tensors)
        if round == 3:
            final_asked.set()

    def held(tensors):
        seen.append(fed.coordinator.global_model.version)
        if len(seen) == 1:
            assert release.wait(60)
        return evaluate(tensors)

    monkeypatch.setattr(BackgroundEvaluation, "submit", submitted)
    fed.coordinator._evaluate = held
    fed.add_worker(fed.worker_config("solo", data_file))
    runner = threading.Thread(target=lambda: seen.append(("summary", fed.run(timeout=90))), daemon=True)
    runner.start()
    # All three rounds close and the final evaluation is asked for while round 0's evaluation holds:
    # rounds 1 and 2 waited behind it, and the final one took the place of the oldest (at most two wait).
    assert final_asked.wait(60)
    evaluations = fed.coordinator._evaluations
    assert fed.coordinator.global_model.version == 3 and fed.coordinator.state == "finished"
    assert [r for r, _ in evaluations._waiting] == [2, 3] and seen == [0]
    release.set()
    runner.join(90)
    summary = seen[-1][1]
    assert [e[0] for e in summary["eval_history"]] == [0, 2, 3]
    assert summary["eval_loss_initial"] is not None and summary["eval_loss_final"] is not None


def test_a_failing_evaluation_ends_the_evaluations_not_the_run():
    results, calls = [], []

    def evaluate(tensors):
        calls.append(tensors)
        if len(calls) == 2:
            raise MemoryError("out of memory")
        return 1.0 / len(calls)

    ev = BackgroundEvaluation(evaluate, lambda *r: results.append(r))
    stop = threading.Event()
    ev.submit(0, {})
    assert ev.wait_idle(stop)
    ev.submit(1, {})
    assert not ev.wait_idle(stop)  # it failed: nothing more to wait for
    ev.submit(2, {})  # ignored
    ev.close()
    assert isinstance(ev.error, MemoryError) and len(calls) == 2
    assert [r[:2] for r in results] == [(0, 1.0)]


def test_close_drops_what_waits_and_a_stop_ends_the_wait():
    started, release = threading.Event(), threading.Event()

    def evaluate(tensors):
        started.set()
        release.wait(10)
        return 0.0

    results = []
    ev = BackgroundEvaluation(evaluate, lambda *r: results.append(r[0]))
    ev.submit(0, {})
    assert started.wait(10)
    ev.submit(1, {})
    stop = threading.Event()
    stop.set()
    assert not ev.wait_idle(stop)
    ev.close(timeout=0)
    release.set()
    ev._thread.join(10)
    # The waiting one was dropped; the one under way finished after the close, when the run's results
    # are written already: it is not recorded either.
    assert results == [] and not ev._thread.is_alive()
