"""Zeroth-order methods: bytes per worker, quality, layer evaluations and worker memory of decomfl and
fedspzo (against fedbcd), on `builtin:chatterbot-topics`.

Every federated run here is a real `fedblock coordinator` process and N worker processes on loopback
(gRPC, plaintext), the data split as `fedblock simulate` splits it (10 % held out, IID shards, seed 0).
Each worker process is this script (`--worker SPEC`) running the real worker (`fedblock.client.worker.
Worker`, all its threads) with a thin subclass that only watches: it attributes every byte the worker's
session counts (the same calls that feed `fedblock_worker_bytes_sent_total{kind}` and
`..._received_total{kind}`, which it still increments and checks against at the end) to a phase, and it
reads the process's peak RSS. Phases: `join` (the Join call), `files` (config and tokenizer: the model
files), `initial` (the first download of every block), `run` (everything else from the Join on: events,
heartbeats, assignments, reports, log catch-ups, downloads; heartbeats are told apart by the thread that
sends them). The bytes reported are the `run` phase (the spec: every gRPC message after Join, by kind,
heartbeats included, model files and initial blocks excluded); the excluded phases are reported beside.

a. Bytes per worker over a whole decomfl run (K = 1 local step, P = 5 perturbations, 4 workers, 2 per
   round, 200 rounds; `--quick` 50) for two tiny Llama models of the same depth (4 layers) and
   different widths (hidden 32 and 128: 0.05M and 0.66M parameters): up (update: the reports), down
   (model: the log catch-ups), control (events, heartbeats, replies), per worker per round and for
   the run; then for 1,000 rounds, extrapolated linearly from the per-round figures (`--rounds-a
   1000` measures it: 8-15 minutes per width here). Target: at most 1 MB per worker for 1,000
   rounds, and the same bytes for both widths (up and down exactly; control too, but for the
   heartbeats, whose number follows wall time). Cross-checks: the phases add up to the worker's own
   Prometheus counters; the coordinator's summary bytes_up (update bytes received) equals the
   workers' up; its bytes_down (model bytes sent, which includes the workers' first download of the
   blocks) less the workers' `initial` phase equals the workers' down.
b. Held-out eval loss and accuracy (argmax over the 9 topic choices) before and after R rounds of
   decomfl, fedspzo and fedbcd, from the coordinator's evaluation (summary.json: server/evaluation.py
   runs `training.evaluate` on the global model; `--check-export` also evaluates the exported model
   here and checks both agree): the same rounds, participants, local steps (K = 1) and batch; each
   algorithm's own learning rate (ZO SGD 1e-5, AdamW 1e-4), decoder layers only (`--train-blocks
   'layers.*'`; fedbcd one layer per worker per round, striped schedule). Default SmolLM2-135M-Instruct,
   4 rounds, 4 workers, 2 per round: about 3-4 minutes per zeroth-order run on 2 shared cores (a round
   takes 35-50 s there; start-up, the workers' first download and the two evaluations take about a
   minute), less for fedbcd; `--quick` a tiny random Llama (4 layers x 64), 8 rounds.
c. Decoder-layer forward evaluations of one ZO step, fedspzo (P1, P2) against decomfl with the same
   number of directions P = P1*P2 (central differences), from the cost model `zo.layer_evaluations`
   and measured with `zo.LayerCounter` around one real estimate (the algorithms' own `estimate`, on
   one batch of the topics task) each, fedspzo at its default split (`zo.default_split`). Target:
   fedspzo ÷ decomfl <= 0.5. SmolLM2 (30 layers) by default, the tiny model with `--quick`.
d. Worker peak RSS, decomfl and fedspzo against fedbcd: read in the worker processes of the b runs
   (VmHWM; the peak is reset after the initial download, as benchmarks/memory.py resets it after
   loading, so `rounds` is the peak while training; `lifetime` includes start-up). The max over the
   run's workers.

Time on the 2-core development machine shared with a test run (load 3-5): `--quick` 3 minutes; the
defaults about 15-20 minutes (a: 5, b: 8, c: 3 minutes; c's seconds are noisy there). State dirs and
logs go to WORKDIR/zo/NAME (weights deleted after each run). Prints one table per part.

    python benchmarks/zo.py [--quick] [--json out.json] [--parts a,b,c,d] [--rounds-a 1000] [--rounds-b 4]
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, parser, table  # noqa: E402

RESULT = "ZO-WORKER-RESULT "
MB = 1e6
TOPICS = "builtin:chatterbot-topics"
SMOLLM2 = "smollm2-135m-instruct"
BYTES_TARGET = 1e6  # per worker, 1,000 rounds
LAYER_TARGET = 0.5  # fedspzo ÷ decomfl layer evaluations


# ---- the worker process: the real worker, watched --------------------------------------------------


def _peak_mib() -> float:
    from benchmarks.memory import _maxrss_mib, _status_mib

    return _status_mib("VmHWM") or _maxrss_mib()


class _Counting:
    """Stands in for a worker's bytes counter (`labels(kind).inc(n)`): tallies by phase, then passes
    the count on to the Prometheus counter it replaces."""

    def __init__(self, watch, direction: str, counter):
        self.watch, self.direction, self.counter = watch, direction, counter

    def labels(self, kind: str):
        return _Inc(self, kind)


class _Inc:
    def __init__(self, owner: _Counting, kind: str):
        self.owner, self.kind = owner, kind

    def inc(self, n: int) -> None:
        self.owner.watch.add(self.owner.direction, self.kind, int(n))
        self.owner.counter.labels(self.kind).inc(n)


def worker_main(spec: dict) -> None:
    """One worker process: run the real worker; print its bytes by phase and its peaks as one JSON line."""
    import logging

    import torch

    from benchmarks.memory import _reset_peak
    from fedblock.client.metrics import WorkerMetrics
    from fedblock.client.worker import Worker
    from fedblock.common.config import WorkerConfig

    logging.basicConfig(level=spec.get("log_level", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(int(spec["config"].get("threads") or 1))

    class Watched(Worker):
        """The worker as it is; the phase moves on at Join, before the first download and after it."""

        def __init__(self, config):
            metrics = WorkerMetrics()
            super().__init__(config, metrics)
            self.phase = "join"
            self.main_thread = threading.current_thread()
            self.lock = threading.Lock()
            self.bytes: dict = {}  # phase -> direction -> kind -> bytes
            self.heartbeat_bytes: dict = {}  # phase -> bytes (sent + received) of heartbeat calls
            self.heartbeats = 0  # heartbeat requests sent
            self.peaks: dict = {}
            metrics.bytes_sent = _Counting(self, "sent", metrics.bytes_sent)
            metrics.bytes_received = _Counting(self, "received", metrics.bytes_received)

        def add(self, direction: str, kind: str, n: int) -> None:
            thread = threading.current_thread()
            # The start-up's own calls are on the main thread; every other thread's are the run's.
            phase = self.phase if thread is self.main_thread else "run"
            with self.lock:
                per = self.bytes.setdefault(phase, {}).setdefault(direction, {})
                per[kind] = per.get(kind, 0) + n
                if "heartbeat" in thread.name:
                    self.heartbeat_bytes[phase] = self.heartbeat_bytes.get(phase, 0) + n
                    self.heartbeats += direction == "sent"

        def _algorithm(self, info):  # called right after the Join reply
            self.phase = "files"
            return Worker._algorithm(info)

        def _initial_sync(self, *args, **kwargs):
            self.phase = "initial"
            super()._initial_sync(*args, **kwargs)
            self.phase = "run"
            self.peaks["start_mib"] = _peak_mib()
            self.peaks["reset"] = _reset_peak()  # from here on the peak is that of running rounds

    config = WorkerConfig(**spec["config"])
    config.check()
    worker = Watched(config)
    t0 = time.monotonic()
    outcome = worker.run()
    rounds_peak = _peak_mib()
    registry = worker.metrics.registry
    prometheus = {
        d: {k: registry.get_sample_value(f"fedblock_worker_bytes_{d}_total", {"kind": k}) or 0.0
            for k in ("update", "model", "control")}
        for d in ("sent", "received")
    }
    result = {
        "name": config.name,
        "finished": outcome.finished,
        "error": repr(outcome.error) if outcome.error else None,
        "rounds": outcome.rounds,
        "steps": outcome.steps,
        "seconds": time.monotonic() - t0,
        "bytes": worker.bytes,
        "heartbeat_bytes": worker.heartbeat_bytes,
        "heartbeats": worker.heartbeats,
        "prometheus": prometheus,
        "peak_start_mib": worker.peaks.get("start_mib"),
        "peak_rounds_mib": rounds_peak if worker.peaks.get("reset") else None,
        "peak_lifetime_mib": max(rounds_peak, worker.peaks.get("start_mib") or 0.0),
        "compute_seconds": registry.get_sample_value("fedblock_worker_compute_seconds_total") or 0.0,
    }
    print(RESULT + json.dumps(result), flush=True)


# ---- a federated run: a coordinator process and watched worker processes ---------------------------


def free_port() -> int:
    from fedblock.common.simulate import free_port as pick

    return pick()


def _env() -> dict:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("FEDBLOCK_") or k == "FEDBLOCK_CACHE_DIR"},
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, then SIGKILL, each process we started (each leads its own process group)."""
    for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)


