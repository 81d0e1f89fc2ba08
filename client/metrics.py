"""The worker's Prometheus metrics (README, Metrics), on a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..common.metrics import SECONDS, add_process_metrics

PHASES = ("training", "idle", "upload", "download")


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        add_process_metrics(r)
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
        self.phase_seconds = Histogram(
            "fedblock_worker_phase_seconds",
            "Duration of a task's phases: training its local steps, the compute thread's wait before it (idle), "
            "uploading an update, one model sync (download)", ["phase"], buckets=SECONDS, registry=r,
        )
        for phase in PHASES:  # every series exists from the start (a rate() over a missing one is no data)
            self.phase_seconds.labels(phase)
