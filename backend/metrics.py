"""Prometheus metrics, one registry per app (so tests can run several apps in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

_FAST = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Histogram(
            "sam_request_seconds", "HTTP request latency by route and status", ["route", "status"], registry=r, buckets=_FAST
        )
        self.cache = Counter("sam_embedding_cache", "Embedding cache lookups by result", ["result"], registry=r)
        self.cache_bytes = Histogram(
            "sam_embedding_cache_entry_bytes", "Size of a stored embedding", registry=r,
            buckets=(2.5e5, 5e5, 7.5e5, 1e6, 1.2e6, 1.5e6, 2e6, 4e6),
        )
        self.redis_errors = Counter("sam_redis_errors", "Redis calls that failed (clicks went on uncached)", registry=r)
        self.encoder = Histogram("sam_encoder_seconds", "SAM image encoder time", registry=r, buckets=_FAST)
        self.decoder = Histogram("sam_decoder_seconds", "SAM mask decoder time", registry=r, buckets=_FAST)
        self.output = Histogram(
            "sam_output_seconds", "Mask to Label Studio region time by kind", ["kind"], registry=r, buckets=_FAST
        )
        self.image_fetch = Histogram("sam_image_fetch_seconds", "Image download time", registry=r, buckets=_FAST)
        self.webhooks = Counter("sam_webhooks", "Webhooks received by action", ["action"], registry=r)
        self.warm_jobs = Counter("sam_warm_jobs", "Background embedding jobs by state", ["result"], registry=r)
        self.prelabel_jobs = Counter("sam_prelabel_jobs", "Pre-label jobs by state", ["result"], registry=r)
        self.head_load_errors = Counter("sam_head_load_errors", "Refinement heads refused (corrupt or incompatible)",
                                        registry=r)
        self.head_seconds = Histogram("sam_head_seconds", "Refinement head time per mask", registry=r, buckets=_FAST)
        self.train_jobs = Counter("sam_train_jobs", "Training jobs queued, by trigger", ["trigger"], registry=r)
        self.zoom_answers = Counter("sam_zoom_answers", "Masks by the path that made them (whole image, zoom "
                                    "windows, whole image with edge windows)", ["path"], registry=r)
        self.zoom_windows = Histogram("sam_zoom_windows", "Windows decoded for one zoomed mask", registry=r,
                                      buckets=(1, 2, 4, 8, 16, 32, 64))
        self.window_encodes = Counter("sam_window_encodes", "Zoom windows embedded (cache misses)", registry=r)

    def watch_queues(self, read) -> None:
        """Export job counts per queue and state, read from Redis at scrape time: the same numbers
        `sam-backend warm|prelabel --wait` shows, whichever machine runs the workers."""
        self.registry.register(_QueueCollector(read))

    def watch_acceptance(self, read) -> None:
        """How much annotators changed our drafts, per project and model version (read from Redis)."""
        self.registry.register(_AcceptanceCollector(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _QueueCollector:
    def __init__(self, read):
        self.read = read  # () -> {queue: {state: count}}, or {} when Redis is unreachable

    def collect(self):
        family = GaugeMetricFamily("sam_jobs", "Background jobs by queue and state", labels=["queue", "state"])
        for queue, states in self.read().items():
            for state, count in states.items():
                family.add_metric([queue, state], count)
        yield family


class _AcceptanceCollector:
    def __init__(self, read):
        self.read = read  # () -> [{"project", "model_version", "corrections", "mean_iou", "unchanged"}]

    def collect(self):
        labels = ["project", "model_version"]
        count = GaugeMetricFamily("sam_draft_corrections", "Submitted annotations made from our drafts", labels=labels)
        iou = GaugeMetricFamily("sam_draft_iou", "Mean IoU between our draft and what the annotator submitted",
                                labels=labels)
        unchanged = GaugeMetricFamily("sam_draft_unchanged_ratio", "Share of drafts submitted with IoU >= 0.95",
                                      labels=labels)
        for row in self.read():
            key = [str(row["project"]), row["model_version"]]
            count.add_metric(key, row["corrections"])
            iou.add_metric(key, row["mean_iou"])
            unchanged.add_metric(key, row["unchanged"])
        yield from (count, iou, unchanged)
