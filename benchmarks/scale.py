"""One coordinator, many workers: 256 lightweight workers for 3 rounds, and the coordinator's peak
memory aggregating 32 vs 8 updates of one block.

Workers are the real worker code (`fedblock.client.worker.Worker`, all its threads), many per
"swarm" process, on a tiny model; the coordinator is a real `fedblock coordinator` process; all on
loopback. Targets (DESIGN §9): 256 workers, 3 rounds, no error; the coordinator's peak RSS with 32
updates of one block within 10 % of its peak with 8 (streaming aggregation: one running mean per
block, concurrent uploads beyond --upload-slots assembled in files).

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


def cli(*args: object, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def federation(workdir: Path, name: str, model: Path, data: Path, workers: int, swarms: int, rounds: int,
               extra: list[str]) -> dict:
    """A coordinator process and `workers` workers in `swarms` processes; returns summary and timings."""
    port = free_port()
    state = workdir / name
    subprocess.run(["rm", "-rf", str(state)], check=True)
    coordinator = cli("-m", "fedblock.common.cli", "--log-level", "WARNING", "coordinator", "--model", model,
                      "--state-dir", state, "--listen", f"127.0.0.1:{port}", "--insecure", "--rounds", rounds,
                      "--min-workers", workers, "--threads", 1, "--heartbeat-interval", 5, *extra)
    per = [workers // swarms + (1 if i < workers % swarms else 0) for i in range(swarms)]
    t0 = time.monotonic()
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
    args = p.parse_args()
    if args._swarm:
        swarm(args._address, args._prefix, args._swarm, args._data)
        return

    from fedblock.common.data import Example, write_jsonl
    from fedblock.common.models import make_tiny_model

    workdir = (args.workdir / "scale").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data.jsonl"
    write_jsonl([Example((("user", f"{i}+1?"), ("assistant", f"{i + 1}."))) for i in range(64)], data)
    tiny = make_tiny_model(workdir / "tiny", "llama", seed=0, num_layers=2, hidden_size=32)
    # One layer of hidden 512 (about 12 MB of float32 per update) for the memory comparison.
    wide = make_tiny_model(workdir / "wide", "llama", seed=0, num_layers=1, hidden_size=512)

    rows, errors = [], []
    n = 64 if args.quick else args.workers
    run = federation(workdir, "many", tiny, data, n, args.swarms, args.rounds,
                     ["--local-steps", 1, "--block-schedule", "staggered"])
    s = run["summary"]
    errors += run["errors"]
    rows.append({"experiment": f"{n} workers", "workers": s.get("workers"), "rounds": s.get("rounds_completed"),
                 "updates": s.get("updates_accepted"), "errors": len(run["errors"]), "wall s": run["wall"],
                 "coordinator peak RSS MiB": s.get("coordinator_peak_rss_bytes", 0) / 2**20})
    peaks = {}
    for k in ((4, 16) if args.quick else (8, 32)):
        run = federation(workdir, f"agg{k}", wide, data, k, min(k, args.swarms), 1,
                         ["--local-steps", 1, "--block-schedule", "round-robin", "--train-blocks", "layers.0"])
        s = run["summary"]
        errors += run["errors"]
        peaks[k] = s.get("coordinator_peak_rss_bytes", 0)
        rows.append({"experiment": f"{k} updates of one 12 MB block", "workers": s.get("workers"),
                     "rounds": s.get("rounds_completed"), "updates": s.get("updates_accepted"),
                     "errors": len(run["errors"]), "wall s": run["wall"], "coordinator peak RSS MiB": peaks[k] / 2**20})
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
