"""Multi-host runs: the coordinator and two workers as real `fedblock` processes, each in its own Linux
network namespace, joined by veth pairs whose links are rate-limited with `tc` in both directions.

Per round a worker trains one block and uploads its delta, then downloads the changed block; the link
is throttled so that this traffic takes about as long as the training. `fedbcd` waits for it every
round, `parablock` trains the next round meanwhile, so the same run must be clearly faster (unless other
processes kept the CPUs busy meanwhile: then a miss is a skip). Needs root, `ip` and `tc` with sch_tbf
(rate) or sch_netem (rate and delay); skips with the reason otherwise.

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
import resource
import shutil
import signal
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
# Sizing. A worker's transfer thread uploads its block and then downloads the new one, one after the
# other: per round the link costs T = 2 x block size / rate (a layer block of the hidden-128 model is
# 0.59 MB: T = 0.79 s at 12 Mbit/s). fedbcd takes about C + T a round, parablock about max(C, T), C
# being the training time. --local-steps is calibrated on this machine for C ~ COMPUTE_VS_LINK x T on an
# idle machine (100-130 steps on the 2-core box), where parablock / fedbcd comes out ~0.55-0.7; other
# load on the machine only makes C longer, where parablock still wins, unless it slows one run much
# more than the other.
RATE_MBIT = 12
COMPUTE_VS_LINK = 1.0
DELAY = "5ms"  # one-way, only where netem is the shaper
ROUNDS = 6
BATCH, SEQ = 4, 64  # the workers' --batch-size and --max-seq-len (the examples are ~40 tokens)
RUN_TIMEOUT_S = 180
MAX_RATIO = 0.85  # parablock's time over fedbcd's must be at most this
BUSY_CPUS = 0.25 * (os.cpu_count() or 1)  # other processes using more than this make timings moot

NS_PATTERN = re.compile(r"^fb(?:c|w\d+)-(?:probe)?(\d+)$")  # ours: fbc-ID, fbw{i}-ID and the probe's


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and r.returncode:
        raise RuntimeError(f"`{' '.join(args)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r


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


SHAPERS = ("tbf", "netem")  # tbf first: the one verified here (this kernel has no sch_netem)


def shaping_qdisc(kind: str) -> list[str]:
    """`tc qdisc add dev DEV` arguments that limit DEV's egress to RATE_MBIT."""
    if kind == "netem":
        return ["root", "netem", "rate", f"{RATE_MBIT}mbit", "delay", DELAY, "limit", "1000"]
    # burst must cover one timer tick at this rate; latency bounds the queue (~100 KB here).
    return ["root", "tbf", "rate", f"{RATE_MBIT}mbit", "burst", "32kb", "latency", "100ms"]


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
        for kind in SHAPERS:
            r = sh("ip", "netns", "exec", a, "tc", "qdisc", "add", "dev", "fvprobe0", *shaping_qdisc(kind), check=False)
            if r.returncode == 0:
                return kind, ""
            errors.append(f"{kind}: {r.stderr.strip()}")
        return None, "tc cannot shape a link (sch_tbf and sch_netem missing?): " + "; ".join(errors)
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
            sh("ip", "netns", "exec", c, "tc", "qdisc", "add", "dev", cdev, *shaping_qdisc(self.qdisc))
            sh("ip", "netns", "exec", w, "tc", "qdisc", "add", "dev", wdev, *shaping_qdisc(self.qdisc))

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


