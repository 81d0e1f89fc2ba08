"""`--peft lora`: adapters form the blocks; FedIT (fedavg + LoRA), block methods on adapters, decomfl on
adapters, the export with the adapters merged, and the base model that never travels."""

import json

import pytest
import torch
from conftest import train_every_block
from transformers import AutoModelForCausalLM

from fedblock.common import adapters as A
from fedblock.common.config import ConfigError, CoordinatorConfig
from fedblock.common.models import load_model

STEPS, LR = 3, 3e-3
LORA = {"peft": "lora", "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0}


def lora_model(path, seed=0):
    return A.add_lora(load_model(path), A.LoraSettings(4, 8.0, 0.0, A.DEFAULT_TARGETS, seed))


def global_params(coordinator):
    return {n: t for tensors in coordinator.global_model.tensors.values() for n, t in tensors.items()}


def test_blocks_are_the_base_blocks_and_one_adapter_block_per_layer(tiny_model):
    model = lora_model(tiny_model)
    blocks = A.partition(model, 1, A.LoraSettings())
    names = [b.name for b in blocks]
    assert names == ["embed", "layers.0", "lora.layers.0", "layers.1", "lora.layers.1", "layers.2", "lora.layers.2",
                     "layers.3", "lora.layers.3", "head"]
    every = [n for b in blocks for n in b.params]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())  # each parameter in one block
    adapter = next(b for b in blocks if b.name == "lora.layers.2")
    assert len(adapter.params) == 8 and all(A.is_adapter(n) and ".layers.2." in n for n in adapter.params)
    # Both sides build the same initial adapters from the run's seed; another seed, other adapters.
    same, other = dict(lora_model(tiny_model).named_parameters()), dict(lora_model(tiny_model, seed=1).named_parameters())
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], same[n]) for n in adapter.params)
    assert not torch.equal(params[adapter.params[0]], other[adapter.params[0]])
    assert A.select_trainable(names, "layers.1,head", adapters=True) == ("lora.layers.1",)
    assert A.select_trainable(names, "*", adapters=True) == ("lora.layers.0", "lora.layers.1", "lora.layers.2", "lora.layers.3")


def test_fedit_with_one_worker_is_centralised_lora_training(federation, tiny_model, data_file):
    """fedavg + LoRA (FedIT) trains every adapter block; with one worker it is LoRA fine-tuning on one
    machine (AdamW over the adapters, a fresh state each round) to the last bit, and the base stays."""
    model = lora_model(tiny_model)
    blocks = [b for b in A.partition(model, 1, A.LoraSettings()) if b.name.startswith(A.PREFIX)]
    reference = train_every_block(model, blocks, tiny_model, data_file, 3, STEPS, LR)
    initial = dict(lora_model(tiny_model).named_parameters())

    fed = federation(algorithm="fedavg", rounds=3, local_steps=STEPS, lr=LR, **LORA)
    fed.add_worker(fed.worker_config("solo", data_file))
    summary = fed.run()
    assert summary["updates_accepted"] == 3 * 4
    got = global_params(fed.coordinator)
    assert max((reference[n] - initial[n]).abs().max().item() for n in reference) > 1e-3
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=0, msg=name)
        if not A.is_adapter(name):
            assert torch.equal(got[name], initial[name].detach()), name
    versions = fed.coordinator.global_model.block_versions
    assert {b: v for b, v in versions.items() if not b.startswith(A.PREFIX)} == dict.fromkeys(
        ["embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"], 0)


def test_block_method_on_adapters_with_a_local_base_model_downloads_no_base_block(federation, tiny_model, data_file,
                                                                                  tmp_path, monkeypatch):
    """fedbcd trains one layer's adapters per worker and round; a worker that has the base model (and
    builds the same initial adapters) downloads nothing at start, and only adapters travel after."""
    from fedblock.client.session import Session

    streamed, original = {}, Session.download

    def download(self, held, **kw):
        sync = original(self, held, **kw)
        blocks = list(sync.blocks)
        streamed.setdefault(self.name, []).append([b.block for b in blocks])
        return sync._replace(blocks=iter(blocks))

    monkeypatch.setattr(Session, "download", download)
    fed = federation(algorithm="fedbcd", rounds=3, local_steps=2, lr=1e-3, min_workers=2, train_blocks="layers.*",
                     **LORA)
    for i, name in enumerate("ab"):
        fed.add_worker(fed.worker_config(name, data_file, seed=i, model=str(tiny_model)))
    summary = fed.run()
    assert summary["rounds_completed"] == 3 and summary["updates_accepted"] == 6
    g = fed.coordinator.global_model
    assert all(v == 0 for b, v in g.block_versions.items() if not b.startswith(A.PREFIX))
    # round-robin: both workers on one layer's adapters per round, the next layer each round
    assert sorted(v for b, v in g.block_versions.items() if b.startswith(A.PREFIX)) == [0, 1, 2, 3]
    # The initial syncs stream nothing: the base model and the initial adapters are held.
    assert [syncs[0] for syncs in streamed.values()] == [[], []]
    later = [b for syncs in streamed.values() for sync in syncs for b in sync]
    assert later and all(b.startswith(A.PREFIX) for b in later), streamed

    out, adapter_out = tmp_path / "merged", tmp_path / "adapter"
    from fedblock.common.config import ExportConfig
    from fedblock.common.tools import export

    with pytest.raises(ConfigError, match="neither inside the other"):
        export(ExportConfig(state_dir=fed.coordinator.store.root, out=out, adapter_out=out / "adapter"))
    assert not out.exists()
    export(ExportConfig(state_dir=fed.coordinator.store.root, out=out, adapter_out=adapter_out))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any(A.is_adapter(n) for n, _ in merged.named_parameters())  # a plain Hugging Face model
    peft_model = lora_model(tiny_model)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, t in global_params(fed.coordinator).items():
            params[name].copy_(t)
    ids = torch.tensor([[5, 17, 40, 99, 3, 250]])
    peft_model.eval()
    expected = peft_model(input_ids=ids).logits
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(load_model(tiny_model), adapter_out).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert json.loads((adapter_out / "adapter_config.json").read_text())["r"] == 4


