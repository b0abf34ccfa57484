"""``lookalike loadtest``: load a running cluster with searches, upserts and deletes, and report what it did.

Two ways to drive it:

- **open loop** (``--rate R``): every request's send time is fixed in advance (evenly spaced, or a Poisson
  process with ``--arrivals poisson``), whatever the server does; a request's latency runs from its *scheduled*
  time, so a server that falls behind shows its queueing as latency instead of silently lowering the rate
  (the "coordinated omission" of closed-loop testers). The report says how late requests left (``send lag``):
  large lag means the load generator itself could not keep up.
- **closed loop** (``--concurrency C``): C requests in flight at all times, each sent when the previous one of
  its slot finished; latency from the send.

Both stop by themselves: after ``--duration`` seconds or ``--requests`` requests, whichever comes first, then
wait at most ``--timeout`` for the requests still in flight.

The load comes from ``--processes`` worker processes (each an asyncio gRPC client), so one Python process is not
the bottleneck; the rate and the concurrency are split between them. Requests are a mix of searches, upserts and
deletes (``--mix search=0.9,upsert=0.08,delete=0.02``). Queries come from ``--queries FILE.npy``, or are rows of
``--data FILE.npy`` (the vectors that were loaded) plus Gaussian noise of ``--noise`` times the data's standard
deviation (flipped bits for hamming codes), or, without either, stored vectors fetched with Get (ids ``0..n-1``,
the default of ``lookalike upsert``). Upserts write new ids ``loadtest-<run>-...`` with random vectors drawn from
the data's per-dimension mean and deviation; deletes remove ids the same run wrote earlier (or, before any, ids
that do not exist). At the end the run deletes what it wrote (``--keep-writes`` keeps it).

Recall@k: with ``--data`` (and ``--ids`` when the data was loaded with its own ids), the first
``--recall-sample`` distinct queries of the run are checked against exact search (FAISS flat, the collection's
metric) over the data; ids the run wrote itself are left out of the returned lists before comparing. Before the
run, a few of those ids (the row numbers without ``--ids``) are looked up with Get: when any is not stored, the
collection holds the data under other ids, and recall is reported as not measured, saying why (``--ids FILE``),
instead of as 0.

Server-side latency: with ``--metrics-url URL`` (the router's /metrics, ``serve --metrics-port``), the router's
latency histograms are read before and after the run, and the report shows what the requests took inside the
router (p50/p90/p99 estimated from the histogram's buckets, bench.loadtest.server_side) beside what the clients
saw: the difference is the network, the client and queueing before the router.

Report: achieved rate, p50/p90/p99/p99.9 latency (all requests and per kind), errors by status code, send lag,
recall@k, a per-second timeline; printed, written as JSON (``--out``) and drawn as a PNG (``--plot``: latency over
time and its distribution; needs matplotlib, ``pip install 'lookalike[plot]'``).
"""

from __future__ import annotations

import uuid

import numpy as np

from bench.loadtest.config import OPS, LoadConfig, WorkerInput, open_schedule, parse_mix
from bench.loadtest.inputs import fetch_stored, prepare, recall_ids_problem
from bench.loadtest.report import (compute_recall, exact_knn, format_report, merge_records, percentile, plot, save,
                                   summarize)
from bench.loadtest.server_side import read_metrics, server_latency
from bench.loadtest.worker import run_workers

__all__ = ["OPS", "LoadConfig", "WorkerInput", "compute_recall", "exact_knn", "fetch_stored", "format_report",
           "merge_records", "open_schedule", "parse_mix", "percentile", "plot", "prepare", "read_metrics", "recall_ids_problem",
           "run", "run_workers", "save", "server_latency", "summarize"]


def run(cfg: LoadConfig, queries: np.ndarray, write_mean: np.ndarray, write_std: np.ndarray,
        data: np.ndarray | None = None, data_ids: list[str] | None = None, metric: str = "l2",
        show_progress: bool = True, recall_off: str | None = None) -> tuple[dict, dict]:
    """Runs a load test; returns (report, merged records). ``recall_off``: why recall cannot be measured against
    ``data`` (see :func:`recall_ids_problem`), reported instead of a number."""
    cfg.check()
    if not cfg.run_id:
        cfg.run_id = uuid.uuid4().hex[:8]
    inputs = [WorkerInput(cfg, w, queries, write_mean, write_std) for w in range(cfg.processes)]
    records = run_workers(inputs, show_progress)
    rec = merge_records(records)
    recall = None
    if cfg.mix.get("search", 0) > 0 and cfg.recall_sample > 0:
        if data is None or recall_off:
            recall = {"k": cfg.k, "queries": 0, "recall_at_k": None,
                      "why": recall_off or "not measured: give --data (the vectors loaded) for exact search"}
        else:
            recall = compute_recall(rec["recall"], data, data_ids, queries, metric, cfg.k, f"loadtest-{cfg.run_id}-")
    return summarize(rec, cfg, recall), rec
