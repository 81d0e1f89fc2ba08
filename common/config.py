"""Configuration: typed dataclasses per command, read from flags, FEDBLOCK_* variables and YAML.

Precedence: command-line flag > environment variable (`FEDBLOCK_ROUNDS`) > `--config` YAML file (keys as
flag names, with - or _) > default. Each field's metadata holds its help text and, where needed, a parser
(`parse=`), so the dataclass is the single description of an option. Invalid values raise `ConfigError`
with a message naming the option, which the CLI prints as one line before exiting with status 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .rpc import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

BLOCK_SCHEDULES = ("round-robin", "random", "staggered", "striped", "descending")
LR_SCHEDULES = ("constant", "cosine")
REQUIRED: Any = dataclasses.MISSING


class ConfigError(ValueError):
    """An option has an invalid value; the message names the option."""


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str | int) -> int:
    """'1MiB' -> 1048576, '20MB' -> 20000000, '4096' -> 4096."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (use e.g. 4096, 512KiB, 1MiB, 20MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_rate(text: str | int) -> int:
    """Bytes per second: '20MB/s', '100Mbit/s', '0' (unlimited)."""
    if isinstance(text, int):
        return text
    s = str(text).strip()
    bits = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)bit(?:/s|ps)?", s, flags=re.I)
    if bits:
        return int(float(bits.group(1)) * _UNITS[bits.group(2).lower() or "b"] / 8)
    return parse_bytes(re.sub(r"(/s|ps)$", "", s, flags=re.I))


def opt(help: str, default: Any = REQUIRED, *, parse: Callable[[str], Any] | None = None,
        choices: tuple[str, ...] | None = None, flag: str | None = None, const: str | None = None) -> Any:
    """A dataclass field that is also a command-line option (`const`: its value when the flag comes alone)."""
    meta = {"help": help, "parse": parse, "choices": choices, "flag": flag, "const": const}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _switch(value: Any) -> str:
    """auto, on or off; the words of a boolean (true, 1, yes; false, 0, no) as on and off."""
    text = str(value).strip().lower()
    return "on" if text in ("true", "1", "yes") else "off" if text in ("false", "0", "no") else text


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def env_name(f: dataclasses.Field) -> str:
    return "FEDBLOCK_" + f.name.upper()


def _base_type(tp: Any) -> Any:
    """int | None -> int."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _convert(f: dataclasses.Field, tp: Any, value: Any) -> Any:
    if value is None:
        return None
    parse = f.metadata.get("parse")
    base = _base_type(tp)
    try:
        if parse is not None:
            value = parse(value)
        elif base is bool:
            if isinstance(value, str):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(f"not a boolean: {value!r}")
                value = value.lower() in ("1", "true", "yes", "on")
            value = bool(value)
        elif base in (int, float, str, Path):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"not an integer: {value}")
            value = base(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{flag_name(f)}: {e}") from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{flag_name(f)}: {value!r} is not one of {', '.join(choices)}")
    return value


def read_yaml_mapping(path: str | Path, flag: str, what: str) -> dict[Any, Any]:
    """The mapping in a YAML file, or a ConfigError naming `flag` (`what`: what it should map)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{flag}: no such file {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag}: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag}: {path} must {what}")
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    data = read_yaml_mapping(path, "--config", "hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build(cls: type, flags: Mapping[str, Any], env: Mapping[str, str] | None = None,
          file_values: Mapping[str, Any] | None = None) -> Any:
    """An instance of the config dataclass `cls` from flag values (None = not given), env and YAML."""
    env = os.environ if env is None else env
    file_values = file_values or {}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(file_values) - names)
    if unknown:
        raise ConfigError(f"--config: unknown option {unknown[0].replace('_', '-')!r}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if flags.get(f.name) is not None:
            raw = flags[f.name]
        elif env_name(f) in env:
            raw = env[env_name(f)]
        elif f.name in file_values:
            raw = file_values[f.name]
        else:
            if f.default is REQUIRED and f.default_factory is REQUIRED:
                raise ConfigError(f"{flag_name(f)} is required (or set {env_name(f)})")
            continue
        values[f.name] = _convert(f, hints[f.name], raw)
    config = cls(**values)
    check = getattr(config, "check", None)
    if check is not None:
        check()
    return config


def valid_worker_name(name: str) -> bool:
    """Worker names end up in metrics labels, logs and file names: a plain, short alphabet only."""
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name)) and ".." not in name


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _host_port(text: str, flag: str) -> None:
    host, sep, port = text.rpartition(":")
    _require(bool(sep and host and port.isdigit() and 0 <= int(port) < 65536), f"{flag}: expected HOST:PORT, got {text!r}")


