"""A site of two processes (gloo on the CPU) training one block of a random-initialised model with
SmolLM2-135M's configuration, with the model replicated on both ranks and sharded over them with FSDP2
(`fedblock worker --shard-model`, common/sharding.py): what each rank holds and how long a step takes.

Each rank: builds the model (the same weights), shards it or not, then takes `--steps` AdamW steps on
the block `--block` with its rows of a site batch of `--rows` x `--length` tokens (BlockTrainer with
the site's DataParallel, as a worker does). Measured per rank: the parameters it holds (elements, and
as a fraction of the model), its resident anonymous memory once the model is ready (RssAnon, after the
build's temporaries are freed), the peak over the steps (VmHWM reset once the model is ready), and the
mean step time after the first step. The two ranks share the machine's cores (one thread each).

    python benchmarks/sharding.py [--quick] [--steps 4] [--rows 8] [--length 128] [--block layers.15]
        [--json runs/bench/sharding.json]

Time: about 2 minutes on 2 cores (--quick: a 4-layer model of hidden 64, seconds).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import parser, report  # noqa: E402
from benchmarks.gpu_check import build_model, smollm2_config, walk_batches  # noqa: E402

MB = 1 << 20


def _status(key: str) -> int:
    """A /proc/self/status value in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _rank(rank: int, port: int, args, out: str) -> None:
    import torch.distributed as dist

    from fedblock.common import blocks as B
    from fedblock.common import sharding
    from fedblock.common.parallel import DataParallel
    from fedblock.common.training import BlockTrainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = build_model(smollm2_config(args.quick))
        blocks = B.partition(model, 1)
        if args.mode == "sharded":
            _, layers = B.find_decoder_layers(model)
            sharding.shard_model(model, layers, torch.device("cpu"))
        mine, total = sharding.held(model)
        trainer = BlockTrainer(model, blocks, parallel=DataParallel(torch.device("cpu")))
        trainer.begin_round([args.block])
        ready = _status("RssAnon")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here
        times = []
        for batch in walk_batches(args.steps, args.rows, args.length, seed=0):
            t0 = time.perf_counter()
            trainer.step({k: v[rank::2] for k, v in batch.items()}, 1e-4)
            times.append(time.perf_counter() - t0)
        Path(f"{out}.{rank}").write_text(json.dumps({
            "rank": rank, "held": mine, "total": total, "ready": ready, "peak": _status("VmHWM"),
            "step_s": statistics.mean(times[1:] or times), "checkpointed": trainer.checkpointed}))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rows", type=int, default=8, help="the site's batch, rows (each rank takes half)")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--block", default=None, help="the block trained (default: the middle decoder layer)")
    args = p.parse_args()
    import torch.multiprocessing as mp

    layers = smollm2_config(args.quick).num_hidden_layers
    args.block = args.block or f"layers.{layers // 2}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("replicated", "sharded"):
            args.mode = mode
            out = os.path.join(tmp, mode)
            mp.spawn(_rank, args=(_free_port(), args, out), nprocs=2)
            for r in range(2):
                m = json.loads(Path(f"{out}.{r}").read_text())
                rows.append({"model": mode, "rank": r, "params held": m["held"], "of the model": m["held"] / m["total"],
                             "RSS ready MB": m["ready"] / MB, "peak over steps MB": m["peak"] / MB,
                             "layers recomputed": m["checkpointed"], "step s": m["step_s"]})
    model = "4-layer Llama, hidden 64" if args.quick else "SmolLM2-135M configuration, float32"
    report("sharding", rows, args, model=model, block=args.block,
           batch=f"{args.rows} rows x {args.length} tokens over 2 ranks, {args.steps} steps")


if __name__ == "__main__":
    main()
