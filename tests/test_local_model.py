"""`fedblock worker --model DIR`: a site's own copy of the base model. Blocks whose canonical hash is
the coordinator's initial one are not downloaded; a block that differs is, and the run is the same as
without --model; a worker that joins late downloads only what changed (block methods) or replays the
log from the initial model (zeroth-order); a copy of another architecture is set aside with a warning."""

import logging
import shutil
from collections import defaultdict

import pytest
import safetensors.torch
import torch
from test_faults import global_params, wait_for
from test_zo_federation import caught_up, max_diff, replica

from fedblock.client.session import Session
from fedblock.common.models import make_tiny_model

CHANGED_BLOCK, CHANGED_TENSOR = "layers.2", "model.layers.2.mlp.down_proj.weight"


class Downloads(defaultdict):
    headers: dict


@pytest.fixture
def downloads(monkeypatch):
    """Every Session.download, per worker name: the names of the blocks it streamed, in order."""
    seen, headers = Downloads(list), defaultdict(list)
    original = Session.download

    def download(self, held, **kw):
        sync = original(self, held, **kw)
        versions, blocks = sync.block_versions, sync.blocks
        got = []
        seen[self.name].append(got)
        headers[self.name].append(dict(versions))

        def recorded():
            for block in blocks:
                got.append(block.block)
                yield block

        return sync._replace(blocks=recorded())

    monkeypatch.setattr(Session, "download", download)
    seen.headers = headers  # per worker, per download: the block versions its header announced
    return seen


def received(worker, kind: str) -> float:
    return worker.metrics.registry.get_sample_value("fedblock_worker_bytes_received_total", {"kind": kind}) or 0.0


def model_bytes(worker) -> float:
    return received(worker, "model")


def model_files_size(coordinator) -> int:
    return sum(f.size for f in coordinator.model_files)


def started(fed, *workers, timeout: float = 60) -> None:
    """Wait until each worker has joined, prepared its model and started its threads (no round has
    begun if the coordinator's round loop is not running yet)."""
    for w in workers:
        thread = fed.threads[fed.workers.index(w)]
        wait_for(lambda w=w, t=thread: w.training or not t.is_alive(), timeout, f"{w.config.name} to start")
        assert w.training, f"{w.config.name} failed while starting: {fed.outcomes.get(w.config.name)}"


def block_files_size(coordinator) -> int:
    return sum(coordinator.store.block_path(b, 0).stat().st_size for b in coordinator.block_order)


def altered_copy(src, dest):
    """A copy of the model folder with one tensor of one decoder layer changed."""
    shutil.copytree(src, dest)
    path = dest / "model.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors[CHANGED_TENSOR] = tensors[CHANGED_TENSOR] + 0.01
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    return dest


def finished(fed, *names):
    for name in names:
        outcome = fed.outcomes.get(name)
        assert outcome is not None and outcome.finished and outcome.error is None, (name, outcome)


def test_a_matching_local_model_downloads_no_block_at_start(federation, data_file, tiny_model, downloads):
    fed = federation(algorithm="fedbcd", rounds=1, min_workers=2, local_steps=2)
    local = fed.add_worker(fed.worker_config("local", data_file, model=str(tiny_model)))
    started(fed, local)  # one at a time (see the bfloat16 test below)
    remote = fed.add_worker(fed.worker_config("remote", data_file))
    started(fed, remote)
    assert model_bytes(local) == 0
    assert downloads["local"] == [[]]  # one delta sync, which streamed nothing
    assert sorted(downloads["remote"][0]) == sorted(fed.coordinator.block_order)
    assert model_bytes(remote) >= block_files_size(fed.coordinator)
    # Its config and tokenizer files were all the coordinator's: copied, not fetched.
    assert received(remote, "control") - received(local, "control") >= model_files_size(fed.coordinator)
    for name, p in local.local.model.named_parameters():  # the local copy is the coordinator's model
        assert torch.equal(p.detach(), remote.local.model.get_parameter(name).detach()), name
    summary = fed.run(timeout=120)
    assert summary["rounds_completed"] == 1 and summary["updates_rejected"] == 0
    finished(fed, "local", "remote")


