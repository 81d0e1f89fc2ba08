"""The GPU path, checked in one short run: `--device cuda`, `--dtype bfloat16`, the deltas' copy to
pinned host memory on a side stream, and zeroth-order directions that are the same on every device.

On a random-initialised model with SmolLM2-135M's configuration (built here: nothing is downloaded)
and batches of 8 x 128 tokens of a synthetic, learnable stream (random walks on 256 token ids):

a. step time: `BlockTrainer.step` on the middle decoder layer, float32 and bfloat16 (warm-up steps,
   then timed between `cuda.synchronize` calls).
b. overlap: steps training the `embed` block (the largest delta: the tied embedding) alone, then each
   followed by `take_delta_` alone, then by `take_delta_` and `to_host_async` (the worker's code path)
   whose copies a consumer thread (the communication thread's part) waits for and drops. Reported:
   the copy's cost to the steps (with copy less without), the copy alone (events on the side stream,
   nothing else running), the time the compute thread spends queueing it, and how many copies ended
   before the step after them did (events: the copy ran while that step computed); the host copy
   equals the device delta bit for bit and is pinned.
c. quality: 3 rounds x 5 steps of block training (embed, the middle layer, the last layer; each round
   ends with the worker's take_delta_ and host copy) from the same initial weights in float32 and in
   bfloat16; the held-out loss before and after, and how far apart the two dtypes end.
d. zeroth-order identity: `zo.signs` on the device equals the CPU's bit for bit (seeds, directions,
   parameter indices, sizes below, at and past zo.CHUNK, none a multiple of it but the ones that must
   be), both equal the documented formula (Python integers) at sampled elements, `add_direction_` /
   `replay_` give the same float32 and bfloat16 bits on both, and one DeComFL estimate's scalars on a
   tiny float32 model agree within a tolerance (forward passes differ in rounding across devices).

Prints one markdown table and writes gpu_check.json and gpu_check.md to `--out` (default $OUT, else
runs/bench/gpu); exits 1 if a check fails. About a minute on an H200. `--device cpu --tiny` is the
smoke version (a 4-layer model of hidden 64, a few seconds): the same code, with (b) checking that the
CPU path copies nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import queue
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks.common import environment, table  # noqa: E402
from fedblock.common import blocks as B  # noqa: E402
from fedblock.common import zo  # noqa: E402
from fedblock.common.training import BlockTrainer, task_loss  # noqa: E402

WALK_IDS = 256  # the synthetic stream's token ids: 1..256 (a model can learn its bigrams quickly)
LR = 1e-3


def smollm2_config(tiny: bool) -> LlamaConfig:
    """SmolLM2-135M's architecture (or, `tiny`, a 4-layer Llama of hidden 64 for the CPU smoke run)."""
    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=100000.0,
                           max_position_embeddings=256, rms_norm_eps=1e-5, use_cache=False)
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, use_cache=False)


def build_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """The random-initialised float32 model on the CPU (the same weights for the same seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float()


def walk_batches(count: int, rows: int, length: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`count` batches of random walks over token ids 1..WALK_IDS (steps of +1, +2 or +3, wrapping),
    every position trained: a model learns that next tokens are one of three, from ln(vocab) to ln 3."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        steps = torch.randint(1, 4, (rows, length), generator=g)
        steps[:, 0] = torch.randint(0, WALK_IDS, (rows,), generator=g)
        ids = steps.cumsum(dim=1) % WALK_IDS + 1
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_device(reference: LlamaForCausalLM, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    return copy.deepcopy(reference).to(device=device, dtype=dtype).train()


@torch.no_grad()
def held_out_loss(model, batches) -> float:
    model.eval()
    try:
        losses = [float(task_loss(model, {k: v.to(next(model.parameters()).device) for k, v in b.items()})[0])
                  for b in batches]
    finally:
        model.train()
    return sum(losses) / len(losses)


def timed_steps(trainer: BlockTrainer, batches, count: int, device: torch.device, after=None) -> float:
    """Mean wall seconds of `count` steps (each followed by `after(i)` if given), synchronized around."""
    sync(device)
    t0 = time.perf_counter()
    for i in range(count):
        trainer.step(batches[i % len(batches)], LR)
        if after is not None:
            after(i)
    sync(device)
    return (time.perf_counter() - t0) / count


# ---- a. step time ----------------------------------------------------------------------------------


def step_time(model, block: str, batches, warmup: int, count: int, device) -> dict:
    trainer = BlockTrainer(model, B.partition(model))
    trainer.begin_round([block])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed_steps(trainer, batches, warmup, device)
    seconds = timed_steps(trainer, batches, count, device)
    return {"block": block, "step_ms": 1e3 * seconds, "checkpointed_layers": trainer.checkpointed,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


# ---- b. overlap ------------------------------------------------------------------------------------


def _consumer(inbox: queue.Queue, waited: list[float]) -> None:
    """The communication thread's part: wait for each host copy (by reading it), then drop it."""
    while (item := inbox.get()) is not None:
        t0 = time.perf_counter()
        for _ in item.values():  # each read waits for the copy
            pass
        waited.append(time.perf_counter() - t0)