@pytest.fixture(scope="module")
def local_steps(model_dir) -> int:
    """Local steps that take COMPUTE_VS_LINK times as long as a round's transfers, from a proxy of a
    worker's step timed here: forward and backward of the test model at the workers' batch shape, AdamW
    on one layer, one thread. Timed in CPU time (the least of a few repeats), which is what an idle
    machine would take: wall time here depends on whatever else runs."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.train()
    layer = {n: p for n, p in model.named_parameters() if ".layers.0." in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n in layer)
    optimizer = torch.optim.AdamW(layer.values(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, 40), generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def steps(n: int) -> float:
            t = time.thread_time()
            for _ in range(n):
                model(input_ids=ids, labels=ids).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return (time.thread_time() - t) / n

        steps(3)
        step_s = min(steps(5) for _ in range(8))
    finally:
        torch.set_num_threads(threads)
    transfer_s = 2 * sum(p.numel() * 4 for p in layer.values()) * 8 / (RATE_MBIT * 1e6)
    n = max(20, min(500, round(COMPUTE_VS_LINK * transfer_s / step_s)))
    print(f"\ncalibration: {step_s * 1e3:.1f} ms a step, transfers {transfer_s:.2f} s a round: --local-steps {n}")
    return n


@dataclass
class Run:
    algorithm: str
    summary: dict
    timelines: list[list[dict]]  # per worker
    outputs: dict[str, str]
    foreign_cpus: float  # CPUs' worth of time other processes on the machine took during the run

    @property
    def rounds_seconds(self) -> float:
        """From the moment every worker is training (process start-up and initial sync skew left out)
        to the end of the last upload (the last round closes; the final download is the same for both)."""
        start = max(min(e["start"] for e in t if e["kind"] == "compute") for t in self.timelines)
        return max(e["end"] for t in self.timelines for e in t if e["kind"] == "upload") - start


def _busy_seconds() -> float:
    """CPU time the whole machine has spent busy (since boot), less what this process and the children
    it has waited for used: the time other processes took."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    busy = (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    ours = sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return busy - ours


def _in_ns(ns: str, log: Path, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "fedblock.common.cli", *map(str, args)],
                                env=env, stdout=f, stderr=subprocess.STDOUT)


def run_federation(topo: Topology, algorithm: str, model: Path, data: Path, local_steps: int, work: Path) -> Run:
    state = work / "state"
    names = ["coordinator", *(f"w{i}" for i in range(topo.workers))]
    logs = {name: work / f"{name}.log" for name in names}
    # --linger: the coordinator keeps serving after the run until we SIGTERM it, as in test_end_to_end.
    # Without it a worker can lose a race at the very end: the last round's model notice starts a
    # download that the closing server cancels before the worker has read RunEnd (exit 1, CANCELLED).
    procs: dict[str, subprocess.Popen] = {}
    started, foreign_before = time.monotonic(), _busy_seconds()
    try:
        procs["coordinator"] = coordinator = _in_ns(
            topo.coordinator_ns, logs["coordinator"], "coordinator", "--model", model, "--state-dir", state,
            "--listen", f"0.0.0.0:{PORT}", "--algorithm", algorithm, "--rounds", ROUNDS, "--local-steps", local_steps,
            "--lr", "1e-3", "--min-workers", topo.workers, "--block-schedule", "round-robin", "--train-blocks", "layers.*",
            "--seed", 0, "--round-timeout", 0, "--heartbeat-interval", 1, "--threads", 1, "--linger", RUN_TIMEOUT_S,
            "--insecure",  # plaintext gRPC: the namespaces' links are private to this test
        )
        for i in range(topo.workers):
            procs[f"w{i}"] = _in_ns(
                topo.worker_ns(i), logs[f"w{i}"], "worker", "--coordinator", topo.coordinator_address(i), "--name", f"w{i}",
                "--data", data, "--batch-size", BATCH, "--max-seq-len", SEQ, "--seed", i, "--threads", 1, "--device", "cpu",
                "--connect-timeout", 60, "--timeline", work / f"w{i}.timeline.jsonl", "--insecure",
            )
        workers = [procs[n] for n in names[1:]]
        while time.monotonic() < started + RUN_TIMEOUT_S:
            if any(p.poll() not in (None, 0) for p in procs.values()) or coordinator.returncode is not None:
                break  # something failed (the coordinator lingers until told): stop the rest now
            if all(w.returncode == 0 for w in workers) and (state / "summary.json").exists():
                break
            time.sleep(0.1)
        workers_done = time.monotonic() - started
        if coordinator.poll() is None:
            coordinator.send_signal(signal.SIGTERM)
            try:
                coordinator.wait(30)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
    elapsed = time.monotonic() - started
    foreign_cpus = (_busy_seconds() - foreign_before) / elapsed
    outputs = {name: path.read_text(errors="replace") for name, path in logs.items()}
    codes = {name: p.returncode for name, p in procs.items()}
    tails = "\n".join(f"--- {name} (exit {codes[name]}) ---\n{outputs[name][-3000:]}" for name in names)
    assert all(c == 0 for c in codes.values()), f"{algorithm}: a process failed or hung ({elapsed:.0f} s)\n{tails}"
    summary = json.loads((state / "summary.json").read_text())
    timelines = [[json.loads(line) for line in (work / f"w{i}.timeline.jsonl").read_text().splitlines()]
                 for i in range(topo.workers)]
    run = Run(algorithm, summary, timelines, outputs, foreign_cpus)
    print(f"\n{algorithm}: rounds {run.rounds_seconds:.2f} s, summary wall_seconds {summary['wall_seconds']:.2f}, "
          f"workers exited after {workers_done:.1f} s, coordinator after {elapsed:.1f} s ({topo.qdisc} {RATE_MBIT} Mbit/s); "
          f"other processes used {foreign_cpus:.2f} of {os.cpu_count()} CPUs")
    return run


