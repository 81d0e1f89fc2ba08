"""FedCyBGD and the bytes a download needs: real gRPC on loopback, real worker code, tiny model."""

import math

import pytest
import torch

from fedblock.common import blocks as B
from fedblock.common.algorithms.cyclic import FedCyBGD
from fedblock.common.messages import BlockSpec, TensorSpec
from fedblock.common.models import load_model

LAYERS = [f"layers.{i}" for i in range(4)]


def fedcybgd(mode="relay", fraction=1.0):
    specs = [BlockSpec(b, (TensorSpec(f"{b}.w", "float32", (2,)),)) for b in ["embed", *LAYERS, "head"]]
    return FedCyBGD({"fedcybgd_mode": mode, "download_fraction": str(fraction)}, specs, LAYERS)


def test_relay_takes_one_worker_per_round_in_turn_and_cycles_the_blocks():
    algo = fedcybgd("relay")
    workers = {"a": 0, "b": 1, "c": 2}
    turns = [algo.tasks(t, workers, 0, "striped") for t in range(1, 9)]
    assert [list(t) for t in turns] == [["a"], ["b"], ["c"], ["a"], ["b"], ["c"], ["a"], ["b"]]
    assert [next(iter(t.values())).blocks[0] for t in turns] == LAYERS + LAYERS  # ascending, every block
    down = [next(iter(algo.tasks(t, workers, 0, "descending").values())).blocks[0] for t in range(1, 5)]
    assert down == LAYERS[::-1]


def test_parallel_gives_every_participant_a_distinct_block():
    algo = fedcybgd("parallel")
    workers = {"a": 0, "b": 1}
    seen = []
    for t in range(1, 5):
        tasks = algo.tasks(t, workers, 0, "striped")
        assert set(tasks) == {"a", "b"} and len({task.blocks for task in tasks.values()}) == 2
        seen += [task.blocks[0] for task in tasks.values()]
    assert sorted(seen) == sorted(LAYERS * 2)  # cycling: each block twice in four rounds


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_a_view_keeps_a_seeded_fraction_of_the_changed_blocks_and_always_the_own_block(fraction):
    algo = fedcybgd("relay", fraction)
    versions = {"embed": 0, "layers.0": 3, "layers.1": 5, "layers.2": 0, "layers.3": 7, "head": 0}
    changed = ["layers.0", "layers.1", "layers.3"]
    for round in range(1, 30):
        (worker, task), = algo.tasks(round, {"a": 0, "b": 1}, 0, "striped").items()
        view = algo.view(versions, task)
        assert view == algo.view(versions, task)  # a function of the task (its seed) and the versions
        kept = [b for b in changed if view[b] == versions[b]]
        own = task.blocks[0]
        assert view[own] == versions[own]
        assert len(set(kept) | {own} & set(changed)) == max(math.ceil(fraction * 3), 1 if own in changed else 0)
        assert all(view[b] in (0, versions[b]) for b in versions)
        assert view["embed"] == view["head"] == view["layers.2"] == 0  # never changed: the base anyway
    assert algo.view(versions, None) == versions  # no task: the global model


def run(federation, data_file, workers=2, rounds=6, work_dir=None, **options):
    fed = federation(rounds=rounds, local_steps=2, lr=3e-3, min_workers=workers, **options)
    for i in range(workers):
        fed.add_worker(fed.worker_config(f"w{i}", data_file, seed=i + 1, work_dir=work_dir and work_dir / f"w{i}"))
    summary = fed.run(timeout=120)
    assert summary["rounds_completed"] == rounds
    return fed, summary


def block_bytes(fed, name):
    return fed.coordinator.specs[name].numel * 4


def test_relay_overwrites_the_global_block_with_the_trained_one(federation, tiny_model, data_file):
    """One trainer per round and a lossless codec: the global model is the relay of the trained blocks,
    which only the turn's worker trains, from the model its predecessor left."""
    fed, summary = run(federation, data_file, algorithm="fedcybgd", rounds=4)
    history = summary["round_history"]
    assert [r["workers"] for r in history] == [1, 1, 1, 1]
    assert [r["blocks"] for r in history] == [[b] for b in LAYERS]
    initial = {n: p.detach() for n, p in load_model(tiny_model).named_parameters()}
    final = fed.coordinator.global_model.tensors
    for block in ("embed", "head"):  # in no block of fedcybgd: never trained
        assert all(torch.equal(t, initial[n]) for n, t in final[block].items())
    assert all(any(not torch.equal(t, initial[n]) for n, t in final[b].items()) for b in LAYERS)
    # Each worker downloaded only what changed since its last turn; its own block never came back.
    rounds_up = sum(block_bytes(fed, b) for b in LAYERS)
    assert summary["bytes_up"] >= rounds_up
    start = sum(block_bytes(fed, s.name) for s in fed.coordinator.specs.values()) * 2
    # Turns 2..4 download the blocks of the turns since that worker's last: 1 + 1 + 2 blocks at most.
    after_start = summary["bytes_down"] - start
    assert after_start < 1.2 * (block_bytes(fed, "layers.0") * 3), after_start


def test_a_worker_does_not_download_the_block_it_trained(federation, data_file):
    """fedbcd with one worker: after the start, nothing comes down but control messages."""
    fed, summary = run(federation, data_file, workers=1, algorithm="fedbcd", rounds=4, train_blocks="layers.*")
    start = sum(block_bytes(fed, s.name) for s in fed.coordinator.specs.values())
    assert summary["bytes_down"] < start * 1.02 + 4096, (summary["bytes_down"], start)