def prepare_data(state: Path, data: str, workers: int, seed: int = 0, eval_fraction: float = 0.1,
                 split: str = "iid") -> Path:
    """The split `fedblock simulate` makes: STATE/data/eval.jsonl and worker-i.jsonl."""
    from fedblock.common.data import load_examples, split_clients, split_holdout, write_jsonl

    examples = load_examples(data)
    train, heldout = split_holdout(examples, eval_fraction, seed)
    shards = split_clients(train, workers, split, seed)
    out = state / "data"
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(heldout, out / "eval.jsonl")
    for i, shard in enumerate(shards):
        write_jsonl(shard, out / f"worker-{i}.jsonl")
    return out


def federate(root: Path, name: str, *, model: str, data: str = TOPICS, algorithm: str, rounds: int,
             workers: int = 4, clients_per_round: int = 2, local_steps: int = 1, batch_size: int = 8,
             max_seq_len: int = 128, eval_max_examples: int = 0, flags: tuple = (), seed: int = 0,
             timeout: float = 1200, log_level: str = "INFO", keep_weights: bool = False,
             check_export: bool = False) -> dict:
    """One run; returns {"name", "failed", "summary", "workers": [their results], "seconds", "state", ...}."""
    from fedblock.common.models import resolve_model

    state = root / name
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    resolve_model(model)  # a built-in model is converted once, here, not by two processes at once
    data_dir = prepare_data(state, data, workers, seed)
    port = free_port()
    coordinator = [
        sys.executable, "-m", "fedblock.common.cli", "--log-level", log_level, "coordinator",
        "--model", str(model), "--state-dir", str(state), "--listen", f"127.0.0.1:{port}", "--insecure",
        "--algorithm", algorithm, "--rounds", str(rounds), "--min-workers", str(workers),
        "--clients-per-round", str(clients_per_round), "--local-steps", str(local_steps), "--seed", str(seed),
        "--threads", "1", "--max-seq-len", str(max_seq_len), "--keep-checkpoints", "2", *map(str, flags),
    ]
    if eval_max_examples:
        coordinator += ["--eval-data", str(data_dir / "eval.jsonl"), "--eval-max-examples", str(eval_max_examples)]
    env = _env()
    logs = []
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()

    def start(argv: list[str], log_name: str) -> subprocess.Popen:
        path = root / f"{name}.{log_name}.log"
        logs.append(path)
        with open(path, "w") as f:
            p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        procs.append(p)
        return p

    coord = start(coordinator, "coordinator")
    for i in range(workers):
        spec = {"log_level": "WARNING" if log_level == "WARNING" else "INFO", "config": {
            "coordinator": f"127.0.0.1:{port}", "name": f"worker-{i}", "data": str(data_dir / f"worker-{i}.jsonl"),
            "insecure": True, "batch_size": batch_size, "max_seq_len": max_seq_len, "threads": 1,
            "seed": seed + i, "connect_timeout": 300.0}}
        start([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], f"worker-{i}")
    failed = None
    while failed is None:
        if coord.poll() is not None:
            if coord.returncode != 0:
                failed = f"coordinator exit {coord.returncode}"
            break
        bad = [f"worker-{i} exit {p.returncode}" for i, p in enumerate(procs[1:]) if p.poll() not in (None, 0)]
        if bad:
            failed = bad[0]
        elif time.monotonic() - t0 > timeout:
            failed = f"timed out after {timeout:.0f} s"
        time.sleep(0.3)
    deadline = time.monotonic() + 90  # workers leave once they hear the run ended
    while failed is None and time.monotonic() < deadline and any(p.poll() is None for p in procs[1:]):
        time.sleep(0.3)
    if failed is None and any(p.poll() not in (0,) for p in procs[1:]):
        failed = "a worker did not finish cleanly"
    _stop(procs)
    seconds = time.monotonic() - t0
    results = []
    for path in logs[1:]:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.startswith(RESULT)]
        results.append(json.loads(lines[-1][len(RESULT):]) if lines else None)
    summary_path = state / "summary.json"
    if failed is None and (not summary_path.exists() or None in results):
        failed = "no summary.json or a worker printed no result"
    out = {"name": name, "algorithm": algorithm, "model": str(model), "rounds": rounds, "workers_n": workers,
           "clients_per_round": clients_per_round, "local_steps": local_steps, "batch_size": batch_size,
           "failed": failed, "seconds": seconds, "state": str(state), "logs": [str(p) for p in logs],
           "workers": results, "summary": json.loads(summary_path.read_text()) if summary_path.exists() else None}
    if failed:
        tail = "".join(logs[0].read_text(errors="replace").splitlines(keepends=True)[-25:])
        print(f"zo: run {name} FAILED ({failed}); coordinator log {logs[0]}:\n{tail}", file=sys.stderr, flush=True)
    if failed is None and eval_max_examples:
        s = out["summary"]
        # The coordinator's evaluation (summary.json): loss, and accuracy for data with choices.
        out["initial"] = {"loss": s["eval_loss_initial"], "accuracy": s.get("eval_accuracy_initial"),
                          "examples": eval_max_examples, "by": "coordinator"}
        out["final"] = {"loss": s["eval_loss_final"], "accuracy": s.get("eval_accuracy_final"),
                        "examples": eval_max_examples, "by": "coordinator"}
        if check_export or out["final"]["accuracy"] is None:  # an older coordinator: no accuracy in the summary
            e = evaluate_model(state / "export", data_dir / "eval.jsonl", eval_max_examples, max_seq_len)
            out["export_check"] = {**e, "loss_matches": abs(e["loss"] - s["eval_loss_final"]) < 1e-4,
                                   "accuracy_matches": out["final"]["accuracy"] is None
                                   or abs(e["accuracy"] - out["final"]["accuracy"]) < 1e-9}
            if out["final"]["accuracy"] is None:
                i = evaluate_model(resolve_model(model), data_dir / "eval.jsonl", eval_max_examples, max_seq_len,
                                   cache=True)
                out["initial"] = {**i, "by": "export"}
                out["final"] = {**e, "by": "export"}
    if not keep_weights:  # block files and the export: up to a few GB per SmolLM2 run
        for sub in ("blocks", "export", "incoming"):
            shutil.rmtree(state / sub, ignore_errors=True)
    return out


