"""What splitting one trained IVF index into shards costs FAISS itself, in one process: no Ray, no gRPC.

    python -m bench.split_bench --data-dir /tmp/split --n 5000000 --nlist 4096 --nprobe 8

Trains ``IVF{nlist},Flat`` once (100 points a list), assigns every vector to its list once, then fills one index and
S = 4 and 8 indexes from the same trained index, each holding the vectors whose id hashes to it (as the cluster's
buckets do). For batches of ``batch`` queries it times (CPU, one FAISS thread) ``search_preassigned`` over the one
index and over all S of them with the same lists, and the S indexes searched from 2 and from S threads at once.
Equal times say the work a cluster's shards do together is one index's; what a cluster spends above that is its
own (bench/cpu_split_bench.py measures it). Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bench.scale_common import dataset, log
from bench.timing import write_results


def _filled(template: bytes, xb: np.ndarray, ids: np.ndarray, lists: np.ndarray, mask: np.ndarray, nprobe: int):
    import faiss

    index = faiss.deserialize_index(template)
    x, i, a = np.ascontiguousarray(xb[mask]), ids[mask], np.ascontiguousarray(lists[mask])
    index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(i), faiss.swig_ptr(a))
    index.nprobe = nprobe
    return index


def _cpu_ms(quantizer, indexes, xq: np.ndarray, batch: int, nprobe: int, threads: int, k: int) -> tuple[float, float]:
    """(wall ms, CPU ms) a batch of ``search_preassigned`` over all ``indexes`` (the quantization outside it)."""
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    wall = cpu = 0.0
    batches = 0
    for s in range(0, len(xq) - batch + 1, batch):
        x = np.ascontiguousarray(xq[s:s + batch])
        D, I = quantizer.search(x, nprobe)
        t, c = time.perf_counter(), time.process_time()
        if pool is None:
            for index in indexes:
                index.search_preassigned(x, k, I, D)
        else:
            list(pool.map(lambda index: index.search_preassigned(x, k, I, D), indexes))
        wall += time.perf_counter() - t
        cpu += time.process_time() - c
        batches += 1
    if pool is not None:
        pool.shutdown()
    return 1e3 * wall / batches, 1e3 * cpu / batches


def run(args) -> dict:
    import faiss

    xb, xq = dataset(argparse.Namespace(n=args.n, dim=128, queries=1000, seed=0, clusters=1000, noise=1.5,
                                        data_dir=args.data_dir))
    n = len(xb)
    faiss.omp_set_num_threads(2)
    one = faiss.index_factory(xb.shape[1], f"IVF{args.nlist},Flat")
    rows = np.sort(np.random.default_rng(1).choice(n, min(n, 100 * args.nlist), replace=False))
    t = time.perf_counter()
    one.train(np.ascontiguousarray(xb[rows]))
    log(f"trained IVF{args.nlist} in {time.perf_counter() - t:.1f}s")
    template = faiss.serialize_index(one)
    lists = np.empty(n, dtype=np.int64)
    for s in range(0, n, 500_000):
        lists[s:s + 500_000] = one.quantizer.search(np.ascontiguousarray(xb[s:s + 500_000]), 1)[1][:, 0]
    ids = np.arange(n, dtype=np.int64)
    home = (ids * 2654435761) % 8  # a hash of the id, as a bucket is
    out: dict = {"n": n, "nlist": args.nlist, "nprobe": args.nprobe, "batch": args.batch, "runs": []}
    one = _filled(template, xb, ids, lists, np.ones(n, dtype=bool), args.nprobe)
    out["imbalance"] = one.invlists.imbalance_factor()
    splits = {S: [_filled(template, xb, ids, lists, home % S == s, args.nprobe) for s in range(S)] for S in (4, 8)}
    log("filled one index and 4 and 8 splits")
    faiss.omp_set_num_threads(1)
    for rep in range(args.reps):
        run_ = {"one": _cpu_ms(one.quantizer, [one], xq, args.batch, args.nprobe, 1, args.k)}
        for S, parts in splits.items():
            run_[f"{S} splits, 1 thread"] = _cpu_ms(one.quantizer, parts, xq, args.batch, args.nprobe, 1, args.k)
            for threads in (2, S):
                run_[f"{S} splits, {threads} threads"] = _cpu_ms(one.quantizer, parts, xq, args.batch, args.nprobe,
                                                                 threads, args.k)
        out["runs"].append(run_)
        log(f"run {rep + 1}: " + ", ".join(f"{k}: {c:.1f} ms CPU" for k, (_, c) in run_.items()))
    return out


def report(out: dict) -> str:
    lines = [f"IVF{out['nlist']},Flat, n={out['n']}, nprobe {out['nprobe']}, batch {out['batch']}, imbalance "
             f"{out['imbalance']:.2f}; search_preassigned, one FAISS thread per caller", "",
             "| run | " + " | ".join(out["runs"][0]) + " |", "|---|" + "---:|" * len(out["runs"][0])]
    for i, r in enumerate(out["runs"]):
        lines.append(f"| {i + 1} | " + " | ".join(f"{c:.1f} ms CPU ({w:.1f} wall)" for w, c in r.values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.split_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="where the generated vectors go (bench.scale_bench's data)")
    p.add_argument("--n", type=int, default=5_000_000, help="vectors (default 5000000)")
    p.add_argument("--nlist", type=int, default=4096, help="IVF lists (default 4096)")
    p.add_argument("--nprobe", type=int, default=8, help="lists probed (default 8)")
    p.add_argument("--batch", type=int, default=100, help="queries per batch (default 100)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--reps", type=int, default=2, help="measurements (default 2)")
    p.add_argument("--out", default="bench/out/split.json", help="JSON results")
    args = p.parse_args(argv)
    out = run(args)
    write_results(out, args.out)
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
