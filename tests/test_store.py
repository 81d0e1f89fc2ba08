"""The state directory: atomic block and checkpoint files, pruning, verification, export."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fedblock.common import blocks as B
from fedblock.common.models import load_model, model_files
from fedblock.server.store import Checkpoint, StateError, StateStore, export_model


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
