"""The coordinator for big models: the global model is read from its block files (private maps, only
the blocks in use), a round reads only the blocks it aggregates, a new run's blocks are streamed from
the model's files, and the export is written shard by shard."""

import json
import os

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from fedblock.common import adapters
from fedblock.common import blocks as B
from fedblock.common.adapters import LoraSettings
from fedblock.common.config import CoordinatorConfig
from fedblock.common.models import load_model, make_tiny_model, model_files
from fedblock.server import daemon
from fedblock.server.evaluation import Evaluator
from fedblock.server.rounds import RoundPlan
from fedblock.server.store import (
    WEIGHTS_INDEX_NAME,
    BlockFileMissing,
    Checkpoint,
    StateStore,
    StoredModel,
    export_model,
)


def config(tmp_path, model, **kw):
    return CoordinatorConfig(model=str(model), state_dir=tmp_path / "state", listen="127.0.0.1:0", insecure=True, **kw)


def mapped_files() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


def stored(tmp_path, by_block) -> StoredModel:
    store = StateStore(tmp_path / "state")
    versions = {b: 0 for b in by_block}
    shas = {b: store.write_block(b, 0, t) for b, t in by_block.items()}
    store.write_checkpoint(Checkpoint(0, versions, shas))
    return store.load_blocks(store.latest())


def test_a_block_file_is_what_safetensors_writes_and_reads_back_as_views_of_a_private_map(tmp_path):
    g = torch.Generator().manual_seed(0)
    block = {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g), "s": torch.tensor(2.0)}
    model = stored(tmp_path, {"layers.0": block})
    path = model.store.block_path("layers.0", 0)
    assert path.read_bytes() == safetensors.torch.save(block)  # streamed, byte for byte the same file
    got = model["layers.0"]
    assert all(torch.equal(got[n], t) for n, t in block.items())
    assert str(path) in mapped_files()  # views of the file's map, not a copy
    got["w"].add_(1.0)  # a private map: neither the file nor the model changes
    assert torch.equal(model["layers.0"]["w"], block["w"]) and path.read_bytes() == safetensors.torch.save(block)
    os.unlink(path)  # pruned while read: the map outlives the file
    assert torch.equal(got["b"], block["b"])
    del got
    assert str(path) not in mapped_files()  # unmapped once the tensors are dropped
    with pytest.raises(BlockFileMissing):
        model["layers.0"]


def test_a_snapshot_keeps_its_files_until_released_and_copies_the_held_blocks(tmp_path):
    model = stored(tmp_path, {"a": {"w": torch.zeros(3)}, "b": {"w": torch.ones(3)}})
    held = model.holding(["b"])
    assert held.held == {"b"} and model.held == frozenset() and held.source("b") is None
    snapshot = held.snapshot()
    held["b"]["w"].add_(5.0)  # the holder moves its block on in place; the snapshot keeps the old value
    store = model.store
    sha = store.write_block("a", 1, {"w": torch.full((3,), 2.0)})
    store.keep = 1
    store.write_checkpoint(Checkpoint(1, {"a": 1, "b": 0}, {"a": sha, "b": model.block_sha256["b"]}))
    assert store.block_path("a", 0).exists()  # pinned by the snapshot
    assert torch.equal(snapshot["a"]["w"], torch.zeros(3)) and torch.equal(snapshot["b"]["w"], torch.ones(3))
    snapshot.release()
    assert not store.block_path("a", 0).exists()


def test_a_round_reads_only_the_blocks_it_aggregates_and_keeps_none(tmp_path, tiny_model, monkeypatch):
    c = daemon.build(config(tmp_path, tiny_model, algorithm="fedbcd"))
    g = c.global_model
    assert isinstance(g.tensors, StoredModel) and g.tensors.held == frozenset()
    before = {b: {n: t.clone() for n, t in ts.items()} for b, ts in g.tensors.items()}
    delta = {n: torch.full_like(t, 0.25) for n, t in before["layers.1"].items()}
    plan = RoundPlan(1, {"w": ("layers.1",)}, 1e-4, 1)
    plan.sums.add("layers.1", delta, 10.0)
    read = []
    original = c.store.read_block
    monkeypatch.setattr(c.store, "read_block", lambda b, v, sha: read.append((b, v)) or original(b, v, sha))
    c._close_round(plan)
    assert read == [("layers.1", 0)]  # the one block aggregated, nothing else
    g = c.global_model
    assert g.version == 1 and g.block_versions["layers.1"] == 1 and g.tensors.held == frozenset()
    assert all(v == 0 for b, v in g.block_versions.items() if b != "layers.1")
    for b, ts in before.items():
        for n, t in ts.items():
            assert torch.equal(g.tensors[b][n], t + delta[n] if b == "layers.1" else t), (b, n)
    resumed = daemon.build(config(tmp_path, tiny_model, algorithm="fedbcd")).global_model
    assert resumed.version == 1 and resumed.block_sha256 == g.block_sha256


