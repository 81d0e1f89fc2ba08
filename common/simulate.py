"""`fedblock simulate`: one coordinator and N worker processes on localhost, talking real gRPC.

It splits one data set into a held-out part (the coordinator's --eval-data) and N worker shards
(IID or Dirichlet), writes them as JSONL under STATE_DIR/data, starts the processes with explicit
flags (so inherited FEDBLOCK_* variables cannot change them), prefixes their output, and stops all of
them if any one fails. The result is the coordinator's summary.json; each worker's timeline (what its threads did when) is in
STATE_DIR/timelines/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .config import CoordinatorConfig, SimulateConfig, WorkerConfig, build, load_yaml, to_argv
from .data import load_examples, split_clients, split_holdout, write_jsonl
from .models import resolve_model

log = logging.getLogger("fedblock.simulate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(proc: subprocess.Popen, prefix: str) -> threading.Thread:
    def run():
        for line in proc.stdout:
            sys.stderr.write(f"[{prefix}] {line}")
            sys.stderr.flush()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDBLOCK_") or k in ("FEDBLOCK_CACHE_DIR", "FEDBLOCK_LOG_LEVEL")}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def simulate(sim: SimulateConfig, args: argparse.Namespace) -> int:
    flags = vars(args)
    file_values = load_yaml(args.config) if args.config else {}
    port = sim.port or free_port()
    # Everything stays on 127.0.0.1, so plaintext is fine here (and the only option simulate offers).
    coord_forced = {"listen": f"127.0.0.1:{port}", "min_workers": sim.workers, "seed": sim.seed, "insecure": True}
    if flags.get("linger") is None and "linger" not in file_values:  # nobody scrapes a simulation by default
        coord_forced["linger"] = 0
    coord = build(CoordinatorConfig, {**_known(CoordinatorConfig, flags), **coord_forced}, None, _known(CoordinatorConfig, file_values))
    state_dir = Path(coord.state_dir)
    data_dir = state_dir / "data"
    coord = dataclasses.replace(coord, eval_data=str(data_dir / "eval.jsonl"))
    worker_template = {**_known(WorkerConfig, flags)}
    workers = []
    for i in range(sim.workers):
        forced = {
            "coordinator": f"127.0.0.1:{port}",
            "name": f"worker-{i}",
            "data": str(data_dir / f"worker-{i}.jsonl"),
            "seed": sim.seed + i,
            "metrics_port": coord.metrics_port + 1 + i if coord.metrics_port else 0,
            "timeline": str(state_dir / "timelines" / f"worker-{i}.jsonl"),
            "insecure": True,
            "linger": coord.linger,
        }
        workers.append(build(WorkerConfig, {**worker_template, **forced}, None, _known(WorkerConfig, file_values)))

    # Prepare once in this process: the data split and (for built-in models) the converted model.
    resolve_model(coord.model)
    examples = load_examples(sim.data)
    train, heldout = split_holdout(examples, sim.eval_fraction, sim.seed)
    shards = split_clients(train, sim.workers, sim.split, sim.seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "timelines").mkdir(exist_ok=True)
    write_jsonl(heldout, data_dir / "eval.jsonl")
    for i, shard in enumerate(shards):
        write_jsonl(shard, data_dir / f"worker-{i}.jsonl")
    log.info(
        "simulate: %d examples -> %d held out, %d workers with %s examples (%s split); coordinator on port %d",
        len(examples), len(heldout), sim.workers, ", ".join(str(len(s)) for s in shards), sim.split, port,
    )

    fedblock = [sys.executable, "-m", "fedblock.common.cli", "--log-level", args.log_level]
    env = _child_env()
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, argv: list[str]) -> None:
        procs[name] = subprocess.Popen(
            fedblock + argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        _pump(procs[name], name)

    t0 = time.monotonic()
    start("coordinator", ["coordinator", *to_argv(coord)])
    for w in workers:
        start(w.name, ["worker", *to_argv(w)])
    failed = None
    try:
        while failed is None and procs["coordinator"].poll() is None:
            for name, p in procs.items():
                if name != "coordinator" and p.poll() not in (None, 0):
                    failed = f"{name} exited with status {p.returncode}"
            time.sleep(0.2)
        if procs["coordinator"].returncode not in (None, 0):
            failed = f"the coordinator exited with status {procs['coordinator'].returncode}"
    except KeyboardInterrupt:
        failed = "interrupted"
    if failed:
        log.error("simulate: %s; stopping everything", failed)
    # After a good run the workers leave on their own once they hear the run ended.
    for name, p in procs.items():
        for sig, grace in ([] if failed else [(None, 30)]) + [(signal.SIGTERM, 30), (signal.SIGKILL, 30)]:
            if p.poll() is not None:
                break
            if sig is not None:
                if sig == signal.SIGKILL:
                    log.warning("%s did not stop; killing it", name)
                p.send_signal(sig)
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    codes = {name: p.returncode for name, p in procs.items()}
    summary_path = state_dir / "summary.json"
    if failed or any(codes.values()) or not summary_path.exists():
        log.error("simulate failed: exit codes %s", codes)
        return 1
    summary = json.loads(summary_path.read_text())
    print(_report(summary, time.monotonic() - t0, summary_path))
    return 0


def _known(cls, values: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names and v is not None}


def _report(s: dict, wall: float, path: Path) -> str:
    def loss(x):
        return "n/a" if x is None else f"{x:.4f}"

    return "\n".join(
        [
            f"fedblock simulate: {s['algorithm']}, {s['rounds_completed']}/{s['rounds_total']} rounds, {s['workers']} workers, {wall:.0f} s",
            f"  held-out eval loss: {loss(s['eval_loss_initial'])} before -> {loss(s['eval_loss_final'])} after",
            *([f"  held-out accuracy: {s['eval_accuracy_initial']:.3f} before -> {s['eval_accuracy_final']:.3f} after"]
              if s.get("eval_accuracy_initial") is not None and s.get("eval_accuracy_final") is not None else []),
            f"  bytes up {s['bytes_up'] / 1e6:.1f} MB, down {s['bytes_down'] / 1e6:.1f} MB",
            f"  model exported to {s['export_path']}",
            f"  summary: {path}",
        ]
    )
