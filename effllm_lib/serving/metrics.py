"""Prometheus metrics of the vision server (prometheus-client), kept in the HTTP process and served at
``GET /metrics`` in the text exposition format.

Everything is observed where the HTTP process sees it: admission and rejections in the request guard,
per-stage latencies from the stamps each reply carries (``profiler.STAMPS``: the worker stamps on the same
CLOCK_MONOTONIC time line), so the inference workers need no metrics of their own. With several API
server processes (``api_servers > 1``) each keeps its own counts and a scrape sees one of them.

* ``effllm_request_stage_seconds{stage}``    histogram of each server-side stage of a successful request
* ``effllm_batch_size``                      histogram of the batch each successful request ran in
* ``effllm_requests_in_flight``              gauge: admitted requests not yet answered (the queue depth)
* ``effllm_queued_bytes``                    gauge: declared body bytes of the requests in flight
* ``effllm_requests_rejected_total{cause}``  counter of requests answered with an error, by cause
* ``effllm_requests_total{code}``            counter of answered /predict requests by HTTP status
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the endpoint)

# server-side stages: consecutive stamps from "received" (body in the HTTP process) to "postprocessed",
# plus "respond" (postprocessed -> reply handed back to the HTTP process) and "server_total"
SERVER_STAGES = {"queue": ("received", "dequeued"), "decode": ("dequeued", "decoded"),
                 "resize": ("decoded", "resized"), "normalize": ("resized", "normalized"),
                 "batch_wait": ("normalized", "batched"), "h2d": ("batched", "copied"),
                 "inference": ("copied", "inferred"), "postprocess": ("inferred", "postprocessed")}
# 0.5 ms .. ~33 s, doubling: spans of tiny models on a GPU to large photos queued on a busy CPU
LATENCY_BUCKETS = tuple(0.0005 * 2 ** k for k in range(17))
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


class ServerMetrics:
    """The server's metrics in their own registry (so tests can make several without clashes)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage = Histogram("effllm_request_stage_seconds", "Server-side latency of each stage of a "
                               "successful request", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("effllm_batch_size", "Batch size each successful request ran in",
                               buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge("effllm_requests_in_flight", "Admitted /predict requests not yet answered",
                               registry=r)
        self.queued_bytes = Gauge("effllm_queued_bytes", "Declared body bytes of the requests in flight",
                                  registry=r)
        self.rejected = Counter("effllm_requests_rejected", "Requests answered with an error, by cause",
                                ["cause"], registry=r)
        self.answered = Counter("effllm_requests", "Answered /predict requests by HTTP status", ["code"],
                                registry=r)

    def observe_reply(self, stamps: dict, batch_size: int | None, responded: float) -> None:
        for stage, (a, b) in SERVER_STAGES.items():
            if a in stamps and b in stamps:
                self.stage.labels(stage).observe(max(0.0, stamps[b] - stamps[a]))
        if "postprocessed" in stamps:
            self.stage.labels("respond").observe(max(0.0, responded - stamps["postprocessed"]))
        if "received" in stamps:
            self.stage.labels("server_total").observe(max(0.0, responded - stamps["received"]))
        if batch_size:
            self.batch.observe(batch_size)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} of an exposition (prometheus-client's own parser): what a
    scraper would read, for tests and benchmarks."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
