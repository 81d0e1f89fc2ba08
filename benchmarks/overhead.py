"""Coordinator overhead of one round with no training: assign, a tiny upload, aggregate, checkpoint,
announce.

A real `fedblock coordinator` process (tiny model, fedbcd, checkpoint after every round) and one
client (a real `Session`, no model) that uploads a zero delta of its block as soon as it has both its
assignment and the previous round's model: the round time is then the coordinator's own work plus
two loopback round trips. Reported from the client's clock (assignment of round t to assignment of
round t+1) and from summary.json's round history. Target (README, Performance targets): ≤ 50 ms per round (Flower 1.42
takes 4-6 s per round on this machine).

    python benchmarks/overhead.py [--quick] [--rounds 50] [--json out.json]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import parser, report  # noqa: E402
from benchmarks.scale import cli, free_port  # noqa: E402


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50)
    args = p.parse_args()
    rounds = 10 if args.quick else args.rounds

    import torch

    from fedblock.client.session import Session
    from fedblock.common import wire
    from fedblock.common.codecs import CodecPipeline
    from fedblock.common.messages import Assignment, ModelNotice, RunEnd
    from fedblock.common.models import make_tiny_model

    workdir = (args.workdir / "overhead").resolve()
    model = make_tiny_model(workdir / "tiny", "llama", seed=0, num_layers=2, hidden_size=32)
    state = workdir / "state"
    subprocess.run(["rm", "-rf", str(state)], check=True)
    port = free_port()
    coordinator = cli("-m", "fedblock.common.cli", "--log-level", "WARNING", "coordinator", "--model", model,
                      "--state-dir", state, "--listen", f"127.0.0.1:{port}", "--insecure", "--algorithm", "fedbcd",
                      "--rounds", rounds, "--block-schedule", "staggered", "--threads", 1)
    session = Session(f"127.0.0.1:{port}", "client")
    info = session.join(num_examples=1, device="cpu", timeout=120)
    specs = {b.name: b for b in info.blocks}
    codec = CodecPipeline("none")
    starts: dict[int, float] = {}
    version, pending = 0, []
    for event in session.events():
        if isinstance(event, RunEnd):
            break
        if isinstance(event, ModelNotice):
            version = event.version
        elif isinstance(event, Assignment):
            starts[event.round] = time.perf_counter()
            pending.append(event)
        while pending and pending[0].round - 1 <= version:
            a = pending.pop(0)
            (block,) = a.blocks
            delta = {t.name: torch.zeros(t.shape) for t in specs[block].tensors}
            manifest, blob = wire.pack(block, delta, codec, round=a.round, base_version=version,
                                       chunk_size=info.chunk_size, num_tokens=1)
            assert session.upload(manifest, blob) == "accepted"
    session.close()
    coordinator.communicate(timeout=120)
    summary = json.loads((state / "summary.json").read_text())
    client_ms = [1000 * (starts[r + 1] - starts[r]) for r in range(2, rounds) if r + 1 in starts]
    server_ms = [1000 * r["seconds"] for r in summary["round_history"][1:]]
    rows = [
        {"measured by": "client: assignment to next assignment", "rounds": len(client_ms),
         "median ms": statistics.median(client_ms), "p90 ms": sorted(client_ms)[int(0.9 * len(client_ms))],
         "max ms": max(client_ms)},
        {"measured by": "coordinator: round start to close (summary.json)", "rounds": len(server_ms),
         "median ms": statistics.median(server_ms), "p90 ms": sorted(server_ms)[int(0.9 * len(server_ms))],
         "max ms": max(server_ms)},
    ]
    median = statistics.median(client_ms)
    report("overhead", rows, args, target="median round time with no training <= 50 ms", met=median <= 50,
           median_ms=round(median, 1))


if __name__ == "__main__":
    main()