# ---- the commands' options ---------------------------------------------------------------------


@dataclass(kw_only=True)
class CoordinatorConfig:
    model: str = opt("local Hugging Face model folder or built-in name (smollm2-135m-instruct)")
    state_dir: Path = opt("directory for checkpoints, incoming uploads, summary.json and the export")
    listen: str = opt("address to serve gRPC on", "0.0.0.0:50051")
    metrics_port: int = opt("Prometheus /metrics port (0: off)", 0)
    algorithm: str = opt("federated algorithm: fedbcd, parablock, fedavg, fedcybgd, decomfl, fedspzo, or package.module:Name "
                         "(an importable fedblock Algorithm class)", "parablock")
    rounds: int = opt("number of rounds", 20)
    clients_per_round: int = opt("workers per round (0: every connected worker)", 0)
    min_workers: int = opt("workers that must have joined before the first round", 1)
    min_updates: int = opt("updates a round needs to close at --round-timeout", 1)
    round_timeout: float = opt("seconds after which a round closes with the updates it has (0: wait for all)", 0.0)
    local_steps: int | None = opt("local optimiser steps per round (default: the algorithm's; block methods 10, "
                                  "zeroth-order 1)", None)
    lr: float | None = opt("learning rate of the workers' optimiser (default: the algorithm's; block methods' AdamW "
                           "1e-4, zeroth-order SGD 1e-5)", None)
    lr_schedule: str = opt("learning rate over rounds", "constant", choices=LR_SCHEDULES)
    block_schedule: str | None = opt("which block each worker trains per round (default: the algorithm's)", None,
                                     choices=BLOCK_SCHEDULES)
    layers_per_block: int = opt("decoder layers per block", 1)
    train_blocks: str | None = opt("comma-separated glob patterns of blocks to train, e.g. 'layers.*,head' "
                                   "(default: the algorithm's, '*')", None)
    zo_perturbations: str | None = opt("zeroth-order perturbations per step: P (decomfl, default 5) or P1,P2 "
                                       "(fedspzo, default 1,8)", None)
    zo_mu: float = opt("zeroth-order smoothing: the perturbation's scale", 1e-3)
    zo_estimator: str = opt("zeroth-order difference", "central", choices=("central", "forward"))
    zo_aggregate: str = opt("how the coordinator combines the workers' scalars", "mean",
                            choices=("mean", "median", "trimmed"))
    zo_split: int = opt("fedspzo: the decoder layer where block 2 starts (0: the lowest split that halves "
                        "decomfl's layer evaluations)", 0)
    zo_replay_limit: float = opt("zeroth-order catch-up: a worker downloads the blocks instead of replaying "
                                 "the log when that would take more than this many parameter-direction updates "
                                 "(rounds missed x steps x perturbations x parameters)", 1e11)
    pipeline_depth: int | None = opt("rounds a worker may train ahead of the global model (default: parablock 1, others 0)", None)
    codec: str = opt("codec pipeline for uploads, e.g. none, bf16, topk:0.01,bf16,zstd, ae:64", "none")
    codec_weights: Path | None = opt("the autoencoder's weights for --codec ae:RATIO (written by fedblock codec "
                                     "train); the coordinator serves them to the workers", None)
    download_codec: str = opt("codec pipeline for downloads, encoded once per block version: none or "
                              "shuffle,zstd (lossless), bf16 or int8,zstd (lossy: the workers train on a "
                              "rounded copy)", "none")
    fedcybgd_mode: str = opt("fedcybgd: relay (one worker per round, in turn, trains one block) or parallel "
                             "(every participant trains a distinct block)", "relay", choices=("relay", "parallel"))
    download_fraction: float = opt("fedcybgd: a worker receives this fraction of the blocks changed since the base "
                                   "model (always its own block); the others revert to the base model's values", 1.0)
    peft: str = opt("parameter-efficient fine-tuning: none (the blocks' own weights train) or lora (LoRA adapters "
                    "train and travel; the base model stays frozen)", "none", choices=("none", "lora"))
    lora_r: int = opt("LoRA rank", 8)
    lora_alpha: float = opt("LoRA alpha (the adapters' output is scaled by alpha/r)", 16.0)
    lora_dropout: float = opt("LoRA dropout", 0.05)
    lora_targets: str = opt("comma-separated names of the modules that get adapters", "q_proj,k_proj,v_proj,o_proj")
    record_updates: bool = opt("keep every accepted update's decoded delta under STATE_DIR/records, to pre-train "
                               "the autoencoder codec (fedblock codec train). Off by default: an update says "
                               "something about a site's data; see --record-keep-rounds", False)
    record_keep_rounds: int = opt("with --record-updates: delete the records of rounds older than the last N "
                                  "(0: keep them until you delete STATE_DIR/records)", 0)
    chunk_size: int = opt("transfer chunk size", 1 << 20, parse=parse_bytes)
    max_update_bytes: int = opt("largest accepted upload (wire bytes)", 16 << 30, parse=parse_bytes)
    max_update_norm: float = opt("refuse a block update (or a zeroth-order record of scalars) whose L2 norm "
                                 "exceeds this (0: no limit)", 0.0)
    resume_grace: float = opt("after a restart, seconds to wait for the workers of the open rounds before "
                              "planning without them", 120.0)
    upload_slots: int = opt("uploads assembled in memory at once; further concurrent uploads go to files under "
                            "STATE_DIR/incoming, so memory does not grow with the number of workers", 2)
    seed: int = opt("seed for client selection and schedules", 0)
    eval_data: str | None = opt("held-out JSONL (or builtin:NAME) evaluated before, every --eval-every rounds and after", None)
    eval_every: int = opt("evaluate every N rounds (0: only before and after)", 0)
    eval_max_examples: int = opt("held-out examples used per evaluation", 128)
    eval_batch_size: int = opt("batch size of evaluations", 8)
    max_seq_len: int = opt("maximum tokens per example in evaluations", 256)
    export_dir: Path | None = opt("where the final model goes (default: STATE_DIR/export)", None)
    heartbeat_interval: float = opt("seconds between worker heartbeats", 10.0)
    heartbeat_timeout: float = opt("seconds of silence after which a worker is dropped from its rounds", 120.0)
    keep_checkpoints: int = opt("checkpoints kept in --state-dir", 3)
    threads: int = opt("torch CPU threads (0: torch's default)", 0)
    end_grace: float = opt("after the run, seconds to wait for every worker to hear that it ended", 60.0)
    linger: float = opt("after the run, seconds to keep serving status and /metrics, so that Prometheus scrapes the "
                        "final values (twice the deploy kit's scrape interval); SIGTERM ends it early", 10.0)
    tls_cert: Path | None = opt("TLS certificate (PEM) of the coordinator", None)
    tls_key: Path | None = opt("TLS private key (PEM) of the coordinator", None)
    tls_client_ca: Path | None = opt("require client certificates signed by this CA (mutual TLS); a worker's "
                                     "certificate must name the worker (common name or DNS name)", None)
    auth_tokens: Path | None = opt("YAML file mapping worker names to tokens (or sha256:HASH of tokens)", None)
    admin_tokens: Path | None = opt("YAML file mapping operator names to tokens, in the format of --auth-tokens: "
                                    "who may send `fedblock admin` commands (default: nobody)", None)
    insecure: bool = opt("allow plaintext gRPC (no TLS): only on a network you trust", False)

    def __post_init__(self) -> None:
        from .algorithms import AlgorithmError, load

        try:
            cls = load(self.algorithm)
        except AlgorithmError as e:
            raise ConfigError(f"--algorithm: {e}") from None
        for name, value in cls.defaults.items():  # what the user left unset, the algorithm decides
            if getattr(self, name, None) is None:
                setattr(self, name, value)
        for name, value in (("lr", 1e-4), ("local_steps", 10), ("block_schedule", "round-robin"), ("train_blocks", "*")):
            if getattr(self, name) is None:
                setattr(self, name, value)

    def check(self) -> None:
        _require(self.block_schedule in BLOCK_SCHEDULES, f"--block-schedule must be one of {', '.join(BLOCK_SCHEDULES)}")
        _require(self.zo_mu > 0 and math.isfinite(self.zo_mu), "--zo-mu must be a finite number > 0")
        _require(self.zo_split >= 0, "--zo-split must be >= 0")
        _require(self.zo_replay_limit > 0, "--zo-replay-limit must be > 0")
        _host_port(self.listen, "--listen")
        _require(self.linger >= 0 and self.end_grace >= 0, "--linger and --end-grace must be >= 0")
        _require(self.rounds >= 1, f"--rounds must be >= 1, got {self.rounds}")
        _require(self.clients_per_round >= 0, "--clients-per-round must be >= 0")
        _require(self.min_workers >= 1, "--min-workers must be >= 1")
        _require(self.min_updates >= 1, "--min-updates must be >= 1")
        _require(self.clients_per_round == 0 or self.min_updates <= self.clients_per_round,
                 f"--min-updates ({self.min_updates}) exceeds --clients-per-round ({self.clients_per_round})")
        _require(self.round_timeout >= 0, "--round-timeout must be >= 0")
        _require(self.local_steps >= 1, "--local-steps must be >= 1")
        _require(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _require(self.layers_per_block >= 1, "--layers-per-block must be >= 1")
        _require(self.pipeline_depth is None or self.pipeline_depth in (0, 1), "--pipeline-depth must be 0 or 1")
        _require(not (self.algorithm_class.records and self.depth), f"--pipeline-depth: {self.algorithm} runs each "
                 "task on the round's base model (depth 0)")
        _require(MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE, "--chunk-size must be between 1KiB and 64MiB")
        _require(self.eval_every >= 0 and self.eval_max_examples >= 1 and self.eval_batch_size >= 1,
                 "--eval-every must be >= 0, --eval-max-examples and --eval-batch-size >= 1")
        _require(self.max_seq_len >= 8, "--max-seq-len must be >= 8")
        _require(self.heartbeat_interval > 0, "--heartbeat-interval must be > 0")
        _require(self.heartbeat_timeout > self.heartbeat_interval,
                 "--heartbeat-timeout must be longer than --heartbeat-interval")
        _require(self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1")
        _require(self.upload_slots >= 0, "--upload-slots must be >= 0")
        _require(self.max_update_norm >= 0 and math.isfinite(self.max_update_norm),
                 "--max-update-norm must be a finite number >= 0")
        _require(self.resume_grace >= 0, "--resume-grace must be >= 0")
        _require(self.threads >= 0, "--threads must be >= 0")
        _require(0 <= self.metrics_port < 65536, "--metrics-port must be 0..65535")
        from .codecs import CodecError, CodecPipeline

        try:
            upload = CodecPipeline(self.codec)
            needs_weights = any(stage.needs_weights for stage in upload.stages)
            _require(needs_weights or self.codec_weights is None,
                     f"--codec-weights: the codec {self.codec} uses no weights (it is for --codec ae:RATIO)")
            _require(not needs_weights or self.codec_weights is not None,
                     f"--codec {self.codec} needs the autoencoder's weights: --codec-weights FILE "
                     "(fedblock codec train writes one)")
            if needs_weights:
                CodecPipeline(self.codec, weights=self.codec_weights)
        except CodecError as e:
            raise ConfigError(f"--codec: {e}") from None
        try:
            download = CodecPipeline(self.download_codec, direction="download")
        except CodecError as e:
            raise ConfigError(f"--download-codec: {e}") from None
        _require(download.lossless or not self.algorithm_class.records, f"--download-codec {self.download_codec}: "
                 f"{self.algorithm} workers replay the log on an exact copy of the model; use a lossless codec")
        _require(0 < self.download_fraction <= 1, f"--download-fraction must be in (0, 1], got {self.download_fraction}")
        _require(self.fedcybgd_mode in ("relay", "parallel"), "--fedcybgd-mode must be relay or parallel")
        from .algorithms.cyclic import FedCyBGD

        cyclic = issubclass(self.algorithm_class, FedCyBGD)
        _require(not (cyclic and self.fedcybgd_mode == "relay" and self.min_updates > 1),
                 "--min-updates: a fedcybgd relay round has one trainer (use --fedcybgd-mode parallel for more)")
        _require(not (cyclic and self.download_fraction < 1 and self.depth),
                 "--pipeline-depth: with --download-fraction below 1 a task starts on its own view (depth 0)")
        try:
            self.lora  # noqa: B018 (validates the --lora-* options)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _require(self.record_keep_rounds >= 0, "--record-keep-rounds must be >= 0")
        _require(not (self.record_updates and self.algorithm_class.records),
                 f"--record-updates: {self.algorithm} updates are scalars, not tensors an autoencoder could learn")
        from .algorithms.zeroth import FedSPZO

        _require(not (self.lora and issubclass(self.algorithm_class, FedSPZO)),
                 "--peft lora: fedspzo splits the base model's layers, not adapters; use decomfl with adapters")
        _require((self.tls_cert is None) == (self.tls_key is None), "--tls-cert and --tls-key go together")
        _require(self.tls_cert is not None or self.insecure,
                 "plaintext gRPC needs --insecure; or serve TLS with --tls-cert and --tls-key")
        _require(self.tls_client_ca is None or self.tls_cert is not None, "--tls-client-ca needs --tls-cert and --tls-key")
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key),
                           ("--tls-client-ca", self.tls_client_ca), ("--auth-tokens", self.auth_tokens),
                           ("--admin-tokens", self.admin_tokens)):
            _require(path is None or Path(path).is_file(), f"{flag}: no such file {path}")

    @property
    def algorithm_class(self):
        from .algorithms import load

        return load(self.algorithm)

    @property
    def lora(self):
        """The run's LoRA adapters (`LoraSettings`), or None without --peft lora."""
        if self.peft != "lora":
            return None
        from .adapters import LoraSettings

        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, targets, self.seed)

    def algorithm_settings(self) -> dict[str, str]:
        """The settings an algorithm reads (its workers get those it lists in `options`)."""
        names = ("zo_perturbations", "zo_mu", "zo_estimator", "zo_aggregate", "zo_split", "zo_replay_limit", "local_steps",
                 "fedcybgd_mode", "download_fraction")
        return {n: str(getattr(self, n)) for n in names if getattr(self, n) is not None}

    @property
    def depth(self) -> int:
        """The effective pipeline depth: how far ahead of the global model a worker may train."""
        if self.pipeline_depth is not None:
            return self.pipeline_depth
        return self.algorithm_class.pipeline_depth