_EVALS: dict = {}


def evaluate_model(path, eval_file: Path, max_examples: int, max_seq_len: int, cache: bool = False) -> dict:
    """Loss and accuracy of a model folder on the first `max_examples` of the held-out sample, as the
    coordinator's evaluator samples them (`data.sample`, its batch size 8)."""
    key = (str(path), eval_file.read_bytes(), max_examples, max_seq_len)
    if cache and key in _EVALS:
        return _EVALS[key]
    import torch

    from fedblock.common.data import load_examples, sample, tokenize
    from fedblock.common.models import load_model, load_tokenizer
    from fedblock.common.training import evaluate

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(path)
    data = tokenize(sample(load_examples(eval_file), max_examples), tokenizer, max_seq_len)
    model = load_model(path, dtype=torch.float32)
    e = evaluate(model, data, 8, tokenizer.pad_token_id)
    result = {"loss": e.loss, "accuracy": e.accuracy, "examples": e.tokens}
    del model
    if cache:
        _EVALS[key] = result
    return result


# ---- bytes: per worker, by phase ------------------------------------------------------------------


def worker_bytes(w: dict, phase: str = "run") -> dict:
    b = w["bytes"].get(phase, {})
    sent, received = b.get("sent", {}), b.get("received", {})
    hb = w["heartbeat_bytes"].get(phase, 0)
    return {
        "up": sent.get("update", 0),
        "down": received.get("model", 0),
        "control": sent.get("control", 0) + received.get("control", 0),
        "heartbeats": hb,
        # what else crosses: the update kind received (none) and model kind sent (none) are 0
        "other": sent.get("model", 0) + received.get("update", 0),
        "total": sum(sent.values()) + sum(received.values()),
    }


