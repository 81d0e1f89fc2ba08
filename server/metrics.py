"""The coordinator's Prometheus metrics (README, Metrics), on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class CoordinatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.round = Gauge("fedblock_round", "Round currently open (0 before the first)", registry=r)
        self.rounds_completed = Counter("fedblock_rounds_completed", "Rounds closed and aggregated", registry=r)
        self.round_duration = Histogram(
            "fedblock_round_duration_seconds", "Time from a round's start to its close", buckets=_SECONDS, registry=r
        )
        self.workers_connected = Gauge("fedblock_workers_connected", "Workers with a live session", registry=r)
        self.updates = Counter(
            "fedblock_updates", "Block updates by outcome", ["status", "reason"], registry=r
        )
        self.bytes_received = Counter(
            "fedblock_bytes_received", "Wire bytes received (serialized messages + gRPC framing)", ["kind"], registry=r
        )
        self.bytes_sent = Counter(
            "fedblock_bytes_sent", "Wire bytes sent (serialized messages + gRPC framing)", ["kind"], registry=r
        )
        self.aggregation_duration = Histogram(
            "fedblock_aggregation_duration_seconds", "Time to fold one update into the running sum", buckets=_SECONDS, registry=r
        )
        self.checkpoint_duration = Histogram(
            "fedblock_checkpoint_duration_seconds", "Time to write one checkpoint", buckets=_SECONDS, registry=r
        )
        self.eval_loss = Gauge("fedblock_eval_loss", "Held-out loss of the global model at the last evaluation", registry=r)
        self.joins_refused = Counter("fedblock_joins_refused", "Join attempts refused (bad token or certificate)", registry=r)
        self.model_version = Gauge("fedblock_model_version", "Rounds completed (global model version)", registry=r)
