"""Autoencoder codec: how well CG-FedLLM's autoencoder reconstructs real recorded updates, and their aggregate.

What is measured: the `ae:R` upload codec (common/codecs.py `Autoencoder`, common/autoencoder.py) on
the block deltas a real run accepted, recorded by a coordinator with `--record-updates` under
STATE_DIR/records/round-NNNNNN/WORKER@BLOCK.safetensors (metadata round, worker, block, tokens). They
are what the coordinator decoded, so the true deltas when that run's upload codec was `none`.

Split, in time, as TGAP then FAF would see it: the autoencoder is pre-trained (`train_autoencoder`,
holdout 0, batch 8, seed 0, MSE on the scaled images, Adam) on the records of the first
`--train-fraction` (default 2/3, rounded, at least one round and one left) of the recorded rounds, and
evaluated on those of the later rounds; the output says which rounds. Each update is laid out with
`Autoencoder.block_image` (the codec's own layout, tensors in name order), so the images are exactly
what the codec encodes.

Grid (flags change it): ratios R = 4, 16, 64 x variants `none` (the paper's: no normalisation) and
`max` (ours: each image divided by its largest magnitude, into Tanh's range) x learning rates 2e-4 (the
paper's) and 1e-3, each for `--steps` steps (default 400; --quick 100). The weights of each config go
to WORKDIR/autoencoder/weights/ (what `fedblock codec train` would have written from those rounds).

Columns, over the evaluation rounds' updates, every reconstruction being what the coordinator gets:
`CodecPipeline("ae:R", weights)` encode then decode (scale, encode, float32 latent + scale on the
wire; decode, unscale, `from_image`):
- upd cos, upd rel err: the mean over updates of cosine(reconstruction, update) and
  ||reconstruction - update|| / ||update||, all of the block's tensors together (padding excluded).
- agg cos, agg rel err (the figure that matters: the coordinator averages the updates): for each
  (round, block), the token-weighted mean of its workers' deltas (tokens from the records' metadata),
  true vs reconstructed; cosine and relative error of the two, averaged over the (round, block) pairs.
  With one worker per pair this is the per-update figure.
- FAF ...: the same with our FAF (`ae:R:S`, S = `--tune-steps`, default 20): each worker keeps its own
  codec (its own encoder copy, starting from the pre-trained one at the first evaluation round), tunes
  the encoder on each update for S Adam steps (lr 1e-3, decoder fixed) before encoding it and keeps the
  tuned encoder for its next update (`encode_pending` + `commit`, as the worker does once an update
  is accepted), its updates in (round, block) order. FAF s/upd: seconds of tuning + encoding one
  update. By default for R = 64 only (`--faf-ratios`; --quick: all ratios); '-' elsewhere.
- train s: seconds of `train_autoencoder` (with its final pass over the training images).
- train cos: upd cos on the training updates themselves (in sample): low there too means the
  autoencoder under-fits (too few steps, or updates it cannot represent), high there but low on the
  evaluation rounds means it does not carry over to later rounds.
- payload B: mean tensor-data bytes of one update on the wire (`payload_nbytes`); ratio (payload):
  `none`'s payload over the codec's, summed over the evaluation updates. For `ae:R` it is below R: the
  image is zero-padded to multiples of R (see the images line) and the float32 scale travels too.
  ratio (blob): the same with whole encoded blobs (`len(encode(...))`, what the wire carries: the
  payload plus the safetensors header, large beside a small latent, and its 8-byte length).
- reference rows `bf16`, `int8` (no training): the same pipelines' encode + decode of each evaluation
  update, same metrics, so a reader sees what a simple codec achieves at 1/2 (bf16) and 1/4 to 1/3
  (int8: one fp32 scale per row, and a LoRA B's rows are only r long) of the bytes. (Sending nothing
  would score cosine 0 and relative error 1.)

Cost: training time grows with the image size; on one CPU thread a training step of 8 images of
64 x 576 (a SmolLM2 LoRA r=8 layer block, 30,720 elements) takes about 0.12-0.25 s, and an FAF
tuning step of one image about 0.02-0.05 s. Full-block records (a `--train-blocks 'layers.*'` run:
millions of elements per image) are about 100 times larger and slow to train on CPU: restrict them with
`--blocks 'layers.*'` and subsample with `--max-updates N` (at most N training updates, evenly spaced
in (round, block, worker) order, and about N evaluation updates, whole (round, block) groups evenly
spaced, so that the aggregates stay true). Only the selected records are loaded.

`--quick` makes its own records: a tiny random Llama (`make_tiny_model`, 4 layers x 64) federated with
`fedblock simulate --algorithm fedavg --peft lora --lora-r 8` (FedIT), 2 workers, 6 rounds of 2 local
steps (lr 1e-3, batch 4 x 64 tokens) with `--record-updates` into WORKDIR/autoencoder/quick-run
(reused when it is complete; `--rerun` makes it again): 48 updates of 4 LoRA blocks (3,584 elements
each), rounds 1-4 to train and 5-6 to evaluate. It took 3.5 minutes on the 2-core development machine
shared with other jobs (load 3-5): 64 s recording, 2 minutes for the 12 configs (FAF at every ratio);
2 minutes when the records are reused. Measured there: bf16 and int8 reconstruct with cosine 1.000
(relative error 0.002-0.003); no autoencoder config does better than cosine 0.1 on the evaluation rounds
(agg cos -0.01 to 0.06), and not on its own training updates either (train cos at most 0.1: 100 steps
on 32 LoRA deltas of 2 Adam steps, near sign patterns of +-lr); variant `none` has relative errors of
1.6-75 (Tanh's output is not scaled to deltas of 1e-3); FAF lifts `max`'s agg cos to 0.01-0.19.

Full measurement, estimated from those step times: a SmolLM2 FedIT run (`fedavg --peft lora --lora-r
8 --record-updates`) with 360 recorded updates of 30,720 elements (images 56 x 576 at R = 4, 64 x 576
at R = 16, 64): 12 configs x 400 steps x 0.12-0.2 s = 10-16 minutes of training, FAF at R = 64 (4 x
120 updates x 20 steps x 0.02-0.05 s) 3-8 minutes, the rest about a minute: 15-25 minutes;
`--faf-ratios all` adds 5-10 minutes.

    python benchmarks/autoencoder.py --from STATE_DIR [--json out.json] [--blocks 'lora.*'] [--max-updates N]
        [--ratios 4,16,64] [--variants none,max] [--lrs 2e-4,1e-3] [--steps 400] [--tune-steps 20]
        [--faf-ratios 64|all] [--train-fraction 0.667]
    python benchmarks/autoencoder.py --quick [--json out.json] [--workdir runs/bench]
"""

