"""What bench/scale_bench.py's two sides share: the generated data and its exact ground truth, the parameter grids,
the log line, and the search for the cheapest parameter reaching a recall.
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np

from bench.timing import make_data

_T0 = time.perf_counter()


def _grid(low: int, high: int) -> tuple[int, ...]:
    """1, 2, 3, then four steps a doubling (4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ...) from ``low`` to ``high``: each
    value at most 1.25x the one before, so the cheapest value reaching a recall overshoots by at most that much, and
    two systems' cheapest settings are read at about the same recall (a grid of 1.33-1.5x steps put one system up to
    half a step further past the target than the other)."""
    values, base = [1, 2, 3], 4
    while base <= high:
        values += [base * q // 4 for q in (4, 5, 6, 7)]
        base *= 2
    return tuple(v for v in values if low <= v <= high)


NPROBES = _grid(1, 2048)
EF_SEARCHES = _grid(8, 1024)
PLATEAU_GAIN = 0.003  # recall gained by doubling the parameter below which recall has stopped growing


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --- data -------------------------------------------------------------------------------------------------------
def dataset(args) -> tuple[np.ndarray, np.ndarray]:
    """(xb memory-mapped, shape (n, dim) float32; xq shape (queries, dim)) under ``args.data_dir``, generated once
    with ``make_data`` (chunk by chunk into the map) and reused while the data flags are the same."""
    from tqdm import tqdm

    root = pathlib.Path(args.data_dir)
    root.mkdir(parents=True, exist_ok=True)
    tag = data_tag(args)
    xb_path, xq_path = root / f"xb-{tag}.npy", root / f"xq-{tag}.npy"
    if xb_path.exists() and xq_path.exists():
        log(f"data: reusing {xb_path}")
        return np.load(xb_path, mmap_mode="r"), np.load(xq_path)
    tmp = xb_path.with_suffix(".partial.npy")
    xb = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(args.n, args.dim))
    with tqdm(total=args.n, unit="vec", unit_scale=True, desc="generate", mininterval=2.0, file=sys.stderr) as bar:
        _, xq = make_data(args.n, args.dim, args.queries, args.seed, clusters=args.clusters, noise=args.noise,
                          out=xb, progress=bar.update)
    xb.flush()
    del xb
    np.save(xq_path, xq)
    tmp.rename(xb_path)
    log(f"data: generated {args.n} x {args.dim} into {xb_path}")
    return np.load(xb_path, mmap_mode="r"), xq


def data_tag(args) -> str:
    """Names the generated data by the flags it depends on."""
    return f"{args.n}x{args.dim}-q{args.queries}-s{args.seed}-c{args.clusters}-z{args.noise:g}"


def ground_truth(xb: np.ndarray, xq: np.ndarray, k: int, cache: pathlib.Path, chunk: int = 1_000_000) -> np.ndarray:
    """Exact k nearest neighbours (L2) of xq in xb: I shape (nq, k) int64, from ``faiss.knn`` over chunks of xb
    merged with a ``ResultHeap``; cached in ``cache`` (.npy)."""
    import faiss
    from tqdm import tqdm

    if cache.exists():
        return np.load(cache)
    heap = faiss.ResultHeap(len(xq), k)
    for s in tqdm(range(0, len(xb), chunk), desc="ground truth", unit="chunk", file=sys.stderr):
        D, I = faiss.knn(xq, np.ascontiguousarray(xb[s:s + chunk]), k)
        heap.add_result(D, I + s)
    heap.finalize()
    np.save(cache, heap.I)
    return heap.I


# --- choosing nprobe / efSearch ----------------------------------------------------------------------------------
def cheapest(grid: tuple, recall_of, target: float) -> dict:
    """The smallest value of ``grid`` at which ``recall_of(value)`` >= target, found by doubling the value through
    the grid and then bisecting; where recall stops growing below the target (gain under PLATEAU_GAIN over a doubling),
    the smallest value reaching the plateau's recall minus PLATEAU_GAIN. Returns {"value", "recall", "met",
    "curve": [(value, recall), ...]}."""
    seen: dict[int, float] = {}

    def r(i: int) -> float:
        if grid[i] not in seen:
            seen[grid[i]] = recall_of(grid[i])
            log(f"    {grid[i]}: recall {seen[grid[i]]:.4f}")
        return seen[grid[i]]

    lo, hi, goal, met, i = -1, None, target, True, 0
    while True:
        if r(i) >= goal:
            hi = i
            break
        if i == len(grid) - 1:  # the grid's end: take it
            hi, met = i, False
            break
        j = next((x for x in range(i + 1, len(grid)) if grid[x] >= 2 * grid[i]), len(grid) - 1)
        if r(j) - r(i) < PLATEAU_GAIN and grid[j] >= 2 * grid[i]:
            goal, met = r(j) - PLATEAU_GAIN, False  # a plateau below the target: bisect for its start
            lo, hi = -1, j
            break
        lo, i = i, j
    while hi - lo > 1:  # r(lo) < goal <= r(hi) (lo = -1: nothing below tried)
        mid = (lo + hi) // 2
        hi, lo = (mid, lo) if r(mid) >= goal else (hi, mid)
    return {"value": grid[hi], "recall": r(hi), "met": met and r(hi) >= target, "curve": sorted(seen.items())}
