"""A real Prometheus server (Debian's `prometheus`, which `make install` puts on a fresh machine) scrapes
a live coordinator and two worker processes. PromQL must see the rounds, the bytes and every local
step of every worker (the workers linger after the run, so their last values are scraped), every panel
of the Grafana dashboard must have data, the alert rules must load and stay quiet on a healthy run, and
`promtool check metrics` must find nothing on either side."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from fedblock.common.simulate import free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "fedblock.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
ROUNDS, STEPS = 40, 4  # a run of some 15 s: the dashboard is asked while it runs

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS is None or PROMTOOL is None,
                       reason="needs Debian's prometheus package (prometheus, promtool): `make install` installs it as root"),
]


def fedblock(*args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedblock.common.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


def until(condition, timeout: float, what: str, every: float = 0.2):
    """Poll `condition()` until it returns something true (returned) or the deadline (fail with `what`)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except OSError as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(every)
    raise AssertionError(f"{what} (last: {last!r})")


class Prometheus:
    def __init__(self, port: int):
        self.url = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict]:
        body = json.loads(get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})))
        assert body["status"] == "success", body
        return body["data"]["result"]

    def values(self, expr: str) -> dict[str, float]:
        """{instance or worker label: value} of an instant vector."""
        return {r["metric"].get("worker") or r["metric"].get("instance", ""): float(r["value"][1])
                for r in self.query(expr)}


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]  # a collapsed row holds its panels
    return [(p.get("title", "?"), t["expr"]) for p in panels for t in p.get("targets", []) if t.get("expr")]


@pytest.fixture
def processes():
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def test_prometheus_scrapes_a_live_run(tmp_path, tiny_model, data_file, processes):
    grpc_port, coordinator_port, prometheus_port = free_port(), free_port(), free_port()
    worker_ports = [free_port(), free_port()]
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": "fedblock-coordinator", "static_configs": [{"targets": [f"127.0.0.1:{coordinator_port}"]}]},
            {"job_name": "fedblock-worker",
             "static_configs": [{"targets": [f"127.0.0.1:{p}"], "labels": {"site": f"site-{i}"}}
                                for i, p in enumerate(worker_ports)]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    processes.append(subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    prom = Prometheus(prometheus_port)
    until(lambda: get(f"{prom.url}/-/ready") is not None, 60, "Prometheus did not become ready")

    state = tmp_path / "state"
    # Both sides linger up to a minute, and SIGTERM ends that early once everything is checked.
    coordinator = fedblock(
        "coordinator", "--model", tiny_model, "--state-dir", state, "--listen", f"127.0.0.1:{grpc_port}",
        "--metrics-port", coordinator_port, "--rounds", ROUNDS, "--local-steps", STEPS, "--min-workers", 2,
        "--algorithm", "parablock", "--eval-data", data_file, "--eval-every", 2, "--eval-max-examples", 16,
        "--heartbeat-interval", 1, "--linger", 60, "--threads", 1, "--insecure",
    )
    workers = [
        fedblock("worker", "--coordinator", f"127.0.0.1:{grpc_port}", "--name", f"site-{i}", "--data", data_file,
                 "--metrics-port", worker_ports[i], "--linger", 60, "--batch-size", 4, "--max-seq-len", 64,
                 "--seed", i, "--threads", 1, "--insecure")
        for i in range(2)
    ]
    processes += [coordinator, *workers]

    # During the run: the rounds advance as Prometheus sees them, and every panel of the dashboard
    # has data while the run state is "running".
    until(lambda: any(v >= 1 for v in prom.values("fedblock_rounds_completed_total").values()), 120,
          "Prometheus never saw a completed round")
    queries = panel_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 8
    empty = set(queries)
    while empty and prom.query('fedblock_run_state{state="running"} == 1'):
        empty = {(title, expr) for title, expr in empty if not prom.query(expr.replace("$__rate_interval", "1m"))}
        time.sleep(0.5)
    assert not empty, f"panels without data while the run was running: {sorted(empty)}"
    summary_path = state / "summary.json"
    until(lambda: summary_path.exists() or coordinator.poll() is not None, 120, "the run did not end")
    assert coordinator.poll() is None, coordinator.communicate()[0]
    summary = json.loads(summary_path.read_text())
    assert summary["rounds_completed"] == ROUNDS

    # After it: the final values, from processes that are still serving them.
    def final(expr, expected):
        def reached():
            v = prom.values(expr)
            return v if v and all(x == expected for x in v.values()) else None

        return until(reached, 30, f"{expr} never reached {expected}")

    final("fedblock_rounds_completed_total", ROUNDS)
    assert len(final("fedblock_worker_local_steps_total", ROUNDS * STEPS)) == 2  # each worker trains every round
    final('sum(fedblock_worker_local_steps_total{job="fedblock-worker"})', 2 * ROUNDS * STEPS)
    final('fedblock_bytes_received_total{kind="update"}', summary["bytes_up"])
    final('fedblock_bytes_sent_total{kind="model"}', summary["bytes_down"])
    final('sum(fedblock_updates_total{status="accepted"})', 2 * ROUNDS)
    final("fedblock_peer_updates_accepted_total", ROUNDS)  # per worker, by the coordinator's count
    final('fedblock_round_phase_seconds_count{phase="checkpoint"}', ROUNDS)
    final('fedblock_worker_phase_seconds_count{phase="training"}', ROUNDS)
    assert prom.values('fedblock_run_state{state="finished"}') == {f"127.0.0.1:{coordinator_port}": 1.0}
    worker_sent = sum(prom.values('fedblock_worker_bytes_sent_total{kind="update"}').values())
    assert worker_sent == summary["bytes_up"]  # both ends count the same wire bytes

    # The alert rules load, evaluate, and none fires on this healthy run.
    groups = json.loads(get(f"{prom.url}/api/v1/rules"))["data"]["groups"]
    rules = [r for g in groups for r in g["rules"] if r["type"] == "alerting"]
    assert len(rules) >= 4
    until(lambda: all(r.get("lastEvaluation", "").startswith("20") for r in
                      (r for g in json.loads(get(f"{prom.url}/api/v1/rules"))["data"]["groups"] for r in g["rules"])),
          30, "the rules were never evaluated")
    bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad
    firing = [a["labels"]["alertname"] for a in json.loads(get(f"{prom.url}/api/v1/alerts"))["data"]["alerts"]
              if a["state"] == "firing"]
    assert not firing

    # promtool finds nothing to complain about in either side's exposition.
    for port in (coordinator_port, *worker_ports):
        text = get(f"http://127.0.0.1:{port}/metrics")
        check = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30)
        assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (port, check)

    # SIGTERM ends the lingering at once, and cleanly.
    for p in (*workers, coordinator):
        p.send_signal(signal.SIGTERM)
    for p in (*workers, coordinator):
        out = p.communicate(timeout=30)[0]
        assert p.returncode == 0, out
