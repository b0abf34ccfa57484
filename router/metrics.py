"""The router's side of the metrics: the controller's bucket moves as Prometheus metrics (read from the control
plane at scrape time: the controller's actor is not scraped itself), Prometheus' HTTP service discovery of the
shards' metrics endpoints, and the endpoint `lookalike serve --metrics-port` starts.

Uses prometheus_client, the base package (lookalike.metrics) and router.core.
"""

from __future__ import annotations

import logging
import weakref

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from lookalike.metrics import MetricsServer, serve_metrics
from router.core import Router

log = logging.getLogger(__name__)

SD_PATH = "/sd"  # Prometheus' http_sd_config url: http(s)://<router metrics address>/sd


class MoveCollector(Collector):
    """``lookalike_moves_{queued,done,failed}_total`` and ``lookalike_move_seconds`` of the router that serves the
    metrics (the latest one :meth:`watch` was given; one router a process)."""

    def __init__(self):
        self._router = lambda: None

    def watch(self, router: Router) -> None:
        self._router = weakref.ref(router)

    def collect(self):
        router = self._router()
        if router is None:
            return
        try:
            m = router.control.move_metrics()
        except Exception as err:  # the control plane did not answer: no move samples in this scrape
            log.debug("metrics: no move counts from the control plane: %s", err)
            return
        for what, doc in (("queued", "Bucket moves queued"), ("done", "Bucket moves finished"),
                          ("failed", "Bucket move attempts that failed and were rolled back")):
            yield CounterMetricFamily(f"lookalike_moves_{what}", f"{doc} since the controller started",
                                      value=m[what])
        secs = m["seconds"]
        yield HistogramMetricFamily("lookalike_move_seconds", "Duration of a finished bucket move, from its start "
                                    "to the source's drop", buckets=secs["buckets"], sum_value=secs["sum"])


MOVES = MoveCollector()
REGISTRY.register(MOVES)


def shard_targets(router: Router, timeout: float = 2.0) -> list[dict]:
    """Prometheus' HTTP service discovery (http_sd_config): one target group per shard that serves metrics, its
    host:port with the labels ``lookalike_role``, ``lookalike_shard_id`` and ``lookalike_node``."""
    out = []
    for info, st in router.shard_stats(timeout):
        if st is not None and st.metrics_address:
            out.append({"targets": [st.metrics_address],
                        "labels": {"lookalike_role": "shard", "lookalike_shard_id": info.shard_id,
                                   "lookalike_node": info.node}})
    return out


def serve_router_metrics(router: Router, host: str, port: int, tls=None) -> MetricsServer:
    """The router's metrics endpoint: the process registry at /metrics, the shards' targets at :data:`SD_PATH`
    (lookalike.metrics.serve_metrics: loopback, or TLS with client certificates)."""
    MOVES.watch(router)
    return serve_metrics(host, port, tls, routes={SD_PATH: lambda: shard_targets(router)})