def overlap(model, batches, warmup: int, count: int, device) -> dict:
    blocks = {b.name: b for b in B.partition(model)}
    trainer = BlockTrainer(model, list(blocks.values()))
    trainer.begin_round([B.EMBED])
    params = B.block_params(model, blocks[B.EMBED])
    start = B.snapshot(params)
    nbytes = sum(p.numel() * 4 for p in params.values())  # the delta is float32 whatever the model's dtype
    cuda = device.type == "cuda"

    # The copy is the real one, checked once: pinned, bit for bit the device delta.
    trainer.step(batches[0], LR)
    delta = B.take_delta_(params, start)
    expected = {n: t.detach().to("cpu", copy=True) for n, t in delta.items()}
    host = B.to_host_async(delta)
    if cuda:
        identical = all(torch.equal(host[n].view(torch.int32), expected[n].view(torch.int32)) for n in expected)
        pinned = all(host[n].is_pinned() for n in expected)
        result = {"identical": identical, "pinned": pinned, "copied": True}
    else:  # the CPU path: nothing copied, the very same tensors
        result = {"identical": host is delta, "pinned": None, "copied": host is not delta}
    del host, delta, expected

    timed_steps(trainer, batches, warmup, device)
    alone = timed_steps(trainer, batches, count, device)
    take_only = timed_steps(trainer, batches, count, device, after=lambda i: B.take_delta_(params, start))

    side = torch.cuda.Stream(device) if cuda else None
    inbox: queue.Queue = queue.Queue()
    waited: list[float] = []
    consumer = threading.Thread(target=_consumer, args=(inbox, waited), name="comm", daemon=True)
    consumer.start()
    enqueue: list[float] = []
    marks: list[tuple] = []  # per step: (delta ready on compute, copy done on side, that step's end)

    def hand_over(i: int) -> None:
        end = _event(cuda)
        d = B.take_delta_(params, start)
        ready = _event(cuda)
        t0 = time.perf_counter()
        copied = B.to_host_async(d, stream=side)
        enqueue.append(time.perf_counter() - t0)
        done = _event(cuda, side)
        inbox.put(copied)
        marks.append((ready, done, end))

    timed_steps(trainer, batches, warmup, device, after=hand_over)  # first pinned allocations, warm streams
    enqueue.clear()
    marks.clear()
    with_copy = timed_steps(trainer, batches, count, device, after=hand_over)
    inbox.put(None)
    consumer.join()

    result.update(bytes=nbytes, alone_ms=1e3 * alone, take_delta_ms=1e3 * (take_only - alone),
                  with_copy_ms=1e3 * with_copy, copy_cost_ms=1e3 * (with_copy - take_only),
                  enqueue_ms=1e3 * statistics.median(enqueue), consumer_wait_ms=1e3 * statistics.median(waited))
    if cuda:
        sync(device)
        # marks[i][2] is step i's end, recorded before its delta: copy i must end before step i+1 does.
        copies = [m[0].elapsed_time(m[1]) for m in marks]
        next_steps = [marks[i][0].elapsed_time(marks[i + 1][2]) for i in range(len(marks) - 1)]
        result.update(copy_in_flight_ms=statistics.median(copies),
                      overlapped=sum(c <= s for c, s in zip(copies, next_steps, strict=False)) / len(next_steps),
                      copy_alone_ms=_copy_alone(params, start, device))
        result["gb_per_s"] = nbytes / result["copy_alone_ms"] / 1e6
    return result


