"""The state directory: atomic block and checkpoint files, pruning, verification, export."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedblock.common import blocks as B
from fedblock.common.config import ConfigError
from fedblock.common.models import load_model, model_files
from fedblock.server.store import (
    EXPORT_MARKER,
    BlockFileMissing,
    Checkpoint,
    StateError,
    StateStore,
    export_model,
)


def tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def test_blocks_and_checkpoints_round_trip(tmp_path):
    store = StateStore(tmp_path, keep=2)
    sha = store.write_block("layers.0", 3, tensors(0))
    store.write_checkpoint(Checkpoint(3, {"layers.0": 3}, {"layers.0": sha}, {"w1": 0}, {"bytes_up": 5.0}, [[0, 2.5]]))
    ckpt = store.latest()
    assert ckpt.round == 3 and ckpt.workers == {"w1": 0} and ckpt.eval_history == [[0, 2.5]]
    loaded = store.load_blocks(ckpt)["layers.0"]
    assert all(torch.equal(loaded[n], t) for n, t in tensors(0).items())
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary files left behind


def test_corrupted_block_file_is_detected(tmp_path):
    store = StateStore(tmp_path)
    sha = store.write_block("head", 1, tensors(1))
    path = store.block_path("head", 1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StateError, match="does not match"):
        store.read_block("head", 1, sha)
    path.unlink()
    with pytest.raises(StateError, match="missing"):
        store.read_block("head", 1, sha)


def test_only_the_last_k_checkpoints_and_their_blocks_are_kept(tmp_path):
    store = StateStore(tmp_path, keep=2)
    versions = {"a": 0, "b": 0}
    shas = {b: store.write_block(b, 0, tensors(i)) for i, b in enumerate(versions)}
    store.write_checkpoint(Checkpoint(0, dict(versions), dict(shas)))
    for r in (1, 2, 3):
        shas["a"] = store.write_block("a", r, tensors(10 + r))
        versions["a"] = r
        store.write_checkpoint(Checkpoint(r, dict(versions), dict(shas)))
    assert [p.name for p in store.checkpoints()] == ["round-000002.json", "round-000003.json"]
    assert sorted(p.name for p in store.blocks_dir.iterdir()) == ["a@2.safetensors", "a@3.safetensors", "b@0.safetensors"]


def test_encoded_downloads_live_and_go_with_their_block_file(tmp_path):
    """A block version's download encoding is a cache beside its file: pruned with it, never outliving a
    rewrite of it, and removed at start (a killed coordinator may have rewritten the file after it)."""
    store = StateStore(tmp_path, keep=1, keep_base=True)
    shas = {"a": store.write_block("a", 0, tensors(0))}
    store.write_checkpoint(Checkpoint(0, {"a": 0}, dict(shas)))
    base_blob = store.write_blob("a", 0, "shuffle,zstd:3", b"base")
    assert base_blob.name == "a@0.safetensors.shuffle-zstd-3.blob"
    for r in (1, 2):
        shas["a"] = store.write_block("a", r, tensors(r))
        store.write_blob("a", r, "bf16", b"x" * r)
        with store.pin({"a": r}):
            store.write_checkpoint(Checkpoint(r, {"a": r}, dict(shas)))
    # keep_base: version 0 stays with its blob; version 1 went with its blob; version 2 is live.
    assert sorted(p.name for p in store.blocks_dir.iterdir()) == [
        "a@0.safetensors", "a@0.safetensors.shuffle-zstd-3.blob", "a@2.safetensors", "a@2.safetensors.bf16.blob"]
    store.write_block("a", 2, tensors(7))  # round 2 again, after a restart: its old encoding is stale
    assert not store.blob_path("a", 2, "bf16").exists()
    with pytest.raises(BlockFileMissing):
        store.write_blob("a", 5, "bf16", b"no such block file")
    assert store.remove_leftovers() == 1 and not base_blob.exists()


def test_unreadable_newest_checkpoint_falls_back(tmp_path):
    store = StateStore(tmp_path, keep=3)
    sha = store.write_block("a", 0, tensors(0))
    store.write_checkpoint(Checkpoint(1, {"a": 0}, {"a": sha}))
    (store.ckpt_dir / "round-000002.json").write_text("{ truncated")
    assert store.latest().round == 1


def test_run_identity_must_match(tmp_path):
    store = StateStore(tmp_path)
    run_id = store.bind_run({"algorithm": "parablock", "model_fingerprint": "abc"})
    assert StateStore(tmp_path).bind_run({"algorithm": "parablock", "model_fingerprint": "abc"}) == run_id
    with pytest.raises(StateError, match="algorithm"):
        StateStore(tmp_path).bind_run({"algorithm": "fedbcd", "model_fingerprint": "abc"})
    assert json.loads((tmp_path / "run.json").read_text())["run_id"] == run_id


def test_export_writes_a_loadable_model_with_the_given_weights(tmp_path, tiny_model):
    model = load_model(tiny_model)
    blocks = B.partition(model)
    by_block = {b.name: {n: p.detach().clone() for n, p in B.block_params(model, b).items()} for b in blocks}
    by_block["layers.2"] = {n: t + 1.0 for n, t in by_block["layers.2"].items()}
    store = StateStore(tmp_path / "state")
    store.install_model_files(model_files(tiny_model))
    out = export_model(store.model_dir, by_block, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    params = dict(reloaded.named_parameters())
    for tensors_ in by_block.values():
        for n, t in tensors_.items():
            assert torch.equal(params[n], t)
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight
    assert (out / "tokenizer.json").exists()


# ---- pinned block files (a download in flight) ----------------------------------------------------


def _advance(store, versions, shas, rounds):
    """Close `rounds` rounds that change every block: new block files and checkpoints, which prune."""
    for r in rounds:
        for i, b in enumerate(versions):
            shas[b] = store.write_block(b, r, tensors(100 * r + i))
            versions[b] = r
        store.write_checkpoint(Checkpoint(r, dict(versions), dict(shas)))


def test_pinned_block_files_outlive_pruning_until_released(tmp_path):
    store = StateStore(tmp_path, keep=1)
    versions, shas = {"a": 0, "b": 0}, {}
    _advance(store, versions, shas, [0])
    pin = store.pin({"a": 0, "b": 0})
    second = store.pin({"a": 0})
    _advance(store, versions, shas, [1, 2])
    assert store.block_path("a", 0).exists() and store.block_path("b", 0).exists()
    assert not store.block_path("a", 1).exists()  # unpinned versions are pruned as before
    pin.release()
    pin.release()  # again: nothing
    assert store.block_path("a", 0).exists() and not store.block_path("b", 0).exists()
    second.release()
    assert not store.block_path("a", 0).exists() and store.pinned() == set()
    assert sorted(p.name for p in store.blocks_dir.iterdir()) == ["a@2.safetensors", "b@2.safetensors"]


def test_releasing_a_pin_keeps_files_that_checkpoints_name(tmp_path):
    store = StateStore(tmp_path, keep=2)
    versions, shas = {"a": 0}, {}
    _advance(store, versions, shas, [0, 1])
    with store.pin({"a": 1}):
        pass
    assert store.block_path("a", 1).exists() and store.block_path("a", 0).exists()


def test_pinning_a_file_that_is_gone_pins_nothing(tmp_path):
    store = StateStore(tmp_path, keep=1)
    versions, shas = {"a": 0, "b": 0}, {}
    _advance(store, versions, shas, [0])
    store.block_path("b", 0).unlink()
    with pytest.raises(BlockFileMissing, match="b@0"):
        store.pin({"a": 0, "b": 0})
    assert store.pinned() == set()


# ---- resume from the newest intact checkpoint ---------------------------------------------------


def _three_rounds(tmp_path):
    store = StateStore(tmp_path, keep=3)
    versions, shas = {"a": 0, "b": 0}, {}
    _advance(store, versions, shas, [1, 2, 3])
    return store


def test_latest_intact_is_the_newest_checkpoint_when_all_are_fine(tmp_path):
    store = _three_rounds(tmp_path)
    ckpt, loaded = store.latest_intact()
    assert ckpt.round == 3 and torch.equal(loaded["a"]["w"], tensors(300)["w"])
    assert StateStore(tmp_path / "fresh").latest_intact() is None


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog, damage):
    store = _three_rounds(tmp_path)
    path = store.block_path("b", 3)
    if damage == "missing":
        path.unlink()
    else:
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        ckpt, loaded = store.latest_intact()
    assert ckpt.round == 2 and torch.equal(loaded["b"]["w"], tensors(201)["w"])
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "round-000002.json" in warning and "round-000003.json" in warning and "b@3.safetensors" in warning
    assert ("missing" if damage == "missing" else "does not match") in warning


def test_a_checkpoint_of_the_wrong_shape_falls_back(tmp_path):
    store = _three_rounds(tmp_path)
    path = store.ckpt_dir / "round-000003.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "block_versions": []}))  # JSON that reads, of the wrong shape
    ckpt, _ = store.latest_intact()
    assert ckpt.round == 2


def test_no_intact_checkpoint_is_a_clear_error(tmp_path):
    store = _three_rounds(tmp_path)
    (store.ckpt_dir / "round-000003.json").write_text("{ truncated")
    store.block_path("a", 2).unlink()
    store.block_path("a", 1).unlink()
    with pytest.raises(StateError, match="no intact checkpoint") as error:
        store.latest_intact()
    message = str(error.value)
    assert "round-000003.json is unreadable" in message and "a@2.safetensors" in message and "a@1" in message


# ---- leftovers of a killed coordinator -------------------------------------------------------------


def test_leftover_partial_and_temporary_files_are_removed(tmp_path, caplog):
    store = _three_rounds(tmp_path)
    leftovers = [store.incoming_dir / "w1.r4.a.0123456789abcdef.part", store.blocks_dir / ".a@4.safetensors.x1y2.tmp",
                 store.ckpt_dir / ".round-000004.json.abc.tmp", tmp_path / ".summary.json.q.tmp"]
    kept = [store.incoming_dir / "notes.txt", tmp_path / "keep.tmp", store.model_dir / ".x.tmp"]
    store.model_dir.mkdir()
    for p in leftovers + kept:
        p.write_bytes(b"x")
    (store.incoming_dir / "dir.part").mkdir()
    before = {p.name for p in store.blocks_dir.iterdir()} - {leftovers[1].name}
    with caplog.at_level("INFO"):
        assert StateStore(tmp_path).remove_leftovers() == 4
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)
    assert (store.incoming_dir / "dir.part").is_dir()
    assert {p.name for p in store.blocks_dir.iterdir()} == before
    assert any("removed 4 leftover files" in r.getMessage() for r in caplog.records)
    assert store.latest_intact()[0].round == 3


# ---- export replaces only an earlier export --------------------------------------------------------


def _export_args(tmp_path, tiny_model):
    model = load_model(tiny_model)
    by_block = {b.name: {n: p.detach().clone() for n, p in B.block_params(model, b).items()} for b in B.partition(model)}
    store = StateStore(tmp_path / "state")
    store.install_model_files(model_files(tiny_model))
    return store, by_block


def test_export_refuses_a_folder_that_is_not_an_earlier_export(tmp_path, tiny_model):
    store, by_block = _export_args(tmp_path, tiny_model)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(ConfigError, match="not an earlier fedblock export"):
        export_model(store.model_dir, by_block, precious)
    assert (precious / "thesis.txt").read_text() == "years of work"
    with pytest.raises(ConfigError, match="part of the state dir"):
        export_model(store.model_dir, by_block, store.root)  # --out $STATE_DIR
    assert store.checkpoints() == [] and (store.model_dir / ".complete").exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        export_model(store.model_dir, by_block, a_file)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_export_replaces_an_earlier_export_and_fills_an_empty_folder(tmp_path, tiny_model):
    store, by_block = _export_args(tmp_path, tiny_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = export_model(store.model_dir, by_block, empty)
    assert (out / EXPORT_MARKER).is_file() and (out / "config.json").is_file()
    (out / "stale.txt").write_text("from the first export")
    out = export_model(store.model_dir, by_block, out)
    assert not (out / "stale.txt").exists() and (out / EXPORT_MARKER).is_file()
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_export_never_replaces_the_state_dir_or_a_folder_holding_it(tmp_path, tiny_model):
    """An earlier export (with its marker) that now holds a state dir, or an empty folder inside the
    state dir other than its own export/, is refused: the export replaces the folder whole."""
    store, by_block = _export_args(tmp_path / "old-export", tiny_model)
    (tmp_path / "old-export" / EXPORT_MARKER).write_text("")
    with pytest.raises(ConfigError, match="part of the state dir"):
        export_model(store.model_dir, by_block, tmp_path / "old-export")
    with pytest.raises(ConfigError, match="part of the state dir"):
        export_model(store.model_dir, by_block, store.ckpt_dir)  # empty now, full of checkpoints later
    assert store.root.is_dir() and (store.model_dir / ".complete").exists()
    assert (export_model(store.model_dir, by_block, store.root / "export") / EXPORT_MARKER).is_file()


def test_evaluations_recorded_between_checkpoints_are_read_back_up_to_the_resumed_round(tmp_path):
    store = StateStore(tmp_path)
    assert store.read_evaluations(10) == []
    store.write_evaluations([[0, 3.5], [2, 3.1, 0.25], [4, 2.9]])
    assert store.read_evaluations(3) == [[0, 3.5], [2, 3.1, 0.25]]  # round 4's model is not the one resumed
    (tmp_path / "evaluations.json").write_text("{ truncated")
    assert store.read_evaluations(3) == []
