"""gRPC message limits follow the chunk size: the largest chunk message fits on both ends, and a
coordinator takes no message much larger than its own --chunk-size."""

from concurrent import futures

import grpc
import pytest

from fedblock.client.session import Session
from fedblock.common import wire
from fedblock.common.config import ConfigError, CoordinatorConfig
from fedblock.common.pb import coordinator_pb2 as pb
from fedblock.common.rpc import (
    MAX_CHUNK_SIZE,
    MAX_MESSAGE_BYTES,
    MESSAGE_ALLOWANCE,
    channel_options,
    message_limit,
    server_options,
)

LAST_INDEX = 2**32 - 1  # Chunk.index is a uint32: the longest varint


def largest_chunk_message(chunk_size: int, field: int = wire.UPLOAD_CHUNK_FIELD) -> bytes:
    return wire.encode_chunk_message(field, LAST_INDEX, memoryview(bytearray(chunk_size)))


@pytest.mark.parametrize("chunk_size", [1 << 10, 1 << 20, MAX_CHUNK_SIZE])
def test_every_message_of_a_transfer_fits_its_limit(chunk_size):
    limit = message_limit(chunk_size)
    for field in (wire.UPLOAD_CHUNK_FIELD, wire.DOWNLOAD_CHUNK_FIELD):
        assert chunk_size < len(largest_chunk_message(chunk_size, field)) <= limit
    file_chunk = pb.FileChunk(name="n" * 255, offset=2**64 - 1, data=bytes(chunk_size))  # FetchModelFiles
    assert file_chunk.ByteSize() <= limit
    assert limit <= MAX_MESSAGE_BYTES  # what a worker's channel allows before it knows the chunk size


def test_the_largest_chunk_size_is_the_configs():
    CoordinatorConfig(model="m", state_dir="s", insecure=True, chunk_size=MAX_CHUNK_SIZE).check()
    with pytest.raises(ConfigError, match="--chunk-size"):
        CoordinatorConfig(model="m", state_dir="s", insecure=True, chunk_size=MAX_CHUNK_SIZE + 1).check()
    assert MAX_MESSAGE_BYTES == MAX_CHUNK_SIZE + MESSAGE_ALLOWANCE


def test_a_largest_chunk_message_crosses_loopback_both_ways():
    """Through the options themselves: an echo service with the coordinator's options for the largest
    chunk size, and a channel with the worker's."""
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=server_options(message_limit(MAX_CHUNK_SIZE)))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Echo": echo}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
            message = largest_chunk_message(MAX_CHUNK_SIZE)
            assert channel.unary_unary("/test.Echo/Echo")(message, timeout=60) == message
    finally:
        server.stop(0)


def joined(fed) -> Session:
    session = Session(fed.address, "w1")
    session.join(num_examples=1, device="cpu", timeout=30)
    return session


def test_a_coordinator_with_the_largest_chunk_size_takes_a_largest_chunk(federation):
    fed = federation(chunk_size=MAX_CHUNK_SIZE)
    session = joined(fed)
    try:  # the message passes both limits and reaches the handler, which wants a header first
        with pytest.raises(grpc.RpcError) as error:
            session._upload(iter([largest_chunk_message(MAX_CHUNK_SIZE)]), metadata=session._metadata, timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    finally:
        session.close()


def test_a_coordinator_with_the_largest_chunk_size_sends_a_largest_chunk(federation):
    fed = federation(chunk_size=MAX_CHUNK_SIZE)
    (fed.coordinator.store.model_dir / "big.bin").write_bytes(bytes(MAX_CHUNK_SIZE))  # one full chunk to fetch
    session = joined(fed)
    try:
        replies = session.stub.FetchModelFiles(pb.ModelFilesRequest(), metadata=session._metadata, timeout=60)
        assert [len(m.data) for m in replies if m.name == "big.bin"] == [MAX_CHUNK_SIZE]
    finally:
        session.close()


def test_a_coordinator_takes_no_message_beyond_its_chunk_size_and_allowance(federation):
    fed = federation(chunk_size=1 << 20)
    session = joined(fed)
    try:
        too_large = wire.encode_chunk_message(wire.UPLOAD_CHUNK_FIELD, 0, bytes(message_limit(1 << 20)))
        with pytest.raises(grpc.RpcError) as error:
            session._upload(iter([too_large]), metadata=session._metadata, timeout=60)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        session.close()
