"""Prometheus plumbing shared by both sides: a registry per process role, served on /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# Histogram buckets for durations: from a coordinator's millisecond bookkeeping to an hour-long round.
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def add_process_metrics(registry: CollectorRegistry) -> None:
    """process_* (CPU seconds, resident memory, open fds, start time), python_info and python_gc_*."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0"):
    """Serve `registry` at http://addr:port/metrics; returns (server, thread) so it can be shut down."""
    return start_http_server(port, addr=addr, registry=registry)
