"""`fedblock report STATE_DIR`: PNG plots and a markdown summary of a run, from its state dir alone.

It reads what the coordinator keeps there: run.json (what the run is), the newest readable checkpoint
(checkpoints/round-NNNNNN.json: the per-round and evaluation histories up to its round), evaluations.json
(evaluations that finished after that checkpoint) and summary.json (after the run ended). So a report
works during a run, after a crash and after the end, on any copy of the dir; it never talks to the
coordinator, and writes only its own folder (default STATE_DIR/report; StateStore makes the standard empty
folders of a state dir where a copy lacks them).

Only the checkpoints' JSON is read, not their block files: the histories do not depend on the weights,
and checking a checkpoint's blocks would read the whole model. An unreadable newest checkpoint (a
damaged file) is skipped for the one before, as a resume does.

Plots (matplotlib, the `report` extra; drawn with the Agg canvas, no display needed):
    loss.png      eval loss per round (and accuracy where the evaluation has answers), train loss per round
    bytes.png     wire bytes per round, up (worker -> coordinator) and down
    timeline.png  per worker: compute, idle, upload and download intervals, round closes as lines (only
                  where the run recorded timelines: STATE_DIR/timeline.jsonl)
    report.md     the summary, a per-round table, per-worker time totals, the reproduction record
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError, ReportConfig

KINDS = ("compute", "idle", "upload", "download")
# One color per kind of thing, the same in every plot: training (compute, train loss), upload, download.
COLORS = {"compute": "#1f77b4", "idle": "#c7c7c7", "upload": "#ff7f0e", "download": "#2ca02c",
          "train": "#1f77b4", "eval": "#d62728", "accuracy": "#9467bd", "round": "#555555"}
CONFIG_FILE = "coordinator.yaml"  # beside report.md, where the run has a reproduction record
INSTALL_HINT = "fedblock report needs matplotlib: pip install 'fedblock[report]'"


@dataclass
class RunHistory:
    """What a state dir says about its run (the newest checkpoint merged with evaluations and summary)."""

    state_dir: Path
    run_id: str
    algorithm: str
    rounds_completed: int
    rounds_total: int | None  # None: not recorded yet (known from summary.json or the reproduce record)
    workers: list[str]
    eval_history: list[list[float]]  # [round, loss] or [round, loss, accuracy]
    round_history: list[dict]
    bytes_up: int
    bytes_down: int
    wall_seconds: float | None
    state: str  # "finished", "stopped" or "in progress (or interrupted)"
    source: str  # what was read, in words
    reproduce: dict | None = None
    intervals: dict[int, list[list]] | None = None  # round -> its timeline (None: the run recorded none)
    extra: dict[str, Any] = field(default_factory=dict)  # summary keys shown as they are (updates, memory)

    def round_bytes(self) -> list[tuple[int, int, int]]:
        """(round, bytes up, bytes down) moved in each round: the differences of the cumulative counters
        recorded at each round's close (a resumed run's counters continue from its checkpoint)."""
        out, up, down = [], 0, 0
        for r in self.round_history:
            u, d = int(r.get("bytes_up", up)), int(r.get("bytes_down", down))
            # (a counter below the one before started again from 0: a state dir of an older fedblock)
            out.append((int(r["round"]), u - up if u >= up else u, d - down if d >= down else d))
            up, down = u, d
        return out

    def timeline(self) -> list[tuple[str, str, float, float]] | None:
        """Every recorded interval (worker, kind, start s, end s) on the coordinator's run clock; None when
        the run recorded no timelines (a coordinator older than them)."""
        if self.intervals is None:
            return None
        out = []
        for r in self.round_history:  # the rounds the history holds (not those of a run cut short after it)
            for worker, kind, start, end in self.intervals.get(int(r["round"]), []):
                if kind in KINDS and math.isfinite(start) and math.isfinite(end) and end >= start:
                    out.append((worker, kind, start, end))
        return out

    def worker_seconds(self) -> dict[str, dict[str, float]]:
        """Per worker, the seconds of each kind in the timeline ({} without one)."""
        totals: dict[str, dict[str, float]] = {}
        for worker, kind, start, end in self.timeline() or []:
            totals.setdefault(worker, dict.fromkeys(KINDS, 0.0))[kind] += end - start
        return dict(sorted(totals.items()))

    def evaluation(self, round: int) -> list[float] | None:
        return next((e for e in self.eval_history if int(e[0]) == round), None)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None


def load_history(state_dir: Path) -> RunHistory:
    """The run's history from its state dir; StateError when it is not a fedblock state dir."""
    from ..server.store import Checkpoint, StateError, StateStore

    state_dir = Path(state_dir)
    if not state_dir.is_dir():
        raise StateError(f"{state_dir} is not a folder (give a coordinator's --state-dir)")
    run = _read_json(state_dir / "run.json")
    if not isinstance(run, dict) or not (state_dir / "checkpoints").is_dir():
        raise StateError(f"{state_dir} is not a fedblock state dir (no readable run.json and checkpoints/)")
    store = StateStore(state_dir)  # creates nothing here: a state dir has its folders
    ckpt, ckpt_name = None, None
    for path in reversed(store.checkpoints()):  # the newest readable one (a running coordinator prunes old ones)
        record = _read_json(path)
        try:
            ckpt, ckpt_name = Checkpoint(**record), path.name
            break
        except TypeError:
            continue
    summary = _read_json(state_dir / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    if ckpt is None and summary is None:
        raise StateError(f"{state_dir} holds no readable checkpoint yet (the run has not closed a round)")

    ckpt_round = ckpt.round if ckpt is not None else 0
    # summary.json is the whole run's, unless a newer checkpoint shows that the run went on after it
    use_summary = summary is not None and int(summary.get("rounds_completed", 0)) >= ckpt_round
    evaluations: dict[int, list[float]] = {}
    sources = [*(ckpt.eval_history if ckpt else []), *store.read_evaluations(10**9 if use_summary else ckpt_round)]
    rounds: dict[int, dict] = {int(r["round"]): dict(r) for r in (ckpt.round_history if ckpt else []) if "round" in r}
    if use_summary:
        sources += summary.get("eval_history") or []
        rounds.update({int(r["round"]): dict(r) for r in summary.get("round_history") or [] if "round" in r})
    for e in sources:
        try:
            evaluations[int(e[0])] = [int(e[0]), *(float(x) if x is not None else math.nan for x in e[1:])]
        except (TypeError, ValueError, IndexError):
            continue
    round_history = [rounds[r] for r in sorted(rounds)]
    counters = ckpt.counters if ckpt is not None else {}
    reproduce = summary.get("reproduce") if use_summary else None
    config = (reproduce or {}).get("config") or {}
    total = summary.get("rounds_total") if use_summary else config.get("rounds")
    completed = int(summary["rounds_completed"]) if use_summary else ckpt_round
    if use_summary:
        state = "finished" if total is not None and completed >= int(total) else "stopped"
        workers = list(summary.get("worker_names") or [])
        source = f"summary.json{f' and {ckpt_name}' if ckpt_name else ''}"
    else:
        state = "in progress (or interrupted)"
        workers = sorted(ckpt.workers, key=lambda w: ckpt.workers[w])
        source = f"{ckpt_name} (no summary.json yet)"
    intervals = store.read_timeline() if (state_dir / "timeline.jsonl").exists() else None
    if not workers:
        workers = sorted({w for entries in (intervals or {}).values() for w, *_ in entries})
    pick = summary if use_summary else counters
    wall = pick.get("wall_seconds")
    return RunHistory(
        state_dir=state_dir,
        run_id=str(run.get("run_id", "?")),
        algorithm=str((summary or {}).get("algorithm") or run.get("algorithm", "?")),
        rounds_completed=completed,
        rounds_total=int(total) if total is not None else None,
        workers=workers,
        eval_history=[evaluations[r] for r in sorted(evaluations)],
        round_history=round_history,
        bytes_up=int(pick.get("bytes_up", 0)),
        bytes_down=int(pick.get("bytes_down", 0)),
        wall_seconds=float(wall) if wall is not None else None,
        state=state,
        source=source,
        reproduce=reproduce if isinstance(reproduce, dict) else None,
        intervals=intervals,
        extra={k: summary[k] for k in ("updates_accepted", "updates_rejected", "updates_late", "export_path",
                                       "coordinator_peak_rss_bytes") if use_summary and k in summary},
    )


# ---- plots ---------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas (no pyplot: no global state, no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _title(history: RunHistory, what: str) -> str:
    return f"{what} — {history.algorithm}, run {history.run_id}"


def _round_ticks(ax, rounds: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(12, max(2, len(rounds) + 1))))