@dataclass(kw_only=True)
class WorkerConfig:
    coordinator: str = opt("coordinator address HOST:PORT")
    name: str = opt("this worker's name (unique in the run)")
    data: str = opt("local training data: JSONL (Alpaca, GSM8K or chat form) or builtin:NAME")
    model: str | None = opt("this site's own copy of the base model (a Hugging Face folder or built-in name): "
                            "each block is checked against the coordinator's initial model by hash and only what "
                            "differs is downloaded (default: fetch the whole model from the coordinator)", None)
    metrics_port: int = opt("Prometheus /metrics port (0: off)", 0)
    batch_size: int = opt("training batch size", 8)
    max_seq_len: int = opt("maximum tokens per training example", 256)
    device: str = opt("auto, cpu, cuda or cuda:N", "auto")
    dtype: str = opt("training dtype", "float32", choices=("float32", "bfloat16"))
    threads: int = opt("torch CPU threads (0: torch's default)", 0)
    seed: int = opt("seed of the local data order", 0)
    work_dir: Path | None = opt("where the model's config and tokenizer are kept (default: a temporary dir)", None)
    connect_timeout: float = opt("seconds to keep trying to reach the coordinator at start", 300.0)
    grad_clip: float = opt("max gradient norm of the trained block (0: off)", 1.0)
    gradient_checkpointing: str = opt(
        "recompute decoder layers above the trained block in the backward pass instead of keeping their activations "
        "(less memory, more compute): auto (as many as keep the peak at about half of full fine-tuning's), on (all), "
        "off (the flag alone: on)", "auto", parse=_switch, const="on")
    max_upload_rate: int = opt("cap on upload bandwidth in bytes/s, e.g. 20MB/s or 100Mbit/s (0: none)", 0, parse=parse_rate)
    max_download_rate: int = opt("cap on download bandwidth in bytes/s (0: none)", 0, parse=parse_rate)
    timeline: Path | None = opt("write this worker's compute and transfer intervals as JSONL here", None)
    token: str | None = opt("this worker's token (see the coordinator's --auth-tokens)", None)
    tls_ca: Path | None = opt("CA certificate (PEM) to trust for the coordinator (default: the system's roots)", None)
    tls_cert: Path | None = opt("client certificate (PEM) for mutual TLS", None)
    tls_key: Path | None = opt("client private key (PEM) for mutual TLS", None)
    tls_server_name: str | None = opt("name to expect in the coordinator's certificate (default: the host)", None)
    insecure: bool = opt("connect without TLS: only on a network you trust", False)
    max_retries: int = opt("give up after this many failed reconnection attempts in a row (0: never)", 0)
    max_backoff: float = opt("longest wait between reconnection attempts, in seconds (exponential with jitter up to it)", 30.0)
    linger: float = opt("with --metrics-port: after the run, seconds to keep serving /metrics, so that Prometheus "
                        "scrapes the final values (twice the deploy kit's scrape interval); SIGTERM ends it early", 10.0)
    nproc_per_node: int = opt("processes of this site on this machine, one per GPU: more than 1 starts them under "
                              "torchrun (one federated identity; rank 0 talks to the coordinator)", 1)
    rank_timeout: float = opt("on a site of several processes: seconds a process waits on the others (rank 0's model "
                              "download included) before it gives up", 1800.0)
    shard_model: bool = opt("on a site of several processes: shard the model's weights over them with FSDP2 (each "
                            "holds about 1/N), for a model that does not fit one device; full weights, first-order "
                            "block methods only", False)
    check_only: bool = opt("pre-flight check of this site, then exit (0: all good, 1: something failed): the data, "
                           "--model against the coordinator's initial model, the token and TLS, the memory needed; "
                           "joins nothing", False, flag="--check")

    def check(self) -> None:
        _host_port(self.coordinator, "--coordinator")
        _require(valid_worker_name(self.name), f"--name must be 1-64 letters, digits, '.', '_' or '-', got {self.name!r}")
        _require(self.batch_size >= 1, "--batch-size must be >= 1")
        _require(self.max_seq_len >= 8, "--max-seq-len must be >= 8")
        _require(bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device)), f"--device: unknown device {self.device!r}")
        _require(self.threads >= 0, "--threads must be >= 0")
        _require(self.connect_timeout >= 0, "--connect-timeout must be >= 0")
        _require(0 <= self.metrics_port < 65536, "--metrics-port must be 0..65535")
        _require(self.max_upload_rate >= 0 and self.max_download_rate >= 0, "rates must be >= 0")
        _require(self.max_retries >= 0, "--max-retries must be >= 0")
        _require(self.max_backoff > 0, "--max-backoff must be > 0")
        _require(self.linger >= 0, "--linger must be >= 0")
        _require(self.nproc_per_node >= 1, "--nproc-per-node must be >= 1")
        _require(self.rank_timeout > 0, "--rank-timeout must be > 0")
        _require(self.batch_size >= self.nproc_per_node,
                 f"--batch-size {self.batch_size} cannot be shared by --nproc-per-node {self.nproc_per_node} processes")
        _require(self.gradient_checkpointing in ("auto", "on", "off"),
                 f"--gradient-checkpointing must be auto, on or off, got {self.gradient_checkpointing!r}")
        _require((self.tls_cert is None) == (self.tls_key is None), "--tls-cert and --tls-key go together")
        _require(not (self.insecure and (self.tls_ca or self.tls_cert)), "--insecure contradicts the --tls-* options")
        for flag, path in (("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            _require(path is None or Path(path).is_file(), f"{flag}: no such file {path}")


@dataclass(kw_only=True)
class SimulateConfig:
    """`fedblock simulate`: its own options; it also takes every coordinator and worker option."""

    workers: int = opt("worker processes to start", 2)
    data: str = opt("one data set (JSONL or builtin:NAME), split across the workers")
    split: str = opt("how to split the data: iid or dirichlet:ALPHA", "iid")
    eval_fraction: float = opt("fraction of the data held out for evaluation", 0.1)
    seed: int = opt("seed for the split, the schedules and the data order", 0)
    port: int = opt("gRPC port on localhost (0: pick a free one)", 0)

    def check(self) -> None:
        _require(1 <= self.workers <= 64, f"--workers must be 1..64, got {self.workers}")
        _require(0.0 < self.eval_fraction < 1.0, "--eval-fraction must be in (0, 1)")
        _require(self.split == "iid" or bool(re.fullmatch(r"dirichlet:\d*\.?\d+", self.split)),
                 f"--split must be iid or dirichlet:ALPHA, got {self.split!r}")
        _require(0 <= self.port < 65536, "--port must be 0..65535")


@dataclass(kw_only=True)
class ExportConfig:
    state_dir: Path = opt("a coordinator's --state-dir")
    out: Path = opt("output folder (a Hugging Face model folder)")
    round: int | None = opt("export the checkpoint of this round (default: the latest)", None)
    adapter_out: Path | None = opt("a run with --peft lora: also write the adapters alone here, in peft's format "
                                   "(--out always holds the model with the adapters merged)", None)


@dataclass(kw_only=True)
class ReportConfig:
    """`fedblock report STATE_DIR`: PNG plots and a markdown summary of a run (during it or after)."""

    state_dir: Path = opt("a coordinator's --state-dir (or give it as the first argument: fedblock report DIR)")
    out: Path | None = opt("folder for the PNGs and report.md (default: STATE_DIR/report)", None)


@dataclass(kw_only=True)
class CodecTrainConfig:
    """`fedblock codec train`: pre-train the autoencoder codec on the updates a run recorded (TGAP)."""

    from_dir: Path = opt("a coordinator's --state-dir whose run had --record-updates", flag="--from")
    out: Path = opt("where to write the weights file (give it to the coordinator as --codec-weights)")
    ratio: int = opt("compression ratio: the latent has 1/RATIO of the block's elements (a power of two)", 64)
    variant: str = opt("input scaling: none (the paper's: the update as it is) or max (each update divided by its "
                       "largest magnitude, which travels with the latent)", "none", choices=("none", "max"))
    blocks: str = opt("comma-separated glob patterns of the recorded blocks to train on", "*")
    steps: int = opt("Adam steps", 2000)
    lr: float = opt("Adam learning rate (the paper's 2e-4)", 2e-4)
    batch_size: int = opt("updates per step", 8)
    holdout: float = opt("fraction of the updates held out to measure the reconstruction", 0.2)
    seed: int = opt("seed of the initial weights, the hold-out and the batch order", 0)
    threads: int = opt("torch CPU threads (0: torch's default)", 0)

    def check(self) -> None:
        _require(self.ratio >= 2 and self.ratio <= 1024 and not self.ratio & (self.ratio - 1),
                 f"--ratio must be a power of two from 2 to 1024, got {self.ratio}")
        _require(self.steps >= 1 and self.batch_size >= 1 and self.lr > 0, "--steps, --batch-size and --lr must be > 0")
        _require(0 <= self.holdout < 1, "--holdout must be in [0, 1)")
        _require(self.threads >= 0, "--threads must be >= 0")


@dataclass(kw_only=True)
class EvalConfig:
    model: str = opt("Hugging Face model folder (e.g. an export) or built-in name")
    data: str = opt("JSONL (Alpaca, GSM8K or chat form) or builtin:NAME")
    max_examples: int = opt("examples to evaluate (0: all)", 256)
    batch_size: int = opt("evaluation batch size", 8)
    max_seq_len: int = opt("maximum tokens per example", 256)
    accuracy_examples: int = opt("examples with answers to score by greedy generation (0: none)", 20)
    max_new_tokens: int = opt("generation budget per answer", 256)
    threads: int = opt("torch CPU threads (0: torch's default)", 0)

    def check(self) -> None:
        _require(self.max_examples >= 0 and self.accuracy_examples >= 0, "example counts must be >= 0")
        _require(self.batch_size >= 1 and self.max_seq_len >= 8 and self.max_new_tokens >= 1,
                 "--batch-size, --max-new-tokens must be >= 1 and --max-seq-len >= 8")


@dataclass(kw_only=True)
class StatusConfig:
    coordinator: str = opt("coordinator address HOST:PORT")
    tls_ca: Path | None = opt("CA certificate (PEM) to trust for the coordinator", None)
    tls_server_name: str | None = opt("name to expect in the coordinator's certificate", None)
    insecure: bool = opt("connect without TLS", False)
    watch: float = opt("refresh the view every SECONDS until the run ends or Ctrl-C (0: show it once; "
                       "--watch alone: every 2 s)", 0.0)

    def check(self) -> None:
        _host_port(self.coordinator, "--coordinator")
        _require(self.watch >= 0 and math.isfinite(self.watch), "--watch must be a number of seconds >= 0")


@dataclass(kw_only=True)
class CallConfig:
    """How a command reaches a running coordinator (`fedblock health`, `fedblock admin`)."""

    coordinator: str = opt("coordinator address HOST:PORT")
    timeout: float = opt("seconds to wait for the answer", 30.0)
    tls_ca: Path | None = opt("CA certificate (PEM) to trust for the coordinator", None)
    tls_cert: Path | None = opt("client certificate (PEM), where the coordinator requires mutual TLS", None)
    tls_key: Path | None = opt("client private key (PEM)", None)
    tls_server_name: str | None = opt("name to expect in the coordinator's certificate", None)
    insecure: bool = opt("connect without TLS", False)

    def check(self) -> None:
        _host_port(self.coordinator, "--coordinator")
        _require(self.timeout > 0, "--timeout must be > 0")
        _require((self.tls_cert is None) == (self.tls_key is None), "--tls-cert and --tls-key go together")
        _require(not (self.insecure and (self.tls_ca or self.tls_cert)), "--insecure contradicts the --tls-* options")
        for flag, path in (("--tls-ca", self.tls_ca), ("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key)):
            _require(path is None or Path(path).is_file(), f"{flag}: no such file {path}")


@dataclass(kw_only=True)
class HealthConfig(CallConfig):
    """`fedblock health`: the standard gRPC health check, for probes (exit 0 healthy, 1 not)."""

    live: bool = opt("healthy when the server answers at all, loading included (a liveness probe); without it, "
                     "only when it accepts workers (a readiness probe)", False)
    service: str = opt("the service to ask about ('' : the server as a whole)", "")
    timeout: float = opt("seconds to wait for the answer", 5.0)


@dataclass(kw_only=True)
class AdminConfig(CallConfig):
    """`fedblock admin ACTION [ARGUMENT]`: an operator's command to a running coordinator."""

    operator: str | None = opt("your name in the coordinator's --admin-tokens file (default: your login name)", None)
    token: str | None = opt("your operator token (see the coordinator's --admin-tokens)", None)


@dataclass(kw_only=True)
class TokenConfig:
    name: str = opt("the worker the token is for")


def to_argv(config: Any, skip: frozenset[str] = frozenset()) -> list[str]:
    """Flags that rebuild `config` exactly (for child processes; flags beat inherited env variables)."""
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in skip or value is None or value is False:
            continue
        argv += [flag_name(f)] if value is True else [flag_name(f), str(value)]
    return argv
