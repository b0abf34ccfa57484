"""Shard memory per vector: where a shard's resident memory goes, against what FAISS needs for the same index.

    python -m bench.memory_bench                       # 300k x 128, Flat, IVF1024,Flat, IVF1024,PQ16, HNSW32
    python -m bench.memory_bench --n 1000000 --spec IVF1024,PQ16 --spec HNSW32
    python -m bench.memory_bench --n 10000000 --spec IVF4096,Flat --shards 8 --allocator jemalloc

Each index spec is loaded into a fresh process (the allocator settings shard actors run with, see
control/ray_placer.py): a ``shard.shard.Shard`` in-process (no Ray, no gRPC), one collection of 16 buckets all
owned by it (``--shards S``: S shards in the one process, as shard.host holds them, 16 x S buckets, shard i owning
every bucket b with b % S == i; ``--allocator jemalloc``: the allocator of such a process, shard.osutil.
host_process_env, whose ``allocated`` and ``metadata`` statistics are then printed per vector too), upserts of 10k
items (ids ``img-00000000``, 12 bytes, no payload) of a clustered synthetic set (a seeded
mixture of Gaussians, generated batch by batch so the data itself is not resident). After the load the store is
compacted and ``release_memory`` (malloc_trim; jemalloc's purge) is called, then:

- ``rss/vec``: the process's resident memory growth per vector since just before the load;
- ``faiss/vec``: ``len(faiss.serialize_index(idx)) / n`` for the same spec built in-process over the same data,
  with FAISS's 64-bit ids (IVF lists hold them; other indexes under ``IndexIDMap``): what FAISS alone needs;
- ``index/vec``: our index serialized (codes, ids, structures; a hashtable direct map serializes as 16 bytes an
  entry, it takes more in memory), plus what ``VectorIndex`` keeps beside it (HNSW's position -> label arrays);
- ``table/vec``: the id table's arrays (labels, offsets, id bytes, payload pointers) and payload objects;
- ``fixed/vec``: what FAISS holds in memory but does not serialize, whatever the number of vectors: IVF-PQ's
  precomputed distance tables (nlist x M x 256 floats: 16 MiB for IVF1024,PQ16), spread over the vectors;
- ``rest/vec``: rss - index - table - fixed: allocator slack, capacity that vectors keep (inverted lists grow by
  doubling), what training left in the heap, and anything held that should not be;
- ``budget``: faiss/vec + 48 (the target: an id of up to 16 bytes plus the id table's 32 bytes a row).

Also timed (``--ops``): Get of 100 ids with vectors, and a delete + re-upsert of 10k existing ids.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from lookalike.config import CollectionConfig
from lookalike.ids import buckets_of
from lookalike.indexspec import training_points
from shard.cpu_index import VectorIndex
from shard.osutil import SHARD_PROCESS_ENV, allocator_stats, host_process_env, release_memory
from shard.shard import Shard
from shard.specs import build_index
from shard.trained import write_template

DEFAULT_SPECS = ["Flat", "IVF1024,Flat", "IVF1024,PQ16", "HNSW32"]
_SHARD_ENV = {**SHARD_PROCESS_ENV, "OMP_NUM_THREADS": "1"}  # as a shard actor runs (control/ray_placer.py)
_BATCH = 10_000
_CENTERS = 256


def batch_of(i: int, n: int, dim: int, seed: int) -> np.ndarray:
    """Rows [i, i + n) of the data set: shape (n, dim) float32, the same on every call."""
    centers = np.random.default_rng(seed).standard_normal((_CENTERS, dim)).astype(np.float32) * 4
    rng = np.random.default_rng((seed, i))
    return centers[rng.integers(0, _CENTERS, n)] + rng.standard_normal((n, dim)).astype(np.float32)


def _faiss_reference(spec: str, metric: str, n: int, dim: int, seed: int, train_n: int) -> int:
    """Serialized bytes of the spec as FAISS alone would hold n vectors of the data set with int64 ids."""
    import faiss

    idx = build_index(dim, metric, spec)
    if faiss.try_extract_index_ivf(idx) is None:
        idx = faiss.IndexIDMap(idx)
    if not idx.is_trained:
        idx.train(np.concatenate([batch_of(i, min(_BATCH, train_n - i), dim, seed)
                                  for i in range(0, train_n, _BATCH)]))
    for i in range(0, n, _BATCH):
        m = min(_BATCH, n - i)
        idx.add_with_ids(batch_of(i, m, dim, seed), np.arange(i, i + m, dtype=np.int64))
    return len(faiss.serialize_index(idx))


def _index_bytes(vi) -> int:
    """What our VectorIndex holds, serialized (see the module's docstring)."""
    import faiss

    main = vi._buffer if vi._buffer is not None else vi._main
    size = len(faiss.serialize_index(main))
    for name in ("_pos_label", "_label_order"):
        arr = getattr(vi, name, None)
        if isinstance(arr, np.ndarray):
            size += arr.nbytes
    label_pos = getattr(vi, "_label_pos", None)
    if isinstance(label_pos, dict) and label_pos:
        # a dict of Python ints: its table plus the int objects (labels are past the small-int cache)
        size += sys.getsizeof(label_pos) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in label_pos.items())
    return size


