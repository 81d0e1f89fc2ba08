"""The ParaBlock rebase, end to end on the worker's compute thread, checked number for number.

A worker trains block b of round t from start values s (the global model it held, one round stale), and
the new global model of round t-1 arrives mid-round. The patch is applied at the next step boundary:
the other blocks in it are replaced, and b is rebased, w <- w + (g - s), s <- g (README, How a round works: the
worker keeps its own progress w - s, now on top of the new global g). The update it hands over is then
Δ = w_final - g: its progress, on the base version of the patch.

The compute thread (client/compute.py ComputeLoop) runs on its own thread with real queues; the test
is deterministic all the same: the patch enters the inbox when the round's batch PATCH_AT is drawn (a
BatchStream wrapper), so it is drained at the boundary before step PATCH_AT + 1, whatever the timing.
The expectation is computed by hand on a second copy of the model, with the same trainer, batches and
optimizer, the rebase written out as plain tensor arithmetic.
"""

from __future__ import annotations

import queue
import threading

import pytest
import torch

from fedblock.client.compute import ComputeLoop
from fedblock.client.metrics import WorkerMetrics
from fedblock.client.state import ModelBook, Patch, Update
from fedblock.client.timeline import Timeline
from fedblock.common import blocks as B
from fedblock.common.data import BatchStream, load_examples, tokenize
from fedblock.common.messages import Assignment
from fedblock.common.models import load_model, load_tokenizer
from fedblock.common.training import BlockTrainer, OptimConfig

TRAINED, OTHER = "layers.1", "layers.0"  # OTHER lies below TRAINED: replacing it changes TRAINED's gradients
ROUND, STEPS, LR, SEED, BATCH, SEQ = 2, 5, 1e-3, 3, 4, 64
PATCH_AT = 1  # the patch is in the inbox once batch 1 is drawn: steps 0-1 before it, 2-4 after
PATCH_VERSION = ROUND - 1  # the global model of round 1 arrives while the worker trains round 2
TIMEOUT_S = 60


def stream_of(model_dir, data_file) -> BatchStream:
    tokenizer = load_tokenizer(model_dir)
    return BatchStream(tokenize(load_examples(str(data_file)), tokenizer, SEQ), BATCH, SEED, tokenizer.pad_token_id)


class PatchAt:
    """A BatchStream whose round puts `patch` into `inbox` as batch `k` is handed out: the compute
    thread trains step k without it and drains it at the next step boundary."""

    def __init__(self, stream: BatchStream, k: int, inbox: queue.Queue, patch: Patch):
        self.stream, self.k, self.inbox, self.patch = stream, k, inbox, patch
        self.put = 0

    def __getattr__(self, name: str):  # seed, batch_size, ...: the wrapped stream's
        return getattr(self.stream, name)

    def round(self, r: int):
        for i, batch in enumerate(self.stream.round(r)):
            if i == self.k:
                self.inbox.put(self.patch)
                self.put += 1
            yield batch


def block_of(model, name: str) -> dict[str, torch.nn.Parameter]:
    return B.block_params(model, next(b for b in B.partition(model) if b.name == name))


def values(model, name: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in block_of(model, name).items()}


def perturbed(tensors: dict[str, torch.Tensor], seed: int, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    """A stand-in for the new global copy of a block: the old one moved by what other workers did."""
    g = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=g) for n, t in sorted(tensors.items())}


