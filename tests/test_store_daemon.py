"""What the coordinator does with its state dir when it starts: resume past a damaged checkpoint,
clean up after a killed run, refuse an export folder it would destroy (coordinator and CLI)."""

import pytest
import torch

from fedblock.common.cli import main
from fedblock.common.config import ConfigError, CoordinatorConfig
from fedblock.server import daemon
from fedblock.server.store import BlockFileMissing, Checkpoint


def config(tmp_path, tiny_model, **kw):
    return CoordinatorConfig(model=str(tiny_model), state_dir=tmp_path / "state", listen="127.0.0.1:0", insecure=True,
                             **kw)


def close_rounds(coordinator, rounds):
    """Checkpoint `rounds` as the coordinator would: every block moved by +round."""
    g = coordinator.global_model
    versions, shas = dict(g.block_versions), dict(g.block_sha256)
    for r in rounds:
        for b, tensors in g.tensors.items():
            shas[b] = coordinator.store.write_block(b, r, {n: t + r for n, t in tensors.items()})
            versions[b] = r
        coordinator.store.write_checkpoint(Checkpoint(r, dict(versions), dict(shas)))


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, tiny_model, caplog):
    c = config(tmp_path, tiny_model, keep_checkpoints=3)
    first = daemon.build(c)
    block = first.block_order[1]
    base = {n: t.clone() for n, t in first.global_model.tensors[block].items()}
    close_rounds(first, [1, 2, 3])
    with pytest.raises(BlockFileMissing):  # version 0 is older than the checkpoints kept: its files are gone
        first.global_model.tensors[block]
    first.store.block_path(block, 3).unlink()  # the newest checkpoint's file is gone
    with caplog.at_level("WARNING"):
        resumed = daemon.build(c)
    g = resumed.global_model
    assert g.version == 2 and g.block_versions[block] == 2
    for name, t in base.items():
        assert torch.equal(g.tensors[block][name], t + 2)
    assert any("round-000003.json" in r.getMessage() and f"{block}@3" in r.getMessage() for r in caplog.records)


def test_leftovers_of_a_killed_coordinator_are_removed_at_start(tmp_path, tiny_model, caplog):
    c = config(tmp_path, tiny_model)
    store = daemon.build(c).store
    part = store.incoming_dir / "w1.r1.layers.0.0123456789abcdef.part"
    tmp_files = [store.blocks_dir / ".layers.0@1.safetensors.k3j2.tmp", store.ckpt_dir / ".round-000001.json.a1.tmp"]
    for p in [part, *tmp_files]:
        p.write_bytes(b"\0" * 1000)
    with caplog.at_level("INFO"):
        resumed = daemon.build(c)
    assert not part.exists() and not any(p.exists() for p in tmp_files)
    assert any("removed 3 leftover files" in r.getMessage() for r in caplog.records)
    assert resumed.global_model.version == 0


def test_coordinator_refuses_an_export_dir_it_would_destroy(tmp_path, tiny_model):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(ConfigError, match="--export-dir: .*not an earlier fedblock export"):
        daemon.build(config(tmp_path, tiny_model, export_dir=precious))
    assert (precious / "thesis.txt").exists()


def test_cli_export_refuses_a_folder_that_is_not_an_export_and_replaces_its_own(tmp_path, tiny_model, capsys):
    daemon.build(config(tmp_path, tiny_model))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    state = str(tmp_path / "state")
    assert main(["export", "--state-dir", state, "--out", str(precious)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out" in err[0] and "not an earlier fedblock export" in err[0], err
    assert (precious / "thesis.txt").read_text() == "years of work"
    assert main(["export", "--state-dir", state, "--out", state]) == 2  # the state dir itself
    assert (tmp_path / "state" / "checkpoints" / "round-000000.json").exists()
    out = tmp_path / "out"
    assert main(["export", "--state-dir", state, "--out", str(out)]) == 0
    assert main(["export", "--state-dir", state, "--out", str(out)]) == 0  # an earlier export: replaced
    assert (out / "config.json").exists()