def test_a_local_model_that_differs_in_one_block_downloads_that_block(federation, data_file, tiny_model,
                                                                       tmp_path, downloads):
    options = dict(algorithm="fedbcd", rounds=2, local_steps=2, lr=1e-3)
    plain = federation(**options)
    plain.add_worker(plain.worker_config("w", data_file))
    assert plain.run(timeout=120)["rounds_completed"] == 2
    reference = global_params(plain.coordinator)

    altered = altered_copy(tiny_model, tmp_path / "altered")
    fed = federation(**options)
    worker = fed.add_worker(fed.worker_config("w", data_file, model=str(altered)))
    started(fed, worker)
    first = downloads["w"][len(downloads["w"]) - 1]  # this worker's initial sync (the plain one's came before)
    assert first == [CHANGED_BLOCK]
    assert 0 < model_bytes(worker) < block_files_size(fed.coordinator) / 2
    assert torch.equal(worker.local.model.get_parameter(CHANGED_TENSOR).detach(),
                       fed.coordinator.global_model.tensors[CHANGED_BLOCK][CHANGED_TENSOR])
    summary = fed.run(timeout=120)
    assert summary["rounds_completed"] == 2 and summary["updates_rejected"] == 0
    finished(fed, "w")
    final = global_params(fed.coordinator)
    assert max_diff(final, reference) == 0  # the same run as without --model


def test_decomfl_with_a_matching_local_model_downloads_nothing_at_start(federation, data_file, tiny_model,
                                                                        tmp_path, downloads):
    fed = federation(algorithm="decomfl", rounds=3, lr=1e-3, zo_perturbations="2", local_steps=1)
    worker = fed.add_worker(fed.worker_config("zo", data_file, model=str(tiny_model), work_dir=tmp_path / "zo"))
    started(fed, worker)
    assert model_bytes(worker) == 0
    assert downloads["zo"] == []  # not even a delta sync: it replays the log from version 0
    summary = fed.run(timeout=120)
    assert summary["rounds_completed"] == 3 and summary["updates_rejected"] == 0
    finished(fed, "zo")
    assert all(blocks == [] for blocks in downloads["zo"])  # it caught up by the log alone
    assert max_diff(caught_up(fed, worker), replica(fed.coordinator)) <= 1e-6


