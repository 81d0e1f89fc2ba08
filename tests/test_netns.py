"""Multi-host runs: the coordinator and two workers as real `fedblock` processes, each in its own Linux
network namespace, joined by veth pairs whose links are rate-limited with `tc` in both directions.

Per round a worker trains one block and uploads its delta, then downloads the changed block; the link
is throttled so that this traffic takes about as long as the training. `fedbcd` waits for it every
round, `parablock` trains the next round meanwhile: the tests check that both runs complete over the
shaped links and that the timelines show that structure (parablock uploads round t while it trains
round t+1, fedbcd never). How much time that saves is measured by `benchmarks/overlap.py` (its netns
rows use this module's topology and runs), not here. Needs root, `ip` and `tc` with sch_tbf (rate) or
sch_netem (rate and delay); skips with the reason otherwise.

Topology (ID = the pytest process id), one /30 per worker i:

    fbc-ID (coordinator, listens on 0.0.0.0:PORT)
      fvc{i}-ID 10.A.i.1/30  <-- veth -->  fvw{i}-ID 10.A.i.2/30   fbw{i}-ID (worker i)

Both veth ends are created directly inside their namespaces, so nothing is ever added to (or removed
from) the host's own namespace; deleting the namespaces removes the veths.

Faults across hosts (the tests at the end): a worker's link is cut (`ip link set DEV down` on its end
of the veth; its peer loses carrier) in the middle of an upload and brought back, and cut for longer
than --heartbeat-timeout during a round. Every cut is undone (link up, shaping restored) whatever
happens, before the next test.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
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
# idle machine (100-130 steps on the 2-core box), so that parablock's uploads overlap its training for a
# good part of each round (benchmarks/overlap.py times these runs: parablock / fedbcd ~0.55-0.7 there).
RATE_MBIT = 12
COMPUTE_VS_LINK = 1.0
DELAY = "5ms"  # one-way, only where netem is the shaper
ROUNDS = 6
BATCH, SEQ = 4, 64  # the workers' --batch-size and --max-seq-len (the examples are ~40 tokens)
RUN_TIMEOUT_S = 180

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


def shaping_qdisc(kind: str, rate_mbit: float = RATE_MBIT) -> list[str]:
    """`tc qdisc add dev DEV` arguments that limit DEV's egress to `rate_mbit` (RATE_MBIT)."""
    rate = f"{round(rate_mbit * 1000)}kbit"
    if kind == "netem":
        return ["root", "netem", "rate", rate, "delay", DELAY, "limit", "1000"]
    # burst must cover one timer tick at this rate; latency bounds the queue (~100 KB at 12 Mbit/s).
    return ["root", "tbf", "rate", rate, "burst", "32kb", "latency", "100ms"]


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

    # ---- faults (the tests at the end) ----

    def worker_dev(self, i: int) -> str:
        return f"fvw{i}-{RUN_ID}"

    def set_link(self, i: int, up: bool) -> None:
        """Worker i's end of its veth down (the coordinator's end loses carrier) or up again. Addresses,
        routes and qdiscs stay with the devices, so `up` restores the link as it was."""
        sh("ip", "-n", self.worker_ns(i), "link", "set", self.worker_dev(i), "up" if up else "down")

    def shape_uplink(self, i: int, rate_mbit: float = RATE_MBIT) -> None:
        """Worker i's uploads (the egress of its end of the veth) limited to `rate_mbit`."""
        sh("ip", "netns", "exec", self.worker_ns(i), "tc", "qdisc", "replace", "dev", self.worker_dev(i),
           *shaping_qdisc(self.qdisc, rate_mbit))

    def drop_connections(self, i: int) -> None:
        """Destroy the TCP connections between worker i and the coordinator on both ends (`ss -K`), as
        the kernels would once a cut outlasts TCP's user timeout, or a NAT on the way forgets them."""
        sh("ip", "netns", "exec", self.worker_ns(i), "ss", "-K", "-t", "dst", f"10.{SUBNET}.{i}.1")
        sh("ip", "netns", "exec", self.coordinator_ns, "ss", "-K", "-t", "dst", f"10.{SUBNET}.{i}.2")


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
    n, step_s, transfer_s = calibrate_local_steps(model_dir)
    print(f"\ncalibration: {step_s * 1e3:.1f} ms a step, transfers {transfer_s:.2f} s a round: --local-steps {n}")
    return n


