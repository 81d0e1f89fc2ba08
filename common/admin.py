"""`fedblock admin ACTION [ARGUMENT]`: an operator's command to a running coordinator (README, Operations).

The call carries the operator's name (`fedblock-operator`) and token (`authorization: Bearer`), which the
coordinator checks against its --admin-tokens file. Exit status 0: done (the coordinator's answer is
printed); 1: refused or unreachable (the reason is printed); 2: a wrong command line.
"""

from __future__ import annotations

import getpass
import sys

from .config import AdminConfig, ConfigError

# command -> its argument (None: none)
ACTIONS = {"drop-worker": "NAME", "reload-tokens": None, "drain": None, "set-rounds": "N"}


def request(action: str, argument: str | None):
    """The AdminRequest of a command line; ConfigError for a wrong one."""
    from .pb import coordinator_pb2 as pb

    wants = ACTIONS.get(action, "")
    if wants == "":
        raise ConfigError(f"unknown command {action!r}: one of {', '.join(ACTIONS)}")
    if wants is None and argument is not None:
        raise ConfigError(f"{action} takes no argument")
    if wants is not None and argument is None:
        raise ConfigError(f"{action} needs {wants}")
    if action == "drop-worker":
        return pb.AdminRequest(drop_worker=argument)
    if action == "set-rounds":
        try:
            rounds = int(argument)
        except ValueError:
            raise ConfigError(f"set-rounds: N must be a whole number, got {argument!r}") from None
        if not 0 <= rounds < 2**32:
            raise ConfigError(f"set-rounds: N must be >= 0, got {rounds}")
        return pb.AdminRequest(set_rounds=rounds)
    return pb.AdminRequest(**{action.replace("-", "_"): True})


def operator_name(config: AdminConfig) -> str:
    if config.operator:
        return config.operator
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name (a container without a passwd entry)
        raise ConfigError("--operator is required (no login name to default to)") from None


def admin(config: AdminConfig, action: str, argument: str | None, out=print) -> int:
    import grpc

    from .pb import coordinator_pb2_grpc as pb_grpc
    from .rpc import open_channel
    from .security import OPERATOR_KEY, TOKEN_KEY, channel_credentials

    message = request(action, argument)
    metadata = [(OPERATOR_KEY, operator_name(config))]
    if config.token:
        metadata.append((TOKEN_KEY, f"Bearer {config.token}"))
    credentials = None if config.insecure else channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
    with open_channel(config.coordinator, credentials, config.tls_server_name) as channel:
        try:
            reply = pb_grpc.CoordinatorStub(channel).Admin(message, metadata=metadata, timeout=config.timeout)
        except grpc.RpcError as e:
            print(f"fedblock admin {action}: error: {config.coordinator}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    out(reply.result)
    return 0
