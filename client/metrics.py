"""The worker's Prometheus metrics (README, Metrics), on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.local_steps = Counter("fedblock_worker_local_steps", "Optimiser steps taken", registry=r)
        self.train_loss = Gauge("fedblock_worker_train_loss", "Loss of the last training step", registry=r)
        self.compute_seconds = Counter("fedblock_worker_compute_seconds", "Time the compute thread spent training", registry=r)
        self.comm_seconds = Counter("fedblock_worker_comm_seconds", "Time the communication thread spent uploading or downloading", registry=r)
        self.compute_idle_seconds = Counter(
            "fedblock_worker_compute_idle_seconds", "Time the compute thread waited on communication", registry=r
        )
        self.bytes_sent = Counter("fedblock_worker_bytes_sent", "Wire bytes sent (serialized messages + gRPC framing)", ["kind"], registry=r)
        self.bytes_received = Counter(
            "fedblock_worker_bytes_received", "Wire bytes received (serialized messages + gRPC framing)", ["kind"], registry=r
        )
        self.rounds = Counter("fedblock_worker_rounds", "Rounds trained and handed over", registry=r)
        self.rounds_ahead = Counter(
            "fedblock_worker_rounds_ahead", "Rounds started before the global model they build on arrived (ParaBlock overlap)", registry=r
        )
        self.model_version = Gauge("fedblock_worker_model_version", "Global model version held", registry=r)
