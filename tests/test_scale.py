"""Many workers on one coordinator (the small version of benchmarks/scale.py)."""

import pytest

from fedblock.common.models import make_tiny_model

pytestmark = pytest.mark.slow


def test_many_workers_three_rounds_without_error(federation, data_file, tmp_path):
    n = 24
    model = make_tiny_model(tmp_path / "tiny", "llama", seed=0, num_layers=2, hidden_size=32)
    fed = federation(model=model, rounds=3, local_steps=1, min_workers=n, block_schedule="staggered",
                     heartbeat_interval=5)
    for i in range(n):
        fed.add_worker(fed.worker_config(f"w{i:02d}", data_file, batch_size=1, max_seq_len=32, seed=i))
    summary = fed.run(timeout=300)
    assert summary["rounds_completed"] == 3 and summary["workers"] == n
    assert summary["updates_accepted"] == 3 * n
    assert all(o.finished and o.error is None and o.rounds == 3 for o in fed.outcomes.values())
    assert len(fed.outcomes) == n
