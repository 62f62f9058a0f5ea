"""Prometheus metrics of the service, one registry per app (so tests can build many apps).

Owns: request and inference latency histograms, batch sizes, queue depth, verdict counters per line
and model version, what the frame retention pass deleted, and the `/metrics` exposition.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_seconds = Histogram(
            "pvqc_request_seconds",
            "HTTP request latency by route template and status",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "pvqc_inference_seconds",
            "seconds per onnxruntime batch call",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_cells = Histogram(
            "pvqc_batch_cells",
            "model inputs per onnxruntime call (a half cell is two)",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_cells = Gauge(
            "pvqc_queue_cells",
            "model inputs waiting for inference (a half cell is two)",
            registry=self.registry,
        )
        self.verdicts = Counter(
            "pvqc_verdicts",
            "stored inspections by line, kind, verdict and model version",
            ["line", "kind", "verdict", "model_version"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "pvqc_rejected_requests",
            "requests answered without a verdict, by reason (image, queue_full, too_large, model_output)",
            ["reason"],
            registry=self.registry,
        )

        # the exposition appends _total: pvqc_frames_pruned_total, pvqc_frames_pruned_bytes_total
        self.frames_pruned = Counter(
            "pvqc_frames_pruned",
            "frame files deleted by the retention policy (PVQC_FRAME_RETENTION_DAYS)",
            registry=self.registry,
        )
        self.frames_pruned_bytes = Counter(
            "pvqc_frames_pruned_bytes",
            "bytes of frame files deleted by the retention policy",
            registry=self.registry,
        )

    def observe_batch(self, cells: int, seconds: float) -> None:
        self.batch_cells.observe(cells)
        self.inference_seconds.observe(seconds)

    def observe_pruned(self, frames: int, size: int) -> None:
        self.frames_pruned.inc(frames)
        self.frames_pruned_bytes.inc(size)

    def track_queue(self, pending: Callable[[], int]) -> None:
        self.queue_cells.set_function(lambda: float(pending()))
