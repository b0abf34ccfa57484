"""The cluster and in-process FAISS measured in turns (``scale_bench --turns R``).

This machine's speed moves by up to half within an hour (docs/BENCHMARKS.md, "What a load leaves in a process of 8
shards"), and the scale benchmark measures FAISS and the cluster minutes apart, up to half an hour: two FAISS
indexes of one spec and one recall, measured 25 minutes apart in one run, gave 2,047 and 3,381 QPS. A ratio of two
such figures carries the drift. In turns, both are up at once (FAISS in this process, the cluster idle while FAISS
searches and the other way round), and each of R rounds is a window of the cluster at its fastest setting, then a
window of FAISS at its own: each round's ratio is of two windows seconds apart. The median round is the figure;
the lowest and highest say how far the rounds spread.

May use: bench.timing and FAISS (the in-process side).
"""

from __future__ import annotations

import statistics

import numpy as np

from bench.timing import measure


def fastest(qps_by_setting: dict) -> str:
    """The setting (a key of ``qps_by_setting``: a measure() result each) with the highest QPS."""
    return max(qps_by_setting, key=lambda s: qps_by_setting[s]["qps"])


def faiss_setting(idx, measured: dict) -> tuple[int, int]:
    """Puts ``idx`` in the state one of bench.scale_faiss's measurements ran in (IVF-PQ with or without its
    precomputed tables: ``precomputed_table``). Returns that measurement's (FAISS threads a caller, callers)."""
    import faiss  # deferred: the scale benchmark imports FAISS only where it builds indexes

    mode = measured.get("precomputed_table")
    if mode is not None:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(idx))
        if ivf.use_precomputed_table != mode:
            ivf.use_precomputed_table = mode
            ivf.precompute_table()
    return measured["faiss_threads"], measured["concurrency"]


def in_turns(cluster_search, cluster_callers: int, faiss_search, faiss_threads: int, faiss_callers: int,
             xq: np.ndarray, batch: int, seconds: float, max_requests: int, rounds: int,
             set_threads=None) -> dict:
    """``rounds`` rounds of a window of ``cluster_search`` (from ``cluster_callers`` callers) then one of
    ``faiss_search`` (``faiss_callers`` callers of ``faiss_threads`` FAISS threads each, set by ``set_threads(n)``
    in each caller), both over ``batch`` queries of xq for ``seconds`` at most. Returns each round and the median,
    lowest and highest of the rounds' ratios cluster / FAISS."""
    def faiss_threads_here() -> None:
        if set_threads is not None:
            set_threads(faiss_threads)

    out = []
    for _ in range(rounds):
        c = measure(cluster_search, xq, batch, seconds, max_requests, concurrency=cluster_callers)
        faiss_threads_here()  # the one-caller window runs in this thread
        f = measure(faiss_search, xq, batch, seconds, max_requests, concurrency=faiss_callers,
                    thread_setup=faiss_threads_here)
        out.append({"cluster_qps": c["qps"], "faiss_qps": f["qps"], "ratio": c["qps"] / f["qps"],
                    "cluster_foreign_cpu": c.get("foreign_cpu_cores"), "faiss_foreign_cpu": f.get("foreign_cpu_cores")})
    ratios = [r["ratio"] for r in out]
    return {"batch": batch, "rounds": out, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "cluster_callers": cluster_callers, "faiss_threads": faiss_threads,
            "faiss_callers": faiss_callers}
