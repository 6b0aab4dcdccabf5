"""Prometheus metrics of a running server: messages in and out, queue depths,
delivery latency, TLS share of sessions, SMTP rejects by reason.

Counters and the latency histogram are kept in memory by each worker process.
A scrape asks every worker for its samples (the ``metrics`` runtime operation)
and shows each worker's series with a ``worker`` label, so that a restarted
worker is an ordinary counter reset of its own series; ``sum without (worker)``
gives the server's figure. (prometheus_client's multiprocess mode would merge
them itself, but it checks the process id on every update: about 2 % of the
CPU per message under load.) Queue depth and open sessions are read from the
merged runtime state when scraped.
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, Metric, generate_latest
from prometheus_client.core import GaugeMetricFamily

from mailgate.queue.pressure import LEVELS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
        self._children: dict[tuple[Any, str], Any] = {}   # labels() looks its child up under a lock: once is enough

    def _child(self, metric: Any, label: str) -> Any:
        child = self._children.get((metric, label))
        if child is None:
            child = self._children[(metric, label)] = metric.labels(label)
        return child

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "received":
            self._child(self.received, data.get("connector") or "unknown").inc()
        elif kind == "delivered":
            q = data["queue"]
            self._child(self.delivered, q.delivery_type).inc(data.get("count", 1))
            self.latency.observe(max(0.0, data.get("latency", 0.0)))
        elif kind == "failed":
            self.failed.inc(data.get("count", 1))
        elif kind == "session_end":
            self._child(self.tls_sessions, "yes" if data.get("tls") else "no").inc()
        elif kind == "reject":
            self._child(self.rejects, data.get("code") or "unknown").inc()

    def samples(self, worker: int) -> dict[str, Any]:
        """This process's series, as the scrape gathers them from every worker."""
        return {"worker": worker, "samples": [[family.name, s.name, s.labels, s.value]
                                              for family in self.registry.collect() for s in family.samples]}

    def render(self, workers: list[dict[str, Any]], queues: list[Any], status: dict[str, Any]) -> bytes:
        registry = CollectorRegistry()
        registry.register(_WorkerSeries(self.registry, workers))
        registry.register(_LiveState(queues, status))
        return generate_latest(registry)


class _WorkerSeries:
    """Every worker's counters and histogram, labelled with the worker's index."""

    def __init__(self, local: CollectorRegistry, workers: list[dict[str, Any]]) -> None:
        self.local = local         # names, help and types: the same in every worker
        self.workers = sorted(workers, key=lambda w: w["worker"])

    def collect(self) -> Iterable[Metric]:
        for family in self.local.collect():
            merged = Metric(family.name, family.documentation, family.type)
            for worker in self.workers:
                for name, sample, labels, value in worker["samples"]:
                    if name == family.name:
                        merged.add_sample(sample, {**labels, "worker": str(worker["worker"])}, value)
            yield merged


class _LiveState:
    """Gauges read from the runtime at scrape time."""

    def __init__(self, queues: list[Any], status: dict[str, Any]) -> None:
        self.queues = queues
        self.sessions = status.get("sessions", 0)
        self.pressure = status.get("back_pressure")

    def collect(self) -> Iterable[GaugeMetricFamily]:
        depth = GaugeMetricFamily("mailgate_queue_messages", "Messages in each queue", labels=["queue", "delivery_type"])
        for record in self.queues:
            depth.add_metric([record["Identity"], str(record["DeliveryType"])], record["MessageCount"])
        yield depth
        yield GaugeMetricFamily("mailgate_smtp_sessions_open", "Open inbound SMTP sessions",
                                value=self.sessions)
        if self.pressure:
            yield GaugeMetricFamily("mailgate_back_pressure_level",
                                    "Back pressure on the queue disk: 0 Normal, 1 Medium (authoritative senders only), "
                                    "2 High (no new mail)", value=LEVELS.index(self.pressure["level"]))
            if self.pressure.get("used_percent") is not None:
                yield GaugeMetricFamily("mailgate_queue_disk_used_percent", "Share of the queue's disk in use",
                                        value=self.pressure["used_percent"])