from __future__ import annotations

import fnmatch
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import parser, report  # noqa: E402

QUICK_RUN = ["--data", "builtin:chatterbot", "--workers", "2", "--algorithm", "fedavg", "--peft", "lora", "--lora-r", "8",
             "--rounds", "6", "--local-steps", "2", "--lr", "1e-3", "--record-updates", "--threads", "1",
             "--batch-size", "4", "--max-seq-len", "64", "--eval-max-examples", "8"]
REFERENCES = ("bf16", "int8")


@dataclass
class Update:
    path: Path
    round: int
    worker: str
    block: str
    tokens: int
    tensors: dict | None = None  # name -> float32 tensor, once loaded


def scan(state_dir: Path, blocks: str) -> list[Update]:
    """The recorded updates (metadata only), in (round, block, worker) order, of blocks matching one
    of the comma-separated globs."""
    from safetensors import safe_open

    paths = sorted((state_dir / "records").glob("round-*/*.safetensors"))
    if not paths:
        sys.exit(f"autoencoder: no recorded updates under {state_dir}/records (run the coordinator with --record-updates)")
    patterns = [p.strip() for p in blocks.split(",") if p.strip()]
    out = []
    for path in paths:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        worker, _, block = path.stem.partition("@")
        block = meta.get("block", block)
        if not any(fnmatch.fnmatchcase(block, p) for p in patterns):
            continue
        out.append(Update(path, int(meta.get("round", path.parent.name[6:])), meta.get("worker", worker), block,
                          int(meta.get("tokens", 0) or 0)))
    if not out:
        sys.exit(f"autoencoder: --blocks {blocks!r} matches none of the {len(paths)} recorded updates")
    return sorted(out, key=lambda u: (u.round, u.block, u.worker))