def _table_bytes(table) -> int:
    return table.nbytes + sum(sys.getsizeof(p) for p in table.payload_items()[1])


def child(spec: str, n: int, dim: int, metric: str, seed: int, ops: bool, shards: int = 1) -> dict:
    import faiss
    import psutil  # deferred with faiss: --help needs neither

    buckets = 16 * shards
    with tempfile.TemporaryDirectory() as tmp:
        held = [Shard(f"mem-{i}", tmp) for i in range(shards)]
        cfg = CollectionConfig("m", dim, metric, index=spec, buckets=buckets).validated()
        sample = min(training_points(cfg.index)[1], n)
        if sample:  # as in a cluster: the collection's one trained index first (shard.trained), then the items
            x = np.concatenate([batch_of(i, min(_BATCH, sample - i), dim, seed) for i in range(0, sample, _BATCH)])
            write_template(tmp, cfg, 1, VectorIndex(cfg).train_template(x), len(x), 0.0)
            cfg = dataclasses.replace(cfg, trained_version=1)
        for i, shard in enumerate(held):
            shard.open_collection(cfg, range(i, buckets, shards))
        scs = [shard.collection("m") for shard in held]
        sc = scs[0]
        # what every shard pays once (a first write, BLAS/OpenMP buffers of k-means) is not data
        for i, s in enumerate(scs):
            warm = next(w for w in (f"warm-{k}" for k in range(10**6)) if buckets_of([w], buckets)[0] % shards == i)
            s.upsert([warm], batch_of(10**9, 1, dim, seed), [None])
            s.delete([warm])
        faiss.Kmeans(dim, 16, niter=2).train(batch_of(10**9, 4096, dim, seed))
        release_memory()
        before, alloc0 = psutil.Process().memory_info().rss, allocator_stats()
        t0 = time.monotonic()
        for i in range(0, n, _BATCH):
            m = min(_BATCH, n - i)
            ids = [f"img-{j:08d}" for j in range(i, i + m)]
            xb, owner = batch_of(i, m, dim, seed), buckets_of(ids, buckets) % shards
            for j, s in enumerate(scs):
                rows = np.flatnonzero(owner == j)
                s.upsert([ids[r] for r in rows], xb[rows], [None] * len(rows))
            del xb  # not ``x``: the training sample stays held to the end, or its freeing would read as less growth
        load_s = time.monotonic() - t0
        for s in scs:
            with s._write_order:
                s.upkeep.repack_if_due()  # what a shard does once writes stop (IVF lists packed to their size)
            s.store.compact()
        release_memory()
        after, alloc1 = psutil.Process().memory_info().rss, allocator_stats()
        fixed = 0
        for s in scs:
            ivfpq = faiss.try_extract_index_ivf(s.index._main) if s.index.trained else None
            ivfpq = faiss.downcast_index(ivfpq) if ivfpq is not None else None
            table = getattr(ivfpq, "precomputed_table", None)
            fixed += 4 * table.size() if table is not None else 0
        out = {"spec": spec, "n": n, "shards": shards, "trained": sc.index.trained, "load_s": load_s,
               "fixed": fixed, "rss": after - before, "index": sum(_index_bytes(s.index) for s in scs),
               "table": sum(_table_bytes(s.table) for s in scs), "nbytes": sum(s.index.nbytes for s in scs)}
        if "allocated" in alloc1:  # jemalloc: what live allocations hold (size classes), and its bookkeeping
            out["allocated"] = alloc1["allocated"] - alloc0["allocated"]
            out["metadata"] = alloc1["metadata"] - alloc0["metadata"]
        if ops:
            ids = [f"img-{j:08d}" for j in range(0, n, max(1, n // 100))][:100]
            t0 = time.monotonic()
            found, x, _ = sc.get(ids, include_vectors=True)
            out["get100_s"] = time.monotonic() - t0
            want = np.stack([batch_of(j - j % _BATCH, _BATCH, dim, seed)[j % _BATCH]
                             for j in range(0, n, max(1, n // 100))][:100])
            out["get_exact"] = bool(len(found) == len(ids) and np.array_equal(x, want))
            ids = [f"img-{j:08d}" for j in range(0, min(n, _BATCH))]
            t0 = time.monotonic()
            sc.upsert(ids, batch_of(0, len(ids), dim, seed), [None] * len(ids))
            out["reupsert10k_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            sc.delete(ids)
            out["delete10k_s"] = time.monotonic() - t0
        for shard in held:
            shard.close()
    train_n = 0 if build_index(dim, metric, spec).is_trained else min(training_points(cfg.index)[1], n)
    out["faiss"] = _faiss_reference(spec, metric, n, dim, seed, train_n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300_000, help="vectors per index (default 300k; try 1000000)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--metric", default="l2")
    ap.add_argument("--spec", action="append", help=f"index factory string, repeatable (default {DEFAULT_SPECS})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops", action="store_true", help="also time Get with vectors and delete/re-upsert of 10k")
    ap.add_argument("--shards", type=int, default=1, help="shards sharing the one process (default 1)")
    ap.add_argument("--allocator", choices=("glibc", "jemalloc"), default="glibc",
                    help="glibc (a process of one shard, the default) or jemalloc (a process of several shards)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.shards < 1 or (args.ops and args.shards > 1):
        ap.error("--shards is 1 or more, and --ops times one shard alone (--shards 1)")
    if args.child:
        print(json.dumps(child(args.child, args.n, args.dim, args.metric, args.seed, args.ops, args.shards)))
        return 0
    env = dict(os.environ, **_SHARD_ENV)
    if args.allocator == "jemalloc":
        extra = host_process_env(os.environ.get("LD_PRELOAD", ""))
        if "LD_PRELOAD" not in extra:
            ap.error("--allocator jemalloc: no jemalloc here (Ray's libjemalloc.so), or LOOKALIKE_SHARD_ALLOCATOR is "
                     "glibc")
        env.update(extra)
    print(f"python -m bench.memory_bench --n {args.n} --dim {args.dim} --metric {args.metric}"
          + "".join(f" --spec {s}" for s in args.spec or []) + (" --ops" if args.ops else "")
          + (f" --shards {args.shards}" if args.shards > 1 else "")
          + (f" --allocator {args.allocator}" if args.allocator != "glibc" else ""))
    je = args.allocator == "jemalloc"
    print(f"{'spec':<14}{'rss/vec':>9}{'faiss/vec':>11}{'index/vec':>11}{'table/vec':>11}{'fixed/vec':>11}"
          f"{'rest/vec':>10}"
          f"{'budget':>8}{'load s':>8}" + (f"{'get100 s':>10}{'exact':>7}{'reups10k s':>12}{'del10k s':>10}"
                                           if args.ops else "") + (f"{'alloc/vec':>11}{'meta/vec':>10}" if je else ""))
    for spec in args.spec or DEFAULT_SPECS:
        cmd = [sys.executable, "-m", "bench.memory_bench", "--child", spec, "--n", str(args.n), "--dim",
               str(args.dim), "--metric", args.metric, "--seed", str(args.seed), "--shards", str(args.shards)]
        res = subprocess.run(cmd + (["--ops"] if args.ops else []), env=env, capture_output=True, text=True)
        if res.returncode:
            print(f"{spec:<14} failed:\n{res.stderr[-2000:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        per = {k: r[k] / r["n"] for k in ("rss", "faiss", "index", "table", "fixed")}
        line = (f"{spec:<14}{per['rss']:>9.1f}{per['faiss']:>11.1f}{per['index']:>11.1f}{per['table']:>11.1f}"
                f"{per['fixed']:>11.1f}{per['rss'] - per['index'] - per['table'] - per['fixed']:>10.1f}"
                f"{per['faiss'] + 48:>8.0f}{r['load_s']:>8.1f}")
        if args.ops:
            line += (f"{r['get100_s']:>10.3f}{str(r['get_exact']):>7}{r['reupsert10k_s']:>12.3f}"
                     f"{r['delete10k_s']:>10.3f}")
        if je:  # jemalloc's own figures: live allocations in their size classes, and its bookkeeping
            line += f"{r.get('allocated', 0) / r['n']:>11.1f}{r.get('metadata', 0) / r['n']:>10.1f}"
        print(line + ("" if r["trained"] else "  (not trained)"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
