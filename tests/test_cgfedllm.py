"""CG-FedLLM end to end on a tiny model: record a run's updates (--record-updates), pre-train the
autoencoder on them (fedblock codec train), then run FedIT with the `ae:RATIO` codec, whose weights the
coordinator serves to the workers."""

import math

import pytest
import safetensors.torch
import torch

from fedblock.common import adapters as A
from fedblock.common.codecs import CodecError, CodecPipeline
from fedblock.common.config import CodecTrainConfig, ConfigError, CoordinatorConfig
from fedblock.common.messages import TensorSpec
from fedblock.common.models import load_model
from fedblock.common.tools import codec_train

LORA = {"peft": "lora", "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0}
RATIO = 4


def record_run(federation, data_file, rounds=3, **options):
    fed = federation(algorithm="fedavg", rounds=rounds, local_steps=2, lr=3e-3, record_updates=True, **LORA,
                     **options)
    fed.add_worker(fed.worker_config("solo", data_file))
    summary = fed.run()
    assert summary["rounds_completed"] == rounds
    return fed


def test_recorded_updates_are_the_accepted_deltas_and_old_rounds_go(federation, tiny_model, data_file):
    fed = record_run(federation, data_file, rounds=3, record_keep_rounds=2)
    root = fed.coordinator.store.root / "records"
    assert sorted(d.name for d in root.iterdir()) == ["round-000002", "round-000003"]  # round 1 pruned
    files = sorted(root.glob("round-*/*.safetensors"))
    assert len(files) == 2 * 4 and all(f.name.startswith("solo@lora.layers.") for f in files)
    # One worker, fedavg: the global adapter is the initial one plus the recorded deltas, rounds 2 and 3
    # here; so what was recorded is what was folded in.
    first = record_run(federation, data_file, rounds=1)
    g1, g3 = first.coordinator.global_model.tensors, fed.coordinator.global_model.tensors
    for block in ["lora.layers.0", "lora.layers.3"]:
        total = {n: g1[block][n].clone() for n in g1[block]}
        for r in (2, 3):
            for n, t in safetensors.torch.load_file(str(root / f"round-{r:06d}" / f"solo@{block}.safetensors")).items():
                total[n] += t
        for n in total:
            torch.testing.assert_close(total[n], g3[block][n], rtol=0, atol=1e-6)


def test_recording_is_off_unless_asked(federation, data_file):
    fed = federation(algorithm="fedavg", rounds=1, local_steps=1, **LORA)
    fed.add_worker(fed.worker_config("solo", data_file))
    fed.run()
    assert not (fed.coordinator.store.root / "records").exists()


def test_pretrain_then_run_fedit_with_the_autoencoder(federation, tiny_model, data_file, tmp_path, capsys):
    recorded = record_run(federation, data_file, rounds=3)
    weights = tmp_path / "ae.safetensors"
    result = codec_train(CodecTrainConfig(from_dir=recorded.coordinator.store.root, out=weights, ratio=RATIO,
                                          variant="max", steps=60, holdout=0.25))
    assert result["updates"] == 12 and result["holdout_updates"] == 3
    assert math.isfinite(result["holdout_cosine"]) and "holdout_cosine" in capsys.readouterr().out

    fed = federation(algorithm="fedavg", rounds=2, local_steps=2, lr=3e-3, codec=f"ae:{RATIO}:3",
                     codec_weights=weights, **LORA)
    fed.add_worker(fed.worker_config("solo", data_file))
    summary = fed.run()
    assert summary["rounds_completed"] == 2 and summary["updates_accepted"] == 8
    # The weights travelled (hash-checked) to the worker: the coordinator's copy in the state dir.
    served = fed.coordinator.store.root / "codec" / "autoencoder.safetensors"
    assert served.read_bytes() == weights.read_bytes()
    assert fed.coordinator.codec_files[0].size == served.stat().st_size
    # Only latents went up: each adapter upload is about 1/RATIO of the uncompressed one.
    specs = [t for b in fed.coordinator.block_order if b.startswith(A.PREFIX) for t in fed.coordinator.specs[b].tensors]
    raw = 4 * sum(math.prod(t.shape) for t in specs)
    assert 2 * raw / RATIO / 2 < summary["bytes_up"] / 2 < raw / 2  # per round, framing included
    g = fed.coordinator.global_model
    initial = dict(A.add_lora(load_model(tiny_model), A.LoraSettings(4, 8.0, 0.0, A.DEFAULT_TARGETS, 0)).named_parameters())
    moved = [n for b in g.tensors if b.startswith(A.PREFIX) for n, t in g.tensors[b].items()
             if not torch.equal(t, initial[n].detach())]
    assert moved  # decoded updates were applied


def test_the_ae_codec_needs_its_weights_and_the_right_ratio(tmp_path, tiny_model):
    from fedblock.common import config as C
    from fedblock.common.autoencoder import GradientAutoencoder, save_weights

    base = {"model": str(tiny_model), "state_dir": tmp_path, "insecure": True, "algorithm": "fedavg", **LORA}
    with pytest.raises(ConfigError, match="needs the autoencoder's weights"):
        C.build(CoordinatorConfig, {**base, "codec": "ae:4"})
    weights = tmp_path / "ae16.safetensors"
    save_weights(GradientAutoencoder(16), weights, variant="none")
    with pytest.raises(ConfigError, match="for ratio 16, not 4"):
        C.build(CoordinatorConfig, {**base, "codec": "ae:4", "codec_weights": weights})
    with pytest.raises(ConfigError, match="uses no weights"):
        C.build(CoordinatorConfig, {**base, "codec": "bf16", "codec_weights": weights})
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ConfigError, match="cannot load"):
        C.build(CoordinatorConfig, {**base, "codec": "ae:16", "codec_weights": tmp_path / "junk.safetensors"})
    with pytest.raises(ConfigError, match="uploads only"):
        C.build(CoordinatorConfig, {**base, "download_codec": "ae:16"})
    with pytest.raises(ConfigError, match="cannot follow ae:16"):  # top-k decodes by the block's tensor names
        C.build(CoordinatorConfig, {**base, "codec": "ae:16,topk:0.1", "codec_weights": weights})


