"""gRPC channel and server options shared by both ends.

Message limits are set explicitly on both sides (gRPC's 4 MiB default fails on a 4 MiB chunk plus its
header). The coordinator's follow its --chunk-size (`message_limit`); a worker opens its channel
before it learns the chunk size, so it allows the largest chunk there may be (MAX_MESSAGE_BYTES).
Keepalive pings keep the long-lived event stream open through idle NATs and let both ends notice a
dead peer.
"""

from __future__ import annotations

import grpc

MIN_CHUNK_SIZE = 1 << 10
MAX_CHUNK_SIZE = 64 << 20  # the largest --chunk-size (config.py checks against these two)
# Room for everything in a message besides a chunk's data (field tags, lengths, index, a file name:
# a few dozen bytes), and for the largest message that carries no chunk: the join reply lists every
# tensor of the model (~60 bytes each), so 1 MiB covers models with over 15 000 tensors.
MESSAGE_ALLOWANCE = 1 << 20
MAX_MESSAGE_BYTES = MAX_CHUNK_SIZE + MESSAGE_ALLOWANCE


def message_limit(chunk_size: int) -> int:
    """The gRPC message limit (send and receive) for transfers cut into `chunk_size` chunks."""
    return chunk_size + MESSAGE_ALLOWANCE

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        *_KEEPALIVE,
    ]


def server_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        *_KEEPALIVE,
    ]


def open_channel(address: str, credentials: grpc.ChannelCredentials | None = None,
                 server_name: str | None = None) -> grpc.Channel:
    """A channel to the coordinator: TLS with `credentials`, plaintext without (the caller asked for
    --insecure); `server_name` is the name expected in the coordinator's certificate."""
    options = channel_options() + ([("grpc.ssl_target_name_override", server_name)] if server_name else [])
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)