def run_compute_loop(model_dir, data_file, patch: Patch | None) -> tuple[Update, object, ModelBook]:
    """One round of ComputeLoop on a worker that holds version 0 (depth 1: it may train round 2 on it),
    with `patch` arriving after step PATCH_AT. Returns (the update it handed over, its model, its book)."""
    model = load_model(model_dir)
    blocks = B.partition(model)
    trainer = BlockTrainer(model, blocks, OptimConfig())
    inbox: queue.Queue = queue.Queue()
    outbox: queue.Queue = queue.Queue(1)
    stream = stream_of(model_dir, data_file)
    if patch is not None:
        stream = PatchAt(stream, PATCH_AT, inbox, patch)
    book = ModelBook(version=0, block_versions={b.name: 0 for b in blocks})
    stop = threading.Event()
    loop = ComputeLoop(model, blocks, trainer, stream, book, inbox, outbox, depth=1, metrics=WorkerMetrics(),
                       stop=stop, timeline=Timeline("w"))
    inbox.put(Assignment(ROUND, (TRAINED,), STEPS, LR, ROUND - 1))
    thread = threading.Thread(target=loop.run, name="compute", daemon=True)
    thread.start()
    try:
        update = outbox.get(timeout=TIMEOUT_S)
    except queue.Empty:
        raise AssertionError(f"no update from the compute thread within {TIMEOUT_S} s (error: {loop.error!r})") from None
    finally:
        stop.set()
        thread.join(TIMEOUT_S)
    assert not thread.is_alive(), "the compute thread did not stop"
    assert loop.error is None, loop.error
    assert loop.steps_done == STEPS and loop.rounds_done == 1
    if patch is not None:
        assert stream.put == 1
        assert inbox.empty()  # the patch was taken (in the round, as checked below by the numbers)
    return update, model, book


def by_hand(model_dir, data_file, patch: Patch | None, at: int = PATCH_AT) -> tuple[dict, int, float, object]:
    """The same round without the compute loop: steps on the worker's batches, and after step `at` the
    patch applied as the README says, written out: other blocks replaced, the trained one rebased.
    Returns (Δ of the trained block, tokens, token-weighted loss, the model)."""
    model = load_model(model_dir)
    trainer = BlockTrainer(model, B.partition(model), OptimConfig())
    batches = stream_of(model_dir, data_file).round(ROUND)
    trainer.begin_round([TRAINED])
    w = block_of(model, TRAINED)
    s = {n: p.detach().clone() for n, p in w.items()}
    tokens, loss_sum = 0, 0.0
    for k in range(STEPS):
        result = trainer.step(next(batches), LR, seed=(SEED, ROUND, k))  # as the worker seeds step k
        tokens += result.tokens
        loss_sum += result.loss * result.tokens
        if patch is not None and k == at:
            with torch.no_grad():
                for name, g in patch.blocks.items():
                    if name == TRAINED:
                        for n, p in w.items():
                            p.add_(g[n] - s[n])  # w <- w + (g - s): progress kept, on top of g
                            s[n] = g[n].clone()  # s <- g
                    else:
                        for n, p in block_of(model, name).items():
                            p.copy_(g[n])
    delta = {n: p.detach() - s[n] for n, p in w.items()}
    return delta, tokens, loss_sum / tokens, model


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), what
    for n in want:
        assert got[n].dtype == torch.float32, (what, n, got[n].dtype)
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=0, msg=lambda m, n=n: f"{what}: {n}: {m}")


def max_abs(tensors: dict[str, torch.Tensor]) -> float:
    return max(t.abs().max().item() for t in tensors.values())


@pytest.fixture(scope="module")
def unpatched(tiny_model, data_file):
    return run_compute_loop(tiny_model, data_file, None)


def test_without_a_patch_the_update_is_the_plain_round(tiny_model, data_file, unpatched):
    """The reference the other tests build on: no patch, so Δ is the steps' progress from s, on the
    version the worker held when it started."""
    update, _, book = unpatched
    delta, tokens, loss, _ = by_hand(tiny_model, data_file, None)
    assert update.round == ROUND and sorted(update.deltas) == [TRAINED]
    assert update.base_version == 0 and book.version == 0
    assert update.tokens == tokens and update.loss == pytest.approx(loss, rel=1e-12)
    assert_same(update.deltas[TRAINED], delta, "unpatched delta")
    assert max_abs(delta) > 1e-4  # the round really trained


