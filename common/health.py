"""`fedblock health`: the probes' client of the coordinator's standard gRPC health service. It imports
neither torch nor transformers, so that a probe costs a fraction of a second."""

from __future__ import annotations

from .config import HealthConfig


def health(config: HealthConfig) -> int:
    """0 when the coordinator's health service says SERVING (with --live: answers at all), else 1."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .rpc import open_channel
    from .security import channel_credentials

    credentials = None if config.insecure else channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
    with open_channel(config.coordinator, credentials, config.tls_server_name) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=config.service),
                                                              timeout=config.timeout)
        except grpc.RpcError as e:
            print(f"{config.coordinator}: {e.code().name}: {e.details()}")
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{config.coordinator}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING or config.live else 1