@pytest.fixture(scope="module")
def runs(topology, model_dir, data_file, local_steps, tmp_path_factory):
    """runs(algorithm) -> Run, each algorithm run once per module on the same topology and inputs."""
    done: dict[str, Run | BaseException] = {}

    def get(algorithm: str) -> Run:
        if algorithm not in done:
            try:
                done[algorithm] = run_federation(topology, algorithm, model_dir, data_file, local_steps,
                                                 tmp_path_factory.mktemp(f"netns-{algorithm}"))
            except BaseException as e:
                done[algorithm] = e
        result = done[algorithm]
        if isinstance(result, BaseException):
            raise result
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
    # The updates really crossed the shaped links: an upload takes about its size over the rate.
    expected = s["bytes_up"] / (ROUNDS * WORKERS) * 8 / (RATE_MBIT * 1e6)
    uploads = sorted(e["end"] - e["start"] for t in run.timelines for e in t if e["kind"] == "upload")
    assert uploads[len(uploads) // 2] >= 0.8 * expected, (uploads, expected)


def test_parablock_overlaps_uploads_with_training(runs):
    """fedbcd never uploads while it trains; parablock uploads round t while it trains round t+1."""
    for timeline in runs("fedbcd").timelines:
        compute, upload = _spans(timeline, "compute"), _spans(timeline, "upload")
        assert all(_overlap(u, c) < 0.01 for u in upload.values() for c in compute.values()), timeline
    for timeline in runs("parablock").timelines:
        compute, upload = _spans(timeline, "compute"), _spans(timeline, "upload")
        # Usually every round; a round whose upload queues behind a download may not.
        overlapped = [r for r in range(1, ROUNDS) if _overlap(upload[r], compute[r + 1]) > 0.05]
        assert len(overlapped) >= 2, (overlapped, timeline)


def test_parablock_beats_fedbcd_on_a_throttled_link(runs):
    """Same model, data, seeds, rounds and steps: hiding communication must save real time. Measured
    from the worker timelines, start-up left out: ~0.55-0.7 on the 2-core machine (summary.json's
    wall_seconds, start-up included: ~0.65-0.8). A timing comparison means nothing when other processes
    took a good part of the CPUs during the runs (they slow training, and continuous training more than
    bursts): then a miss is reported as a skip, with the figures, instead of a failure."""
    fedbcd, parablock = runs("fedbcd"), runs("parablock")
    ratio = parablock.rounds_seconds / fedbcd.rounds_seconds
    wall_ratio = parablock.summary["wall_seconds"] / fedbcd.summary["wall_seconds"]
    print(f"\nparablock / fedbcd: rounds {ratio:.2f}, wall_seconds {wall_ratio:.2f}")
    busy = max(fedbcd.foreign_cpus, parablock.foreign_cpus)
    if (ratio > MAX_RATIO or wall_ratio >= 1) and busy > BUSY_CPUS:
        pytest.skip(f"parablock / fedbcd = {ratio:.2f} (wall_seconds {wall_ratio:.2f}), but other processes used "
                    f"{busy:.2f} of {os.cpu_count()} CPUs during the runs: the timing is not comparable")
    assert ratio <= MAX_RATIO, (parablock.rounds_seconds, fedbcd.rounds_seconds)
    assert wall_ratio < 1, (parablock.summary["wall_seconds"], fedbcd.summary["wall_seconds"])