def test_a_zeroth_order_replica_is_held_in_memory(tmp_path, tiny_model):
    c = daemon.build(config(tmp_path, tiny_model, algorithm="decomfl", train_blocks="layers.*"))
    g = c.global_model
    assert g.tensors.held == set(c.trainable) and "embed" not in g.tensors.held
    replica = g.tensors["layers.0"]
    assert replica is g.tensors["layers.0"]  # the same tensors each time: the algorithm moves them in place


def test_a_new_run_streams_its_blocks_from_the_model_files(tmp_path, tiny_model, caplog):
    """The initial blocks equal what from_pretrained loads, for a plain run and for adapters (whose
    initial values come from their seed, as every party makes them)."""
    for peft in ("none", "lora"):
        cfg = config(tmp_path / peft, tiny_model, peft=peft, lora_r=4)
        full = adapters.add_lora(load_model(tiny_model), cfg.lora)
        params = dict(full.named_parameters())
        with caplog.at_level("INFO"):
            c = daemon.build(cfg)
        assert not any("loading it whole" in r.getMessage() for r in caplog.records)  # streamed
        for b in adapters.partition(full, 1, cfg.lora):
            assert c.initial_sha256[b.name] == B.canonical_sha256({n: params[n] for n in b.params}, b.params), b.name
            got = c.global_model.tensors[b.name]
            assert all(torch.equal(got[n], params[n].detach()) for n in b.params), b.name


def test_a_model_that_cannot_trace_on_the_meta_device_still_starts(tmp_path, caplog):
    gpt2 = make_tiny_model(tmp_path / "gpt2", "gpt2", seed=1, num_layers=2, hidden_size=32)
    with caplog.at_level("INFO"):
        c = daemon.build(config(tmp_path, gpt2))
    assert any("allocated copy" in r.getMessage() for r in caplog.records)
    model = load_model(gpt2)
    params = dict(model.named_parameters())
    assert [b.name for b in B.partition(model)] == c.block_order
    for b, ts in c.global_model.tensors.items():
        assert all(torch.equal(t, params[n].detach()) for n, t in ts.items()), b


def test_the_export_is_sharded_and_loads_as_the_blocks(tmp_path, tiny_model):
    model = load_model(tiny_model)
    by_block = {b.name: {n: p.detach() + 0.5 for n, p in B.block_params(model, b).items()} for b in B.partition(model)}
    g = stored(tmp_path, by_block)
    g.store.install_model_files(model_files(tiny_model))
    out = export_model(g.store.model_dir, g, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((out / WEIGHTS_INDEX_NAME).read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for ts in by_block.values() for t in ts.values())
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    params = dict(reloaded.named_parameters())
    assert {n for ts in by_block.values() for n in ts} == set(params)
    for ts in by_block.values():
        for n, t in ts.items():
            assert torch.equal(params[n], t), n
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_a_lora_export_merges_block_by_block_as_peft_merges_the_whole_model(tmp_path, tiny_model):
    lora = LoraSettings(r=4)
    model = adapters.add_lora(load_model(tiny_model), lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if adapters.is_adapter(n):
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    by_block = {b.name: {n: p.detach().clone() for n, p in B.block_params(model, b).items()}
                for b in adapters.partition(model, 1, lora)}
    g = stored(tmp_path, by_block)
    g.store.install_model_files(model_files(tiny_model))
    out = export_model(g.store.model_dir, g, tmp_path / "out", lora, adapter_out=tmp_path / "adapter",
                       max_shard_bytes=100_000)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    expected = adapters.merge(model).state_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert reloaded.keys() == expected.keys()
    assert all(torch.equal(reloaded[n], expected[n]) for n in expected)


def test_the_evaluator_copies_only_the_blocks_that_changed(tmp_path, tiny_model, data_file, monkeypatch):
    model = load_model(tiny_model)
    by_block = {b.name: {n: p.detach().clone() for n, p in B.block_params(model, b).items()} for b in B.partition(model)}
    g = stored(tmp_path, by_block)
    evaluator = Evaluator(tiny_model, str(data_file), max_examples=4, batch_size=4, max_seq_len=32)
    first = evaluator(g)
    sha = g.store.write_block("layers.0", 1, {n: t + 0.1 for n, t in by_block["layers.0"].items()})
    moved = g.next({**g.block_versions, "layers.0": 1}, {**g.block_sha256, "layers.0": sha})
    read = []
    original = g.store.read_block
    monkeypatch.setattr(g.store, "read_block", lambda b, v, s: read.append(b) or original(b, v, s))
    assert evaluator(moved) != first and read == ["layers.0"]
    assert evaluator(g) == first and read == ["layers.0", "layers.0"]
