"""One coordinator, many workers: 256 lightweight workers for 3 rounds, and the coordinator's peak
memory aggregating 32 vs 8 updates of one block.

All on loopback, the coordinator a real `fedblock coordinator` process.
- Many workers: the real worker code (`fedblock.client.worker.Worker`, all its threads), many per
  "swarm" process, on a tiny model.
- Memory: the coordinator runs the real SmolLM2-135M (blocks of 14 MB); N clients (real `Session`s,
  threads of one process, no model of their own so that 32 of them fit in memory) are all assigned
  `layers.0` and upload their deltas at the same moment. The coordinator's peak RSS while running
  rounds (summary.json's rounds_peak_rss_bytes: the peak is reset once the model is loaded) with 32
  such updates against 8.
Targets (README, Performance targets): 256 workers, 3 rounds, no error; the peak with 32 updates within 10 % of the
peak with 8 (streaming aggregation: one running mean per block; concurrent uploads beyond
--upload-slots assembled in files).

    python benchmarks/scale.py [--quick] [--workers 256] [--json out.json]
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import parser, report  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def swarm(address: str, prefix: str, count: int, data: Path) -> None:
    """A process holding `count` real workers as threads; exits 0 only if every one finished cleanly."""
    import logging

    import torch

    from fedblock.client.worker import Worker
    from fedblock.common.config import WorkerConfig

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    outcomes: dict[str, object] = {}

    def run(i: int) -> None:
        config = WorkerConfig(coordinator=address, name=f"{prefix}-{i:03d}", data=str(data), insecure=True,
                              batch_size=1, max_seq_len=32, connect_timeout=600, seed=i)
        try:
            outcomes[config.name] = Worker(config).run()
        except BaseException as e:  # noqa: BLE001 - report, do not die
            outcomes[config.name] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = {n: o for n, o in outcomes.items() if isinstance(o, BaseException) or o.error or not o.finished}
    print(json.dumps({"workers": len(outcomes), "failed": {n: repr(o) for n, o in failed.items()}}), flush=True)
    sys.exit(1 if failed else 0)


def uploaders(address: str, count: int) -> None:
    """`count` clients that join, wait for their assignment, all upload a delta of it at once, and wait
    for the end of the run."""
    import torch

    from fedblock.client.session import Session
    from fedblock.common import wire
    from fedblock.common.codecs import CodecPipeline
    from fedblock.common.messages import Assignment, RunEnd

    sessions = [Session(address, f"u{i:03d}") for i in range(count)]
    infos = [s.join(num_examples=1, device="cpu", timeout=600) for s in sessions]
    streams = [s.events() for s in sessions]
    assignments = [next(e for e in stream if isinstance(e, Assignment)) for stream in streams]
    spec = next(b for b in infos[0].blocks if b.name == assignments[0].blocks[0])
    delta = {t.name: torch.randn(t.shape) * 1e-3 for t in spec.tensors}
    manifest, blob = wire.pack(spec.name, delta, CodecPipeline("none"), round=assignments[0].round, base_version=0,
                               chunk_size=infos[0].chunk_size, num_tokens=1)
    barrier = threading.Barrier(count)
    results = []

    def send(session):
        barrier.wait()
        results.append(session.upload(manifest, blob))

    threads = [threading.Thread(target=send, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for stream in streams:
        next(e for e in stream if isinstance(e, RunEnd))
    print(json.dumps({"uploads": results}), flush=True)
    sys.exit(0 if results.count("accepted") == count else 1)


def cli(*args: object, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def federation(workdir: Path, name: str, model: Path | str, data: Path | None, workers: int, swarms: int, rounds: int,
               extra: list[str]) -> dict:
    """A coordinator process and `workers` workers in `swarms` processes (`data` None: upload-only
    clients); returns summary and timings."""
    port = free_port()
    state = workdir / name
    subprocess.run(["rm", "-rf", str(state)], check=True)
    coordinator = cli("-m", "fedblock.common.cli", "--log-level", "WARNING", "coordinator", "--model", model,
                      "--state-dir", state, "--listen", f"127.0.0.1:{port}", "--insecure", "--rounds", rounds,
                      "--min-workers", workers, "--threads", 1, "--heartbeat-interval", 5, *extra)
    per = [workers // swarms + (1 if i < workers % swarms else 0) for i in range(swarms)]
    t0 = time.monotonic()
    if data is None:  # upload-only clients, all in one process
        procs = [cli(__file__, "--_uploaders", workers, "--_address", f"127.0.0.1:{port}")]
    else:
        procs = [cli(__file__, "--_swarm", n, "--_address", f"127.0.0.1:{port}", "--_prefix", f"s{i}", "--_data", data)
                 for i, n in enumerate(per) if n]
    outs = [p.communicate(timeout=3600)[0] for p in procs]
    coordinator_out = coordinator.communicate(timeout=600)[0]
    wall = time.monotonic() - t0
    summary = json.loads((state / "summary.json").read_text()) if (state / "summary.json").exists() else {}
    errors = [o[-2000:] for p, o in zip(procs, outs, strict=True) if p.returncode != 0]
    if coordinator.returncode != 0:
        errors.append(coordinator_out[-2000:])
    return {"summary": summary, "wall": wall, "errors": errors}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--swarms", type=int, default=4, help="worker processes")
    p.add_argument("--_swarm", type=int)
    p.add_argument("--_address")
    p.add_argument("--_prefix")
    p.add_argument("--_data", type=Path)
    p.add_argument("--_uploaders", type=int)
    p.add_argument("--memory-model", default="smollm2-135m-instruct")
    args = p.parse_args()
    if args._swarm:
        swarm(args._address, args._prefix, args._swarm, args._data)
        return
    if args._uploaders:
        uploaders(args._address, args._uploaders)
        return

    from fedblock.common.data import Example, write_jsonl
    from fedblock.common.models import make_tiny_model

    workdir = (args.workdir / "scale").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data.jsonl"
    write_jsonl([Example((("user", f"{i}+1?"), ("assistant", f"{i + 1}."))) for i in range(64)], data)
    tiny = make_tiny_model(workdir / "tiny", "llama", seed=0, num_layers=2, hidden_size=32)

    rows, errors = [], []
    n = 64 if args.quick else args.workers
    run = federation(workdir, "many", tiny, data, n, args.swarms, args.rounds,
                     ["--local-steps", 1, "--block-schedule", "staggered"])
    s = run["summary"]
    errors += run["errors"]
    rows.append({"experiment": f"{n} workers", "workers": s.get("workers"), "rounds": s.get("rounds_completed"),
                 "updates": s.get("updates_accepted"), "errors": len(run["errors"]), "wall s": run["wall"],
                 "coordinator peak RSS MiB": s.get("coordinator_peak_rss_bytes", 0) / 2**20,
                 "peak while running rounds MiB": s.get("rounds_peak_rss_bytes", 0) / 2**20})
    peaks = {}
    for k in ((4, 16) if args.quick else (8, 32)):
        run = federation(workdir, f"agg{k}", args.memory_model, None, k, 1, 1,
                         ["--block-schedule", "round-robin", "--train-blocks", "layers.0"])
        s = run["summary"]
        errors += run["errors"]
        peaks[k] = s.get("rounds_peak_rss_bytes", 0)
        rows.append({"experiment": f"{k} concurrent updates of layers.0 ({args.memory_model})", "workers": s.get("workers"),
                     "rounds": s.get("rounds_completed"), "updates": s.get("updates_accepted"),
                     "errors": len(run["errors"]), "wall s": run["wall"],
                     "coordinator peak RSS MiB": s.get("coordinator_peak_rss_bytes", 0) / 2**20,
                     "peak while running rounds MiB": peaks[k] / 2**20})
    small, large = sorted(peaks)
    growth = peaks[large] / peaks[small] - 1 if peaks[small] else float("nan")
    ok = rows[0]["errors"] == 0 and rows[0]["rounds"] == args.rounds and rows[0]["workers"] == n
    report("scale", rows, args, workers_target=f"{n} workers, {args.rounds} rounds, no error", workers_met=ok,
           memory_target=f"peak with {large} updates within 10% of {small}", memory_growth=round(growth, 4),
           memory_met=growth <= 0.10)
    for e in errors:
        print(e)


if __name__ == "__main__":
    main()
