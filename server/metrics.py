"""The coordinator's Prometheus metrics (README, Metrics), on a registry of its own.

Labels stay bounded: `phase`, `status`, `reason` and `kind` take a few fixed values, and `worker` the
names of the registry (a run's workers), never one series per chunk, round or update."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..common.metrics import SECONDS, add_process_metrics

PHASES = ("assignment", "training", "upload", "aggregation", "checkpoint", "download")
STATES = ("waiting", "running", "finished", "stopped")


class CoordinatorMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        add_process_metrics(r)
        self.round = Gauge("fedblock_round", "Round currently open (0 before the first)", registry=r)
        self.rounds_completed = Counter("fedblock_rounds_completed", "Rounds closed and aggregated", registry=r)
        self.rounds_target = Gauge("fedblock_rounds_target", "Rounds the run does in all (--rounds, or as an operator set it)",
                                   registry=r)
        self.round_duration = Histogram(
            "fedblock_round_duration_seconds", "Time from a round's start to its close", buckets=SECONDS, registry=r
        )
        self.round_started = Gauge("fedblock_round_started_timestamp_seconds", "When the round open now started (Unix time)",
                                   registry=r)
        self.phase_seconds = Histogram(
            "fedblock_round_phase_seconds",
            "Duration of the phases of a round: planning and sending its assignments, a worker's training (as it "
            "reports it), receiving one update, aggregating the round, writing its checkpoint, one worker's model sync",
            ["phase"], buckets=SECONDS, registry=r,
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
            "fedblock_aggregation_duration_seconds", "Time to fold one update into the running sum", buckets=SECONDS, registry=r
        )
        self.checkpoint_duration = Histogram(
            "fedblock_checkpoint_duration_seconds", "Time to write one checkpoint", buckets=SECONDS, registry=r
        )
        self.eval_loss = Gauge("fedblock_eval_loss", "Held-out loss of the global model at the last evaluation", registry=r)
        self.joins_refused = Counter("fedblock_joins_refused", "Join attempts refused (bad token or certificate)", registry=r)
        self.model_version = Gauge("fedblock_model_version", "Rounds completed (global model version)", registry=r)
        self.run_state = Gauge("fedblock_run_state", "1 for the run's state now, 0 for the others", ["state"], registry=r)
        self.peer_connected = Gauge("fedblock_peer_connected", "1 while the worker has a live session", ["worker"], registry=r)
        self.peer_local_steps = Gauge("fedblock_peer_local_steps", "Local steps the worker reported in its last heartbeat",
                                      ["worker"], registry=r)
        self.peer_updates_accepted = Counter("fedblock_peer_updates_accepted", "Updates accepted from the worker",
                                             ["worker"], registry=r)
        self.peer_last_seen = Gauge("fedblock_peer_last_seen_timestamp_seconds", "When the worker was last heard from (Unix time)",
                                    ["worker"], registry=r)
        for phase in PHASES:  # every series exists from the start (a rate() over a missing one is no data)
            self.phase_seconds.labels(phase)
        self.set_state("waiting")

    def set_state(self, state: str) -> None:
        for s in STATES:
            self.run_state.labels(s).set(1 if s == state else 0)
