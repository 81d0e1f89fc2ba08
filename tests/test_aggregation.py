"""Aggregation: the streaming token-weighted mean (common/aggregation.py), alone and in a fedavg round.

README, How a round works: updates are weighted by training tokens, averaged streaming in float32, and the
coordinator never holds N copies of a block. The unit tests check RoundSums against Σ wᵢΔᵢ / Σ wᵢ
computed in float64; the federation test checks that a real fedavg round weights each worker's
delta by the tokens it trained on, by recomputing both workers' deltas and token counts centrally.
"""

from __future__ import annotations

import threading

import pytest
import torch

from fedblock.common import blocks as B
from fedblock.common.aggregation import RoundSums, apply_mean
from fedblock.common.data import BatchStream, Example, load_examples, tokenize, write_jsonl
from fedblock.common.models import load_model, load_tokenizer
from fedblock.common.training import BlockTrainer, OptimConfig

SHAPES = {"w": (7, 5), "b": (5,), "n": (3, 2, 4)}


def deltas(seed: int, count: int, scale: float = 1e-3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # Different magnitudes per update, as real workers' deltas have (a plain mean would then be off).
    return [{n: scale * (i + 1) * torch.randn(shape, generator=g) for n, shape in SHAPES.items()} for i in range(count)]


def weighted_mean64(ds: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    total = sum(weights)
    return {n: sum(w * d[n].double() for d, w in zip(ds, weights, strict=True)) / total for n in ds[0]}


def assert_float32_close(got: dict[str, torch.Tensor], want64: dict[str, torch.Tensor], what: str) -> None:
    """Within float32 rounding: a few ulps of the largest term (the lerp rounds once per update)."""
    assert sorted(got) == sorted(want64), what
    for n, want in want64.items():
        assert got[n].dtype == torch.float32, (what, n, got[n].dtype)
        scale = max(want.abs().max().item(), 1e-30)
        err = (got[n].double() - want).abs().max().item()
        assert err <= 8 * torch.finfo(torch.float32).eps * scale, f"{what}: {n}: off by {err:.3g} ({err / scale:.3g} relative)"


@pytest.mark.parametrize("adopt", [False, True])
def test_running_mean_with_unequal_weights(adopt):
    ds = deltas(seed=0, count=3)
    weights = [1.0, 3.0, 7.5]
    originals = [{n: t.clone() for n, t in d.items()} for d in ds]
    sums = RoundSums()
    adopted = [sums.add("layers.0", d, w, adopt=adopt and i == 0, owner="buffer" if adopt and i == 0 else None)
               for i, (d, w) in enumerate(zip(ds, weights, strict=True))]
    assert adopted == [adopt, False, False]
    assert sums.blocks == ["layers.0"]
    mean = sums.mean("layers.0")
    assert_float32_close(mean, weighted_mean64(originals, weights), f"adopt={adopt}")
    # Not the plain mean, nor the first or last delta: the weights matter at this tolerance.
    plain = weighted_mean64(originals, [1.0, 1.0, 1.0])
    assert max((mean[n].double() - plain[n]).abs().max().item() for n in mean) > 1e-4
    if adopt:  # the first delta's tensors became the accumulator (no copy), and its owner is kept
        assert all(mean[n].data_ptr() == ds[0][n].data_ptr() for n in mean)
        assert sums.owners == ["buffer"]
    else:  # the caller's tensors are left alone
        assert all(torch.equal(d[n], o[n]) for d, o in zip(ds, originals, strict=True) for n in d)
        assert sums.owners == []
    for d in ds[1:]:  # later deltas are only read, whatever `adopt` was
        assert all(mean[n].data_ptr() != d[n].data_ptr() for n in mean)
    assert all(torch.equal(d[n], o[n]) for d, o in zip(ds[1:], originals[1:], strict=True) for n in d)


def test_one_update_is_its_own_mean_bit_for_bit():
    (d,) = deltas(seed=1, count=1)
    for adopt in (False, True):
        sums = RoundSums()
        sums.add("head", {n: t.clone() for n, t in d.items()}, 123.0, adopt=adopt)
        for n in d:
            assert torch.equal(sums.mean("head")[n], d[n]), (adopt, n)


def test_blocks_are_averaged_separately_with_their_own_weights():
    a, b = deltas(seed=2, count=2), deltas(seed=3, count=2)
    sums = RoundSums()
    sums.add("layers.0", a[0], 2.0)
    sums.add("layers.1", b[0], 5.0)
    sums.add("layers.0", a[1], 6.0)
    sums.add("layers.1", b[1], 1.0)
    assert sorted(sums.blocks) == ["layers.0", "layers.1"]
    assert_float32_close(sums.mean("layers.0"), weighted_mean64(a, [2.0, 6.0]), "layers.0")
    assert_float32_close(sums.mean("layers.1"), weighted_mean64(b, [5.0, 1.0]), "layers.1")


def test_concurrent_adds_give_the_weighted_mean():
    """`add` is thread-safe: updates folded in from several threads at once still give Σ wᵢΔᵢ / Σ wᵢ
    (in some order: float32 rounding may differ from the sequential result, within tolerance)."""
    ds = deltas(seed=4, count=12)
    weights = [float(1 + (i * 7) % 5) + 0.25 * i for i in range(len(ds))]
    sums = RoundSums()
    start = threading.Barrier(len(ds))

    def add(i: int) -> None:
        start.wait(timeout=30)
        sums.add("embed", ds[i], weights[i])

    threads = [threading.Thread(target=add, args=(i,)) for i in range(len(ds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert_float32_close(sums.mean("embed"), weighted_mean64(ds, weights), "concurrent")


def test_weights_must_be_positive():
    (d,) = deltas(seed=5, count=1)
    sums = RoundSums()
    for w in (0.0, -1.0):
        with pytest.raises(ValueError):
            sums.add("layers.0", d, w)
    assert sums.blocks == []


def test_apply_mean_adds_in_float32_and_leaves_the_old_version_alone():
    g = {"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(6)), "h": torch.ones(3, dtype=torch.bfloat16)}
    mean = {"w": torch.full((4, 3), 1e-3), "h": torch.full((3,), 0.5)}
    old = {n: t.clone() for n, t in g.items()}
    new = apply_mean(g, mean)
    assert torch.equal(new["w"], g["w"] + mean["w"]) and new["w"].dtype == torch.float32
    assert new["h"].dtype == torch.bfloat16 and torch.equal(new["h"], torch.full((3,), 1.5, dtype=torch.bfloat16))
    assert all(torch.equal(g[n], old[n]) for n in g)


# ---- a fedavg round weighs each worker's delta by its training tokens -----------------------------

STEPS, LR, SEQ = 3, 3e-3, 64
# Different data, batch sizes and reply lengths, so that the workers' token counts differ a lot (and in
# another ratio than their example counts, 8 : 40, which a weighting by examples would use).
WORKERS = {
    "a": dict(examples=8, batch_size=2, seed=1, long=False),
    "b": dict(examples=40, batch_size=6, seed=2, long=True),
}


def worker_examples(n: int, long: bool) -> list[Example]:
    if long:
        return [Example((("user", f"Explain how to add {i} and {i + 3}."),
                         ("assistant", f"Start from {i}, count three more: {i + 1}, {i + 2}, {i + 3}; "
                                       f"so {i} plus {i + 3} makes {2 * i + 3} in the end.")))
                for i in range(n)]
    return [Example((("user", f"{i} + 1?"), ("assistant", f"That is {i + 1}."))) for i in range(n)]


def central_round(model_dir, data, batch_size: int, seed: int) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """One fedavg round 1 of a worker, trained here from the initial model with the worker's code
    path (BlockTrainer over every block, the worker's batches for round 1, take_delta_): the deltas it
    uploads, per block, and the training tokens it reports."""
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    blocks = B.partition(model)
    stream = BatchStream(tokenize(load_examples(str(data)), tokenizer, SEQ), batch_size, seed, tokenizer.pad_token_id)
    trainer = BlockTrainer(model, blocks, OptimConfig())
    trainer.begin_round([b.name for b in blocks])
    start = {b.name: B.snapshot(B.block_params(model, b)) for b in blocks}
    batches = stream.round(1)
    tokens = sum(trainer.step(next(batches), LR, seed=(seed, 1, k)).tokens for k in range(STEPS))  # as a worker seeds
    return {b.name: B.take_delta_(B.block_params(model, b), start[b.name]) for b in blocks}, tokens


def test_fedavg_round_is_the_token_weighted_mean_of_the_workers_deltas(federation, tiny_model, tmp_path):
    """Two fedavg workers over real gRPC, one round. Each one's whole-model delta and token count are
    recomputed here (a worker's round is a function of the global model and its assignment: see
    tests/test_federation.py, where one worker matches centralised training bit for bit); the new global
    model must be g + Σ nᵢΔᵢ / Σ nᵢ within float32 rounding, and far from any other weighting. The
    coordinator's round plan must hold the same token counts (read as the round closes)."""
    files = {}
    for name, w in WORKERS.items():
        files[name] = tmp_path / f"{name}.jsonl"
        write_jsonl(worker_examples(w["examples"], w["long"]), files[name])
    central = {name: central_round(tiny_model, files[name], w["batch_size"], w["seed"]) for name, w in WORKERS.items()}
    tokens = {name: n for name, (_, n) in central.items()}
    share = tokens["a"] / (tokens["a"] + tokens["b"])
    examples_share = WORKERS["a"]["examples"] / sum(w["examples"] for w in WORKERS.values())
    assert abs(share - 0.5) > 0.2 and abs(share - examples_share) > 0.02, tokens  # the weighting shows

    fed = federation(algorithm="fedavg", rounds=1, local_steps=STEPS, lr=LR, min_workers=2, codec="none")
    trained = {}
    rounds, close = fed.coordinator.rounds, fed.coordinator.rounds.close

    def record(plan, available):  # the round plan's tokens per worker, as the round closes
        trained[plan.round] = {w: t for w, (t, _) in plan.trained.items()}
        return close(plan, available)

    rounds.close = record
    for name, w in WORKERS.items():
        fed.add_worker(fed.worker_config(name, files[name], seed=w["seed"], batch_size=w["batch_size"], max_seq_len=SEQ))
    summary = fed.run(timeout=60)
    n_blocks = len(fed.coordinator.block_order)
    assert summary["rounds_completed"] == 1 and summary["updates_accepted"] == 2 * n_blocks
    assert all(fed.outcomes[name].finished and fed.outcomes[name].error is None for name in WORKERS)
    # The tokens the coordinator weighted by are the ones the workers trained on.
    assert trained == {1: tokens}
    assert summary["round_history"][0]["tokens"] == sum(tokens.values())

    model = load_model(tiny_model)
    initial = {b.name: {n: p.detach().clone() for n, p in B.block_params(model, b).items()} for b in B.partition(model)}
    g1 = fed.coordinator.global_model
    assert g1.version == 1 and set(g1.block_versions.values()) == {1}

    def expected(weights: dict[str, float]) -> dict[str, dict[str, torch.Tensor]]:
        total = sum(weights.values())
        return {b: {n: g.double() + sum(weights[w] * central[w][0][b][n].double() for w in WORKERS) / total
                    for n, g in tensors.items()} for b, tensors in initial.items()}

    # float32 rounding of g + Σ wᵢΔᵢ / Σ wᵢ (a few roundings of terms no larger than |g| and the |Δᵢ|):
    # errors are measured in units of eps · (|g| + Σ|Δᵢ|), element by element.
    scale = {b: {n: (g.double().abs() + sum(central[w][0][b][n].double().abs() for w in WORKERS)).clamp_min(1e-30)
                 for n, g in tensors.items()} for b, tensors in initial.items()}

    def worst(want: dict[str, dict[str, torch.Tensor]]) -> float:
        eps = torch.finfo(torch.float32).eps
        return max(((g1.tensors[b][n].double() - t).abs() / (eps * scale[b][n])).max().item()
                   for b, tensors in want.items() for n, t in tensors.items())

    by_tokens = worst(expected({w: float(t) for w, t in tokens.items()}))
    assert by_tokens <= 4, f"the new global is {by_tokens:.1f} eps from the token-weighted mean"
    # Another weighting would be far off: equal weights, or by example counts.
    by_workers = worst(expected({w: 1.0 for w in WORKERS}))
    by_examples = worst(expected({w: float(WORKERS[w]["examples"]) for w in WORKERS}))
    print(f"\ntokens {tokens}: off by {by_tokens:.2f} eps from the token-weighted mean, {by_workers:.0f} from the "
          f"plain mean, {by_examples:.0f} from the mean weighted by examples")
    assert by_workers > 1000 * max(by_tokens, 1) and by_examples > 100 * max(by_tokens, 1)
