"""Who may talk to the coordinator: TLS credentials, per-worker bearer tokens, client certificates.

A worker proves its name at Join, with a token from `--auth-tokens` and/or (with mutual TLS) a client
certificate whose common name or DNS name is the worker's name. Join then hands out a session secret
that every later call carries, so a worker can only ever act under the name it proved.

Tokens file (YAML): `site-a: <token>` or, better, `site-a: sha256:<hex of the token's SHA-256>` (what
`fedblock token site-a` prints), so the file does not hold usable secrets. The operators' file
(`--admin-tokens`, for `fedblock admin`) has the same format, operator names for worker names.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

import grpc

from .config import ConfigError, read_yaml_mapping

TOKEN_KEY = "authorization"  # gRPC metadata: "Bearer <token>"
OPERATOR_KEY = "fedblock-operator"  # gRPC metadata of an Admin call: the operator's name in --admin-tokens


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def load_tokens(path: Path, flag: str = "--auth-tokens", who: str = "worker") -> dict[str, str]:
    """{name: "sha256:<hex>"} from a tokens file (`flag` names the option, `who` what the names are);
    ConfigError names what is wrong."""
    data = read_yaml_mapping(path, flag, f"map {who} names to tokens")
    if not data:
        raise ConfigError(f"{flag}: {path} must map {who} names to tokens")
    tokens = {}
    for name, value in data.items():
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{flag}: the token of {name!r} must be a non-empty string")
        if value.startswith("sha256:"):
            digest = value.removeprefix("sha256:")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"{flag}: the hash of {name!r} is not 64 lowercase hex digits")
            tokens[str(name)] = value
        else:
            tokens[str(name)] = hash_token(value)
    return tokens


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag}: cannot read {path}: {e.strerror}") from None


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS for the coordinator; with a client CA, mutual TLS (a client certificate is required)."""
    ca = _read(client_ca, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(_read(key, "--tls-key"), _read(cert, "--tls-cert"))], root_certificates=ca, require_client_auth=ca is not None
    )


def channel_credentials(ca: Path | None, cert: Path | None, key: Path | None) -> grpc.ChannelCredentials:
    """TLS for a worker: trust `ca` (default: the system's roots); present cert/key for mutual TLS."""
    if (cert is None) != (key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--tls-ca"), private_key=_read(key, "--tls-key"), certificate_chain=_read(cert, "--tls-cert")
    )


def presented_token(metadata: dict[str, str]) -> str:
    """The hash ("sha256:<hex>") of the bearer token a call carries; "" without one."""
    presented = metadata.get(TOKEN_KEY, "")
    return hash_token(presented.removeprefix("Bearer ")) if presented.startswith("Bearer ") else ""


@dataclass(eq=False)
class Authenticator:
    """Checks that a Join comes from the worker it names (or an Admin call from the operator it names:
    `who`). Either check is optional. The token table is replaced whole (`reload`), never changed in
    place: a check reads one table from start to end."""

    tokens: dict[str, str] | None = None  # name -> "sha256:<hex>"
    bind_certificate_names: bool = False  # mutual TLS: the client certificate must name the worker
    path: Path | None = None  # the tokens file, which `reload` reads again
    flag: str = "--auth-tokens"
    who: str = "worker"

    def read(self) -> dict[str, str]:
        """The tokens file as it is now (changes nothing); ConfigError when there is none or it is not valid."""
        if self.path is None:
            raise ConfigError(f"this coordinator has no {self.flag} file to reload")
        return load_tokens(self.path, self.flag, self.who)

    def reload(self) -> dict[str, str]:
        """Read the tokens file again and use it from now on (nothing changes when it is not valid)."""
        tokens = self.read()
        self.tokens = tokens  # one reference, swapped atomically
        return tokens

    def admits(self, name: str, token_hash: str) -> bool:
        """Whether `token_hash` (see `presented_token`) is `name`'s token in the current table."""
        tokens = self.tokens
        if tokens is None:
            return True
        expected = tokens.get(name)
        return expected is not None and bool(token_hash) and hmac.compare_digest(token_hash, expected)

    def check(self, name: str, metadata: dict[str, str], context: grpc.ServicerContext) -> str | None:
        """None if the caller may act as `name`, else why not."""
        if self.tokens is not None and not self.admits(name, presented_token(metadata)):
            return f"no valid token for {self.who} {name!r}"
        if self.bind_certificate_names:
            names = certificate_names(context)
            if name not in names:
                return f"the client certificate names {sorted(names) or 'nobody'}, not {name!r}"
        return None


def certificate_names(context: grpc.ServicerContext) -> set[str]:
    """Common name and DNS names of the peer's verified client certificate."""
    auth = context.auth_context()
    values = auth.get("x509_common_name", []) + auth.get("x509_subject_alternative_name", [])
    return {v.decode() if isinstance(v, bytes) else str(v) for v in values}
