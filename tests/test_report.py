"""`fedblock report STATE_DIR` (plots and report.md from a state dir) and `fedblock status --watch`.

One short tiny-model run (2 workers in threads, real gRPC on loopback) serves every test here: while it
runs, `fedblock status --watch 0.2` follows it to its end; the reports read its state dir, or copies of
it cut back to how it looked during the run."""

import contextlib
import io
import json
import shutil
import struct
import sys
import threading

import pytest
from conftest import Federation

from fedblock.common.cli import main
from fedblock.common.config import CoordinatorConfig
from fedblock.common.report import load_history

ROUNDS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, data_file):
    """A finished run's state dir, its summary, and what `status --watch 0.2` printed and returned."""
    from fedblock.server import daemon

    state = tmp_path_factory.mktemp("report") / "state"
    config = CoordinatorConfig(model=str(tiny_model), state_dir=state, listen="127.0.0.1:0", insecure=True,
                               rounds=ROUNDS, local_steps=2, lr=1e-3, min_workers=2, eval_data=str(data_file),
                               eval_every=1, eval_max_examples=8, keep_checkpoints=10)
    fed = Federation(daemon.start(config))
    try:
        watched, out = {}, io.StringIO()  # not a terminal: one block per refresh

        def watch():
            watched["rc"] = main(["status", "--coordinator", fed.address, "--insecure", "--watch", "0.2"])

        with contextlib.redirect_stdout(out):  # only the watch writes to stdout (the rest logs to stderr)
            t = threading.Thread(target=watch, daemon=True)
            t.start()
            for i in range(2):
                fed.add_worker(fed.worker_config(f"w{i}", data_file))
            summary = fed.run()
            t.join(30)
        assert not t.is_alive(), "status --watch did not end with the run"
        yield {"state": state, "summary": summary, "watch_rc": watched.get("rc"), "watch_out": out.getvalue(),
               "address": fed.address}
    finally:
        fed.close()


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def rounds_table(report: str) -> list[list[str]]:
    """The rows of report.md's per-round table, as cells."""
    section = report.split("## Rounds", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    assert rows[0][:3] == ["round", "seconds", "workers"]
    return rows[2:]  # past the header and the alignment row


def test_report_refuses_what_is_not_a_state_dir(tmp_path, capsys, monkeypatch):
    """(First: no run's threads log to stderr yet.)"""
    (tmp_path / "some.txt").write_text("x")
    for target in (tmp_path, tmp_path / "missing"):
        assert main(["report", str(target)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fedblock report: error:") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "report").exists()  # nothing written
    assert main(["report"]) == 2 and "--state-dir is required" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert main(["report", str(tmp_path)]) == 2
    assert "pip install 'fedblock[report]'" in capsys.readouterr().err


def test_report_of_a_finished_run(run, tmp_path):
    summary, out = run["summary"], tmp_path / "out"
    assert main(["report", str(run["state"]), "--out", str(out)]) == 0
    for name in ("loss.png", "bytes.png"):
        width, height = png_size(out / name)
        assert width >= 800 and height >= 400 and (out / name).stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert f"# fedblock run {summary['run_id']}" in report and "| state | finished |" in report
    assert f"| rounds completed | {ROUNDS} / {ROUNDS} |" in report and "w0, w1" in report
    assert "![Loss per round](loss.png)" in report and "![Wire bytes per round](bytes.png)" in report

    rows, history = rounds_table(report), summary["round_history"]
    assert [int(r[0]) for r in rows] == list(range(1, ROUNDS + 1))
    evaluated = {int(e[0]): e[1] for e in summary["eval_history"]}
    for row, rec in zip(rows, history, strict=True):
        assert int(row[2]) == rec["workers"] and int(row[3]) == rec["updates"] and int(row[4]) == rec["tokens"]
        assert float(row[5]) == pytest.approx(rec["train_loss"], abs=1e-4)
        assert float(row[6]) == pytest.approx(evaluated[rec["round"]], abs=1e-4)
    # Bytes per round are the differences of the cumulative counters: they add up to the totals.
    per_round = load_history(run["state"]).round_bytes()
    assert sum(u for _, u, _ in per_round) == history[-1]["bytes_up"] == summary["bytes_up"] > 0
    assert sum(d for _, _, d in per_round) == history[-1]["bytes_down"]
    assert sum(float(r[7]) for r in rows) == pytest.approx(summary["bytes_up"] / 1e6, abs=1e-3 * ROUNDS)
    assert f"{summary['bytes_up']:,}" in report

    width, height = png_size(out / "timeline.png")  # the coordinator recorded the workers' intervals
    assert width >= 1000 and "![Worker timeline](timeline.png)" in report and "| w0 |" in report

    older = tmp_path / "older"  # a state dir of a coordinator that recorded no timeline
    shutil.copytree(run["state"], older, ignore=shutil.ignore_patterns("export", "report", "timeline.jsonl"))
    assert main(["report", str(older)]) == 0
    assert not (older / "report" / "timeline.png").exists() and "No timeline" in (older / "report" / "report.md").read_text()


def test_report_during_a_run_and_its_timeline(run, tmp_path):
    """A state dir as a running coordinator leaves it: checkpoints, no summary.json (here also a damaged
    newest checkpoint); the report reads the newest readable one, into STATE_DIR/report by default."""
    state = tmp_path / "state"
    shutil.copytree(run["state"], state, ignore=shutil.ignore_patterns("export", "summary.json", "report"))
    (state / "checkpoints" / f"round-{ROUNDS:06d}.json").unlink()
    (state / "checkpoints" / f"round-{ROUNDS:06d}.json").write_text('{"round": 4, "block_ver')  # cut short
    lines = []
    for i in range(1, ROUNDS + 1):  # intervals as the coordinator records them, round ROUNDS twice (a redo)
        t = float(i - 1)
        lines.append(json.dumps({"round": min(i, ROUNDS - 1), "intervals": [
            ["w0", "download", t, t + 0.1], ["w0", "compute", t + 0.1, t + 0.6], ["w0", "upload", t + 0.6, t + 0.8],
            ["w0", "idle", t + 0.6, t + 0.7], ["w1", "compute", t + 0.2, t + 0.9]]}))
    (state / "timeline.jsonl").write_text("\n".join(lines) + '\n{"round": 9, "interv')  # and a torn last line

    assert main(["report", str(state)]) == 0
    out = state / "report"
    report = (out / "report.md").read_text()
    assert "in progress" in report and f"| rounds completed | {ROUNDS - 1} / ? |" in report
    assert [int(r[0]) for r in rounds_table(report)] == list(range(1, ROUNDS))
    assert "round-000003.json (no summary.json yet)" in report and "no reproduction record yet" in report
    width, height = png_size(out / "timeline.png")
    assert width >= 1000 and height >= 250
    n = ROUNDS - 1
    assert f"| w0 | {0.5 * n:.2f} | {0.1 * n:.2f} | {0.2 * n:.2f} | {0.1 * n:.2f} | 83% |" in report
    assert f"| w1 | {0.7 * n:.2f} | 0.00 | 0.00 | 0.00 | 100% |" in report


def test_report_shows_the_reproduction_record(run, tmp_path):
    state = tmp_path / "state"
    shutil.copytree(run["state"], state, ignore=shutil.ignore_patterns("export", "report"))
    summary = json.loads((state / "summary.json").read_text())
    hardware = {"hostname": "site-a", "platform": "Linux-6.1-x86_64", "python": "3.11.2", "torch": "2.13.0",
                "cpu_count": 16, "memory_bytes": 64 * 2**30, "accelerator": "NVIDIA H200, 139 GiB"}
    summary["reproduce"] = {"revision": "0123abc-dirty", "packages": {"torch": "2.13.0", "peft": None},
                            "config": {"rounds": ROUNDS, "algorithm": "parablock", "pipeline_depth": None},
                            "coordinator": {**hardware, "hostname": "hub", "accelerator": ""},
                            "workers": {"w0": hardware}}
    (state / "summary.json").write_text(json.dumps(summary))
    assert main(["report", "--state-dir", str(state)]) == 0
    report = (state / "report" / "report.md").read_text().split("## Reproduce", 1)[1]
    assert "`0123abc-dirty`" in report and "| torch | 2.13.0 |" in report and "| peft | not installed |" in report
    assert "```yaml\nalgorithm: parablock\nrounds: 4\n```" in report
    assert (state / "report" / "coordinator.yaml").read_text() == "algorithm: parablock\nrounds: 4\n"
    assert "| coordinator | hub |" in report and "| none |" in report
    assert "| w0 | site-a | Linux-6.1-x86_64 | 3.11.2 | 2.13.0 | 16 | 64.0 | NVIDIA H200, 139 GiB |" in report


def test_status_watch_follows_the_run_to_its_end(run):
    assert run["watch_rc"] == 0
    blocks = run["watch_out"].strip("\n").split("\n\n")
    assert len(blocks) >= 2 and "\x1b" not in run["watch_out"]  # not a terminal: blocks, no redraws
    assert all(b.startswith("fedblock status ") for b in blocks)
    last = blocks[-1]
    assert f"finished, {ROUNDS}/{ROUNDS} rounds completed\n" in last and "[" + "#" * 30 + "] 100%" in last
    assert "w0" in last and "w1" in last and "last eval loss" in last
    assert any("waiting" in b or "running" in b for b in blocks[:-1])


def test_status_watch_redraws_on_a_terminal(run, monkeypatch, capsys):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stdout", tty)
    # The run is over and its coordinator still serves: one view, drawn over the screen, and exit 0.
    assert main(["status", "--watch", "--coordinator", run["address"], "--insecure"]) == 0
    view = tty.getvalue()
    assert view.startswith("\x1b[H\x1b[2J") and view.count("\x1b[2J") == 1 and ", every 2 s" in view
    assert f"finished, {ROUNDS}/{ROUNDS} rounds completed" in view
    assert main(["status", "--coordinator", run["address"], "--insecure"]) == 0  # once, without --watch
    assert "\x1b" not in tty.getvalue()[len(view):] and "finished" in tty.getvalue()[len(view):]
    assert main(["status", "--coordinator", run["address"], "--insecure", "--watch", "-1"]) == 2
    assert "--watch must be" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["round", "bytes", "seconds", "not_a_dict", "workers_list", "summary_rounds"])
def test_report_of_a_hand_damaged_state_dir_is_one_line(run, tmp_path, damage, capsys):
    """Records edited or damaged by hand: one line naming the state dir, exit 2, no traceback."""
    state = tmp_path / "state"
    shutil.copytree(run["state"], state, ignore=shutil.ignore_patterns("export", "report"))
    path = state / "summary.json"
    summary = json.loads(path.read_text())
    history = summary["round_history"]
    if damage == "round":
        history[1]["round"] = "two"
    elif damage == "bytes":
        history[1]["bytes_up"] = "lots"
    elif damage == "seconds":
        history[1]["seconds"] = "x"
    elif damage == "not_a_dict":
        history[1] = 7
    elif damage == "workers_list":
        summary["worker_names"] = 5
    else:
        summary["rounds_completed"] = "four"
    path.write_text(json.dumps(summary))
    code = main(["report", str(state)])
    err = capsys.readouterr().err
    assert code in (0, 2) and "Traceback" not in err
    if code == 2:
        assert str(state) in err and len(err.strip().splitlines()) == 1