def test_download_fraction_sends_less_and_reverts_the_rest_to_the_base(federation, tiny_model, data_file, tmp_path):
    """Three workers on four blocks: with F = 1 a worker fetches the two blocks the others trained each
    round; with F = 0.25 only its own block, when it does not hold it."""
    full = run(federation, data_file, workers=3, algorithm="fedcybgd", fedcybgd_mode="parallel", rounds=6)[1]
    fed, part = run(federation, data_file, workers=3, algorithm="fedcybgd", fedcybgd_mode="parallel", rounds=6,
                    download_fraction=0.25, work_dir=tmp_path)
    start = full["round_history"][0]["bytes_down"]
    assert part["round_history"][0]["bytes_down"] == start  # the base model, at start
    layer = block_bytes(fed, "layers.0")
    assert full["bytes_down"] - start > 2.9 * 5 * layer * 2 * 0.95  # 3 workers x 2 blocks x 5 rounds
    assert part["bytes_down"] - start < 3 * 5 * layer * 1.05, (part["bytes_down"] - start, layer)
    # The global model still holds every trained block (the dropping is of the download, not the model).
    initial = {n: p.detach() for n, p in load_model(tiny_model).named_parameters()}
    final = fed.coordinator.global_model.tensors
    assert all(any(not torch.equal(t, initial[n]) for n, t in final[b].items()) for b in LAYERS)
    for w in fed.workers:  # the base values a worker keeps are the base model's
        kept = w.algorithm._base_dir
        assert sorted(p.stem for p in kept.glob("*.safetensors")) == sorted(LAYERS)
        import safetensors.torch
        for b in LAYERS:
            for n, t in safetensors.torch.load_file(kept / f"{b}.safetensors").items():
                assert torch.equal(t, initial[n])


def test_download_codec_encodes_once_and_workers_decode_it(federation, data_file):
    fed, plain = run(federation, data_file, algorithm="fedbcd", rounds=3)
    fed2, packed = run(federation, data_file, algorithm="fedbcd", rounds=3, download_codec="bf16")
    assert packed["bytes_down"] < 0.6 * plain["bytes_down"]
    blobs = list((fed2.coordinator.store.blocks_dir).glob("*.blob"))
    assert blobs  # the cache the coordinator served from



@pytest.mark.parametrize("options, message", [
    ({"download_codec": "topk:0.01"}, "zero the rest of the weights"),
    ({"download_codec": "bf16", "algorithm": "decomfl"}, "exact copy"),
    ({"download_fraction": 0.0, "algorithm": "fedcybgd"}, "download-fraction"),
    ({"download_fraction": 1.5, "algorithm": "fedcybgd"}, "download-fraction"),
    ({"fedcybgd_mode": "ring", "algorithm": "fedcybgd"}, "fedcybgd-mode"),
    ({"min_updates": 2, "algorithm": "fedcybgd"}, "one trainer"),
    ({"min_updates": 2, "algorithm": "fedblock.common.algorithms.cyclic:FedCyBGD"}, "one trainer"),
    ({"pipeline_depth": 1, "download_fraction": 0.5, "algorithm": "fedcybgd"}, "own view"),
])
def test_bad_download_settings_are_refused_with_a_reason(tmp_path, options, message):
    from fedblock.common.config import ConfigError, CoordinatorConfig

    with pytest.raises(ConfigError, match=message):
        CoordinatorConfig(model="m", state_dir=tmp_path, insecure=True, **options).check()


def test_a_dropped_block_reverts_to_the_base_values_the_worker_keeps(tiny_model, tmp_path):
    """The worker half: the first sync keeps the base values; a later view that has a block at version 0
    (dropped) brings it back to them from disk, with nothing on the wire for it."""
    import threading

    from fedblock.client.session import Sync
    from fedblock.common.algorithms import Local
    from fedblock.common.messages import Patch

    model = load_model(tiny_model)
    blocks = B.partition(model)
    params = dict(model.named_parameters())
    specs = tuple(BlockSpec.of(b.name, params, b.params) for b in blocks)
    names = [b.name for b in blocks]
    algo = FedCyBGD({"download_fraction": "0.5"}, specs, LAYERS)
    local = Local(model, {b.name: b for b in blocks}, specs, None, None, tmp_path, threading.Event())
    base = {n: p.detach().clone() for n, p in params.items()}
    algo.apply(Patch(0, dict.fromkeys(names, 0), {}), local)  # a local base model: nothing came
    trained = {n: base[n] + 1.0 for n in B.block_params(model, local.blocks["layers.2"])}
    algo.apply(Patch(4, {**dict.fromkeys(names, 0), "layers.2": 4}, {"layers.2": trained}), local)
    assert torch.equal(params["model.layers.2.mlp.up_proj.weight"], trained["model.layers.2.mlp.up_proj.weight"])

    class Session:
        def download(self, held, holds=None, task_round=0, base_held=()):
            assert task_round == 5 and set(base_held) == set(LAYERS)
            self.held = held
            return Sync(6, {**dict.fromkeys(names, 0), "layers.1": 6}, {}, iter(()))

    patch = algo.fetch(Session(), 4, {**dict.fromkeys(names, 0), "layers.2": 4}, 6, task_round=5)
    assert set(patch.blocks) == {"layers.2"}  # layers.1 at 6 would have come on the wire; none here
    algo.apply(patch, local)
    assert all(torch.equal(params[n], base[n]) for n in trained)  # layers.2 is the base model's again
