"""Every algorithm on the same data and budget: fedbcd, parablock, fedavg, fedcybgd, decomfl and fedspzo,
full-parameter or on LoRA adapters, and CG-FedLLM's autoencoder codec.

What is run: for each algorithm, one federated run on `builtin:chatterbot-topics` (9-topic
classification; loss = cross-entropy over the choices, accuracy = the right choice has the largest
logit): a real `fedblock coordinator` process and N worker processes on loopback, the data split as
`fedblock simulate` splits it (10 % held out, IID shards, seed 0). The budget is the same for every
row: the same rounds, workers, participants per round, local steps per round and examples per step
(batch size), the same trained parameters (the decoder layers, `--train-blocks 'layers.*'`) and the
same held-out sample. What differs is each algorithm's nature and defaults: fedbcd and parablock train
one decoder layer per participant per round (striped schedule), fedavg all of them; fedcybgd (its
default schedule, striped) in `relay` mode one layer per round, trained by one participant, the
participants in turn, and in `parallel` mode one distinct layer per participant per round, with
download fractions 1, 0.5 and 0.25 (`--download-fraction`: for a task a worker receives that fraction
of the layers changed since the base model, always its own; the others revert to the base values it
keeps, at no cost in bytes); rows `fedcybgd-relay`, `fedcybgd-parallel` (fraction 1),
`fedcybgd-parallel-0.5`, `fedcybgd-parallel-0.25` (any `fedcybgd-MODE[-FRACTION]` works); decomfl and
fedspzo move all of them along random directions (decomfl P = 5 perturbations, fedspzo P1,P2 = 1,8 at
its default split); block methods use AdamW at 1e-4, zeroth-order ones SGD at 1e-5 (their defaults).

A row name may add `+lora` (`--peft lora` with its defaults, r 8, alpha 16, dropout 0.05 on q, k, v, o:
`fedavg+lora` is FedIT; `fedbcd+lora` trains one layer's adapters per participant; `decomfl+lora`
perturbs the adapters only; first-order LoRA rows use AdamW at `--lora-lr`, 3e-4, zeroth-order ones
`--zo-lr`) and `+ae:RATIO[:TUNE_STEPS][:VARIANT]` (the upload codec `ae:RATIO[:TUNE_STEPS]`: CG-FedLLM is
`fedavg+lora+ae:64`). An autoencoder row pre-trains its codec first (TGAP: `fedblock codec train`,
`--ae-steps` Adam steps at the paper's 2e-4, VARIANT `none`, the paper's, or `max`) on the updates that
the same row without `+ae` recorded (`--record-updates`), which must be an earlier row: the same data
and budget, not a held-out share of it, and its pre-training time is not in the row's (it is in the
JSON, with the hold-out reconstruction).
The worker processes are benchmarks/zo.py's watched real workers (see there): bytes by kind from the
worker's own counters, peak RSS from the process.

Columns:
- eval loss and accuracy: before the first round (the same for every row: see the line below the
  table) and after the last, from the coordinator's evaluation of the global model on the held-out
  sample (summary.json; server/evaluation.py runs `training.evaluate`; accuracy = the right choice
  has the largest logit). `--check-export` also evaluates each exported model here and checks it.
- up / down / control per worker: every gRPC message after Join (serialized message + 5-byte
  frame), by kind (update, model, control; heartbeats are control), mean over the workers; the model
  files and each worker's first download of every block are excluded (the line below the table says
  how much that is).
- MB down/round: the model bytes downloaded after the start (the down column), all workers together,
  ÷ (rounds − 1): the global models of rounds 1 .. R − 1 are what a worker can fetch (none is new
  during round 1 and round R's is never announced: the run ends), so this is what one new global model
  costs in downloads. Delta sync (fedbcd, parablock) fetches the blocks changed since the version a
  worker holds; fedcybgd fetches, when a task comes, the (sampled) blocks changed since it last synced.
- fwd/step, bwd/step: passes of one local step in units of one full forward (or backward) pass of the
  model, counted from what the algorithm does: block methods 1 forward + 1 backward per step (the
  backward stops at the lowest trained block; fedavg's goes through the whole model); decomfl 2P
  forwards (central differences), no backward; fedspzo its decoder-layer evaluations
  2·P1·(split + P2·(n − split)) ÷ n layers (zo.layer_evaluations; the cheap embedding and head, which
  run once per evaluation, are not counted), no backward. fwd / bwd per worker: that times the local
  steps the worker ran over the run (measured task count × local steps).
- wall s: the coordinator's (summary.json: start to summary, so with both evaluations and the workers'
  first downloads); round s: the steady round time, from the close of round 1 to the close of the
  last round ÷ (rounds − 1), as benchmarks/quality.py reads it (round 1 also waits for the workers'
  start-up).
- worker peak MiB: the largest peak RSS (VmHWM) of the run's workers after their first download (a
  worker's steady state); the JSON has the lifetime peaks too.

Defaults: SmolLM2-135M-Instruct, 4 workers, 2 per round, 6 rounds of 1 local step, batch 8, 13 rows
(the LoRA and autoencoder rows measured 1.5-3 minutes each, the autoencoder's pre-training 4-6 minutes):
block rows about 1.5 minutes each on 2 cores (fedbcd, parablock and the four fedcybgd rows took 82-96 s
each at load 1.5-4.5), zeroth-order rows up to 5 minutes (a decomfl round took 35-50 s
on the 2-core machine shared with a test run (load 3-5), 10 forwards and perturbing, stepping and
replaying 106M parameters per step; a 3-round decomfl row took 3-3.5 minutes in all, start-up, the
workers' first download and both evaluations included; block rows are faster, most of their time is
start-up). `--quick`: a tiny random Llama (4 layers x 64), 2 workers, 2 per round, 6 rounds: about
20-30 s per row, 4.7 minutes for the 13 rows (pre-training included) at load 2-3. Run state under
WORKDIR/compare/NAME (weights deleted after each run; logs kept).

    python benchmarks/compare.py [--quick] [--json out.json] [--algorithms fedbcd,fedcybgd-relay] [--rounds 6]
    python benchmarks/compare.py --algorithms fedavg+lora,fedavg+lora+ae:64,fedavg+lora+ae:64:20:max
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import parser, report  # noqa: E402
from benchmarks.zo import SMOLLM2, TOPICS, federate, tiny_model, worker_bytes  # noqa: E402

ALGORITHMS = ("fedbcd", "parablock", "fedavg", "fedcybgd-relay", "fedcybgd-parallel", "fedcybgd-parallel-0.5",
              "fedcybgd-parallel-0.25", "decomfl", "fedspzo", "fedavg+lora", "fedbcd+lora", "decomfl+lora",
              "fedavg+lora+ae:64")
FULL = {"rounds": 6, "workers": 4, "clients_per_round": 2, "local_steps": 1, "eval_max_examples": 62}
QUICK = {"rounds": 6, "workers": 2, "clients_per_round": 2, "local_steps": 1, "eval_max_examples": 32}
MB = 1e6


def human(n: float) -> str:
    """Bytes as text with their unit (the table's 3 significant digits of MB would read 0.0000562)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def row_spec(row: str) -> tuple[str, list, bool, str | None]:
    """(algorithm, its extra flags, LoRA?, autoencoder spec or None) of a row name:
    `BASE[+lora][+ae:RATIO[:STEPS][:VARIANT]]`, BASE an algorithm or `fedcybgd-MODE[-FRACTION]`."""
    base, *options = row.split("+")
    lora = "lora" in options
    ae = next((o for o in options if o.startswith("ae:")), None)
    if any(o != "lora" and not o.startswith("ae:") for o in options):
        raise SystemExit(f"compare: row {row!r}: the options after + are lora and ae:RATIO[:STEPS][:VARIANT]")
    flags = ["--peft", "lora"] if lora else []
    if not base.startswith("fedcybgd-"):
        return base, flags, lora, ae
    mode, _, fraction = base.removeprefix("fedcybgd-").partition("-")
    return "fedcybgd", [*flags, "--fedcybgd-mode", mode, "--download-fraction", fraction or "1"], lora, ae


def records_row(row: str) -> str:
    """The row whose recorded updates pre-train an autoencoder row's codec: the same row without +ae."""
    return "+".join(o for o in row.split("+") if not o.startswith("ae:"))


def pretrain(root: Path, source: str, ae: str, steps: int, done: dict) -> tuple[Path, dict, str]:
    """TGAP for an autoencoder row: train on the updates `source`'s run recorded (once per source, ratio
    and variant: `done` keeps what this invocation trained). (weights, report, codec)."""
    from fedblock.common.config import CodecTrainConfig
    from fedblock.common.tools import codec_train

    _, ratio, *rest = ae.split(":")
    tune = next((x for x in rest if x.isdigit()), "0")
    variant = next((x for x in rest if not x.isdigit()), "none")
    out = root / f"ae-{source}-{ratio}-{variant}.safetensors"
    if out not in done:
        done[out] = codec_train(CodecTrainConfig(from_dir=root / source, out=out, ratio=int(ratio), variant=variant,
                                                 steps=steps))
    return out, done[out], f"ae:{ratio}" + (f":{tune}" if tune != "0" else "")


def passes(algorithm: str, num_layers: int, decomfl_p: int, fedspzo_p: tuple[int, int], split: int) -> tuple[float, float]:
    """(forward, backward) passes per local step, in full-pass units."""
    from fedblock.common import zo

    if algorithm == "decomfl":
        return zo.layer_evaluations("decomfl", num_layers, 0, P=decomfl_p) / num_layers, 0.0
    if algorithm == "fedspzo":
        p1, p2 = fedspzo_p
        return zo.layer_evaluations("fedspzo", num_layers, split, P1=p1, P2=p2) / num_layers, 0.0
    return 1.0, 1.0


def decoder_layers(model: str) -> int:
    import json

    from fedblock.common.models import resolve_model

    config = json.loads((resolve_model(model) / "config.json").read_text())
    return int(config.get("num_hidden_layers") or config.get("n_layer"))


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", help=f"model folder or built-in name (default {SMOLLM2}; --quick a tiny Llama 4 x 64)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help=f"rows: algorithms or fedcybgd-MODE[-FRACTION] (default {','.join(ALGORITHMS)})")
    p.add_argument("--rounds", type=int, help=f"rounds (default {FULL['rounds']}; --quick {QUICK['rounds']})")
    p.add_argument("--workers", type=int, help=f"worker processes (default {FULL['workers']}; --quick {QUICK['workers']})")
    p.add_argument("--clients-per-round", type=int,
                   help=f"participants per round (default {FULL['clients_per_round']}; --quick {QUICK['clients_per_round']})")
    p.add_argument("--local-steps", type=int, help=f"local steps per round, every row (default {FULL['local_steps']})")
    p.add_argument("--batch-size", type=int, default=8, help="examples per local step, every row (default 8)")
    p.add_argument("--max-seq-len", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--eval-max-examples", type=int,
                   help=f"held-out examples evaluated (default {FULL['eval_max_examples']}, all; --quick {QUICK['eval_max_examples']})")
    p.add_argument("--block-lr", type=float, default=1e-4, help="AdamW learning rate of the block methods (default 1e-4)")
    p.add_argument("--zo-lr", type=float, default=1e-5, help="SGD learning rate of the zeroth-order methods (default 1e-5)")
    p.add_argument("--lora-lr", type=float, default=3e-4,
                   help="AdamW learning rate of first-order rows with +lora (default 3e-4)")
    p.add_argument("--ae-steps", type=int, default=1000, help="pre-training steps of an autoencoder row's codec (default 1000)")
    p.add_argument("--decomfl-p", type=int, default=5, help="decomfl perturbations P (default 5)")
    p.add_argument("--fedspzo-p", default="1,8", help="fedspzo P1,P2 (default 1,8)")
    p.add_argument("--run-timeout", type=float, default=1800, help="seconds after which a run is stopped as failed")
    p.add_argument("--check-export", action="store_true",
                   help="also evaluate each run's export here and check it against the coordinator's evaluation")
    args = p.parse_args()
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    root = (args.workdir / "compare").resolve()
    root.mkdir(parents=True, exist_ok=True)
    model = args.model or (str(tiny_model(root, 64)) if args.quick else SMOLLM2)
    algorithms = [a for a in args.algorithms.split(",") if a]
    n_layers = decoder_layers(model)
    p1, p2 = (int(x) for x in args.fedspzo_p.split(","))
    from fedblock.common import zo

    split = zo.default_split(n_layers, p1, p2)

    t0 = time.monotonic()
    load_before = os.getloadavg()[0]
    rows, runs, initial = [], [], None
    sources = {records_row(a) for a in algorithms if row_spec(a)[3]}
    missing = [a for a in algorithms if row_spec(a)[3] and records_row(a) not in algorithms[:algorithms.index(a)]]
    if missing:
        raise SystemExit(f"compare: {missing[0]} pre-trains its codec on the updates of {records_row(missing[0])}, "
                         "which must be an earlier row")
    pretrained, trained = {}, {}
    for i, name in enumerate(algorithms, 1):
        algorithm, row_flags, lora, ae = row_spec(name)
        flags = ["--train-blocks", "layers.*", *row_flags]
        if algorithm in ("decomfl", "fedspzo"):
            flags += ["--lr", args.zo_lr, "--zo-perturbations", args.decomfl_p if algorithm == "decomfl" else args.fedspzo_p]
        else:
            flags += ["--lr", args.lora_lr if lora else args.block_lr]
        if name in sources:
            flags += ["--record-updates"]
        if ae:
            weights, pretrained[name], codec = pretrain(root, records_row(name), ae, args.ae_steps, trained)
            flags += ["--codec", codec, "--codec-weights", weights]
        if algorithm in ("fedbcd", "parablock"):
            flags += ["--block-schedule", "striped"]
        print(f"compare: [{i}/{len(algorithms)}] {name} ({time.monotonic() - t0:.0f} s so far)", file=sys.stderr,
              flush=True)
        r = federate(root, name, model=model, algorithm=algorithm, rounds=args.rounds, workers=args.workers,
                     clients_per_round=args.clients_per_round, local_steps=args.local_steps, batch_size=args.batch_size,
                     max_seq_len=args.max_seq_len, eval_max_examples=args.eval_max_examples, flags=tuple(flags),
                     timeout=args.run_timeout, check_export=args.check_export)
        runs.append(r)
        if r["failed"]:
            rows.append({"algorithm": name, "eval loss": "failed", "failed": r["failed"], "log": r["logs"][0]})
            continue
        s, ws = r["summary"], r["workers"]
        initial = initial or r["initial"]
        per = [worker_bytes(w) for w in ws]
        n = len(ws)
        fwd, bwd = passes(algorithm, n_layers, args.decomfl_p, (p1, p2), split)
        down_total = sum(x["down"] for x in per)  # all workers, after the start
        steps = sum(w["rounds"] for w in ws) * args.local_steps / n  # local steps per worker over the run
        history = s.get("round_history") or []
        peaks = [w["peak_rounds_mib"] for w in ws if w.get("peak_rounds_mib") is not None]
        up, down, control = (sum(x[k] for x in per) / n for k in ("up", "down", "control"))
        rows.append({
            "algorithm": name,
            "eval loss": f"{s['eval_loss_initial']:.4f} → {s['eval_loss_final']:.4f}",
            "accuracy": r["final"]["accuracy"],
            "up/worker": human(up),
            "down/worker": human(down),
            "MB down/round": down_total / MB / (s["rounds_completed"] - 1) if s["rounds_completed"] >= 2 else "n/a",
            "control/worker": human(control),
            "fwd/step": fwd,
            "bwd/step": bwd,
            "fwd/worker": fwd * steps,
            "bwd/worker": bwd * steps,
            "wall s": s["wall_seconds"],
            "round s": ((history[-1]["closed_at_s"] - history[0]["closed_at_s"]) / (len(history) - 1)
                        if len(history) >= 2 else "n/a"),
            "worker peak MiB": max(peaks) if peaks else "n/a",
            # JSON only
            "bytes_up_per_worker": up,
            "bytes_down_per_worker": down,
            "bytes_control_per_worker": control,
            "eval_loss_initial": s["eval_loss_initial"],
            "eval_loss_final": s["eval_loss_final"],
            "accuracy_initial": r["initial"]["accuracy"],
            "accuracy_by": r["final"]["by"],
            "export_check": r.get("export_check"),
            "autoencoder_pretraining": pretrained.get(name),
            "rounds_completed": s["rounds_completed"],
            "local_steps_per_worker": steps,
            "bytes_per_worker": [{"name": w["name"], **x} for w, x in zip(ws, per, strict=True)],
            "initial_download_mb_per_worker": sum(worker_bytes(w, "initial")["total"] for w in ws) / n / MB,
            "model_files_mb_per_worker": sum(worker_bytes(w, "files")["total"] for w in ws) / n / MB,
            "worker_peak_lifetime_mib": max(w["peak_lifetime_mib"] for w in ws),
            "coordinator_bytes_up": s["bytes_up"],
            "coordinator_bytes_down": s["bytes_down"],
            "process_seconds": r["seconds"],
            "round_history": history,
        })
        print(f"compare: {name}: {rows[-1]['eval loss']}, accuracy {rows[-1]['accuracy']:.3f}, "
              f"{r['seconds']:.0f} s", file=sys.stderr, flush=True)
    extra = {
        "settings": f"{model}, {TOPICS}, {args.workers} workers, {args.clients_per_round} per round, {args.rounds} rounds x "
                    f"{args.local_steps} local step(s), batch {args.batch_size} (<= {args.max_seq_len} tokens), train blocks "
                    f"layers.* ({n_layers} decoder layers), block methods AdamW lr {args.block_lr} (fedbcd/parablock "
                    f"striped, one layer per participant; fedcybgd its default, striped), zeroth-order SGD lr {args.zo_lr}, decomfl P={args.decomfl_p}, "
                    f"fedspzo {p1},{p2} split {split}; eval on {args.eval_max_examples} held-out examples; 1 torch thread "
                    "per process",
    }
    if initial is not None:
        extra["before the first round"] = f"accuracy {initial['accuracy']:.3f} (loss {initial['loss']:.4f}, the same for every row)"
    ok = [r for r in rows if "eval_loss_final" in r]
    if ok:
        extra["excluded, per worker"] = (
            "first download of every block: " + ", ".join(
                f"{r['algorithm']} {human(r['initial_download_mb_per_worker'] * MB)}" for r in ok)
            + f"; model files (config, tokenizer): {human(ok[0]['model_files_mb_per_worker'] * MB)}")
        checked = [r["export_check"] for r in ok if r.get("export_check")]
        if checked:
            extra["the exports evaluated here = the coordinator's final evaluation"] = all(
                c["loss_matches"] and c["accuracy_matches"] for c in checked)
    extra["passes"] = ("fwd/bwd per step in full-pass units: block methods 1 + 1 (backward down to the trained block; "
                       f"fedavg the whole model); decomfl 2P = {2 * args.decomfl_p} forwards; fedspzo "
                       f"2·P1·(split + P2·(n − split)) ÷ n = {passes('fedspzo', n_layers, 0, (p1, p2), split)[0]:.2f} "
                       "forwards (zo.layer_evaluations); per worker: × its local steps over the run")
    extra["load average (1 min), start → end"] = (f"{load_before:.1f} → {os.getloadavg()[0]:.1f} on "
                                                   f"{os.cpu_count()} CPUs (timings are shared-machine timings)")
    extra["total seconds"] = round(time.monotonic() - t0, 1)
    extra["MB down/round"] = ("all workers' model downloads after the start (down/worker x workers) ÷ (rounds - 1), "
                              "the global models of rounds 1 .. R-1")
    columns = ["algorithm", "eval loss", "accuracy", "up/worker", "down/worker", "MB down/round", "control/worker", "fwd/step",
               "bwd/step", "fwd/worker", "bwd/worker", "wall s", "round s", "worker peak MiB"]
    report("compare", rows, args, columns=columns, **extra)
    if any(r["failed"] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
