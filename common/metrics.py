"""Prometheus plumbing shared by both sides: a registry per process role, served on /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0"):
    """Serve `registry` at http://addr:port/metrics; returns (server, thread) so it can be shut down."""
    return start_http_server(port, addr=addr, registry=registry)
