"""What splitting one trained IVF index into shards costs FAISS itself, in one process: no Ray, no gRPC.

    python -m bench.split_bench --data-dir /tmp/split --n 5000000 --nlist 4096 --nprobe 8
    python -m bench.split_bench --data-dir /tmp/split --n 5000000 --nlist 4096 --nprobe 12 --codes PQ32

Trains ``IVF{nlist},{codes}`` once (100 points a list), assigns every vector to its list once, then fills one index
and S = 4 and 8 indexes from the same trained index, each holding the vectors whose id hashes to it (as the
cluster's buckets do). For batches of ``batch`` queries it times (CPU, one FAISS thread) ``search_preassigned`` over
the one index and over all S of them with the same lists, the S indexes searched from 2 and from S threads at once,
and the S indexes' lists seen as one index (``HStackInvertedLists``: each probed list scanned once over all parts,
as shards sharing one process could search). Equal times say the work a cluster's shards do together is one
index's; what a cluster spends above that is its own (bench/cpu_split_bench.py measures it). IVF-PQ's precomputed
tables are kept or freed by the shards' rule (shard.specs.drop_precomputed_tables). Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bench.scale_common import dataset, log
from bench.timing import write_results
from shard.specs import drop_precomputed_tables, without_polysemous_training


def _ready(index, nprobe: int):
    """``index`` filled, set to probe ``nprobe`` lists, its IVF-PQ tables kept or freed as a shard's are."""
    index.nprobe = nprobe
    drop_precomputed_tables(index)
    return index


def _filled(template: bytes, xb: np.ndarray, ids: np.ndarray, lists: np.ndarray, mask: np.ndarray, nprobe: int):
    import faiss

    index = faiss.deserialize_index(template)
    x, i, a = np.ascontiguousarray(xb[mask]), ids[mask], np.ascontiguousarray(lists[mask])
    index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(i), faiss.swig_ptr(a))
    return _ready(index, nprobe)


def _one_view(template: bytes, parts: list, nprobe: int):
    """An index whose lists are the ``parts``' lists end to end (``HStackInvertedLists``, read-only): a search
    scans each probed list once over all parts. Returns (index, what it reads): keep both, and the parts, alive."""
    import faiss

    view = faiss.deserialize_index(template)
    ils = faiss.InvertedListsPtrVector()
    for p in parts:
        ils.push_back(p.invlists)
    stack = faiss.HStackInvertedLists(ils.size(), ils.data())
    view.replace_invlists(stack, False)
    view.ntotal = sum(p.ntotal for p in parts)
    return _ready(view, nprobe), (ils, stack)


def _cpu_ms(quantizer, indexes, xq: np.ndarray, batch: int, nprobe: int, threads: int, k: int):
    """(wall ms, CPU ms) a batch of ``search_preassigned`` over all ``indexes`` (the quantization outside it), and the
    merged top-k labels of every query (to check that each way returns the same)."""
    import faiss

    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    wall = cpu = 0.0
    batches = 0
    labels = []
    for s in range(0, len(xq) - batch + 1, batch):
        x = np.ascontiguousarray(xq[s:s + batch])
        D, I = quantizer.search(x, nprobe)
        t, c = time.perf_counter(), time.process_time()
        if pool is None:
            res = [index.search_preassigned(x, k, I, D) for index in indexes]
        else:
            res = list(pool.map(lambda index: index.search_preassigned(x, k, I, D), indexes))
        wall += time.perf_counter() - t
        cpu += time.process_time() - c
        batches += 1
        if len(res) > 1:
            res = [faiss.merge_knn_results(np.stack([r[0] for r in res]), np.stack([r[1] for r in res]))]
        labels.append(np.sort(res[0][1], axis=1))
    if pool is not None:
        pool.shutdown()
    return 1e3 * wall / batches, 1e3 * cpu / batches, np.concatenate(labels)


def run(args) -> dict:
    import faiss

    xb, xq = dataset(argparse.Namespace(n=args.n, dim=128, queries=1000, seed=0, clusters=1000, noise=1.5,
                                        data_dir=args.data_dir))
    n = len(xb)
    faiss.omp_set_num_threads(2)
    spec = f"IVF{args.nlist},{args.codes}"
    one = without_polysemous_training(faiss.index_factory(xb.shape[1], spec))  # trained as the shards train it
    rows = np.sort(np.random.default_rng(1).choice(n, min(n, 100 * args.nlist), replace=False))
    t = time.perf_counter()
    one.train(np.ascontiguousarray(xb[rows]))
    log(f"trained {spec} in {time.perf_counter() - t:.1f}s")
    template = faiss.serialize_index(one)
    lists = np.empty(n, dtype=np.int64)
    for s in range(0, n, 500_000):
        lists[s:s + 500_000] = one.quantizer.search(np.ascontiguousarray(xb[s:s + 500_000]), 1)[1][:, 0]
    ids = np.arange(n, dtype=np.int64)
    home = (ids * 2654435761) % 8  # a hash of the id, as a bucket is
    out: dict = {"n": n, "spec": spec, "nlist": args.nlist, "nprobe": args.nprobe, "batch": args.batch, "runs": []}
    one = _filled(template, xb, ids, lists, np.ones(n, dtype=bool), args.nprobe)
    out["imbalance"] = one.invlists.imbalance_factor()
    splits = {S: [_filled(template, xb, ids, lists, home % S == s, args.nprobe) for s in range(S)] for S in (4, 8)}
    views = {S: _one_view(template, parts, args.nprobe) for S, parts in splits.items()}
    log("filled one index and 4 and 8 splits")
    faiss.omp_set_num_threads(1)
    out["same_labels"] = {}
    for rep in range(args.reps):
        timed = {"one": _cpu_ms(one.quantizer, [one], xq, args.batch, args.nprobe, 1, args.k)}
        for S, parts in splits.items():
            timed[f"{S} splits, 1 thread"] = _cpu_ms(one.quantizer, parts, xq, args.batch, args.nprobe, 1, args.k)
            for threads in (2, S):
                timed[f"{S} splits, {threads} threads"] = _cpu_ms(one.quantizer, parts, xq, args.batch, args.nprobe,
                                                                  threads, args.k)
            timed[f"{S} splits as one view"] = _cpu_ms(one.quantizer, [views[S][0]], xq, args.batch, args.nprobe, 1,
                                                       args.k)
        ref = timed["one"][2]
        for name, (_, _, labels) in timed.items():  # the share of queries whose top k is the one index's (least)
            share = float(np.mean((labels == ref).all(axis=1)))
            out["same_labels"][name] = min(share, out["same_labels"].get(name, 1.0))
        out["runs"].append({name: (w, c) for name, (w, c, _) in timed.items()})
        log(f"run {rep + 1}: " + ", ".join(f"{k}: {c:.1f} ms CPU" for k, (_, c, _) in timed.items()))
    return out


def report(out: dict) -> str:
    lines = [f"{out['spec']}, n={out['n']}, nprobe {out['nprobe']}, batch {out['batch']}, imbalance "
             f"{out['imbalance']:.2f}; search_preassigned, one FAISS thread per caller; the same top k as the one "
             "index: " + ", ".join(f"{k} {v:.3f}" for k, v in out["same_labels"].items() if k != "one"), "",
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
    p.add_argument("--codes", default="Flat", help="what the lists hold: Flat (default), PQ32, SQ8, ...")
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
