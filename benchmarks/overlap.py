"""ParaBlock overlap: fedbcd vs parablock on the same model, data and seed, with the worker's link
throttled so that communication ÷ computation per round is 0.25, 0.5, 1 and 2.

Each run is `fedblock simulate` (a coordinator and one worker process, real gRPC on loopback) with
`--max-upload-rate` and `--max-download-rate` on the worker. A calibration run without a limit gives
the compute time per round T and the bytes per round B (one block up, the changed block down); the
rate for a ratio r is B / (r·T). Per round we report, from the worker's timeline: compute (training),
comm (upload + download), compute idle (the compute thread waiting on communication) and the round
time (the steady state: median interval between the starts of consecutive rounds). Ratio = parablock round time ÷ fedbcd round time.
Ideal at r = 1: 0.5; target (DESIGN §9): ≤ 0.55. The timeline of one pair of runs (r = 1) is drawn
as a PNG: compute and communication bars per thread over time.

    python benchmarks/overlap.py [--quick] [--json out.json] [--png overlap.png]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import parser, report  # noqa: E402


def make_inputs(workdir: Path) -> tuple[Path, Path]:
    """A random Llama with blocks of ~3 MB (hidden 256, 4 layers) and a synthetic chat data set."""
    from fedblock.common.data import Example, write_jsonl
    from fedblock.common.models import make_tiny_model

    model = workdir / "model"
    if not (model / "config.json").exists():
        make_tiny_model(model, "llama", seed=0, num_layers=4, hidden_size=256)
    data = workdir / "data.jsonl"
    write_jsonl([Example((("user", f"What is {i} times {i % 7 + 2}?"),
                          ("assistant", f"{i} times {i % 7 + 2} is {i * (i % 7 + 2)}, of course.")))
                 for i in range(400)], data)
    return model, data


def run(workdir: Path, model: Path, data: Path, algorithm: str, rounds: int, steps: int, rate: int) -> dict:
    state = workdir / f"{algorithm}-{rate}"
    cmd = [
        sys.executable, "-m", "fedblock.common.cli", "--log-level", "WARNING", "simulate",
        "--model", str(model), "--data", str(data), "--workers", "1", "--state-dir", str(state),
        "--algorithm", algorithm, "--rounds", str(rounds), "--local-steps", str(steps), "--lr", "1e-4",
        "--block-schedule", "round-robin", "--train-blocks", "layers.*", "--batch-size", "8", "--max-seq-len", "48",
        "--eval-max-examples", "8", "--threads", "1", "--seed", "0",
        "--max-upload-rate", str(rate), "--max-download-rate", str(rate),
    ]
    subprocess.run(["rm", "-rf", str(state)], check=True)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{algorithm} at {rate} B/s failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    events = [json.loads(line) for line in (state / "timelines" / "worker-0.jsonl").read_text().splitlines()]
    return {"events": events, "summary": json.loads((state / "summary.json").read_text())}


def per_round(events: list[dict]) -> dict:
    """Per-round means from a worker timeline. The round time is the steady state: the median interval
    between the starts of consecutive rounds (the pipeline's fill and drain at the ends of a run would
    otherwise weigh on short runs)."""
    compute = sorted((e for e in events if e["kind"] == "compute"), key=lambda e: e["start"])
    comm = [e for e in events if e["kind"] in ("upload", "download")]
    t0, t1 = compute[0]["start"], compute[-1]["end"]
    idle = [e for e in events if e["kind"] == "idle" and t0 <= e["start"] < t1]
    starts = [e["start"] for e in compute]
    intervals = sorted(b - a for a, b in zip(starts, starts[1:], strict=False))
    n = len(compute)
    total = lambda es: sum(e["end"] - e["start"] for e in es)  # noqa: E731
    stats = {
        "compute s": total(compute) / n,
        "comm s": total(comm) / n,
        "idle s": total(idle) / max(1, n - 1),
        "round s": intervals[len(intervals) // 2],
    }
    stats["comm/comp measured"] = stats["comm s"] / stats["compute s"]
    return stats


def draw(path: Path, runs: dict[str, dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"compute": "tab:blue", "upload": "tab:orange", "download": "tab:green", "idle": "lightgray"}
    rows = [("compute", ["compute", "idle"]), ("communication", ["upload", "download"])]
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 1.6 * len(runs) + 1), sharex=True, squeeze=False)
    for ax, (name, r) in zip(axes[:, 0], runs.items(), strict=True):
        t0 = min(e["start"] for e in r["events"] if e["kind"] == "compute")
        for y, (_, kinds) in enumerate(rows):
            for kind in kinds:
                spans = [(e["start"] - t0, e["end"] - e["start"]) for e in r["events"] if e["kind"] == kind and e["end"] > t0]
                ax.broken_barh(spans, (y - 0.35, 0.7), color=colors[kind], label=kind)
        ax.set_yticks(range(len(rows)), [label for label, _ in rows])
        ax.set_title(name, fontsize=10, loc="left")
    handles = {h.get_label(): h for ax in axes[:, 0] for h in ax.get_legend_handles_labels()[0]}
    axes[0, 0].legend(handles.values(), handles.keys(), loc="upper right", ncol=4, fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the first round started")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--png", type=Path, default=Path("runs/bench/overlap.png"))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-steps", type=int, default=12)
    args = p.parse_args()
    workdir = (args.workdir / "overlap").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ratios = [1.0] if args.quick else [0.25, 0.5, 1.0, 2.0]
    rounds = 5 if args.quick else args.rounds
    model, data = make_inputs(workdir)

    # Calibration: the compute time per round T (no link limit), then the link time per round at a
    # trial rate, which gives the bytes a round really moves through the limiter (the token bucket's
    # burst lets the start of each transfer through at once): B = comm time × rate.
    free = run(workdir, model, data, "fedbcd", rounds, args.local_steps, 0)
    compute_s = per_round(free["events"])["compute s"]
    model_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))  # the first sync, not a round's
    trial_rate = int((free["summary"]["bytes_up"] + free["summary"]["bytes_down"] - model_bytes) / rounds / compute_s)
    trial = run(workdir, model, data, "fedbcd", rounds, args.local_steps, trial_rate)
    bytes_per_round = per_round(trial["events"])["comm s"] * trial_rate
    rows, timelines = [], {}
    for r in ratios:
        rate = int(bytes_per_round / (r * compute_s))
        pair = {a: run(workdir, model, data, a, rounds, args.local_steps, rate) for a in ("fedbcd", "parablock")}
        stats = {a: per_round(pair[a]["events"]) for a in pair}
        for a in pair:
            rows.append({"comm/comp": r, "algorithm": a, "rate MB/s": rate / 1e6, **stats[a],
                         "parablock/fedbcd": stats["parablock"]["round s"] / stats["fedbcd"]["round s"] if a == "parablock" else ""})
        if r == 1.0:
            timelines = {f"{a} (comm/comp = 1, {rate / 1e6:.1f} MB/s)": pair[a] for a in pair}
    at_one = next(row["parablock/fedbcd"] for row in rows if row["comm/comp"] == 1.0 and row["algorithm"] == "parablock")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    draw(args.png, timelines, "one worker: compute and communication over time")
    report("overlap", rows, args, target="parablock/fedbcd round time at comm/comp = 1 <= 0.55",
           ratio_at_1=round(at_one, 3), met=at_one <= 0.55, compute_s_per_round=round(compute_s, 3),
           bytes_per_round=int(bytes_per_round), rounds=rounds, local_steps=args.local_steps, png=str(args.png))


if __name__ == "__main__":
    main()
