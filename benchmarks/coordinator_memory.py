"""Coordinator memory on a big model: peak RSS of start-up, serving, one aggregation and the export,
against the model's size.

The model: a random-initialised Llama of a few GB in float32, wide and shallow (default hidden 4096,
MLP 11008, 2 layers, vocabulary 32000: 2.7 GB), written to a model folder tensor by tensor (never
held whole). The coordinator machinery runs on it for real, in one fresh process per phase (this
script with `--child`, so that peaks do not mix), with no workers: workers of a multi-GB model on 2
cores would measure the workers. Each phase:

* `start (new run)`: `daemon.build` on a fresh state dir (reads the model, writes its blocks, the
  first checkpoint);
* `start (resume) + serving`: `daemon.build` on that state dir (checks every block file's hash), then
  what the gRPC service does for a download of every block (`download_manifest`, the file read in
  chunks) and the confirmation of one block a worker holds (the canonical hash of the largest block);
* `aggregation of one block`: a resumed coordinator closes a round (`_close_round`: the algorithm's
  close, the finite check, the new block file, the checkpoint) with one update of the largest block
  folded in (its delta, the round's accumulator, is in memory as an upload's would be);
* `export`: a resumed coordinator's global model exported as a Hugging Face folder (`export_model`).

Measured: the process's peak resident set size (Linux VmHWM) over the phase, counting the start-up of
the process (libraries: "baseline", the peak of a process that only imports them); for the last two
also the phase alone ("phase peak": VmHWM reset with /proc/self/clear_refs once the coordinator is
built, so it starts at what the coordinator holds). VmHWM counts the pages of mapped block files that
were touched (clean page cache, which the kernel can take back at any time); "anon" is the peak of
anonymous memory alone (RssAnon, sampled every 5 ms), what the process cannot give back.

`--compare REV` runs the same phases with the coordinator of git revision REV as well (`git archive`
of its common/, server/ and client/ into the work dir, put first on PYTHONPATH): the memory before
the change, on the same model.

    python benchmarks/coordinator_memory.py [--compare HEAD] [--hidden 4096 --intermediate 11008
        --layers 2 --vocab 32000] [--quick] [--keep] [--json runs/bench/coordinator_memory.json]

Time: about 2 minutes on 2 cores for the default model, twice that with --compare; --quick (0.7 GB)
a third of it. Disk: the model, the state dir and the export (3 x the model size, per tree).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import parser, report  # noqa: E402

GB = 1e9
PHASES = ("baseline", "start (new run)", "start (resume) + serving", "aggregation of one block", "export")


# ---- the child: one phase in a process of its own -------------------------------------------------

def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class Peaks:
    """VmHWM (the kernel's) and the peak of RssAnon (sampled), both resettable."""

    def __init__(self) -> None:
        self.anon = _status("RssAnon")
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.anon = max(self.anon, _status("RssAnon"))

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.anon = _status("RssAnon")

    def read(self) -> dict:
        self.anon = max(self.anon, _status("RssAnon"))
        return {"peak_rss": _status("VmHWM"), "peak_anon": self.anon}


def child(phase: str, model: Path, state: Path) -> dict:
    peaks = Peaks()  # from the start: the libraries' memory is part of every phase
    import torch

    from fedblock.common.config import CoordinatorConfig
    from fedblock.server import daemon
    from fedblock.server.rounds import RoundPlan
    from fedblock.server.store import export_model

    torch.set_num_threads(2)
    if phase == "baseline":
        return peaks.read()
    config = CoordinatorConfig(model=str(model), state_dir=state, listen="127.0.0.1:0", insecure=True,
                               algorithm="fedbcd", rounds=1)
    t0 = time.perf_counter()
    c = daemon.build(config)
    result = {"build_s": time.perf_counter() - t0}
    largest = max(c.block_order, key=lambda b: c.specs[b].numel)
    if phase == "start (resume) + serving":
        g = c.global_model
        for b in c.block_order:  # as service.Download streams each block
            manifest, path = c.download_manifest(g, b, g.block_versions[b])
            with open(path, "rb") as f:
                for i in range(manifest.num_chunks):
                    os.pread(f.fileno(), manifest.chunk_size, i * manifest.chunk_size)
        c._canonical_sha256(g, largest)  # a worker that holds the block: its claim is checked
    elif phase == "aggregation of one block":
        whole = peaks.read()
        peaks.reset()
        plan = RoundPlan(c.global_model.version + 1, {"w": (largest,)}, 1e-4, 1)
        delta = {t.name: torch.full(t.shape, 1e-3) for t in c.specs[largest].tensors}
        plan.sums.add(largest, delta, 1.0, adopt=True)  # the upload's memory becomes the accumulator
        del delta
        t0 = time.perf_counter()
        c._close_round(plan)
        result.update(seconds=time.perf_counter() - t0, phase=peaks.read(), whole=whole)
    elif phase == "export":
        whole = peaks.read()
        peaks.reset()
        t0 = time.perf_counter()
        export_model(c.store.model_dir, c.global_model.tensors, state / "export")
        result.update(seconds=time.perf_counter() - t0, phase=peaks.read(), whole=whole)
    return {**result, **peaks.read()}


# ---- the parent ---------------------------------------------------------------------------------

def make_model(folder: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> int:
    """A random Llama (normal, std 0.02) in float32, tensor by tensor. Returns its size in bytes."""
    import torch
    from transformers import LlamaConfig

    from fedblock.common.models import build_model_from_files, make_tiny_model
    from fedblock.server.store import TensorLayout, write_safetensors

    heads = max(1, hidden // 128)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                         max_position_embeddings=512, tie_word_embeddings=False, dtype="float32",
                         architectures=["LlamaForCausalLM"])
    stamp = folder / "bench.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == config.to_dict():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    tiny = make_tiny_model(folder.parent / "tokenizer-source", "llama", seed=0, num_layers=1, hidden_size=16)
    folder.mkdir(parents=True)
    for f in tiny.iterdir():  # the tokenizer (the coordinator only copies it)
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy2(f, folder / f.name)
    config.save_pretrained(folder)
    params = list(build_model_from_files(folder, device="meta").named_parameters())
    layout = [TensorLayout(n, torch.float32, tuple(p.shape)) for n, p in params]
    generator = torch.Generator().manual_seed(0)

    def values():
        for t in layout:
            yield t.name, torch.ones(t.shape) if t.name.endswith("norm.weight") else \
                torch.empty(t.shape).normal_(0, 0.02, generator=generator)

    with open(folder / "model.safetensors", "wb") as f:
        write_safetensors(f, layout, values(), {"format": "pt"})
    stamp.write_text(json.dumps(config.to_dict()))
    return sum(t.nbytes for t in layout)


def old_tree(rev: str, workdir: Path) -> Path:
    """Revision `rev`'s fedblock (common/, server/, client/) as a package under the returned folder."""
    root = Path(__file__).resolve().parent.parent
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=root, check=True, capture_output=True,
                         text=True).stdout.strip()
    out = workdir / f"fedblock-{sha}"
    if not (out / "fedblock" / "__init__.py").is_file():
        (out / "fedblock").mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "common", "server", "client"], cwd=root, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out / "fedblock")], input=archive, check=True)
        (out / "fedblock" / "__init__.py").write_text("")
    return out


