"""deploy/prometheus/: the alert rules and the scrape configuration pass promtool's checks, and the rules'
unit tests (alerts.test.yml) pass and cover every alert both firing and not firing. promtool comes from
Debian's `prometheus` package, which `make install` installs when it can (root or sudo -n)."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: install Debian's `prometheus` package (`make install` as root does)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def alert_names() -> list[str]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def test_rule_files_parse_and_are_wired():
    names = alert_names()
    assert len(names) == len(set(names))
    assert {"FedblockWorkerLost", "FedblockRoundStalled", "FedblockUpdatesRejected", "FedblockNoProgress"} <= set(names)
    prom = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["alerts.yml"]  # relative to prometheus.yml, as in the container
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]  # relative to the test file
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    vols = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in vols


def test_every_alert_has_a_firing_and_a_quiet_case():
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    firing: dict[str, int] = {}
    quiet: dict[str, int] = {}
    for t in tests:
        for case in t.get("alert_rule_test", []):
            bucket = firing if case.get("exp_alerts") else quiet
            bucket[case["alertname"]] = bucket.get(case["alertname"], 0) + 1
    for name in alert_names():
        assert firing.get(name), f"{name}: no test case where it fires"
        assert quiet.get(name), f"{name}: no test case where it stays quiet"
    assert set(firing) | set(quiet) <= set(alert_names())  # no test of an alert that does not exist


def test_rules_use_known_metrics():
    known = {"up", "fedblock_peer_connected", "fedblock_run_state", "fedblock_round_started_timestamp_seconds",
             "fedblock_round_duration_seconds_sum", "fedblock_round_duration_seconds_count", "fedblock_updates_total",
             "fedblock_rounds_completed_total",
             # the Python client's creation time of each counter child, and of the process
             "fedblock_updates_created", "process_start_time_seconds"}
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    for rule in (r for g in groups for r in g["rules"]):
        names = set(re.findall(r"\b((?:fedblock_|up\b)[A-Za-z0-9_]*)", rule["expr"]))
        assert names and names <= known, (rule["alert"], names - known)


def test_rule_decisions():
    rules = {r["alert"]: r for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    # a young coordinator process is not "stuck": its 30-minute windows hold only its own samples
    assert "process_start_time_seconds" in rules["FedblockNoProgress"]["expr"]
    assert "1800" in rules["FedblockNoProgress"]["expr"]
    # a new reason is told by its creation time, not by a sample 10 minutes back
    assert "offset" not in rules["FedblockUpdatesRejected"]["expr"]
    assert "fedblock_updates_created" in rules["FedblockUpdatesRejected"]["expr"]
    # an operator's stop raises it too (silenced in Alertmanager), so it is a warning after 5 minutes
    down = rules["FedblockCoordinatorDown"]
    assert down["labels"]["severity"] == "warning" and down["for"] == "5m"
    assert "finished" in down["expr"] and "maintenance" in down["annotations"]["description"]


@needs_promtool
def test_promtool_check_rules():
    r = promtool("check", "rules", "deploy/prometheus/alerts.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(alert_names())} rules found" in r.stdout


@needs_promtool
def test_promtool_check_config():
    # rule_files are resolved relative to the config file, so this also checks alerts.yml is found
    r = promtool("check", "config", "deploy/prometheus/prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout


@needs_promtool
def test_promtool_test_rules():
    r = promtool("test", "rules", "deploy/prometheus/alerts.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
