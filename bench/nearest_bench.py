"""What distances that do not depend on the batch cost (lookalike.nearest): its search against FAISS's own.

    python -m bench.nearest_bench                       # IVF lists (nlist 1024-16384) and Flat (100k, 1M), d=128
    python -m bench.nearest_bench --flat-n 100000 --nlists 1024 --reps 3

For each case, ``lookalike.nearest.nearest`` and ``index.search`` of the same flat index (the centroids of an IVF
index: a shard's choice of lists, and the router's, which finds its candidates by BLAS products from batches of
8; a Flat collection's vectors, which a shard searches so too) on one thread, at batch 1 and 100
(1200 for the lists: FAISS's BLAS path), in turns, best of ``--reps``: milliseconds a batch and their ratio. Also
how many queries of the batch were scanned pair by pair (their candidates did not settle the k-th place). Data:
bench.timing.make_data (clustered, d=128). Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time

import faiss
import numpy as np

from bench.timing import make_data, write_results
from lookalike import nearest as near
from router.coarse import _Quantizer, _search_on_one_thread


def _best(fn, reps: int, min_s: float = 0.2) -> float:
    """Best milliseconds of ``fn`` over ``reps`` rounds of at least ``min_s`` seconds each."""
    best = float("inf")
    for _ in range(reps):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            if time.perf_counter() - t0 >= min_s:
                break
        best = min(best, (time.perf_counter() - t0) / n * 1e3)
    return best


def _scanned(index, xq: np.ndarray, k: int) -> int:
    """Queries of ``xq`` whose candidates did not settle their k-th place (scanned pair by pair)."""
    calls = []
    real = near.scan
    near.scan = lambda *a: calls.append(1) or real(*a)
    try:
        near.nearest(index, xq, k)
    finally:
        near.scan = real
    return len(calls)


def case(name: str, index, xq: np.ndarray, k: int, batches, reps: int, ours=None) -> list[dict]:
    """Rows of FAISS's ``index.search`` against ``ours(q, k)`` (default: lookalike.nearest) at each batch."""
    ours = ours or (lambda q, kk: near.nearest(index, q, kk))
    rows = []
    for b in batches:
        q = np.ascontiguousarray(xq[:b])
        faiss_ms = _best(lambda: index.search(q, k), reps)
        ours_ms = _best(lambda: ours(q, k), reps)
        rows.append({"case": name, "batch": b, "k": k, "faiss_ms": faiss_ms, "nearest_ms": ours_ms,
                     "ratio": faiss_ms / ours_ms, "scanned": _scanned(index, q, k)})
        print(f"  {name} batch {b}: FAISS {faiss_ms:.3f} ms, nearest {ours_ms:.3f} ms ({faiss_ms / ours_ms:.2f}x), "
              f"{rows[-1]['scanned']} scanned", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.nearest_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--nlists", default="1024,4096,16384", help="IVF list counts (default 1024,4096,16384)")
    p.add_argument("--nprobe", type=int, default=12, help="lists a query probes (default 12)")
    p.add_argument("--flat-n", default="100000,1000000", help="Flat collection sizes (default 100000,1000000)")
    p.add_argument("--reps", type=int, default=3, help="rounds of each measurement (default 3)")
    p.add_argument("--out", default="bench/out/nearest.json", help="JSON results")
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(1)
    sizes = [int(v) for v in args.flat_n.split(",") if v] + [int(v) for v in args.nlists.split(",") if v]
    xb_all, xq = make_data(max(sizes), 128, 1200, 0)
    rows = []
    for nlist in [int(v) for v in args.nlists.split(",") if v]:
        kmeans = faiss.Kmeans(128, nlist, niter=4, seed=1)
        kmeans.train(np.ascontiguousarray(xb_all[:min(len(xb_all), 20 * nlist)]))
        index = faiss.IndexFlatL2(128)
        index.add(kmeans.centroids)
        rows += case(f"IVF{nlist} lists", index, xq, args.nprobe, (1, 100, 1200), args.reps)
        q = _Quantizer(1, index)
        rows += case(f"IVF{nlist} lists, router", index, xq, args.nprobe, (1, 100, 1200), args.reps,
                     lambda x, kk: _search_on_one_thread(q, x, kk))
    for n in [int(v) for v in args.flat_n.split(",") if v]:
        index = faiss.IndexFlatL2(128)
        index.add(np.ascontiguousarray(xb_all[:n]))
        xb = np.ascontiguousarray(xb_all[:n])
        rows += case(f"Flat {n}", index, xq, 10, (1, 8, 100), args.reps, lambda x, kk: near.nearest(
            index, x, kk, None, (lambda q, c: near.product_candidates(xb, q, c, False)) if near.product_pays(*x.shape)
            else None))
    print("\n| case | batch | FAISS ms | nearest ms | FAISS / nearest | queries scanned |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['batch']} | {r['faiss_ms']:.3f} | {r['nearest_ms']:.3f} | {r['ratio']:.2f} | "
              f"{r['scanned']} |")
    write_results({"rows": rows, "nprobe": args.nprobe}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