def run_phases(tree: Path | None, model: Path, state: Path) -> dict[str, dict]:
    shutil.rmtree(state, ignore_errors=True)
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    results = {}
    for phase in PHASES:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child", phase, "--model", str(model), "--state", str(state)],
                             env=env, check=True, capture_output=True, text=True)
        results[phase] = {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_s": time.perf_counter() - t0}
        print(f"  {phase}: {results[phase]['peak_rss'] / GB:.2f} GB peak RSS ({results[phase]['wall_s']:.0f} s)",
              file=sys.stderr)
    return results


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--compare", metavar="REV", help="also measure the coordinator of this git revision")
    p.add_argument("--keep", action="store_true", help="keep the model and state dirs (else removed at the end)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.state)))
        return
    if args.quick:
        args.hidden, args.intermediate, args.vocab = 2048, 5504, 16000
    args.json = args.json or Path("runs/bench/coordinator_memory.json")
    work = args.workdir.resolve() / "coordinator_memory"
    model = work / f"llama-{args.hidden}x{args.layers}"
    size = make_model(model, args.hidden, args.intermediate, args.layers, args.vocab)
    print(f"model: {size / GB:.2f} GB float32 (hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, "
          f"vocabulary {args.vocab})", file=sys.stderr)
    trees = {"after": None}
    if args.compare:
        trees = {f"before ({args.compare})": old_tree(args.compare, work), **trees}
    measured = {}
    try:
        for label, tree in trees.items():
            print(f"{label}:", file=sys.stderr)
            measured[label] = run_phases(tree, model, work / "state")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    for phase in PHASES:
        row = {"phase": phase}
        for label, results in measured.items():
            r = results[phase]
            row[f"peak RSS GB {label}"] = r["peak_rss"] / GB
            row[f"peak / model {label}"] = r["peak_rss"] / size
            row[f"anon GB {label}"] = r["peak_anon"] / GB
            row[f"phase peak GB {label}"] = r["phase"]["peak_rss"] / GB if "phase" in r else "-"
        rows.append(row)
    report("coordinator_memory", rows, args, model_bytes=size,
           model=f"Llama hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, vocab {args.vocab}",
           measured=measured)


if __name__ == "__main__":
    main()