def calibrate_local_steps(model_dir: Path, compute_vs_link: float = COMPUTE_VS_LINK,
                          rate_mbit: float = RATE_MBIT) -> tuple[int, float, float]:
    """(local steps, seconds a step, seconds of transfers a round): steps that take `compute_vs_link`
    times as long as a round's transfers at `rate_mbit`, from a proxy of a worker's step timed here:
    forward and backward of the test model at the workers' batch shape, AdamW on one layer, one thread.
    Timed in CPU time (the least of a few repeats), which is what an idle machine would take: wall time
    here depends on whatever else runs."""
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
    transfer_s = 2 * sum(p.numel() * 4 for p in layer.values()) * 8 / (rate_mbit * 1e6)
    n = max(20, min(500, round(compute_vs_link * transfer_s / step_s)))
    return n, step_s, transfer_s


@dataclass
class Run:
    algorithm: str
    summary: dict
    timelines: list[list[dict]]  # per worker
    outputs: dict[str, str]

    @property
    def rounds_seconds(self) -> float:
        """From the moment every worker is training (process start-up and initial sync skew left out)
        to the end of the last upload (the last round closes; the final download is the same for both)."""
        start = max(min(e["start"] for e in t if e["kind"] == "compute") for t in self.timelines)
        return max(e["end"] for t in self.timelines for e in t if e["kind"] == "upload") - start


def _in_ns(ns: str, log: Path, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "fedblock.common.cli", *map(str, args)],
                                env=env, stdout=f, stderr=subprocess.STDOUT)


