"""Multi-host runs: the coordinator and two workers as real `fedblock` processes, each in its own Linux
network namespace, joined by veth pairs whose links are rate-limited with `tc` in both directions.

Per round a worker trains one block and uploads its delta, then downloads the changed block; the link
is throttled so that this traffic takes about as long as the training. `fedbcd` waits for it every
round, `parablock` trains the next round meanwhile, so the same run must be clearly faster. Needs root,
`ip` and `tc` (netem, or tbf where the kernel has no netem); skips with the reason otherwise.

Topology (ID = the pytest process id), one /30 per worker i:

    fbc-ID (coordinator, listens on 0.0.0.0:PORT)
      fvc{i}-ID 10.A.i.1/30  <-- veth -->  fvw{i}-ID 10.A.i.2/30   fbw{i}-ID (worker i)

Both veth ends are created directly inside their namespaces, so nothing is ever added to (or removed
from) the host's own namespace; deleting the namespaces removes the veths.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedblock.common.models import make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.netns]

RUN_ID = str(os.getpid())
SUBNET = 87  # 10.SUBNET.i.0/30 per worker; private to this run's namespaces, so no clash with the host
PORT = 50051
WORKERS = 2
RATE = "10mbit"  # a 2-layer hidden-128 block is ~0.6 MB: ~0.5 s each way, about one round of training
DELAY = "5ms"  # one-way, where netem exists
ROUNDS = 8
LOCAL_STEPS = 96
RUN_TIMEOUT_S = 90

NS_PATTERN = re.compile(r"^fb(?:c|w\d+)-(?:probe)?(\d+)$")  # ours: fbc-ID, fbw{i}-ID and the probe's


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _our_namespaces() -> list[tuple[str, int]]:
    out = sh("ip", "netns", "list", check=False).stdout
    found = []
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        m = NS_PATTERN.match(name)
        if m:
            found.append((name, int(m.group(1))))
    return found


def remove_stale_namespaces() -> None:
    """Namespaces with our prefix left by a run whose process is gone (a parallel live run's are kept)."""
    for name, pid in _our_namespaces():
        if pid != os.getpid() and not _alive(pid):
            sh("ip", "netns", "del", name, check=False)


def shaping_qdisc(dev: str, kind: str) -> list[str]:
    if kind == "netem":
        return ["root", "netem", "rate", RATE, "delay", DELAY, "limit", "1000"]
    # tbf: rate only. burst must cover one timer tick at this rate; latency bounds the queue.
    return ["root", "tbf", "rate", RATE, "burst", "32kb", "latency", "100ms"]


def probe_netns() -> tuple[str | None, str]:
    """(qdisc kind, '') when throwaway namespaces, a veth and a rate qdisc can be made; (None, why) if not."""
    if sys.platform != "linux":
        return None, "not Linux"
    if os.geteuid() != 0:
        return None, "needs root to create network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return None, f"`{tool}` not found (iproute2)"
    a, b = f"fbc-probe{RUN_ID}", f"fbw0-probe{RUN_ID}"
    try:
        remove_stale_namespaces()
        for ns in (a, b):
            r = sh("ip", "netns", "add", ns, check=False)
            if r.returncode:
                return None, f"`ip netns add` failed: {r.stderr.strip()}"
        r = sh("ip", "link", "add", "fvprobe0", "netns", a, "type", "veth", "peer", "name", "fvprobe1", "netns", b,
               check=False)
        if r.returncode:
            return None, f"cannot create a veth pair: {r.stderr.strip()}"
        errors = []
        for kind in ("netem", "tbf"):
            r = sh("ip", "netns", "exec", a, "tc", "qdisc", "add", "dev", "fvprobe0", *shaping_qdisc("fvprobe0", kind),
                   check=False)
            if r.returncode == 0:
                return kind, ""
            errors.append(f"{kind}: {r.stderr.strip()}")
        return None, "tc cannot shape a link (sch_netem and sch_tbf missing?): " + "; ".join(errors)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"cannot create network namespaces: {e}"
    finally:
        for ns in (a, b):
            sh("ip", "netns", "del", ns, check=False)


@dataclass
class Topology:
    workers: int
    qdisc: str

    @property
    def coordinator_ns(self) -> str:
        return f"fbc-{RUN_ID}"

    def worker_ns(self, i: int) -> str:
        return f"fbw{i}-{RUN_ID}"

    def coordinator_address(self, i: int) -> str:
        return f"10.{SUBNET}.{i}.1:{PORT}"

    def create(self) -> None:
        c = self.coordinator_ns
        for ns in (c, *map(self.worker_ns, range(self.workers))):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for i in range(self.workers):
            w, cdev, wdev = self.worker_ns(i), f"fvc{i}-{RUN_ID}", f"fvw{i}-{RUN_ID}"
            sh("ip", "link", "add", cdev, "netns", c, "type", "veth", "peer", "name", wdev, "netns", w)
            sh("ip", "-n", c, "addr", "add", f"10.{SUBNET}.{i}.1/30", "dev", cdev)
            sh("ip", "-n", w, "addr", "add", f"10.{SUBNET}.{i}.2/30", "dev", wdev)
            sh("ip", "-n", c, "link", "set", cdev, "up")
            sh("ip", "-n", w, "link", "set", wdev, "up")
            # Downloads leave the coordinator through cdev, uploads leave the worker through wdev.
            sh("ip", "netns", "exec", c, "tc", "qdisc", "add", "dev", cdev, *shaping_qdisc(cdev, self.qdisc))
            sh("ip", "netns", "exec", w, "tc", "qdisc", "add", "dev", wdev, *shaping_qdisc(wdev, self.qdisc))

    def destroy(self) -> None:
        for ns in (self.coordinator_ns, *map(self.worker_ns, range(self.workers))):
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture(scope="module")
def topology():
    kind, why = probe_netns()
    if kind is None:
        pytest.skip(f"network namespaces unavailable: {why}")
    topo = Topology(WORKERS, kind)
    try:
        topo.create()
        yield topo
    finally:
        topo.destroy()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # 2 decoder layers of hidden 128 (tied embeddings): blocks embed, layers.0, layers.1.
    return make_tiny_model(tmp_path_factory.mktemp("netns") / "llama", "llama", seed=0, num_layers=2, hidden_size=128)


@dataclass
class Run:
    algorithm: str
    summary: dict
    timelines: list[list[dict]]  # per worker
    outputs: dict[str, str]

    @property
    def rounds_seconds(self) -> float:
        """From the first local step of any worker to the end of the last worker's last transfer."""
        events = [e for t in self.timelines for e in t]
        start = min(e["start"] for e in events if e["kind"] == "compute")
        return max(e["end"] for e in events) - start


def _in_ns(ns: str, log: Path, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "fedblock.common.cli", *map(str, args)],
                                env=env, stdout=f, stderr=subprocess.STDOUT)


