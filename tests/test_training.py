"""Local training is deterministic with dropout on: every random draw of a step is seeded from
(worker seed, round, step), so a round's update is a function of the global model and the assignment."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import queue
import threading

import pytest
import torch

from fedblock.client.compute import ComputeLoop
from fedblock.client.metrics import WorkerMetrics
from fedblock.client.state import ModelBook
from fedblock.client.timeline import Timeline
from fedblock.common import blocks as B
from fedblock.common.data import BatchStream, Example, tokenize
from fedblock.common.messages import Assignment
from fedblock.common.models import load_model, load_tokenizer, make_tiny_model
from fedblock.common.training import BlockTrainer, OptimConfig

LR = 3e-3
EXAMPLES = [Example((("user", f"What is {i} plus {i}?"), ("assistant", f"It is {2 * i}."))) for i in range(16)]


@pytest.fixture(scope="module", params=["gpt2", "opt"])  # both have dropout 0.1
def tiny(request, tmp_path_factory):
    """(model folder, tokenized data) of a tiny model of a family with dropout."""
    path = make_tiny_model(tmp_path_factory.mktemp(request.param) / "m", request.param, num_layers=2, hidden_size=32)
    tokenizer = load_tokenizer(path)
    return path, tokenize(EXAMPLES, tokenizer, 64), tokenizer.pad_token_id


def compute_loop(tiny, dropout: bool = True) -> ComputeLoop:
    """A worker's compute loop on freshly loaded weights (worker seed 7); `dropout=False`: in eval mode."""
    path, data, pad_id = tiny
    model = load_model(path)
    model_blocks = B.partition(model)
    trainer = BlockTrainer(model, model_blocks, OptimConfig())  # puts the model in train mode
    if not dropout:
        model.eval()
    return ComputeLoop(model, model_blocks, trainer, BatchStream(data, 4, 7, pad_id), ModelBook(), queue.Queue(),
                       queue.Queue(), 0, WorkerMetrics(), threading.Event(), Timeline("w"))