def evenly(items: list, n: int) -> list:
    """At most n of items, evenly spaced (all of them when n is 0 or not fewer)."""
    if not n or len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def split(updates: list[Update], fraction: float, max_updates: int) -> tuple[list[Update], list[Update], list[int], list[int]]:
    """(train updates, eval updates, train rounds, eval rounds): the first `fraction` of the rounds
    train, the rest evaluate; `max_updates` subsamples both (eval by whole (round, block) groups)."""
    rounds = sorted({u.round for u in updates})
    if len(rounds) < 2:
        sys.exit(f"autoencoder: the records hold {len(rounds)} round(s); a temporal split needs two or more")
    n_train = min(len(rounds) - 1, max(1, round(fraction * len(rounds))))
    train_rounds, eval_rounds = rounds[:n_train], rounds[n_train:]
    train = evenly([u for u in updates if u.round in train_rounds], max_updates)
    groups: dict[tuple[int, str], list[Update]] = {}
    for u in updates:
        if u.round in eval_rounds:
            groups.setdefault((u.round, u.block), []).append(u)
    keys = sorted(groups)
    if max_updates:
        total = sum(len(g) for g in groups.values())
        if total > max_updates:
            keys = evenly(keys, max(1, round(max_updates * len(keys) / total)))
    return train, [u for k in keys for u in groups[k]], train_rounds, eval_rounds


def load(updates: list[Update]) -> None:
    import safetensors.torch

    for u in updates:
        if u.tensors is None:
            u.tensors = {n: t.float() for n, t in safetensors.torch.load_file(str(u.path)).items()}


def specs_of(u: Update) -> list:
    from fedblock.common.messages import TensorSpec

    return [TensorSpec.of(n, u.tensors[n]) for n in sorted(u.tensors)]


def weighted_mean(members: list[tuple[Update, dict]]) -> dict:
    """Token-weighted mean of (update, tensors) pairs (equal weights when a token count is missing)."""
    weights = [float(u.tokens) for u, _ in members]
    if not all(w > 0 for w in weights):
        weights = [1.0] * len(members)
    total = sum(weights)
    names = list(members[0][1])
    return {n: sum(w * t[n].double() for w, (_, t) in zip(weights, members, strict=True)) / total for n in names}


def metrics(evals: list[Update], recon: list[dict]) -> dict:
    """Per-update and aggregate cosine and relative error of reconstructions (same order as evals)."""
    from fedblock.common.autoencoder import cosine, relative_error

    coss = [cosine(r, u.tensors) for u, r in zip(evals, recon, strict=True)]
    rels = [relative_error(r, u.tensors) for u, r in zip(evals, recon, strict=True)]
    groups: dict[tuple[int, str], list[int]] = {}
    for i, u in enumerate(evals):
        groups.setdefault((u.round, u.block), []).append(i)
    per_group = []
    for (rnd, block), idx in sorted(groups.items()):
        true = weighted_mean([(evals[i], evals[i].tensors) for i in idx])
        rec = weighted_mean([(evals[i], recon[i]) for i in idx])
        per_group.append({"round": rnd, "block": block, "workers": len(idx),
                          "cosine": cosine(rec, true), "rel_error": relative_error(rec, true)})
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"upd_cos": mean(coss), "upd_rel": mean(rels), "upd_cos_min": min(coss),
            "agg_cos": mean([g["cosine"] for g in per_group]), "agg_rel": mean([g["rel_error"] for g in per_group]),
            "aggregates": per_group}


def shown(m: dict) -> dict:
    """The table's four metric columns of a `metrics` result."""
    return {"upd cos": m["upd_cos"], "upd rel err": m["upd_rel"], "agg cos": m["agg_cos"], "agg rel err": m["agg_rel"]}