def _event(cuda: bool, stream=None):
    """A timing event recorded now on `stream` (the current one by default); None on the CPU."""
    if not cuda:
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def _copy_alone(params, start, device, repeats: int = 5) -> float:
    """Median ms of the host copy of the block's delta with nothing else on the device."""
    side = torch.cuda.Stream(device)
    times = []
    for _ in range(repeats):
        d = B.delta(params, start)
        sync(device)
        first = _event(True, side)
        copied = B.to_host_async(d, stream=side)
        last = _event(True, side)
        last.synchronize()  # elapsed_time needs both events complete
        assert copied.ready()
        times.append(first.elapsed_time(last))
    return statistics.median(times)


# ---- c. bf16 against fp32 --------------------------------------------------------------------------


def rounds_quality(model, batches, held_out, rounds: int, steps: int) -> dict:
    """Loss before and after `rounds` worker rounds (BlockDescent.run's sequence of calls)."""
    blocks = B.partition(model)
    by_name = {b.name: b for b in blocks}
    n_layers = sum(b.name.startswith("layers.") for b in blocks)
    order = [B.EMBED, f"layers.{n_layers // 2}", f"layers.{n_layers - 1}"]
    trainer = BlockTrainer(model, blocks)
    before = held_out_loss(model, held_out)
    train_losses = []
    for r in range(rounds):
        name = order[r % len(order)]
        trainer.begin_round([name])
        live = B.block_params(model, by_name[name])
        start = B.snapshot(live)
        for k in range(steps):
            train_losses.append(trainer.step(batches[(r * steps + k) % len(batches)], LR, seed=(0, r, k)).loss)
        copied = B.to_host_async(B.take_delta_(live, start))
        if not all(bool(torch.isfinite(t).all()) for t in copied.values()):
            raise FloatingPointError(f"round {r + 1}: the delta of {name} is not finite")
    return {"before": before, "after": held_out_loss(model, held_out), "last_train": train_losses[-1]}


# ---- d. zeroth-order identity ----------------------------------------------------------------------


