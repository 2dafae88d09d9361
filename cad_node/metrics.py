"""Prometheus metrics of the node (prometheus-client).

Counter incremented in-process (receiver):

``cad_node_jobs_created_total``
    Jobs created from "study complete" hand-offs.

Metrics collected at scrape time from the spool index and the job table (so
they are right whichever process -- receiver or worker -- did the work, and
survive restarts):

``cad_node_instances_received_total``
    Instances durably stored by the SCP (spool index).

``cad_node_jobs``
    Jobs by ``state``.
``cad_node_turnaround_seconds``
    Histogram of study-complete -> last result acknowledged, over sent jobs.
``cad_node_send_failures_total``
    Failed send attempts (retryable and permanent) recorded in the timeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from cad_node.jobs.states import JobState
from cad_node.jobs.store import JobStore

__all__ = [
    "JOBS_CREATED",
    "TURNAROUND_BUCKETS_S",
    "JobTableCollector",
    "start_metrics_server",
]

JOBS_CREATED = Counter("cad_node_jobs_created", "Jobs created from study-complete hand-offs.")
#: Turnaround histogram buckets (seconds).
TURNAROUND_BUCKETS_S = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class JobTableCollector(Collector):
    """Collects instances received, job states, the turnaround histogram and send failures.

    Parameters
    ----------
    store : JobStore
        The job table.
    instances : callable, optional
        Returns the number of instances stored by the SCP (the spool index).
    """

    def __init__(self, store: JobStore, instances: Callable[[], int] | None = None) -> None:
        self.store = store
        self.instances = instances

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (read from the spool index and the job table)."""
        if self.instances is not None:
            received = CounterMetricFamily("cad_node_instances_received",
                                           "Instances durably stored by the SCP.")
            received.add_metric([], float(self.instances()))
            yield received
        gauge = GaugeMetricFamily("cad_node_jobs", "Jobs by state.", labels=["state"])
        for state, n in self.store.count_by_state().items():
            gauge.add_metric([state.value], n)
        yield gauge
        from cad_node.jobs.routing import not_routed_reason

        not_routed = GaugeMetricFamily("cad_node_jobs_not_routed",
                                       "Jobs no routing rule matched (state failed).")
        not_routed.add_metric([], float(sum(
            1 for j in self.store.list_jobs(states=[JobState.FAILED], limit=None)
            if not_routed_reason(j.error) is not None and j.superseded_by is None)))
        yield not_routed
        turnarounds = [j.turnaround_s for j in self.store.list_jobs(states=[JobState.SENT],
                                                                    limit=None)]
        values = [t for t in turnarounds if t is not None]
        buckets = [(str(b), float(sum(1 for v in values if v <= b)))
                   for b in TURNAROUND_BUCKETS_S]
        buckets.append(("+Inf", float(len(values))))
        hist = HistogramMetricFamily("cad_node_turnaround_seconds",
                                     "Study complete to last result acknowledged.")
        hist.add_metric([], buckets, sum_value=float(sum(values)))
        yield hist
        failures = CounterMetricFamily("cad_node_send_failures",
                                       "Failed send attempts by resulting state.",
                                       labels=["state"])
        for state, n in self.store.send_failure_counts().items():
            failures.add_metric([state.value], float(n))
        yield failures


def start_metrics_server(store: JobStore, host: str, port: int,
                         registry: CollectorRegistry = REGISTRY,
                         instances: Callable[[], int] | None = None) -> Any:
    """Register the job-table collector and serve ``/metrics`` on ``host:port``.

    Returns
    -------
    server
        The HTTP server (``server.shutdown()`` stops it); it runs in a daemon thread.
    """
    registry.register(JobTableCollector(store, instances))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