def run_federation(topo: Topology, algorithm: str, model: Path, data: Path, local_steps: int, work: Path,
                   rounds: int = ROUNDS, block_schedule: str | None = "round-robin", local_model: bool = False) -> Run:
    """One run over the topology. `block_schedule`: the coordinator's --block-schedule (None: the
    algorithm's default). `local_model`: each worker is given `--model model` (the coordinator's own
    folder), so that it downloads no block at start."""
    state = work / "state"
    names = ["coordinator", *(f"w{i}" for i in range(topo.workers))]
    logs = {name: work / f"{name}.log" for name in names}
    # --linger: the coordinator keeps serving after the run until we SIGTERM it, as in test_end_to_end.
    # Without it a worker can lose a race at the very end: the last round's model notice starts a
    # download that the closing server cancels before the worker has read RunEnd (exit 1, CANCELLED).
    procs: dict[str, subprocess.Popen] = {}
    started = time.monotonic()
    try:
        procs["coordinator"] = coordinator = _in_ns(
            topo.coordinator_ns, logs["coordinator"], "coordinator", "--model", model, "--state-dir", state,
            "--listen", f"0.0.0.0:{PORT}", "--algorithm", algorithm, "--rounds", rounds, "--local-steps", local_steps,
            "--lr", "1e-3", "--min-workers", topo.workers, *(("--block-schedule", block_schedule) if block_schedule else ()),
            "--train-blocks", "layers.*",
            "--seed", 0, "--round-timeout", 0, "--heartbeat-interval", 1, "--threads", 1, "--linger", RUN_TIMEOUT_S,
            "--insecure",  # plaintext gRPC: the namespaces' links are private to this test
        )
        for i in range(topo.workers):
            procs[f"w{i}"] = _in_ns(
                topo.worker_ns(i), logs[f"w{i}"], "worker", "--coordinator", topo.coordinator_address(i), "--name", f"w{i}",
                "--data", data, "--batch-size", BATCH, "--max-seq-len", SEQ, "--seed", i, "--threads", 1, "--device", "cpu",
                "--connect-timeout", 60, "--timeline", work / f"w{i}.timeline.jsonl", "--insecure",
                *(("--model", model) if local_model else ()),
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
    outputs = {name: path.read_text(errors="replace") for name, path in logs.items()}
    codes = {name: p.returncode for name, p in procs.items()}
    tails = "\n".join(f"--- {name} (exit {codes[name]}) ---\n{outputs[name][-3000:]}" for name in names)
    assert all(c == 0 for c in codes.values()), f"{algorithm}: a process failed or hung ({elapsed:.0f} s)\n{tails}"
    summary = json.loads((state / "summary.json").read_text())
    timelines = [[json.loads(line) for line in (work / f"w{i}.timeline.jsonl").read_text().splitlines()]
                 for i in range(topo.workers)]
    run = Run(algorithm, summary, timelines, outputs)
    print(f"\n{algorithm}: rounds {run.rounds_seconds:.2f} s, summary wall_seconds {summary['wall_seconds']:.2f}, "
          f"workers exited after {workers_done:.1f} s, coordinator after {elapsed:.1f} s ({topo.qdisc} {RATE_MBIT} Mbit/s)")
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
    """Per round, from the start of its first interval of `kind` to the end of its last (an upload
    interrupted by a re-join is sent again in an interval of its own)."""
    spans: dict[int, tuple[float, float]] = {}
    for e in timeline:
        if e["kind"] == kind:
            start, end = spans.get(e["round"], (e["start"], e["end"]))
            spans[e["round"]] = (min(start, e["start"]), max(end, e["end"]))
    return spans


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


# ---- faults across hosts ------------------------------------------------------------------------------
#
# A cut is `ip link set DEV down` on the worker's end of its veth, later `up` again. (This kernel has no
# sch_netem, so no `loss 100%`; no iptables or nft either.) Nothing tells the TCP connections: they
# stall, retransmit once the link is back and carry on, so a cut of a few seconds never reaches gRPC.
# gRPC's keepalive settings (common/rpc.py) set TCP_USER_TIMEOUT to 20 s, so a cut longer than that
# breaks the connections (measured here: the streams fail ~20 s into a cut). Instead of waiting for
# that, the upload test also destroys the connections during a cut (`ss -K` on both ends), which is
# what the worker sees then: every call fails (UNAVAILABLE), reconnecting fails until the link is back.

FAULT_STEPS = 20  # local steps per round: ~0.2 s of training; the links are what these tests are about
CHUNK = 32 << 10  # --chunk-size: a layer block (~0.59 MB) is 19 chunks, so an upload can resume part-way
SLOW_MBIT = 1.5  # the cut worker's uplink in the upload test: one upload takes ~3 s
CUT_S = 3.0  # an upload cut: shorter than the heartbeat timeout
CUT_AT = 0.35  # ... made once this share of the worker's upload has reached the coordinator
METRICS_PORT = 9100
FAULT_TIMEOUT_S = 120

_SCRAPE = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"


def socket_destroy_supported() -> tuple[bool, str]:
    """Whether `ss -K` can destroy a TCP connection here (kernel CONFIG_INET_DIAG_DESTROY): tried on a
    throwaway loopback connection of this process, matched by its exact ports."""
    import socket

    if shutil.which("ss") is None:
        return False, "`ss` not found (iproute2)"
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            accepted, _ = server.accept()
            with accepted:
                sport = client.getsockname()[1]
                r = sh("ss", "-K", "-t", "src", f"127.0.0.1:{sport}", "dst", f"127.0.0.1:{port}", check=False)
                try:
                    client.sendall(b"x")
                    client.recv(1)
                except OSError:
                    return True, ""
    return False, f"`ss -K` cannot destroy sockets here (no CONFIG_INET_DIAG_DESTROY?): {r.stderr.strip()[:200]}"


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                pass
    return out


@dataclass
class Cut:
    worker: int
    start: float  # wall clock (time.time(), as in the timelines)
    end: float = 0.0
    dropped_connections: bool = False
    received: float = 0.0  # bytes of the cut upload the coordinator had


@contextmanager
def link_cut(topo: Topology, worker: int, drop_connections: bool = False):
    """Worker `worker`'s link down for the body of the `with`; back up afterwards, whatever happens."""
    topo.set_link(worker, False)
    cut = Cut(worker, time.time())
    try:
        if drop_connections:
            topo.drop_connections(worker)
            cut.dropped_connections = True
        yield cut
    finally:
        topo.set_link(worker, True)
        cut.end = time.time()


@dataclass
class LiveRun:
    """A coordinator and workers running as `fedblock` processes in the topology's namespaces, for tests
    that act on the links while the run goes on. Logs at DEBUG, the coordinator's metrics on
    METRICS_PORT (in its namespace), worker timelines; the coordinator lingers so it can be scraped."""

    topo: Topology
    work: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    @property
    def state(self) -> Path:
        return self.work / "state"

    def log_path(self, name: str) -> Path:
        return self.work / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def start(self, model: Path, data: Path, algorithm: str, rounds: int, chunk_size: int = CHUNK,
              coordinator: tuple = (), workers: dict[int, tuple] | None = None) -> None:
        topo = self.topo
        self.procs["coordinator"] = _in_ns(
            topo.coordinator_ns, self.log_path("coordinator"), "--log-level", "DEBUG", "coordinator", "--model", model,
            "--state-dir", self.state, "--listen", f"0.0.0.0:{PORT}", "--algorithm", algorithm, "--rounds", rounds,
            "--local-steps", FAULT_STEPS, "--lr", "1e-3", "--min-workers", topo.workers, "--block-schedule", "round-robin",
            "--train-blocks", "layers.*", "--seed", 0, "--round-timeout", 0, "--chunk-size", chunk_size, "--threads", 1,
            "--metrics-port", METRICS_PORT, "--linger", FAULT_TIMEOUT_S, "--insecure", *coordinator,
        )
        for i in range(topo.workers):
            self.procs[f"w{i}"] = _in_ns(
                topo.worker_ns(i), self.log_path(f"w{i}"), "--log-level", "DEBUG", "worker", "--coordinator",
                topo.coordinator_address(i), "--name", f"w{i}", "--data", data, "--batch-size", BATCH, "--max-seq-len", SEQ,
                "--seed", i, "--threads", 1, "--device", "cpu", "--connect-timeout", 60,
                "--timeline", self.work / f"w{i}.timeline.jsonl", "--insecure", *(workers or {}).get(i, ()),
            )

    def tails(self) -> str:
        return "\n".join(f"--- {name} (exit {p.poll()}) ---\n{self.log(name)[-4000:]}" for name, p in self.procs.items())

    def check(self) -> None:
        """Fail now if a process died (the coordinator lingers: it never exits by itself in time)."""
        failed = {n: p.poll() for n, p in self.procs.items() if p.poll() not in (None, 0)}
        if failed or self.procs["coordinator"].poll() is not None:
            raise AssertionError(f"a process exited early: {failed}\n{self.tails()}")

    def wait_for(self, what: str, predicate, timeout: float = 60):
        """Poll `predicate()` until it returns something true; returns that."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            got = predicate()
            if got:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting ({timeout:.0f} s) for {what}\n{self.tails()}")
            time.sleep(0.05)

    def metrics(self, name: str = "coordinator") -> dict[str, float]:
        """A process's /metrics (METRICS_PORT), scraped from inside its namespace ({} while it is not
        serving; a worker serves them only when started with --metrics-port)."""
        ns = self.topo.coordinator_ns if name == "coordinator" else self.topo.worker_ns(int(name[1:]))
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _SCRAPE,
                            f"http://127.0.0.1:{METRICS_PORT}/metrics"], capture_output=True, text=True, timeout=30)
        return parse_metrics(r.stdout) if r.returncode == 0 else {}

    def finish(self) -> FaultRun:
        """Wait for the workers to exit and the summary; then stop the coordinator. Every process must
        exit 0 (the coordinator after SIGTERM, as in run_federation)."""
        workers = [p for n, p in self.procs.items() if n != "coordinator"]
        self.wait_for("the end of the run",
                      lambda: all(p.poll() == 0 for p in workers) and (self.state / "summary.json").exists(),
                      timeout=max(10.0, self.started + FAULT_TIMEOUT_S - time.monotonic()))
        final = self.metrics()
        coordinator = self.procs["coordinator"]
        coordinator.send_signal(signal.SIGTERM)
        try:
            coordinator.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self.close()
        codes = {name: p.returncode for name, p in self.procs.items()}
        assert all(c == 0 for c in codes.values()), f"a process failed or hung: {codes}\n{self.tails()}"
        timelines = {name: [json.loads(line) for line in (self.work / f"{name}.timeline.jsonl").read_text().splitlines()]
                     for name in self.procs if name != "coordinator"}
        return FaultRun(json.loads((self.state / "summary.json").read_text()),
                        {name: self.log(name) for name in self.procs}, timelines, final,
                        time.monotonic() - self.started)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)


@dataclass
class FaultRun:
    summary: dict
    outputs: dict[str, str]  # the logs
    timelines: dict[str, list[dict]]
    metrics: dict[str, float]  # the coordinator's, after the run
    seconds: float

    def round_bytes(self) -> dict[int, int]:
        """Update wire bytes the coordinator received per round (summary's running totals, differenced).
        With fedbcd a round's uploads all happen between the previous round's close and its own."""
        history = sorted(self.summary["round_history"], key=lambda r: r["round"])
        before = [0] + [r["bytes_up"] for r in history[:-1]]
        return {r["round"]: r["bytes_up"] - b for r, b in zip(history, before, strict=True)}


@contextmanager
def live_run(topo: Topology, work: Path):
    run = LiveRun(topo, work)
    try:
        yield run
    finally:
        run.close()


def layer_bytes(model_dir: Path) -> int:
    """float32 bytes of one decoder layer of the test model: about the size of a layer block's upload
    (that plus a safetensors header and the framing, ~0.1% more)."""
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            total += sum(4 * math.prod(f.get_slice(n).get_shape()) for n in f.keys() if ".layers.0." in n)
    return total


def checkpoint_bytes_up(state: Path, round: int) -> int | None:
    """Update bytes received up to the close of `round`, from its checkpoint (None until it is written).
    A round's checkpoint is written before the new model is announced, so with fedbcd before any upload
    of the next round."""
    path = state / "checkpoints" / f"round-{round:06d}.json"
    if not path.exists():
        return None
    history = json.loads(path.read_text())["round_history"]
    return next(r["bytes_up"] for r in history if r["round"] == round)


@pytest.fixture(scope="module")
def upload_cuts(topology, model_dir, data_file, tmp_path_factory):
    """One fedbcd run of 3 rounds with worker 0's uplink at SLOW_MBIT (an upload takes ~3 s) and
    worker 1's at RATE_MBIT; a heartbeat timeout (15 s) well beyond the cuts. Round 1 runs undisturbed
    (the reference); in round 2 worker 0's link is cut for CUT_S once CUT_AT of its upload has reached
    the coordinator; in round 3 the same, and the connections are destroyed as well (where `ss -K`
    can; otherwise round 3 runs undisturbed). Returns (run, {round: Cut}, why round 3 was not cut)."""
    done: list = []

    def get():
        if not done:
            try:
                done.append(_upload_cuts(topology, model_dir, data_file, tmp_path_factory.mktemp("netns-upload-cut")))
            except BaseException as e:
                done.append(e)
        if isinstance(done[0], BaseException):
            raise done[0]
        return done[0]

    return get


def _upload_cuts(topo: Topology, model_dir: Path, data: Path, work: Path):
    can_drop, why = socket_destroy_supported()
    size = layer_bytes(model_dir)
    cuts: dict[int, Cut] = {}
    topo.shape_uplink(0, SLOW_MBIT)
    try:
        with live_run(topo, work) as run:
            run.start(model_dir, data, "fedbcd", 3, coordinator=("--heartbeat-interval", 0.5, "--heartbeat-timeout", 15))
            for round, drop in ((2, False), (3, True)):
                if drop and not can_drop:
                    break
                base = run.wait_for(f"round {round - 1}'s checkpoint", lambda r=round: checkpoint_bytes_up(run.state, r - 1))

                def mid_upload(r=round, base=base):
                    m = run.metrics()
                    received = m.get('fedblock_bytes_received_total{kind="update"}', 0.0)
                    # Worker 1 sends at most `size`: beyond that, it is worker 0's upload arriving.
                    if m.get("fedblock_model_version") == r - 1 and received >= base + (1 + CUT_AT) * size:
                        return received
                    return None

                received = run.wait_for(f"worker 0 uploading round {round}", mid_upload)
                with link_cut(topo, 0, drop_connections=drop) as cut:
                    time.sleep(CUT_S)
                cut.received = received - base - size  # of worker 0's upload, at least, when it was cut
                cuts[round] = cut
                print(f"\nround {round}: cut worker 0's link for {cut.end - cut.start:.1f} s"
                      f"{' and destroyed its connections' if drop else ''}, {cut.received / size:.0%} of its upload in")
            result = run.finish()
    finally:
        topo.shape_uplink(0, RATE_MBIT)
    print(f"upload-cut run: {result.seconds:.1f} s; update bytes per round {result.round_bytes()}")
    return result, cuts, why


def _upload_span(run: FaultRun, worker: str, round: int) -> tuple[float, float]:
    return _spans(run.timelines[worker], "upload")[round]


def _check_resumed(run: FaultRun, round: int, cut: Cut) -> None:
    """The cut upload went on from where it was: the coordinator received worker 0's blob once, not
    what it already had a second time. Both workers upload a layer block of the same size S each round
    (round 1, undisturbed, gives 2 S), so worker 0's share of `round` is its total less S. A restart from
    zero would have added at least `cut.received` (CUT_AT of S) again; a resume adds at most a chunk
    in flight and a header per attempt."""
    s = run.summary
    assert s["rounds_completed"] == 3 and s["updates_accepted"] == 6, s
    assert [r["workers"] for r in s["round_history"]] == [2, 2, 2], s["round_history"]  # nobody was dropped
    assert "silent for" not in run.outputs["coordinator"]
    start, end = _upload_span(run, "w0", round)
    assert start < cut.start and end > cut.end, f"the cut ({cut}) missed worker 0's upload ({start}, {end})"
    per_round = run.round_bytes()
    size = per_round[1] / 2
    resent = per_round[round] - 2 * size
    print(f"round {round}: worker 0's upload took {end - start:.1f} s around a {cut.end - cut.start:.1f} s cut; "
          f"the coordinator received {resent:+.0f} bytes beyond the blob ({cut.received / size:.0%} was in at the cut)")
    assert cut.received >= 0.25 * size  # else a restart would not show
    assert resent <= 2 * CHUNK, (f"round {round}: worker 0's upload of {size:.0f} bytes arrived with {resent:.0f} "
                                 f"bytes more (restarted?); per round {per_round}\n{run.outputs['w0'][-4000:]}")


def test_upload_survives_a_link_cut_mid_upload(upload_cuts):
    """Worker 0's link goes down for CUT_S in the middle of its upload and comes back. Its TCP connection
    outlives such a cut (nothing tells it; segments are retransmitted once the link is back), so the
    upload simply goes on: no deadline may abort it, the coordinator must not drop the worker (the cut is
    shorter than --heartbeat-timeout), the round closes with both updates and nothing is sent twice."""
    run, cuts, _ = upload_cuts()
    _check_resumed(run, 2, cuts[2])


def test_upload_resumes_after_its_connection_is_lost(upload_cuts):
    """The same cut, but the connections die with it (as when a cut outlasts TCP's user timeout, or a NAT
    forgets them): the upload stream breaks, the worker retries until the link is back, asks UploadStatus
    which chunks the coordinator holds and sends the rest; its event stream broke as well, so it joins
    again under its name. The round closes with both updates, and the blob crossed the link once."""
    run, cuts, why = upload_cuts()
    if 3 not in cuts:
        pytest.skip(f"cannot destroy the connections: {why}")
    _check_resumed(run, 3, cuts[3])
    log = run.outputs["w0"]
    assert re.search(r"upload of layers\.\d+ round 3 interrupted \(\w+\); resuming", log), log[-4000:]
    assert "joined again" in log, log[-4000:]


HB_INTERVAL, HB_TIMEOUT = 0.5, 3.0
SILENT_ROUNDS = 8
# The test model's layer block is ~145 chunks of 4 KiB, as a 145 MB block is with the default 1 MiB.
SILENT_CHUNK = 4 << 10
DATA_REASONS = {"bad_chunk", "incomplete", "hash_mismatch", "malformed", "non_finite", "bad_manifest"}


def test_worker_cut_beyond_heartbeat_timeout_is_dropped_and_rejoins(topology, model_dir, data_file, tmp_path):
    """parablock, two workers, --min-updates 1, heartbeats every 0.5 s, --heartbeat-timeout 3 s. Worker 1
    paces its uploads to SLOW_MBIT (--max-upload-rate: ~3 s an upload, without a deep queue in the link
    that its heartbeats would wait behind). Its link goes down CUT_AT into its round-2 upload, and stays
    down until the coordinator has dropped it and closed a round without it. Expected, as README "Faults,
    resume, timeouts" has it:
    - the coordinator logs the drop, and the round that waited for worker 1 closes with worker 0's
      update alone; the run goes on;
    - worker 1's TCP connection outlives the cut: when the link is back, the rest of its upload (more
      than half of its chunks) arrives for a round that has closed, and is counted as late: not refused
      as corrupted (the link altered nothing), and without holding anything up;
    - its event stream has ended and its next heartbeat is refused, so it joins again under its name,
      syncs the model and is given blocks again in a later round, which it delivers;
    - every process exits 0."""
    size = layer_bytes(model_dir)
    with live_run(topology, tmp_path) as run:
        run.start(model_dir, data_file, "parablock", SILENT_ROUNDS, chunk_size=SILENT_CHUNK,
                  coordinator=("--heartbeat-interval", HB_INTERVAL, "--heartbeat-timeout", HB_TIMEOUT, "--min-updates", 1),
                  workers={1: ("--max-upload-rate", f"{SLOW_MBIT}Mbit/s", "--max-backoff", 2, "--metrics-port", METRICS_PORT)})

        def second_upload_under_way():
            # Paced, the worker's count of bytes sent is its upload's progress (within a chunk or two).
            sent = run.metrics("w1").get('fedblock_worker_bytes_sent_total{kind="update"}', 0.0)
            return sent if (1 + CUT_AT) * size <= sent < 1.5 * size else None

        sent = run.wait_for("worker 1 uploading round 2", second_upload_under_way)
        with link_cut(topology, 1) as cut:
            dropped = run.wait_for("worker 1 dropped", lambda: re.search(
                r"worker w1 silent for (\d+) s: dropped from its rounds", run.log("coordinator")), timeout=30)
            closed = run.wait_for("a round closed without worker 1", lambda: re.search(
                r"round (\d+)/\d+ closed: 1 updates from 1 workers", run.log("coordinator")[dropped.end():]), timeout=30)
        print(f"\nworker 1's link down for {cut.end - cut.start:.1f} s ({sent / size - 1:.0%} of its round-2 upload "
              f"sent): dropped after {dropped.group(1)} s of silence, round {closed.group(1)} closed without it")
        result = run.finish()
    s = result.summary
    history = sorted(s["round_history"], key=lambda r: r["round"])
    print(f"heartbeat-timeout run: {result.seconds:.1f} s; workers per round {[r['workers'] for r in history]}")
    w1 = result.outputs["w1"]
    assert s["rounds_completed"] == SILENT_ROUNDS and s["workers"] == 2
    assert float(dropped.group(1)) >= HB_TIMEOUT - 1  # the log rounds to whole seconds
    assert result.outputs["coordinator"].count("worker w1 silent for") == 1  # only for the cut
    lone = int(closed.group(1))
    assert history[lone - 1]["workers"] == 1 and history[lone - 1]["updates"] == 1
    # What was in flight for the closed round is late; nothing was found corrupted.
    rejected = {k: v for k, v in result.metrics.items() if 'status="rejected"' in k and v}
    assert not [k for k in rejected if any(f'reason="{r}"' in k for r in DATA_REASONS)], (rejected, w1[-4000:])
    assert re.search(rf"round {lone} layers\.\d+: late", w1), w1[-4000:]
    # Back: it joined again under its name and delivered in a later round.
    assert "joined again" in w1, w1[-4000:]
    assert result.outputs["coordinator"].count("worker w1 joined") == 2
    later = [r["round"] for r in history if r["round"] > lone and r["workers"] == 2]
    assert later, (history, w1[-4000:])
    uploads = _spans(result.timelines["w1"], "upload")
    assert any(r in uploads for r in later), uploads
