"""The in-process FAISS side of bench/scale_bench.py: the same spec trained by FAISS on its own sample
(:func:`faiss_family`), and the cluster's own trained index filled by FAISS (:func:`faiss_with_cluster_training`).

Two trainings of the same spec on two uniform samples of the same data give different coarse centroids, and the
lists they make can differ in balance: at 5M x 128, IVF4096, one run's cluster scanned 128 ms of lists a batch of
100 and another's 89, at the same nprobe. The second FAISS side takes that draw out of the comparison: FAISS holds
exactly the lists the shards hold together, so its answers at the same nprobe are the cluster's, and the ratio
says what serving through the cluster costs.
"""

from __future__ import annotations

import gc
import os
import pathlib
import sys
import time

import numpy as np

from bench.scale_common import EF_SEARCHES, NPROBES, cheapest, log
from bench.timing import measure, recall_at_k
from lookalike.config import CollectionConfig
from lookalike.indexspec import training_points
from shard.specs import without_polysemous_training
from shard.trained import read_template


def train_size(spec: str, dim: int, n: int) -> int:
    """Vectors the in-process index trains on: the sample the cluster trains the same spec on
    (lookalike.indexspec.training_points: about 100 per list, at most 500k)."""
    return min(n, training_points(spec)[1])


def _fill(idx, xb: np.ndarray, args, res: dict, spec: str) -> None:
    """Adds xb to the trained ``idx`` chunk by chunk; read and add seconds into ``res``."""
    from tqdm import tqdm

    read_s = add_s = 0.0
    for s in tqdm(range(0, len(xb), args.chunk), desc=f"FAISS add {spec}", unit="chunk", file=sys.stderr,
                  mininterval=2.0):
        t = time.perf_counter()
        x = np.ascontiguousarray(xb[s:s + args.chunk])
        read_s += time.perf_counter() - t
        t = time.perf_counter()
        idx.add(x)
        add_s += time.perf_counter() - t
    res.update(read_seconds=read_s + res.get("train_read_seconds", 0.0), add_seconds=add_s)
    res["build_seconds"] = res["read_seconds"] + res.get("train_seconds", 0.0) + add_s
    log(f"  FAISS {spec}: built in {res['build_seconds']:.1f}s (read {res['read_seconds']:.1f}s, "
        f"train {res.get('train_seconds', 0.0):.1f}s, add {add_s:.1f}s)")


def searcher(idx, spec: str, k: int):
    """``search(queries, p)`` of ``idx`` at nprobe (IVF) / efSearch (HNSW) ``p`` (other specs: p unused)."""
    import faiss

    if "IVF" in spec:
        return lambda q, p: idx.search(q, k, params=faiss.SearchParametersIVF(nprobe=p))
    if "HNSW" in spec:
        return lambda q, p: idx.search(q, k, params=faiss.SearchParametersHNSW(efSearch=p))
    return lambda q, p: idx.search(q, k)