def run_federation(topo: Topology, algorithm: str, model: Path, data: Path, work: Path) -> Run:
    state = work / "state"
    logs = {"coordinator": work / "coordinator.log", **{f"w{i}": work / f"w{i}.log" for i in range(topo.workers)}}
    procs = {
        "coordinator": _in_ns(
            topo.coordinator_ns, logs["coordinator"], "coordinator", "--model", model, "--state-dir", state,
            "--listen", f"0.0.0.0:{PORT}", "--algorithm", algorithm, "--rounds", ROUNDS, "--local-steps", LOCAL_STEPS,
            "--lr", "1e-3", "--min-workers", topo.workers, "--block-schedule", "round-robin", "--train-blocks", "layers.*",
            "--seed", 0, "--round-timeout", 0, "--heartbeat-interval", 1, "--threads", 1,
        )
    }
    for i in range(topo.workers):
        procs[f"w{i}"] = _in_ns(
            topo.worker_ns(i), logs[f"w{i}"], "worker", "--coordinator", topo.coordinator_address(i), "--name", f"w{i}",
            "--data", data, "--batch-size", 4, "--max-seq-len", 64, "--seed", i, "--threads", 1, "--device", "cpu",
            "--connect-timeout", 60, "--timeline", work / f"w{i}.timeline.jsonl",
        )
    started = time.monotonic()
    deadline = started + RUN_TIMEOUT_S
    ended: dict[str, float] = {}
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs.values()):
            for name, p in procs.items():
                if p.returncode is not None:
                    ended.setdefault(name, time.monotonic() - started)
            if any(p.returncode not in (None, 0) for p in procs.values()):
                break  # one failed: stop the others rather than wait out the timeout
            time.sleep(0.1)
        for name, p in procs.items():
            ended.setdefault(name, time.monotonic() - started)
        print(f"\n{algorithm} exits:", {k: round(v, 1) for k, v in ended.items()}, time.strftime("%X"))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
    outputs = {name: path.read_text(errors="replace") for name, path in logs.items()}
    codes = {name: p.returncode for name, p in procs.items()}
    tails = "\n".join(f"--- {name} (exit {codes[name]}) ---\n{outputs[name][-3000:]}" for name in procs)
    assert all(c == 0 for c in codes.values()), f"{algorithm}: a process failed or timed out ({RUN_TIMEOUT_S} s)\n{tails}"
    summary = json.loads((state / "summary.json").read_text())
    timelines = [[json.loads(line) for line in (work / f"w{i}.timeline.jsonl").read_text().splitlines()]
                 for i in range(topo.workers)]
    return Run(algorithm, summary, timelines, outputs)


