"""The `fedblock` command: coordinator, worker, simulate, export, eval, status, codec, token.

Options come from the config dataclasses (common/config.py), so each is also a YAML key and a
FEDBLOCK_* variable. Any invalid start-up input ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from .config import (
    AdminConfig,
    CodecTrainConfig,
    ConfigError,
    CoordinatorConfig,
    EvalConfig,
    ExportConfig,
    HealthConfig,
    ReportConfig,
    SimulateConfig,
    StatusConfig,
    TokenConfig,
    WorkerConfig,
    build,
    flag_name,
    load_yaml,
)

# Options `simulate` decides itself, per process.
SIMULATE_SETS_COORDINATOR = frozenset({"listen", "eval_data", "min_workers", "seed", "insecure", "tls_cert", "tls_key",
                                       "tls_client_ca", "auth_tokens"})
SIMULATE_SETS_WORKER = frozenset(
    {"coordinator", "name", "data", "seed", "metrics_port", "work_dir", "connect_timeout", "timeline", "insecure",
     "token", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "check_only"}
)

COMMANDS = {
    "coordinator": ("run the coordinator daemon", (CoordinatorConfig,)),
    "worker": ("run a worker that trains on local data", (WorkerConfig,)),
    "simulate": ("a coordinator and N workers on localhost, real gRPC", (SimulateConfig, CoordinatorConfig, WorkerConfig)),
    "export": ("write a state dir's global model as a Hugging Face folder", (ExportConfig,)),
    "eval": ("evaluate a model on a data set", (EvalConfig,)),
    "status": ("ask a running coordinator how the run goes", (StatusConfig,)),
    "report": ("PNG plots and a markdown summary of a run, from its state dir (during the run or after)",
               (ReportConfig,)),
    "codec": ("codec train: pre-train the autoencoder codec (ae:RATIO) on a run's recorded updates",
              (CodecTrainConfig,)),
    "health": ("ask the gRPC health service (for probes): exit 0 when serving", (HealthConfig,)),
    "token": ("make a worker token: the secret for the worker, the hashed line for --auth-tokens", (TokenConfig,)),
    "admin": ("an operator's command to a running coordinator: drop-worker NAME, reload-tokens, drain, set-rounds N",
              (AdminConfig,)),
}


LIGHT_COMMANDS = frozenset({"health", "admin", "token"})  # no model code: they start in a fraction of a second


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse would print the usage first)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fields(command: str) -> list[dataclasses.Field]:
    seen, out = set(), []
    for i, cls in enumerate(COMMANDS[command][1]):
        for f in dataclasses.fields(cls):
            if command == "simulate" and i == 1 and f.name in SIMULATE_SETS_COORDINATOR:
                continue
            if command == "simulate" and i == 2 and f.name in SIMULATE_SETS_WORKER:
                continue
            if f.name not in seen:
                seen.add(f.name)
                out.append(f)
    return out


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedblock", description="Federated block fine-tuning of LLMs.", allow_abbrev=False)
    parser.add_argument("--log-level", default=os.environ.get("FEDBLOCK_LOG_LEVEL", "INFO"),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command, (help_text, _) in COMMANDS.items():
        p = sub.add_parser(command, help=help_text, description=help_text, allow_abbrev=False)
        if command == "codec":
            p.add_argument("action", choices=["train"], help="what to do with the codec")
        if command == "admin":
            from .admin import ACTIONS

            p.add_argument("action", choices=list(ACTIONS), help="the command")
            p.add_argument("argument", nargs="?", help="drop-worker: the worker's name; set-rounds: the rounds in all")
        if command == "report":  # `fedblock report STATE_DIR`, the same as --state-dir
            p.add_argument("report_dir", nargs="?", default=None, metavar="STATE_DIR", help="a coordinator's --state-dir")
        p.add_argument("--config", help="YAML file with option values (flags and FEDBLOCK_* variables win)")
        for f in _fields(command):
            help_ = f.metadata.get("help", "")
            if f.default is not dataclasses.MISSING and f.default not in (None, False):
                help_ += f" (default: {f.default})"
            if f.name == "watch":  # `status --watch` alone: every 2 s
                p.add_argument(flag_name(f), dest=f.name, default=None, help=help_, nargs="?", const="2",
                               metavar="SECONDS")
                continue
            if f.type in (bool, "bool"):  # `--insecure` alone means true; `--insecure false` works too
                p.add_argument(flag_name(f), dest=f.name, default=None, help=help_, nargs="?", const="true",
                               metavar="BOOL")
                continue
            if f.metadata.get("const") is not None:
                p.add_argument(flag_name(f), dest=f.name, default=None, help=help_, metavar=f.name.upper(), nargs="?",
                               const=f.metadata["const"])
                continue
            p.add_argument(flag_name(f), dest=f.name, default=None, help=help_, metavar=f.name.upper(),
                           choices=f.metadata.get("choices"))
    return parser


def parse_configs(command: str, args: argparse.Namespace, env=None):
    """The config objects of `command` from parsed flags, env and --config."""
    flags = vars(args)
    file_values = load_yaml(args.config) if args.config else {}
    unknown = set(file_values) - {f.name for f in _fields(command)}
    if unknown:
        raise ConfigError(f"--config: unknown option {sorted(unknown)[0].replace('_', '-')!r}")
    configs = []
    for cls in COMMANDS[command][1]:
        if command == "simulate" and cls is not SimulateConfig:
            continue  # simulate builds these itself from the same values
        names = {f.name for f in dataclasses.fields(cls)}
        own = {k: v for k, v in file_values.items() if k in names}
        configs.append(build(cls, {k: v for k, v in flags.items() if k in names}, env, own))
    return configs


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded from a model hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command not in LIGHT_COMMANDS:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress and log lines say what is happening
    prog = f"fedblock {args.command}"
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args)
    except _user_errors() as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except ConnectionError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the user's input is wrong: reported as one line, exit status 2."""
    from ..server.store import StateError
    from .data import DataError
    from .models import ModelError

    return (ConfigError, DataError, ModelError, StateError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError)


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    if command == "coordinator":
        (config,) = parse_configs(command, args)
        from ..server import daemon

        summary = daemon.run(config)
        return 0 if summary["rounds_completed"] >= summary["rounds_total"] else 1  # as drain or set-rounds left it
    if command == "worker":
        (config,) = parse_configs(command, args)
        if config.check_only:
            from ..client.check import preflight

            return preflight(config)
        under = os.environ.get("LOCAL_WORLD_SIZE")  # torchrun's processes on this machine (its --nproc-per-node)
        if config.nproc_per_node > 1 and under is not None and int(under) != config.nproc_per_node:
            raise ConfigError(f"--nproc-per-node {config.nproc_per_node} under a torchrun that started {under} "
                              "processes on this machine: leave it out (or at 1) under torchrun")
        if config.nproc_per_node > 1 and under is None:
            # This process becomes torchrun (signals reach it, and it passes them on), which starts the site's
            # processes on this machine, each this same command (torchrun sets WORLD_SIZE).
            os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      f"--nproc-per-node={config.nproc_per_node}", "-m", "fedblock.common.cli",
                                      *args.argv])
        from ..client import worker

        outcome = worker.run(config)
        if outcome.error is not None:
            logging.getLogger("fedblock.worker").error("worker failed: %s", outcome.error)
            return 1
        from .messages import DROPPED, REVOKED

        if outcome.reason in (DROPPED, REVOKED):  # 0: a restart policy must not bring it back
            logging.getLogger("fedblock.worker").warning("the coordinator ended this worker's part: %s", outcome.reason)
            return 0
        if outcome.finished and outcome.reason != "finished":  # the coordinator stopped: it will resume
            logging.getLogger("fedblock.worker").error("the coordinator ended this worker's part: %s", outcome.reason)
            return 1
        return 0 if outcome.finished else 1
    if command == "simulate":
        from .simulate import simulate

        (sim,) = parse_configs(command, args)
        return simulate(sim, args)
    if command == "export":
        (config,) = parse_configs(command, args)
        from ..server.store import check_export_dir
        from .tools import export

        try:
            check_export_dir(config.out, config.state_dir)  # before the checkpoint is loaded
        except ConfigError as e:
            raise ConfigError(f"--out: {e}") from None
        print(export(config))
        return 0
    if command == "eval":
        (config,) = parse_configs(command, args)
        from .tools import evaluate

        evaluate(config)
        return 0
    if command == "status":
        (config,) = parse_configs(command, args)
        from .tools import status

        return status(config)
    if command == "report":
        if args.report_dir is not None:
            if args.state_dir is not None and args.state_dir != args.report_dir:
                raise ConfigError(f"two state dirs: {args.report_dir} and --state-dir {args.state_dir}; give one")
            args.state_dir = args.report_dir
        (config,) = parse_configs(command, args)
        from .report import write_report

        print(write_report(config))
        return 0
    if command == "codec":
        (config,) = parse_configs(command, args)
        from .tools import codec_train

        codec_train(config)
        return 0
    if command == "health":
        (config,) = parse_configs(command, args)
        from .health import health

        return health(config)
    if command == "admin":
        (config,) = parse_configs(command, args)
        from .admin import admin

        return admin(config, args.action, args.argument)
    if command == "token":
        (config,) = parse_configs(command, args)
        from .security import hash_token, new_token

        token = new_token()
        print(f"token for {config.name} (give it to the worker as --token or FEDBLOCK_TOKEN): {token}")
        print(f"line for the coordinator's --auth-tokens file:\n{config.name}: {hash_token(token)}")
        return 0
    raise AssertionError(command)


if __name__ == "__main__":
    sys.exit(main())
