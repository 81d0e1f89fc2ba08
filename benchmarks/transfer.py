"""Upload goodput of block deltas through the coordinator vs raw gRPC byte streaming.

Two processes on loopback. The server process hosts a real coordinator (one block of the chosen
size, codec `none`, the default 1 MiB chunks) and, on the same gRPC server, a raw sink: a
client-streaming method with identity (de)serializers that only counts the bytes. The client process
(this one) alternates, for each repetition, a raw stream of the blob's bytes in the same chunk size
and a real upload of a block delta through `Session.upload` (manifest, chunks, incremental hashing,
spill to the state dir, SHA-256 check, decode, finite check, accumulation, reply). Goodput = payload
bytes / time until the reply. Between uploads the client waits for the round to close, so the
coordinator's checkpoint of the previous round is not inside the measurement.

Target (README, Performance targets): upload goodput ÷ raw goodput ≥ 0.8 for blocks of 4 MB to 256 MB.

    python benchmarks/transfer.py [--quick] [--sizes 4,16,64,256] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import parser, report  # noqa: E402

SINK = "/fedblock.bench.Sink/Stream"
MB = 1_000_000


def serve(size: int, rounds: int, chunk: int, workdir: Path) -> None:
    """The server process: a coordinator with one block of `size` bytes plus the raw sink."""
    import logging
    import threading
    from concurrent import futures

    import grpc
    import torch

    from fedblock.common.config import CoordinatorConfig
    from fedblock.common.messages import BlockSpec, TensorSpec
    from fedblock.common.rpc import server_options
    from fedblock.server.coordinator import Coordinator, GlobalModel
    from fedblock.server.service import CoordinatorService, add_to_server
    from fedblock.server.store import Checkpoint, StateStore

    logging.basicConfig(level=logging.WARNING)
    numel = size // 4
    rows = 1024
    shape = (rows, numel // rows)
    specs = [BlockSpec("layers.0", (TensorSpec("layers.0.weight", "float32", shape),))]
    store = StateStore(workdir / f"state-{size}", keep=1)
    store.install_model_files([])
    initial = {"layers.0": {"layers.0.weight": torch.zeros(shape)}}
    sha = {"layers.0": store.write_block("layers.0", 0, initial["layers.0"])}
    store.write_checkpoint(Checkpoint(0, {"layers.0": 0}, sha))
    config = CoordinatorConfig(model="-", state_dir=store.root, listen="127.0.0.1:0", rounds=rounds, local_steps=1,
                               algorithm="fedbcd", chunk_size=chunk)
    coordinator = Coordinator(config, store, "bench", specs, GlobalModel(0, {"layers.0": 0}, sha, initial))

    def sink(request_iterator, context):
        total = 0
        for data in request_iterator:
            total += len(data)
        return total.to_bytes(8, "little")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=server_options())
    add_to_server(CoordinatorService(coordinator), server)
    handler = grpc.method_handlers_generic_handler(
        "fedblock.bench.Sink", {"Stream": grpc.stream_unary_rpc_method_handler(sink)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"ready {port}", flush=True)
    runner = threading.Thread(target=coordinator.run, daemon=True)
    runner.start()
    sys.stdin.read()  # until the client closes our stdin
    coordinator.stop()
    server.stop(0)


def measure(size: int, reps: int, chunk: int, workdir: Path) -> dict:
    import grpc
    import torch

    from fedblock.client.session import Session
    from fedblock.common import wire
    from fedblock.common.codecs import CodecPipeline
    from fedblock.common.messages import Assignment, ModelNotice
    from fedblock.common.rpc import channel_options

    proc = subprocess.Popen(
        [sys.executable, __file__, "--_serve", str(size), "--_rounds", str(reps), "--_chunk", str(chunk),
         "--workdir", str(workdir)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = ""
        while not line.startswith("ready"):
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("the server process died")
        port = int(line.split()[1])
        address = f"127.0.0.1:{port}"
        session = Session(address, "bench")
        session.join(num_examples=1, device="cpu", timeout=30)
        events = session.events()
        channel = grpc.insecure_channel(address, options=channel_options())
        raw = channel.stream_unary(SINK, request_serializer=None, response_deserializer=None)
        numel = size // 4
        delta = {"layers.0.weight": torch.randn(1024, numel // 1024) * 1e-3}
        manifest, blob = wire.pack("layers.0", delta, CodecPipeline("none"), round=1, base_version=0,
                                   chunk_size=chunk, num_tokens=1)
        raw_s, up_s = [], []
        version = 0
        for r in range(1, reps + 1):
            t0 = time.perf_counter()
            got = int.from_bytes(raw(bytes(view) for _, view in wire.iter_chunks(blob, chunk)), "little")
            raw_s.append(time.perf_counter() - t0)
            assert got == len(blob)
            assigned = False
            while not (assigned and version == r - 1):  # round r assigned and round r-1 closed
                event = next(events)
                if isinstance(event, ModelNotice):
                    version = event.version
                assigned = assigned or (isinstance(event, Assignment) and event.round == r)
            m = manifest.__class__(**{**manifest.__dict__, "round": r, "base_version": version})
            t0 = time.perf_counter()
            status = session.upload(m, blob)
            up_s.append(time.perf_counter() - t0)
            assert status == "accepted", status
        session.close()
        channel.close()
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    best_raw, best_up = min(raw_s), min(up_s)
    med_raw, med_up = sorted(raw_s)[len(raw_s) // 2], sorted(up_s)[len(up_s) // 2]
    return {
        "block MB": size / MB,
        "raw MB/s": len(blob) / med_raw / MB,
        "upload MB/s": len(blob) / med_up / MB,
        "ratio": med_raw / med_up,
        "best raw MB/s": len(blob) / best_raw / MB,
        "best upload MB/s": len(blob) / best_up / MB,
        "best ratio": best_raw / best_up,
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4,16,64,256", help="block sizes in MB")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunk-size", type=int, default=1 << 20)
    p.add_argument("--_serve", type=int, help=argparse_hidden())
    p.add_argument("--_rounds", type=int, help=argparse_hidden())
    p.add_argument("--_chunk", type=int, help=argparse_hidden())
    args = p.parse_args()
    args.workdir = args.workdir.resolve() / "transfer"
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args._serve:
        serve(args._serve, args._rounds, args._chunk, args.workdir)
        return
    sizes = [4, 16, 64] if args.quick else [int(s) for s in args.sizes.split(",")]
    reps = 3 if args.quick else args.reps
    rows = [measure(s * MB, reps, args.chunk_size, args.workdir) for s in sizes]
    worst = min(r["ratio"] for r in rows)
    report("transfer", rows, args, target="median upload/raw goodput >= 0.8", worst_ratio=round(worst, 3),
           met=worst >= 0.8, chunk_size=args.chunk_size, reps=reps, threads=os.cpu_count())


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