def test_a_patch_equal_to_the_start_values_changes_nothing(tiny_model, data_file, unpatched):
    """g = s: the new global copy of the trained block is the one the round started from. Rebasing on
    it must be a no-op, bit for bit (progress w - s moved onto the same s), so the update equals the
    unpatched one; only its base version says that the worker is now on the patch's version."""
    initial = load_model(tiny_model)
    same = values(initial, TRAINED)
    patch = Patch(PATCH_VERSION, {TRAINED: PATCH_VERSION}, {TRAINED: same})
    update, model, book = run_compute_loop(tiny_model, data_file, patch)
    reference, _, _ = unpatched
    assert_same(update.deltas[TRAINED], reference.deltas[TRAINED], "delta after an identity patch")
    assert update.tokens == reference.tokens and update.loss == reference.loss
    assert update.base_version == PATCH_VERSION
    assert book.version == PATCH_VERSION and book.block_versions[TRAINED] == PATCH_VERSION
    # What the worker holds of the block afterwards is s + Δ (take_delta_'s rounding, as the coordinator's).
    for n, p in block_of(model, TRAINED).items():
        torch.testing.assert_close(p.detach(), same[n] + update.deltas[TRAINED][n], rtol=0, atol=0, msg=n)


def test_a_new_global_copy_of_the_trained_block_is_rebased_mid_round(tiny_model, data_file, unpatched):
    """g != s for the trained block, and a new copy of a block below it: the update is Δ = w_final - g,
    bit for bit the hand computation (steps 0..PATCH_AT from s on the old model, then the rebase and the
    replacement, then the remaining steps with the same AdamW state); its base version is the patch's."""
    initial = load_model(tiny_model)
    g_trained = perturbed(values(initial, TRAINED), seed=1)
    g_other = perturbed(values(initial, OTHER), seed=2)
    patch = Patch(PATCH_VERSION, {TRAINED: PATCH_VERSION, OTHER: PATCH_VERSION}, {TRAINED: g_trained, OTHER: g_other})
    update, model, book = run_compute_loop(tiny_model, data_file, patch)
    delta, tokens, loss, hand_model = by_hand(tiny_model, data_file, patch)

    assert update.round == ROUND and sorted(update.deltas) == [TRAINED]
    assert update.base_version == PATCH_VERSION
    assert book.version == PATCH_VERSION
    assert book.block_versions == {b.name: PATCH_VERSION if b.name in (TRAINED, OTHER) else 0 for b in B.partition(model)}
    assert update.tokens == tokens and update.loss == pytest.approx(loss, rel=1e-12)
    assert_same(update.deltas[TRAINED], delta, "rebased delta")
    # The block not being trained was replaced, not rebased; the trained one ends at g + Δ.
    assert_same(values(model, OTHER), g_other, "replaced block")
    for n, p in block_of(model, TRAINED).items():
        torch.testing.assert_close(p.detach(), g_trained[n] + update.deltas[TRAINED][n], rtol=0, atol=0, msg=n)
    # The rest of the model is untouched, and as the hand computation has it.
    for b in B.partition(model):
        if b.name not in (TRAINED, OTHER):
            assert_same(values(model, b.name), values(initial, b.name), b.name)
            assert_same(values(model, b.name), values(hand_model, b.name), b.name)

    # The numbers say something: the delta is the worker's progress, not the patch's change (the
    # perturbation is larger than the progress), it differs from the unpatched round (the later steps
    # ran on the new values of OTHER and TRAINED), and from the same patch applied a step later.
    reference, _, _ = unpatched
    change = {n: g_trained[n] - v for n, v in values(initial, TRAINED).items()}
    assert max_abs({n: update.deltas[TRAINED][n] - reference.deltas[TRAINED][n] for n in delta}) < 0.5 * max_abs(change)
    assert not all(torch.equal(update.deltas[TRAINED][n], reference.deltas[TRAINED][n]) for n in delta)
    later, _, _, _ = by_hand(tiny_model, data_file, patch, at=PATCH_AT + 1)
    assert not all(torch.equal(update.deltas[TRAINED][n], later[n]) for n in delta)
