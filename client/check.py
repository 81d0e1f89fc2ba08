"""`fedblock worker --check`: a site's pre-flight check, then a verdict (exit 0: all good, 1: not).

One line per check, `OK`, `FAIL` or `SKIP` (it needs one that failed) with the reason:
- data: the --data examples load; a sample tokenizes with the run's tokenizer into trainable tokens;
- coordinator, token: a Join with `check_only` reaches the coordinator (TLS) and authenticates exactly as a
  Join does, and describes the run; nothing is registered, no session is made;
- algorithm: this site can build the run's algorithm (code never travels);
- model (with --model): the local base model's config and every block's float32 hash are the
  coordinator's initial model's;
- memory: the model at --dtype, the largest task's gradients and AdamW state and an activation estimate
  against the memory available (CUDA: free device memory; else MemAvailable).

Without --model the tokenizer files come from the coordinator (FetchModelFiles, which a caller that
authenticates as a Join may use without a session), checked by hash like a worker's.
"""

from __future__ import annotations

import logging
import tempfile
from importlib.metadata import version
from pathlib import Path

import grpc
import torch

from ..common import adapters, wire
from ..common import blocks as B
from ..common.config import WorkerConfig
from ..common.messages import PROTOCOL_VERSION, RunInfo
from ..common.pb import coordinator_pb2 as pb
from ..common.pb import coordinator_pb2_grpc as pb_grpc
from ..common.rpc import open_channel
from ..common.security import TOKEN_KEY, channel_credentials

log = logging.getLogger("fedblock.worker")

CHECK_TIMEOUT_S = 20.0  # a pre-flight check answers promptly or says why not
SAMPLE = 64  # examples tokenized
ACTIVATION_VALUES = 16  # values kept per token, hidden unit and decoder layer for the backward pass (rough)
HEADROOM = 1.1  # what the estimate leaves for the allocator, the tokenizer, buffers


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


class Report:
    def __init__(self, out=print):
        self.out = out
        self.failed = 0

    def line(self, verdict: str, what: str, reason: str) -> bool:
        self.failed += verdict == "FAIL"
        self.out(f"{verdict:4s} {what}: {reason}", flush=True)
        return verdict == "OK"


def preflight(config: WorkerConfig, out=print) -> int:
    """Run the checks; 0 when none failed (or was skipped for a failed one), else 1."""
    report = Report(out)
    examples = _data(config, report)
    info, channel, metadata = _coordinator(config, report, len(examples or ()))
    try:
        algorithm = _algorithm(info, report) if info is not None else report.line("SKIP", "algorithm", "needs the run's description")
        with tempfile.TemporaryDirectory(prefix=f"fedblock-check-{config.name}-") as tmp:
            model_dir = _model_files(config, info, channel, metadata, Path(tmp), report)
            _tokenize(config, examples, model_dir, report)
            if config.model:
                _model(config, info, report)
            _memory(config, info, algorithm, model_dir, report)
    finally:
        if channel is not None:
            channel.close()
    if report.failed:
        out(f"FAIL {config.name}: {report.failed} check(s) failed", flush=True)
        return 1
    out(f"OK   {config.name}: ready to join {config.coordinator}", flush=True)
    return 0


def _data(config: WorkerConfig, report: Report):
    from ..common.data import load_examples

    try:
        examples = load_examples(config.data)
    except (ValueError, OSError) as e:  # DataError is a ValueError
        report.line("FAIL", "data", str(e))
        return None
    report.line("OK", "data", f"{len(examples)} examples in {config.data}")
    return examples


