"""How bench/peers_bench.py evaluates every system the same way: :class:`EvalSettings`, the nprobe and efSearch
ladders, recall of a search over the queries, the calibration of the search parameter to a target recall, and
:func:`evaluate` (calibrate, recall, then time each batch size with bench.timing.measure).

Shared with bench/milvus_worker.py, which may run in a minimal virtualenv: numpy only. May use: bench.timing.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable

import numpy as np

from bench.timing import measure, recall_at_k

MILVUS_SEGMENT_ROWS = 100_000  # milvus_lite.constants.MAX_SEGMENT_ROWS (3.2.2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class EvalSettings:
    """How every (system, index) is calibrated and timed."""

    k: int = 10
    batches: tuple[int, ...] = (1, 100)
    seconds: float = 10.0
    max_requests: int = 10_000
    recall: float = 0.95  # target recall@k for IVF/HNSW calibration
    calib_queries: int = 200
    recall_seconds: float = 60.0
    min_recall_queries: int = 20

    @classmethod
    def from_dict(cls, d: dict) -> EvalSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "batches" in kw:
            kw["batches"] = tuple(kw["batches"])
        return cls(**kw)


def nprobe_ladder(nlist: int) -> list[int]:
    """1, 2, 4, … up to nlist (nlist itself last)."""
    out = [1 << i for i in range(max(1, nlist).bit_length()) if (1 << i) < nlist]
    return out + [nlist]


def ef_ladder(k: int) -> list[int]:
    return [ef for ef in (16, 32, 64, 128, 256, 512, 1024, 2048) if ef >= k] or [k]


def recall_of(search_ids: Callable[[np.ndarray], np.ndarray], xq: np.ndarray, gt: np.ndarray, chunk: int,
              budget_s: float, min_queries: int) -> tuple[float, int]:
    """recall@k of ``search_ids`` (queries -> (nq, k) int ids) over the queries, ``chunk`` per request, stopping
    early once ``budget_s`` has passed and at least ``min_queries`` were answered. Returns (recall, queries)."""
    got, done, t0 = [], 0, time.perf_counter()
    while done < len(xq):
        end = min(len(xq), done + max(1, chunk))
        got.append(np.asarray(search_ids(xq[done:end])))
        done = end
        if time.perf_counter() - t0 > budget_s and done >= min_queries:
            break
    return recall_at_k(np.concatenate(got), gt[:done]), done


def calibrate(ids_for: Callable[[int], Callable], ladder: list[int], xq: np.ndarray, gt: np.ndarray,
              st: EvalSettings, chunk: int = 100) -> tuple[int, list[dict]]:
    """The smallest value reaching ``st.recall`` on the first ``st.calib_queries`` queries: up the ladder until
    one does, then bisection between it and the last that did not, to within 1/8. Returns (value, tries); the last
    ladder value when none reaches the target."""
    nc = min(len(xq), st.calib_queries)
    tried: list[dict] = []

    def ok(v: int) -> bool:
        r, m = recall_of(ids_for(v), xq[:nc], gt[:nc], chunk, st.recall_seconds / 4, min(nc, 50))
        tried.append({"value": v, "recall": r, "queries": m})
        return r >= st.recall

    lo = None
    for v in ladder:
        if ok(v):
            hi = v
            break
        lo = v
    else:
        return ladder[-1], tried
    while lo is not None and hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi, tried


def evaluate(search_for: Callable[[int | None], Callable], ids_for: Callable[[int | None], Callable],
             ladder: list[int] | None, xq: np.ndarray, gt: np.ndarray, st: EvalSettings, label: str,
             chunk: int = 100, skip: Callable[[int], str | None] | None = None) -> dict:
    """Calibrates the search parameter (:func:`calibrate`), measures recall@k with it over the queries (as many as
    ``st.recall_seconds`` allows, at least ``st.min_recall_queries``), then QPS and latency at each batch size
    (``measure``).

    Args:
        search_for: parameter value -> function(queries) running one search request (what is timed).
        ids_for: parameter value -> function(queries) -> (nq, k) int64 ids (-1 padded).
        ladder: candidate values, increasing; None for exact indexes (no parameter).
        chunk: queries per request while measuring recall.
        skip: batch -> a reason not to time that batch size, or None.
    """
    value, tried = None, []
    if ladder:
        value, tried = calibrate(ids_for, ladder, xq, gt, st, chunk)
        steps = ", ".join(f"{t['value']}: {t['recall']:.3f}" for t in tried)
        log(f"{label}: calibrated to {value} (recall@{st.k} per value: {steps})")
    t = time.perf_counter()
    recall, nq = recall_of(ids_for(value), xq, gt, chunk, st.recall_seconds, min(len(xq), st.min_recall_queries))
    log(f"{label}: recall@{st.k} {recall:.4f} over {nq} queries ({time.perf_counter() - t:.1f}s)")
    rows = []
    for b in st.batches:
        reason = skip(b) if skip else None
        if reason:
            rows.append({"batch": b, "skipped": reason})
            log(f"{label} batch {b}: skipped: {reason}")
            continue
        r = measure(search_for(value), xq, b, st.seconds, st.max_requests)
        rows.append(r)
        log(f"{label} batch {b}: {r['qps']:.1f} QPS, p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms "
            f"({r['requests']} requests)")
    reached = value is None or any(t["value"] == value and t["recall"] >= st.recall for t in tried)
    return {"value": value, "calibration": tried, "recall": recall, "recall_queries": nq, "rows": rows,
            "target_reached": reached}
