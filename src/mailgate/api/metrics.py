"""Prometheus metrics of a running server: messages in and out, queue depths,
delivery latency, TLS share of sessions, SMTP rejects by reason.

Counters and the latency histogram are kept by each worker process. With several
workers the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a directory of the
data directory before it starts them, so prometheus_client's multiprocess mode
sums every worker's figures (a restarted worker's counts are kept). Queue depth
and open sessions are read from the merged runtime state when scraped.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("mailgate_messages_received", "Messages accepted, by receive connector or source",
                                ["connector"], registry=r)
        self.delivered = Counter("mailgate_messages_delivered", "Recipients delivered, by delivery type",
                                 ["delivery_type"], registry=r)
        self.failed = Counter("mailgate_recipients_failed", "Recipients that failed permanently", registry=r)
        self.latency = Histogram("mailgate_delivery_latency_seconds", "Receipt-to-delivery latency", registry=r,
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 86400))
        self.tls_sessions = Counter("mailgate_smtp_sessions", "Inbound SMTP sessions ended, by TLS use", ["tls"],
                                    registry=r)
        self.rejects = Counter("mailgate_smtp_rejects", "Inbound SMTP replies 4xx/5xx, by enhanced status code",
                               ["code"], registry=r)

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "received":
            self.received.labels(data.get("connector") or "unknown").inc()
        elif kind == "delivered":
            q = data["queue"]
            self.delivered.labels(q.delivery_type).inc(data.get("count", 1))
            self.latency.observe(max(0.0, data.get("latency", 0.0)))
        elif kind == "failed":
            self.failed.inc(data.get("count", 1))
        elif kind == "session_end":
            self.tls_sessions.labels("yes" if data.get("tls") else "no").inc()
        elif kind == "reject":
            self.rejects.labels(data.get("code") or "unknown").inc()

    def render(self, queues: list[Any], sessions: int) -> bytes:
        if os.environ.get(MULTIPROCESS_ENV):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        else:
            registry = self.registry
        text = generate_latest(registry)
        live = CollectorRegistry()
        live.register(_LiveState(queues, sessions))
        return text + generate_latest(live)


class _LiveState:
    """Gauges read from the runtime at scrape time."""

    def __init__(self, queues: list[Any], sessions: int) -> None:
        self.queues = queues
        self.sessions = sessions

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily("mailgate_queue_messages", "Messages in each queue", labels=["queue", "delivery_type"])
        for record in self.queues:
            depth.add_metric([record["Identity"], str(record["DeliveryType"])], record["MessageCount"])
        yield depth
        yield GaugeMetricFamily("mailgate_smtp_sessions_open", "Open inbound SMTP sessions", value=self.sessions)