def _coordinator(config: WorkerConfig, report: Report, num_examples: int):
    """(RunInfo or None, channel or None, metadata for later calls)."""
    from .worker import pick_device

    try:
        device = str(pick_device(config.device))
    except ValueError as e:
        report.line("FAIL", "device", str(e))
        device = config.device
    try:
        credentials = None if config.insecure else channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
        channel = open_channel(config.coordinator, credentials, config.tls_server_name)
    except (ValueError, OSError) as e:  # ConfigError: an unreadable certificate file
        report.line("FAIL", "coordinator", str(e))
        report.line("SKIP", "token", "needs the coordinator")
        return None, None, ()
    token = ((TOKEN_KEY, f"Bearer {config.token}"),) if config.token else ()
    metadata = (("fedblock-worker", config.name), *token)  # FetchModelFiles without a session: name and token
    request = pb.JoinRequest(name=config.name, version=version("fedblock"), device=device, num_examples=num_examples,
                             protocol=PROTOCOL_VERSION, check_only=True)
    link = "plaintext (--insecure)" if config.insecure else "TLS"
    try:
        reply = pb_grpc.CoordinatorStub(channel).Join(request, metadata=token, timeout=CHECK_TIMEOUT_S)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        if code == grpc.StatusCode.UNAUTHENTICATED:
            report.line("OK", "coordinator", f"reached {config.coordinator} over {link}")
            report.line("FAIL", "token", details)
        elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            why = "" if config.insecure else " (or the TLS handshake failed: check --tls-ca, --tls-server-name, the certificates)"
            report.line("FAIL", "coordinator", f"cannot reach {config.coordinator}{why}: {code.name}: {details}")
            report.line("SKIP", "token", "needs the coordinator")
        else:
            report.line("FAIL", "coordinator", f"{code.name}: {details}")
            report.line("SKIP", "token", "needs the coordinator")
        channel.close()
        return None, None, ()
    if reply.protocol != PROTOCOL_VERSION:
        report.line("FAIL", "coordinator", f"speaks fedblock protocol {reply.protocol}, this worker {PROTOCOL_VERSION}")
        channel.close()
        return None, None, ()
    info = RunInfo.from_pb(reply)
    report.line("OK", "coordinator", f"reached {config.coordinator} over {link}: run {info.run_id}, {info.algorithm}, "
                                     f"model version {info.model_version}/{info.rounds} rounds")
    report.line("OK", "token", f"accepted for worker {config.name!r}" if config.token else
                f"none given, and none needed by this coordinator for {config.name!r}")
    return info, channel, metadata


def _algorithm(info: RunInfo, report: Report):
    from .worker import Worker

    try:
        algorithm = Worker._algorithm(info)
    except Exception as e:  # an algorithm this site lacks, or one that fails on the run's settings
        report.line("FAIL", "algorithm", f"cannot run {info.algorithm}: {e}")
        return None
    report.line("OK", "algorithm", f"this site can run {info.algorithm}")
    return algorithm


def _model_files(config: WorkerConfig, info: RunInfo | None, channel, metadata, tmp: Path, report: Report) -> Path | None:
    """Where the run's config and tokenizer files are: --model, or fetched from the coordinator."""
    from ..common.models import resolve_model

    if config.model:
        try:
            return resolve_model(config.model)
        except (ValueError, OSError) as e:  # ModelError is a ValueError
            report.line("FAIL", "model", str(e))
            return None
    if info is None:
        return None
    dest = tmp / "model"
    dest.mkdir()
    parts: dict[str, bytearray] = {}
    try:
        for message in pb_grpc.CoordinatorStub(channel).FetchModelFiles(pb.ModelFilesRequest(), metadata=metadata,
                                                                         timeout=CHECK_TIMEOUT_S):
            parts.setdefault(message.name, bytearray()).extend(message.data)
    except grpc.RpcError as e:
        report.line("FAIL", "model files", f"cannot fetch the run's config and tokenizer: {e.code().name}: {e.details()}")
        return None
    for f in info.model_files:
        data = parts.get(f.name)
        if data is None or len(data) != f.size or wire.sha256(data) != f.sha256 or "/" in f.name or f.name.startswith("."):
            report.line("FAIL", "model files", f"{f.name} arrived incomplete or corrupted")
            return None
        (dest / f.name).write_bytes(data)
    return dest


def _tokenize(config: WorkerConfig, examples, model_dir: Path | None, report: Report) -> None:
    from ..common.data import tokenize
    from ..common.models import load_tokenizer

    if examples is None or model_dir is None:
        report.line("SKIP", "tokenize", "needs the data and the run's tokenizer")
        return
    try:
        sample = tokenize(examples[:SAMPLE], load_tokenizer(model_dir), config.max_seq_len)
    except Exception as e:  # a template or tokenizer that fails on this data
        report.line("FAIL", "tokenize", f"{type(e).__name__}: {e}")
        return
    trained = sum(sum(1 for label in t.labels if label >= 0) for t in sample)
    tokens = sum(len(t.input_ids) for t in sample)
    classification = any(getattr(t, "choices", None) for t in sample)
    if not sample or (not trained and not classification):
        report.line("FAIL", "tokenize", f"the first {min(SAMPLE, len(examples))} examples leave nothing to train on "
                                        f"within --max-seq-len {config.max_seq_len}")
        return
    report.line("OK", "tokenize", f"{len(sample)} examples: {tokens} tokens, {trained} trained "
                                  f"(--max-seq-len {config.max_seq_len})")