def _measure(idx, spec: str, xq: np.ndarray, gt: np.ndarray, args, res: dict, label: str = "FAISS") -> None:
    """The cheapest parameter reaching the target recall, then QPS there: on all cores, on 1 thread and from
    ``--concurrency`` callers of 1 thread, at every batch size; IVF-PQ with and without its precomputed tables."""
    import faiss

    k, threads = args.k, os.cpu_count() or 1
    if "IVF" in spec:
        param, grid = "nprobe", tuple(p for p in NPROBES if p <= args.nlist)
    elif "HNSW" in spec:
        param, grid = "efSearch", tuple(e for e in EF_SEARCHES if e >= k)
    else:
        param, grid = None, (0,)
    search = searcher(idx, spec, k)
    if param:
        log(f"  {label} {spec}: cheapest {param} for recall@{k} >= {args.target}")
        res["sweep"] = cheapest(grid, lambda p: recall_at_k(search(xq, p)[1], gt), args.target)
    else:
        res["sweep"] = {"value": 0, "recall": recall_at_k(search(xq, 0)[1], gt), "met": True, "curve": []}
    res["param"] = param
    p = res["sweep"]["value"]
    res["qps"] = {}
    # IVF-PQ with and without precomputed tables (shard.specs.drop_precomputed_tables): the faster one is compared
    ivfpq = faiss.try_extract_index_ivf(idx)
    ivfpq = faiss.downcast_index(ivfpq) if ivfpq is not None else None
    tables = ((1, ""), (-1, ", no tables")) if isinstance(ivfpq, faiss.IndexIVFPQ) else ((None, ""),)
    for mode, suffix in tables:
        if mode is not None:
            ivfpq.use_precomputed_table = mode
            ivfpq.precompute_table()
        for batch in args.batches:
            for setting, nthreads, conc in (("all cores", threads, 1), ("1 thread", 1, 1),
                                            *[(f"{c} callers x 1 thread", 1, c) for c in args.concurrency if c > 1]):
                faiss.omp_set_num_threads(nthreads)
                r = measure(lambda q: search(q, p), xq, batch, args.seconds, args.max_requests, concurrency=conc,
                            thread_setup=lambda n=nthreads: faiss.omp_set_num_threads(n))
                r.update(faiss_threads=nthreads, precomputed_table=mode)  # how to search so again (bench.scale_turns)
                res["qps"].setdefault(str(batch), {})[setting + suffix] = r
                log(f"  {label} {spec} batch {batch} {setting}{suffix}: {r['qps']:.1f} QPS, p50 {r['p50_ms']:.2f} ms")
            faiss.omp_set_num_threads(threads)


def faiss_family(spec: str, xb: np.ndarray, xq: np.ndarray, gt: np.ndarray, args, scratch: pathlib.Path,
                 keep: bool = False) -> tuple[dict, object]:
    """Builds ``spec`` over xb in-process, then sweeps and measures it. Returns its results and, with ``keep``,
    the index (for bench.scale_turns); without, None: the index is freed."""
    import faiss

    n, dim = len(xb), xb.shape[1]
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    res: dict = {"spec": spec, "n": n}
    idx = without_polysemous_training(faiss.index_factory(dim, spec))  # trained as the shards train it
    if not idx.is_trained:
        ntrain = train_size(spec, dim, n)
        t = time.perf_counter()
        sample = np.ascontiguousarray(xb[np.sort(np.random.default_rng(args.seed + 1).choice(n, ntrain, replace=False))])
        res["train_read_seconds"] = time.perf_counter() - t
        t = time.perf_counter()
        idx.train(sample)
        res.update(train_vectors=ntrain, train_seconds=time.perf_counter() - t)
        del sample
        log(f"  FAISS {spec}: trained on {ntrain} in {res['train_seconds']:.1f}s")
    _fill(idx, xb, args, res, spec)
    path = scratch / "faiss-index.tmp"
    faiss.write_index(idx, str(path))  # the bytes of serialize_index, without a second copy in RAM
    res["index_bytes"] = path.stat().st_size
    res["bytes_per_vector"] = res["index_bytes"] / n
    path.unlink()
    _measure(idx, spec, xq, gt, args, res)
    if keep:
        return res, idx
    idx.reset()  # frees the vectors now; the rest goes with this frame
    gc.collect()
    return res, None


def faiss_with_cluster_training(spec: str, storage: pathlib.Path, name: str, version: int, xb: np.ndarray,
                                xq: np.ndarray, gt: np.ndarray, args, keep: bool = False) -> tuple[dict, object]:
    """In-process FAISS from the cluster's trained index ``version`` of collection ``name`` (read from the
    cluster's ``storage``, checked: shard.trained.read_template), filled with xb, swept and measured as
    :func:`faiss_family` does. Returns its results and, with ``keep``, the index (else None: freed)."""
    import faiss

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    coll = CollectionConfig(name, xb.shape[1], "l2", index=spec).validated()
    idx = read_template(storage, coll, version)
    res: dict = {"spec": spec, "n": len(xb), "trained_version": version}
    _fill(idx, xb, args, res, spec)
    _measure(idx, spec, xq, gt, args, res, label="FAISS (the cluster's training)")
    if keep:
        return res, idx
    idx.reset()
    gc.collect()
    return res, None


def free(idx) -> None:
    """Frees a kept index's vectors now (its object goes with the caller's last reference)."""
    if idx is not None:
        idx.reset()
        gc.collect()