def roundtrip(spec: str, evals: list[Update], weights: Path | None = None, per_worker: bool = False) -> tuple[list[dict], list[int], float]:
    """(reconstructions, blob lengths, seconds per update) of the eval updates through `spec`: encode
    (one encoder per worker when `per_worker`, state committed after each update, as a worker does) and
    the coordinator's decode."""
    from fedblock.common.codecs import CodecPipeline

    decoder = CodecPipeline(spec, weights=weights)
    encoders: dict[str, CodecPipeline] = {}
    recon: list[dict | None] = [None] * len(evals)
    sizes = [0] * len(evals)
    order = sorted(range(len(evals)), key=lambda i: (evals[i].worker, evals[i].round, evals[i].block))
    seconds = 0.0
    for i in order:
        u = evals[i]
        key = u.worker if per_worker else ""
        if key not in encoders:
            encoders[key] = CodecPipeline(spec, weights=weights) if (per_worker or weights is not None) else decoder
        enc = encoders[key]
        t = time.perf_counter()
        blob, state = enc.encode_pending(u.block, u.tensors)
        enc.commit(state)
        seconds += time.perf_counter() - t
        sizes[i] = len(blob)
        recon[i] = decoder.decode(blob, specs_of(u))
    return recon, sizes, seconds / len(evals)


def bytes_row(spec: str, evals: list[Update], sizes: list[int], none_sizes: list[int]) -> dict:
    from fedblock.common.codecs import CodecPipeline

    pipe, plain = CodecPipeline(spec), CodecPipeline("none")
    payload = [pipe.payload_nbytes(specs_of(u)) for u in evals]
    none_payload = [plain.payload_nbytes(specs_of(u)) for u in evals]
    return {"payload B": sum(payload) / len(payload), "ratio (payload)": sum(none_payload) / sum(payload),
            "blob B": sum(sizes) / len(sizes), "ratio (blob)": sum(none_sizes) / sum(sizes)}


def image_sizes(updates: list[Update], ratio: int) -> str:
    """The distinct image sizes of these updates at this ratio, with counts, elements and padding."""
    from fedblock.common.autoencoder import layout

    seen: dict[tuple[int, int, int], int] = {}
    for u in updates:
        lay = layout([(n, tuple(u.tensors[n].shape)) for n in sorted(u.tensors)], ratio)
        key = (lay.height, lay.width, lay.numel)
        seen[key] = seen.get(key, 0) + 1
    return "; ".join(f"{h}x{w} ({numel} elements + {h * w - numel} padding) x{c}" for (h, w, numel), c in sorted(seen.items()))