def _formula_sign(seed: int, direction: int, index: int, element: int) -> int:
    """z of one element by the module docstring's definition, on Python integers."""
    word = zo.hash32(zo.key_mix(seed, direction, index), element // 32)
    return 2 * ((word >> (element % 32)) & 1) - 1


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


def zo_identity(device: torch.device, tiny_config: LlamaConfig) -> dict:
    chunk = zo.CHUNK
    sizes = [1, 31, 33, 4096 + 5, chunk - 7, chunk, chunk + 37, 2 * chunk + 1]
    cases = [(0, 0, 0), (1, 4, 7), (2**32 - 1, 2**32 - 1, 2**32 - 1), (123456789, 2, 300)]
    signs_same = formula_same = total = 0
    for seed, direction, index in cases:
        for n in sizes:
            here = zo.signs(seed, direction, index, n, device=device)
            cpu = zo.signs(seed, direction, index, n, device="cpu")
            signs_same += torch.equal(here.cpu(), cpu)
            sample = sorted({0, min(31, n - 1), min(32, n - 1), n // 2, n - 1, max(0, n - 33)})
            formula_same += all(int(cpu[e]) == _formula_sign(seed, direction, index, e) for e in sample)
            total += 1

    g = torch.Generator().manual_seed(1)
    steps = [(5, 0, 1e-3), (5, 1, -2.5e-4), (2**31 + 3, 9, 3.3e-2)]
    add_same = {}
    for dtype in (torch.float32, torch.bfloat16):
        same = 0
        for n in (33, chunk + 37):
            base = (0.02 * torch.randn(n, generator=g)).to(dtype)
            cpu, here = base.clone(), base.to(device)
            for p in (cpu, here):
                zo.add_direction_(p, 7, 3, 11, 1e-3)
                zo.replay_(p, 11, steps)
            same += torch.equal(_bits(here), _bits(cpu))
        add_same[str(dtype).removeprefix("torch.")] = f"{same}/2"

    # One DeComFL estimate on a tiny float32 model, on the CPU and here; then the update from the CPU's
    # scalars, which must give the same bits on both.
    reference = build_model(tiny_config, seed=3).eval()
    batch = walk_batches(1, 2, 32, seed=9)[0]
    settings = zo.ZOSettings(perturbations=4, mu=1e-3)
    results = {}
    for where in ("cpu", device):
        model = copy.deepcopy(reference).to(where).eval()
        params = [p for p in model.parameters()]
        grads, loss = zo.estimate(model, params, {k: v.to(where) for k, v in batch.items()}, 77, settings, task_loss)
        results[str(where)] = (model, params, grads, loss)
    cpu_grads, here_grads = results["cpu"][2], results[str(device)][2]
    scale = max(abs(x) for x in cpu_grads)
    rel = max(abs(a - b) for a, b in zip(cpu_grads, here_grads, strict=True)) / max(scale, 1e-12)
    for _model, params, _grads, _loss in results.values():
        zo.apply_(params, 77, cpu_grads, 1e-3)
    update_same = all(torch.equal(_bits(a), _bits(b)) for a, b in zip(results["cpu"][1], results[str(device)][1],
                                                                        strict=True))
    return {"signs": f"{signs_same}/{total}", "signs_ok": signs_same == total,
            "formula": f"{formula_same}/{total}", "formula_ok": formula_same == total,
            "add_direction": add_same, "add_ok": all(v == "2/2" for v in add_same.values()),
            "estimate_cpu": cpu_grads, "estimate_device": here_grads, "estimate_rel_diff": rel,
            "estimate_ok": rel <= 1e-2, "update_identical": update_same}


# ---- the report ------------------------------------------------------------------------------------


def guarded(results: dict, key: str, fn, *args) -> None:
    """results[key] = fn(*args), or the error: one failing check leaves the others' results."""
    try:
        results[key] = fn(*args)
    except Exception as e:  # reported as a failed row; the run goes on
        results[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(f"{key}: {type(e).__name__}: {e}", file=sys.stderr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (the smoke run)")
    p.add_argument("--tiny", action="store_true", help="a 4-layer model of hidden 64, batches of 2 x 32: seconds")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "runs/bench/gpu"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available here")
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    config = smollm2_config(args.tiny)
    rows_, length = (2, 32) if args.tiny else (8, 128)
    warmup, count = (1, 3) if args.tiny else (3, 10)
    t_start = time.perf_counter()
    reference = build_model(config)
    batches = walk_batches(8, rows_, length, seed=0)
    held_out = walk_batches(2, rows_, length, seed=1)
    middle = f"layers.{config.num_hidden_layers // 2}"

    results: dict = {"model": {"hidden": config.hidden_size, "layers": config.num_hidden_layers,
                               "vocab": config.vocab_size, "batch": [rows_, length],
                               "rounds": args.rounds, "local_steps": args.local_steps,
                               "parameters": sum(p.numel() for p in reference.parameters())}}
    for dtype in (torch.float32, torch.bfloat16):
        model = on_device(reference, device, dtype)
        part = results[str(dtype).removeprefix("torch.")] = {}
        guarded(part, "quality", rounds_quality, model, batches, held_out, args.rounds, args.local_steps)
        guarded(part, "step", step_time, model, middle, batches, warmup, count, device)
        guarded(part, "overlap", overlap, model, batches, warmup, 2 * count, device)  # a difference: more steps
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    guarded(results, "zo", zo_identity, device, smollm2_config(tiny=True))
    results["seconds"] = time.perf_counter() - t_start

    rows = report_rows(results, device)
    results["ok"] = ok = all(r["ok"] != "NO" for r in rows)
    env = environment()
    env.update(transformers=__import__("transformers").__version__, device=str(device),
               gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    text = table(rows, ["check", "float32", "bfloat16", "ok"])
    print(text)
    print(f"\n{'all checks passed' if ok else 'SOME CHECKS FAILED'} in {results['seconds']:.0f} s on {device}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(text + "\n")
    (args.out / "gpu_check.json").write_text(json.dumps({"benchmark": "gpu_check", "environment": env,
                                                         "rows": rows, "results": results}, indent=1,
                                                        default=str) + "\n")
    return 0 if ok else 1


def report_rows(results: dict, device: torch.device) -> list[dict]:
    """The table's rows: for each check its float32 and bfloat16 results and whether it passed (- where
    a row only informs); a section that raised is one failed row."""
    cuda = device.type == "cuda"
    f, b = results["float32"], results["bfloat16"]
    rows: list[dict] = []

    def row(check: str, fp32, bf16, ok: bool | None = None) -> None:
        rows.append({"check": check, "float32": fp32, "bfloat16": bf16,
                     "ok": "-" if ok is None else ("yes" if ok else "NO")})

    def both(section: str) -> bool:
        """Whether both dtypes' `section` ran; a row for each that raised."""
        for name, part in (("float32", f), ("bfloat16", b)):
            if "error" in part[section]:
                row(f"{section} ({name}) raised", part[section]["error"][:120], "", False)
        return "error" not in f[section] and "error" not in b[section]

    if both("step"):
        fs, bs = f["step"], b["step"]
        row(f"step ms ({fs['block']}, batch {'x'.join(map(str, results['model']['batch']))})", fs["step_ms"],
            bs["step_ms"])
        row("bf16 step speed-up", "", fs["step_ms"] / bs["step_ms"])
        if cuda:
            row("peak GiB in those steps", fs["peak_gib"], bs["peak_gib"])
    if both("overlap"):
        fo, bo = f["overlap"], b["overlap"]
        mb = fo["bytes"] / 1e6
        if cuda:
            row(f"host copy of the embed delta ({mb:.0f} MB): pinned, same bits", fo["identical"] and fo["pinned"],
                bo["identical"] and bo["pinned"], all(o["identical"] and o["pinned"] for o in (fo, bo)))
            row("embed step ms: alone / +take_delta_ / +host copy",
                *(f"{o['alone_ms']:.1f} / {o['alone_ms'] + o['take_delta_ms']:.1f} / {o['with_copy_ms']:.1f}"
                  for o in (fo, bo)))
            row("copy alone ms (GB/s) / in flight ms",
                *(f"{o['copy_alone_ms']:.2f} ({o['gb_per_s']:.0f}) / {o['copy_in_flight_ms']:.2f}" for o in (fo, bo)))
            # The steps lose at most half the copy's time (or 3 %, the timing's noise).
            row("copy's cost to the steps ms", fo["copy_cost_ms"], bo["copy_cost_ms"],
                all(o["copy_cost_ms"] <= max(0.5 * o["copy_alone_ms"], 0.03 * o["alone_ms"]) for o in (fo, bo)))
            row("compute thread's time to queue the copy ms", fo["enqueue_ms"], bo["enqueue_ms"],
                all(o["enqueue_ms"] <= max(1.0, 0.5 * o["copy_alone_ms"]) for o in (fo, bo)))
            row("copies ended before the next step did", fo["overlapped"], bo["overlapped"],
                all(o["overlapped"] >= 0.8 for o in (fo, bo)))
        else:
            row(f"CPU delta hand-over ({mb:.2f} MB): no copy, same tensors", not fo["copied"], not bo["copied"],
                all(o["identical"] and not o["copied"] for o in (fo, bo)))
    if both("quality"):
        fq, bq = f["quality"], b["quality"]
        model = results["model"]
        row("held-out loss before", fq["before"], bq["before"])
        row(f"held-out loss after {model['rounds']} rounds x {model['local_steps']} steps", fq["after"], bq["after"],
            fq["after"] < fq["before"] and bq["after"] < bq["before"])
        rel = abs(fq["after"] - bq["after"]) / fq["after"]
        row("bf16 vs fp32 loss after, relative", "", rel, rel <= 0.05)
    z = results["zo"]
    if "error" in z:
        row("zeroth-order identity raised", z["error"][:120], "", False)
    else:
        row("zo.signs here = CPU, bit for bit", z["signs"], "", z["signs_ok"])
        row("zo.signs = the documented formula (sampled)", z["formula"], "", z["formula_ok"])
        row("add_direction_ + replay_ here = CPU, bits", z["add_direction"]["float32"], z["add_direction"]["bfloat16"],
            z["add_ok"])
        row("ZO estimate here vs CPU, max rel diff", z["estimate_rel_diff"], "", z["estimate_ok"])
        row("ZO update from the same scalars, bits", z["update_identical"], "", z["update_identical"])
    return rows


if __name__ == "__main__":
    sys.exit(main())