def counts_agree(w: dict) -> bool:
    """The phases add up to the worker's own Prometheus counters."""
    for d in ("sent", "received"):
        for kind, value in w["prometheus"][d].items():
            tallied = sum(w["bytes"].get(p, {}).get(d, {}).get(kind, 0) for p in w["bytes"])
            if abs(tallied - value) > 0.5:
                return False
    return True


def tiny_model(root: Path, hidden: int, layers: int = 4) -> Path:
    from fedblock.common.models import make_tiny_model

    path = root / f"tiny-llama-{layers}x{hidden}"
    if not (path / "config.json").exists():
        make_tiny_model(path, "llama", seed=0, num_layers=layers, hidden_size=hidden)
    return path


def num_params(path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= int(d)
                total += n
    return total


# ---- a. bytes per worker, two widths --------------------------------------------------------------


def part_a(args, root: Path) -> tuple[list[dict], dict]:
    rounds = args.rounds_a
    rows, runs = [], []
    for hidden in args.widths:
        model = tiny_model(root, hidden)
        print(f"zo a: decomfl, tiny Llama 4 layers x {hidden}, {rounds} rounds, 4 workers (2 per round)",
              file=sys.stderr, flush=True)
        r = federate(root, f"a-bytes-h{hidden}", model=str(model), algorithm="decomfl", rounds=rounds, workers=4,
                     clients_per_round=2, local_steps=1, batch_size=8, max_seq_len=64,
                     flags=("--zo-perturbations", "5"), log_level="WARNING", timeout=args.run_timeout)
        runs.append(r)
        if r["failed"]:
            rows.append({"model": f"4 x {hidden}", "up B/round": "failed", "failed": r["failed"]})
            continue
        ws = r["workers"]
        per = [worker_bytes(w) for w in ws]
        n = len(per)
        mean = {k: sum(p[k] for p in per) / n for k in per[0]}
        worst = max(p["total"] for p in per)
        initial = sum(worker_bytes(w, "initial")["total"] for w in ws) / n
        files = sum(worker_bytes(w, "files")["total"] for w in ws) / n
        join = sum(worker_bytes(w, "join")["total"] for w in ws) / n
        s = r["summary"]
        done = int(s["rounds_completed"])
        # Coordinator's view: its bytes_down includes every worker's first download of the blocks.
        coord_down_run = s["bytes_down"] - sum(w["bytes"].get("initial", {}).get("received", {}).get("model", 0) for w in ws)
        worker_down_run = sum(p["down"] for p in per)
        per_1000 = {k: mean[k] / done * 1000 for k in mean}
        rows.append({
            "model": f"4 x {hidden}",
            "params (M)": num_params(model) / 1e6,
            "rounds": done,
            "tasks/worker": sum(w["rounds"] for w in ws) / n,
            "up B/round": mean["up"] / done,
            "down B/round": mean["down"] / done,
            "control B/round": mean["control"] / done,
            "of which heartbeats": mean["heartbeats"] / done,
            "run KB/worker": mean["total"] / 1e3,
            "worst worker KB": worst / 1e3,
            "1,000 rounds KB/worker": (mean["total"] / 1e3) if done == 1000 else per_1000["total"] / 1e3,
            "1,000 rounds": "measured" if done == 1000 else "extrapolated",
            "≤ 1 MB": "yes" if (worst if done == 1000 else worst / done * 1000) <= BYTES_TARGET else "no",
            "excluded: initial blocks KB": initial / 1e3,
            "excluded: model files KB": files / 1e3,
            "excluded: join B": join,
            "wall s": s["wall_seconds"],
            # JSON only
            "per_worker": [{"name": w["name"], **worker_bytes(w), "tasks": w["rounds"], "heartbeat_calls": w["heartbeats"],
                            "up_per_task": worker_bytes(w)["up"] / max(1, w["rounds"]),
                            "counts_match_prometheus": counts_agree(w)} for w in ws],
            "coordinator_bytes_up": s["bytes_up"],
            "coordinator_bytes_down": s["bytes_down"],
            "coordinator_up_equals_workers_up": s["bytes_up"] == sum(p["up"] for p in per),
            "coordinator_down_less_initial_equals_workers_down": coord_down_run == worker_down_run,
        })
    extra = {}
    ok = [x for x in rows if isinstance(x.get("up B/round"), float)]
    if len(ok) == 2:
        a, b = ok
        same = {k: sum(p[k] for p in a["per_worker"]) == sum(p[k] for p in b["per_worker"]) for k in ("up", "down")}
        ctl = [sum(p["control"] - p["heartbeats"] for p in x["per_worker"]) for x in ok]
        extra["a: same bytes for both widths"] = (
            f"up {'identical' if same['up'] else 'DIFFERENT'}, down {'identical' if same['down'] else 'DIFFERENT'}, "
            f"control without heartbeats {'identical' if ctl[0] == ctl[1] else f'{ctl[0]} vs {ctl[1]} B'} "
            f"(all workers, whole run); heartbeats follow wall time (one every 10 s)")
    if ok:
        extra["a: cross-checks"] = (
            "workers' phase tallies = their Prometheus counters: "
            f"{all(p['counts_match_prometheus'] for x in ok for p in x['per_worker'])}; coordinator bytes_up = "
            f"workers' up: {all(x['coordinator_up_equals_workers_up'] for x in ok)}; coordinator bytes_down "
            "- workers' initial block downloads = workers' down: "
            f"{all(x['coordinator_down_less_initial_equals_workers_down'] for x in ok)}")
    extra["a: settings"] = ("decomfl, K=1, P=5 (central), 4 workers, 2 per round, batch 8 x <=64 tokens, all blocks "
                            "trained, 1 torch thread per process, heartbeat every 10 s; bytes = serialized messages + "
                            "5-byte gRPC frames, from the Join reply on, model files and first block download excluded")
    return rows, {"extra": extra, "runs": runs}


# ---- b and d. quality and memory ------------------------------------------------------------------


def quality_runs(args, root: Path) -> list[dict]:
    runs = []
    for algorithm in args.algorithms_b:
        flags = ["--train-blocks", "layers.*"]
        if algorithm in ("fedbcd", "parablock"):
            flags += ["--block-schedule", "striped"]
        if algorithm == "decomfl":
            flags += ["--zo-perturbations", str(args.decomfl_p)]
        if algorithm == "fedspzo":
            flags += ["--zo-perturbations", args.fedspzo_p]
        print(f"zo b: {algorithm} on {args.model_b}, {args.rounds_b} rounds", file=sys.stderr, flush=True)
        r = federate(root, f"b-{algorithm}", model=args.model_b, algorithm=algorithm, rounds=args.rounds_b,
                     workers=args.workers, clients_per_round=args.clients_per_round, local_steps=1,
                     batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                     eval_max_examples=args.eval_max_examples, flags=tuple(flags), timeout=args.run_timeout,
                     check_export=args.check_export)
        print(f"zo b: {algorithm}: {'FAILED' if r['failed'] else 'done'} in {r['seconds']:.0f} s", file=sys.stderr,
              flush=True)
        runs.append(r)
    return runs


def part_b(runs: list[dict]) -> list[dict]:
    rows = []
    for r in runs:
        if r["failed"]:
            rows.append({"algorithm": r["algorithm"], "eval loss before": "failed", "failed": r["failed"]})
            continue
        s = r["summary"]
        rows.append({
            "algorithm": r["algorithm"],
            "rounds": s["rounds_completed"],
            "eval loss before": f"{s['eval_loss_initial']:.4f}",
            "eval loss after": f"{s['eval_loss_final']:.4f}",
            "accuracy before": r["initial"]["accuracy"],
            "accuracy after": r["final"]["accuracy"],
            "eval examples": r["final"]["examples"],
            "wall s": s["wall_seconds"],
            "run s": r["seconds"],
            # JSON only
            "eval_loss_initial": s["eval_loss_initial"],
            "eval_loss_final": s["eval_loss_final"],
            "export_check": r.get("export_check"),
            "round_history": s.get("round_history"),
        })
    return rows


def part_d(runs: list[dict]) -> list[dict]:
    rows = []
    base = next((r for r in runs if r["algorithm"] == "fedbcd" and not r["failed"]), None)

    def peak(r, key):
        values = [w[key] for w in r["workers"] if w.get(key) is not None]
        return max(values) if values else None

    for r in runs:
        if r["failed"]:
            continue
        rounds_peak, lifetime = peak(r, "peak_rounds_mib"), peak(r, "peak_lifetime_mib")
        row = {"algorithm": r["algorithm"], "worker peak RSS MiB (rounds)": rounds_peak,
               "worker peak RSS MiB (lifetime)": lifetime, "start-up peak MiB": peak(r, "peak_start_mib")}
        if base is not None and rounds_peak and peak(base, "peak_rounds_mib"):
            row["÷ fedbcd (rounds)"] = rounds_peak / peak(base, "peak_rounds_mib")
            row["÷ fedbcd (lifetime)"] = lifetime / peak(base, "peak_lifetime_mib")
        row["per_worker"] = [{k: w.get(k) for k in ("name", "peak_rounds_mib", "peak_lifetime_mib", "peak_start_mib")}
                             for w in r["workers"]]
        rows.append(row)
    return rows


# ---- c. layer evaluations --------------------------------------------------------------------------


def part_c(args) -> list[dict]:
    import random

    import torch

    from fedblock.common import zo
    from fedblock.common.algorithms import DeComFL, FedSPZO
    from fedblock.common.algorithms.base import Local
    from fedblock.common.blocks import partition
    from fedblock.common.data import collate, load_examples, tokenize
    from fedblock.common.messages import BlockSpec, TensorSpec
    from fedblock.common.models import load_model, load_tokenizer, resolve_model
    from fedblock.common.training import task_loss

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model_c)
    model = load_model(path, dtype=torch.float32)
    tokenizer = load_tokenizer(path)
    examples = load_examples(TOPICS)
    random.Random(0).shuffle(examples)
    batch = collate(tokenize(examples[: args.batch_size], tokenizer, args.max_seq_len), tokenizer.pad_token_id)
    blocks = partition(model)
    params = dict(model.named_parameters())
    specs = [BlockSpec(b.name, tuple(TensorSpec.of(n, params[n].float()) for n in b.params)) for b in blocks]
    trainable = [b.name for b in blocks if b.name.startswith("layers.")]
    n_layers = len(trainable)
    local = Local(model, {b.name: b for b in blocks}, tuple(specs), None, None, Path("."), lambda: False, lambda: 0,
                  lambda what, loss: None, threading.Event())
    model.eval()
    with torch.no_grad():
        task_loss(model, batch)  # once without counting: the loss checks its head with a forward of its own

    def measure(algorithm) -> tuple[int, float]:
        ps = [params[n] for _, n in algorithm.order]
        if isinstance(algorithm, FedSPZO):
            algorithm.estimate(local, ps, batch, 1)  # SplitForward primes itself once per model and loss
        with zo.LayerCounter(model) as counter:
            t = time.perf_counter()
            algorithm.estimate(local, ps, batch, 12345)
            seconds = time.perf_counter() - t
        return counter.count, seconds

    rows = []
    measured_decomfl: dict[int, tuple[int, float]] = {}
    for text in args.splits_c:
        p1, p2 = (int(x) for x in text.split(","))
        P = p1 * p2
        spzo = FedSPZO({"zo_perturbations": f"{p1},{p2}"}, specs, trainable)
        if P not in measured_decomfl:
            print(f"zo c: decomfl P={P} on {args.model_c}", file=sys.stderr, flush=True)
            count, seconds = measured_decomfl[P] = measure(DeComFL({"zo_perturbations": str(P)}, specs, trainable))
            rows.append({
                "directions": P, "method": "decomfl", "perturbations": f"P={P}", "split": "-", "layers": n_layers,
                "layer evals (zo.layer_evaluations)": zo.layer_evaluations("decomfl", n_layers, 0, P=P),
                "layer evals (LayerCounter)": count, "full-forward units": count / n_layers, "estimate s": seconds,
            })
        print(f"zo c: fedspzo {p1},{p2} (split {spzo.split}) on {args.model_c}", file=sys.stderr, flush=True)
        count, seconds = measure(spzo)
        ratio = count / measured_decomfl[P][0]
        rows.append({
            "directions": P, "method": "fedspzo", "perturbations": f"P1,P2={p1},{p2}", "split": spzo.split,
            "layers": n_layers,
            "layer evals (zo.layer_evaluations)": zo.layer_evaluations("fedspzo", n_layers, spzo.split, P1=p1, P2=p2),
            "layer evals (LayerCounter)": count, "full-forward units": count / n_layers, "estimate s": seconds,
            "÷ decomfl": ratio, "≤ 0.5": "yes" if ratio <= LAYER_TARGET else "no",
            "estimate s ÷ decomfl": seconds / measured_decomfl[P][1],
        })
    return rows