def plot_loss(history: RunHistory, path: Path) -> Path:
    """Eval loss per round (round 0: the initial model), train loss per round, accuracy on a second axis."""
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    train = [(int(r["round"]), float(r["train_loss"])) for r in history.round_history
             if isinstance(r.get("train_loss"), (int, float)) and math.isfinite(r["train_loss"]) and r.get("updates", 1)]
    evals = [(int(e[0]), e[1]) for e in history.eval_history if math.isfinite(e[1])]
    if train:
        ax.plot(*zip(*train, strict=True), color=COLORS["train"], marker="o", markersize=4, linewidth=1.5,
                label="train loss (mean over the round's local steps)")
    if evals:
        ax.plot(*zip(*evals, strict=True), color=COLORS["eval"], marker="s", markersize=5, linewidth=2,
                label="held-out eval loss (after the round)")
    ax.set_xlabel("round")
    ax.set_ylabel("loss (cross-entropy, nats per token)")
    ax.grid(True, alpha=0.3)
    _round_ticks(ax, [r for r, _ in train + evals])
    handles, labels = ax.get_legend_handles_labels()
    accuracy = [(int(e[0]), e[2]) for e in history.eval_history if len(e) > 2 and math.isfinite(e[2])]
    if accuracy:
        ax2 = ax.twinx()
        ax2.plot(*zip(*accuracy, strict=True), color=COLORS["accuracy"], marker="^", markersize=5, linestyle="--",
                 linewidth=1.5, label="held-out accuracy")
        ax2.set_ylabel("accuracy (fraction right)", color=COLORS["accuracy"])
        ax2.set_ylim(0, 1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if not handles:
        ax.text(0.5, 0.5, "no losses recorded yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(handles, labels, loc="best", fontsize=9)
    ax.set_title(_title(history, "Loss per round"))
    fig.savefig(path)
    return path


def _byte_unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= scale:
            return scale, unit
    return 1, "bytes"


def plot_bytes(history: RunHistory, path: Path) -> Path:
    """Wire bytes per round in each direction, as paired bars; a log axis when they span decades."""
    fig = _figure(9, 5)
    ax = fig.add_subplot()
    per_round = history.round_bytes()
    positive = [b for _, u, d in per_round for b in (u, d) if b > 0]
    if not positive:
        ax.text(0.5, 0.5, "no bytes recorded yet", ha="center", va="center", transform=ax.transAxes)
    else:
        scale, unit = _byte_unit(max(positive))
        rounds = [r for r, _, _ in per_round]
        ax.bar([r - 0.2 for r in rounds], [u / scale for _, u, _ in per_round], width=0.4, color=COLORS["upload"],
               label="up: updates, workers → coordinator")
        ax.bar([r + 0.2 for r in rounds], [d / scale for _, _, d in per_round], width=0.4, color=COLORS["download"],
               label="down: blocks, coordinator → workers")
        if max(positive) / min(positive) >= 100:
            ax.set_yscale("log")
            ax.set_ylabel(f"{unit} per round (log scale)")
        else:
            ax.set_ylabel(f"{unit} per round")
        ax.set_xlabel("round")
        _round_ticks(ax, rounds)
        ax.grid(True, axis="y", alpha=0.3)
        fig.legend(loc="outside lower center", ncol=2, fontsize=9, frameon=False)
    ax.set_title(_title(history, f"Wire bytes per round (total up {history.bytes_up / 1e6:.1f} MB, "
                                 f"down {history.bytes_down / 1e6:.1f} MB)"))
    fig.savefig(path)
    return path


def plot_timeline(history: RunHistory, path: Path) -> Path | None:
    """Per worker two lanes, its compute thread (compute, idle) above its communication thread (upload,
    download), on the coordinator's run clock; thin vertical lines where rounds closed. None (nothing
    drawn) when the run recorded no timelines."""
    from matplotlib.patches import Patch

    events = history.timeline()
    if events is None:
        return None
    workers = sorted({w for w, *_ in events} | set(history.workers))
    many = len(workers) > 12  # then one label per worker, and thinner rows
    fig = _figure(12, 1.6 + 0.9 * min(len(workers), 12) + 0.3 * max(0, len(workers) - 12))
    ax = fig.add_subplot()
    lanes = {"compute": 0, "idle": 0, "upload": 1, "download": 1}
    ticks, labels = [], []
    for i, worker in enumerate(workers):
        top = (len(workers) - 1 - i) * 2.4  # the first worker on top
        for kind in KINDS:
            spans = [(s, e - s) for w, k, s, e in events if w == worker and k == kind]
            y = top + (1.1 if lanes[kind] == 0 else 0)
            ax.broken_barh(spans, (y, 0.9), facecolors=COLORS[kind], edgecolor="none")
        if many:
            ticks.append(top + 1.0)
            labels.append(worker)
        else:
            ticks += [top + 1.55, top + 0.45]
            labels += [f"{worker}  compute", f"{worker}  transfer"]
        if i:
            ax.axhline(top + 2.2, color="#dddddd", linewidth=0.8)
    closes = [(int(r["round"]), float(r["closed_at_s"])) for r in history.round_history
              if isinstance(r.get("closed_at_s"), (int, float))]
    every = max(1, math.ceil(len(closes) / 25))
    for n, (r, t) in enumerate(closes):
        ax.axvline(t, color=COLORS["round"], linewidth=0.7, linestyle=(0, (4, 3)), alpha=0.8)
        if n % every == 0 or n == len(closes) - 1:  # the round's number just above the plot
            ax.text(t, 1.01, str(r), ha="center", va="bottom", fontsize=8, color=COLORS["round"],
                    transform=ax.get_xaxis_transform())
    ax.set_yticks(ticks, labels, fontsize=9)
    ax.set_ylim(-0.2, len(workers) * 2.4)
    ax.set_xlabel("seconds on the coordinator's run clock")
    ax.grid(True, axis="x", alpha=0.25)
    legend = [Patch(color=COLORS[k], label=k) for k in KINDS]
    legend.append(_round_line())
    fig.legend(handles=legend, loc="outside lower center", ncol=5, fontsize=9, frameon=False)
    if not events:
        ax.text(0.5, 0.5, "no intervals recorded yet", ha="center", va="center", transform=ax.transAxes)
    lanes_note = "; per worker: compute thread above, transfers below" if many else ""
    ax.set_title(_title(history, f"Worker timeline (dashed lines: a round closed, numbered above{lanes_note})"),
                 pad=16)
    fig.savefig(path)
    return path


def _round_line():
    from matplotlib.lines import Line2D

    return Line2D([], [], color=COLORS["round"], linewidth=0.9, linestyle=(0, (4, 3)), label="round closed")


# ---- markdown ------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _table(header: list[str], rows: list[list[Any]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    return [_row(header), _row([":--" if a == "l" else "--:" for a in align]), *(_row(r) for r in rows), ""]


def _hardware_rows(reproduce: dict) -> list[list[Any]]:
    machines = [("coordinator", reproduce.get("coordinator"))]
    machines += sorted((reproduce.get("workers") or {}).items())
    rows = []
    for name, hw in machines:
        if not isinstance(hw, dict):
            continue
        memory = hw.get("memory_bytes")
        rows.append([name, hw.get("hostname", ""), hw.get("platform", ""), hw.get("python", ""), hw.get("torch", ""),
                     hw.get("cpu_count", ""), f"{memory / 2**30:.1f}" if isinstance(memory, (int, float)) and memory
                     else "", hw.get("accelerator") or "none"])
    return rows


def coordinator_yaml(reproduce: dict) -> str:
    """The reproduction record's coordinator options as a --config YAML file ("" without any); unset
    options (null) are left out, as the same as not given."""
    import yaml

    config = {str(k): v for k, v in (reproduce.get("config") or {}).items() if v is not None}
    return yaml.safe_dump(config, sort_keys=True, default_flow_style=False) if config else ""


def markdown(history: RunHistory, plots: dict[str, Path | None]) -> str:
    """The report: summary, plots, per-round table, per-worker time totals, what reproduces the run."""
    h = history
    first, last = (h.eval_history[0], h.eval_history[-1]) if h.eval_history else (None, None)
    total = h.rounds_total if h.rounds_total is not None else "?"
    lines = [f"# fedblock run {h.run_id}", "",
             f"Read from `{h.state_dir}`: {h.source}.", ""]
    summary = [
        ["algorithm", h.algorithm],
        ["state", h.state],
        ["rounds completed", f"{h.rounds_completed} / {total}"],
        ["workers", f"{len(h.workers)}: {', '.join(h.workers)}" if h.workers else "–"],
        ["eval loss", f"{_fmt(first[1])} (round {first[0]}) → {_fmt(last[1])} (round {last[0]})" if first else "–"],
    ]
    accuracy = [e for e in h.eval_history if len(e) > 2 and math.isfinite(e[2])]
    if accuracy:
        summary.append(["accuracy", f"{_fmt(accuracy[0][2], 3)} (round {accuracy[0][0]}) → "
                                    f"{_fmt(accuracy[-1][2], 3)} (round {accuracy[-1][0]})"])
    summary += [
        ["bytes up (updates)", f"{h.bytes_up:,} ({h.bytes_up / 1e6:.2f} MB)"],
        ["bytes down (blocks)", f"{h.bytes_down:,} ({h.bytes_down / 1e6:.2f} MB)"],
        ["wall time", f"{h.wall_seconds:.1f} s" if h.wall_seconds is not None else "–"],
    ]
    for key, value in h.extra.items():
        if key == "coordinator_peak_rss_bytes" and isinstance(value, (int, float)):
            key, value = "coordinator peak memory (RSS)", f"{value / 2**20:.0f} MiB"
        summary.append([key.replace("_", " "), value])
    lines += _table(["run", h.run_id], summary, "ll")

    lines += ["## Plots", ""]
    for name, caption in (("loss", "Loss per round"), ("bytes", "Wire bytes per round"),
                          ("timeline", "Worker timeline")):
        if plots.get(name) is not None:
            lines += [f"![{caption}]({plots[name].name})", ""]
    if plots.get("timeline") is None:
        lines += ["No timeline: this state dir has no timeline.jsonl (a coordinator older than it wrote the "
                  "run), so timeline.png was not drawn."
                  + (" The workers' own records (`fedblock simulate`, `worker --timeline`) are in "
                     "`timelines/` of the state dir, in wall-clock seconds."
                     if (h.state_dir / "timelines").is_dir() else ""), ""]

    lines += ["## Rounds", ""]
    rows = []
    for (r, up, down), rec in zip(h.round_bytes(), h.round_history, strict=True):
        evaluated = h.evaluation(r)
        loss = rec.get("train_loss")
        rows.append([r, _fmt(rec.get("seconds"), 2), rec.get("workers", "–"), rec.get("updates", "–"),
                     rec.get("tokens", "–"), _fmt(loss if isinstance(loss, (int, float)) else None),
                     _fmt(evaluated[1]) if evaluated else "", f"{up / 1e6:.3f}", f"{down / 1e6:.3f}"])
    lines += _table(["round", "seconds", "workers", "updates", "tokens", "train loss", "eval loss", "MB up", "MB down"],
                    rows)
    if first is not None and first[0] == 0:
        lines += [f"Eval loss before the first round: {_fmt(first[1])}. MB up and down are what moved during each "
                  "round (between the closes of the round before and this one).", ""]

    seconds = h.worker_seconds()
    if seconds:
        lines += ["## Workers (seconds from the timeline)", ""]
        rows = []
        for worker, s in seconds.items():
            busy = s["compute"] + s["idle"]
            rows.append([worker, *(f"{s[k]:.2f}" for k in KINDS), f"{100 * s['compute'] / busy:.0f}%" if busy else "–"])
        lines += _table(["worker", "compute s", "idle s", "upload s", "download s", "compute share"], rows)
        lines += ["Compute share: compute / (compute + idle) of the worker's compute thread. Uploads and downloads "
                  "run on the worker's communication thread, beside compute.", ""]

    lines += ["## Reproduce", ""]
    r = h.reproduce
    if not r:
        lines += ["This run's summary.json holds no reproduction record"
                  + (" yet (it is written at the end of the run)." if "progress" in h.state else
                     " (a coordinator older than it wrote the run)."), ""]
    else:
        lines += [f"fedblock revision: `{r.get('revision') or 'unknown (not a git checkout)'}`", ""]
        packages = r.get("packages") or {}
        if packages:
            lines += _table(["package", "version"], [[n, v or "not installed"] for n, v in sorted(packages.items())], "ll")
        config = coordinator_yaml(r)
        if config:
            lines += [f"The coordinator's options (unset ones left out), also in [{CONFIG_FILE}]({CONFIG_FILE}): "
                      f"`fedblock coordinator --config {CONFIG_FILE}` starts the same coordinator. The workers' own "
                      "options (their data, batch size, device) are not part of it.", "", "```yaml", config.rstrip(),
                      "```", ""]
        hardware = _hardware_rows(r)
        if hardware:
            lines += _table(["machine", "hostname", "platform", "python", "torch", "CPUs", "memory GiB", "accelerator"],
                            hardware, "llllllrl")
    return "\n".join(lines).rstrip() + "\n"


# ---- the command ---------------------------------------------------------------------------------


def write_report(config: ReportConfig) -> Path:
    """Write the plots and report.md into --out (default STATE_DIR/report); returns report.md's path."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    out = Path(config.out) if config.out is not None else Path(config.state_dir) / "report"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a folder")
    try:
        return _write_report(load_history(config.state_dir), out)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError) as e:  # a file edited or damaged by hand
        from ..server.store import StateError

        raise StateError(f"{config.state_dir}: a record is not as fedblock writes it ({type(e).__name__}: {e})") from None


def _write_report(history: RunHistory, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Path | None] = {
        "loss": plot_loss(history, out / "loss.png"),
        "bytes": plot_bytes(history, out / "bytes.png"),
        "timeline": plot_timeline(history, out / "timeline.png"),
    }
    if plots["timeline"] is None:
        (out / "timeline.png").unlink(missing_ok=True)  # one from an earlier report would mislead
    config = coordinator_yaml(history.reproduce or {})
    if config:
        (out / CONFIG_FILE).write_text(config)
    else:
        (out / CONFIG_FILE).unlink(missing_ok=True)
    path = out / "report.md"
    path.write_text(markdown(history, plots))
    return path