def _model(config: WorkerConfig, info: RunInfo | None, report: Report) -> None:
    """The local base model against the coordinator's initial model: config.json and each block's hash."""
    from ..common.models import load_model, resolve_model

    if info is None:
        report.line("SKIP", "model", "needs the run's description")
        return
    try:
        base = resolve_model(config.model)
        config_file = next((f for f in info.model_files if f.name == "config.json"), None)
        if config_file is not None and wire.sha256((base / "config.json").read_bytes()) != config_file.sha256:
            report.line("FAIL", "model", f"{config.model}: its config.json is not the coordinator's (another model?)")
            return
        model = adapters.add_lora(load_model(base), info.lora)
        blocks = adapters.partition(model, info.layers_per_block, info.lora)
    except Exception as e:
        report.line("FAIL", "model", f"{config.model}: {type(e).__name__}: {e}")
        return
    params = dict(model.named_parameters())
    local = {b.name: {n: tuple(params[n].shape) for n in b.params} for b in blocks}
    remote = {b.name: {t.name: tuple(t.shape) for t in b.tensors} for b in info.blocks}
    if local != remote:
        report.line("FAIL", "model", f"{config.model}: its blocks are not laid out as the coordinator's")
        return
    expected = dict(zip((b.name for b in info.blocks), info.initial_block_sha256, strict=False))
    differ = [b.name for b in blocks
              if expected.get(b.name) != B.canonical_sha256({n: params[n] for n in b.params}, b.params)]
    if differ:
        shown = ", ".join(differ[:4]) + (", ..." if len(differ) > 4 else "")
        report.line("FAIL", "model", f"{config.model}: {len(differ)} of {len(blocks)} blocks differ from the "
                                     f"coordinator's initial model ({shown}); they would be downloaded")
        return
    report.line("OK", "model", f"{config.model}: all {len(blocks)} blocks match the coordinator's initial model")


def estimate_memory(info: RunInfo, algorithm, dtype_bytes: int, batch_size: int, max_seq_len: int,
                    hidden: int, layers: int, vocab: int) -> dict[str, int]:
    """Bytes a worker needs, by part: the model at its dtype; the largest task's gradients and AdamW state
    (two moments; none for zeroth-order algorithms, whose tasks take no gradients); the activations kept
    for the backward pass (batch x seq x hidden x layers x ACTIVATION_VALUES) and the float32 logits with
    their gradient."""
    sizes = {b.name: b.numel for b in info.blocks}
    trainable = getattr(algorithm, "trainable", None) or list(sizes)
    trainable = [b for b in trainable if b in sizes] or list(sizes)
    records = bool(getattr(algorithm, "records", False))
    task = sum(sizes[b] for b in trainable) if getattr(algorithm, "all_blocks", False) else max(sizes[b] for b in trainable)
    tokens = batch_size * max_seq_len
    return {
        "model": sum(sizes.values()) * dtype_bytes,
        "optimizer": 0 if records else task * dtype_bytes * 3,
        "activations": 0 if records else tokens * hidden * layers * ACTIVATION_VALUES * dtype_bytes + tokens * vocab * 4 * 2,
    }


def available_memory(device: torch.device) -> tuple[int, str]:
    """(bytes available, where): free CUDA memory, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free on {device}"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available (MemAvailable)"
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available"


def _memory(config: WorkerConfig, info: RunInfo | None, algorithm, model_dir: Path | None, report: Report) -> None:
    from transformers import AutoConfig

    from .worker import pick_device

    if info is None or model_dir is None:
        report.line("SKIP", "memory", "needs the run's description and model config")
        return
    try:
        cfg = AutoConfig.from_pretrained(model_dir)
        hidden, layers, vocab = (int(getattr(cfg, k)) for k in ("hidden_size", "num_hidden_layers", "vocab_size"))
        device = pick_device(config.device)
    except Exception as e:
        report.line("FAIL", "memory", f"cannot estimate: {type(e).__name__}: {e}")
        return
    dtype_bytes = 2 if config.dtype == "bfloat16" else 4
    need = estimate_memory(info, algorithm, dtype_bytes, config.batch_size, config.max_seq_len, hidden, layers, vocab)
    total = int(sum(need.values()) * HEADROOM)
    have, where = available_memory(device)
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in need.items())
    verdict = "OK" if total <= have else "FAIL"
    hint = "" if verdict == "OK" else "; try a smaller --batch-size or --max-seq-len, --dtype bfloat16 or --gradient-checkpointing on"
    report.line(verdict, "memory", f"needs about {_gib(total)} ({parts}, +{HEADROOM - 1:.0%}) of {_gib(have)} {where}{hint}")