def quick_records(args) -> Path:
    """Make (or reuse) the --quick run's recorded updates; returns its state dir."""
    from benchmarks.quality import failed, run_logged
    from fedblock.common.models import make_tiny_model

    root = args.workdir / "autoencoder"
    state, log_path = root / "quick-run", root / "quick-run.log"
    if not args.rerun and (state / "summary.json").exists() and any((state / "records").glob("round-*/*.safetensors")):
        print(f"autoencoder: reusing the records of {state} (--rerun to make them again)", file=sys.stderr, flush=True)
        return state
    model = root / "tiny-llama-4x64"
    if not (model / "config.json").exists():
        make_tiny_model(model, "llama", seed=0, num_layers=4, hidden_size=64)
    shutil.rmtree(state, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fedblock.common.cli", "--log-level", "INFO", "simulate", "--model", str(model),
           "--state-dir", str(state), *QUICK_RUN]
    print(f"autoencoder: recording updates: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    code, seconds = run_logged(cmd, log_path, args.run_timeout)
    if code != 0 or not (state / "summary.json").exists():
        failed("autoencoder", "quick-run", code, log_path, seconds)
        sys.exit(1)
    print(f"autoencoder: quick run done in {seconds:.0f} s", file=sys.stderr, flush=True)
    for sub in ("blocks", "export", "incoming", "checkpoints"):
        shutil.rmtree(state / sub, ignore_errors=True)
    return state


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="from_dir", type=Path, help="state dir of a run with --record-updates (or --quick)")
    p.add_argument("--blocks", default="*", help="comma-separated globs of the blocks to use (default '*')")
    p.add_argument("--max-updates", type=int, default=0,
                   help="at most N training updates and about N evaluation updates, evenly spaced (default 0: all)")
    p.add_argument("--train-fraction", type=float, default=2 / 3, help="fraction of the rounds to train on (default 2/3)")
    p.add_argument("--ratios", default="4,16,64", help="compression ratios (default 4,16,64)")
    p.add_argument("--variants", default="none,max", help="normalisation variants (default none,max)")
    p.add_argument("--lrs", default="2e-4,1e-3", help="pre-training learning rates (default 2e-4,1e-3)")
    p.add_argument("--steps", type=int, help="pre-training steps per config (default 400; --quick 100)")
    p.add_argument("--batch-size", type=int, default=8, help="pre-training batch size (default 8)")
    p.add_argument("--tune-steps", type=int, default=20, help="FAF encoder tuning steps per update (default 20)")
    p.add_argument("--faf-ratios", help="ratios also measured with FAF, comma-separated or 'all' (default 64; --quick all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pre-training (default 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--rerun", action="store_true", help="--quick: record the updates again even if the run exists")
    p.add_argument("--run-timeout", type=float, default=900, help="--quick: seconds allowed for recording (default 900)")
    args = p.parse_args()
    if args.from_dir is None and not args.quick:
        p.error("give --from STATE_DIR (a run with --record-updates) or --quick")
    if not 0 < args.train_fraction < 1:
        p.error("--train-fraction must be between 0 and 1")
    steps = args.steps if args.steps is not None else (100 if args.quick else 400)
    ratios = [int(r) for r in args.ratios.split(",") if r]
    variants = [v for v in args.variants.split(",") if v]
    lrs = [s for s in args.lrs.split(",") if s]
    faf_spec = args.faf_ratios or ("all" if args.quick else "64")
    faf_ratios = set(ratios) if faf_spec == "all" else {int(r) for r in faf_spec.split(",") if r}

    import torch

    from fedblock.common.autoencoder import VARIANTS, save_weights, train_autoencoder
    from fedblock.common.codecs import Autoencoder

    torch.set_num_threads(args.threads)
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; choose from {', '.join(VARIANTS)}")
    t0 = time.monotonic()
    state = args.from_dir if args.from_dir is not None else quick_records(args)
    updates = scan(state, args.blocks)
    train, evals, train_rounds, eval_rounds = split(updates, args.train_fraction, args.max_updates)
    load(train + evals)
    print(f"autoencoder: {len(train)} training updates (rounds {train_rounds[0]}-{train_rounds[-1]}), {len(evals)} "
          f"evaluation updates (rounds {eval_rounds[0]}-{eval_rounds[-1]})", file=sys.stderr, flush=True)

    rows: list[dict] = []
    _, none_sizes, _ = roundtrip("none", evals)
    for spec in REFERENCES:
        recon, sizes, sec = roundtrip(spec, evals)
        m = metrics(evals, recon)
        rows.append({"codec": spec, "variant": "-", "lr": "-", "train s": "-", "train cos": "-", **shown(m),
                     **bytes_row(spec, evals, sizes, none_sizes), "aggregates": m["aggregates"], "upd_cos_min": m["upd_cos_min"],
                     "encode_seconds_per_update": sec})

    weights_dir = args.workdir / "autoencoder" / "weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    images_line: dict[str, str] = {}
    images_of: dict[int, list] = {}
    configs = [(r, v, lr) for r in ratios for v in variants for lr in lrs]
    for n, (ratio, variant, lr) in enumerate(configs, 1):
        if ratio not in images_of:
            images_of[ratio] = [Autoencoder.block_image(u.tensors, ratio)[0][0] for u in train]
            images_line[f"ae:{ratio}"] = f"train {image_sizes(train, ratio)}; eval {image_sizes(evals, ratio)}"
        images = images_of[ratio]
        print(f"autoencoder: [{n}/{len(configs)}] ae:{ratio} {variant} lr {lr}: training {steps} steps "
              f"({time.monotonic() - t0:.0f} s so far)", file=sys.stderr, flush=True)
        model, rep = train_autoencoder(images, ratio, variant=variant, steps=steps, lr=float(lr),
                                       batch_size=args.batch_size, seed=args.seed, holdout=0)
        path = weights_dir / f"ae{ratio}-{variant}-lr{lr}.safetensors"
        save_weights(model, path, variant=variant, extra={"updates": str(len(train)), "steps": str(steps),
                                                           "source": str(state), "rounds": f"{train_rounds[0]}-{train_rounds[-1]}"})
        spec = f"ae:{ratio}"
        recon, sizes, sec = roundtrip(spec, evals, weights=path)
        m = metrics(evals, recon)
        fit = metrics(train, roundtrip(spec, train, weights=path)[0])
        row = {"codec": spec, "variant": variant, "lr": lr, "train s": rep.seconds, "train cos": fit["upd_cos"],
               "train_rel": fit["upd_rel"], **shown(m),
               **bytes_row(spec, evals, sizes, none_sizes), "train_mse": rep.train_mse, "upd_cos_min": m["upd_cos_min"],
               "encode_seconds_per_update": sec, "weights": str(path), "aggregates": m["aggregates"]}
        if ratio in faf_ratios and args.tune_steps > 0:
            frecon, _, fsec = roundtrip(f"ae:{ratio}:{args.tune_steps}", evals, weights=path, per_worker=True)
            fm = metrics(evals, frecon)
            row.update({"FAF upd cos": fm["upd_cos"], "FAF upd rel err": fm["upd_rel"], "FAF agg cos": fm["agg_cos"],
                        "FAF agg rel err": fm["agg_rel"], "FAF s/upd": fsec, "faf_aggregates": fm["aggregates"]})
        print(f"autoencoder: ae:{ratio} {variant} lr {lr}: {rep.seconds:.0f} s, agg cos {m['agg_cos']:.3f}"
              + (f", FAF agg cos {row['FAF agg cos']:.3f}" if "FAF agg cos" in row else ""), file=sys.stderr, flush=True)
        rows.append(row)

    for r in rows:
        for k in ("FAF upd cos", "FAF upd rel err", "FAF agg cos", "FAF agg rel err", "FAF s/upd"):
            r.setdefault(k, "-")
    n_groups = len({(u.round, u.block) for u in evals})
    workers = sorted({u.worker for u in updates})
    extra = {
        "records": f"{state}/records: {len(updates)} updates of {len({u.block for u in updates})} block(s) matching "
                   f"{args.blocks!r}, {len(workers)} worker(s), rounds {min(u.round for u in updates)}-{max(u.round for u in updates)}",
        "split": f"train on rounds {train_rounds[0]}-{train_rounds[-1]} ({len(train)} updates), evaluate on rounds "
                 f"{eval_rounds[0]}-{eval_rounds[-1]} ({len(evals)} updates, {n_groups} (round, block) aggregates)"
                 + (f"; --max-updates {args.max_updates}" if args.max_updates else ""),
        "training": f"{steps} steps, batch {args.batch_size}, holdout 0, seed {args.seed}, {args.threads} torch thread(s); "
                    f"FAF: {args.tune_steps} tuning steps (lr 1e-3) per update, each worker's encoder carried from update to "
                    f"update, for ratios {', '.join(map(str, sorted(faf_ratios & set(ratios)))) or 'none'}",
        "images": images_line,
        "none": f"{sum(none_sizes) / len(none_sizes):.0f} B per update on the wire (blob), "
                f"{sum(4 * sum(math.prod(s.shape) for s in specs_of(u)) for u in evals) / len(evals):.0f} B payload",
        "total seconds": round(time.monotonic() - t0, 1),
    }
    columns = ["codec", "variant", "lr", "train s", "train cos", "upd cos", "upd rel err", "agg cos", "agg rel err", "FAF upd cos", "FAF agg cos",
               "FAF agg rel err", "FAF s/upd", "payload B", "ratio (payload)", "ratio (blob)"]
    report("autoencoder", rows, args, columns=columns, **extra)


if __name__ == "__main__":
    main()