@pytest.fixture(scope="module")
def runs(topology, model_dir, data_file, tmp_path_factory):
    """runs(algorithm) -> Run, each algorithm run once per module on the same topology and inputs."""
    done: dict[str, Run | BaseException] = {}

    def get(algorithm: str) -> Run:
        if algorithm not in done:
            try:
                done[algorithm] = run_federation(topology, algorithm, model_dir, data_file,
                                                 tmp_path_factory.mktemp(f"netns-{algorithm}"))
            except BaseException as e:
                done[algorithm] = e
        result = done[algorithm]
        if isinstance(result, BaseException):
            raise result
        print(f"\n{algorithm}: wall_seconds {result.summary['wall_seconds']:.2f}, "
              f"rounds {result.rounds_seconds:.2f} s ({topology.qdisc} {RATE})")
        return result

    return get


def _spans(timeline: list[dict], kind: str) -> dict[int, tuple[float, float]]:
    return {e["round"]: (e["start"], e["end"]) for e in timeline if e["kind"] == kind}


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


@pytest.mark.parametrize("algorithm", ["fedbcd", "parablock"])
def test_run_completes_across_namespaces(runs, algorithm):
    run = runs(algorithm)
    s = run.summary
    assert s["algorithm"] == algorithm
    assert s["rounds_completed"] == ROUNDS and s["workers"] == WORKERS
    assert s["updates_accepted"] == ROUNDS * WORKERS
    assert f"round {ROUNDS}/{ROUNDS} closed" in run.outputs["coordinator"]
    for timeline in run.timelines:
        assert sorted(_spans(timeline, "compute")) == list(range(1, ROUNDS + 1))
        assert sorted(_spans(timeline, "upload")) == list(range(1, ROUNDS + 1))


def test_parablock_overlaps_uploads_with_training(runs):
    for timeline in runs("fedbcd").timelines:
        compute, upload = _spans(timeline, "compute"), _spans(timeline, "upload")
        assert all(_overlap(u, c) < 0.01 for u in upload.values() for c in compute.values()), timeline
    for timeline in runs("parablock").timelines:
        compute, upload = _spans(timeline, "compute"), _spans(timeline, "upload")
        overlapped = [r for r in range(1, ROUNDS) if _overlap(upload[r], compute[r + 1]) > 0.05]
        assert len(overlapped) >= ROUNDS // 2, (overlapped, timeline)


def test_parablock_beats_fedbcd_on_a_throttled_link(runs):
    fedbcd, parablock = runs("fedbcd"), runs("parablock")
    ratio = parablock.rounds_seconds / fedbcd.rounds_seconds
    print(f"\nparablock / fedbcd: rounds {ratio:.2f}, "
          f"wall {parablock.summary['wall_seconds'] / fedbcd.summary['wall_seconds']:.2f}")
    assert ratio <= 0.85, (parablock.rounds_seconds, fedbcd.rounds_seconds)
    assert parablock.summary["wall_seconds"] < fedbcd.summary["wall_seconds"]
