"""The GPU path of a worker's delta (blocks.to_host_async, HostCopy) and benchmarks/gpu_check.py.

On the CPU nothing is copied: the update carries the very tensors take_delta_ made. On a GPU (the tests
marked so skip without one) the delta goes to pinned host memory on a side stream, ordered after the
work that computes it, while the compute thread goes on; the reader waits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedblock.client.comm import Outgoing
from fedblock.client.state import Update
from fedblock.common import blocks as B
from fedblock.common.algorithms.base import Local
from fedblock.common.algorithms.blockwise import BlockDescent
from fedblock.common.codecs import CodecPipeline
from fedblock.common.messages import Assignment
from fedblock.common.training import BlockTrainer

ROOT = Path(__file__).resolve().parent.parent
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu_check.py checks it on one)")


def test_cpu_tensors_are_handed_over_as_they_are():
    start = {"w": torch.randn(4, 3).to(torch.bfloat16)}
    current = {"w": (start["w"].float() + 0.01).to(torch.bfloat16)}
    expected = current["w"].float() - start["w"].float()
    delta = B.take_delta_(current, start)
    assert B.to_host_async(delta) is delta  # no copy, no wrapper
    assert delta["w"].dtype == torch.float32 and torch.equal(delta["w"], expected)


class _Stream:
    """Batches of a fixed random-walk stream for any round (what BlockDescent.run reads)."""

    seed = 0

    def round(self, round):
        g = torch.Generator().manual_seed(round)
        while True:
            ids = torch.randint(1, 64, (2, 16), generator=g)
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_block_descent_update_on_cpu_is_plain_tensors(tmp_path):
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=64, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    blocks = {b.name: b for b in B.partition(model)}
    before = B.snapshot(B.block_params(model, blocks["layers.1"]))
    local = Local(model, blocks, (), _Stream(), BlockTrainer(model, list(blocks.values())), tmp_path, threading.Event())
    update = BlockDescent({}, (), ()).run(Assignment(1, ("layers.1",), 2, 1e-2, 0), local)
    delta = update.deltas["layers.1"]
    assert type(delta) is dict and all(t.device.type == "cpu" for t in delta.values())
    after = B.block_params(model, blocks["layers.1"])
    for n, d in delta.items():  # the worker's copy is start + delta, exactly
        assert torch.equal(after[n].detach(), before[n] + d), n


class _Event:
    """A stand-in for a torch.cuda.Event: counts the waits, complete once waited for."""

    def __init__(self):
        self.waits = 0

    def query(self):
        return self.waits > 0

    def synchronize(self):
        self.waits += 1


def test_host_copy_waits_before_a_value_is_read_and_only_then():
    event = _Event()
    copy = B.HostCopy({"a": torch.ones(3), "b": torch.zeros(2)}, event)
    assert list(copy) == ["a", "b"] and len(copy) == 2 and "a" in copy and "c" not in copy
    assert not copy.ready() and event.waits == 0  # names, sizes, membership: no waiting
    assert torch.equal(copy["a"], torch.ones(3)) and event.waits == 1 and copy.ready()


def test_the_communication_thread_packs_a_host_copy():
    """Outgoing.pack reads the block's tensors through the codec: the first read waits for the copy."""
    event = _Event()
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    out = Outgoing(Update(3, 2, {"layers.0": B.HostCopy(dict(tensors), event)}, tokens=5, loss=1.5))
    assert out.blocks == ("layers.0",) and event.waits == 0
    codec = CodecPipeline("none")
    manifest, blob = out.pack("layers.0", codec, chunk_size=1 << 16)
    assert event.waits >= 1 and manifest.raw_bytes == 24 and manifest.tensors[0].shape == (2, 3)
    assert torch.equal(codec.decode(blob, manifest.tensors)["w"], tensors["w"])


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path):
    """The check script's smoke version: the same code path, a 4-layer model, a table and a JSON record."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("OUT", None)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                             "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| check | float32 | bfloat16 | ok |" in result.stdout and "all checks passed" in result.stdout
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    assert record["results"]["ok"] is True
    assert record["results"]["float32"]["overlap"]["copied"] is False
    assert (tmp_path / "gpu_check.md").read_text().startswith("| check |")


@cuda
def test_pinned_copy_equals_the_device_delta():
    device = torch.device("cuda", torch.cuda.current_device())
    delta = {"w": torch.randn(1000, 37, device=device), "b": torch.randn(37, device=device)}
    expected = {n: t.cpu() for n, t in delta.items()}
    copy = B.to_host_async(delta)
    assert isinstance(copy, B.HostCopy)
    for n, t in expected.items():
        assert copy[n].device.type == "cpu" and copy[n].is_pinned()
        assert torch.equal(copy[n].view(torch.int32), t.view(torch.int32)), n


@cuda
def test_the_compute_thread_does_not_wait_for_the_copy():
    """Queued behind 0.1 s or more of device work, the copy is handed over at once; the device delta can be
    dropped and its memory reused by later work without the copy reading the new values."""
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(1 << 22, device=device)
    expected = (x * 2).cpu()
    torch.cuda._sleep(int(2e8))  # about 0.1 s of busy device on the compute stream
    delta = {"d": x * 2}  # computed after the sleep
    t0 = time.perf_counter()
    copy = B.to_host_async(delta)
    queued = time.perf_counter() - t0
    del delta
    overwrite = torch.full((1 << 22,), -1.0, device=device)  # would take the freed memory without record_stream
    assert queued < 0.05 and not copy.ready()
    assert torch.equal(copy["d"], expected) and copy.ready()
    assert bool((overwrite == -1).all())