def test_a_hostile_latent_is_a_codec_error(tmp_path):
    from fedblock.common.autoencoder import GradientAutoencoder, save_weights

    weights = tmp_path / "ae.safetensors"
    save_weights(GradientAutoencoder(RATIO).eval(), weights, variant="max")
    codec = CodecPipeline(f"ae:{RATIO}", weights=weights)
    block = {"x.lora_A": torch.randn(4, 16) * 1e-3, "x.lora_B": torch.randn(16, 4) * 1e-3}
    specs = [TensorSpec.of(n, t) for n, t in block.items()]
    good = codec.decode(codec.encode("b", block), specs)
    assert {n: t.shape for n, t in good.items()} == {n: t.shape for n, t in block.items()}
    for tensors in ({"ae::latent": torch.zeros(4, 1, 1), "ae::scale": torch.ones(1)},  # wrong latent shape
                    {"ae::latent": torch.zeros(4, 2, 4), "ae::scale": torch.tensor([float("nan")])},
                    {"ae::latent": torch.zeros(4, 2, 4), "ae::scale": torch.tensor([-1.0])},
                    {"ae::latent": torch.zeros(4, 2, 4)}):
        with pytest.raises(CodecError):
            codec.decode(safetensors.torch.save(tensors), specs)


def test_the_ae_payload_size_is_exact_and_tuning_advances_only_on_commit(tmp_path):
    from fedblock.common.autoencoder import GradientAutoencoder, encoder_state, save_weights

    weights = tmp_path / "ae.safetensors"
    save_weights(GradientAutoencoder(RATIO).eval(), weights, variant="max")
    block = {"x.lora_A": torch.randn(4, 16) * 1e-3, "x.lora_B": torch.randn(16, 4) * 1e-3, "n": torch.randn(16)}
    specs = [TensorSpec.of(n, t) for n, t in block.items()]
    codec = CodecPipeline(f"ae:{RATIO}:3,bf16", weights=weights)
    stage = codec.stages[0]
    before = encoder_state(stage.model)
    blob, state = codec.encode_pending("b", block)
    assert len(blob) - 8 - int.from_bytes(blob[:8], "little") == codec.payload_nbytes(specs)
    assert all(torch.equal(before[k], v) for k, v in encoder_state(stage.model).items())  # not yet
    codec.commit(state)
    after = encoder_state(stage.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the tuned encoder, kept on acceptance


def test_codec_train_refuses_a_damaged_record_in_one_line(tmp_path):
    record = tmp_path / "state" / "records" / "round-000001" / "w@lora.layers.0.safetensors"
    record.parent.mkdir(parents=True)
    record.write_bytes(safetensors.torch.save({"a": torch.ones(4, 8)})[:-7])  # cut short by a kill
    with pytest.raises(ConfigError, match="w@lora.layers.0.safetensors is not a readable recorded update"):
        codec_train(CodecTrainConfig(from_dir=tmp_path / "state", out=tmp_path / "ae.safetensors", ratio=4, steps=1))
    assert not (tmp_path / "ae.safetensors").exists()
    with pytest.raises(ConfigError, match="no recorded updates"):
        codec_train(CodecTrainConfig(from_dir=tmp_path, out=tmp_path / "ae.safetensors", ratio=4, steps=1))


def test_a_killed_install_of_the_codec_weights_leaves_nothing_after_a_restart(tmp_path):
    from fedblock.server.store import StateStore

    store = StateStore(tmp_path / "s")
    (store.root / "codec").mkdir()
    partial = store.root / "codec" / ".autoencoder.safetensors.x1.tmp"
    partial.write_bytes(b"half")
    store.remove_leftovers()
    assert not partial.exists() and store.codec_files() == []


def test_a_ratio_that_would_enlarge_an_upload_is_refused(tmp_path, tiny_model, monkeypatch):
    """A small adapter block (r = 1: 448 values) padded to multiples of 512 is a 512 x 1024 image, whose
    latent (1,024 values) is bigger than the block. (The 1/512 autoencoder itself is not built: it is
    28M parameters; its weights are not needed to size the upload.)"""
    from fedblock.common.codecs import Autoencoder
    from fedblock.server import daemon

    monkeypatch.setattr(Autoencoder, "bind", lambda self, weights: None)
    weights = tmp_path / "ae.safetensors"
    weights.write_bytes(b"unused")
    config = CoordinatorConfig(model=str(tiny_model), state_dir=tmp_path / "s", insecure=True, algorithm="fedavg",
                               codec="ae:512", codec_weights=weights, **{**LORA, "lora_r": 1})
    with pytest.raises(ConfigError, match=r"would make lora.layers.0's upload larger \(4100 bytes against 1792\)"):
        daemon.build(config)
