"""Worker memory: peak RSS of training one block vs full fine-tuning, SmolLM2-135M, same batch.

What is measured: the peak resident set size of a process that trains SmolLM2-135M-Instruct (fp32,
CPU) with `BlockTrainer` for a few AdamW steps on real data, once per mode:

* `full`: every block trained (= AdamW over every parameter, plain full fine-tuning);
* one block: `layers.0` (the lowest decoder layer: the worst case for activations, as backprop runs
  through every layer above it), the middle and the top decoder layer, and `embed` (the tied
  embedding/output head: backprop through everything plus the 28M-parameter block's AdamW state);
* the worker's `--gradient-checkpointing`: `auto` by default (the lowest layers above the block, as
  many as the memory estimate says reach the target, keep only their inputs and are recomputed in the
  backward pass), `+on` all of them, `+off` none. `full` is plain full fine-tuning (`off`).

How: each mode runs in a fresh subprocess (this script with `--child`), so peaks do not mix. The child
loads the model (`fedblock.common.models.load_model`) and copies the weights out of the safetensors
memory map into process memory, as a worker holds them (it builds the model empty and receives the
blocks); tokenizes `builtin:chatterbot` with the model's chat template and prompt masking; builds
fixed-shape batches (B x L: right-padded or truncated to exactly L tokens, so every step has the same
shape); builds the `BlockTrainer` and then resets the kernel's peak-RSS counter (`/proc/self/clear_refs`
"5"), so the peak is that of training alone, not of loading. Then it trains N steps and reads the peak
(`getrusage(RUSAGE_SELF).ru_maxrss`, which the reset also resets; where the reset is not allowed, the
lifetime peak, and the table says so). "RSS after load" is the resident size just before training
(weights, tokenizer, data, libraries): the difference is the training overhead (gradients, AdamW
state, activations). The worker's own start copy s_b of its block and the delta it uploads are not
included (a block's size: 14 MB for a decoder layer here).

Target (README, Performance targets): peak RSS of block training ÷ that of full fine-tuning ≤ 0.5. The verdict
line takes the worst decoder-layer block (the peak a worker training `layers.*` blocks reaches).

Time: about 3 minutes with the defaults on 2 CPU cores, `--quick` (4 x 64 tokens, 1 step, full,
bottom and top) about 1 minute. Peaks are stable from run to run (within ~1 %); step times are not
on a busy machine.

    python benchmarks/memory.py [--quick] [--json out.json] [--threads 2] [--batch-size 8 --seq-len 128]
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import parser, report  # noqa: E402

TARGET = 0.5
MODES = ("full", "embed", "bottom", "middle", "top", "embed+off", "bottom+off", "bottom+on")
QUICK_MODES = ("full", "bottom", "top", "bottom+off")
RESULT = "MEMORY-RESULT "


# ---- the child: one measurement -------------------------------------------------------------------


def _status_mib(key: str) -> float | None:
    """A field of /proc/self/status (kB) in MiB, None where there is no such file."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _maxrss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, kB on Linux


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _block_for(mode: str, names: list[str]) -> list[str]:
    layers = [n for n in names if n.startswith("layers.")]
    alias = {"bottom": layers[0], "middle": layers[len(layers) // 2], "top": layers[-1]}
    if mode == "full":
        return list(names)
    name = alias.get(mode, mode)
    if name not in names:
        raise SystemExit(f"unknown mode {mode!r}: use full, bottom, middle, top or a block name ({', '.join(names)})")
    return [name]


def child(args) -> None:
    import gc
    import random

    import torch
    import torch.nn.functional as F

    from fedblock.common.blocks import partition
    from fedblock.common.data import IGNORE_INDEX, collate, load_examples, tokenize
    from fedblock.common.models import load_model, load_tokenizer, resolve_model
    from fedblock.common.training import BlockTrainer, OptimConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = resolve_model(args.model)
    model = load_model(path, dtype=torch.float32)
    with torch.no_grad():  # out of the file mapping into anonymous memory, as a worker holds its model
        for p in model.parameters():  # tied weights are one Parameter: copied once, tie kept
            p.data = p.data.clone()
    load_peak = _maxrss_mib()
    blocks = partition(model)
    names = [b.name for b in blocks]
    mode, _, option = args.child.partition("+")
    trained = _block_for(mode, names)
    by_name = {b.name: b for b in blocks}
    params = dict(model.named_parameters())
    trained_params = sum(params[n].numel() for b in trained for n in by_name[b].params)

    tokenizer = load_tokenizer(path)
    examples = load_examples(args.data)
    random.Random(0).shuffle(examples)
    need = args.batch_size * args.steps
    data = tokenize(examples[: max(4 * need, 64)], tokenizer, args.seq_len)[:need]
    if len(data) < need:
        raise SystemExit(f"{args.data}: only {len(data)} usable examples, need {need}")
    L = args.seq_len
    batches = []
    for i in range(args.steps):
        b = collate(data[i * args.batch_size : (i + 1) * args.batch_size], tokenizer.pad_token_id)
        pad = L - b["input_ids"].shape[1]
        batches.append({
            "input_ids": F.pad(b["input_ids"], (0, pad), value=tokenizer.pad_token_id),
            "attention_mask": F.pad(b["attention_mask"], (0, pad), value=0),
            "labels": F.pad(b["labels"], (0, pad), value=IGNORE_INDEX),
        })
    # the worker's --gradient-checkpointing (auto by default); full fine-tuning is the plain reference
    checkpointing = option or ("off" if mode == "full" else "auto")
    trainer = BlockTrainer(model, blocks, OptimConfig(gradient_checkpointing=checkpointing))
    begin = trainer.begin_round
    gc.collect()
    rss_load = _status_mib("VmRSS") or _maxrss_mib()
    reset = _reset_peak()
    begin(trained)
    seconds, losses = [], []
    for batch in batches:
        t = time.perf_counter()
        losses.append(trainer.step(batch, 1e-5).loss)
        seconds.append(time.perf_counter() - t)
    result = {
        "mode": args.child,
        "blocks": (trained[0] if len(trained) == 1 else f"full ({len(trained)} blocks)")
        + ("" if mode == "full" else f", checkpointing {checkpointing}: {trainer.checkpointed} layers"),
        "trained_params": trained_params,
        "peak_mib": _maxrss_mib(),
        "rss_after_load_mib": rss_load,
        "rss_end_mib": _status_mib("VmRSS"),
        "load_peak_mib": load_peak,
        "peak_method": "training only (peak reset after load)" if reset else "lifetime (reset not allowed)",
        "step_seconds": seconds,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }
    print(RESULT + json.dumps(result), flush=True)


# ---- the driver ------------------------------------------------------------------------------------


def measure(mode: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--model", args.model, "--data", args.data,
           "--threads", str(args.threads), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": str(args.threads)}
    t = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"mode {mode} failed (exit {out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    result = json.loads(lines[-1][len(RESULT):])
    result["process_seconds"] = time.monotonic() - t
    print(f"memory: {result['blocks']}: peak {result['peak_mib']:.0f} MiB, "
          f"{result['process_seconds']:.0f} s", file=sys.stderr, flush=True)
    return result


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="model folder or built-in name")
    p.add_argument("--data", default="builtin:chatterbot", help="training data (JSONL or builtin:NAME)")
    p.add_argument("--modes", help=f"comma-separated: full, embed, bottom, middle, top or block names "
                                   f"(default {','.join(MODES)}; --quick {','.join(QUICK_MODES)})")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every measurement")
    p.add_argument("--steps", type=int, help="optimizer steps per measurement (default 3; --quick 1)")
    p.add_argument("--batch-size", type=int, help="examples per batch (default 8; --quick 4)")
    p.add_argument("--seq-len", type=int, help="tokens per example, padded or truncated (default 128; --quick 64)")
    p.add_argument("--child", help="internal: run one measurement in this process and print its result")
    args = p.parse_args()
    args.steps = args.steps or (1 if args.quick else 3)
    args.batch_size = args.batch_size or (4 if args.quick else 8)
    args.seq_len = args.seq_len or (64 if args.quick else 128)
    if args.child:
        child(args)
        return

    modes = args.modes.split(",") if args.modes else list(QUICK_MODES if args.quick else MODES)
    if "full" not in modes:
        modes.insert(0, "full")
    t0 = time.monotonic()
    results = [measure(m, args) for m in modes]
    full = next(r for r in results if r["mode"] == "full")
    rows = []
    for r in results:
        steps = r["step_seconds"]
        rows.append({
            "mode": r["blocks"] if r["mode"] in ("full", r["blocks"]) else f"{r['blocks']} ({r['mode']})",
            "trained params (M)": r["trained_params"] / 1e6,
            "peak RSS MiB": r["peak_mib"],
            "RSS after load MiB": r["rss_after_load_mib"],
            "training overhead MiB": r["peak_mib"] - r["rss_after_load_mib"],
            # the first step pays for first-touch page faults; later ones are the steady state
            "step s": sum(steps[1:]) / len(steps[1:]) if len(steps) > 1 else steps[0],
            "ratio to full": r["peak_mib"] / full["peak_mib"],
            "target ≤ 0.5": "" if r is full else ("yes" if r["peak_mib"] / full["peak_mib"] <= TARGET else "no"),
            # JSON only
            "step_seconds": steps,
            "losses": r["losses"],
            "load_peak_mib": r["load_peak_mib"],
            "rss_end_mib": r["rss_end_mib"],
            "process_seconds": r["process_seconds"],
        })
    layer_rows = [(r, row) for r, row in zip(results, rows, strict=True)
                  if r["blocks"].startswith("layers.") and "checkpointing auto" in r["blocks"]]
    extra = {
        "settings": f"{args.model}, fp32, CPU, {args.threads} threads, batch {args.batch_size} x {args.seq_len} tokens "
                    f"({args.data}, padded/truncated to {args.seq_len}), {args.steps} AdamW step(s) per mode, "
                    "one fresh process per mode",
        "peak": results[0]["peak_method"],
    }
    if layer_rows:
        worst_r, worst = max(layer_rows, key=lambda x: x[0]["peak_mib"])
        extra["worst decoder-layer block ÷ full"] = (
            f"{worst['ratio to full']:.3f} ({worst_r['blocks']}); target ≤ {TARGET}: "
            f"{'met' if worst['ratio to full'] <= TARGET else 'NOT met'}"
        )
    extra["total seconds"] = round(time.monotonic() - t0, 1)
    columns = ["mode", "trained params (M)", "peak RSS MiB", "RSS after load MiB", "training overhead MiB", "step s",
               "ratio to full", "target ≤ 0.5"]
    report("memory", rows, args, columns=columns, **extra)


if __name__ == "__main__":
    main()