def worker_round(tiny, round: int, steps: int = 3, dropout: bool = True, loop: ComputeLoop | None = None) -> dict:
    """The delta of one assignment (block layers.0) run through a worker's compute loop."""
    update = (loop or compute_loop(tiny, dropout))._local_steps(Assignment(round, ("layers.0",), steps, LR, 0))
    return {n: t for tensors in update.deltas.values() for n, t in tensors.items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_a_round_run_twice_gives_the_same_delta(tiny):
    torch.manual_seed(1)
    first = worker_round(tiny, round=3)
    torch.rand(1000)  # the global generator is elsewhere now: the round must not depend on it
    second = worker_round(tiny, round=3)
    assert max(t.abs().max().item() for t in first.values()) > 0
    assert_same(first, second)


def test_seeded_steps_draw_their_own_dropout_masks(tiny):
    """With lr 0 the weights stay put, so a step's loss on a fixed batch differs only by its dropout masks."""
    path, data, pad_id = tiny
    model = load_model(path)
    trainer = BlockTrainer(model, B.partition(model), OptimConfig())
    trainer.begin_round(["layers.0"])
    batch = next(BatchStream(data, 4, 0, pad_id).round(1))

    def loss(key):
        return trainer.step(batch, 0.0, seed=key).loss

    state = torch.get_rng_state()
    keys = [(0, 1, 0), (0, 1, 1), (0, 2, 0), (1, 1, 0)]  # (worker seed, round, step)
    losses = [loss(k) for k in keys]
    assert torch.equal(torch.get_rng_state(), state)  # seeding leaves the global generator as it was
    assert [loss(k) for k in keys] == losses  # the same key, the same masks
    assert len(set(losses)) == len(keys)  # another step, round or worker seed: other masks
    model.eval()
    no_dropout = [loss(k) for k in keys]
    assert len(set(no_dropout)) == 1 and no_dropout[0] not in losses  # dropout really was on


def test_dropout_stays_on_in_a_round(tiny):
    on, off = worker_round(tiny, round=3), worker_round(tiny, round=3, dropout=False)
    assert any(not torch.equal(on[n], off[n]) for n in on)


def test_workers_training_in_threads_of_one_process_keep_their_own_masks(tiny):
    """torch's generators are global: concurrent seeded steps (workers as threads, as in the tests)
    must not draw from each other's seeded streams."""
    alone = worker_round(tiny, round=3, steps=20)
    loops = [compute_loop(tiny) for _ in range(3)]  # loading models is not thread-safe; training is
    out = [None] * len(loops)

    def run(i):
        out[i] = worker_round(tiny, round=3, steps=20, loop=loops[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(loops))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for delta in out:
        assert_same(delta, alone)


def test_checkpointed_layers_of_smollm2():
    """The memory estimate behind --gradient-checkpointing auto, on SmolLM2-135M's sizes at batch 8 x 128
    (fp32): the bottom layer and the embedding need part of the layers above them recomputed, the middle
    and top layers none (benchmarks/memory.py measures the result)."""
    from types import SimpleNamespace

    from fedblock.common.training import checkpointed_layers

    config = SimpleNamespace(hidden_size=576, intermediate_size=1536, vocab_size=49152, num_hidden_layers=30)
    total, layer, embed = 134_515_008, 3_540_096, 28_311_552
    counts = {name: checkpointed_layers(config, total, trainable, above, 1024, 4)
              for name, trainable, above in (("bottom", layer, 30), ("middle", layer, 15), ("top", layer, 1),
                                             ("embed", embed, 30))}
    assert counts["middle"] == counts["top"] == 0
    assert 0 < counts["bottom"] < counts["embed"] < 30
    assert checkpointed_layers(config, total, layer, 30, 1024, 4, target=0.0) == 30  # as many as there are


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_checkpointing_changes_no_number(tiny_model, mode, monkeypatch):
    """Recomputing layers in the backward pass gives the same steps as keeping their activations, whichever
    layers recompute (auto is forced to a part of them here)."""
    from fedblock.common import training
    from fedblock.common.blocks import partition
    from fedblock.common.models import load_model
    from fedblock.common.training import BlockTrainer, OptimConfig

    monkeypatch.setattr(training, "checkpointed_layers", lambda *a, **k: 2)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(0, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    results = {}
    for m in ("off", mode):
        model = load_model(tiny_model)
        blocks = partition(model)
        trainer = BlockTrainer(model, blocks, OptimConfig(gradient_checkpointing=m))
        trainer.begin_round(["layers.1"])
        losses = [trainer.step(batch, 1e-3).loss for _ in range(3)]
        results[m] = (losses, {n: p.detach().clone() for n, p in model.named_parameters()}, trainer.checkpointed)
    assert results[mode][2] == (3 if mode == "on" else 2)  # layers 1..3 of 4 run backward
    assert results["off"][0] == pytest.approx(results[mode][0], abs=1e-6)
    for n, p in results["off"][1].items():
        assert torch.allclose(p, results[mode][1][n], atol=1e-6), n


def test_gradient_checkpointing_option_words():
    from fedblock.common.cli import make_parser, parse_configs

    def value(*args, env=None):
        argv = ["worker", "--coordinator", "h:1", "--name", "w", "--data", "d", *args]
        return parse_configs("worker", make_parser().parse_args(argv), env=env or {})[0].gradient_checkpointing

    assert value() == "auto" and value("--gradient-checkpointing") == "on"
    assert value("--gradient-checkpointing", "1") == value("--gradient-checkpointing", "yes") == "on"
    assert value("--gradient-checkpointing", "no") == value("--gradient-checkpointing", "off") == "off"
    assert value(env={"FEDBLOCK_GRADIENT_CHECKPOINTING": "TRUE"}) == "on"
    with pytest.raises(ValueError, match="auto, on or off"):
        value("--gradient-checkpointing", "sometimes")
