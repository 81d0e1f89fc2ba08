"""Separate processes through the CLI: a coordinator and two workers on a tiny model, then export,
reload, metrics. This is the deployment path (`fedblock coordinator` + `fedblock worker`)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from fedblock.server.store import StateStore

pytestmark = pytest.mark.slow


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fedblock(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedblock.common.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_coordinator_and_two_worker_processes(tmp_path, tiny_model, data_file):
    port, metrics_port = free_port(), free_port()
    worker_ports = [free_port(), free_port()]
    state = tmp_path / "state"
    coordinator = fedblock(
        "coordinator", "--model", tiny_model, "--state-dir", state, "--listen", f"127.0.0.1:{port}",
        "--metrics-port", metrics_port, "--rounds", 6, "--local-steps", 20, "--min-workers", 2,
        "--block-schedule", "staggered", "--eval-data", data_file, "--linger", 60, "--threads", 1, "--insecure",
    )
    workers = [
        fedblock("worker", "--coordinator", f"127.0.0.1:{port}", "--name", f"site-{i}", "--data", data_file,
                 "--metrics-port", worker_ports[i], "--batch-size", 4, "--max-seq-len", 64, "--seed", i, "--threads", 1,
                 "--insecure")
        for i in range(2)
    ]
    try:
        # Scrape a worker while it trains.
        worker_samples = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and workers[0].poll() is None:
            try:
                s = scrape(worker_ports[0])
                if (value(s, "fedblock_worker_local_steps_total") or 0) > 0:
                    worker_samples = s
            except OSError:
                pass
            time.sleep(0.02)
        outputs = [w.communicate(timeout=120)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], outputs
        summary_path = state / "summary.json"
        while not summary_path.exists() and coordinator.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        summary = json.loads(summary_path.read_text())

        # The coordinator lingers: its metrics and status are still served.
        s = scrape(metrics_port)
        assert value(s, "fedblock_rounds_completed_total") == 6
        assert value(s, "fedblock_round") == 6 and value(s, "fedblock_model_version") == 6
        assert value(s, "fedblock_updates_total", status="accepted", reason="") == 12
        assert value(s, "fedblock_bytes_received_total", kind="update") == summary["bytes_up"] > 0
        assert value(s, "fedblock_bytes_sent_total", kind="model") == summary["bytes_down"] > 0
        assert value(s, "fedblock_round_duration_seconds_count") == 6
        assert value(s, "fedblock_checkpoint_duration_seconds_count") == 6
        assert value(s, "fedblock_aggregation_duration_seconds_count") == 12
        assert value(s, "fedblock_eval_loss") == pytest.approx(summary["eval_loss_final"])
        assert value(s, "fedblock_workers_connected") is not None
        status = subprocess.run([sys.executable, "-m", "fedblock.common.cli", "status", "--coordinator", f"127.0.0.1:{port}",
                                 "--insecure"],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "finished" in status.stdout and "site-1" in status.stdout

        assert worker_samples is not None, "never scraped a training worker"
        for name in ("fedblock_worker_train_loss", "fedblock_worker_compute_seconds_total", "fedblock_worker_comm_seconds_total",
                     "fedblock_worker_compute_idle_seconds_total"):
            assert value(worker_samples, name) is not None, name
        assert value(worker_samples, "fedblock_worker_bytes_received_total", kind="model") > 0

        assert summary["algorithm"] == "parablock" and summary["rounds_completed"] == 6 and summary["workers"] == 2
        assert summary["eval_loss_final"] < summary["eval_loss_initial"]
        for key in ("bytes_up", "bytes_down", "wall_seconds", "export_path"):
            assert summary[key]

        # The export is the global model of the last checkpoint, loadable by transformers.
        model = AutoModelForCausalLM.from_pretrained(summary["export_path"])
        store = StateStore(state)
        ckpt = store.latest()
        assert ckpt.round == 6
        params = dict(model.named_parameters())
        for tensors in store.load_blocks(ckpt).values():
            for n, t in tensors.items():
                assert torch.equal(params[n], t), n
    finally:
        coordinator.send_signal(signal.SIGTERM)
        out = coordinator.communicate(timeout=60)[0]
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert coordinator.returncode == 0, out
    assert "round 6/6 closed" in out


def test_simulate_runs_a_federation_and_reports(tmp_path, tiny_model, data_file):
    state = tmp_path / "sim"
    proc = fedblock("simulate", "--model", tiny_model, "--data", data_file, "--workers", 2, "--split", "dirichlet:0.5",
                    "--rounds", 3, "--local-steps", 5, "--state-dir", state, "--algorithm", "fedbcd",
                    "--batch-size", 4, "--max-seq-len", 64, "--threads", 1)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode == 0, out
    summary = json.loads((state / "summary.json").read_text())
    assert summary["algorithm"] == "fedbcd" and summary["rounds_completed"] == 3 and summary["workers"] == 2
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    assert "held-out eval loss" in out and "[worker-1]" in out and "[coordinator]" in out
    shards = [len((state / "data" / f"worker-{i}.jsonl").read_text().splitlines()) for i in range(2)]
    held_out = len((state / "data" / "eval.jsonl").read_text().splitlines())
    assert sum(shards) + held_out == 48 and min(shards) > 0 and held_out == 5
    AutoModelForCausalLM.from_pretrained(summary["export_path"])


def test_simulate_stops_everything_when_a_process_fails(tmp_path, tiny_model, data_file):
    # With 8 tokens no answer survives truncation: the coordinator refuses its eval data; nothing may hang.
    proc = fedblock("simulate", "--model", tiny_model, "--data", data_file, "--workers", 2, "--rounds", 2,
                    "--state-dir", tmp_path / "sim", "--max-seq-len", 8, "--threads", 1)
    out = proc.communicate(timeout=180)[0]
    assert proc.returncode != 0
    assert "stopping everything" in out or "failed" in out