def test_a_local_model_of_another_architecture_falls_back_to_the_coordinators(federation, data_file, tmp_path,
                                                                               downloads, caplog):
    other = make_tiny_model(tmp_path / "other", "llama", seed=1, num_layers=4, hidden_size=32)
    fed = federation(algorithm="fedbcd", rounds=1, local_steps=2)
    with caplog.at_level(logging.WARNING, logger="fedblock.worker"):
        worker = fed.add_worker(fed.worker_config("w", data_file, model=str(other)))
        started(fed, worker)
    assert any("config.json is not the coordinator's" in r.getMessage() and str(other) in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert sorted(downloads["w"][0]) == sorted(fed.coordinator.block_order)  # the whole model
    # Of the model files only config.json was fetched: its tokenizer is the coordinator's.
    tokenizer = next(f.size for f in fed.coordinator.model_files if f.name == "tokenizer.json")
    assert received(worker, "control") < tokenizer
    summary = fed.run(timeout=120)
    assert summary["rounds_completed"] == 1 and summary["updates_rejected"] == 0
    finished(fed, "w")


def test_a_late_worker_with_a_local_model_downloads_only_the_blocks_changed_since(federation, data_file, tiny_model,
                                                                                  downloads):
    fed = federation(algorithm="fedbcd", rounds=2, local_steps=2, lr=1e-3)
    fed.add_worker(fed.worker_config("early", data_file))
    assert fed.run(timeout=120)["rounds_completed"] == 2
    g = fed.coordinator.global_model
    changed = [b for b in fed.coordinator.block_order if g.block_versions[b] != 0]
    assert 0 < len(changed) < len(fed.coordinator.block_order)
    late = fed.add_worker(fed.worker_config("late", data_file, model=str(tiny_model)))
    started(fed, late)  # it syncs, then hears that the run is over
    assert downloads.headers["late"][0] == dict(g.block_versions)
    assert downloads["late"][0] == changed
    for name, p in late.local.model.named_parameters():  # its copy is the final global model, exactly
        block = next(b for b, ts in g.tensors.items() if name in ts)
        assert torch.equal(p.detach(), g.tensors[block][name]), name
    assert late.book.version == 2 and late.book.block_versions == dict(g.block_versions)
    wait_for(lambda: "late" in fed.outcomes, 60, "the late worker to end")
    finished(fed, "late")


def test_a_late_decomfl_worker_with_a_local_model_replays_the_log_from_the_initial_model(federation, data_file,
                                                                                          tiny_model, tmp_path,
                                                                                          downloads):
    fed = federation(algorithm="decomfl", rounds=3, lr=1e-3, zo_perturbations="2", local_steps=1)
    fed.add_worker(fed.worker_config("early", data_file, work_dir=tmp_path / "early"))
    assert fed.run(timeout=120)["rounds_completed"] == 3
    late = fed.add_worker(fed.worker_config("late", data_file, model=str(tiny_model), work_dir=tmp_path / "late"))
    started(fed, late)
    assert downloads["late"] == [] and model_bytes(late) == 0
    assert late.book.version == 0
    assert max_diff(caught_up(fed, late), replica(fed.coordinator)) <= 1e-6
    assert downloads["late"] == []  # by the log alone, from version 0


def exact_copy(worker) -> dict[str, torch.Tensor]:
    """A zeroth-order worker's exact float32 copy of the model at its last sync (what it replays the log
    on and resets to after each step), by parameter name."""
    snapshot, order = worker.algorithm._snapshot, worker.algorithm.order
    return {n: snapshot.read(i) for i, (_, n) in enumerate(order)}


def test_a_bfloat16_decomfl_worker_keeps_the_local_models_exact_float32_values(federation, data_file, tiny_model,
                                                                               tmp_path, downloads):
    # The local copy is cast to bfloat16 for training, but its exact copy must be the float32 initial
    # model, as a worker that downloaded the blocks holds it; else its replica drifts from the coordinator's.
    fed = federation(algorithm="decomfl", rounds=2, lr=1e-3, zo_perturbations="2", local_steps=1, min_workers=2)
    local = fed.add_worker(fed.worker_config("local", data_file, model=str(tiny_model), dtype="bfloat16",
                                             work_dir=tmp_path / "local"))
    # One at a time: from_pretrained (the local copy) sets torch's default dtype and other global state
    # for the whole process while it loads, which breaks a model another worker thread builds meanwhile
    # (wrong dtype, or untied embeddings). Real workers are separate processes.
    started(fed, local)
    remote = fed.add_worker(fed.worker_config("remote", data_file, dtype="bfloat16", work_dir=tmp_path / "remote"))
    started(fed, remote)
    assert downloads["local"] == [] and len(downloads["remote"][0]) == len(fed.coordinator.block_order)
    assert {p.dtype for p in local.local.model.parameters()} == {torch.bfloat16}
    initial = global_params(fed.coordinator)  # version 0
    assert max_diff(exact_copy(local), initial) == 0
    assert max_diff(exact_copy(remote), initial) == 0
    summary = fed.run(timeout=120)
    assert summary["rounds_completed"] == 2 and summary["updates_rejected"] == 0
    finished(fed, "local", "remote")


def test_a_late_decomfl_worker_with_a_differing_local_model_downloads_that_block_and_replays(
        federation, data_file, tiny_model, tmp_path, downloads):
    fed = federation(algorithm="decomfl", rounds=3, lr=1e-3, zo_perturbations="2", local_steps=1)
    fed.add_worker(fed.worker_config("early", data_file, work_dir=tmp_path / "early"))
    assert fed.run(timeout=120)["rounds_completed"] == 3
    altered = altered_copy(tiny_model, tmp_path / "altered")
    late = fed.add_worker(fed.worker_config("late", data_file, model=str(altered), work_dir=tmp_path / "late"))
    started(fed, late)
    announced = downloads.headers["late"][0]  # the versions of the block files (the replica's, as written)
    expected = [b for b in fed.coordinator.block_order if announced[b] != 0 or b == CHANGED_BLOCK]
    assert downloads["late"][0] == expected and CHANGED_BLOCK in expected
    assert max_diff(caught_up(fed, late), replica(fed.coordinator)) <= 1e-6