def test_decomfl_perturbs_only_the_adapters(federation, tiny_model, data_file):
    fed = federation(algorithm="decomfl", rounds=3, local_steps=2, lr=1e-3, min_workers=2, **LORA)
    for i, name in enumerate("ab"):
        fed.add_worker(fed.worker_config(name, data_file, seed=i))
    summary = fed.run()
    assert summary["rounds_completed"] == 3
    assert fed.coordinator.trainable == ("lora.layers.0", "lora.layers.1", "lora.layers.2", "lora.layers.3")
    initial = dict(lora_model(tiny_model).named_parameters())
    got = global_params(fed.coordinator)
    moved = {n for n in got if not torch.equal(got[n], initial[n].detach())}
    assert moved and all(A.is_adapter(n) for n in moved)
    # B starts at zero and moves first; every adapter tensor of the trained layers is perturbed.
    assert any(".lora_B." in n for n in moved)


@pytest.mark.parametrize("options,message", [
    ({"algorithm": "fedspzo"}, "fedspzo splits the base model"),
    ({"lora_r": 0}, "--lora-r must be >= 1"),
    ({"lora_dropout": 1.0}, "--lora-dropout"),
    ({"lora_targets": "q_proj,;rm"}, "--lora-targets"),
    ({"lora_alpha": float("inf")}, "--lora-alpha"),
])
def test_bad_lora_options_stop_at_start(tmp_path, tiny_model, options, message):
    from fedblock.common import config as C

    with pytest.raises(ConfigError, match=message):
        C.build(CoordinatorConfig, {"model": str(tiny_model), "state_dir": tmp_path, "insecure": True, "peft": "lora",
                                    **options})


@pytest.mark.parametrize("targets,message", [("c_attn", "not found"), ("lm_head", "shares its weight")])
def test_lora_targets_that_name_no_module_or_a_tied_one_stop_the_coordinator_before_it_writes(tmp_path, tiny_model,
                                                                                               targets, message):
    """The tiny model ties lm_head to embed_tokens: merging an adapter into the shared weight for the
    export would change the embedding too, so the export would not be the model that was trained."""
    from fedblock.server import daemon

    config = CoordinatorConfig(model=str(tiny_model), state_dir=tmp_path / "s", insecure=True, peft="lora",
                               lora_targets=targets)
    with pytest.raises(ConfigError, match=f"--lora-targets {targets}: .*{message}"):
        daemon.build(config)
    assert not (tmp_path / "s" / "checkpoints").exists()


def test_an_embedding_adapter_belongs_to_the_embed_block(tmp_path):
    from fedblock.common.models import make_tiny_model

    path = make_tiny_model(tmp_path / "untied", num_layers=2, tie_word_embeddings=False)
    lora = A.LoraSettings(4, 8.0, 0.0, ("embed_tokens", "q_proj"), 0)
    blocks = A.partition(A.add_lora(load_model(path), lora), 1, lora)
    by_name = {b.name: b.params for b in blocks}
    assert [b.name for b in blocks] == ["embed", "lora.embed", "layers.0", "lora.layers.0", "layers.1",
                                        "lora.layers.1", "head"]
    assert all("embed_tokens.lora_embedding_" in n for n in by_name["lora.embed"])
    assert A.select_trainable(list(by_name), "embed", adapters=True) == ("lora.embed",)


def test_a_state_dir_is_bound_to_its_adapters(tmp_path, tiny_model):
    from fedblock.server import daemon
    from fedblock.server.store import StateError

    def build(**options):
        return daemon.build(CoordinatorConfig(model=str(tiny_model), state_dir=tmp_path / "s", insecure=True,
                                              **options))

    first = build(**LORA)
    assert first.trainable[0] == "lora.layers.0"
    again = build(**LORA)  # a resume with the same adapters
    assert again.global_model.block_versions == first.global_model.block_versions
    with pytest.raises(StateError, match="peft"):
        build(**{**LORA, "lora_r": 8})
    with pytest.raises(StateError, match="holds a run with"):  # without adapters: other blocks, first
        build()