# ---- main ------------------------------------------------------------------------------------------


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="a,b,c,d", help="which parts to run (default a,b,c,d; d needs b)")
    p.add_argument("--rounds-a", type=int, help="rounds of the bytes runs (default 200; 1000 measures the 1,000-round figure; --quick 50)")
    p.add_argument("--widths", help="hidden sizes of the two tiny models of part a (default 32,128)")
    p.add_argument("--model-b", help=f"model of parts b and d (default {SMOLLM2}; --quick a tiny Llama 4 x 64)")
    p.add_argument("--rounds-b", type=int, help="rounds of the quality runs (default 4; --quick 8)")
    p.add_argument("--algorithms-b", default="decomfl,fedspzo,fedbcd", help="algorithms of parts b and d")
    p.add_argument("--workers", type=int, default=4, help="worker processes of the b runs (default 4)")
    p.add_argument("--clients-per-round", type=int, default=2, help="participants per round of the b runs (default 2)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--max-seq-len", type=int, default=128, help="tokens per example (default 128; topics prompts are ~30)")
    p.add_argument("--eval-max-examples", type=int, help="held-out examples evaluated (default 62, all; --quick 32)")
    p.add_argument("--decomfl-p", type=int, default=5, help="decomfl perturbations in part b (default 5)")
    p.add_argument("--fedspzo-p", default="1,8", help="fedspzo P1,P2 in part b (default 1,8)")
    p.add_argument("--model-c", help=f"model of part c (default {SMOLLM2}; --quick the tiny Llama 4 x 64)")
    p.add_argument("--splits-c", default="1,8;2,4", help="fedspzo P1,P2 pairs of part c, ';'-separated (default 1,8;2,4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of part c and the evaluations (default 1)")
    p.add_argument("--run-timeout", type=float, default=1500, help="seconds after which a run is stopped as failed")
    p.add_argument("--check-export", action="store_true",
                   help="also evaluate each run's export here and check it against the coordinator's evaluation")
    p.add_argument("--worker", help="internal: run one watched worker with this JSON spec")
    args = p.parse_args()
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    root = (args.workdir / "zo").resolve()
    root.mkdir(parents=True, exist_ok=True)
    tiny = str(tiny_model(root, 64))
    args.rounds_a = args.rounds_a or (50 if args.quick else 200)
    args.widths = [int(x) for x in (args.widths or "32,128").split(",")]
    args.model_b = args.model_b or (tiny if args.quick else SMOLLM2)
    args.model_c = args.model_c or (tiny if args.quick else SMOLLM2)
    args.rounds_b = args.rounds_b or (8 if args.quick else 4)
    args.eval_max_examples = args.eval_max_examples or (32 if args.quick else 62)
    args.algorithms_b = [a for a in args.algorithms_b.split(",") if a]
    args.splits_c = [s for s in args.splits_c.split(";") if s]
    parts = set(args.parts.split(","))
    t0 = time.monotonic()
    load_before = os.getloadavg()[0]
    all_rows, extra = [], {}
    failed = False

    def show(part: str, title: str, rows: list[dict], columns: list[str], notes: dict) -> None:
        print(f"\n### {part}. {title}\n")
        if rows:
            print(table(rows, [c for c in columns if any(c in r for r in rows)]))
        for k, v in notes.items():
            print(f"{k}: {v}")
        all_rows.extend({"part": part, **r} for r in rows)
        extra.update(notes)

    if "a" in parts:
        rows, info = part_a(args, root)
        failed |= any(r["failed"] for r in info["runs"])
        show("a", f"bytes per worker, decomfl (K=1, P=5), {args.rounds_a} rounds, two widths", rows,
             ["model", "params (M)", "rounds", "tasks/worker", "up B/round", "down B/round", "control B/round",
              "of which heartbeats", "run KB/worker", "worst worker KB", "1,000 rounds KB/worker", "1,000 rounds",
              "≤ 1 MB", "excluded: initial blocks KB", "excluded: model files KB", "wall s"], info["extra"])
    runs = []
    if "b" in parts or "d" in parts:
        runs = quality_runs(args, root)
        failed |= any(r["failed"] for r in runs)
    if "b" in parts:
        settings = (f"{args.model_b}, {TOPICS} (9 choices), {args.workers} workers, {args.clients_per_round} per round, "
                    f"{args.rounds_b} rounds x 1 local step, batch {args.batch_size}, train blocks layers.*, each "
                    f"algorithm's default lr (decomfl/fedspzo SGD 1e-5, fedbcd AdamW 1e-4, striped), decomfl P="
                    f"{args.decomfl_p}, fedspzo {args.fedspzo_p} (default split), eval on {args.eval_max_examples} "
                    "held-out examples; loss and accuracy (argmax over the choices) from the coordinator's evaluation")
        notes = {"b: settings": settings}
        rows = part_b(runs)
        checked = [r["export_check"] for r in rows if r.get("export_check")]
        if checked:
            notes["b: the export evaluated here = the coordinator's final evaluation"] = all(
                c["loss_matches"] and c["accuracy_matches"] for c in checked)
        show("b", f"quality after {args.rounds_b} rounds", rows,
             ["algorithm", "rounds", "eval loss before", "eval loss after", "accuracy before", "accuracy after",
              "eval examples", "wall s", "run s"], notes)
    if "c" in parts:
        rows = part_c(args)
        verdict = [r for r in rows if r["method"] == "fedspzo"]
        notes = {"c: settings": f"{args.model_c}, one estimate step each on one batch of {args.batch_size} topic "
                                f"questions, central differences, {args.threads} torch thread(s)",
                 "c: target fedspzo ÷ decomfl ≤ 0.5": "met" if all(r["≤ 0.5"] == "yes" for r in verdict) else "NOT met"}
        show("c", "decoder-layer forward evaluations per step, same directions", rows,
             ["directions", "method", "perturbations", "split", "layers", "layer evals (zo.layer_evaluations)",
              "layer evals (LayerCounter)", "full-forward units", "÷ decomfl", "≤ 0.5", "estimate s",
              "estimate s ÷ decomfl"], notes)
    if "d" in parts:
        rows = part_d(runs)
        show("d", "worker peak RSS", rows,
             ["algorithm", "worker peak RSS MiB (rounds)", "worker peak RSS MiB (lifetime)", "start-up peak MiB",
              "÷ fedbcd (rounds)", "÷ fedbcd (lifetime)"],
             {"d: how": "VmHWM of each worker process (the b runs), reset after its first download of the model "
                        "(rounds) and not reset (lifetime); max over the run's workers"})
    extra["load average (1 min), start → end"] = (f"{load_before:.1f} → {os.getloadavg()[0]:.1f} on "
                                                   f"{os.cpu_count()} CPUs (timings are shared-machine timings)")
    extra["total seconds"] = round(time.monotonic() - t0, 1)
    print(f"\nload average (1 min), start → end: {extra['load average (1 min), start → end']}")
    print(f"total seconds: {extra['total seconds']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "zo", "environment": environment(), "rows": all_rows,
                                         "runs": [{k: v for k, v in r.items() if k != "workers"} | {
                                             "workers": r["workers"]} for r in runs], **extra},
                                        indent=1, default=str) + "\n")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
