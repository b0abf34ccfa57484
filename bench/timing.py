"""How the benchmarks measure, the same way in each: their data (clustered vectors, seeded), sequential timed
requests, the CPU other processes used meanwhile, recall, and their JSON results.

Numpy only (and psutil, if installed, for the CPU of others): bench/milvus_worker.py imports it in a minimal
virtualenv. May use: nothing else of the project.
"""

from __future__ import annotations

import json
import pathlib
import sys
import threading
import time

import numpy as np


# --- data -----------------------------------------------------------------------------------------------------
def make_data(n: int, dim: int, nq: int, seed: int, clusters: int = 1000, noise: float = 1.5,
              chunk: int = 100_000, out: np.ndarray | None = None,
              progress=None) -> tuple[np.ndarray, np.ndarray]:
    """(xb shape (n, dim), xq shape (nq, dim)) float32: each vector is a random centroid plus Gaussian noise.

    ``out``: an (n, dim) float32 array (e.g. a memory-mapped .npy) xb is written into, chunk by chunk, and
    returned; the numbers are the same as without it. ``progress``: called with the count of each chunk written.

    Centroids are standard normal and cluster sizes uneven (gamma-distributed weights). With noise 1.5 the data is
    clustered but not trivially so: IVF1024 with nprobe 16 over 250k of these vectors finds about 90% of the true
    10 nearest neighbours (with noise 0.5 it finds all of them, and recall would tell nothing).
    """
    rng = np.random.default_rng(seed)
    centroids = rng.standard_normal((clusters, dim), dtype=np.float32)
    weights = rng.gamma(2.0, size=clusters)
    weights /= weights.sum()

    def draw(count: int, into: np.ndarray | None = None, tick=None) -> np.ndarray:
        x = np.empty((count, dim), dtype=np.float32) if into is None else into
        for s in range(0, count, chunk):
            e = min(count, s + chunk)
            assign = rng.choice(clusters, size=e - s, p=weights)
            part = centroids[assign]
            part += noise * rng.standard_normal((e - s, dim), dtype=np.float32)
            x[s:e] = part
            if tick is not None:
                tick(e - s)
        return x

    if out is not None and out.shape != (n, dim):
        raise ValueError(f"out has shape {out.shape}, expected {(n, dim)}")
    return draw(n, out, progress), draw(nq)


# --- measuring ------------------------------------------------------------------------------------------------
class ForeignCpu:
    """CPU used on this machine by processes outside this benchmark (this process and its descendants: Ray's
    daemons and the shard actors). Measurements taken while something else ran are not comparable; each result
    carries the average number of cores others used meanwhile."""

    def __init__(self):
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()

    def _mine(self) -> float:
        total = 0.0
        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except self._psutil.Error:
                pass
        return total

    def snapshot(self) -> tuple[float, float, float]:
        c = self._psutil.cpu_times()
        busy = c.user + c.nice + c.system + getattr(c, "irq", 0.0) + getattr(c, "softirq", 0.0)
        return time.perf_counter(), busy, self._mine()

    @staticmethod
    def cores(a: tuple, b: tuple) -> float:
        """Average cores used by others between two snapshots."""
        dt = b[0] - a[0]
        return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / dt) if dt > 0 else 0.0

    def wait_quiet(self, max_s: float, threshold: float = 0.2, window: float = 2.0) -> tuple[float, float]:
        """Waits (up to max_s) for a window in which others use under ``threshold`` cores. Returns (waited, cores)."""
        t0 = time.perf_counter()
        while True:
            a = self.snapshot()
            time.sleep(window)
            used = self.cores(a, self.snapshot())
            if used < threshold or time.perf_counter() - t0 >= max_s:
                return time.perf_counter() - t0, used


# What measure() and bench.common.load() record the foreign CPU with; None: they record none. Set by
# watch_foreign_cpu().
MONITOR: ForeignCpu | None = None


def watch_foreign_cpu() -> ForeignCpu:
    """From now on, :func:`measure` and bench.common.load record the CPU others used meanwhile; returns the monitor."""
    global MONITOR
    MONITOR = ForeignCpu()
    return MONITOR


def measure(search, xq: np.ndarray, batch: int, seconds: float, max_requests: int, warmup: int = 1,
            concurrency: int = 1, thread_setup=None) -> dict:
    """Requests of ``batch`` queries (cycling over xq) until ``seconds`` pass or ``max_requests`` ran, from
    ``concurrency`` callers each sending its next request when its last one is answered (1: sequential requests
    from this thread, a latency-bound throughput; more: threads, what a server does with several callers, as in
    production). ``thread_setup``: called first in each caller thread (OpenMP's thread count is per thread)."""
    starts = list(range(0, max(1, len(xq) - batch + 1), batch))
    for i in range(warmup):
        s = starts[i % len(starts)]
        search(xq[s:s + batch])
    lat: list[float] = []
    issued = [0]
    lock = threading.Lock()
    snap = MONITOR.snapshot() if MONITOR else None
    t0 = time.perf_counter()

    def caller() -> None:
        while True:
            with lock:
                if issued[0] and (time.perf_counter() - t0 >= seconds or issued[0] >= max_requests):
                    return
                s = starts[issued[0] % len(starts)]
                issued[0] += 1
            t = time.perf_counter()
            search(xq[s:s + batch])
            with lock:
                lat.append(time.perf_counter() - t)

    def setup_and_call() -> None:
        if thread_setup is not None:
            thread_setup()
        caller()

    if concurrency <= 1:
        caller()
    else:
        threads = [threading.Thread(target=setup_and_call, daemon=True) for _ in range(concurrency)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1e3
    nq = len(lat) * len(xq[starts[0]:starts[0] + batch])
    return {"batch": batch, "concurrency": max(1, concurrency), "requests": len(lat), "queries": nq,
            "seconds": round(wall, 3), "qps": nq / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "foreign_cpu_cores": round(ForeignCpu.cores(snap, MONITOR.snapshot()), 3) if snap else None}


# --- results --------------------------------------------------------------------------------------------------
def ids_to_array(ids: list[list[str]], k: int) -> np.ndarray:
    """The cluster's string ids (``str(i)``) as an int64 (nq, k) array, -1 where fewer than k came back."""
    out = np.full((len(ids), k), -1, dtype=np.int64)
    for q, row in enumerate(ids):
        out[q, :len(row)] = [int(x) for x in row]
    return out


def recall_at_k(I: np.ndarray, gt: np.ndarray) -> float:
    """Mean over queries of |I[q] & gt[q]| / k."""
    k = gt.shape[1]
    return float(np.mean([len(set(a[a >= 0].tolist()) & set(b.tolist())) / k for a, b in zip(I, gt)]))


def write_results(out: dict, path: str) -> None:
    """Every number of a benchmark run as JSON at ``path`` (directories made), said on stderr."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(f"\nwrote {path}", file=sys.stderr)
