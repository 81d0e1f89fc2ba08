"""The coordinator's zeroth-order log, alone: what a worker at any version is told, round after round."""

import types

import torch

from fedblock.common.algorithms import DeComFL
from fedblock.common.messages import BlockSpec, TensorSpec

SPECS = [BlockSpec("embed", (TensorSpec("e", "float32", (8,)),)), BlockSpec("layers.0", (TensorSpec("w", "float32", (8,)),))]


def closed(algo, model, round, workers=("a",)):
    plan = types.SimpleNamespace(round=round, lr=1e-3, seeds={w: (round,) for w in workers},
                                 records={w: (0.1, -0.2) for w in workers})
    return algo.close(plan, model)


def test_every_worker_can_catch_up_from_where_it_is_while_the_log_stays_bounded():
    """A replay limit of 4 rounds: the replica's blocks are written every other round. At every round a
    worker that downloaded any block files of the last 8 rounds replays from them, a worker within the
    limit replays from its own copy, and the log never holds more than 10 rounds."""
    algo = DeComFL({"zo_perturbations": "2", "zo_replay_limit": str(4 * 2 * 16)}, SPECS, ["embed", "layers.0"])
    model = {"embed": {"e": torch.zeros(8)}, "layers.0": {"w": torch.zeros(8)}}
    written = [0]
    for r in range(1, 60):
        if closed(algo, model, r):
            written.append(r)
        for files in [f for f in written if f >= r - 8]:
            reply = algo.catch_up(files, r, after_download=True)
            assert not reply.download and [e.round for e in reply.entries] == list(range(files + 1, r + 1)), (r, files)
        for held in range(max(0, r - 4), r + 1):
            reply = algo.catch_up(held, r)
            assert not reply.download and [e.round for e in reply.entries] == list(range(held + 1, r + 1)), (r, held)
        assert algo.catch_up(r - 6, r).download or r < 6  # beyond the limit: download instead
        assert len(algo.log) <= 10, (r, [e.round for e in algo.log])


def test_the_log_goes_no_further_back_than_the_workers_and_the_files_need():
    algo = DeComFL({"zo_perturbations": "2", "zo_replay_limit": str(1000 * 2 * 16)}, SPECS, ["embed", "layers.0"])
    model = {"embed": {"e": torch.zeros(8)}, "layers.0": {"w": torch.zeros(8)}}
    for r in range(1, 30):
        closed(algo, model, r)
    assert algo.files_version == 0 and len(algo.log) == 29  # the files are the initial ones: all is needed
