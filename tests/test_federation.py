"""The federation adds no error of its own: real gRPC on loopback, real worker code, tiny model."""

import pytest
import torch
from conftest import train_every_block

from fedblock.common import blocks as B
from fedblock.common.data import BatchStream, load_examples, tokenize
from fedblock.common.models import load_model, load_tokenizer
from fedblock.common.scheduler import assign_blocks
from fedblock.common.training import BlockTrainer, OptimConfig

ROUNDS, STEPS, LR = 6, 3, 3e-3


def centralised(model_dir, data_file, rounds, steps, lr, seed=0, batch_size=4, max_seq_len=64):
    """Plain block-coordinate training on one machine with the worker's data order. At the end of each
    round the block's change is taken as a delta (`take_delta_`), the float32 rounding every delta
    exchange has; nothing else of the federation is modelled."""
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    blocks = B.partition(model)
    names = [b.name for b in blocks]
    stream = BatchStream(tokenize(load_examples(str(data_file)), tokenizer, max_seq_len), batch_size, seed,
                         tokenizer.pad_token_id)
    trainer = BlockTrainer(model, blocks, OptimConfig())
    for t in range(1, rounds + 1):
        (block,) = assign_blocks("round-robin", t, {"w": 0}, names, 0)["w"]
        trainer.begin_round([block])
        start = B.snapshot(B.block_params(model, blocks[names.index(block)]))
        batches = stream.round(t)
        for _ in range(steps):
            trainer.step(next(batches), lr)
        B.take_delta_(B.block_params(model, blocks[names.index(block)]), start)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def global_params(coordinator):
    return {n: t for tensors in coordinator.global_model.tensors.values() for n, t in tensors.items()}


def one_worker_run(federation, data_file, algorithm):
    fed = federation(algorithm=algorithm, rounds=ROUNDS, local_steps=STEPS, lr=LR, codec="none")
    fed.add_worker(fed.worker_config("solo", data_file))
    summary = fed.run()
    assert summary["rounds_completed"] == ROUNDS
    outcome = fed.outcomes["solo"]
    assert outcome.finished and outcome.steps == ROUNDS * STEPS
    if algorithm == "fedbcd":
        assert outcome.rounds_ahead == 0
    else:  # ParaBlock really overlapped: rounds 2.. started before the previous global model arrived
        assert outcome.rounds_ahead >= ROUNDS // 2
    return global_params(fed.coordinator)


def test_fedbcd_parablock_and_centralised_training_agree(federation, tiny_model, data_file):
    reference = centralised(tiny_model, data_file, ROUNDS, STEPS, LR)
    initial = {n: p.detach() for n, p in load_model(tiny_model).named_parameters()}
    fedbcd = one_worker_run(federation, data_file, "fedbcd")
    parablock = one_worker_run(federation, data_file, "parablock")
    moved = max((reference[n] - initial[n]).abs().max().item() for n in reference)
    assert moved > 1e-3  # training really changed the weights, so agreement below means something
    for name in reference:
        torch.testing.assert_close(fedbcd[name], reference[name], rtol=0, atol=0, msg=f"fedbcd {name}")
        torch.testing.assert_close(parablock[name], reference[name], rtol=0, atol=0, msg=f"parablock {name}")


@pytest.mark.parametrize("algorithm", ["fedbcd", "parablock"])
def test_only_assigned_blocks_change(federation, tiny_model, data_file, algorithm):
    fed = federation(algorithm=algorithm, rounds=3, local_steps=2, lr=1e-3, block_schedule="round-robin",
                     train_blocks="layers.*", min_workers=2)
    fed.add_worker(fed.worker_config("a", data_file, seed=1))
    fed.add_worker(fed.worker_config("b", data_file, seed=2))
    summary = fed.run()
    assert summary["rounds_completed"] == 3 and summary["updates_accepted"] == 6
    initial = load_model(tiny_model)
    blocks = B.partition(initial)
    final = fed.coordinator.global_model
    assigned = {"layers.0", "layers.1", "layers.2"}  # round-robin over layers.* for 3 rounds
    for block in blocks:
        changed = any(not torch.equal(final.tensors[block.name][n], p.detach())
                      for n, p in B.block_params(initial, block).items())
        assert changed == (block.name in assigned), block.name
        assert final.block_versions[block.name] == (int(block.name.split(".")[1]) + 1 if block.name in assigned else 0)


def test_fedavg_with_one_worker_is_full_fine_tuning(federation, tiny_model, data_file):
    """fedavg assigns every block to every worker; with one worker it is centralised full fine-tuning
    (AdamW over all parameters, a fresh state each round)."""
    model = load_model(tiny_model)
    blocks = B.partition(model)
    reference = train_every_block(model, blocks, tiny_model, data_file, 3, STEPS, LR)

    fed = federation(algorithm="fedavg", rounds=3, local_steps=STEPS, lr=LR)
    fed.add_worker(fed.worker_config("solo", data_file))
    summary = fed.run()
    assert summary["updates_accepted"] == 3 * len(blocks)
    got = global_params(fed.coordinator)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=0, msg=name)
    assert all(v == 3 for v in fed.coordinator.global_model.block_versions.values())


def test_fedavg_averages_whole_models_by_tokens(federation, data_file, tmp_path):
    fed = federation(algorithm="fedavg", rounds=2, local_steps=2, lr=1e-3, min_workers=2)
    fed.add_worker(fed.worker_config("a", data_file, seed=1))
    fed.add_worker(fed.worker_config("b", data_file, seed=2))
    summary = fed.run()
    n_blocks = len(fed.coordinator.block_order)
    assert summary["updates_accepted"] == 2 * 2 * n_blocks
    model_bytes = sum(spec.numel * 4 for spec in fed.coordinator.specs.values())
    assert summary["bytes_up"] > 2 * 2 * model_bytes  # whole-model deltas up, every round, every worker
